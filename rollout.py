"""Steps 2-3: G sampled responses per prompt with the current policy (π_old := π_θ), verified.

Each prompt's sampling noise is seeded by (run seed, step, prompt), not by rank or batch, so the responses
do not depend on how the prompts are split over ranks or generation calls. Prompts are generated
`rollout_batch` at a time, which bounds the KV cache's memory.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

import verify
from distributed import all_sum
from lm import Sampling, Seqs, amp, generate, left_pad, make_generators, response_mask


@dataclass
class Batch:
    """This rank's share of one step's rollouts (n prompts, G responses each)."""
    idx: list  # training-set index of each prompt
    seqs: Seqs  # (nG, ·) each prompt repeated G times, its responses
    reward: torch.Tensor  # (nG,) verifier rewards in {0, 1}
    pos: list = None  # positions of the prompts in the step's selection

    def accuracy(self, group_size: int) -> np.ndarray:
        """a(x): each prompt's share of correct responses, (n,)."""
        return self.reward.view(-1, group_size).mean(1).cpu().numpy()


@dataclass
class Tally:
    """Seconds and counts of rollouts and verification, summed over a step's generation calls (this rank)."""
    rollout_s: float = 0.0
    verify_s: float = 0.0
    verifier_errors: int = 0
    formatted: int = 0  # responses with a well-formed final answer (verifiers with a format check)
    rolled: int = 0  # responses checked for their format


@dataclass
class Rollouts:
    """What steps 2-3 hand to the update."""
    batch: Batch  # this rank's share
    prompts: int  # prompts rolled out over all ranks (a rollout variant may roll out more than B)
    reward_sum: float  # Σ rewards of the first B prompts, over all ranks
    zero_var: float = None  # share of all-equal groups where a rollout variant measured it before filtering
    tally: Tally = field(default_factory=Tally)


def seed_of(*parts) -> int:
    """A 63-bit seed from integers, identical on every rank and every run."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def rollout(lm, tokenizer, prompt_toks, seeds, cfg, group_size: int, temperature: float):
    """group_size responses per prompt, `cfg.rollout_batch` prompts per generation call: (Seqs with the prompts
    repeated group_size times, the decoded responses)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    pid, pmask = left_pad(prompt_toks, pad, lm.device)
    size = cfg.rollout_batch if cfg.rollout_batch > 0 else max(len(prompt_toks), 1)
    spec = Sampling(group_size, cfg.max_new_tokens, temperature, eos, pad, stop_early=not cfg.fsdp)
    chunks = []
    for i in range(0, len(prompt_toks), size):
        with amp(lm.device, cfg.dtype == "bfloat16"):
            chunks.append(generate(lm, pid[i:i + size], pmask[i:i + size], make_generators(seeds[i:i + size], lm.device), spec))
    R = max(c.size(1) for c in chunks)
    resp = torch.cat([torch.nn.functional.pad(c, (0, R - c.size(1)), value=pad) for c in chunks])  # (B*G, R)
    rmask = response_mask(resp, eos)
    rmask = rmask * torch.cat([torch.nn.functional.pad(torch.ones_like(c), (0, R - c.size(1))) for c in chunks])
    texts = tokenizer.batch_decode(resp * rmask + pad * (1 - rmask), skip_special_tokens=True)
    G = group_size
    return Seqs(pid.repeat_interleave(G, 0), pmask.repeat_interleave(G, 0), resp, rmask), texts


def roll_and_verify(lm, prompts, chosen, step: int, cfg, ranks, rnd: int = 0) -> tuple:
    """This rank's share of `chosen` (positions rank, rank + world, ...): G responses per prompt, each prompt's
    noise seeded by (run seed, step, prompt index, round), then verified. Returns (Batch, Tally)."""
    G, tally = cfg.group_size, Tally()
    mine = list(range(ranks.rank, len(chosen), ranks.world))
    idx = [int(chosen[i]) for i in mine]
    seeds = [seed_of(cfg.seed, 0, step, j, *([rnd] if rnd else [])) for j in idx]  # later rounds: fresh noise
    t = time.time()
    seqs, texts = rollout(lm, prompts.tokenizer, [prompts.train.toks[j] for j in idx], seeds, cfg, G, cfg.temperature)
    tally.rollout_s = time.time() - t
    t = time.time()
    rewards, tally.verifier_errors = verify.score(prompts.verifier, texts, [prompts.train.answers[j] for j in idx for _ in range(G)],
                                                  cfg.verifier_workers)
    tally.verify_s = time.time() - t
    if hasattr(prompts.verifier, "has_answer"):  # the format check of verifiers that have one: format_rate
        tally.formatted, tally.rolled = sum(map(prompts.verifier.has_answer, texts)), len(texts)
    return Batch(idx, seqs, torch.tensor(rewards, device=lm.device), pos=mine), tally


def roll_out(lm, prompts, chosen, step: int, cfg, ranks) -> Rollouts:
    """Steps 2-3 as PACED-RL takes them: one round, the B chosen prompts."""
    batch, tally = roll_and_verify(lm, prompts, chosen, step, cfg, ranks)
    return Rollouts(batch, len(chosen), all_sum(float(batch.reward.sum()), ranks.world, ranks.device), None, tally)
