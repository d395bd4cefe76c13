"""The scheduling study's selectors and probes, plugged into the loop's seams (scheduler.PacedSelector's methods).

All of them draw a candidate pool (scheduler.PromptPool) and keep the B candidates whose predicted accuracy is
nearest τ (scheduler.pick); they differ in the predictor (`--select`):

- `uniform`: no predictor, the first B of a pool of B (the GRPO / FlowRL baseline).
- `paced`: p̂ = β·log Z_φ(e(x)), the partition function as the estimator (PACED-RL; scheduler.PacedSelector).
- `regress`: the same MLP on the same frozen e(x), trained directly on the observed group accuracies by
  cross-entropy, with its own optimizer: "a small predictor on embeddings", without the TB loss.
- `history`: each prompt's own discounted successes and failures, a Beta posterior (MoPPS); a Thompson draw
  (or the posterior mean) per candidate.
- `hybrid`: the history's Beta posterior with Z_φ's p̂ as its prior mean (n₀ pseudo-counts).
- `oracle`: the exact current accuracy (tasks/exact.py; the testbed only), greedy: the bound for this rule.
- `static`: the initial policy's accuracy on each prompt, measured once by sampling (`accuracy_file`, written by
  experiments/static_oracle.py), greedy: a bound for any task, knowing every prompt at step 0 and nothing later.

`paced`, `regress` and `hybrid` give `explore_frac` of the slots to candidates the rule passed over; `history`
explores through its Thompson draw and the oracles need no exploration. Every rank holds the same state (the
same observations, gathered; the same RNG), so every rank chooses the same prompts.

`Measured` wraps any selector with the quality of each choice from exact accuracies (`exact_metrics=on`);
`StudyProbe` adds the study's metrics: exact held-out accuracy, the per-group record, Z_φ's diagnostics.
"""

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import paced_rl
import scheduler
from metrics import all_equal_share, pearson
from rollout import seed_of
from tasks import exact as exact_lib


@dataclass
class StudyConfig:
    select: str = "paced"  # the predictor that picks B of the pool near τ: paced | uniform | history | regress | hybrid | oracle | static
    accuracy_file: str = ""  # select=static: each training prompt's initial accuracy (experiments/static_oracle.py)
    history_forget: float = 1.0  # history / hybrid: λ, old evidence discounted per observation (MoPPS: 1, none)
    history_prior_a: float = 1.0  # history: Beta prior α₀ of a prompt never rolled out (MoPPS: 1)
    history_prior_b: float = 1.0  # history: Beta prior β₀ (MoPPS: 1)
    history_draw: str = "thompson"  # history / hybrid rank by: thompson (one posterior draw, MoPPS) | mean
    hybrid_n0: float = 8.0  # hybrid: pseudo-counts of Z_φ's prior (8 = one group's worth of evidence)
    regress_lr: float = 1e-2  # regress: Adam learning rate of the accuracy regressor (as logz_lr)
    exact_metrics: str = "auto"  # exact accuracies: auto (held-out, testbed) | on (also each choice's quality) | off
    quality_every: int = 1  # with exact_metrics=on: the choice's quality every k steps (the oracle: every step)
    regime: str = ""  # a difficulty regime of the testbed's training pool (testbed.REGIMES); sets train_data


RANGES = {"history_forget": "(0, 1]", "history_prior_a": "(0, inf)", "history_prior_b": "(0, inf)", "hybrid_n0": "(0, inf)",
          "regress_lr": "(0, inf)", "quality_every": "[1, inf)"}
CHOICES = {"select": ("paced", "uniform", "history", "regress", "hybrid", "oracle", "static"), "history_draw": ("thompson", "mean"),
           "exact_metrics": ("auto", "on", "off")}


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


def exact_on(run, lab: StudyConfig) -> bool:
    return lab.exact_metrics == "on" or (lab.exact_metrics == "auto" and run.cfg.verifier == "testbed")


class Exact:
    """Exact accuracies of training prompts under the current policy (tasks/exact.py, sharded over ranks), computed
    once per pool and step (the oracle and the quality metrics share them) and timed."""

    def __init__(self, run):
        self.run, self.key, self.value, self.seconds = run, None, None, 0.0

    def __call__(self, idx) -> np.ndarray:
        key = np.asarray(idx).tobytes()
        if self.key != key:
            t, run = time.time(), self.run
            run.model.policy.eval()
            toks, answers = [run.prompts.train.toks[j] for j in idx], [run.prompts.train.answers[j] for j in idx]
            self.key, self.value = key, exact_lib.exact_accuracy_sharded(run.model.policy.lm, run.prompts.tokenizer, toks,
                                                                         answers, run.cfg, run.ranks)[0]
            self.seconds += time.time() - t
        return self.value

    def forget(self) -> float:
        """Seconds spent since the last call; the cached accuracies are dropped (the policy has changed)."""
        (self.key, self.value), (s, self.seconds) = (None, None), (self.seconds, 0.0)
        return s


def static_accuracy(path: str, n: int) -> np.ndarray:
    """The accuracy file of experiments/static_oracle.py, checked against the n training prompts this run loaded."""
    import json

    if not path or not os.path.exists(path):
        raise SystemExit(f"select=static: no accuracy file {path!r}; measure one with `python -m experiments.static_oracle "
                         f"--preset=... --out=FILE` and pass --accuracy_file=FILE")
    with open(path) as f:
        acc = np.asarray(json.load(f)["acc"], dtype=np.float64)
    if acc.shape != (n,):
        raise SystemExit(f"select=static: {path} holds {acc.size} accuracies, this run's training split has {n} prompts "
                         f"(another data file, or another max_prompt_tokens)")
    return acc


class StudySelector:
    """uniform, history, hybrid, regress and oracle (module docstring); the same methods as scheduler.PacedSelector."""

    def __init__(self, run, lab: StudyConfig, exact: Exact):
        cfg = run.cfg
        self.cfg, self.lab, self.run, self.exact = cfg, lab, run, exact
        self.pool = scheduler.PromptPool(len(run.prompts.train.toks), cfg.pool_size if lab.select != "uniform"
                                         else cfg.prompts_per_step, cfg.seed)
        self.rng = np.random.default_rng(seed_of(cfg.seed, 3))
        n = len(run.prompts.train.toks)
        self.history = History(n, lab.history_forget) if lab.select in ("history", "hybrid") else None
        self.emb = self.head = self.opt = self.static = None
        if lab.select == "static":
            self.static = static_accuracy(lab.accuracy_file, n)
        if lab.select in ("regress", "hybrid", "paced"):
            self.emb = run.embeddings()[0]
        if lab.select == "regress":
            with torch.random.fork_rng(devices=[]):  # its own init, leaving the global RNG as the other selectors do
                torch.manual_seed(cfg.seed + 1)
                self.head = paced_rl.LogZHead(self.emb.size(1), cfg.logz_hidden, 1.0, cfg.logz_init_acc).to(self.emb.device)
            self.head.set_normalization(self.emb)
            self.opt = torch.optim.Adam(self.head.parameters(), lr=lab.regress_lr)
        self.cand = None

    def p_hat(self, idx):
        return self.run.objective.p_hat(self.run.model.policy, idx)

    def predict(self, idx):
        """The predicted accuracy of training prompts idx (posterior means for history and hybrid); None for
        uniform selection under an objective without an estimate."""
        lab, s = self.lab, self.lab.select
        if s == "oracle":
            return self.exact(idx)
        if s == "static":
            return self.static[np.asarray(idx, dtype=np.int64)]
        if s == "history":
            return self.history.mean(idx, lab.history_prior_a, lab.history_prior_b)
        if s == "hybrid":
            return self.history.mean(idx, *hybrid_prior(self.p_hat(idx), lab.hybrid_n0))
        if s == "regress":
            with torch.no_grad():
                return self.head.p_hat(self.emb[torch.as_tensor(idx, device=self.emb.device)]).cpu().numpy()
        return self.p_hat(idx)

    def score(self, idx):
        """What the rule ranks by: a Thompson draw for history / hybrid (history_draw=thompson), else the prediction."""
        lab = self.lab
        if lab.select in ("history", "hybrid") and lab.history_draw == "thompson":
            prior = (hybrid_prior(self.p_hat(idx), lab.hybrid_n0) if lab.select == "hybrid"
                     else (lab.history_prior_a, lab.history_prior_b))
            return self.history.draw(idx, *prior, self.rng)
        return self.predict(idx)

    def choose(self, step: int) -> np.ndarray:
        B = self.cfg.prompts_per_step
        self.cand = cand = self.pool.next()
        if self.lab.select == "uniform":
            return cand[:B]
        n_explore = round(self.cfg.explore_frac * B) if self.lab.select in ("paced", "regress", "hybrid") else 0
        return cand[scheduler.pick(self.score(cand), B, self.cfg.tau, n_explore)]

    def observe(self, step: int, groups: list) -> dict:
        """Every rank's groups (prompt index, observed accuracy a = correct / G, p̂), gathered: the history and the
        regressor learn from them."""
        idx, acc = [g[0] for g in groups], [g[1] for g in groups]
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
        return {}

    def state_dict(self):
        return {"pool": self.pool.state_dict(), "rng": self.rng.bit_generator.state,
                "history": self.history.state_dict() if self.history is not None else None,
                "head": self.head.state_dict() if self.head is not None else None,
                "opt": self.opt.state_dict() if self.opt is not None else None}

    def load_state_dict(self, st):
        if any(x is not None and st.get(k) is None for k, x in (("history", self.history), ("head", self.head), ("rng", self.rng))):
            raise SystemExit(f"resume: the checkpoint holds no state of select={self.lab.select} (written with another selector)")
        self.pool.load_state_dict(st["pool"])
        self.rng.bit_generator.state = st["rng"]
        if self.history is not None:
            self.history.load_state_dict(st["history"])
        if self.head is not None:
            self.head.load_state_dict(st["head"])
            self.opt.load_state_dict(st["opt"])


class Measured:
    """A selector whose choice is measured from exact accuracies (exact_metrics=on, every quality_every steps; the
    oracle's every step, free): the expected share of all-equal groups among the chosen prompts and in the whole
    pool (what uniform would get), and the Pearson r between the selector's prediction and the exact accuracy."""

    def __init__(self, inner, run, lab: StudyConfig, exact: Exact):
        self.inner, self.run, self.lab, self.exact, self.metrics = inner, run, lab, exact, {}

    def choose(self, step: int) -> np.ndarray:
        chosen = self.inner.choose(step)
        measure = self.lab.select == "oracle" or (self.lab.exact_metrics == "on" and step % self.lab.quality_every == 0)
        self.metrics = self.quality(self.inner.cand, chosen) if measure else {}
        return chosen

    def quality(self, cand, chosen) -> dict:
        ex = self.exact(cand)
        pos = {int(j): k for k, j in enumerate(cand)}
        predict = getattr(self.inner, "predict", None) or self.inner.p_hat
        pred, G = predict(cand), self.run.cfg.group_size  # the oracle's is `ex` itself (cached)
        return {"sel_equal_share": all_equal_share(ex[[pos[int(j)] for j in chosen]], G),
                "pool_equal_share": all_equal_share(ex, G),
                "sel_pred_corr_exact": pearson(pred, ex) if pred is not None else None}

    def observe(self, step: int, groups: list) -> dict:
        return {**self.metrics, **self.inner.observe(step, groups), "exact_s": self.exact.forget()}

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, st):
        self.inner.load_state_dict(st)


def make_selector(run, lab: StudyConfig):
    """The selector of `lab.select`, measured (the loop's selector seam)."""
    exact = Exact(run)
    inner = scheduler.PacedSelector(run) if lab.select == "paced" else StudySelector(run, lab, exact)
    return Measured(inner, run, lab, exact)


class StudyProbe:
    """The study's metrics: the exact held-out accuracy and p̂'s correlation with it (testbed; and p̂'s error against
    the exact accuracy of every training prompt, chosen or not), every chosen group as
    [prompt, a(x), p̂] (what experiments/zphi_replay.py replays), and for a LogZHead its raw output over the step's
    prompts (p̂'s logit under the sigmoid: beyond ±7, p̂ is within 10⁻³ of 0 or 1 and its gradient vanishes) and how
    far Adam moved φ in the step."""

    def __init__(self, run, lab: StudyConfig):
        self.exact_on = exact_on(run, lab)
        head = run.model.policy.logz
        self.head = head if isinstance(head, paced_rl.LogZHead) else None
        self.phi = [p.detach().clone() for p in self.head.parameters()] if self.head is not None else None

    def evaluate(self, run, res):
        if not self.exact_on:
            return
        run.model.policy.eval()
        ex, gap = exact_lib.exact_accuracy_sharded(run.model.policy.lm, run.prompts.tokenizer, run.prompts.heldout.toks,
                                                   run.prompts.heldout.answers, run.cfg, run.ranks)
        p_hat = res.per_prompt["p_hat"]  # the exact accuracy lies in [eval_acc_exact, eval_acc_exact + eval_acc_exact_gap]
        res.row.update({"eval_acc_exact": float(ex.mean()), "eval_acc_exact_gap": float(gap.mean()),
                        "eval_acc_est_corr_exact": pearson(p_hat, ex) if p_hat is not None else None})
        res.per_prompt["acc_exact"] = ex.tolist()
        if p_hat is not None:  # the estimate over every training prompt, the ones selection stopped showing too
            tr = exact_lib.exact_accuracy_sharded(run.model.policy.lm, run.prompts.tokenizer, run.prompts.train.toks,
                                                  run.prompts.train.answers, run.cfg, run.ranks)[0]
            p_tr = run.objective.p_hat(run.model.policy, list(range(len(tr))))
            res.row.update({"train_acc_est_abs_err_exact": float(np.abs(p_tr - tr).mean()),
                            "train_acc_est_corr_exact": pearson(p_tr, tr)})

    @torch.no_grad()
    def step(self, run, s, row) -> dict:
        out = {"groups": [[int(j), round(float(a), 4), None if p is None else round(float(p), 6)] for j, a, p in s.groups]}
        if self.head is not None and s.groups:
            emb = run.embeddings()[0]
            raw = self.head.raw(emb[torch.as_tensor([g[0] for g in s.groups], device=emb.device)]).cpu().numpy()
            moved = float(sum((p.detach() - p0).pow(2).sum() for p, p0 in zip(self.head.parameters(), self.phi)) ** 0.5)
            out.update({"logz_raw_mean": float(raw.mean()), "logz_raw_min": float(raw.min()), "logz_raw_max": float(raw.max()),
                        "logz_step_norm": moved})
        if self.head is not None:
            self.phi = [p.detach().clone() for p in self.head.parameters()]
        return out
