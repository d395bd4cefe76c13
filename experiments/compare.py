"""The comparison of methods over seeds: the table and plots behind RESULTS.md, from finished runs.

    python -m experiments.compare --runs=runs/compare                # runs named <method>_s<seed>: table.md and plots
    python -m experiments.compare --runs=runs/a,runs/b --out=runs/ab  # any finished runs, or directories of them
    python -m experiments.compare --agree=runs/one,runs/two          # where two runs of one config part (1 vs 2 processes)
    python -m experiments.compare --write_levels=runs/x              # a run's data levels into its levels.json
    python -m experiments.compare --same_rows=runs/a,runs/b          # whether a rerun reproduces a record, row by row

A run is a directory with metrics.jsonl, config.json and heldout_final.json (train.py writes them), and
optionally levels.json (the data rows' levels, for the by-level tables where the data files are absent). Every
figure over seeds is "median [min, max]" (`seed_stat`), and a method reaches a target accuracy in the
median only while at least half of its seeds reach it (`median_reached`); study.py uses the same two.
"""

import json
import os
import re
import sys

import numpy as np

import paced_rl
import scheduler
from eval import plot_reliability, pyplot
from experiments import methods
from metrics import all_equal_share, calibration

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
        cfg = run_config(path)
        levels = {}
        if os.path.exists(os.path.join(path, "levels.json")):
            with open(os.path.join(path, "levels.json")) as f:
                levels = json.load(f)
        name = m.group(1) if m else os.path.basename(path)
        runs.setdefault(name, []).append({"seed": cfg.get("seed"), "rows": rows, "final": final, "config": cfg,
                                          "levels": levels})
    return runs


def median_reached(reach):
    """The median over seeds of the rollouts to a target; a seed that never reaches it (None) counts as
    beyond every other, so the median exists only while at least half the seeds reach it (else None)."""
    xs = sorted((r if r is not None else float("inf")) for r in reach)
    if not xs:
        return None
    med = xs[(len(xs) - 1) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2
    return None if not np.isfinite(med) else float(med)


def seed_stat(xs, fmt="{:.3f}", missing="not reached"):
    """'median [min, max]' over seeds. A seed without a value (None: a target it never reached) counts as
    above every other: the median is taken so (`missing` where it falls on one), the max shows "–", and
    the count follows, e.g. '0.75 [0.70, –] (1 of 3 seeds: not reached)'. No value in any seed: "–"."""
    known = sorted(x for x in xs if x is not None)
    if not known:
        return "–"
    med = median_reached(xs)
    med_s = missing if med is None else fmt.format(med)
    if len(known) == len(xs):
        return f"{med_s} [{fmt.format(known[0])}, {fmt.format(known[-1])}]"
    return f"{med_s} [{fmt.format(known[0])}, –] ({len(xs) - len(known)} of {len(xs)} seeds: {missing})"


def selection_check(p_hat, acc, group_size: int, tau: float = 0.5, frac: float = 0.25) -> dict:
    """What selecting by p̂ buys, on prompts with known accuracy a: the expected share of groups of G
    samples whose rewards are all equal (a^G + (1 − a)^G, no learning signal) when the `frac` of the
    prompts nearest τ are chosen by p̂, by the true a (an oracle scheduler), or uniformly."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    k = max(1, int(round(frac * acc.size)))
    chosen = lambda score: acc[scheduler.nearest(score, k, tau)]  # noqa: E731
    return {"uniform": all_equal_share(acc, group_size), "by_p_hat": all_equal_share(chosen(p_hat), group_size),
            "oracle": all_equal_share(chosen(acc), group_size)}


def levels_of(path: str, n=None, field: str = "level"):
    """The `level` field (or another label field) of a data file's rows (the smollm2 task's difficulty levels);
    None where the file is gone, has rows without it, or not n rows (n given)."""
    if not path or not os.path.isfile(path):
        return None
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [x[field] for x in rows] if n in (None, len(rows)) and all(field in x for x in rows) else None


LABELS = ("level", "form")  # the label fields a record keeps: the difficulty level, the phrasing (SmolLM2's task)


def run_levels(run: dict, key: str, n=None, field: str = "level"):
    """The `field` labels of a run's `train_data` or `eval_data` (key): from the run's own levels.json where it has
    them (a record, which must not depend on data files a fresh clone lacks), else from the data file itself."""
    lv = run.get("levels", {}).get(key if field == "level" else f"{key}:{field}")
    if lv is not None:
        return lv if n in (None, len(lv)) else None
    return levels_of(run["config"].get(key, ""), n, field)


def run_config(run_dir: str) -> dict:
    """A run's fields: config.json, with the harness's lab.json over it where the run has one."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    if os.path.exists(os.path.join(run_dir, "lab.json")):
        with open(os.path.join(run_dir, "lab.json")) as f:
            cfg.update(json.load(f))
    return cfg


def write_levels(run_dir: str) -> dict:
    """Writes <run_dir>/levels.json: the `level` (key: train_data, eval_data) and the `form` (key: train_data:form,
    eval_data:form) of every row of the run's data files, where they have them, so that the by-level and
    by-phrasing tables can be rebuilt from the run's record alone."""
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    out = {(k if f == "level" else f"{k}:{f}"): lv for k in ("train_data", "eval_data") for f in LABELS
           if (lv := levels_of(cfg.get(k, ""), None, f)) is not None}
    with open(os.path.join(run_dir, "levels.json"), "w") as f:
        json.dump(out, f)
    return out


def by_level(runs: dict, field: str = "level") -> list:
    """Markdown lines: each method's final held-out accuracy per `level` (or `form`: the phrasing) of the held-out
    rows (the smollm2 task's), median over seeds; [] where a run's held-out file is gone or has no such labels."""
    levels = None
    for rs in runs.values():
        for r in rs:
            mine = run_levels(r, "eval_data", len(r["final"]["acc"]), field)
            if mine is None or levels not in (None, mine):
                return []  # no levels, or runs on different held-out sets: no common breakdown
            levels = mine
    if not levels:
        return []
    names = list(dict.fromkeys(levels))
    counts = {n: levels.count(n) for n in names}
    what = "difficulty level" if field == "level" else "phrasing" if field == "form" else field
    lines = ["", f"Final held-out accuracy by {what} (the held-out rows' `{field}`; median over seeds, range):", "",
             "| method | " + " | ".join(f"{n} ({counts[n]})" for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for m, rs in runs.items():
        acc = [{n: float(np.mean([a for a, lv in zip(r["final"]["acc"], levels) if lv == n])) for n in names} for r in rs]
        lines.append(f"| {m} | " + " | ".join(med_range([a[n] for a in acc]) for n in names) + " |")
    return lines


def med_range(xs) -> str:
    """The median of the seeds' values and their range, as the tables give it."""
    return f"{np.median(xs):.3f} [{min(xs):.3f}, {max(xs):.3f}]" if len(xs) > 1 else f"{xs[0]:.3f}"


def run_chosen_shares(r: dict):
    """(mean over steps of each labelled group's chosen share, the groups' data shares) of one run: from its logged
    `chosen_share` rows, else from the study's per-step `groups` and the labels (`level`, `form`) of its training
    rows; None where neither is there."""
    rows = [x for x in r["rows"] if "chosen_share" in x]
    if rows:
        data = next((x["data_share"] for x in r["rows"] if "data_share" in x), None)
        return {g: float(np.mean([x["chosen_share"][g] for x in rows])) for g in rows[0]["chosen_share"]}, data
    chosen = [[g[0] for g in x["groups"]] for x in r["rows"] if x.get("groups")]
    labels = {"level": run_levels(r, "train_data")}
    labels["form"] = run_levels(r, "train_data", len(labels["level"]) if labels["level"] else None, "form")
    labels = {f: lv for f, lv in labels.items() if lv is not None}
    if not chosen or not labels or len({len(lv) for lv in labels.values()}) > 1:
        return None
    cov = scheduler.Coverage(labels, 0)
    shares = [cov.observe(i, c)[0]["chosen_share"] for i, c in enumerate(chosen)]
    return {g: float(np.mean([s[g] for s in shares])) for g in cov.data_share}, cov.data_share


def chosen_shares(runs: dict) -> list:
    """Markdown lines: each method's share of the chosen prompts per labelled group of the training rows (a level, a
    form), mean over steps and median over seeds, beside the group's share of the data: the starvation a greedy
    scheduler with a wrong estimate causes shows as a share far below the data's. [] where no run has labels."""
    per = {m: s for m, rs in runs.items() if None not in (s := [run_chosen_shares(r) for r in rs])}
    if not per:
        return []
    data = next(s[0][1] for s in per.values())
    names = sorted(data)
    lines = ["", "Chosen share of each labelled group of the training prompts (mean over steps, median over seeds) "
             "against its share of the data:", "", "| method | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
             "| the data | " + " | ".join(f"{data[g]:.2f}" for g in names) + " |"]
    for m, s in per.items():
        lines.append(f"| {m} | " + " | ".join(f"{np.median([x[0].get(g, 0.0) for x in s]):.2f}" for g in names) + " |")
    return lines


def train_groups(r: dict):
    """A run's groups over all steps as arrays (prompt index, observed accuracy a of the group, p̂ before the
    step's update), from the metrics rows' `groups`; None for a run without p̂ (not PACED-RL's loss). a is
    the mean of G rewards, so it scatters around the prompt's accuracy and lowers r below p̂'s true r."""
    g = [x for row in r["rows"] for x in row.get("groups") or [] if x[2] is not None]
    if not g:
        return None
    idx, a, p = (np.array(c) for c in zip(*g))
    return idx.astype(int), a.astype(float), p.astype(float)


def saturated_steps(r: dict) -> int:
    """How many of a run's steps had p̂ saturated on every chosen prompt (paced_rl.saturation_warning's rule,
    the loop's warning)."""
    return sum(paced_rl.saturation_warning([x[2] for x in row["groups"]], row["step"]) is not None
               for row in r["rows"] if row.get("groups") and row["groups"][0][2] is not None)


def saturated_share(p_hat, eps: float = 1e-3) -> float:
    """The share of prompts whose p̂ lies within eps of 0 or 1 (where the sigmoid head's gradient vanishes for that
    prompt): the per-prompt saturation that the loop's warning, which needs every selected prompt there, misses."""
    p = np.asarray(p_hat, float)
    return float(np.mean((p < eps) | (p > 1 - eps)))


def _calib_cells(p, a) -> str:
    c = calibration(p, a)
    r = "–" if c["acc_est_corr"] is None else f"{c['acc_est_corr']:.2f}"
    return f"{r} / {c['acc_est_abs_err']:.3f} / {np.mean(p):.2f} vs {np.mean(a):.2f} / {np.std(p):.2f}"


def oracle_share(acc: dict, verdicts: dict, ref: str, oracle: str) -> list:
    """Markdown lines: each method's share of the oracle's gain over ref in final sampled accuracy,
    (median of the method − median of ref) / (median of the oracle − median of ref). Defined only where the oracle
    beats ref by the study's rule and its median lies above ref's; otherwise one line says why there is none."""
    med = {m: float(np.median(a)) for m, a in acc.items()}
    gain = med[oracle] - med[ref]
    if verdicts[oracle] != "win" or gain <= 0:
        return ["", f"Share of the oracle's gain: none defined. `{oracle}` against `{ref}`: {verdicts[oracle]}, medians "
                f"{med[oracle]:.3f} and {med[ref]:.3f}; an oracle that does not beat `{ref}` by the rule leaves no gain to share."]
    out = ["", f"Share of the oracle's gain over `{ref}` (`{oracle}` − `{ref}` = {gain:+.3f} in median final sampled "
           f"accuracy): (median of the method − median of `{ref}`) ÷ that gain.", ""]
    return out + [f"- {m}: {(med[m] - med[ref]) / gain:+.2f}" for m in acc if m not in (ref, oracle)]


def study_lines(runs: dict, groups: dict, ref: str = "grpo", oracle: str = "tb_static_oracle") -> list:
    """Markdown lines for a study against `ref` (the SmolLM2 study, RESULTS.md): per method the final sampled
    accuracy, rollouts to ref's final accuracy as a ratio to ref's (per seed over ref's median), the chosen
    groups' all-equal share (ref's draws are uniform: the pool's), the verdict by the study's win rule; then
    p̂'s calibration per method on the training prompts (each step's groups) and on the held-out questions,
    overall and by level; where `oracle` ran, each method's share of the oracle's gain over ref (`oracle_share`).
    groups: {method: [train_groups of each seed]} for the methods with p̂."""
    if ref not in runs:
        return []
    acc = {m: [eval_curve(r["rows"])[-1][1] for r in rs] for m, rs in runs.items()}  # the curves' own last value
    target = float(np.median(acc[ref]))
    ref_reach = median_reached([rollouts_to_reach(eval_curve(r["rows"]), target) for r in runs[ref]])
    lines = ["", f"Against `{ref}` (the study's win rule: a seed range of final sampled accuracy above {ref}'s without "
             f"overlap, or {ref}'s final accuracy {target:.3f} reached in fewer rollouts than {ref}'s median in every "
             "seed; a range below is a loss, anything else a tie). All-equal share: the chosen groups' share with "
             "all-equal rewards, mean over steps (the first round's, for dynamic sampling). p̂ saturated: per seed, the steps "
             "whose chosen prompts all had p̂ within 1e-3 of 0 or 1 (the loop's warning), then the share of held-out "
             "questions with p̂ there at the end.", "",
             f"| method | final sampled acc | rollouts to {target:.3f}, ÷ {ref}'s | all-equal share | median step (s) "
             f"| p̂ saturated: steps / held-out share | verdict |", "|---|---|---|---|---|---|---|"]
    verdicts = {}
    for m, rs in runs.items():
        reach = [rollouts_to_reach(eval_curve(r["rows"]), target) for r in rs]
        ratio = [None if x is None or not ref_reach else x / ref_reach for x in reach]
        share = [float(np.mean([x["zero_var_frac"] for x in r["rows"] if x.get("zero_var_frac") is not None])) for r in rs]
        sat = None if m not in groups else (", ".join(str(saturated_steps(r)) for r in rs) + " / "
                                            + seed_stat([saturated_share(r["final"]["p_hat"]) for r in rs], "{:.2f}"))
        if m == ref:
            verdict = "–"
        elif min(len(rs), len(runs[ref])) < 3:  # the research standard: no verdict on fewer than 3 seeds
            n = min(len(rs), len(runs[ref]))
            verdict = f"none ({n} seed{'s' if n > 1 else ''})"
        elif min(acc[m]) > max(acc[ref]) or (ref_reach and all(x is not None and x < 1 for x in ratio)):
            verdict = "win"
        elif max(acc[m]) < min(acc[ref]):
            verdict = "loss"
        else:
            verdict = "tie"
        step = [float(np.median([x["step_s"] for x in r["rows"] if "step_s" in x])) for r in rs]  # robust to a stall
        lines.append(f"| {m} | {seed_stat(acc[m])} | {seed_stat(ratio, '{:.2f}')} | {seed_stat(share)} | "
                     f"{seed_stat(step, '{:.1f}')} | {sat or '–'} | {verdict} |")
        verdicts[m] = verdict
    if oracle in runs:
        lines += oracle_share(acc, verdicts, ref, oracle)
    if not groups:
        return lines
    lines += ["", "p̂'s calibration, pooled over seeds: Pearson r / mean abs(p̂ − a) / mean p̂ vs mean a / standard "
              "deviation of p̂. Training: every step's chosen prompts, p̂ before the step's update against the group's "
              "observed accuracy (G samples); held-out: p̂ at the end against each question's sampled accuracy. A "
              "selector that picks p̂ nearest τ narrows p̂'s spread over its chosen prompts (a small sd), which lowers "
              "the training r by itself; the held-out r has every question.", "",
              "| method | prompts | level | training | held-out |", "|---|---|---|---|---|"]
    for m, tr in groups.items():
        rs = runs[m]
        ti, ta, tp = (np.concatenate([t[k] for t in tr]) for k in range(3))
        ha, hp = (np.concatenate([np.asarray(r["final"][k], float) for r in rs]) for k in ("acc", "p_hat"))
        lines.append(f"| {m} | {ti.size} / {ha.size} | all | {_calib_cells(tp, ta)} | {_calib_cells(hp, ha)} |")
        tl = [run_levels(r, "train_data") for r in rs]
        hl = [run_levels(r, "eval_data", len(r["final"]["acc"])) for r in rs]
        if any(x is None for x in tl + hl) or any(t[0].max() >= len(lv) for lv, t in zip(tl, tr)):
            continue
        tlev = np.concatenate([np.asarray(lv, dtype=object)[t[0]] for lv, t in zip(tl, tr)])
        hlev = np.concatenate([np.asarray(lv, dtype=object) for lv in hl])
        for n in dict.fromkeys(hl[0]):
            t, h = tlev == n, hlev == n
            cell = lambda p, a, k: _calib_cells(p[k], a[k]) if k.sum() > 1 else "–"  # noqa: E731
            lines.append(f"| {m} | {int(t.sum())} / {int(h.sum())} | {n} | {cell(tp, ta, t)} | {cell(hp, ha, h)} |")
    return lines


def compare(root: str, out: str, targets=("grpo", "flowrl", "paced_replay_only"), focus: str = "paced") -> str:
    """The comparison table (markdown, also written to <out>/table.md) and PNGs: held-out accuracy against
    rollouts (<out>/accuracy_vs_rollouts.png) and p̂'s reliability (<out>/reliability.png). Runs that log each
    step's groups with p̂ also get the study's table against grpo (`study_lines`) and
    <out>/training_calibration.png.
    A target's accuracy is the baseline's final held-out accuracy, median over its seeds; the ratio
    is the median rollouts `focus` needs to reach it over the median the baseline needs."""
    plt = pyplot()
    runs = load_runs(root)
    if not runs:
        raise SystemExit(f"compare: no finished runs (directories with heldout_final.json) in {root}")
    order = next((methods.GROUPS[g] for g in ("comparison", "smollm2_study") if set(runs) <= set(methods.GROUPS[g])),
                 methods.GROUPS["comparison"])
    runs = dict(sorted(runs.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order), kv[0])))
    os.makedirs(out, exist_ok=True)
    final_acc = {m: float(np.median([np.mean(r["final"]["acc"]) for r in rs])) for m, rs in runs.items()}
    targets = [t for t in targets if t in runs]
    reach = {m: {t: [rollouts_to_reach(eval_curve(r["rows"]), final_acc[t]) for r in rs] for t in targets}
             for m, rs in runs.items()}

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
        cells = [m, str(len(rs)), seed_stat(p1), seed_stat(p8) if None not in p8 else "–"]
        cells += [seed_stat(reach[m][t], "{:,.0f}") for t in targets]
        cells.append(seed_stat([float(np.mean([x["step_s"] for x in r["rows"] if "step_s" in x])) for r in rs]))
        corr = [f.get("eval_acc_est_corr") for f in finals]
        err = [f.get("eval_acc_est_abs_err") for f in finals]
        cells += [seed_stat(corr, "{:.2f}") if None not in corr else "–", seed_stat(err) if None not in err else "–"]
        if real:
            first = [next(x for x in r["rows"] if "eval_pass_at_k" in x) for r in rs]
            cells.append(seed_stat([f["eval_pass_at_k"]["1"] for f in first]))
            cells += [f"{seed_stat([f.get(k) for f in first])} → {seed_stat([f[k] for f in finals])}" for k in real]
            kl = [np.mean(v) for r in rs if (v := [x["beta_kl"] for x in r["rows"] if x.get("beta_kl") is not None])]
            cells.append(seed_stat([float(x) for x in kl], "{:.1e}") if kl else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if focus in runs:
        lines.append("")
        for t in targets:
            a, b = median_reached(reach[focus][t]), median_reached(reach[t][t])
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
        lines += ["", "Selection check on the held-out prompts at the end (`selection_check`): the expected share of "
                  "groups with all-equal rewards when a quarter of the prompts is chosen nearest τ by p̂, by the true "
                  "accuracy (an oracle), or uniformly; median over seeds.", "",
                  "| method | uniform | nearest τ by p̂ | nearest τ by true accuracy |", "|---|---|---|---|"]
        for m, cs in checks.items():
            lines.append(f"| {m} | " + " | ".join(f"{np.median([c[k] for c in cs]):.3f}" for k in ("uniform", "by_p_hat", "oracle")) + " |")
    lines += by_level(runs)
    lines += by_level(runs, "form")
    lines += chosen_shares(runs)
    groups = {m: g for m, rs in runs.items() if None not in (g := [train_groups(r) for r in rs])}  # methods with p̂
    if groups:  # runs that log each step's groups and p̂
        lines += study_lines(runs, groups)
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
    if groups:
        plot_training_calibration({m: runs[m] for m in groups}, os.path.join(out, "training_calibration.png"))
    series = {m: (np.concatenate([r["final"]["p_hat"] for r in rs]), np.concatenate([r["final"]["acc"] for r in rs]))
              for m, rs in with_p_hat.items()}
    if series:
        plot_reliability(series, os.path.join(out, "reliability.png"), "held-out calibration of p̂ at the end (all seeds)")
    return table


def plot_training_calibration(runs: dict, path: str):
    """Per step, the mean p̂ of the chosen prompts (solid) against their groups' observed mean accuracy
    (dashed), median over seeds, for each method of `runs` (methods with p̂): does Z_φ track the prompts it picks?"""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, rs in runs.items():
        steps = sorted({row["step"] for r in rs for row in r["rows"] if row.get("groups")})
        per = lambda k: [np.median([np.mean([g[k] for g in row["groups"]]) for r in rs for row in r["rows"]  # noqa: E731
                                    if row["step"] == s and row.get("groups")]) for s in steps]
        (line,) = ax.plot(steps, per(2), label=f"{m}: mean p̂")
        ax.plot(steps, per(1), "--", color=line.get_color(), label=f"{m}: mean observed accuracy")
    ax.set(xlabel="step", ylabel="chosen prompts (median over seeds)", ylim=(0, 1),
           title="p̂ against the observed accuracy of the prompts each step chose")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# the metrics that are equal in two runs exactly as long as they sampled the same responses
DISCRETE = ("reward_mean", "resp_len", "zero_var_frac", "truncated_frac", "replay_size", "rollouts", "train_prompts", "replayed")


def agreement(run_a: str, run_b: str) -> dict:
    """Two runs of one config (e.g. on 1 and 2 processes): the first step at which they sampled different
    responses (a discrete metric differs; None: never), the largest relative difference of the loss before
    it, and both final held-out accuracies."""
    a, b = ([json.loads(line) for line in open(os.path.join(d, "metrics.jsonl")) if line.strip()] for d in (run_a, run_b))
    flip = next((ra["step"] for ra, rb in zip(a, b) if any(ra.get(k) != rb.get(k) for k in DISCRETE)), None)
    before = [(ra["loss"], rb["loss"]) for ra, rb in zip(a, b) if ra.get("loss") is not None and (flip is None or ra["step"] < flip)]
    return {"first_flip_step": flip, "steps": len(a),
            "loss_rel_diff_before": max((abs(x - y) / max(abs(x), 1e-12) for x, y in before), default=None),
            "final_eval_acc": (a[-1].get("eval_acc"), b[-1].get("eval_acc"))}


def same_rows(a: str, b: str) -> str:
    """Whether two runs' metrics.jsonl rows are equal on the keys both log, timings (`*_s`) aside: "the same rows
    (N)" or where they part. A key only one of them logs (a metric added later) is named, not compared."""
    rows = []
    for d in (a, b):
        with open(os.path.join(d, "metrics.jsonl")) as f:
            rows.append([{k: v for k, v in json.loads(line).items() if not k.endswith("_s")} for line in f if line.strip()])
    only = set()
    for x, y in zip(*rows):
        only |= set(x) ^ set(y)
        keys = sorted(k for k in set(x) & set(y) if x[k] != y[k])
        if keys:
            return f"they differ from step {x.get('step')}: {', '.join(keys[:8])}"
    if len(rows[0]) != len(rows[1]):
        return f"they differ in length: {len(rows[0])} and {len(rows[1])} rows"
    return f"the same rows ({len(rows[0])}), timings aside" + (f"; logged by one only: {', '.join(sorted(only))}" if only else "")


def main(argv):
    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    if "same_rows" in args:
        out = same_rows(*args["same_rows"].split(","))
        print(out)
        if not out.startswith("the same rows"):
            raise SystemExit(1)
        return out
    if "agree" in args:
        out = agreement(*args["agree"].split(","))
        print(json.dumps(out))
        return out
    if "write_levels" in args:
        for d in args["write_levels"].split(","):
            print(d, {k: len(v) for k, v in write_levels(d).items()})
        return None
    if "runs" not in args:
        raise SystemExit("usage: python -m experiments.compare --runs=<dir or dirs, comma-separated> [--out=<dir>] | "
                         "--agree=<run>,<run> | --write_levels=<run dir>[,<run dir>...]")
    table = compare(args["runs"], args.get("out", args["runs"].split(",")[0]))
    print(table, end="")
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
