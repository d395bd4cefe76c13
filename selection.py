"""Which prompts a step trains on: every selector of the study behind one interface (`--select`).

All of them draw the same candidate pool (scheduler.PromptPool) and keep the B candidates whose
predicted accuracy is nearest τ (scheduler.pick); they differ in the predictor:

- `uniform`: no predictor, the first B of the pool (the GRPO / FlowRL baseline).
- `paced`: p̂ = β·log Z_φ(e(x)), the partition function as the estimator (PACED-RL).
- `regress`: the same MLP on the same frozen e(x), trained directly on the observed group accuracies
  by cross-entropy, with its own optimizer: "a small predictor on embeddings", without the TB loss.
- `history`: each prompt's own discounted successes and failures, a Beta posterior (MoPPS); a
  Thompson draw (or the posterior mean) per candidate.
- `hybrid`: the history's Beta posterior with Z_φ's p̂ as its prior mean (n₀ pseudo-counts).
- `oracle`: the exact current accuracy (exact.py; the testbed only), greedy: the bound for this rule.

`paced`, `regress` and `hybrid` give `explore_frac` of the slots to candidates the rule passed over
(as PACED-RL does); `history` explores through its Thompson draw and `oracle` needs no exploration.
Every rank holds the same state (the same observations, gathered; the same RNG), so every rank
chooses the same prompts.
"""

import time

import numpy as np
import torch

import paced_rl
import scheduler
from metrics import all_equal_share, pearson

NEEDS_EMBEDDINGS = ("paced", "regress", "hybrid")


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


class Selector:
    def __init__(self, cfg, n_train: int, emb_train, exact_fn, rng: np.random.Generator):
        """emb_train: (N, D) frozen e(x) on the device, or None; exact_fn(idx) -> exact accuracies
        (oracle and the selection-quality metrics), or None where the task has none."""
        self.cfg, self.emb, self.exact_fn, self.rng = cfg, emb_train, exact_fn, rng
        self._exact_cache, self.exact_seconds = (None, None), 0.0
        self.history = History(n_train, cfg.history_forget) if cfg.select in ("history", "hybrid") else None
        self.head = self.opt = None
        if cfg.select == "regress":
            with torch.random.fork_rng(devices=[]):  # its own init, leaving the global RNG as the other selectors do
                torch.manual_seed(cfg.seed + 1)
                self.head = paced_rl.LogZHead(emb_train.size(1), cfg.logz_hidden, 1.0, cfg.logz_init_acc).to(emb_train.device)
            self.head.set_normalization(emb_train)
            self.opt = torch.optim.Adam(self.head.parameters(), lr=cfg.regress_lr)

    def predict(self, idx, p_hat_fn):
        """The predicted accuracy of training prompts idx (posterior means for history and hybrid);
        None for uniform selection without Z_φ."""
        cfg, s = self.cfg, self.cfg.select
        if s == "oracle":
            return self.exact(idx)
        if s == "history":
            return self.history.mean(idx, cfg.history_prior_a, cfg.history_prior_b)
        if s == "hybrid":
            return self.history.mean(idx, *hybrid_prior(p_hat_fn(idx), cfg.hybrid_n0))
        if s == "regress":
            with torch.no_grad():
                return self.head.p_hat(self.emb[torch.as_tensor(idx, device=self.emb.device)]).cpu().numpy()
        return p_hat_fn(idx) if cfg.algo == "paced" else None

    def score(self, idx, p_hat_fn):
        """What the rule ranks by: a Thompson draw for history / hybrid (history_draw=thompson), else the prediction."""
        cfg = self.cfg
        if cfg.select in ("history", "hybrid") and cfg.history_draw == "thompson":
            prior = (hybrid_prior(p_hat_fn(idx), cfg.hybrid_n0) if cfg.select == "hybrid"
                     else (cfg.history_prior_a, cfg.history_prior_b))
            return self.history.draw(idx, *prior, self.rng)
        return self.predict(idx, p_hat_fn)

    def choose(self, pool, p_hat_fn):
        """(B chosen prompt indices, the candidate pool they came from)."""
        cfg, B = self.cfg, self.cfg.prompts_per_step
        cand = pool.next()
        if cfg.select == "uniform":
            return cand[:B], cand
        n_explore = round(cfg.explore_frac * B) if cfg.select in NEEDS_EMBEDDINGS else 0
        return cand[scheduler.pick(self.score(cand, p_hat_fn), B, cfg.tau, n_explore)], cand

    def observe(self, idx, acc):
        """After a step: every rank's groups (prompt index, observed accuracy a = correct / G), gathered."""
        if self.history is not None:
            G = self.cfg.group_size
            succ = np.rint(np.asarray(acc) * G)
            self.history.update(idx, succ, G - succ)
        if self.head is not None and len(idx):
            p = self.head.p_hat(self.emb[torch.as_tensor(idx, device=self.emb.device)]).clamp(1e-6, 1 - 1e-6)
            a = torch.as_tensor(np.asarray(acc), dtype=p.dtype, device=p.device)
            loss = -(a * p.log() + (1 - a) * (1 - p).log()).mean()  # cross-entropy against a(x)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()

    def quality(self, cand, chosen, p_hat_fn) -> dict:
        """How good this step's choice was, from exact accuracies: the expected share of all-equal groups
        among the chosen prompts (and in the whole pool, what uniform would get), and the Pearson r
        between the selector's prediction and the exact accuracy over the pool."""
        if self.exact_fn is None:
            return {}
        exact = self.exact(cand)
        pos = {int(j): k for k, j in enumerate(cand)}
        chosen_exact = exact[[pos[int(j)] for j in chosen]]
        pred = self.predict(cand, p_hat_fn)  # the oracle's is `exact` itself (cached)
        G = self.cfg.group_size
        return {"sel_equal_share": all_equal_share(chosen_exact, G),
                "pool_equal_share": all_equal_share(exact, G),
                "sel_pred_corr_exact": pearson(pred, exact) if pred is not None else None}

    def exact(self, idx) -> np.ndarray:
        """Exact accuracies of idx (computed once per pool and step: oracle and quality share them), timed."""
        key = np.asarray(idx).tobytes()
        if self._exact_cache[0] != key:
            t = time.time()
            self._exact_cache = (key, self.exact_fn(idx))
            self.exact_seconds += time.time() - t
        return self._exact_cache[1]

    def pop_exact_seconds(self) -> float:
        """Seconds spent on exact accuracies since the last call (teacher forcing: not rollouts). Called once
        per step after the update, it also forgets the cached accuracies: the policy has changed."""
        self._exact_cache, (s, self.exact_seconds) = (None, None), (self.exact_seconds, 0.0)
        return s

    def state_dict(self):
        return {"rng": self.rng.bit_generator.state,
                "history": self.history.state_dict() if self.history is not None else None,
                "head": self.head.state_dict() if self.head is not None else None,
                "opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, st):
        self.rng.bit_generator.state = st["rng"]
        if self.history is not None:
            self.history.load_state_dict(st["history"])
        if self.head is not None:
            self.head.load_state_dict(st["head"])
            self.opt.load_state_dict(st["opt"])
