"""Adaptive prompt selection: train on prompts whose estimated accuracy is near τ (DESIGN.md §4).

    p̂(x) = β · log Z_φ(x)          select the k candidates with the smallest |p̂(x) − τ|

Paper: greedy and deterministic, τ = 0.5 (medium difficulty: the most signal per rollout, since a
group whose G rewards are all equal carries no learning signal). What the paper leaves open, and
our choice: the candidates come from a pool of `pool_size` prompts drawn without replacement
through an epoch (a shuffled pass over the data); `pool_size = 0` scores the whole data set each
step. In uniform mode (the GRPO / FlowRL baseline) the first k of the pool are taken.
Exploration (ours, `explore_frac`): a share of the B slots goes to pool candidates the greedy rule
passed over, so that estimates far from τ keep being checked against observed accuracy.
Dynamic sampling (DAPO, a baseline's rule, `keep_informative`): groups whose G rewards are all equal
are dropped and more prompts are rolled out until the batch is full; the extra rollouts are its cost.
Every rank holds the same pool RNG and the same Z_φ weights, so every rank selects the same prompts.
The competing predictors of the scheduling study live here too, as plain pieces that selection.py
combines: `History` (a per-prompt Beta posterior, MoPPS), `hybrid_prior` (Z_φ's p̂ as its prior), `pick`
(the nearest-τ rule with exploration slots) and `all_equal_share` (the expected share of groups
without signal, a^G + (1 − a)^G).
"""

import numpy as np


def select(p_hat, k: int, tau: float) -> np.ndarray:
    """Indices (into p_hat) of the k entries with the smallest |p̂ − τ|; ties go to the lower index."""
    p = np.asarray(p_hat, dtype=np.float64)
    if k > p.size:
        raise ValueError(f"select: asked for {k} prompts from a pool of {p.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"select: non-finite accuracy estimate at pool positions {np.flatnonzero(~np.isfinite(p)).tolist()[:10]}")
    return np.argsort(np.abs(p - tau), kind="stable")[:k]


class PromptPool:
    """Walks through shuffled epochs of the data set, `size` prompt indices at a time."""

    def __init__(self, n: int, size: int, seed: int):
        if n == 0:
            raise ValueError("PromptPool: the training set is empty")
        self.n, self.size, self.seed = n, (size if 0 < size <= n else n), seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation()

    def _permutation(self):
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n)

    def next(self) -> np.ndarray:
        """The next `size` indices; a pool that would cross an epoch's end starts a new epoch."""
        if self.size == self.n:  # `all`: the whole data set, every step
            return np.arange(self.n)
        if self.cursor + self.size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._perm = self._permutation()
        out = self._perm[self.cursor:self.cursor + self.size]
        self.cursor += self.size
        return out

    def state_dict(self):
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s):
        self.epoch, self.cursor = s["epoch"], s["cursor"]
        self._perm = self._permutation()


def choose_prompts(pool: PromptPool, p_hat_fn, k: int, tau: float, mode: str, n_explore: int = 0) -> np.ndarray:
    """One step of prompt selection: data-set indices of the k prompts to roll out.

    In paced mode, `n_explore` of the k slots go to candidates the greedy rule passed over, taken in
    pool order (a uniform draw, since the pool is a random permutation). Greedy selection alone never
    revisits a prompt whose estimate is far from τ, so a wrong estimate there is never corrected.
    """
    cand = pool.next()
    if mode == "uniform":
        return cand[:k]
    if mode != "paced":
        raise ValueError(f"select mode must be 'paced' or 'uniform', got {mode!r}")
    return cand[pick(p_hat_fn(cand), k, tau, n_explore)]


def pick(scores, k: int, tau: float, n_explore: int = 0) -> np.ndarray:
    """Positions of the k candidates to keep: the k − n_explore whose score is nearest τ, then the first
    n_explore (in pool order) of those the greedy rule passed over."""
    order = select(scores, len(scores), tau)  # every candidate, nearest to τ first
    return np.concatenate([order[:k - n_explore], np.sort(order[k - n_explore:])[:n_explore]])


def keep_informative(rewards) -> np.ndarray:
    """DAPO's dynamic-sampling filter: True for the groups whose rewards are not all equal.
    rewards: (n, G) -> (n,) bool."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2:
        raise ValueError(f"keep_informative: rewards must be (groups, G), got shape {r.shape}")
    return r.max(1) > r.min(1)


# ----------------------------------------------------------------------------- the competing predictors


class History:
    """Each prompt's own record of successes and failures, discounted: MoPPS's predictor (Qu et al.,
    arXiv 2507.04632), with no model of the prompt's text.

    After a prompt's group of G rollouts with s successes and f failures, its evidence becomes
    (λ·s_old + s, λ·f_old + f): older evidence is discounted by λ per observation (λ = 1 keeps all of
    it). The posterior is Beta(α₀ + s, β₀ + f); with λ < 1 this equals MoPPS's update α ← λα + (1 − λ)α₀ + s.
    A prompt never rolled out sits at the prior. `hybrid` passes a per-prompt prior instead: mean p̂
    from Z_φ with n₀ pseudo-counts, so the embedding speaks for unseen prompts and the history for the
    rest."""

    def __init__(self, n: int, forget: float = 1.0):
        if not 0 < forget <= 1:
            raise ValueError(f"History: the forgetting factor must be in (0, 1], got {forget}")
        self.forget = forget
        self.s, self.f = np.zeros(n), np.zeros(n)

    def update(self, idx, successes, failures):
        idx = np.asarray(idx, dtype=np.int64)
        self.s[idx] = self.forget * self.s[idx] + np.asarray(successes, dtype=np.float64)
        self.f[idx] = self.forget * self.f[idx] + np.asarray(failures, dtype=np.float64)

    def posterior(self, idx, prior_a, prior_b):
        """(α, β) of the given prompts; prior_a, prior_b: scalars or one value per prompt."""
        idx = np.asarray(idx, dtype=np.int64)
        return prior_a + self.s[idx], prior_b + self.f[idx]

    def mean(self, idx, prior_a, prior_b) -> np.ndarray:
        a, b = self.posterior(idx, prior_a, prior_b)
        return a / (a + b)

    def draw(self, idx, prior_a, prior_b, rng: np.random.Generator) -> np.ndarray:
        """One Thompson sample per prompt from its posterior."""
        a, b = self.posterior(idx, prior_a, prior_b)
        return rng.beta(a, b)

    def state_dict(self):
        return {"forget": self.forget, "s": self.s.copy(), "f": self.f.copy()}

    def load_state_dict(self, st):
        if st["s"].shape != self.s.shape:
            raise ValueError(f"History: the saved state covers {st['s'].size} prompts, this data set has {self.s.size}")
        self.forget, self.s, self.f = st["forget"], st["s"].copy(), st["f"].copy()


def hybrid_prior(p_hat, n0: float):
    """Beta prior with mean p̂ (clipped into (0, 1)) and n₀ pseudo-counts: (n₀·p̂, n₀·(1 − p̂))."""
    p = np.clip(np.asarray(p_hat, dtype=np.float64), 1e-3, 1 - 1e-3)
    return n0 * p, n0 * (1 - p)


def all_equal_share(acc, group_size: int) -> float:
    """Expected share of groups of G samples whose rewards are all equal, for prompts of accuracy acc:
    mean of a^G + (1 − a)^G. Such a group gives GRPO no gradient."""
    a = np.asarray(acc, dtype=np.float64)
    return float(np.mean(a ** group_size + (1 - a) ** group_size)) if a.size else float("nan")
