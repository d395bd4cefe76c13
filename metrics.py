"""Small metrics that training, evaluation and the experiments all read, so each has one definition.

- `pearson`: the correlation of p̂ with observed accuracy (logged as null where it is undefined).
- `calibration`: how well p̂ = β·log Z_φ estimates per-prompt accuracy a: mean |p̂ − a| and Pearson r.
- `all_equal_share`: the expected share of groups of G samples whose rewards are all equal, for prompts
  of accuracy a: mean of a^G + (1 − a)^G. Such a group gives GRPO (and the TB loss's θ-gradient at
  θ = θ_old, when p̂ = a) nothing to learn from; it is what difficulty scheduling tries to avoid.
"""

import numpy as np


def pearson(a, b):
    """Pearson correlation, or None where undefined (fewer than 2 points, or a constant input)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # ptp, not std: the std of equal floats can be 1e-17
        return None  # logged as null, never as a made-up number
    return float(np.corrcoef(a, b)[0, 1])


def calibration(p_hat, acc) -> dict:
    """{'acc_est_corr': Pearson r, 'acc_est_abs_err': mean |p̂ − a|} over prompts."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    return {"acc_est_corr": pearson(p_hat, acc), "acc_est_abs_err": float(np.abs(p_hat - acc).mean())}


def all_equal_share(acc, group_size: int) -> float:
    """Expected share of groups of `group_size` samples with all-equal rewards: mean of a^G + (1 − a)^G."""
    a = np.asarray(acc, dtype=np.float64)
    return float(np.mean(a ** group_size + (1 - a) ** group_size)) if a.size else float("nan")
