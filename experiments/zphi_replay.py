"""Z_φ alone, retrained over a finished PACED-RL run's record: what other head settings do with the same data.

Each metrics row of a run logs the step's chosen prompts with their observed group accuracy a(x) (`groups`) and
how many replayed samples joined the update. In the one update of a step the fresh samples' log-ratio
log π_θ − log π_old is exactly 0 and replayed samples do not train Z_φ (the defaults), so the head's loss is
Σ_groups G·(p̂(x)/β − a(x)/β)² + const over the update's sample count: the head can be retrained here, without
the LM, in a second. With the run's own settings it reproduces the logged diagnostics (printed as a check);
with others it answers "would this head have saturated on these data?" on training prompts only:

- saturated: the share of all training prompts whose p̂ ends within 1e-3 of 0 or 1 (where the sigmoid's
  gradient vanishes for that prompt), and the most of it over the steps;
- prequential calibration: each step's p̂ before its update against the group's a (mean error, Pearson r),
  from step 1 on, beside the error of a running mean of earlier groups' accuracy (what a head must beat); under
  uniform selection (`paced_replay_only`) the prompts do not depend on the head, so every setting sees the data
  it would have seen.

    python -m experiments.zphi_replay --run=runs/smollm2_study/paced_replay_only_s0
    python -m experiments.zphi_replay --trap --settings=sigmoid@1e-2:96:0.5,logistic@1e-2:96:0.5
    python -m experiments.zphi_replay --run=results/smollm2_study/runs/paced_replay_only_s0 --settings=1e-2:96:0.5,1e-2:96:1

A setting is [output@]lr:ref_fan_in:power[:weight_decay]: the head's output form (`--logz_output`; default the
run's own), each linear layer at lr·(ref_fan_in/fan_in)^power (power 0.5 is `--logz_lr_fan_in`'s rule, ref_fan_in 0
one lr everywhere), with AdamW's decoupled weight decay (default 0, the loop's). e(x) comes from <run>/prompt_emb.pt, or is computed from the run's model and data as the loop does.
"""

import json
import os
import sys
import tempfile

import numpy as np
import torch

import paced_rl
from config import Config
from experiments.compare import run_config, saturated_share
from metrics import calibration


def load_record(run: str):
    """(config dict, metrics rows) of a finished run; refused where the head's data are not in the record."""
    cfg = run_config(run)
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rows = [r for r in (json.loads(line) for line in f if line.strip()) if "loss" in r]
    if cfg.get("algo", "paced") != "paced" or not rows or not rows[0].get("groups"):
        raise SystemExit(f"zphi_replay: {run} is not a PACED-RL run that logs its groups")
    if cfg.get("updates_per_batch", 1) != 1 or cfg.get("replay_trains_logz") not in (None, False, "off"):
        raise SystemExit(f"zphi_replay: {run}: only runs with one update per batch and replay not training Z_φ are "
                         "replayed (the head's data are not in the record otherwise)")
    return cfg, rows


def train_embeddings(run: str, cfg: dict) -> torch.Tensor:
    """e(x) of the training prompts (N, D), from the run's cache or computed as the loop computes it."""
    path = os.path.join(run, "prompt_emb.pt")
    cached = torch.load(path) if os.path.exists(path) else None
    if cached is not None and "train" in cached:  # the layout of runs recorded before the cache held one tensor
        return cached["train"]
    from data import load_data
    from distributed import Ranks

    # the fields e(x) depends on (a record's other fields may predate the present Config's choices)
    c = Config(**{k: cfg[k] for k in ("model", "train_data", "eval_data", "prompt_field", "answer_field", "eval_prompt_field",
                                       "eval_answer_field", "prompt_suffix", "shot_prompt", "shot_response", "verifier",
                                       "max_prompt_tokens", "logz_features", "logz_layer", "eval_batch") if k in cfg})
    prompts = load_data(c, lambda *a: None)
    if cached is not None:
        return cached["emb"][:len(prompts.train.toks)]
    with tempfile.TemporaryDirectory() as d:
        c.out_dir = d
        emb = paced_rl.frozen_embeddings(c, prompts.tokenizer.pad_token_id, prompts.train.toks + prompts.heldout.toks,
                                         torch.float32, Ranks(0, 1, torch.device("cpu")))
    return emb[:len(prompts.train.toks)]


def replay(cfg: dict, rows: list, emb: torch.Tensor, lr: float, ref_fan_in: int, power: float, wd: float = 0.0,
           output: str = None) -> list:
    """Retrain a fresh head (the run's seed, width and init; its output form unless `output` is given) on the
    record's groups; per-step diagnostics."""
    torch.manual_seed(cfg["seed"])  # the loop seeds just before building the head: the same initial φ
    head = paced_rl.LogZHead(emb.size(1), cfg["logz_hidden"], cfg["beta"], cfg["logz_init_acc"],
                             output or cfg.get("logz_output", "sigmoid"))
    head.set_normalization(emb)
    layers = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    scale = (lambda m: (ref_fan_in / m.in_features) ** power) if ref_fan_in > 0 else (lambda m: 1.0)  # noqa: E731
    opt = torch.optim.AdamW([{"params": list(m.parameters()), "lr": lr * scale(m), "weight_decay": wd} for m in layers])
    G, beta, out = cfg["group_size"], cfg["beta"], []
    for r in rows:
        idx = torch.tensor([g[0] for g in r["groups"]])
        a = torch.tensor([g[1] for g in r["groups"]], dtype=torch.float32)
        p_before = head.p_hat(emb[idx]).detach()
        denom = len(idx) * G + r.get("replayed", 0)  # the update's sample count (replayed samples add to it)
        loss = (G * (head.value(emb[idx]) / beta - a / beta) ** 2).sum() / denom
        opt.zero_grad()
        loss.backward()
        gnorm = float(torch.nn.utils.clip_grad_norm_(head.parameters(), float("inf")))
        opt.step()
        with torch.no_grad():
            raw, p_all = head.raw(emb[idx]), head.p_hat(emb)
        out.append({"step": r["step"], "p_before": p_before.numpy(), "a": a.numpy(), "grad_norm": gnorm,
                    "raw_min": float(raw.min()), "raw_max": float(raw.max()),
                    "saturated": saturated_share(p_all.numpy())})
    return out


def trap(output: str, lr: float, ref_fan_in: int = 96, power: float = 0.5, seed: int = 0, dim: int = 576,
         width: int = 1024, n: int = 64, steps: int = 40, zero_steps: int = 3, beta: float = 0.05) -> list:
    """The trap in isolation: features in two clusters of n prompts (dim wide, as SmolLM2's), a head of `width`
    trained on the TB loss's Z_φ term (log π_θ − log π_old = 0) over uniformly chosen groups of 8 prompts × 8
    samples; cluster 0 is all wrong for `zero_steps` steps, then at accuracy 0.6; cluster 1 at 0.5 throughout.
    Returns each step's mean p̂ of the two clusters after its update: [(cluster 0, cluster 1), ...]."""
    B, G = 8, 8
    g = torch.Generator().manual_seed(1000 + seed)
    centers = torch.randn(2, dim, generator=g) * 3
    emb = torch.cat([centers[c] + torch.randn(n, dim, generator=g) for c in (0, 1)])
    torch.manual_seed(seed)
    head = paced_rl.LogZHead(dim, width, beta, 0.5, output)
    head.set_normalization(emb)
    layers = [m for m in head.net if isinstance(m, torch.nn.Linear)]
    scale = (lambda m: (ref_fan_in / m.in_features) ** power) if ref_fan_in > 0 else (lambda m: 1.0)  # noqa: E731
    opt = torch.optim.AdamW([{"params": list(m.parameters()), "lr": lr * scale(m), "weight_decay": 0.0} for m in layers])
    rng, out = np.random.default_rng(seed), []
    for t in range(steps):
        idx = torch.as_tensor(rng.choice(2 * n, B, replace=False))
        acc = np.where(idx.numpy() < n, 0.0 if t < zero_steps else 0.6, 0.5)
        r = torch.as_tensor(rng.random((B, G)) < acc[:, None], dtype=torch.float32)
        loss = ((head(emb[idx])[:, None] - r / beta) ** 2).sum() / (B * G)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            p = head.p_hat(emb)
        out.append((float(p[:n].mean()), float(p[n:].mean())))
    return out


def deviation(steps: list, rows: list) -> float:
    """The largest difference between a replay and the run's logged diagnostics (raw output range after each
    update; the head's gradient norm, relative): about 1e-5 for the run's own setting."""
    return max(max(abs(x["raw_min"] - r["logz_raw_min"]), abs(x["raw_max"] - r["logz_raw_max"]),
                   abs(x["grad_norm"] - r["logz_grad_norm"]) / max(r["logz_grad_norm"], 1e-12))
               for x, r in zip(steps, rows) if r.get("logz_raw_min") is not None)


def summary(steps: list) -> dict:
    p = np.concatenate([s["p_before"] for s in steps[1:]])
    a = np.concatenate([s["a"] for s in steps[1:]])
    c = calibration(p, a)
    return {"saturated_end": steps[-1]["saturated"], "saturated_max": max(s["saturated"] for s in steps),
            "raw_min": min(s["raw_min"] for s in steps), "err": c["acc_est_abs_err"], "r": c["acc_est_corr"]}


def running_mean_error(rows: list) -> float:
    """The reference a head has to beat: the mean abs error of predicting each step's groups by the mean observed
    accuracy of all earlier groups (from step 1 on, as the prequential error)."""
    acc = [np.array([g[1] for g in r["groups"]], float) for r in rows]
    return float(np.mean(np.concatenate([np.abs(acc[i] - np.concatenate(acc[:i]).mean()) for i in range(1, len(acc))])))


def main(argv):
    args = dict((a.lstrip("-").split("=", 1) + [""])[:2] for a in argv)
    unknown = set(args) - {"run", "settings", "trap"}
    if unknown or not ("run" in args or "trap" in args):
        raise SystemExit(f"zphi_replay: unknown {sorted(unknown)}" if unknown else __doc__)
    if "trap" in args:
        for s in args.get("settings", "sigmoid@1e-2:96:0.5").split(","):
            output, _, numbers = s.rpartition("@")
            lr, ref, power = (numbers.split(":") + ["96", "0.5"])[:3]
            for seed in (0, 1, 2):
                h = trap(output or "sigmoid", float(lr), int(ref), float(power), seed)
                back = next((t for t in range(3, len(h)) if h[t][0] > 0.3), None)
                print(f"{s} seed {seed}: cluster 0's mean p̂ at steps 2/5/10/20/39 "
                      + " ".join(f"{h[t][0]:.2f}" for t in (2, 5, 10, 20, 39)) + f"; above 0.3 first at step {back}")
        return
    cfg, rows = load_record(args["run"])
    emb = train_embeddings(args["run"], cfg)
    own_output = cfg.get("logz_output", "sigmoid")
    own = (float(cfg["logz_lr"]), int(cfg.get("logz_lr_fan_in", 0)), 0.5, 0.0, own_output)
    settings = args.get("settings", ":".join(map(str, own[:4]))).split(",")
    print(f"reference: the running mean of earlier groups' accuracy has prequential error {running_mean_error(rows):.3f}")
    for s in settings:
        output, _, numbers = s.rpartition("@")
        lr, ref, power, wd = (numbers.split(":") + ["0"])[:4]
        setting = (float(lr), int(ref), float(power), float(wd), output or own_output)
        steps = replay(cfg, rows, emb, *setting)
        if setting == own:  # the check: the run's own setting gives the logged diagnostics
            print(f"{s}: the run's own setting; largest deviation from the logged diagnostics {deviation(steps, rows):.2e}")
        m = summary(steps)
        r = "–" if m["r"] is None else f"{m['r']:.2f}"
        print(f"{s}: saturated share of {emb.size(0)} training prompts at the end {m['saturated_end']:.2f} (max "
              f"{m['saturated_max']:.2f}), lowest raw output {m['raw_min']:.1f}, prequential error {m['err']:.3f}, r {r}")
        print("   saturated by step: " + " ".join(f"{x['saturated']:.2f}" for x in steps))


if __name__ == "__main__":
    main(sys.argv[1:])
