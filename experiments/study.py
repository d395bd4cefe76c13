"""The scheduling study's table and plot, from the runs that study.sh made.

    python -m experiments.study --root=runs/study --out=results     # results/study_table.md, results/study_savings.png

For each regime (a directory of runs named <method>_s<seed>) and method, over seeds (median [min, max]):
the final held-out exact accuracy; the rollouts each seed needs to reach GRPO's median final exact
accuracy, as a ratio to GRPO's median (interpolated between evaluations; "–" where a seed never
reaches it); the share of the oracle's savings captured, (R_GRPO − R_method) / (R_GRPO − R_oracle),
with the oracle of the same loss (GRPO's for the GRPO-loss methods, the TB oracle for the TB ones);
the selection quality (mean over steps of the expected all-equal share among the chosen prompts, and
of the Pearson r between prediction and exact accuracy over the pool); the step time; and, on the
testbed, the final exact accuracy by difficulty bucket (the longer operand's digits). A directory
named <regime>_<variant> (high_pool1024, mid_zphi) is measured against <regime>'s GRPO, oracles and
PACED-RL where it has none of its own. A summary row per regime opens the table: the oracle's ratio,
PACED-RL's and the best other predictor's, and the share of the oracle's savings each captures.

Under each regime's table, the registered rule's verdicts (RESULTS.md): A beats B when A's whole seed range of
the rollout ratio lies below B's, or A reaches the target in more seeds; anything else is a tie. Where
GRPO's median final accuracy is at or below where every run starts (it lost accuracy), no run needs any
rollouts to reach it and the ratio is undefined; the table says so and, marked post hoc, compares final
accuracy at the same rollout budget instead (A beats B when A's lowest seed ends above B's highest).
"""

import json
import os
import re
import sys

import numpy as np

from eval import pyplot
from experiments.compare import eval_curve, load_runs, median_reached, rollouts_to_reach, seed_stat

ORACLE_OF = {"grpo": "grpo_oracle", "grpo_dynamic": "grpo_oracle", "grpo_history": "grpo_oracle", "grpo_oracle": "grpo_oracle",
             "paced": "tb_oracle", "tb_history": "tb_oracle", "tb_regress": "tb_oracle", "tb_hybrid": "tb_oracle",
             "tb_oracle": "tb_oracle"}
KEY = "eval_acc_exact"


_PROMPTS = {}


def digits_of(prompt: str):
    """The testbed's difficulty bucket of "a+b=": the digits of the longer operand (None for other prompts)."""
    m = re.fullmatch(r"(\d+)\+(\d+)=", prompt)
    return max(len(m.group(1)), len(m.group(2))) if m else None


def by_digits(run) -> dict:
    """{digits: mean final exact accuracy} over the run's held-out prompts, by bucket; {} where unknown."""
    path, acc = run["config"].get("eval_data"), run["final"].get("acc_exact")
    if not path or acc is None or not os.path.exists(path):
        return {}
    if path not in _PROMPTS:
        with open(path) as f:
            _PROMPTS[path] = [digits_of(json.loads(line)["prompt"]) for line in f if line.strip()]
    d = _PROMPTS[path]
    if len(d) != len(acc) or None in d:
        return {}
    return {k: float(np.mean([a for a, x in zip(acc, d) if x == k])) for k in sorted(set(d))}


def _mean_of(rows, k):
    v = [r[k] for r in rows if r.get(k) is not None]
    return float(np.mean(v)) if v else None


def summarize_regime(runs: dict) -> dict:
    """{method: figures} for one regime's runs ({method: [run, ...]} as compare.load_runs gives them)."""
    per = {}
    for m, rs in runs.items():
        steps = [[r for r in run["rows"] if "loss" in r] for run in rs]
        curves = [eval_curve(run["rows"], KEY) for run in rs]  # [(rollouts, exact accuracy)]
        per[m] = {"curves": curves, "final": [c[-1][1] for c in curves], "start": [c[0][1] for c in curves],
                  "rollouts": [c[-1][0] for c in curves], "by_digits": [by_digits(run) for run in rs],
                  "pool": [run["config"].get("pool_size") for run in rs],
                  "sel_equal": [_mean_of(s, "sel_equal_share") for s in steps],
                  "corr": [_mean_of(s, "sel_pred_corr_exact") for s in steps],
                  "uniform_equal": [_mean_of(s, "pool_equal_share") for s in steps],
                  "step_s": [_mean_of(s, "step_s") for s in steps]}
    if "grpo" not in per:
        return per
    target = float(np.median(per["grpo"]["final"]))
    per["grpo"]["target"] = target
    for f in per.values():
        f["reach"] = [rollouts_to_reach(c, target) for c in f["curves"]]
    r_grpo = median_reached(per["grpo"]["reach"])
    for m, f in per.items():
        f["ratio"] = [None if r is None or not r_grpo else r / r_grpo for r in f["reach"]]
        oracle = per.get(ORACLE_OF.get(m, "grpo_oracle" if m.startswith("grpo") else "tb_oracle"))
        r_m, r_o = median_reached(f["reach"]), median_reached(oracle["reach"]) if oracle else None
        f["savings_share"] = (r_grpo - r_m) / (r_grpo - r_o) if None not in (r_grpo, r_m, r_o) and r_grpo != r_o else None
    return per


def beats(a: dict, b: dict) -> bool:
    """The registered rule: a's seed range of the rollout ratio lies wholly below b's (a seed that never
    reaches the target counts as beyond every ratio), or a reaches the target in more seeds."""
    return bool(_below(a, b) or _more_seeds(a, b))


def _ratios(f):
    return [np.inf if x is None else x for x in f["ratio"]]


def _median_ratio(f):
    """The median over the seeds that reach the target (inf where none does)."""
    v = [x for x in f.get("ratio", []) if x is not None]
    return float(np.median(v)) if v else np.inf


def _ratio_defined(per) -> bool:
    """Whether GRPO's target takes rollouts to reach (it does not where GRPO ends below its start)."""
    return any(x is not None for x in per["grpo"]["ratio"])


def _order(per):
    return sorted(per, key=lambda k: list(ORACLE_OF).index(k) if k in ORACLE_OF else 99)


def _below(a, b):
    return max(_ratios(a)) < min(_ratios(b))


def _more_seeds(a, b):
    return sum(np.isfinite(_ratios(a))) > sum(np.isfinite(_ratios(b)))


def beats_final(a: dict, b: dict) -> bool:
    """Post hoc, where the ratio is undefined: a's lowest seed ends above b's highest."""
    return bool(min(a["final"]) > max(b["final"]))


def verdicts(per: dict) -> list:
    """Markdown lines: each method against GRPO and against PACED-RL, by the rule (or post hoc by final
    accuracy where GRPO's target needs no rollouts)."""
    if "grpo" not in per:
        return []
    ratio_defined = _ratio_defined(per)
    better = beats if ratio_defined else beats_final
    how = "the registered rule, rollout ratio" if ratio_defined else "post hoc: final exact accuracy at the same budget"
    lines = []
    for ref in ("grpo", "paced"):
        if ref not in per:
            continue
        groups = {"better": [], "tie": [], "worse": []}
        for m in per:
            if m != ref:
                key = "better" if better(per[m], per[ref]) else "worse" if better(per[ref], per[m]) else "tie"
                a, b = (per[m], per[ref]) if key == "better" else (per[ref], per[m])
                fa, fb = ([x for x in _ratios(f) if np.isfinite(x)] for f in (a, b))
                # won by the second clause alone, though the loser's fastest seed was faster than the winner's
                seeds_only = ratio_defined and key != "tie" and not _below(a, b) and bool(fb) and min(fb) < min(fa)
                groups[key].append(f"`{m}`" + ("†" if seeds_only else ""))
        lines.append(f"- Each method against `{ref}` ({how}): " + "; ".join(f"{k}: {', '.join(v)}" for k, v in groups.items() if v) + ".")
    if any("†" in line for line in lines):
        lines.append("- † by the rule's second clause alone (the winner reaches the target in more seeds), though the "
                     "loser's fastest seed reached it with fewer rollouts: the winner ends higher but pays more "
                     "rollouts per point of accuracy.")
    return lines


def table(root: str) -> tuple:
    """(markdown, {regime: {method: figures}}) for every regime directory under root."""
    out, data = [], {}
    for regime in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))):
        runs = load_runs(os.path.join(root, regime))
        if not runs:
            continue
        base = regime.split("_")[0]  # a variant of a regime (high_pool1024, high_zphi) is measured against its GRPO
        if base != regime and os.path.isdir(os.path.join(root, base)):
            ref = load_runs(os.path.join(root, base))
            runs = {**{m: ref[m] for m in ("grpo", "grpo_oracle", "tb_oracle", "paced") if m in ref and m not in runs}, **runs}
        per = data[regime] = summarize_regime(runs)
        share = seed_stat([x for f in per.values() for x in f["uniform_equal"]], "{:.2f}")
        out.append(f"\n### Regime `{regime}` (all-equal share of the pool under uniform sampling, over the run: {share})\n")
        if "grpo" in per:
            g = per["grpo"]
            out.append(f"Target: GRPO's median final exact accuracy {g['target']:.3f} (start: {np.median(g['start']):.3f}).")
            if not _ratio_defined(per):
                out.append("GRPO ends at or below where every run starts, so reaching its final accuracy takes no "
                           "rollouts and the rollout ratio is undefined here (\"–\"); the verdicts below compare final "
                           "exact accuracy at the same budget instead (post hoc).")
            out.append("")
        out += ["| method | final exact acc | rollouts used | rollouts to GRPO's final, ÷ GRPO's | share of the oracle's savings | "
                "all-equal share of chosen | r(prediction, exact) over the pool | step s |", "|---" * 8 + "|"]
        for m in _order(per):
            f = per[m]
            sv = f.get("savings_share")
            out.append(f"| `{m}` | {seed_stat(f['final'])} | {seed_stat(f['rollouts'], '{:,.0f}')} | {seed_stat(f.get('ratio', []), '{:.2f}')} | "
                       f"{'–' if sv is None else f'{sv:.2f}'} | {seed_stat(f['sel_equal'], '{:.2f}')} | "
                       f"{seed_stat(f['corr'], '{:.2f}')} | {seed_stat(f['step_s'], '{:.3f}')} |")
        out += [""] + verdicts(per)
        buckets = sorted({k for f in per.values() for b in f["by_digits"] for k in b})
        if buckets:
            out += ["", "Final exact accuracy by the longer operand's digits (median over seeds; held-out prompts):", "",
                    "| method | " + " | ".join(f"{k}-digit" for k in buckets) + " |", "|---" * (len(buckets) + 1) + "|"]
            for m in _order(per):
                cells = [np.median([b[k] for b in per[m]["by_digits"] if k in b]) if any(k in b for b in per[m]["by_digits"]) else None
                         for k in buckets]
                out.append(f"| `{m}` | " + " | ".join("–" if c is None else f"{c:.3f}" for c in cells) + " |")
    return "\n".join(out) + "\n", data


def plot(data: dict, path: str):
    """Against each regime's uninformative share, one line per method: (left) the median rollout ratio to
    GRPO, where it is defined; (right) the median final exact accuracy minus GRPO's, at the same budget
    (dynamic sampling spends more)."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    regimes = [r for r in data if "_" not in r and "grpo" in data[r]]  # the regimes, not their variants
    xs = {r: np.median([x for f in data[r].values() for x in f["uniform_equal"] if x is not None]) for r in regimes}
    for m in ORACLE_OF:
        style = dict(marker="o", label=m, linestyle="--" if m.startswith("grpo") else "-")
        pts = sorted((xs[r], _median_ratio(data[r][m])) for r in regimes if m in data[r] and np.isfinite(_median_ratio(data[r][m])))
        if pts:
            ax.plot(*zip(*pts), **style)
        gain = sorted((xs[r], np.median(data[r][m]["final"]) - data[r]["grpo"]["target"]) for r in regimes if m in data[r])
        if gain:
            bx.plot(*zip(*gain), **style)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    bx.axhline(0.0, color="grey", linewidth=0.8)
    for a in (ax, bx):
        a.set_xlabel("share of all-equal groups under uniform sampling (regime)")
    ax.set_ylabel("rollouts to GRPO's final accuracy ÷ GRPO's")
    ax.set_title("rollout ratio (undefined where GRPO ends below its start)", fontsize=9)
    bx.set_ylabel("final exact accuracy − GRPO's")
    bx.set_title("final accuracy after the same 250 steps", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, ncol=2)
    else:  # no method reached GRPO's final accuracy from below: nothing to draw yet
        ax.text(0.5, 0.5, "no rollout ratios (GRPO's target reached at step 0, or no runs)", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


PREDICTORS = ("paced", "grpo_history", "tb_history", "tb_regress", "tb_hybrid")  # the selectors that predict (no oracle)


def headline(data: dict) -> str:
    """One row per regime: what the oracle saves, what PACED-RL and the best other predictor capture of it."""
    def ratio(f):
        r = _median_ratio(f)
        return f"{r:.2f}" if np.isfinite(r) else "not reached" if defined else "undefined"

    def share(f):
        return "–" if f.get("savings_share") is None else f"{f['savings_share']:.2f}"

    rows = ["| regime | all-equal share, uniform | pool | oracle: ratio, GRPO loss / TB loss | PACED-RL: ratio (share of "
            "the oracle's savings) | best other predictor: ratio (share) | final exact acc: GRPO / PACED-RL / best "
            "predictor / TB oracle |", "|---" * 7 + "|"]
    for r, per in data.items():
        if not all(m in per for m in ("grpo", "grpo_oracle", "tb_oracle", "paced")):
            continue
        defined = _ratio_defined(per)
        others = [m for m in PREDICTORS if m in per and m != "paced"]
        if not others:
            continue
        best = min(others, key=lambda m: _median_ratio(per[m]))
        if not np.isfinite(_median_ratio(per[best])):  # no ratio to rank by: the highest final accuracy
            best = max(others, key=lambda m: np.median(per[m]["final"]))
        pool = set(per["paced"]["pool"])
        eq = np.median([x for f in per.values() for x in f["uniform_equal"] if x is not None])
        fin = " / ".join(f"{np.median(per[m]['final']):.3f}" for m in ("grpo", "paced", best, "tb_oracle"))
        rows.append(f"| `{r}` | {eq:.2f} | {', '.join(map(str, sorted(pool))) or '?'} | {ratio(per['grpo_oracle'])} / "
                    f"{ratio(per['tb_oracle'])} | {ratio(per['paced'])} ({share(per['paced'])}) | `{best}`: "
                    f"{ratio(per[best])} ({share(per[best])}) | {fin} |")
    return "\n".join(rows) + "\n"


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    root, out = args.get("root", "runs/study"), args.get("out", "results")
    md, data = table(root)
    md = "## Summary\n\n" + headline(data) + "\n## Per regime\n" + md
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "study_table.md"), "w") as f:
        f.write(md)
    plot(data, os.path.join(out, "study_savings.png"))
    print(md, end="")
    return md, data


if __name__ == "__main__":
    main(sys.argv[1:])
