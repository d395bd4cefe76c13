"""Candidate estimators and selection rules scored offline on committed records, before any full run.

For each step t ≥ 1 of a record, a candidate estimator is trained on the record's observed groups of steps < t
(prompt, observed accuracy a, step), scores the step's candidate pool (rebuilt from the run's seed: the loop's
PromptPool; a uniform-selection record's own pool was B wide, the candidate's is the run's pool_size), and a
rule picks B of it. Two scores, as the registered plan in results/log/estimator_memory.md names them:

- the picks' expected informative share, 1 − a0^G − (1 − a0)^G with a0 the initial policy's measured accuracy
  (results/smollm2_study/initial_accuracy.json), and their never-solved share (a0 = 0);
- the prequential error: the estimate of step t's observed groups before it has seen them, mean |p̂ − a|, and
  Pearson r; and what that error does to the TB loss's policy gradient (`baseline_share`): the share of its
  weight that is the baseline's error rather than the group's own contrast.

The records' groups are what the record's own selector chose, so a candidate learns from that run's data, not
from its own picks: exact for uniform-selection records (`paced_replay_only`, `grpo`), an approximation for
PACED-RL's.

Estimators (the `--estimators` list, comma-separated; each name=spec):
  online:LR                   today's head: one Adam step of the TB loss's Z_φ term per step on that step's groups
  memory:LR:PASSES:HALF       the same, then PASSES Adam steps over every group seen so far, weighted 0.5^(age/HALF)
  ridge:LAMBDA:HALF           a closed-form weighted ridge regression of a on e(x) over every group seen so far
Features (`--features`): LAYER:POOL, LAYER an index into the hidden states (-1 the last), POOL mean (every prompt
token, today's e(x)) or distinct (the tokens that differ between prompts: the shared template and suffix left out).
Rules (`--rules`): nearest:TAU (the paper's, τ = 0.5), informative (the expected informative share under a Beta
predictive distribution whose mean is p̂ and whose variance is the estimator's own prequential squared error).

    python -m experiments.estimator_replay --runs=results/smollm2_again/runs --methods=paced,paced_replay_only
"""

import json
import os
import sys

import numpy as np
import torch

import paced_rl
from experiments.compare import run_config
from scheduler import PromptPool, nearest

ORACLE = "results/smollm2_study/initial_accuracy.json"


def records(runs_dir: str, methods: list) -> list:
    out = []
    for name in sorted(os.listdir(runs_dir)):
        method, _, seed = name.rpartition("_s")
        if method in methods and os.path.exists(os.path.join(runs_dir, name, "metrics.jsonl")):
            cfg = run_config(os.path.join(runs_dir, name))
            with open(os.path.join(runs_dir, name, "metrics.jsonl")) as f:
                rows = [r for r in map(json.loads, f) if "loss" in r and r.get("groups")]
            out.append((name, cfg, rows))
    return out


def features(cfg: dict, specs: list, cache: str) -> dict:
    """{spec: (N, D) e(x) of the training prompts}, every layer computed in one pass of the record's initial model."""
    if os.path.exists(cache):
        got = torch.load(cache)
        if all(s in got for s in specs):
            return got
    from config import Config
    from data import load_data
    from transformers import AutoModelForCausalLM

    c = Config(**{k: cfg[k] for k in ("model", "train_data", "eval_data", "prompt_field", "answer_field", "prompt_suffix",
                                       "shot_prompt", "shot_response", "verifier", "max_prompt_tokens") if k in cfg})
    prompts = load_data(c, lambda *a: None)
    lm = AutoModelForCausalLM.from_pretrained(c.model, dtype=torch.float32).eval()
    toks = prompts.train.toks
    out = {}
    for s in specs:
        layer, pool = s.split(":")
        out[s] = paced_rl.prompt_embeddings(lm, toks, prompts.tokenizer.pad_token_id, 40, torch.device("cpu"),
                                            pool, int(layer), paced_rl.distinct_spans(toks) if pool == "distinct" else None)
    torch.save(out, cache)
    return out


class Online:
    """A LogZHead trained as the loop trains it: the TB loss's Z_φ term on each step's groups, then (memory) PASSES
    more Adam steps over every group seen, each weighted 0.5^(age / HALF)."""

    def __init__(self, emb, cfg, lr, passes=0, half=0.0):
        torch.manual_seed(cfg["seed"])
        self.head = paced_rl.LogZHead(emb.size(1), cfg["logz_hidden"], cfg["beta"], cfg["logz_init_acc"], "logistic")
        self.head.set_normalization(emb)
        self.opt = torch.optim.AdamW(self.head.param_groups(lr, 96))
        self.memory = paced_rl.ObservationMemory()
        self.emb, self.passes, self.half = emb, passes, half

    def predict(self, idx):
        with torch.no_grad():
            return self.head.p_hat(self.emb[torch.as_tensor(idx)]).numpy()

    def observe(self, step, groups):
        idx = torch.tensor([g[0] for g in groups])
        a = torch.tensor([g[1] for g in groups], dtype=torch.float32)
        loss = ((self.head.value(self.emb[idx]) - a) ** 2).mean()  # the TB log Z term over G samples a group, ÷ G
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.memory.add(step, [g[0] for g in groups], [g[1] for g in groups])
        paced_rl.fit_to_memory(self.head, self.opt, self.emb, self.memory, step, self.passes, self.half)


class Ridge:
    """Weighted ridge regression of a on standardized e(x) over every group seen (a closed form each step)."""

    def __init__(self, emb, cfg, lam, half):
        x = (emb - emb.mean(0)) / emb.std(0).clamp(min=1e-6)
        self.x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
        self.lam, self.half, self.memory, self.w = lam, half, paced_rl.ObservationMemory(), None
        self.p0 = cfg["logz_init_acc"]

    def predict(self, idx):
        if self.w is None:
            return np.full(len(idx), self.p0)
        return (self.x[torch.as_tensor(idx)] @ self.w).clamp(0, 1).numpy()

    def observe(self, step, groups):
        self.memory.add(step, [g[0] for g in groups], [g[1] for g in groups])
        idx, a, w = self.memory.weighted(step, self.half)
        x = self.x[torch.as_tensor(idx)]
        xw = x * torch.as_tensor(w, dtype=torch.float64)[:, None]
        reg = self.lam * torch.eye(x.size(1), dtype=torch.float64)
        reg[-1, -1] = 0  # the intercept is not shrunk
        self.w = torch.linalg.solve(xw.T @ x + reg, xw.T @ torch.as_tensor(a, dtype=torch.float64))


def baseline_share(p_hat, acc) -> float:
    """The share of the TB loss's policy-gradient weight that is the estimator's error rather than the group's own
    contrast. At θ = θ_old a sample's weight is (p̂ − r)/β (tb_loss.py), and over a group of G samples
    Σ (r_i − p̂)² = G·a(1 − a) + G·(a − p̂)²: the first term is the within-group contrast (GRPO's signal, 0 in an
    all-equal group), the second the baseline's error. Returns Σ G(a − p̂)² / Σ [G·a(1 − a) + G(a − p̂)²]."""
    p, a = np.asarray(p_hat, float), np.asarray(acc, float)
    err, contrast = ((a - p) ** 2).sum(), (a * (1 - a)).sum()
    return float(err / (err + contrast)) if err + contrast > 0 else float("nan")


def make_estimator(spec: str, emb, cfg):
    kind, *p = spec.split(":")
    if kind == "online":
        return Online(emb, cfg, float(p[0]))
    if kind == "memory":
        return Online(emb, cfg, float(p[0]), int(p[1]), float(p[2]))
    if kind == "ridge":
        return Ridge(emb, cfg, float(p[0]), float(p[1]))
    raise SystemExit(f"estimator_replay: unknown estimator {spec!r}")


def informative_share(p_hat, var: float, G: int) -> np.ndarray:
    """The expected share of a group of G samples that is not all-equal, 1 − E[p^G] − E[(1 − p)^G], where a prompt's
    accuracy p is uncertain: p ~ Beta with mean p̂ and variance `var` (the estimator's own squared error, capped
    below p̂(1 − p̂)). With var → 0 it is 1 − p̂^G − (1 − p̂)^G; with a large var a mid p̂ may be a prompt at 0 or 1,
    so prompts whose p̂ is high (often solved, rarely always) rank above those whose p̂ sits at τ by averaging."""
    m = np.clip(np.asarray(p_hat, dtype=np.float64), 1e-6, 1 - 1e-6)
    v = np.minimum(var, 0.999 * m * (1 - m))
    k = m * (1 - m) / v - 1  # Beta(m·k, (1 − m)·k) has mean m and variance v
    a, b = m * k, (1 - m) * k
    e_all_right = np.prod([(a + i) / (k + i) for i in range(G)], axis=0)  # E[p^G] of a Beta
    e_all_wrong = np.prod([(b + i) / (k + i) for i in range(G)], axis=0)
    return 1 - e_all_right - e_all_wrong


def mixed_rate(p_hat, pairs):
    """P(a group is neither all right nor all wrong | p̂), a logistic fit on (p̂, p̂²) over the prequential pairs
    (p̂ when chosen, whether its group was mixed) seen so far; τ-nearest ranking where there are too few."""
    if len(pairs) < 8:
        return -np.abs(np.asarray(p_hat) - 0.5)
    x = np.array([q for q, _ in pairs])
    y = np.array([m for _, m in pairs], float)
    X = np.stack([np.ones_like(x), x, x ** 2], 1)
    w = np.zeros(3)
    for _ in range(50):  # Newton steps of a slightly regularized logistic regression
        z = 1 / (1 + np.exp(-X @ w))
        H = X.T @ (X * (z * (1 - z))[:, None]) + 1e-2 * np.eye(3)
        w -= np.linalg.solve(H, X.T @ (z - y) + 1e-2 * w)
    q = np.asarray(p_hat)
    return np.stack([np.ones_like(q), q, q ** 2], 1) @ w


def choose(rule: str, p, B, G, var, pairs):
    kind, *p_ = rule.split(":")
    if kind == "nearest":
        return nearest(p, B, float(p_[0]) if p_ else 0.5)
    if kind == "informative":
        return np.argsort(-informative_share(p, var, G), kind="stable")[:B]
    if kind == "mixed":
        return np.argsort(-mixed_rate(p, pairs), kind="stable")[:B]
    raise SystemExit(f"estimator_replay: unknown rule {rule!r}")


def score(cfg, rows, emb, est_spec, rules, a0) -> dict:
    est = make_estimator(est_spec, emb, cfg)
    pool = PromptPool(len(a0), cfg["pool_size"], cfg["seed"])
    B, G = cfg["prompts_per_step"], cfg["group_size"]
    inform = 1 - a0 ** G - (1 - a0) ** G
    picks = {r: [] for r in rules}
    pre_p, pre_a, sq, pairs = [], [], [], []
    for t, r in enumerate(rows):
        cand = pool.next()
        idx = [g[0] for g in r["groups"]]
        a = np.array([g[1] for g in r["groups"]])
        if cfg.get("select", "paced") == "paced" and not set(idx) <= set(cand.tolist()):
            raise SystemExit(f"estimator_replay: step {t}'s prompts are not in the rebuilt pool (another pool rule?)")
        if t >= 1:
            p = est.predict(idx)
            pre_p.append(p)
            pre_a.append(a)
            var = max(float(np.mean(np.concatenate(sq))) if sq else 0.05, 1e-4)
            pc = est.predict(cand)
            for rule in rules:
                picks[rule].append(cand[choose(rule, pc, B, G, var, pairs)])
            sq.append((p - a) ** 2 - a * (1 - a) / max(G - 1, 1))  # minus the group's own sampling noise
            pairs += [(q, float(0 < x < 1)) for q, x in zip(p, a)]
        est.observe(t, r["groups"])
    p, a = np.concatenate(pre_p), np.concatenate(pre_a)
    out = {"err": float(np.abs(p - a).mean()), "r": float(np.corrcoef(p, a)[0, 1]) if p.std() > 0 else float("nan"),
           "baseline_share": baseline_share(p, a)}
    for rule, ps in picks.items():
        ch = np.concatenate(ps)
        out[rule] = (float(inform[ch].mean()), float((a0[ch] == 0).mean()))
    return out


def main(argv):
    torch.set_num_threads(1)  # tiny tensors: one thread, so that a busy machine does not stall every op
    args = dict(a.lstrip("-").split("=", 1) for a in argv)
    unknown = set(args) - {"runs", "methods", "estimators", "features", "rules", "oracle", "cache"}
    if unknown or "runs" not in args:
        raise SystemExit(f"estimator_replay: unknown {sorted(unknown)}" if unknown else __doc__)
    recs = records(args["runs"], args.get("methods", "paced,paced_replay_only").split(","))
    if not recs:
        raise SystemExit(f"estimator_replay: no records of those methods in {args['runs']}")
    with open(args.get("oracle", ORACLE)) as f:
        a0 = np.asarray(json.load(f)["acc"])
    feats = args.get("features", "-1:mean").split(",")
    ests = args.get("estimators", "online:1e-2").split(",")
    rules = args.get("rules", "nearest:0.5").split(",")
    emb = features(recs[0][1], feats, args.get("cache", "runs/estimator_features.pt"))
    inform = 1 - a0 ** recs[0][1]["group_size"] - (1 - a0) ** recs[0][1]["group_size"]
    print(f"{len(recs)} records; whole-data informative share {inform.mean():.2f}, never solved {(a0 == 0).mean():.2f}")
    print("| features | estimator | " + " | ".join(f"{r}: informative / never solved" for r in rules)
          + " | prequential err | r | baseline share of TB's gradient weight |")
    print("|---" * (5 + len(rules)) + "|")
    for f in feats:
        for e in ests:
            res = [score(cfg, rows, emb[f], e, rules, a0) for _, cfg, rows in recs]
            cell = lambda xs: f"{np.median(xs):.2f} [{min(xs):.2f}, {max(xs):.2f}]"  # noqa: E731
            print(f"| {f} | {e} | " + " | ".join(f"{cell([x[r][0] for x in res])} / {cell([x[r][1] for x in res])}" for r in rules)
                  + f" | {cell([x['err'] for x in res])} | {cell([x['r'] for x in res])} | "
                  f"{cell([x['baseline_share'] for x in res])} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
