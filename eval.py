"""Held-out evaluation: accuracy (sampled and greedy), pass@k, and the calibration of p̂ = β·log Z_φ.

    python eval.py --run=runs/paced              # newest checkpoint of a run, and its initial model
    python eval.py --run=runs/paced --initial=true   # a run without a checkpoint yet: its initial model, on purpose
    python eval.py --model=testbed/model         # any HF model on the run config's held-out data
    python eval.py --preset=paper_math_1.5b --model=<ckpt>/model --eval_data=HuggingFaceH4/aime_2024 --eval_samples=32

During training the same measurement runs at step 0, every `eval_every` steps and at the end
(rollout.heldout_metrics). Tables and plots across runs are the experiments' (experiments/compare.py).

Reports mean accuracy over `eval_samples` samples per prompt (the paper: 32 for AIME), greedy
accuracy, pass@k for k = 1, 2, 4, ... up to eval_samples (the unbiased estimator of Chen et al.),
the number of distinct correct responses per prompt (diversity, where a task admits several; the
testbed's sums have one), and for a PACED-RL checkpoint the calibration of p̂ (mean |p̂ − a|, Pearson
correlation, and a reliability plot, <run>/reliability.png).

Evaluation is sharded over all ranks (each rank samples its share of the prompts, then one gather),
so it runs the same under `torchrun`. Each held-out prompt's sampling noise is seeded by the prompt,
so two evaluations of the same model see the same noise and differences between checkpoints are
not sampling luck.

A run's checkpoint is checked as `--resume` checks it (manifest, sizes, sha256): a damaged one is named and
skipped for the one before; a run without a usable checkpoint, or a path that does not exist, ends with one line.
"""

import dataclasses
import os
import sys

import numpy as np
import torch

import config
import paced_rl
import verify
from checkpoint import ckpt_dirs, newest_good_checkpoint, recorded_config
from data import Prompts, Split, encode_prompts, load_prompts, load_tokenizer
from distributed import setup_distributed, teardown
from metrics import calibration, pass_at_ks
from rollout import sampled_accuracy


def reliability_bins(p_hat, acc, bins: int = 10) -> list:
    """The reliability diagram's data: p̂ cut into `bins` equal-width bins on [0, 1]; for each non-empty
    bin (lo, hi, count, mean p̂, mean observed accuracy). A calibrated p̂ has mean p̂ ≈ mean accuracy."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    which = np.clip((p_hat * bins).astype(int), 0, bins - 1)
    return [(b / bins, (b + 1) / bins, int((which == b).sum()), float(p_hat[which == b].mean()),
             float(acc[which == b].mean())) for b in range(bins) if (which == b).any()]


def pyplot():
    """matplotlib's pyplot without a display (imported only when a plot is written)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_reliability(series: dict, path: str, title: str = ""):
    """One reliability curve per label: series = {label: (p_hat, acc)}; writes a PNG."""
    plt = pyplot()
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


def model_row(name: str, path: str, state: str, cfg, rows: list, ranks) -> dict:
    """One row of eval.py's table: the model at `path` on the held-out rows; with a checkpoint's state.pt whose head is
    a LogZHead, also p̂'s calibration (e(x) from the initial model, as in training) and a reliability plot beside it."""
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(path)
    split = Split(encode_prompts(tok, rows, lambda *a: None, cfg.prompt_suffix, (cfg.shot_prompt, cfg.shot_response)),
                  [r["answer"] for r in rows])
    prompts = Prompts(tok, verify.get_verifier(cfg.verifier), split, split)
    lm = AutoModelForCausalLM.from_pretrained(path).to(ranks.device).eval()
    res = sampled_accuracy(lm, prompts, split, cfg, ranks, cfg.eval_samples, cfg.temperature)
    acc = res.acc
    greedy = sampled_accuracy(lm, prompts, split, cfg, ranks, 1, 0.0).acc
    row = {"model": name, "sampled": float(acc.mean()), "greedy": float(greedy.mean()),
           "mid_frac": float(((acc > 0.1) & (acc < 0.9)).mean()), "distinct": float(res.distinct.mean()),
           "pass_at_k": pass_at_ks(cfg.eval_samples, np.rint(acc * cfg.eval_samples))}
    st = torch.load(state, weights_only=False) if state else {}
    if st.get("logz") is not None and "mu" in st["logz"]:  # a LogZHead: p̂ is an accuracy estimate
        base = AutoModelForCausalLM.from_pretrained(cfg.model).to(ranks.device).eval()
        # logz_features=distinct: the shared prefix and suffix are found over these held-out prompts alone (the loop finds
        # them over training and held-out prompts together; with a template shared by every prompt, the same tokens)
        emb = paced_rl.prompt_embeddings(base, split.toks, tok.pad_token_id, cfg.eval_batch, ranks.device, cfg.logz_features,
                                         cfg.logz_layer)
        head = paced_rl.LogZHead(emb.size(1), cfg.logz_hidden, cfg.beta, cfg.logz_init_acc, cfg.logz_output)
        head.load_state_dict(st["logz"])
        with torch.no_grad():
            p_hat = head.p_hat(emb).numpy()
        row.update(calibration(p_hat, acc))
        if ranks.rank == 0:
            plot_reliability({name: (p_hat, acc)}, os.path.join(os.path.dirname(os.path.dirname(state)), "reliability.png"))
    return row


def print_table(table: list, log):
    ks = list(table[0]["pass_at_k"])
    log("| model | sampled acc | greedy acc | " + " | ".join(f"pass@{k}" for k in ks)
        + " | distinct correct / prompt | prompts with 0.1<acc<0.9 | p̂ corr | mean abs(p̂−a) |")
    log("|---" * (7 + len(ks)) + "|")
    for r in table:
        c, e = r.get("acc_est_corr"), r.get("acc_est_abs_err")
        log(f"| {r['model']} | {r['sampled']:.3f} | {r['greedy']:.3f} | "
            + " | ".join(f"{r['pass_at_k'][k]:.3f}" for k in ks)
            + f" | {r['distinct']:.2f} | {r['mid_frac']:.2f} | {'' if c is None else f'{c:.2f}'} | {'' if e is None else f'{e:.3f}'} |")


def main(argv):
    import tasks  # the presets

    bad = [a for a in argv if not (a.startswith("--") and "=" in a)]
    if bad:
        raise SystemExit(f"eval: expected --key=value, got {bad[0]!r}")
    args = dict(a[2:].split("=", 1) for a in argv)
    run, model = args.pop("run", None), args.pop("model", None)
    initial = config.parse_value("initial", args.pop("initial", "false"), False)
    if not run and not model:
        raise SystemExit("usage: python eval.py --run=<out_dir> | --model=<hf id or path> [--key=value ...]; "
                         "tables across runs: python -m experiments.compare --runs=<dir>")
    base, newest = {}, None
    if run:
        if not os.path.isdir(run):
            raise SystemExit(f"eval: {run} does not exist")
        if ckpt_dirs(run):
            newest = newest_good_checkpoint(run, print, "eval")  # resume's checks; one line if none is usable
        elif not initial:
            raise SystemExit(f"eval: {run} has no checkpoint (ckpt_NNNNNN) yet; --initial=true evaluates the run's "
                             f"initial model on purpose")
        base = {k: v for k, v in recorded_config(run, print, "eval").items() if k in {x.name for x in dataclasses.fields(config.Config)}}
    cfg = config.make_config({**base, **config.parse_args([f"--{k}={v}" for k, v in args.items()])}, tasks.PRESETS)
    ranks = setup_distributed(cfg)
    rows = load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field, cfg.eval_answer_field or cfg.answer_field,
                        cfg.verifier)
    targets = [(model, model, None)]  # (name, model dir, state.pt or None)
    if run:
        targets = [("initial", cfg.model, None)] + ([] if newest is None else [
            (os.path.basename(newest), os.path.join(newest, "model"), os.path.join(newest, "state.pt"))])
    table = [model_row(name, path, state, cfg, rows, ranks) for name, path, state in targets]
    ranks.log(f"held-out: {cfg.eval_data} ({len(rows)} prompts, {cfg.eval_samples} samples at T={cfg.temperature}, greedy)")
    print_table(table, ranks.log)
    teardown(ranks.world)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
