"""Rollouts: G sampled responses per prompt with the current policy (π_old := π_θ), verified.

- rollout: a rank's prompts, left-padded, generated in memory-bounded chunks; each prompt's sampling
  noise is seeded by (run seed, step, prompt), not by rank or batch, so the responses do not depend on
  how the prompts are split over ranks or chunks.
- roll_and_verify: this rank's share of the selected prompts, rolled out and scored (verify.py).
- dynamic_sampling: DAPO's filter. Groups whose G rewards are all equal carry no GRPO signal: drop
  them and roll out B more prompts until B groups are kept (at most dyn_max_rounds rounds); every
  rollout is counted, which is the method's cost.
"""

import time
from dataclasses import dataclass

import numpy as np
import torch

import paced_rl
import verify
from distributed import gather


@dataclass
class Batch:
    """This rank's share of one step's rollouts (n prompts, G responses each)."""
    idx: list  # training-set index of each prompt
    pid: torch.Tensor  # (nG, P) prompt ids, left-padded, each prompt repeated G times
    pmask: torch.Tensor  # (nG, P)
    resp: torch.Tensor  # (nG, R) response ids, right-padded
    rmask: torch.Tensor  # (nG, R) 1 on response tokens up to and including the first EOS
    reward: torch.Tensor  # (nG,) verifier rewards in {0, 1}
    pos: list = None  # positions of the prompts in the step's selection (first round only)


def seed_of(*parts) -> int:
    """A 63-bit seed from integers, identical on every rank and every run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rollout(lm, tokenizer, prompt_toks, seeds, cfg, device, temperature):
    """Generate G responses per prompt, `cfg.rollout_batch` prompts per generation call (memory-bounded);
    returns padded tensors, prompts repeated G times, and the decoded responses."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pid, pmask = paced_rl.left_pad(prompt_toks, pad, device)
    size = cfg.rollout_batch if cfg.rollout_batch > 0 else max(len(prompt_toks), 1)
    chunks = []
    for i in range(0, len(prompt_toks), size):
        gens = paced_rl.make_generators(seeds[i:i + size], device)
        with paced_rl.amp(device, cfg.dtype == "bfloat16"):
            chunks.append(paced_rl.generate(lm, pid[i:i + size], pmask[i:i + size], cfg.group_size, gens,
                                            cfg.max_new_tokens, temperature, eos, pad, stop_early=not cfg.fsdp))
    R = max(c.size(1) for c in chunks)
    resp = torch.cat([torch.nn.functional.pad(c, (0, R - c.size(1)), value=pad) for c in chunks])  # (B*G, R)
    rmask = paced_rl.response_mask(resp, eos)
    rmask = rmask * torch.cat([torch.nn.functional.pad(torch.ones_like(c), (0, R - c.size(1))) for c in chunks])
    texts = tokenizer.batch_decode(resp * rmask + pad * (1 - rmask), skip_special_tokens=True)
    G = cfg.group_size
    return pid.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), resp, rmask, texts


def roll_and_verify(lm, tokenizer, toks, answers, verifier, chosen, step, rnd, cfg, device, rank, world, timer) -> Batch:
    """This rank's share of `chosen` (positions rank, rank + world, ...): G responses per prompt, each
    prompt's noise seeded by (run seed, step, prompt index, dynamic-sampling round), then verified. timer accumulates
    rollout and verify seconds and verifier errors."""
    G = cfg.group_size
    mine = list(range(rank, len(chosen), world))
    idx = [int(chosen[i]) for i in mine]
    seeds = [seed_of(cfg.seed, 0, step, j, *([rnd] if rnd else [])) for j in idx]  # later rounds: fresh noise
    t = time.time()
    pid, pmask, resp, rmask, texts = rollout(lm, tokenizer, [toks[j] for j in idx], seeds, cfg, device, cfg.temperature)
    timer["rollout"] += time.time() - t
    t = time.time()
    rewards, verr = verify.score(verifier, texts, [answers[j] for j in idx for _ in range(G)], cfg.verifier_workers)
    timer["verify"] += time.time() - t
    timer["verifier_errors"] += verr
    if hasattr(verifier, "has_answer"):  # the format check of verifiers that have one: format_rate
        timer["formatted"] = timer.get("formatted", 0) + sum(map(verifier.has_answer, texts))
        timer["rolled"] = timer.get("rolled", 0) + len(texts)
    return Batch(idx, pid, pmask, resp, rmask, torch.tensor(rewards, device=device), pos=mine)


def keep_informative(rewards) -> np.ndarray:
    """DAPO's dynamic-sampling filter: True for the groups whose rewards are not all equal. (n, G) -> (n,) bool."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"keep_informative: rewards must be (groups, G), got shape {r.shape}")
    return r.max(1) > r.min(1)


def dynamic_sampling(first: Batch, next_round, toks, pad_id, cfg, device, rank, world, log, step):
    """DAPO: keep the groups whose rewards differ; while fewer than B are kept, next_round(r) rolls out B
    more prompts (at most dyn_max_rounds rounds); then the kept groups are re-sharded over the ranks.
    Returns (this rank's Batch, prompts rolled out over all rounds and ranks, groups with all-equal rewards)."""
    B, G = cfg.prompts_per_step, cfg.group_size
    kept, n_prompts, n_equal, batch, rnd = [], 0, 0, first, 0
    while True:
        recs = [(rnd, p, j, [batch.resp[k * G + g, :int(batch.rmask[k * G + g].sum())].tolist() for g in range(G)],
                 batch.reward[k * G:(k + 1) * G].tolist()) for k, (p, j) in enumerate(zip(batch.pos, batch.idx))]
        recs = sorted(sum(gather(recs, world), []))  # every rank: the same groups, in selection order
        keep = keep_informative([r[4] for r in recs])
        kept += [r for r, k in zip(recs, keep) if k]
        n_prompts, n_equal = n_prompts + len(recs), n_equal + int((~keep).sum())
        if len(kept) >= B or rnd + 1 >= cfg.dyn_max_rounds:
            break
        rnd += 1
        batch = next_round(rnd)
    kept = kept[:B]
    lockstep = world * (cfg.updates_per_batch if cfg.fsdp else 1)  # a sharded model needs every rank in lockstep
    kept = kept[:len(kept) - len(kept) % lockstep]
    if len(kept) < B:
        log(f"warning: step {step}: dynamic sampling kept {len(kept)} of {B} groups after {rnd + 1} rounds")
    mine = kept[rank::world]
    pid, pmask = paced_rl.left_pad([toks[r[2]] for r in mine for _ in range(G)] or [[pad_id]], pad_id, device)
    resp, rmask = paced_rl.right_pad([y for r in mine for y in r[3]] or [[pad_id]], pad_id, device)
    n = len(mine) * G
    out = Batch([r[2] for r in mine], pid[:n], pmask[:n], resp[:n], rmask[:n],
                torch.tensor([x for r in mine for x in r[4]], device=device, dtype=torch.float32))
    return out, n_prompts, n_equal
