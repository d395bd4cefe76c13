"""Adaptive prompt selection: train on the prompts whose estimated accuracy is nearest τ.

    p̂(x) = β · log Z_φ(x)          keep the B candidates with the smallest |p̂(x) − τ|

Read this file right after tb_loss.py: the loss makes β·log Z_φ(x) an estimate of the sampling policy's
accuracy on x (Proposition 4.1), and this rule spends the rollouts on prompts of medium difficulty, where
a group of G responses is most likely to hold both right and wrong answers (an all-equal group carries
no learning signal). The paper's rule is greedy and deterministic with τ = 0.5. What the paper leaves
open, and our choices (docs/DESIGN.md, "Where we depart from or fill in the paper"):

- the candidates: a pool of `pool_size` prompts drawn without replacement through shuffled epochs of
  the data set (`PromptPool`); `pool_size = 0` scores the whole data set every step;
- exploration (`explore_frac`, ours; 0 is the paper's rule): a share of the B slots goes to candidates
  the greedy rule passed over, in pool order (a uniform draw), so estimates far from τ keep being checked.

`PacedSelector` is step 1 of the loop: it draws the pool, scores it with p̂ and keeps B. It is the loop's
selector seam: `choose(step)` gives the B prompt indices, `observe(step, groups)` hears each step's
outcome (PACED-RL needs nothing from it: Z_φ learns through the loss) and returns metrics to log, and
`state_dict` is checkpointed. The research harness's selectors (uniform, history, ...) have the same
methods. Every rank holds the same pool RNG and the same Z_φ weights, so every rank selects the same
prompts.

`Coverage` watches what greedy selection can hide: where the rows name a group (a difficulty level, a
phrasing), a wrong estimate can keep a whole group out of the batches, and an estimate that is never
shown its group again is never corrected. The loop logs each group's chosen share and warns when one
has gone unobserved for a while.
"""

import numpy as np


def nearest(scores, k: int, tau: float) -> np.ndarray:
    """Indices (into scores) of the k entries with the smallest |score − τ|; ties go to the lower index."""
    p = np.asarray(scores, dtype=np.float64)
    if k > p.size:
        raise ValueError(f"nearest: asked for {k} prompts from a pool of {p.size}")
    if not np.all(np.isfinite(p)):
        raise ValueError(f"nearest: non-finite accuracy estimate at pool positions {np.flatnonzero(~np.isfinite(p)).tolist()[:10]}")
    return np.argsort(np.abs(p - tau), kind="stable")[:k]


def pick(scores, k: int, tau: float, n_explore: int = 0) -> np.ndarray:
    """Positions of the k candidates to train on: the k − n_explore whose score is nearest τ, then the
    first n_explore (in pool order) of those the greedy rule passed over."""
    order = nearest(scores, len(scores), tau)  # every candidate, nearest to τ first
    return np.concatenate([order[:k - n_explore], np.sort(order[k - n_explore:])[:n_explore]])


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
        if self.size == self.n:  # the whole data set, every step
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


class PacedSelector:
    """The B candidates of each pool whose p̂ = β·log Z_φ(e(x)) is nearest τ (`explore_frac` of them drawn
    uniformly from the rest of the pool)."""

    def __init__(self, run):
        cfg = run.cfg
        self.B, self.tau, self.n_explore = cfg.prompts_per_step, cfg.tau, round(cfg.explore_frac * cfg.prompts_per_step)
        self.pool = PromptPool(len(run.prompts.train.toks), cfg.pool_size, cfg.seed)
        self.p_hat = lambda idx: run.objective.p_hat(run.model.policy, idx)  # noqa: E731

    def choose(self, step: int) -> np.ndarray:
        self.cand = cand = self.pool.next()  # kept: the pool this step's choice came from, for whoever measures it
        return cand[pick(self.p_hat(cand), self.B, self.tau, self.n_explore)]

    def observe(self, step: int, groups: list) -> dict:
        """groups: every rank's (prompt index, observed accuracy a, p̂ or None) of this step, in prompt order."""
        return {}

    def state_dict(self):
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, st):
        self.pool.load_state_dict(st["pool"])


class Coverage:
    """Each labelled group's share of the chosen prompts, and a warning for a group left unobserved.

    labels: {field: each training prompt's value}, e.g. {"level": [...], "form": ["bare", "word", ...]}; a group
    is one field=value. observe() returns `chosen_share` {group: share of this step's prompts} (and at step 0
    `data_share`, the groups' shares of the training set), and one warning per group that has had none of its
    prompts chosen for `warn_steps` steps; said again only after the group has been chosen. Replay does not count:
    it trains Z_φ toward accuracies stored when a prompt was last chosen, so for a group unchosen for k steps it
    only re-asserts observations at least k steps old, and the estimate is as stale as if nothing had trained it."""

    def __init__(self, labels: dict, warn_steps: int):
        self.of = [[f"{f}={v}" for f, v in zip(labels, vals)] for vals in zip(*labels.values())]  # per prompt
        groups = sorted({g for gs in self.of for g in gs})
        self.data_share = {g: sum(g in gs for gs in self.of) / len(self.of) for g in groups}
        self.warn_steps, self.last_seen, self.warned = warn_steps, {g: 0 for g in groups}, []

    def observe(self, step: int, chosen: list) -> tuple:
        """(metrics, warnings) of one step: chosen, every rank's prompt indices."""
        if not self.data_share:
            return {}, []
        n = max(len(chosen), 1)
        share = {g: sum(g in self.of[j] for j in chosen) / n for g in self.data_share}
        for j in chosen:
            for g in self.of[j]:
                self.last_seen[g] = step
                if g in self.warned:
                    self.warned.remove(g)
        said = []
        for g, seen in self.last_seen.items():
            if self.warn_steps and step - seen >= self.warn_steps and g not in self.warned:
                self.warned.append(g)
                said.append(f"group {g} ({self.data_share[g]:.1%} of the training prompts) has not been chosen for "
                            f"{step - seen} steps: its estimate is not being corrected (raise explore_frac)")
        return {"chosen_share": share, **({"data_share": self.data_share} if step == 0 else {})}, said

    def state_dict(self):
        return {"last_seen": dict(self.last_seen), "warned": list(self.warned)}

    def load_state_dict(self, st):
        self.last_seen.update(st["last_seen"])
        self.warned = list(st["warned"])
