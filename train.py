"""PACED-RL training loop. Runs as `python train.py` or `torchrun --standalone --nproc_per_node=N train.py`.

One step (DESIGN.md §6):
  1. score a candidate pool with p̂ = β·log Z_φ(e(x)) and select B prompts near τ  (scheduler.py)
  2. roll out G responses per prompt with the current policy, π_old := π_θ        (paced_rl.py)
  3. verify: reward r ∈ {0, 1}, per-prompt accuracy a(x), error e(x) = |a − p̂|      (verify.py)
  4. draw replayed correct trajectories from earlier steps                          (replay.py)
  5. one optimizer step (`updates_per_batch` > 1: several, each on a share of the prompts) on the
     TB loss over fresh + replayed samples, in θ and φ                             (tb_loss.py);
     then this step's highest-error correct trajectories enter the buffer
  6. log metrics reduced over all ranks to <out_dir>/metrics.jsonl

Data parallelism is written by hand: prompts are sharded over ranks after selection, every rank
computes its share of the global-mean loss, gradients are summed with one all-reduce, so the update
equals the one-process update on the global batch (what DDP does, in ten lines you can read).

Where we depart from or fill in the paper (each a config field below): the candidate pool and
exploration slots, the initial estimate p0, replayed samples drawn *before* this step's are added (a
trajectory never appears twice in one update), replayed samples anchored on the current policy with a
clipped importance weight and not training Z_φ. One optimizer step per rollout batch by default, so
log π_old is the update's own forward pass, detached (with updates_per_batch > 1, one no-grad pass
before the first step). Run `python train.py --help` for every field.

Baselines in the same loop (`--algo`, DESIGN.md §9): `grpo` (group-normalized advantage, clipped token
ratio, optional KL to π_ref; `--dynamic_sampling=true` adds DAPO's filter, rolling out more prompts
until B groups with differing rewards are kept) and `flowrl` (length-normalized TB against π_ref with
a log Z head over the policy's own prompt states). Both sample uniformly, without replay.

Faults: checkpoints are atomic and checksummed (resume falls back past a damaged one), a NaN loss skips
its update on every rank, SIGINT / SIGTERM checkpoint and stop after the current step (README).
"""

import dataclasses
import datetime
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import eval as eval_lib
import paced_rl
import replay as replay_lib
import scheduler
import tb_loss
import verify


@dataclass
class Config:
    # --- run
    out_dir: str = "runs/paced"  # metrics.jsonl, checkpoints and the prompt-embedding cache go here
    seed: int = 0  # seeds the pool order, the sampling noise of every prompt, Z_φ init, replay draws
    resume: str = ""  # a run directory: continue from its newest checkpoint (its config, then CLI overrides)
    max_steps: int = 250  # optimizer steps; the paper runs 150 on DeepScaleR
    device: str = "auto"  # auto | cpu | cuda | mps; under torchrun with CUDA each rank takes cuda:LOCAL_RANK
    dtype: str = "float32"  # float32 | bfloat16 parameters and compute; bf16 is for GPUs
    dist_timeout_s: int = 900  # process-group timeout: a dead rank stops the others after this long
    preset: str = ""  # a named set of defaults (PRESETS below, e.g. paper_math_1.5b); --key=value still wins
    attn_impl: str = "sdpa"  # attention kernel: sdpa (PyTorch) | flash_attention_2 (needs flash-attn) | eager
    grad_ckpt: bool = False  # gradient checkpointing: recompute activations in backward (large models)
    fsdp: bool = False  # shard the policy's weights, gradients and AdamW state over ranks with FSDP2
    # --- model and data
    model: str = "testbed/model"  # HF hub id or local path of the initial policy (also π_ref, and e(x))
    train_data: str = "testbed/train.jsonl"  # json / jsonl prompts with the fields below
    eval_data: str = "testbed/heldout.jsonl"  # held-out prompts: evaluated, never trained on or pooled
    prompt_field: str = "prompt"  # the field holding the prompt text (DeepScaleR, MATH-500, AIME: problem)
    answer_field: str = "answer"  # the field holding the reference answer given to the verifier
    eval_prompt_field: str = ""  # the held-out file's prompt field, if it differs ("" = prompt_field)
    eval_answer_field: str = ""  # the held-out file's answer field, if it differs ("" = answer_field)
    prompt_suffix: str = ""  # appended to every prompt text, e.g. an instruction to box the final answer
    verifier: str = "testbed"  # a name in verify.VERIFIERS: testbed | math | code
    verifier_workers: int = 1  # responses verified at once (the code verifier: concurrent sandboxes)
    testbed_dir: str = "testbed"  # built here on first use when model or data point inside it
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted (paper: 1024)
    # --- rollouts
    prompts_per_step: int = 32  # B, prompts per step over all ranks (divisible by the world size)
    group_size: int = 8  # G, responses per prompt (paper: 8)
    max_new_tokens: int = 6  # response-length cap in tokens (paper: 3072; the testbed needs ≤ 5)
    rollout_batch: int = 0  # prompts per generation call (bounds KV-cache memory); 0 = all of a rank's prompts
    micro_batch: int = 0  # samples per forward/backward; gradients accumulate, one sync per step; 0 = all
    logit_chunk: int = 0  # response positions per output-head chunk, recomputed in backward (big vocabularies); 0 = all
    updates_per_batch: int = 1  # optimizer steps per rollout batch, each on 1/U of its prompts (FlowRL's code: 16); 1 = on-policy
    temperature: float = 1.0  # sampling temperature (paper: 1.0); log-probs are of this distribution
    # --- algorithm
    algo: str = "paced"  # paced (this paper) | grpo | flowrl: the baselines sample uniformly, without replay
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, roll out more prompts until B are kept
    dyn_max_rounds: int = 8  # dynamic sampling: at most this many rollout rounds of B prompts per step (DAPO: max_num_gen_batches)
    adv_eps: float = 1e-4  # GRPO / FlowRL advantage (r − group mean)/(group std + adv_eps) (TRL: 1e-4)
    clip_eps: float = 0.2  # GRPO: the token ratio π_θ/π_old is clipped to [1 − ε, 1 + ε] (TRL: 0.2)
    grpo_agg: str = "token_mean"  # GRPO loss aggregation: token_mean (Σ tokens / global token count) | seq_mean
    kl_coef: float = 0.0  # GRPO: weight of the per-token k3 KL to the initial model (TRL default: 0); > 0 loads π_ref
    flowrl_reward_mult: float = 15.0  # FlowRL: multiplier of the group-normalized reward in the residual (authors: 15)
    flowrl_is_clip: float = 10.0  # FlowRL: importance weight min(clip, π_θ/π_old) of a sequence, detached (authors: 10)
    # --- PACED-RL
    beta: float = 0.05  # KL strength; p̂ = β·log Z_φ (paper: 0.05, i.e. reward multiplier 20)
    tau: float = 0.5  # target accuracy of selected prompts (paper: 0.5)
    select: str = "paced"  # paced: B candidates nearest τ | uniform: the first B of the pool (baseline)
    explore_frac: float = 0.5  # share of the B prompts drawn uniformly from the rest of the pool (ours; 0 = paper)
    pool_size: int = 64  # candidates scored per step (a few × B); 0 scores the whole data set
    logz_hidden: int = 256  # width of the Z_φ MLP (paper: 3-layer MLP, width not given)
    logz_features: str = "mean"  # e(x): mean | mean_last (mean-pooled and last-token hidden states)
    logz_output: str = "sigmoid"  # sigmoid: p̂ kept in [0, 1] | linear: unbounded MLP output
    logz_init_acc: float = 0.5  # p0: every prompt's initial estimate p̂; log Z starts at p0/β
    # --- replay
    replay: str = "on"  # on | off: the error-prioritized buffer of correct trajectories
    replay_capacity: int = 128  # buffer size (paper: 128)
    replay_add_k: int = 64  # highest-error correct trajectories added per step (paper: 64)
    replay_per_step: int = 16  # replayed samples joining each update (paper: not given)
    replay_anchor: str = "current"  # current: π_old = the policy before this update | behavior: the sampler's
    replay_is_clip: float = 1.0  # replayed weight min(clip, π_θold/π_behavior), detached; 0 = no weight
    replay_trains_logz: bool = False  # correct-only samples would push log Z_φ (so p̂) up: off
    # --- optimization
    lr: float = 2e-4  # policy learning rate (AdamW); 3e-4 is unstable on the testbed; paper: 1e-6 at 1.5B
    logz_lr: float = 1e-2  # Z_φ learning rate (Adam): a small MLP wants a far larger one than the LLM
    weight_decay: float = 0.0  # policy weight decay (paper: 0.1)
    grad_clip: float = 1.0  # grad-norm clip of the policy θ (Z_φ is not clipped: its scale is its own); 0 = off
    # --- evaluation, logging, checkpoints
    eval_every: int = 50  # evaluate held-out prompts every this many steps (and at step 0 and the end)
    eval_samples: int = 32  # samples per held-out prompt at `temperature` (the paper: 32 for AIME)
    eval_batch: int = 64  # held-out prompts per generation batch
    ckpt_every: int = 50  # write a checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2  # checkpoints kept; older ones are deleted


# The paper's settings (DESIGN.md §7). Hub ids are downloaded on first use; B, the pool and the
# micro-batch sizes are ours (the paper does not give them); see the README for hardware.
_PAPER_MATH = dict(
    train_data="agentica-org/DeepScaleR-Preview-Dataset", eval_data="HuggingFaceH4/MATH-500:test",
    prompt_field="problem", answer_field="answer", verifier="math",
    prompt_suffix=" Let's think step by step and output the final answer within \\boxed{}.",
    group_size=8, temperature=1.0, max_prompt_tokens=1024, max_new_tokens=3072, beta=0.05, tau=0.5,
    lr=1e-6, weight_decay=0.1, max_steps=150, prompts_per_step=128, pool_size=512, eval_every=10,
    eval_samples=4, eval_batch=64, ckpt_every=10, dtype="bfloat16", logz_hidden=1024, verifier_workers=8,
    testbed_dir="", out_dir="runs/paper_math")
PRESETS = {
    "paper_math_1.5b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-1.5B", "micro_batch": 16, "rollout_batch": 64,
                        "logit_chunk": 512},
    "paper_math_7b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-7B", "micro_batch": 4, "rollout_batch": 32,
                      "grad_ckpt": True, "fsdp": True},
}


# ----------------------------------------------------------------------------- config and CLI


def field_docs():
    """{field: comment} from the source of Config, for --help."""
    docs = {}
    for line in inspect.getsource(Config).splitlines():
        m = re.match(r"\s+(\w+): \w+ = .*?  # (.*)", line)
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def parse_value(key: str, raw: str, default):
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "on", "yes"):
                return True
            if raw.lower() in ("0", "false", "off", "no"):
                return False
            raise ValueError
        return type(default)(raw)
    except ValueError:
        raise SystemExit(f"config: --{key}={raw!r} is not a valid {type(default).__name__}") from None


def parse_args(argv) -> dict:
    """`--key=value` pairs -> {key: typed value}; `--help` prints every field."""
    defaults = Config()
    known = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            docs = field_docs()
            print(__doc__.split("\n\n")[0] + "\n\nConfig (override with --key=value):")
            for f in dataclasses.fields(Config):
                print(f"  {'--' + f.name + '=' + repr(getattr(defaults, f.name)):<40} {docs.get(f.name, '')}")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"config: expected --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key not in known:
            raise SystemExit(f"config: unknown key {key!r}; run `python train.py --help` for the list")
        out[key] = parse_value(key, raw, getattr(defaults, key))
    return out


def make_config(overrides: dict) -> Config:
    """Defaults, then the preset's values, then the command line's. The baselines (algo grpo, flowrl)
    sample prompts uniformly and have no replay buffer, as published: select and replay are set so."""
    name = overrides.get("preset", "")
    if name and name not in PRESETS:
        raise SystemExit(f"config: unknown preset {name!r}; presets: {sorted(PRESETS)}")
    merged = {**PRESETS.get(name, {}), **overrides}
    if merged.get("algo", "paced") != "paced":  # set explicitly to anything else, check_config names the conflict
        merged = {"select": "uniform", "replay": "off", **merged}
    cfg = Config(**merged)
    check_config(cfg)
    return cfg


def check_config(cfg: Config):
    choices = {"algo": ("paced", "grpo", "flowrl"), "grpo_agg": ("token_mean", "seq_mean"),
               "select": ("paced", "uniform"), "replay": ("on", "off"), "replay_anchor": ("current", "behavior"),
               "dtype": ("float32", "bfloat16"), "logz_output": ("sigmoid", "linear"),
               "logz_features": ("mean", "mean_last"), "attn_impl": ("sdpa", "flash_attention_2", "eager")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise SystemExit(f"config: {k}={getattr(cfg, k)!r}; expected one of {allowed}")
    for k in ("prompts_per_step", "group_size", "max_new_tokens", "eval_every", "ckpt_every", "eval_samples"):
        if getattr(cfg, k) < 1:
            raise SystemExit(f"config: {k} must be ≥ 1, got {getattr(cfg, k)}")
    if cfg.beta <= 0:
        raise SystemExit(f"config: beta must be > 0, got {cfg.beta}")
    for k in ("tau", "explore_frac", "logz_init_acc"):
        if not 0 <= getattr(cfg, k) <= 1:
            raise SystemExit(f"config: {k} must be in [0, 1], got {getattr(cfg, k)}")
    for k in ("adv_eps", "clip_eps", "kl_coef", "flowrl_reward_mult", "flowrl_is_clip"):
        if getattr(cfg, k) < 0:
            raise SystemExit(f"config: {k} must be ≥ 0, got {getattr(cfg, k)}")
    if cfg.algo != "paced" and (cfg.select != "uniform" or cfg.replay != "off"):
        raise SystemExit(f"config: algo={cfg.algo} samples uniformly without replay (the baseline as published); got "
                         f"select={cfg.select}, replay={cfg.replay}: those are PACED-RL's switches")
    if cfg.updates_per_batch > cfg.prompts_per_step:
        raise SystemExit(f"config: updates_per_batch={cfg.updates_per_batch} exceeds prompts_per_step={cfg.prompts_per_step}")
    for k in ("verifier_workers", "keep_ckpts", "dist_timeout_s", "replay_capacity", "dyn_max_rounds", "updates_per_batch"):
        if getattr(cfg, k) < 1:
            raise SystemExit(f"config: {k} must be ≥ 1, got {getattr(cfg, k)}")
    if cfg.select == "paced" and 0 < cfg.pool_size < cfg.prompts_per_step:
        raise SystemExit(f"config: pool_size={cfg.pool_size} is smaller than prompts_per_step={cfg.prompts_per_step}")
    if cfg.fsdp and cfg.logit_chunk > 0:
        raise SystemExit("config: logit_chunk calls the model's body and head separately, which FSDP's sharded root "
                         "does not allow; with --fsdp=true bound the logits' memory with micro_batch instead")
    if cfg.verifier not in verify.VERIFIERS:
        raise SystemExit(f"config: verifier={cfg.verifier!r}; known: {sorted(verify.VERIFIERS)}")


# ----------------------------------------------------------------------------- distributed


def setup_distributed(cfg: Config):
    """(rank, world, device). torchrun sets WORLD_SIZE; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() and world == 1 else "cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores between the ranks of this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return rank, world, device


def print0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)


def gather(obj, world):
    """Every rank's `obj`, as a list in rank order (one all-gather)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def is_sharded(p) -> bool:
    return hasattr(p, "full_tensor")  # a DTensor: a parameter sharded by FSDP2


def shard_model(lm, world, device):
    """FSDP2: each decoder block, then the whole model, sharded over all ranks (ZeRO-3 style).
    FSDP reduce-scatters the gradients of sharded weights itself; sync_grads handles the rest (Z_φ)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    blocks = next(m for m in lm.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == lm.config.num_hidden_layers)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    lm.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum; FSDP then averages
    return lm


def sync_grads(params, world):
    """Sum gradients over ranks in one flat all-reduce. Each rank's loss is its share of the global
    mean (local sum / global count), so the sum is exactly the gradient of the global-batch loss.
    Sharded (FSDP) gradients arrive already reduced, averaged over ranks: they are scaled to the sum."""
    if world == 1:
        return
    for p in params:
        if is_sharded(p) and p.grad is not None:
            p.grad.mul_(world)
    params = [p for p in params if not is_sharded(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).clone()
        i += g.numel()


def all_sum(x: float, world, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# ----------------------------------------------------------------------------- data


def load_prompts(path: str, prompt_field: str, answer_field: str, verifier: str = "testbed") -> list:
    """Rows of a json / jsonl / parquet file through `datasets`, checked: [{'prompt', 'answer'}].
    Every bad row stops the run with an error naming the file, the row and what is wrong."""
    import datasets

    if not os.path.exists(path):
        hub = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?", path)  # org/name or org/name:split
        if not hub:
            raise SystemExit(f"data: {path} does not exist")
        try:
            ds = datasets.load_dataset(hub.group(1), split=hub.group(2) or "train")
        except Exception as e:
            raise SystemExit(f"data: {path} is neither a local file nor a data set that could be loaded from the "
                             f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return check_rows(ds, path, prompt_field, answer_field, verifier)
    if os.path.getsize(path) == 0:
        raise SystemExit(f"data: {path} is empty")
    if path.endswith(".jsonl"):  # name the line of a malformed record (datasets' own error does not)
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise SystemExit(f"data: {path} line {n}: not valid JSON ({e})") from None
                    if not isinstance(rec, dict):
                        raise SystemExit(f"data: {path} line {n}: expected a JSON object, got {type(rec).__name__}")
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise SystemExit(f"data: {path} could not be read as {kind}: {str(e).splitlines()[0][:300]}") from None
    return check_rows(ds, path, prompt_field, answer_field, verifier)


def check_rows(ds, path, prompt_field, answer_field, verifier) -> list:
    if len(ds) == 0:
        raise SystemExit(f"data: {path} has no rows")
    for f in (prompt_field, answer_field):
        if f not in ds.column_names:
            raise SystemExit(f"data: {path} has no field {f!r}; fields: {ds.column_names}")
    rows = []
    for i, r in enumerate(ds):
        p, a = r[prompt_field], r[answer_field]
        if not isinstance(p, str) or not p.strip():
            raise SystemExit(f"data: {path} row {i}: field {prompt_field!r} must be a non-empty string, got {p!r:.60}")
        if a is None:
            raise SystemExit(f"data: {path} row {i}: field {answer_field!r} is missing")
        try:
            a = verify.check_answer(verifier, a)
        except ValueError as e:
            raise SystemExit(f"data: {path} row {i}: field {answer_field!r}: {e}") from None
        rows.append({"prompt": p, "answer": a})
    return rows


def encode_prompts(tokenizer, rows: list, log, suffix: str = "") -> list:
    """Token ids of each prompt (+ suffix): through the chat template when the tokenizer has one, else as is."""
    if getattr(tokenizer, "chat_template", None):
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"] + suffix}], tokenize=False,
                                               add_generation_prompt=True) for r in rows]
    else:
        log("tokenizer has no chat template: prompts are used as plain text")
        texts = [r["prompt"] + suffix for r in rows]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def drop_long(rows, toks, cap, name, log):
    """Skip (and count) prompts longer than the cap; all of them too long is an error."""
    keep = [i for i, t in enumerate(toks) if len(t) <= cap]
    if not keep:
        raise SystemExit(f"data: every prompt of {name} is longer than max_prompt_tokens={cap} "
                         f"(shortest: {min(map(len, toks))} tokens)")
    if len(keep) < len(rows):
        log(f"{name}: skipped {len(rows) - len(keep)} of {len(rows)} prompts longer than max_prompt_tokens={cap}")
    return [rows[i] for i in keep], [toks[i] for i in keep]


def seed_of(*parts) -> int:
    """A 63-bit seed from integers, identical on every rank and every run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


# ----------------------------------------------------------------------------- rollouts


def rollout(lm, tokenizer, prompt_toks, seeds, cfg, device, temperature):
    """Generate G responses per prompt, `cfg.rollout_batch` prompts per generation call (memory-bounded);
    returns padded tensors, prompts repeated G times, and the decoded responses."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pid, pmask = paced_rl.left_pad(prompt_toks, pad, device)
    size = cfg.rollout_batch if cfg.rollout_batch > 0 else max(len(prompt_toks), 1)
    chunks = []
    for i in range(0, len(prompt_toks), size):
        gens = paced_rl.make_generators(seeds[i:i + size], device)
        chunks.append(paced_rl.generate(lm, pid[i:i + size], pmask[i:i + size], cfg.group_size, gens,
                                        cfg.max_new_tokens, temperature, eos, pad, stop_early=not cfg.fsdp))
    R = max(c.size(1) for c in chunks)
    resp = torch.cat([torch.nn.functional.pad(c, (0, R - c.size(1)), value=pad) for c in chunks])  # (B*G, R)
    rmask = paced_rl.response_mask(resp, eos)
    rmask = rmask * torch.cat([torch.nn.functional.pad(torch.ones_like(c), (0, R - c.size(1))) for c in chunks])
    texts = tokenizer.batch_decode(resp * rmask + pad * (1 - rmask), skip_special_tokens=True)
    G = cfg.group_size
    return pid.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), resp, rmask, texts


def loss_backward(policy, ref_lm, b: dict, cfg, denom: float):
    """Forward and backward of the algorithm's loss over one batch, in micro-batches of `cfg.micro_batch`
    samples; gradients accumulate in .grad. Each micro-batch's loss is its sum over `denom` (the global
    sample or token count), so accumulation, and the sum over ranks, give exactly the gradient of the
    global-batch loss. Returns (this batch's share of the loss, log π_old of every sample, detached (N,)).

    b: prompt/response tensors, `reward` (N,), `adv` (N,) for the baselines, `emb` (N, D) for Z_φ,
    `train_logz`, `behavior`: None for fresh samples, or the sampler's log-probs of replayed samples, and
    `old_tok`: the per-token log π_old of fresh samples when updates_per_batch > 1. With one optimizer step
    per rollout batch (the default) π_old is the policy before this update, so log π_old is log π_θ
    detached (no extra forward pass); the ratio π_θ/π_old is then 1, and GRPO's clip and FlowRL's
    importance weight are inactive, as in TRL's default of one iteration per batch. Replayed samples
    (PACED-RL) are anchored per cfg.replay_anchor, weighted min(clip, π_θold/π_behavior)."""
    N = b["resp"].size(0)
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(N, 1)
    total, olds = 0.0, []
    for i in range(0, N, size):
        s = slice(i, i + size)
        args = (b["pid"][s], b["pmask"][s], b["resp"][s], b["rmask"][s], cfg.temperature, cfg.logit_chunk)
        if cfg.algo == "flowrl":
            logp_tok, h = paced_rl.token_logprobs(policy.lm, *args, prompt_state=True)  # (n, R), (n, H)
        else:
            logp_tok = paced_rl.token_logprobs(policy.lm, *args)
        old_tok = b["old_tok"][s] if b.get("old_tok") is not None else logp_tok.detach()  # (n, R)
        logp, ntok, old = logp_tok.sum(-1), b["rmask"][s].sum(-1), old_tok.sum(-1)
        cur = logp.detach()
        if cfg.algo == "paced":
            log_z = policy.logz(b["emb"][s])
            if not b["train_logz"]:
                log_z = log_z.detach()
            anchor, w = old, None
            if b["behavior"] is not None:
                anchor = cur
                if cfg.replay_anchor == "behavior":
                    anchor = b["behavior"][s]
                if cfg.replay_is_clip > 0:
                    w = (cur - b["behavior"][s]).exp().clamp(max=cfg.replay_is_clip)
            loss = tb_loss.paced_tb_loss(log_z, logp, anchor, b["reward"][s], cfg.beta, weight=w, denom=denom)
        elif cfg.algo == "grpo":
            ref_tok = None
            if cfg.kl_coef > 0:
                with torch.no_grad():
                    ref_tok = paced_rl.token_logprobs(ref_lm, *args)
            loss = tb_loss.grpo_loss(logp_tok, old_tok, b["rmask"][s], b["adv"][s], cfg.clip_eps,
                                     cfg.grpo_agg, denom, ref_tok, cfg.kl_coef)
        else:  # flowrl
            with torch.no_grad():
                ref = paced_rl.token_logprobs(ref_lm, *args).sum(-1)
            w = (cur - old).exp().clamp(max=cfg.flowrl_is_clip)  # π_θ/π_old, detached: 1 at the first optimizer step
            loss = tb_loss.flowrl_loss(policy.logz(h), logp, ref, ntok, b["adv"][s], cfg.flowrl_reward_mult,
                                       weight=w, denom=denom)
        loss.backward()
        total += loss.item()
        olds.append(old)
    return total, torch.cat(olds)


@torch.no_grad()
def logprobs_nograd(lm, pid, pmask, resp, rmask, cfg, per_token: bool = False):
    """Response log-probs without gradients, in micro-batches: summed (N,), or per token (N, R)."""
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(resp.size(0), 1)
    tok = torch.cat([paced_rl.token_logprobs(lm, pid[i:i + size], pmask[i:i + size], resp[i:i + size],
                                             rmask[i:i + size], cfg.temperature, cfg.logit_chunk)
                     for i in range(0, resp.size(0), size)])
    return tok if per_token else tok.sum(-1)


def take(b: dict, s: slice) -> dict:
    """Rows `s` of every per-sample tensor of a batch dict (other entries as they are)."""
    return {k: v[s] if torch.is_tensor(v) else v for k, v in b.items()}


def prompt_embedding_cache(cfg, pad_id, train_toks, eval_toks, dtype, device, rank, world):
    """e(x) for the training and held-out prompts, from the initial model: computed once (sharded over
    ranks, gathered), cached in <out_dir>/prompt_emb.pt with a key of everything that determines it."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(cfg.out_dir, "prompt_emb.pt")
    key = {"model": cfg.model, "features": cfg.logz_features, "train": cfg.train_data, "eval": cfg.eval_data,
           "n_train": len(train_toks), "n_eval": len(eval_toks)}
    emb = torch.load(path) if os.path.exists(path) else None
    if emb is None or emb.get("key") != key:
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device).eval()
        all_toks = train_toks + eval_toks
        mine = list(range(rank, len(all_toks), world))
        part = paced_rl.prompt_embeddings(base, [all_toks[i] for i in mine], pad_id, cfg.eval_batch, device, cfg.logz_features)
        parts = [(i, e) for i, e in gather((mine, part), world) if len(i)]
        emb_all = torch.zeros(len(all_toks), parts[0][1].size(1))
        for i, e in parts:
            emb_all[i] = e
        emb = {"key": key, "train": emb_all[:len(train_toks)], "eval": emb_all[len(train_toks):]}
        if rank == 0:
            torch.save(emb, path + ".tmp")
            os.replace(path + ".tmp", path)
    return emb["train"], emb["eval"]


def truncate_metrics(path: str, step: int):
    """Keep the rows of metrics.jsonl before `step` (a resumed run recomputes the rest), atomically."""
    rows = []
    if step > 0 and os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: it lies past the checkpoint anyway
                pass
    with open(path + ".tmp", "w") as f:
        for r in rows:
            if r["step"] < step:
                f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------- checkpoints


def ckpt_dirs(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{6}", d))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def full_state(policy, opt, cfg):
    """(HF weights, optimizer state) as plain tensors; with FSDP a collective that every rank must call."""
    if not cfg.fsdp:
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy.lm, options=o), get_optimizer_state_dict(policy, opt, options=o)


def load_opt_state(policy, opt, osd, cfg):
    if not cfg.fsdp:
        return opt.load_state_dict(osd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, opt, osd, options=StateDictOptions(full_state_dict=True))


def torch_rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_torch_rng_state(st, device):
    torch.set_rng_state(st["cpu"])
    if st["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(cfg, policy, tokenizer, opt, state: dict, rank):
    """Atomic: written to a temporary directory, then renamed; the newest `keep_ckpts` are kept.
    manifest.json records each file's size and sha256, so a damaged file is found and named."""
    model_sd, opt_sd = full_state(policy, opt, cfg)
    if rank != 0:
        return
    final = os.path.join(cfg.out_dir, f"ckpt_{state['step']:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.lm.save_pretrained(os.path.join(tmp, "model"), state_dict=model_sd)
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save({"logz": policy.logz.state_dict() if policy.logz is not None else None, "opt": opt_sd, **state, "config": dataclasses.asdict(cfg)},
               os.path.join(tmp, "state.pt"))
    files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))} for f in files}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in ckpt_dirs(cfg.out_dir)[:-cfg.keep_ckpts]:
        shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)


def check_checkpoint(path: str):
    """Raise ValueError naming the first missing, truncated or altered file of a checkpoint."""
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{mpath} is missing or unreadable ({e})") from None
    for name, want in manifest.items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise ValueError(f"{fp} is missing")
        if os.path.getsize(fp) != want["bytes"]:
            raise ValueError(f"{fp} is truncated or altered: {os.path.getsize(fp)} bytes, expected {want['bytes']}")
        if _sha256(fp) != want["sha256"]:
            raise ValueError(f"{fp} is corrupt: sha256 differs from the manifest")


def newest_good_checkpoint(run_dir: str, log) -> str:
    """The newest checkpoint of run_dir that passes check_checkpoint; damaged ones are named and skipped."""
    for d in reversed(ckpt_dirs(run_dir)):
        try:
            check_checkpoint(os.path.join(run_dir, d))
            return os.path.join(run_dir, d)
        except ValueError as e:
            log(f"resume: skipping damaged checkpoint: {e}")
    raise SystemExit(f"resume: no usable checkpoint in {run_dir} (found: {ckpt_dirs(run_dir) or 'none'})")


def load_run_config(run_dir: str, overrides: dict) -> Config:
    dirs = ckpt_dirs(run_dir)
    if not dirs:
        raise SystemExit(f"resume: no checkpoint (ckpt_NNNNNN) in {run_dir}")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in saved.items() if k in known}
    return Config(**{**saved, **overrides, "resume": run_dir, "out_dir": run_dir})


# ----------------------------------------------------------------------------- main


def main(argv=None):
    overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = load_run_config(overrides["resume"], overrides) if overrides.get("resume") else make_config(overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return train(cfg)["final"]
    try:
        return train(cfg)["final"]
    except (RuntimeError, dist.DistBackendError) as e:  # a collective failed: most often another rank died
        rank = os.environ.get("RANK", "?")
        print(f"rank {rank}: stopping: a collective operation failed, most likely because another rank died "
              f"or hung (process-group timeout {cfg.dist_timeout_s} s). Cause: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def param_checksum(params) -> float:
    full = [p.full_tensor() if is_sharded(p) else p for p in params]  # all-gathers sharded weights
    return float(sum(p.detach().double().pow(2).sum() + p.detach().double().sum() for p in full))


def check_ranks_agree(params, world):
    """Raise if the ranks' parameters have drifted apart (they must be bitwise equal)."""
    c = param_checksum(params)
    if world > 1:
        cs = gather(c, world)
        if len(set(cs)) > 1:
            raise RuntimeError(f"ranks disagree on parameters: checksums {cs}")
    return c


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns {'final': last metrics row, 'policy': the trained Policy}."""
    check_config(cfg)
    rank, world, device = setup_distributed(cfg)
    log = lambda *a: print0(*a, rank=rank)  # noqa: E731
    if cfg.prompts_per_step % world:
        raise SystemExit(f"config: prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {world}")
    if cfg.fsdp and cfg.prompts_per_step % (world * cfg.updates_per_batch):
        raise SystemExit(f"config: with --fsdp, prompts_per_step={cfg.prompts_per_step} must be divisible by world size "
                         f"× updates_per_batch = {world * cfg.updates_per_batch} (every rank steps in lockstep)")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]

    # the bundled testbed is built on first use (rank 0 builds, the others wait)
    tb = os.path.normpath(cfg.testbed_dir) if cfg.testbed_dir else None
    if tb and any(os.path.normpath(p).startswith(tb + os.sep) for p in (cfg.model, cfg.train_data, cfg.eval_data)):
        if rank == 0:
            import testbed
            testbed.ensure(cfg.testbed_dir, log=log)
        if world > 1:
            dist.barrier()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    start_ckpt = newest_good_checkpoint(cfg.out_dir, log) if cfg.resume else None
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"model: the tokenizer of {cfg.model} has no EOS token; responses could never end")
    train_rows = load_prompts(cfg.train_data, cfg.prompt_field, cfg.answer_field, cfg.verifier)
    eval_rows = load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field,
                             cfg.eval_answer_field or cfg.answer_field, cfg.verifier)
    overlap = len({r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows})
    if overlap:
        log(f"warning: {overlap} held-out prompts also appear in {cfg.train_data}")
    train_rows, train_toks = drop_long(train_rows, encode_prompts(tokenizer, train_rows, log, cfg.prompt_suffix), cfg.max_prompt_tokens, cfg.train_data, log)
    eval_rows, eval_toks = drop_long(eval_rows, encode_prompts(tokenizer, eval_rows, lambda *a: None, cfg.prompt_suffix), cfg.max_prompt_tokens, cfg.eval_data, log)
    fn = verify.get_verifier(cfg.verifier)
    vworkers = cfg.verifier_workers

    if not cfg.resume and ckpt_dirs(cfg.out_dir):
        raise SystemExit(f"{cfg.out_dir} already holds checkpoints of a run: continue it with --resume={cfg.out_dir}, "
                         f"or start a new run with another --out_dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0 and not cfg.resume:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)

    paced = cfg.algo == "paced"
    # frozen prompt embeddings e(x) of the *initial* model for Z_φ: computed once, sharded, cached next to the run
    emb_train = emb_eval = None
    if paced:
        emb_train, emb_eval = prompt_embedding_cache(cfg, tokenizer.pad_token_id, train_toks, eval_toks, dtype, device, rank, world)

    # the policy: same weights on every rank (same files, same seed for the log Z head)
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(start_ckpt, "model") if start_ckpt else cfg.model, dtype=dtype,
                                              attn_implementation=cfg.attn_impl).to(device)
    if cfg.grad_ckpt:
        lm.gradient_checkpointing_enable()
    ref_lm = None  # π_ref, the frozen initial model: FlowRL's anchor, GRPO's optional KL
    if cfg.algo == "flowrl" or (cfg.algo == "grpo" and cfg.kl_coef > 0):
        ref_lm = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype, attn_implementation=cfg.attn_impl).to(device).eval()
        ref_lm.requires_grad_(False)
    if cfg.fsdp and world > 1:
        shard_model(lm, world, device)
        if ref_lm is not None:
            shard_model(ref_lm, world, device)
    torch.manual_seed(cfg.seed)
    if paced:
        logz = paced_rl.LogZHead(emb_train.size(1), cfg.logz_hidden, cfg.beta, cfg.logz_init_acc, cfg.logz_output)
        logz.set_normalization(emb_train)
    elif cfg.algo == "flowrl":
        logz = paced_rl.PooledLogZHead(lm.config.hidden_size)
    else:
        logz = None
    policy = paced_rl.Policy(lm, logz).to(device)
    params = [p for p in policy.parameters() if p.requires_grad]
    groups = [{"params": list(lm.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if logz is not None:
        groups.append({"params": list(logz.parameters()), "lr": cfg.logz_lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups)
    pool = scheduler.PromptPool(len(train_rows), cfg.pool_size if cfg.select == "paced" else cfg.prompts_per_step, cfg.seed)
    buf = replay_lib.ReplayBuffer(cfg.replay_capacity, cfg.replay_add_k)
    replay_rng = np.random.default_rng(seed_of(cfg.seed, 2))
    step, rollouts, skipped = 0, 0, 0
    if start_ckpt:
        st = torch.load(os.path.join(start_ckpt, "state.pt"), weights_only=False)
        if logz is not None:
            logz.load_state_dict(st["logz"])
        load_opt_state(policy, opt, st["opt"], cfg)
        pool.load_state_dict(st["pool"])
        buf.load_state_dict(st["replay"])
        replay_rng.bit_generator.state = st["replay_rng"]
        if st.get("torch_rng"):  # dropout (FlowRL's head) draws from it; sampling has its own generators
            set_torch_rng_state(st["torch_rng"][rank if len(st["torch_rng"]) == world else 0], device)
        step, rollouts, skipped = st["step"], st["rollouts"], st["skipped_updates"]
        log(f"resumed {start_ckpt} at step {step}")

    start_step = step
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if rank == 0:
        truncate_metrics(metrics_path, step if start_ckpt else 0)

    def write_metrics(row):
        if rank == 0:  # NaN / inf are written as null: strict JSON that every tool reads
            row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    B, G, beta = cfg.prompts_per_step, cfg.group_size, cfg.beta

    def eval_metrics(final=False):
        """Held-out accuracy over eval_samples, pass@k, and (PACED-RL) the calibration of p̂;
        final=True also writes the per-prompt values to <out_dir>/heldout_final.json (eval.py plots them)."""
        n = cfg.eval_samples
        acc = eval_lib.sampled_accuracy(policy.lm, tokenizer, eval_toks, [r["answer"] for r in eval_rows], fn, cfg,
                                        device, rank, world, n, cfg.temperature)
        out = {"eval_acc": float(acc.mean()),
               "eval_pass_at_k": {str(k): v for k, v in eval_lib.pass_at_ks(n, np.rint(acc * n)).items()}}
        p_hat = None
        if paced:
            with torch.no_grad():
                p_hat = (beta * policy.logz(emb_eval.to(device))).cpu().numpy()
            out.update({"eval_" + k: v for k, v in eval_lib.calibration(p_hat, acc).items()})
        if final and rank == 0:
            with open(os.path.join(cfg.out_dir, "heldout_final.json.tmp"), "w") as f:
                json.dump({"samples": n, "acc": acc.tolist(), "p_hat": None if p_hat is None else p_hat.tolist()}, f)
            os.replace(os.path.join(cfg.out_dir, "heldout_final.json.tmp"), os.path.join(cfg.out_dir, "heldout_final.json"))
        return out

    emb_train_dev = emb_train.to(device) if paced else None
    p_hat_of = lambda idx: (beta * policy.logz(emb_train_dev[torch.as_tensor(idx, device=device)])).detach().cpu().numpy()  # noqa: E731
    answers = [r["answer"] for r in train_rows]
    stop_signal = [None]  # set by SIGINT / SIGTERM; the loop checkpoints and returns after the current step

    def on_signal(signum, frame):
        if stop_signal[0] is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        stop_signal[0] = signal.Signals(signum).name

    def roll_and_verify(chosen, step, rnd, timer):
        """This rank's share of `chosen`: G responses per prompt, seeded per prompt (not per rank), verified."""
        mine = list(range(rank, len(chosen), world))
        idx = [int(chosen[i]) for i in mine]
        seeds = [seed_of(cfg.seed, 0, step, j) if rnd == 0 else seed_of(cfg.seed, 0, step, j, rnd) for j in idx]
        t = time.time()
        pid, pmask, resp, rmask, texts = rollout(policy.lm, tokenizer, [train_toks[j] for j in idx], seeds, cfg, device, cfg.temperature)
        timer["rollout"] += time.time() - t
        t = time.time()
        rewards, verr = verify.score(fn, texts, [answers[j] for j in idx for _ in range(G)], vworkers)
        timer["verify"] += time.time() - t
        timer["verifier_errors"] += verr
        return {"pos": mine, "idx": idx, "pid": pid, "pmask": pmask, "resp": resp, "rmask": rmask,
                "reward": torch.tensor(rewards, device=device)}

    def dynamic_sampling(first, step, timer):
        """DAPO: keep the groups whose rewards differ, roll out B more prompts from the pool while fewer than
        B are kept (at most dyn_max_rounds rounds), then re-shard the kept groups over the ranks.
        Returns (this rank's batch, prompts rolled out, groups with all-equal rewards)."""
        kept, n_prompts, n_equal, batch, rnd = [], 0, 0, first, 0
        while True:
            recs = [(rnd, p, j, [batch["resp"][k * G + g, :int(batch["rmask"][k * G + g].sum())].tolist() for g in range(G)],
                     batch["reward"][k * G:(k + 1) * G].tolist()) for k, (p, j) in enumerate(zip(batch["pos"], batch["idx"]))]
            recs = sorted(sum(gather(recs, world), []))  # every rank: the same groups, in selection order
            keep = scheduler.keep_informative([r[4] for r in recs])
            kept += [r for r, k in zip(recs, keep) if k]
            n_prompts, n_equal = n_prompts + len(recs), n_equal + int((~keep).sum())
            if len(kept) >= B or rnd + 1 >= cfg.dyn_max_rounds:
                break
            rnd += 1
            with torch.no_grad():
                chosen = scheduler.choose_prompts(pool, p_hat_of, B, cfg.tau, cfg.select, round(cfg.explore_frac * B))
            batch = roll_and_verify(chosen, step, rnd, timer)
        kept = kept[:B]
        lockstep = world * (cfg.updates_per_batch if cfg.fsdp else 1)  # a sharded model needs every rank in lockstep
        kept = kept[:len(kept) - len(kept) % lockstep]
        if len(kept) < B:
            log(f"warning: step {step}: dynamic sampling kept {len(kept)} of {B} groups after {rnd + 1} rounds")
        mine = kept[rank::world]
        pid, pmask = paced_rl.left_pad([train_toks[r[2]] for r in mine for _ in range(G)] or [[tokenizer.pad_token_id]],
                                       tokenizer.pad_token_id, device)
        resp, rmask = paced_rl.right_pad([y for r in mine for y in r[3]] or [[tokenizer.pad_token_id]], tokenizer.pad_token_id, device)
        out = {"idx": [r[2] for r in mine], "pid": pid[:len(mine) * G], "pmask": pmask[:len(mine) * G],
               "resp": resp[:len(mine) * G], "rmask": rmask[:len(mine) * G],
               "reward": torch.tensor([x for r in mine for x in r[4]], device=device, dtype=torch.float32)}
        return out, n_prompts, n_equal

    old_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    bar = tqdm(range(step, cfg.max_steps), initial=step, total=cfg.max_steps, disable=rank != 0, desc="train")
    for step in bar:
        row = {"step": step}
        if step % cfg.eval_every == 0:
            row.update(eval_metrics())
        t0 = time.time()  # step timing: select, rollout, verify (summed over rounds), update t4-t5, KL after

        # 1. select B prompts (identical on every rank)
        with torch.no_grad():
            chosen = scheduler.choose_prompts(pool, p_hat_of, B, cfg.tau, cfg.select, round(cfg.explore_frac * B))
        timer = {"select": time.time() - t0, "rollout": 0.0, "verify": 0.0, "verifier_errors": 0}

        # 2-3. roll out G responses per prompt (π_old = π_θ now) and verify: reward r ∈ {0, 1}
        policy.eval()
        batch = roll_and_verify(chosen, step, 0, timer)
        rew_gen = all_sum(float(batch["reward"].sum()), world, device)
        if cfg.dynamic_sampling:
            batch, n_prompts, n_equal = dynamic_sampling(batch, step, timer)
            zero_var = n_equal / n_prompts
        else:
            n_prompts, zero_var = B, None
        idx, pid, pmask, resp, rmask, reward = (batch[k] for k in ("idx", "pid", "pmask", "resp", "rmask", "reward"))
        rewards = reward.tolist()
        acc_local = reward.view(-1, G).mean(1).cpu().numpy()
        with torch.no_grad():
            p_hat_mine = p_hat_of(idx) if paced and idx else np.zeros(len(idx))
        truncated = int((rmask.sum(1) == rmask.size(1)).logical_and(resp[:, -1] != tokenizer.eos_token_id).sum()) if idx else 0
        n_train = int(all_sum(len(idx), world, device))  # prompts in this update, over all ranks (B, or fewer)

        # 4. replay: draw from earlier steps (the same draw on every rank); this step's samples join later
        drawn = buf.sample(cfg.replay_per_step, replay_rng) if cfg.replay == "on" else []
        if cfg.fsdp:  # every rank must run the same number of forward passes through the sharded model
            drawn = drawn[:len(drawn) - len(drawn) % (world * cfg.updates_per_batch)]
        my_replay = drawn[rank::world]

        # 5. optimizer step(s) on the loss over fresh (+ replayed) samples, in micro-batches
        t4 = time.time()
        policy.train()
        U = cfg.updates_per_batch
        fresh = {"pid": pid, "pmask": pmask, "resp": resp, "rmask": rmask, "reward": reward, "behavior": None,
                 "adv": tb_loss.group_advantages(reward, G, cfg.adv_eps) if not paced and idx else None,
                 "emb": emb_train_dev[torch.tensor(idx, device=device)].repeat_interleave(G, 0) if paced and idx else None,
                 "train_logz": True, "old_tok": None}
        if U > 1 and idx:  # the later optimizer steps need π_old's log-probs: one pass before the first
            fresh["old_tok"] = logprobs_nograd(policy.lm, pid, pmask, resp, rmask, cfg, per_token=True)
        replayed = None
        if my_replay:
            r_pid, r_pmask = paced_rl.left_pad([train_toks[e["prompt"]] for e in my_replay], tokenizer.pad_token_id, device)
            r_resp, r_mask = paced_rl.right_pad([e["response"] for e in my_replay], tokenizer.pad_token_id, device)
            replayed = {"pid": r_pid, "pmask": r_pmask, "resp": r_resp, "rmask": r_mask,
                        "reward": torch.ones(len(my_replay), device=device), "train_logz": cfg.replay_trains_logz,
                        "behavior": torch.tensor([e["logp_behavior"] for e in my_replay], device=device),
                        "emb": emb_train_dev[torch.tensor([e["prompt"] for e in my_replay], device=device)],
                        "adv": None, "old_tok": None}
        # optimizer step u trains on the prompts at global positions [u·n/U, (u+1)·n/U) of this step's batch
        # (this rank holds positions rank, rank + world, ...) and on its share of the replayed samples
        gpos = [rank + k * world for k in range(len(idx))]
        losses, gnorms, old_parts = [], [], []
        for u in range(U):
            ks = [k for k, p in enumerate(gpos) if u * n_train // U <= p < (u + 1) * n_train // U]
            f_u = take(fresh, slice(ks[0] * G, (ks[-1] + 1) * G)) if ks else None
            r_lo, r_hi = u * len(my_replay) // U, (u + 1) * len(my_replay) // U
            r_u = take(replayed, slice(r_lo, r_hi)) if replayed is not None and r_hi > r_lo else None
            if cfg.algo == "grpo" and cfg.grpo_agg == "token_mean":
                denom = all_sum(float(f_u["rmask"].sum()) if f_u else 0.0, world, device)
            else:
                denom = all_sum(float((f_u["resp"].size(0) if f_u else 0) + (r_u["resp"].size(0) if r_u else 0)), world, device)
            loss_local = 0.0
            if f_u:
                loss_local, old_u = loss_backward(policy, ref_lm, f_u, cfg, denom)  # old_u: log π_old(y|x), (n,)
                old_parts.append(old_u)
            if r_u:
                loss_local += loss_backward(policy, ref_lm, r_u, cfg, denom)[0]
            global_loss = all_sum(loss_local, world, device) if denom > 0 else float("nan")  # the same on every rank
            sync_grads(params, world)
            gnorm = torch.nn.utils.clip_grad_norm_(list(lm.parameters()), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            gnorm = float(gnorm.full_tensor() if is_sharded(gnorm) else gnorm)
            gnorm_z = float(torch.nn.utils.clip_grad_norm_(list(logz.parameters()), float("inf"))) if logz is not None else 0.0
            if denom == 0:  # dynamic sampling kept too few groups: nothing to train on in this optimizer step
                skipped += 1
                log(f"warning: step {step}: no samples to train on (dynamic sampling kept too few groups): update skipped")
            elif math.isfinite(global_loss) and math.isfinite(gnorm) and math.isfinite(gnorm_z):
                opt.step()
            else:  # a NaN or inf loss or gradient: skip this update, count it, go on
                skipped += 1
                log(f"warning: step {step}: non-finite loss {global_loss} or gradient norm {gnorm}: update skipped")
            opt.zero_grad(set_to_none=True)
            losses.append(global_loss)
            gnorms.append(gnorm)
        logp_old = torch.cat(old_parts) if old_parts else torch.zeros(0, device=device)  # (nG,)
        n_tok = rmask.sum(-1).float() if idx else torch.zeros(0, device=device)
        rollouts += n_prompts * G

        # this step's highest-error correct trajectories enter the buffer (the same entries on every rank)
        if cfg.replay == "on":
            cands = []
            for k, j in enumerate(idx):
                e = float(replay_lib.estimate_error(acc_local[k], p_hat_mine[k]))
                for g in range(G):
                    if rewards[k * G + g] == 1.0:
                        n = int(rmask[k * G + g].sum())
                        cands.append({"prompt": j, "response": resp[k * G + g, :n].tolist(), "priority": e,
                                      "logp_behavior": float(logp_old[k * G + g])})
            buf.add(sorted(sum(gather(cands, world), []), key=lambda c: (c["prompt"], c["response"])))

        # β·KL(π_old ‖ π_θ) after the update, on the fresh samples (Proposition 4.1's gap)
        t5 = time.time()
        policy.eval()
        kl_sum = 0.0
        if idx:
            logp_new = logprobs_nograd(policy.lm, pid, pmask, resp, rmask, cfg)
            kl_sum = float(tb_loss.kl_k3(logp_old, logp_new).sum())

        # 6. metrics over all ranks
        recs = sorted(sum(gather([(j, float(a), float(p)) for j, a, p in zip(idx, acc_local, p_hat_mine)], world), []))
        acc_all, p_all = np.array([r[1] for r in recs]), np.array([r[2] for r in recs])
        tot = lambda x: all_sum(float(x), world, device)  # noqa: E731
        n_samples = max(n_train * G, 1)
        row.update({
            "rollouts": rollouts,
            "reward_mean": rew_gen / (B * G),  # of this step's first B prompts, as sampled (before any filter)
            "loss": float(np.mean(losses)),  # mean over the step's optimizer steps
            "skipped_updates": skipped,
            "acc_est_abs_err": float(np.abs(p_all - acc_all).mean()) if paced and recs else None,
            "acc_est_corr": eval_lib.pearson(p_all, acc_all) if paced else None,
            "p_hat_mean": float(p_all.mean()) if paced and recs else None,
            "beta_kl": beta * tot(kl_sum) / n_samples,
            "zero_var_frac": zero_var if zero_var is not None else float(np.mean((acc_all == 0) | (acc_all == 1))),
            "train_prompts": n_train,
            "resp_len": tot(n_tok.sum()) / n_samples,
            "truncated_frac": tot(truncated) / n_samples,
            "verifier_errors": int(tot(timer["verifier_errors"])),
            "replay_size": len(buf),
            "replayed": len(drawn),
            "grad_norm": float(np.mean(gnorms)),
            "step_s": time.time() - t0,
            "select_s": timer["select"], "rollout_s": timer["rollout"], "verify_s": timer["verify"], "update_s": t5 - t4,
        })
        write_metrics(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}",
                        **({"err": f"{row['acc_est_abs_err']:.2f}"} if row["acc_est_abs_err"] is not None else {}),
                        **({"eval": f"{row['eval_acc']:.3f}"} if "eval_acc" in row else {}))
        if row["zero_var_frac"] > 0.8 and step % cfg.eval_every == 0:
            log(f"warning: step {step}: {row['zero_var_frac']:.0%} of groups have all-equal rewards (no signal)")
        stop = all_sum(float(stop_signal[0] is not None), world, device) > 0  # all ranks stop at the same step
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps or stop:
            check_ranks_agree(params, world)
            save_checkpoint(cfg, policy, tokenizer, opt, {"step": step + 1, "rollouts": rollouts, "skipped_updates": skipped,
                            "pool": pool.state_dict(), "replay": buf.state_dict(),
                            "replay_rng": replay_rng.bit_generator.state, "torch_rng": gather(torch_rng_state(device), world)}, rank)
        if stop:
            log(f"stopped by signal {stop_signal[0]} after step {step}; checkpoint written. "
                f"Continue with: --resume={cfg.out_dir}")
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            if world > 1:
                dist.destroy_process_group()
            return {"final": row, "policy": policy, "interrupted": True}

    for sig, h in old_handlers.items():
        signal.signal(sig, h)
    final_step = max(cfg.max_steps, start_step)  # a checkpoint past max_steps is evaluated where it is
    row = {"step": final_step, "rollouts": rollouts, **eval_metrics(final=True),
           "param_checksum": check_ranks_agree(params, world)}
    write_metrics(row)
    corr = row.get("eval_acc_est_corr")
    log(f"done: step {final_step}, held-out accuracy {row['eval_acc']:.3f}"
        + (f", calibration corr {corr:.3f}" if corr is not None else "") + f", metrics in {metrics_path}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return {"final": row, "policy": policy}


if __name__ == "__main__":
    main()
