"""Benchmark one training step, split into its phases, and what each speed switch buys, in one run.

    python -m experiments.bench                      # CPU: a testbed-shaped model
    python -m experiments.bench --shape=smollm2-135m --prompts=8 --prompt_len=83 --prompt_max=102 --response_len=48 \
        --response_min=20 --micro_batch=16 --logit_chunk=16 --steps=1   # CPU: the smollm2_arith preset's step
    python -m experiments.bench --shape=qwen2.5-1.5b --prompts=64 --prompt_len=512 --response_len=1024  # GPU

No download: the model is built from a config with random weights (speed does not depend on the
weights) and prompts are random tokens, --prompt_len to --prompt_max long. Rollouts run to
--response_len tokens (EOS is never sampled: of G·B samples the longest decides a rollout's length);
the update then sees each response cut at a length drawn from [--response_min, --response_len], as the
loop's masks would. The step runs under each mode of --modes:

    off            fp32 compute, one forward per sequence, the β·KL pass every step
    bf16           dtype=bfloat16: bf16 compute under autocast, fp32 weights (lm.amp)
    shared_prefix  one prompt pass per group in the update and the β·KL pass (logprobs.token_logprobs)
    kl_every       the β·KL pass every --kl_every steps (its time divided by k)
    all            the three together
    static         all, and rollouts by the static sampler (static_decode.py: a StaticCache; on a GPU, decode
                   steps compiled to CUDA graphs, whose compilation the warm-up step pays and is reported apart)

and prints, per mode, the phases' seconds, the step as a ratio to `off`, tokens per second and peak
memory, of the step and of each phase (CPU: the process's peak resident set, reset before each; GPU: peak
allocated), the warm-up step's extra rollout seconds (compilation, for `static`), and on a
GPU the update's model-FLOPs utilization (6·N·tokens, attention excluded, against the device's dense
bf16 peak) and the rollout's throughput as a share of the memory-bandwidth bound. The update's
tokens/s count G·prompt + response tokens in every mode (the work of the plain path), so shared_prefix
shows as more tokens per second.
"""

import dataclasses
import os
import resource
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch

import lm as lm_lib
import paced_rl
import replay
import scheduler
import static_decode
import tb_loss
import update
import verify
from config import Config

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "testbed": (96, 192, 3, 4, 4, 15),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),  # the smollm2_arith preset's model (Llama architecture)
}
PEAKS = {  # dense bf16 FLOP/s and memory bandwidth in B/s, from the vendors' data sheets
    "H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12), "A6000": (155e12, 0.77e12),
}
MODES = {"off": {}, "bf16": {"dtype": "bfloat16"}, "shared_prefix": {"shared_prefix": True}, "kl_every": {"kl": True},
         "all": {"dtype": "bfloat16", "shared_prefix": True, "kl": True},
         "static": {"dtype": "bfloat16", "shared_prefix": True, "kl": True, "sampler": "static"}}
PHASES = ("select (Z_φ over the pool + top-B)", "rollout", "verify", "replay buffer", "update (fwd + bwd + AdamW)",
          "β·KL pass (per step)")


@dataclasses.dataclass
class Bench:
    shape: str = "testbed"  # a key of SHAPES
    prompts: int = 32  # B prompts per step (one process)
    group_size: int = 8  # G responses per prompt
    prompt_len: int = 8  # tokens per prompt (the shortest)
    prompt_max: int = 0  # the longest prompt; lengths drawn uniformly in between (0 = all prompt_len)
    response_len: int = 6  # tokens per rollout (no early EOS): the length cap
    response_min: int = 0  # the update's responses are cut to lengths drawn from [response_min, response_len] (0 = none cut)
    rollout_batch: int = 0  # prompts per generation call; 0 = all
    micro_batch: int = 0  # samples per forward/backward; 0 = all
    logit_chunk: int = 0  # response positions per output-head chunk (large vocabularies); 0 = all
    pool_size: int = 64  # candidates scored by Z_φ per step (the testbed's pool_size), a quarter of B explored
    kl_every: int = 4  # the kl_every mode's k
    modes: str = ",".join(MODES)  # comma-separated names of MODES
    steps: int = 3  # timed steps per mode (after one warm-up step)
    grad_ckpt: bool = False  # gradient checkpointing in the update


def parse(argv) -> Bench:
    b, fields = Bench(), {f.name: f.type for f in dataclasses.fields(Bench)}
    for a in argv:
        k, _, v = a[2:].partition("=")
        if not a.startswith("--") or k not in fields:
            raise SystemExit(f"bench: unknown argument {a!r}; fields: {sorted(fields)}")
        setattr(b, k, v.lower() in ("1", "true", "on") if fields[k] in (bool, "bool") else type(getattr(b, k))(v))
    bad = [m for m in b.modes.split(",") if m not in MODES]
    if bad:
        raise SystemExit(f"bench: unknown mode(s) {bad}; known: {list(MODES)}")
    return b


def build(b: Bench, device):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    h, inter, layers, heads, kv, vocab = SHAPES[b.shape]
    Config_, Model = (LlamaConfig, LlamaForCausalLM) if b.shape.startswith(("smollm2", "testbed")) else (Qwen2Config, Qwen2ForCausalLM)
    cfg = Config_(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=max(b.prompt_len, b.prompt_max) + b.response_len + 8,
                  tie_word_embeddings=b.shape != "qwen2.5-7b")
    lm = Model(cfg).to(device)  # fp32 weights, as the loop holds them (bf16 is autocast)
    if b.grad_ckpt:
        lm.activation_checkpointing_enable()
    return lm


def peak_memory_reset(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # Linux: writing 5 to clear_refs resets the peak resident set size (VmHWM)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):  # not Linux: the process's peak so far, over every mode run before
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv):
    b = parse(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    h, inter, layers, _, _, vocab = SHAPES[b.shape]
    approx_params = layers * (4 * h * h + 3 * h * inter) + vocab * h
    need = approx_params * 16  # fp32 weights and gradients, AdamW's two fp32 moments
    if device.type == "cpu":
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > 0.8 * avail:
            raise SystemExit(f"bench: the {b.shape} shape needs about {need / 2**30:.0f} GiB for training state and this "
                             f"machine has {avail / 2**30:.0f} GiB free: run it on a GPU")
    torch.manual_seed(0)
    lm = build(b, device)
    n_params = sum(p.numel() for p in lm.parameters())
    H, vocab, B, G, R = lm.config.hidden_size, lm.config.vocab_size, b.prompts, b.group_size, b.response_len
    base = Config(group_size=G, max_new_tokens=R, rollout_batch=b.rollout_batch, micro_batch=b.micro_batch,
                  logit_chunk=b.logit_chunk, temperature=1.0, prompts_per_step=B, pool_size=b.pool_size, explore_frac=0.25)
    logz = paced_rl.LogZHead(H, 256, base.beta, 0.5).to(device)
    policy = paced_rl.Policy(lm, logz)
    opt = torch.optim.AdamW([{"params": lm.parameters(), "lr": 1e-6}, {"params": logz.parameters(), "lr": 1e-3}])
    pool = scheduler.PromptPool(max(b.pool_size, B), b.pool_size, seed=0)
    emb = torch.randn(max(b.pool_size, B), H, device=device)
    objective = update.PacedObjective(SimpleNamespace(cfg=base, embeddings=lambda: (emb, emb)))
    model = update.Model(policy, None, list(policy.parameters()), opt)
    buf = replay.ReplayBuffer(128, 64)
    rng = np.random.default_rng(0)
    lens = rng.integers(b.prompt_len, max(b.prompt_len, b.prompt_max) + 1, B)
    prompts = [torch.randint(3, min(vocab, 1000), (int(n),)).tolist() for n in lens]
    cut = rng.integers(b.response_min or R, R + 1, B * G)  # each response's length in the update
    pad, no_eos = 0, -1  # responses never end early
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(cfg, kl_k):
        t, mem = [time.perf_counter()], []

        def phase_done():  # the phase's seconds and peak memory
            sync()
            t.append(time.perf_counter())
            mem.append(peak_memory_gib(device))
            peak_memory_reset(device)

        peak_memory_reset(device)
        cand = pool.next()  # select: score the pool with Z_φ, pick B near τ (the loop's own rule)
        scheduler.pick(objective.p_hat(policy, cand), B, base.tau, round(base.explore_frac * B))
        phase_done()
        pid, pmask = lm_lib.left_pad(prompts, pad, device)
        lm.eval()
        size, spec = b.rollout_batch or B, lm_lib.Sampling(G, R, 1.0, no_eos, pad)
        sample = static_decode.generate if cfg.sampler == "static" else lm_lib.generate
        with lm_lib.amp(device, cfg.dtype == "bfloat16"):
            resp = torch.cat([sample(lm, pid[i:i + size], pmask[i:i + size], lm_lib.make_generators(range(i, i + size), device),
                                     spec) for i in range(0, B, size)])
        phase_done()
        texts = [" ".join(map(str, r[:4].tolist())) for r in resp.cpu()]  # verify: a cheap exact-match verifier
        rewards, _ = verify.score(verify.testbed_reward, texts, ["7"] * len(texts))
        phase_done()
        buf.sample(16, rng)  # replay bookkeeping, as in train.py
        buf.add([{"prompt": int(i), "response": [1, 2], "priority": float(p), "logp_behavior": -1.0}
                 for i, p in enumerate(rng.random(B * G // 2))])
        phase_done()
        lm.train()
        rmask = (torch.arange(R, device=device)[None] < torch.as_tensor(cut, device=device)[:, None]).long()
        resp = resp * rmask
        seqs = lm_lib.Seqs(pid.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), resp, rmask)
        samples = update.Samples(seqs, torch.arange(B, device=device).repeat_interleave(G), torch.tensor(rewards, device=device))
        objective.cfg = cfg
        update.backward(model, objective, samples, resp.size(0), cfg)
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        phase_done()
        lm.eval()  # β·KL(π_old ‖ π_θ): the loop's no-grad pass after the update (train.py, kl_sum)
        new = update.logprobs_nograd(lm, seqs, cfg)
        tb_loss.kl_k3(new.detach(), new).sum().item()
        phase_done()
        dt = np.diff(t)
        dt[-1] /= kl_k  # one pass every k steps
        return dt, np.array(mem)

    res = {}
    for name in b.modes.split(","):
        m = MODES[name]
        cfg = dataclasses.replace(base, dtype=m.get("dtype", "float32"), shared_prefix=m.get("shared_prefix", False),
                                  sampler=m.get("sampler", "dynamic"))
        kl_k = b.kl_every if m.get("kl") else 1
        warm = step(cfg, kl_k)[0]  # warm-up: allocations, and the static sampler's compilation
        timed = [step(cfg, kl_k) for _ in range(b.steps)]
        phases = np.mean([d for d, _ in timed], axis=0)
        res[name] = (phases, np.max([m for _, m in timed], axis=0), max(warm[1] - phases[1], 0.0))
    n_roll_tok = B * G * R
    n_upd_tok = int(G * lens.sum() + cut.sum())  # the real prompt and response tokens the update trains on
    dev = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {dev}; model: {b.shape}-shaped, {n_params / 1e6:.1f} M parameters, fp32 weights; B={B} G={G} prompts "
          f"{lens.min()}-{lens.max()} tokens, rollouts {R} tokens, the update's responses {cut.min()}-{cut.max()} "
          f"(mean {cut.mean():.1f}); kl_every={b.kl_every}; torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    names = list(res)
    print("| s / step | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for i, label in enumerate(PHASES):
        print(f"| {label} | " + " | ".join(f"{res[n][0][i]:.4f}" for n in names) + " |")
    steps = {n: float(res[n][0].sum()) for n in names}
    print("| step | " + " | ".join(f"{steps[n]:.4f}" for n in names) + " |")
    if "off" in res:
        print("| step ÷ off | " + " | ".join(f"{steps[n] / steps['off']:.3f}" for n in names) + " |")
    print("| rollout tokens/s | " + " | ".join(f"{n_roll_tok / res[n][0][1]:,.0f}" for n in names) + " |")
    print("| update tokens/s | " + " | ".join(f"{n_upd_tok / res[n][0][4]:,.0f}" for n in names) + " |")
    print("| peak memory (GiB) | " + " | ".join(f"{res[n][1].max():.2f}" for n in names) + " |")
    for i, label in enumerate(PHASES):
        print(f"| peak memory: {label.split(' (')[0]} | " + " | ".join(f"{res[n][1][i]:.2f}" for n in names) + " |")
    print("| warm-up step's extra rollout s (compilation) | " + " | ".join(f"{res[n][2]:.2f}" for n in names) + " |")
    if device.type == "cuda":
        peak = next((v for k, v in PEAKS.items() if k in dev), None)
        if peak:  # rollout bound: every decode step reads the weights once (bf16 under autocast) and the KV cache
            kv = 2 * layers * lm.config.num_key_value_heads * (H // lm.config.num_attention_heads) * (lens.mean() + R / 2) * 2
            seqs = (b.rollout_batch or B) * G
            bound = lambda n: seqs * peak[1] / (n_params * (2 if n in ("bf16", "all", "static") else 4) + seqs * kv)  # noqa: E731
            print("| update MFU | " + " | ".join(f"{6 * n_params * n_upd_tok / res[n][0][4] / peak[0]:.1%}" for n in names) + " |")
            print("| rollout ÷ bandwidth bound | " + " | ".join(f"{n_roll_tok / res[n][0][1] / bound(n):.1%}" for n in names) + " |")
        else:
            print(f"no peak figures for {dev}: add it to PEAKS for the update's MFU and the rollout's bandwidth bound")
    return {n: {"phases": res[n][0].tolist(), "step": steps[n], "peak_gib": float(res[n][1].max()),
                "phase_peak_gib": res[n][1].tolist(), "compile_s": float(res[n][2]),
                "rollout_tokens_per_s": n_roll_tok / res[n][0][1]} for n in names}


if __name__ == "__main__":
    main(sys.argv[1:])
