"""The modified trajectory-balance loss of PACED-RL.

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

`kl_k3` estimates KL(π_old ‖ π_θ) from samples of π_old: the gap in Proposition 4.1, logged as beta_kl.
How a batch of rollouts becomes this loss (micro-batches, replayed samples, Z_φ) is update.py's.
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
