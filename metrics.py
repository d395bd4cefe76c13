"""Small metrics that training, evaluation and the experiments all read, so each has one definition.

- `pearson`: the correlation of p̂ with observed accuracy (logged as null where it is undefined).
- `calibration`: how well p̂ = β·log Z_φ estimates per-prompt accuracy a: mean |p̂ − a| and Pearson r.
- `pass_at_k`, `pass_at_ks`: the unbiased pass@k estimator (Chen et al., 2021); `distinct_correct`:
  how many different correct responses a prompt's samples hold (diversity, where a task admits several).
- `all_equal_share`: the expected share of groups of G samples whose rewards are all equal, for prompts
  of accuracy a: mean of a^G + (1 − a)^G. Such a group gives GRPO (and the TB loss's θ-gradient at
  θ = θ_old, when p̂ = a) nothing to learn from; it is what difficulty scheduling tries to avoid.
"""

import math
from fractions import Fraction

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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 − C(n−c, k)/C(n, k),
    in exact integer arithmetic and rounded once, so pass@1 is c/n to the last bit."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


def pass_at_ks(n: int, correct) -> dict:
    """{k: mean pass@k over prompts} for k = 1, 2, 4, ... up to n."""
    ks = [2 ** i for i in range(int(np.log2(n)) + 1)]
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks}


def distinct_correct(texts, rewards) -> int:
    """How many different correct responses (whitespace-normalized) a prompt's samples hold."""
    return len({" ".join(t.split()) for t, r in zip(texts, rewards) if r == 1.0})
