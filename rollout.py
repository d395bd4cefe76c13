"""Steps 2-3: G sampled responses per prompt with the current policy (π_old := π_θ), verified.

Each prompt's sampling noise is seeded by (run seed, step, prompt), not by rank or batch, so the responses
do not depend on how the prompts are split over ranks or generation calls. Prompts are generated
`rollout_batch` at a time, which bounds the KV cache's memory, by lm.generate or, with `sampler=static`, by
static_decode.generate (the same tokens from a static cache and, on CUDA, graph-captured decode steps).

The held-out evaluation train() runs every `eval_every` steps is the same sampling and verification on
the held-out prompts (`heldout_metrics`): sharded over ranks, each prompt's noise seeded by the prompt, so
two evaluations of the same model see the same noise and differences between checkpoints are not luck.
"""

import time
from dataclasses import dataclass, field

import numpy as np
import torch

import static_decode
import verify
from distributed import all_sum, gather
from lm import Sampling, Seqs, amp, generate, left_pad, make_generators, response_mask
from metrics import calibration, distinct_correct, pass_at_ks


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
    chunks, sample = [], static_decode.generate if cfg.sampler == "static" else generate
    for i in range(0, len(prompt_toks), size):
        with amp(lm.device, cfg.dtype == "bfloat16"):
            chunks.append(sample(lm, pid[i:i + size], pmask[i:i + size], make_generators(seeds[i:i + size], lm.device), spec))
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


@dataclass
class Sampled:
    """Per-prompt results of sampled_accuracy, in prompt order."""
    acc: np.ndarray  # share of correct samples
    distinct: np.ndarray  # distinct correct responses
    formatted: np.ndarray = None  # share of samples with a parseable final answer (verifiers with a format check)


@dataclass
class Heldout:
    """One evaluation: the metrics row's entries, and the per-prompt values behind them."""
    row: dict  # eval_acc, eval_pass_at_k, ...
    per_prompt: dict  # {"samples": n, "acc": [...], "p_hat": [...] or None}; a probe may add its own


@torch.no_grad()
def sampled_accuracy(lm, prompts, split, cfg, ranks, n_samples: int, temperature: float) -> Sampled:
    """Per-prompt accuracy over `n_samples` samples (temperature 0: one greedy sample) of every prompt of `split`,
    in order, with the distinct correct responses and (where the verifier has a format check, `has_answer`) the
    share of well-formed ones; the work is sharded over ranks and gathered."""
    n = 1 if temperature == 0 else n_samples
    fn, toks = prompts.verifier, split.toks
    has_answer = getattr(fn, "has_answer", None)
    mine = list(range(ranks.rank, len(toks), ranks.world))
    n_mine = len(mine)
    mine += [mine[0] if mine else 0] * (-(-len(toks) // ranks.world) - n_mine)  # equal shards: a sharded model needs lockstep
    recs = []
    for i in range(0, len(mine), cfg.eval_batch):
        idx = mine[i:i + cfg.eval_batch]
        seeds = [seed_of(cfg.seed, 1, j) for j in idx]
        texts = rollout(lm, prompts.tokenizer, [toks[j] for j in idx], seeds, cfg, n, temperature)[1]
        for k, j in enumerate(idx):
            if i + k >= n_mine:
                break  # padding of this rank's shard: not scored
            mine_texts = texts[k * n:(k + 1) * n]
            r, _ = verify.score(fn, mine_texts, [split.answers[j]] * n, cfg.verifier_workers)
            fmt = sum(map(has_answer, mine_texts)) / n if has_answer else 0.0
            recs.append((j, sum(r) / n, distinct_correct(mine_texts, r), fmt))
    recs = sorted(sum(gather(recs, ranks.world), []))
    col = lambda c: np.array([rec[c] for rec in recs])  # noqa: E731
    return Sampled(col(1), col(2), col(3) if has_answer else None)


def heldout_metrics(lm, prompts, p_hat, cfg, ranks) -> Heldout:
    """Held-out accuracy over eval_samples samples per prompt, pass@k, the greedy accuracy (eval_greedy), and
    where the objective has an accuracy estimate (p_hat: p̂ of every held-out prompt, else None) its calibration."""
    n = cfg.eval_samples
    res = sampled_accuracy(lm, prompts, prompts.heldout, cfg, ranks, n, cfg.temperature)
    acc = res.acc
    out = {"eval_acc": float(acc.mean()), "eval_pass_at_k": {str(k): v for k, v in pass_at_ks(n, np.rint(acc * n)).items()}}
    if res.formatted is not None:
        out["eval_format_rate"] = float(res.formatted.mean())
    if cfg.eval_greedy:
        out["eval_acc_greedy"] = float(sampled_accuracy(lm, prompts, prompts.heldout, cfg, ranks, 1, 0.0).acc.mean())
    if p_hat is not None:
        out.update({"eval_" + k: v for k, v in calibration(p_hat, acc).items()})
    return Heldout(out, {"samples": n, "acc": acc.tolist(), "p_hat": None if p_hat is None else p_hat.tolist()})
