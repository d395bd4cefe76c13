"""The modified trajectory-balance loss of PACED-RL (docs/DESIGN.md, "The loss").

KL-regularized RLVR has the optimum π*(y|x) ∝ π_anchor(y|x)·exp(r(x,y)/β). Trajectory balance fits it
with a learned log Z_φ(x). PACED-RL anchors on π_old, the policy that sampled y:

    δ(x, y) = log Z_φ(x) + log π_θ(y|x) − log π_old(y|x) − r(x, y)/β
    L       = mean over samples of w · δ²       (w = 1 for fresh on-policy samples)

with log π summed over response tokens and r ∈ {0, 1} the raw verifier reward.

Proposition 4.1. Fix θ; the scalar c = log Z(x) minimizing E_{y~π_old}[δ²] is
    c* = E[r]/β + KL(π_old ‖ π_θ),   so   p_old(x) = β·log Z*(x) − β·KL(π_old ‖ π_θ).
Steps are small, so β·log Z_φ(x) ≈ accuracy of π_old on x: the partition function is a free
difficulty meter.

At θ = θ_old the gradient in θ is (2/β)(p̂(x) − r)·∇log π_θ(y|x): REINFORCE with the learned
per-prompt baseline p̂ = β·log Z_φ(x).

The baselines' losses live here too, so all methods share one harness:
- GRPO (as TRL codes it): Â = (r − group mean)/(group std + eps), PPO-clipped token ratio, optional
  k3 KL to π_ref; aggregation `token_mean` (token sum / global token count) or `seq_mean` (mean over
  sequences of each sequence's token mean).
- FlowRL: δ = log Z(x) + (1/|y|)·log π_θ − (1/|y|)·log π_ref − m·Â, loss = mean of w·δ², with a clipped,
  detached sequence importance weight w and reward multiplier m (15 in the authors' code).
"""

import torch


def paced_tb_residual(log_z, logp, logp_old, reward, beta: float):
    """δ = log Z + log π_θ − log π_old − r/β, elementwise over N samples."""
    return log_z + logp - logp_old - reward / beta


def paced_tb_loss(log_z, logp, logp_old, reward, beta: float, weight=None, denom=None):
    """Mean of w·δ² over samples; all inputs 1-D of length N (weight optional, detached).

    `denom` replaces N in the mean: with data parallelism each rank passes the *global* sample count,
    so that summing gradients over ranks gives exactly the gradient of the global mean.
    """
    for name, t in (("log_z", log_z), ("logp", logp), ("logp_old", logp_old), ("reward", reward)):
        if t.dim() != 1 or t.numel() != logp.numel():
            raise ValueError(f"paced_tb_loss: {name} must be 1-D of length {logp.numel()}, got shape {tuple(t.shape)}")
    delta = paced_tb_residual(log_z, logp, logp_old, reward.to(logp.dtype), beta)
    sq = delta.pow(2) if weight is None else weight.detach() * delta.pow(2)
    return sq.sum() / (sq.numel() if denom is None else denom)


def kl_k3(logp_old, logp_new):
    """Per-sample estimate of KL(π_old ‖ π_new) from y ~ π_old: (ρ − 1) − log ρ, ρ = π_new/π_old ≥ 0."""
    log_ratio = logp_new - logp_old
    return torch.expm1(log_ratio) - log_ratio


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
