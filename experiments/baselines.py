"""The baselines as objectives of the loop's seam (update.PacedObjective's methods): GRPO, FlowRL, and DAPO's
dynamic sampling as a rollout variant of any objective. `python -m experiments.run --method=grpo` runs one.

- GRPO (as TRL codes it): Â = (r − group mean)/(group std + eps), PPO-clipped token ratio, optional k3 KL to
  π_ref; aggregation `token_mean` (token sum / global token count) or `seq_mean` (mean over sequences of each
  sequence's token mean).
- FlowRL: δ = log Z(x) + (1/|y|)·log π_θ − (1/|y|)·log π_ref − m·Â, loss = mean of w·δ², with a clipped,
  detached sequence importance weight w, reward multiplier m (15 in the authors' code), and a log Z head over
  the policy's own mean-pooled prompt states (PooledLogZHead).
- Dynamic sampling (DAPO): groups whose G rewards are all equal carry no GRPO signal: drop them and roll out B
  more prompts until B groups are kept (at most dyn_max_rounds rounds); every rollout is counted, which is the
  method's cost.

With one optimizer step per rollout batch (the default) π_old is the policy before the update, so the ratio
π_θ/π_old is 1 and GRPO's clip and FlowRL's importance weight are inactive, as in TRL's default.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

import rollout
from distributed import all_sum, gather
from lm import Seqs, amp, left_pad, right_pad, token_logprobs
from tb_loss import kl_k3
from update import Samples, sequence_logprobs


@dataclass
class BaselineConfig:
    algo: str = "paced"  # the objective: paced (update.PacedObjective) | grpo | flowrl
    dynamic_sampling: bool = False  # DAPO: drop all-equal groups, roll out more prompts until B are kept
    dyn_max_rounds: int = 8  # dynamic sampling: at most this many rollout rounds a step (DAPO: max_num_gen_batches)
    adv_eps: float = 1e-4  # GRPO / FlowRL advantage (r − mean)/(std + adv_eps) (TRL: 1e-4)
    clip_eps: float = 0.2  # GRPO: the token ratio π_θ/π_old clipped to [1 − ε, 1 + ε] (TRL: 0.2)
    grpo_agg: str = "token_mean"  # GRPO loss aggregation: token_mean | seq_mean
    kl_coef: float = 0.0  # GRPO: weight of the per-token k3 KL to the initial model (TRL: 0); > 0 loads π_ref
    flowrl_reward_mult: float = 15.0  # FlowRL: multiplier of the group-normalized reward (authors: 15)
    flowrl_is_clip: float = 10.0  # FlowRL: importance weight min(clip, π_θ/π_old), detached (authors: 10)


RANGES = {"dyn_max_rounds": "[1, inf)", "adv_eps": "[0, inf)", "clip_eps": "[0, 1)", "kl_coef": "[0, inf)",
          "flowrl_reward_mult": "[0, inf)", "flowrl_is_clip": "[0, inf)"}
CHOICES = {"algo": ("paced", "grpo", "flowrl"), "grpo_agg": ("token_mean", "seq_mean")}


def group_advantages(reward, group_size: int, eps: float):
    """GRPO's Â = (r − group mean)/(group std + eps), std unbiased as in TRL. (n·G,) -> (n·G,).
    A group whose rewards are all equal gets Â = 0 (no signal, and no NaN)."""
    r = reward.float().view(-1, group_size)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(r[:, :1])
    centered = r - r.mean(1, keepdim=True)  # exactly 0 in an all-equal group, whose std may be 0
    return torch.where(std > 0, centered / (std + eps), torch.zeros_like(r)).reshape(-1)


def grpo_loss(logp_tok, logp_old_tok, mask, adv, clip_eps: float, agg: str, denom: float,
              logp_ref_tok=None, kl_coef: float = 0.0):
    """The clipped GRPO surrogate, to be minimized. Token tensors (N, R); mask (N, R); adv (N,).

    per token: −min(ρ·Â, clip(ρ, 1−ε, 1+ε)·Â) + kl_coef·k3(π_θ, π_ref),  ρ = π_θ/π_old of the token.
    agg="token_mean": Σ over all tokens / denom, denom = the global token count.
    agg="seq_mean":  Σ over sequences of (the sequence's token mean) / denom, denom = the global sequence count.
    """
    if agg not in ("token_mean", "seq_mean"):
        raise ValueError(f"grpo_loss: agg must be 'token_mean' or 'seq_mean', got {agg!r}")
    m = mask.to(logp_tok.dtype)
    ratio = (logp_tok - logp_old_tok.detach()).exp()
    a = adv.detach().to(logp_tok.dtype).unsqueeze(-1)  # (N, 1)
    per_tok = -torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    if kl_coef > 0:
        per_tok = per_tok + kl_coef * kl_k3(logp_tok, logp_ref_tok.detach())
    if agg == "token_mean":
        return (per_tok * m).sum() / denom
    return ((per_tok * m).sum(-1) / m.sum(-1).clamp(min=1)).sum() / denom


def flowrl_loss(log_z, logp, logp_ref, n_tok, adv, reward_mult: float, weight=None, denom=None):
    """FlowRL's trajectory balance with length-normalized log-probs; all inputs (N,).

    δ = log Z(x) + log π_θ/|y| − log π_ref/|y| − reward_mult·Â,   L = Σ w·δ² / denom (w detached)."""
    n = n_tok.to(logp.dtype).clamp(min=1)
    delta = log_z + logp / n - logp_ref.detach() / n - reward_mult * adv.detach().to(logp.dtype)
    sq = delta.pow(2) if weight is None else weight.detach() * delta.pow(2)
    return sq.sum() / (sq.numel() if denom is None else denom)


class PooledLogZHead(nn.Module):
    """FlowRL's log Z head (as its authors' code builds it): over the *policy's own* mean-pooled prompt hidden
    states, gradients flowing into the LM; [Linear(H, H), GELU, LayerNorm, Dropout] × 2, then Linear(H, 1). Its
    output is log Z in the units of FlowRL's residual, not an accuracy estimate."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        block = lambda: [nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Dropout(dropout)]  # noqa: E731
        self.net = nn.Sequential(*block(), *block(), nn.Linear(dim, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N,)
        return self.net(h.float()).squeeze(-1)


class GRPOObjective:
    """GRPO's clipped surrogate over group-normalized advantages; no log Z head, no accuracy estimate."""

    def __init__(self, run, lab: BaselineConfig):
        self.cfg, self.lab = run.cfg, lab
        self.needs_ref = lab.kl_coef > 0

    def head(self, lm):
        return None

    def p_hat(self, policy, idx=None):
        return None

    def observe(self, model, step: int, groups: list) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, st: dict):
        pass

    def prepare(self, fresh: Samples) -> Samples:
        """Advantages over whole groups, before the micro-batches split them."""
        if len(fresh):
            fresh.adv = group_advantages(fresh.reward, self.cfg.group_size, self.lab.adv_eps)
        return fresh

    def count(self, fresh: Samples, replayed: Samples) -> float:
        if self.lab.grpo_agg == "token_mean":  # the global token count of this step's rollouts
            return float(fresh.seqs.rmask.sum()) if fresh else 0.0
        return float((len(fresh) if fresh else 0) + (len(replayed) if replayed else 0))

    def loss(self, model, s: Samples, denom: float):
        cfg, lab = self.cfg, self.lab
        logp_tok = sequence_logprobs(model.policy.lm, s.seqs, cfg, per_token=True)
        old_tok = s.old_tok if s.old_tok is not None else logp_tok.detach()
        ref_tok = None
        if lab.kl_coef > 0:
            with torch.no_grad():
                ref_tok = sequence_logprobs(model.ref_lm, s.seqs, cfg, per_token=True)
        loss = grpo_loss(logp_tok, old_tok, s.seqs.rmask, s.adv, lab.clip_eps, lab.grpo_agg, denom, ref_tok, lab.kl_coef)
        return loss, old_tok.sum(-1)


class FlowRLObjective(GRPOObjective):
    """FlowRL's length-normalized trajectory balance against π_ref, with its pooled-state log Z head."""

    def __init__(self, run, lab: BaselineConfig):
        super().__init__(run, lab)
        self.needs_ref = True

    def head(self, lm):
        return PooledLogZHead(lm.config.hidden_size)

    def param_groups(self, head) -> list:
        return [{"params": list(head.parameters()), "lr": self.cfg.logz_lr, "weight_decay": 0.0}]

    def count(self, fresh: Samples, replayed: Samples) -> float:
        return float((len(fresh) if fresh else 0) + (len(replayed) if replayed else 0))

    def loss(self, model, s: Samples, denom: float):
        cfg, lab = self.cfg, self.lab
        with amp(s.seqs.resp.device, cfg.dtype == "bfloat16"):
            logp_tok, h = token_logprobs(model.policy.lm, s.seqs, cfg.temperature, cfg.logit_chunk, prompt_state=True,
                                         shared_prefix=cfg.shared_prefix)  # (n, R), (n, H)
        old = (s.old_tok if s.old_tok is not None else logp_tok.detach()).sum(-1)
        logp = logp_tok.sum(-1)
        with torch.no_grad():
            ref = sequence_logprobs(model.ref_lm, s.seqs, cfg)
        w = (logp.detach() - old).exp().clamp(max=lab.flowrl_is_clip)  # π_θ/π_old, detached: 1 at the first optimizer step
        loss = flowrl_loss(model.policy.logz(h), logp, ref, s.seqs.rmask.sum(-1), s.adv, lab.flowrl_reward_mult,
                           weight=w, denom=denom)
        return loss, old


def keep_informative(rewards) -> np.ndarray:
    """DAPO's dynamic-sampling filter: True for the groups whose rewards are not all equal. (n, G) -> (n,) bool."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"keep_informative: rewards must be (groups, G), got shape {r.shape}")
    return r.max(1) > r.min(1)


class DynamicSampling:
    """Any objective with DAPO's dynamic sampling as its rollout variant (`collect`); the rest is the objective's."""

    def __init__(self, inner, lab: BaselineConfig):
        self.inner, self.lab = inner, lab

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def collect(self, run, chosen) -> rollout.Rollouts:
        """Rounds of B prompts until B groups with differing rewards are kept, re-sharded over the ranks."""
        cfg, ranks, lm, step = run.cfg, run.ranks, run.model.policy.lm, run.progress.step
        B, G = cfg.prompts_per_step, cfg.group_size
        batch, tally = rollout.roll_and_verify(lm, run.prompts, chosen, step, cfg, ranks)
        reward_sum = all_sum(float(batch.reward.sum()), ranks.world, ranks.device)
        kept, n_prompts, n_equal, rnd = [], 0, 0, 0
        while True:
            recs = sorted(sum(gather(group_records(batch, rnd, G), ranks.world), []))  # every rank: the same groups, in order
            keep = keep_informative([r[4] for r in recs])
            kept += [r for r, k in zip(recs, keep) if k]
            n_prompts, n_equal = n_prompts + len(recs), n_equal + int((~keep).sum())
            if len(kept) >= B or rnd + 1 >= self.lab.dyn_max_rounds:
                break
            rnd += 1
            batch, more = rollout.roll_and_verify(lm, run.prompts, run.selector.choose(step), step, cfg, ranks, rnd)
            tally.rollout_s, tally.verify_s = tally.rollout_s + more.rollout_s, tally.verify_s + more.verify_s
            tally.verifier_errors, tally.formatted, tally.rolled = (tally.verifier_errors + more.verifier_errors,
                                                                    tally.formatted + more.formatted, tally.rolled + more.rolled)
        kept = kept[:B]
        lockstep = ranks.world * (cfg.updates_per_batch if cfg.fsdp else 1)  # a sharded model needs every rank in lockstep
        kept = kept[:len(kept) - len(kept) % lockstep]
        if len(kept) < B:
            ranks.log(f"warning: step {step}: dynamic sampling kept {len(kept)} of {B} groups after {rnd + 1} rounds")
        out = regroup(kept[ranks.rank::ranks.world], run.prompts.train.toks, run.prompts.tokenizer.pad_token_id, G, ranks.device)
        return rollout.Rollouts(out, n_prompts, reward_sum, n_equal / n_prompts, tally)


def group_records(batch, rnd: int, G: int) -> list:
    """(round, position in the selection, prompt, its G responses' tokens, their rewards) of each group of a batch."""
    seqs = batch.seqs
    return [(rnd, p, j, [seqs.resp[k * G + g, :int(seqs.rmask[k * G + g].sum())].tolist() for g in range(G)],
             batch.reward[k * G:(k + 1) * G].tolist()) for k, (p, j) in enumerate(zip(batch.pos, batch.idx))]


def regroup(mine: list, toks: list, pad_id: int, G: int, device) -> rollout.Batch:
    """A Batch from kept group records (padding rows stand in where none are kept, then are cut)."""
    pid, pmask = left_pad([toks[r[2]] for r in mine for _ in range(G)] or [[pad_id]], pad_id, device)
    resp, rmask = right_pad([y for r in mine for y in r[3]] or [[pad_id]], pad_id, device)
    n = len(mine) * G
    return rollout.Batch([r[2] for r in mine], Seqs(pid[:n], pmask[:n], resp[:n], rmask[:n]),
                         torch.tensor([x for r in mine for x in r[4]], device=device, dtype=torch.float32))
