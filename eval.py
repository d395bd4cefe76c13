"""Evaluation: held-out accuracy (sampled and greedy), pass@k, the calibration of p̂ = β·log Z_φ, and
the comparison of methods over seeds.

    python eval.py --run=runs/paced              # newest checkpoint of a run, and its initial model
    python eval.py --model=testbed/model         # any HF model on the run config's held-out data
    python eval.py --preset=paper_math_1.5b --model=<ckpt>/model --eval_data=HuggingFaceH4/aime_2024 --eval_samples=32
    python eval.py --compare=runs/compare        # runs named <method>_s<seed>: table.md and plots
    python eval.py --compare=runs/a,runs/b --out=runs/ab   # any finished runs, or directories of them
    python eval.py --agree=runs/one,runs/two                # where two runs of one config part (1 vs 2 processes)

Reports mean accuracy over `eval_samples` samples per prompt (the paper: 32 for AIME), greedy
accuracy, pass@k for k = 1, 2, 4, ... up to eval_samples (the unbiased estimator of Chen et al.),
the number of distinct correct responses per prompt (diversity, where a task admits several; the
testbed's sums have one), and for a PACED-RL checkpoint the calibration of p̂ (mean |p̂ − a|, Pearson
correlation, and a reliability plot, <run>/reliability.png).

Evaluation is sharded over all ranks (each rank samples its share of the prompts, then one gather),
so it runs the same under `torchrun`. Each held-out prompt's sampling noise is seeded by the prompt,
so two evaluations of the same model see the same noise and differences between checkpoints are
not sampling luck.
"""

import dataclasses
import json
import os
import sys

import numpy as np
import torch

import config
import paced_rl
import verify
from checkpoint import ckpt_dirs
from data import encode_prompts, load_prompts
import distributed
from distributed import gather, print0, setup_distributed, teardown
from rollout import rollout, seed_of
from scheduler import all_equal_share


def pearson(a, b):
    """Pearson correlation, or None where undefined (fewer than 2 points, or a constant input)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or a.std() == 0 or b.std() == 0:
        return None  # logged as null, never as a made-up number
    return float(np.corrcoef(a, b)[0, 1])


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021):
    1 − C(n−c, k)/C(n, k), computed as a product so that large n does not overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_ks(n: int, correct) -> dict:
    """{k: mean pass@k over prompts} for k = 1, 2, 4, ... up to n."""
    ks = [2 ** i for i in range(int(np.log2(n)) + 1)]
    return {k: float(np.mean([pass_at_k(n, int(c), k) for c in correct])) for k in ks}


def distinct_correct(texts, rewards) -> int:
    """How many different correct responses (whitespace-normalized) a prompt's samples hold."""
    return len({" ".join(t.split()) for t, r in zip(texts, rewards) if r == 1.0})


def reliability_bins(p_hat, acc, bins: int = 10) -> list:
    """The reliability diagram's data: p̂ cut into `bins` equal-width bins on [0, 1]; for each non-empty
    bin (lo, hi, count, mean p̂, mean observed accuracy). A calibrated p̂ has mean p̂ ≈ mean accuracy."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    which = np.clip((p_hat * bins).astype(int), 0, bins - 1)
    return [(b / bins, (b + 1) / bins, int((which == b).sum()), float(p_hat[which == b].mean()),
             float(acc[which == b].mean())) for b in range(bins) if (which == b).any()]


def _pyplot():
    """matplotlib's pyplot without a display (imported only when a plot is written)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_reliability(series: dict, path: str, title: str = ""):
    """One reliability curve per label: series = {label: (p_hat, acc)}; writes a PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], color="grey", lw=1, ls="--", label="calibrated")
    for label, (p, a) in series.items():
        rows = reliability_bins(p, a)
        ax.plot([r[3] for r in rows], [r[4] for r in rows], marker="o", label=label)
    ax.set(xlabel="estimated accuracy p̂ = β·log Z_φ (bin mean)", ylabel="observed accuracy (bin mean)",
           xlim=(0, 1), ylim=(0, 1), title=title or "held-out calibration of p̂")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_check(p_hat, acc, group_size: int, tau: float = 0.5, frac: float = 0.25) -> dict:
    """What selecting by p̂ buys, on prompts with known accuracy a: the expected share of groups of G
    samples whose rewards are all equal (a^G + (1 − a)^G, no learning signal) when the `frac` of the
    prompts nearest τ are chosen by p̂, by the true a (an oracle scheduler), or uniformly."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    k = max(1, int(round(frac * acc.size)))
    nearest = lambda score: acc[np.argsort(np.abs(score - tau), kind="stable")[:k]]  # noqa: E731
    return {"uniform": all_equal_share(acc, group_size), "by_p_hat": all_equal_share(nearest(p_hat), group_size),
            "oracle": all_equal_share(nearest(acc), group_size)}


def calibration(p_hat, acc) -> dict:
    """How well p̂ estimates the observed per-prompt accuracy a."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    return {"acc_est_corr": pearson(p_hat, acc), "acc_est_abs_err": float(np.abs(p_hat - acc).mean())}


@dataclasses.dataclass
class Sampled:
    """Per-prompt results of sampled_accuracy, in prompt order."""
    acc: np.ndarray  # share of correct samples
    distinct: np.ndarray  # distinct correct responses
    formatted: np.ndarray = None  # share of samples with a parseable final answer (verifiers with a format check)


@torch.no_grad()
def sampled_accuracy(lm, tokenizer, toks, answers, fn, cfg, device, rank, world, n_samples, temperature) -> Sampled:
    """Per-prompt accuracy over `n_samples` samples (temperature 0: one greedy sample), for every
    prompt in `toks`, in order, with the distinct correct responses and (where the verifier has a format
    check, `fn.has_answer`) the share of well-formed ones; the work is sharded over ranks and gathered."""
    n = 1 if temperature == 0 else n_samples
    sub = dataclasses.replace(cfg, group_size=n)
    has_answer = getattr(fn, "has_answer", None)
    mine = list(range(rank, len(toks), world))
    n_mine = len(mine)
    mine += [mine[0] if mine else 0] * (-(-len(toks) // world) - n_mine)  # equal shards: a sharded model needs lockstep
    recs = []
    for i in range(0, len(mine), cfg.eval_batch):
        idx = mine[i:i + cfg.eval_batch]
        seeds = [seed_of(cfg.seed, 1, j) for j in idx]
        texts = rollout(lm, tokenizer, [toks[j] for j in idx], seeds, sub, device, temperature)[-1]
        for k, j in enumerate(idx):
            if i + k >= n_mine:
                break  # padding of this rank's shard: not scored
            mine_texts = texts[k * n:(k + 1) * n]
            r, _ = verify.score(fn, mine_texts, [answers[j]] * n, cfg.verifier_workers)
            fmt = sum(map(has_answer, mine_texts)) / n if has_answer else 0.0
            recs.append((j, sum(r) / n, distinct_correct(mine_texts, r), fmt))
    recs = sorted(sum(gather(recs, world), []))
    col = lambda c: np.array([rec[c] for rec in recs])  # noqa: E731
    return Sampled(col(1), col(2), col(3) if has_answer else None)


def heldout_metrics(policy, tokenizer, toks, answers, verifier, emb, cfg, device, rank, world, final_path=None,
                    exact_fn=None) -> dict:
    """Held-out accuracy over eval_samples samples per prompt, pass@k, and (PACED-RL, emb = e(x) of the
    held-out prompts) the calibration of p̂. exact_fn() -> (exact accuracies, pruned mass) on the testbed:
    their mean, its error bound, and p̂'s correlation with them. final_path: also write the per-prompt values there (JSON,
    atomically), which eval.py --compare plots."""
    n = cfg.eval_samples
    res = sampled_accuracy(policy.lm, tokenizer, toks, answers, verifier, cfg, device, rank, world, n, cfg.temperature)
    acc = res.acc
    out = {"eval_acc": float(acc.mean()), "eval_pass_at_k": {str(k): v for k, v in pass_at_ks(n, np.rint(acc * n)).items()}}
    if res.formatted is not None:
        out["eval_format_rate"] = float(res.formatted.mean())
    if cfg.eval_greedy:
        greedy = sampled_accuracy(policy.lm, tokenizer, toks, answers, verifier, cfg, device, rank, world, 1, 0.0)
        out["eval_acc_greedy"] = float(greedy.acc.mean())
    p_hat = None
    if emb is not None:
        with torch.no_grad():
            p_hat = (cfg.beta * policy.logz(emb.to(device))).cpu().numpy()
        out.update({"eval_" + k: v for k, v in calibration(p_hat, acc).items()})
    exact, gap = exact_fn() if exact_fn is not None else (None, None)
    if exact is not None:  # the exact accuracy lies in [eval_acc_exact, eval_acc_exact + eval_acc_exact_gap]
        out.update({"eval_acc_exact": float(exact.mean()), "eval_acc_exact_gap": float(gap.mean())})
        out["eval_acc_est_corr_exact"] = pearson(p_hat, exact) if p_hat is not None else None
    if final_path and rank == 0:
        with open(final_path + ".tmp", "w") as f:
            json.dump({"samples": n, "acc": acc.tolist(), "p_hat": None if p_hat is None else p_hat.tolist(),
                       "acc_exact": None if exact is None else exact.tolist()}, f)
        os.replace(final_path + ".tmp", final_path)
    return out


# ----------------------------------------------------------------------------- comparing runs


def eval_curve(rows: list, key: str = "eval_acc") -> list:
    """[(rollouts spent, held-out accuracy)] from a run's metrics rows. The evaluation logged with step s
    runs before that step's rollouts, so it is charged the rollouts of steps 0..s−1; the final row's, all.
    key: the accuracy metric (eval_acc_exact on the testbed: no sampling noise)."""
    curve, spent = [], 0
    for r in rows:
        if r.get(key) is not None:
            curve.append((r["rollouts"] if "loss" not in r else spent, r[key]))
        spent = r.get("rollouts", spent)
    return curve


def rollouts_to_reach(curve: list, target: float):
    """Rollouts at which the accuracy curve first reaches `target`, interpolated linearly between
    evaluations; None if it never does."""
    for i, (r, a) in enumerate(curve):
        if a >= target:
            if i == 0:
                return float(r)
            r0, a0 = curve[i - 1]
            return float(r0 + (target - a0) / (a - a0) * (r - r0))
    return None


def load_runs(paths: str) -> dict:
    """{method: [run, ...]} from comma-separated paths, each a finished run directory (one with
    heldout_final.json) or a directory of them. A run named <method>_s<seed> joins its method's seeds;
    any other run is a method of its own. Each run: its metrics rows, final per-prompt held-out values
    and config."""
    import re

    dirs = []
    for p in paths.split(","):
        if os.path.exists(os.path.join(p, "heldout_final.json")):
            dirs.append(os.path.normpath(p))
        elif os.path.isdir(p):
            dirs += [os.path.join(p, d) for d in sorted(os.listdir(p)) if os.path.exists(os.path.join(p, d, "heldout_final.json"))]
    runs = {}
    for path in sorted(dirs):
        m = re.fullmatch(r"(.+)_s(\d+)", os.path.basename(path))
        with open(os.path.join(path, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(path, "heldout_final.json")) as f:
            final = json.load(f)
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        name = m.group(1) if m else os.path.basename(path)
        runs.setdefault(name, []).append({"seed": cfg.get("seed"), "rows": rows, "final": final, "config": cfg})
    return runs


def _stat(xs, fmt="{:.3f}"):
    """'median [min, max]' over seeds; a value missing for some seed (never reached) counts as above every other."""
    if not xs:
        return "–"
    known = sorted(x for x in xs if x is not None)
    if len(known) < len(xs):
        med = sorted(xs, key=lambda x: (x is None, x or 0))[len(xs) // 2]
        med_s = "not reached" if med is None else fmt.format(med)
        return f"{med_s} [{fmt.format(known[0]) if known else '–'}, not reached by {len(xs) - len(known)}]"
    return f"{fmt.format(float(np.median(known)))} [{fmt.format(known[0])}, {fmt.format(known[-1])}]"


def by_level(runs: dict) -> list:
    """Markdown lines: each method's final held-out accuracy per `level` of the held-out rows (the smollm2
    task's difficulty levels), median over seeds; [] where a run's held-out file is gone or has no levels."""
    levels = None
    for rs in runs.values():
        for r in rs:
            path = r["config"].get("eval_data", "")
            if not os.path.isfile(path):
                return []
            with open(path) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if len(rows) != len(r["final"]["acc"]) or any("level" not in x for x in rows):
                return []
            mine = [x["level"] for x in rows]
            if levels not in (None, mine):
                return []  # runs on different held-out sets: no common breakdown
            levels = mine
    if not levels:
        return []
    names = list(dict.fromkeys(levels))
    counts = {n: levels.count(n) for n in names}
    lines = ["", "Final held-out accuracy by difficulty level (the held-out rows' `level`; median over seeds):", "",
             "| method | " + " | ".join(f"{n} ({counts[n]})" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for m, rs in runs.items():
        acc = [{n: float(np.mean([a for a, lv in zip(r["final"]["acc"], levels) if lv == n])) for n in names} for r in rs]
        lines.append(f"| {m} | " + " | ".join(f"{np.median([a[n] for a in acc]):.3f}" for n in names) + " |")
    return lines


def compare(root: str, out: str, targets=("grpo", "flowrl", "paced_replay_only"), focus: str = "paced") -> str:
    """The comparison table (markdown, also written to <out>/table.md) and two PNGs: held-out accuracy
    against rollouts (<out>/accuracy_vs_rollouts.png) and p̂'s reliability (<out>/reliability.png).
    A target's accuracy is the baseline's final held-out accuracy, median over its seeds; the ratio
    is the median rollouts `focus` needs to reach it over the median the baseline needs."""
    plt = _pyplot()
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"compare: no finished runs (directories with heldout_final.json) in {root}")
    order = ["grpo", "grpo_dynamic", "flowrl", "paced_select_only", "paced_replay_only", "paced"]
    runs = dict(sorted(runs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    os.makedirs(out, exist_ok=True)
    final_acc = {m: float(np.median([np.mean(r["final"]["acc"]) for r in rs])) for m, rs in runs.items()}
    targets = [t for t in targets if t in runs]
    reach = {m: {t: [rollouts_to_reach(eval_curve(r["rows"]), final_acc[t]) for r in rs] for t in targets}
             for m, rs in runs.items()}

    def med_reach(m, t):
        xs = reach[m][t]
        return None if sum(x is None for x in xs) * 2 > len(xs) else float(np.median([x if x is not None else np.inf for x in xs]))

    head = ["method", "seeds", "final pass@1", "final pass@8"]
    head += [f"rollouts to {t}'s {final_acc[t]:.3f}" for t in targets]
    head += ["step time (s)", "p̂ corr (held-out)", "mean abs(p̂ − a)"]
    # a real model's columns (the smollm2 preset): greedy accuracy and the answer format, start → final; β·KL
    real = [k for k in ("eval_acc_greedy", "eval_format_rate") if all(k in r["rows"][-1] for rs in runs.values() for r in rs)]
    if real:
        head += ["pass@1 at step 0"] + [{"eval_acc_greedy": "greedy acc, step 0 → final",
                                         "eval_format_rate": "format rate, step 0 → final"}[k] for k in real] + ["mean β·KL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, rs in runs.items():
        finals = [r["rows"][-1] for r in rs]
        p1 = [f["eval_pass_at_k"]["1"] for f in finals]
        p8 = [f["eval_pass_at_k"].get("8") for f in finals]
        cells = [m, str(len(rs)), _stat(p1), _stat(p8) if None not in p8 else "–"]
        cells += [_stat(reach[m][t], "{:,.0f}") for t in targets]
        cells.append(_stat([float(np.mean([x["step_s"] for x in r["rows"] if "step_s" in x])) for r in rs]))
        corr = [f.get("eval_acc_est_corr") for f in finals]
        err = [f.get("eval_acc_est_abs_err") for f in finals]
        cells += [_stat(corr, "{:.2f}") if None not in corr else "–", _stat(err) if None not in err else "–"]
        if real:
            first = [next(x for x in r["rows"] if "eval_pass_at_k" in x) for r in rs]
            cells.append(_stat([f["eval_pass_at_k"]["1"] for f in first]))
            cells += [f"{_stat([f.get(k) for f in first])} → {_stat([f[k] for f in finals])}" for k in real]
            kl = [np.mean(v) for r in rs if (v := [x["beta_kl"] for x in r["rows"] if x.get("beta_kl") is not None])]
            cells.append(_stat([float(x) for x in kl], "{:.1e}") if kl else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if focus in runs:
        lines.append("")
        for t in targets:
            a, b = med_reach(focus, t), med_reach(t, t)
            if not b:
                lines.append(f"- {t}'s median final accuracy {final_acc[t]:.3f} is "
                             + ("not reached by its own median seed" if b is None else "no higher than at the start") + ": no ratio")
            elif a is None:
                lines.append(f"- {focus} does not reach {t}'s final held-out accuracy {final_acc[t]:.3f} "
                             f"(in the median over seeds) within its {max(r['rows'][-1]['rollouts'] for r in runs[focus]):,} rollouts")
            else:
                lines.append(f"- {focus} reaches {t}'s final held-out accuracy {final_acc[t]:.3f} in {a / b:.2f}× the rollouts "
                             f"{t} needs ({a:,.0f} vs {b:,.0f}; medians over seeds)")
    with_p_hat = {m: rs for m, rs in runs.items() if all(r["final"]["p_hat"] is not None for r in rs)}  # PACED-RL runs
    checks = {m: [selection_check(r["final"]["p_hat"], r["final"]["acc"], r["config"].get("group_size", 8),
                                  r["config"].get("tau", 0.5)) for r in rs] for m, rs in with_p_hat.items()}
    if checks:
        lines += ["", "Selection check on the held-out prompts at the end (`eval.selection_check`): the expected share of "
                  "groups with all-equal rewards when a quarter of the prompts is chosen nearest τ by p̂, by the true "
                  "accuracy (an oracle), or uniformly; median over seeds.", "",
                  "| method | uniform | nearest τ by p̂ | nearest τ by true accuracy |", "|---|---|---|---|"]
        for m, cs in checks.items():
            lines.append(f"| {m} | " + " | ".join(f"{np.median([c[k] for c in cs]):.3f}" for k in ("uniform", "by_p_hat", "oracle")) + " |")
    lines += by_level(runs)
    table = "\n".join(lines) + "\n"
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in runs.items():
        curves = [eval_curve(r["rows"]) for r in rs]
        n = min(len(c) for c in curves)
        x = np.median([[p[0] for p in c[:n]] for c in curves], 0)
        ys = np.array([[p[1] for p in c[:n]] for c in curves])
        (line,) = ax.plot(x, np.median(ys, 0), label=f"{m} (median of {len(rs)})")
        ax.fill_between(x, ys.min(0), ys.max(0), color=line.get_color(), alpha=0.15)
    ax.set(xlabel="rollouts (sampled responses, all of them counted)", ylabel="held-out accuracy (pass@1)",
           title="held-out accuracy against rollouts (band: min–max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_rollouts.png"), dpi=120)
    plt.close(fig)
    series = {m: (np.concatenate([r["final"]["p_hat"] for r in rs]), np.concatenate([r["final"]["acc"] for r in rs]))
              for m, rs in with_p_hat.items()}
    if series:
        plot_reliability(series, os.path.join(out, "reliability.png"), "held-out calibration of p̂ at the end (all seeds)")
    return table


def main(argv):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "agree" in args:
        out = distributed.agreement(*args["agree"].split(","))
        print(json.dumps(out))
        return out
    if "compare" in args:
        table = compare(args["compare"], args.get("out", args["compare"]))
        print(table, end="")
        return table
    run, model = args.pop("run", None), args.pop("model", None)
    if not run and not model:
        raise SystemExit("usage: python eval.py --run=<out_dir> | --model=<hf id or path> | --compare=<dir> [--key=value ...]")
    base = {}
    if run:
        with open(os.path.join(run, "config.json")) as f:
            base = {k: v for k, v in json.load(f).items() if k in {x.name for x in dataclasses.fields(config.Config)}}
    overrides = config.parse_args([f"--{k}={v}" for k, v in args.items()])
    cfg = config.make_config({**base, **overrides})
    rank, world, device = setup_distributed(cfg)
    log = lambda *a: print0(*a, rank=rank)  # noqa: E731
    rows = load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field,
                              cfg.eval_answer_field or cfg.answer_field, cfg.verifier)
    fn = verify.get_verifier(cfg.verifier)
    targets = []  # (name, model dir, state.pt or None)
    if run:
        ck = ckpt_dirs(run)
        targets.append(("initial", cfg.model, None))
        if ck:
            targets.append((ck[-1], os.path.join(run, ck[-1], "model"), os.path.join(run, ck[-1], "state.pt")))
    else:
        targets.append((model, model, None))
    table = []
    for name, path, state in targets:
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        toks = encode_prompts(tok, rows, lambda *a: None, cfg.prompt_suffix, (cfg.shot_prompt, cfg.shot_response))
        lm = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        answers = [r["answer"] for r in rows]
        res = sampled_accuracy(lm, tok, toks, answers, fn, cfg, device, rank, world, cfg.eval_samples, cfg.temperature)
        acc, distinct = res.acc, res.distinct
        greedy = sampled_accuracy(lm, tok, toks, answers, fn, cfg, device, rank, world, 1, 0.0).acc
        row = {"model": name, "sampled": float(acc.mean()), "greedy": float(greedy.mean()),
               "mid_frac": float(((acc > 0.1) & (acc < 0.9)).mean()), "distinct": float(distinct.mean()),
               "pass_at_k": pass_at_ks(cfg.eval_samples, np.rint(acc * cfg.eval_samples))}
        if state and cfg.algo == "paced":  # calibration of p̂ on these prompts: e(x) from the initial model, as in training
            st = torch.load(state, weights_only=False)
            base = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
            emb = paced_rl.prompt_embeddings(base, toks, tok.pad_token_id, cfg.eval_batch, device, cfg.logz_features)
            del base
            head = paced_rl.LogZHead(emb.size(1), cfg.logz_hidden, cfg.beta, cfg.logz_init_acc, cfg.logz_output)
            head.load_state_dict(st["logz"])
            with torch.no_grad():
                p_hat = (cfg.beta * head(emb)).numpy()
            row.update(calibration(p_hat, acc))
            if rank == 0:
                plot_reliability({name: (p_hat, acc)}, os.path.join(run, "reliability.png"))
        table.append(row)
    log(f"held-out: {cfg.eval_data} ({len(rows)} prompts, {cfg.eval_samples} samples at T={cfg.temperature}, greedy)")
    ks = list(table[0]["pass_at_k"])
    log("| model | sampled acc | greedy acc | " + " | ".join(f"pass@{k}" for k in ks)
        + " | distinct correct / prompt | prompts with 0.1<acc<0.9 | p̂ corr | mean abs(p̂−a) |")
    log("|---" * (7 + len(ks)) + "|")
    for r in table:
        c, e = r.get("acc_est_corr"), r.get("acc_est_abs_err")
        log(f"| {r['model']} | {r['sampled']:.3f} | {r['greedy']:.3f} | "
            + " | ".join(f"{r['pass_at_k'][k]:.3f}" for k in ks)
            + f" | {r['distinct']:.2f} | {r['mid_frac']:.2f} | {'' if c is None else f'{c:.2f}'} | {'' if e is None else f'{e:.3f}'} |")
    teardown(world)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
