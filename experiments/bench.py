"""Benchmark one PACED-RL step, split into select / rollout / verify / update.

    python -m experiments.bench                      # CPU: a testbed-shaped model, float32
    python -m experiments.bench --shape=qwen2.5-1.5b # GPU: a Qwen2.5-1.5B-shaped model from its config, bf16
    python -m experiments.bench --shape=smollm2-135m --prompts=8 --prompt_len=70 --response_len=64 --micro_batch=16 --logit_chunk=16
                                                     # CPU: the smollm2_arith preset's step

No download: the model is built from a config with random weights (speed does not depend on the
weights), prompts are random tokens of length --prompt_len, and every response runs to
--response_len tokens (EOS is never sampled), so the work per step is fixed. Prints the time of each
phase, rollout and update tokens/s, peak memory, and on a GPU the update's model-FLOPs utilization
(6·N·tokens, attention excluded, against the device's dense bf16 peak) and the rollout throughput as a
fraction of the memory-bandwidth bound (every decode step reads all weights and the KV cache once).
"""

import dataclasses
import os
import resource
import sys
import time

import numpy as np
import torch

import paced_rl
import replay
import scheduler
import update
import verify
from config import Config
from selection import Selector

SHAPES = {  # (hidden, intermediate, layers, heads, kv heads, vocab)
    "testbed": (96, 192, 3, 4, 4, 15),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 151936),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 152064),
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),  # the smollm2_arith preset's model (Llama architecture)
}
PEAKS = {  # dense bf16 FLOP/s and memory bandwidth in B/s, from the vendors' data sheets
    "H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12), "A6000": (155e12, 0.77e12),
}


@dataclasses.dataclass
class Bench:
    shape: str = "testbed"  # a key of SHAPES
    prompts: int = 32  # B prompts per step (one process)
    group_size: int = 8  # G responses per prompt
    prompt_len: int = 8  # tokens per prompt
    response_len: int = 6  # tokens per response (no early EOS)
    rollout_batch: int = 0  # prompts per generation call; 0 = all
    micro_batch: int = 0  # samples per forward/backward; 0 = all
    pool_size: int = 64  # candidates scored by Z_φ per step (the testbed's pool_size), a quarter of B explored
    steps: int = 3  # timed steps (after one warm-up step)
    dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    grad_ckpt: bool = False  # gradient checkpointing in the update
    logit_chunk: int = 0  # response positions per output-head chunk (large vocabularies); 0 = all


def build(b: Bench, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    h, inter, layers, heads, kv, vocab = SHAPES[b.shape]
    Config_, Model = (LlamaConfig, LlamaForCausalLM) if b.shape.startswith("smollm2") else (Qwen2Config, Qwen2ForCausalLM)
    cfg = Config_(hidden_size=h, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=b.prompt_len + b.response_len + 8,
                      tie_word_embeddings=b.shape != "qwen2.5-7b")
    lm = Model(cfg).to(device=device, dtype=dtype)
    if b.grad_ckpt:
        lm.gradient_checkpointing_enable()
    return lm


def main(argv):
    b = Bench(**{k: type(getattr(Bench(), k))(v) if not isinstance(getattr(Bench(), k), bool) else v.lower() in ("1", "true", "on")
                 for k, v in (a[2:].split("=", 1) for a in argv)})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[b.dtype]
    h, inter, layers, _, _, vocab = SHAPES[b.shape]
    approx_params = layers * (4 * h * h + 3 * h * inter) + vocab * h
    need = approx_params * (dtype.itemsize * 2 + 8)  # weights, gradients, AdamW's two float32 moments
    if device.type == "cpu":
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        if need > 0.8 * avail:
            raise SystemExit(f"bench: the {b.shape} shape needs about {need / 2**30:.0f} GiB for training state and this "
                             f"machine has {avail / 2**30:.0f} GiB free: run it on a GPU")
    torch.manual_seed(0)
    lm = build(b, device, dtype)
    n_params = sum(p.numel() for p in lm.parameters())
    H, vocab = lm.config.hidden_size, lm.config.vocab_size
    cfg = Config(group_size=b.group_size, max_new_tokens=b.response_len, rollout_batch=b.rollout_batch,
                 micro_batch=b.micro_batch, logit_chunk=b.logit_chunk, temperature=1.0, prompts_per_step=b.prompts,
                 pool_size=b.pool_size, explore_frac=0.25)
    logz = paced_rl.LogZHead(H, 256, cfg.beta, 0.5).to(device)
    policy = paced_rl.Policy(lm, logz)
    opt = torch.optim.AdamW([{"params": lm.parameters(), "lr": 1e-6}, {"params": logz.parameters(), "lr": 1e-3}])
    pool = scheduler.PromptPool(max(b.pool_size, b.prompts), b.pool_size, seed=0)
    emb = torch.randn(max(b.pool_size, b.prompts), H, device=device)
    selector = Selector(cfg, pool.n, emb, None, np.random.default_rng(0))
    buf = replay.ReplayBuffer(128, 64)
    rng = np.random.default_rng(0)
    prompts = [torch.randint(3, min(vocab, 1000), (b.prompt_len,)).tolist() for _ in range(b.prompts)]
    pad, no_eos = 0, -1  # responses never end early

    def step():
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        t = [time.perf_counter()]
        with torch.no_grad():  # select: score the pool with Z_φ, pick B near τ (the loop's own selector)
            selector.choose(pool, lambda i: logz.p_hat(emb[torch.as_tensor(i, device=device)]).float().cpu().numpy())
        sync(); t.append(time.perf_counter())
        pid, pmask = paced_rl.left_pad(prompts, pad, device)
        lm.eval()
        size = b.rollout_batch or b.prompts
        resp = torch.cat([paced_rl.generate(lm, pid[i:i + size], pmask[i:i + size], b.group_size,
                                            paced_rl.make_generators(range(i, i + size), device), b.response_len,
                                            1.0, no_eos, pad) for i in range(0, b.prompts, size)])
        sync(); t.append(time.perf_counter())
        texts = [" ".join(map(str, r[:4].tolist())) for r in resp.cpu()]  # verify: a cheap exact-match verifier
        rewards, _ = verify.score(verify.testbed_reward, texts, ["7"] * len(texts))
        reward = torch.tensor(rewards, device=device)
        t.append(time.perf_counter())
        drawn = buf.sample(16, rng)  # replay bookkeeping, as in train.py
        buf.add([{"prompt": int(i), "response": [1, 2], "priority": float(p), "logp_behavior": -1.0}
                 for i, p in enumerate(rng.random(b.prompts * b.group_size // 2))])
        t.append(time.perf_counter())
        lm.train()
        rmask = torch.ones_like(resp)
        batch = {"pid": pid.repeat_interleave(b.group_size, 0), "pmask": pmask.repeat_interleave(b.group_size, 0),
                 "resp": resp, "rmask": rmask, "reward": reward, "behavior": None, "train_logz": True,
                 "emb": emb[:b.prompts].repeat_interleave(b.group_size, 0)}
        update.loss_backward(policy, None, batch, cfg, resp.size(0))
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(); t.append(time.perf_counter())
        return np.diff(t), len(drawn)

    step()  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = np.mean([step()[0] for _ in range(b.steps)], axis=0)
    sel, roll, ver, rep, upd = times
    total = times.sum()
    n_resp_tok = b.prompts * b.group_size * b.response_len
    n_upd_tok = b.prompts * b.group_size * (b.prompt_len + b.response_len)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(f"device: {name}; model: {b.shape}-shaped, {n_params / 1e6:.1f} M parameters, {str(dtype)[6:]}; "
          f"B={b.prompts} G={b.group_size} prompt {b.prompt_len} + response {b.response_len} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    print("| phase | s / step | share |\n|---|---|---|")
    for label, v in (("select (Z_φ over the pool + top-B)", sel), ("rollout", roll), ("verify", ver),
                     ("replay buffer", rep), ("update (fwd + bwd + AdamW)", upd)):
        print(f"| {label} | {v:.4f} | {v / total:.1%} |")
    print(f"| step | {total:.4f} | |")
    print(f"rollout: {n_resp_tok / roll:,.0f} tokens/s; update: {n_upd_tok / upd:,.0f} tokens/s; "
          f"scheduler + replay: {(sel + rep) / total:.2%} of the step")
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        peak = next((v for k, v in PEAKS.items() if k in name), None)
        if peak:
            mfu = 6 * n_params * n_upd_tok / upd / peak[0]
            kv_bytes = 2 * lm.config.num_hidden_layers * lm.config.num_key_value_heads * (H // lm.config.num_attention_heads) \
                * (b.prompt_len + b.response_len) * (2 if dtype == torch.bfloat16 else 4)  # per sequence, at the end
            seqs = (b.rollout_batch or b.prompts) * b.group_size
            per_step_bytes = n_params * (2 if dtype == torch.bfloat16 else 4) + seqs * kv_bytes / 2  # KV on average half full
            bound = seqs * peak[1] / per_step_bytes  # tokens/s if every decode step ran at full bandwidth
            print(f"update MFU: {mfu:.1%} of {peak[0] / 1e12:.0f} TFLOP/s; rollout: {n_resp_tok / roll / bound:.1%} "
                  f"of the bandwidth bound ({bound:,.0f} tokens/s at {peak[1] / 1e12:.2f} TB/s)")
        else:
            print(f"no peak figures for {name}: add it to PEAKS for MFU and the bandwidth bound")
    else:
        print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
