"""Held-out evaluation: accuracy (sampled and greedy), pass@k, and the calibration of p̂ = β·log Z_φ.

    python eval.py --run=runs/paced              # newest checkpoint of a run, and its initial model
    python eval.py --model=testbed/model         # any HF model on the run config's held-out data
    python eval.py --preset=paper_math_1.5b --model=<ckpt>/model --eval_data=HuggingFaceH4/aime_2024 --eval_samples=32

train.py calls heldout_metrics at step 0, every `eval_every` steps and at the end. Tables and plots
across runs are the experiments' (experiments/compare.py).

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
import math
import os
import sys
from fractions import Fraction

import numpy as np
import torch

import config
import paced_rl
import verify
from checkpoint import ckpt_dirs
from data import Prompts, Split, encode_prompts, load_prompts, load_tokenizer
from distributed import gather, setup_distributed, teardown
from metrics import calibration
from rollout import rollout, seed_of


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021): 1 − C(n−c, k)/C(n, k),
    in exact integer arithmetic and rounded once, so pass@1 is c/n to the last bit."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 0 ≤ c ≤ n and 1 ≤ k ≤ n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))


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


@dataclasses.dataclass
class Sampled:
    """Per-prompt results of sampled_accuracy, in prompt order."""
    acc: np.ndarray  # share of correct samples
    distinct: np.ndarray  # distinct correct responses
    formatted: np.ndarray = None  # share of samples with a parseable final answer (verifiers with a format check)


@dataclasses.dataclass
class Heldout:
    """One evaluation: the metrics row's entries, and the per-prompt values behind them."""
    row: dict  # eval_acc, eval_pass_at_k, ...
    per_prompt: dict  # {"samples": n, "acc": [...], "p_hat": [...] or None}; a probe may add its own


@torch.no_grad()
def sampled_accuracy(lm, prompts, split, cfg, ranks, n_samples: int, temperature: float) -> Sampled:
    """Per-prompt accuracy over `n_samples` samples (temperature 0: one greedy sample) of every prompt of `split`,
    in order, with the distinct correct responses and (where the verifier has a format check, `has_answer`) the
    share of well-formed ones; the work is sharded over ranks and gathered."""
    n = 1 if temperature == 0 else n_samples
    fn, toks = prompts.verifier, split.toks
    has_answer = getattr(fn, "has_answer", None)
    mine = list(range(ranks.rank, len(toks), ranks.world))
    n_mine = len(mine)
    mine += [mine[0] if mine else 0] * (-(-len(toks) // ranks.world) - n_mine)  # equal shards: a sharded model needs lockstep
    recs = []
    for i in range(0, len(mine), cfg.eval_batch):
        idx = mine[i:i + cfg.eval_batch]
        seeds = [seed_of(cfg.seed, 1, j) for j in idx]
        texts = rollout(lm, prompts.tokenizer, [toks[j] for j in idx], seeds, cfg, n, temperature)[1]
        for k, j in enumerate(idx):
            if i + k >= n_mine:
                break  # padding of this rank's shard: not scored
            mine_texts = texts[k * n:(k + 1) * n]
            r, _ = verify.score(fn, mine_texts, [split.answers[j]] * n, cfg.verifier_workers)
            fmt = sum(map(has_answer, mine_texts)) / n if has_answer else 0.0
            recs.append((j, sum(r) / n, distinct_correct(mine_texts, r), fmt))
    recs = sorted(sum(gather(recs, ranks.world), []))
    col = lambda c: np.array([rec[c] for rec in recs])  # noqa: E731
    return Sampled(col(1), col(2), col(3) if has_answer else None)


def heldout_metrics(lm, prompts, p_hat, cfg, ranks) -> Heldout:
    """Held-out accuracy over eval_samples samples per prompt, pass@k, the greedy accuracy (eval_greedy), and
    where the objective has an accuracy estimate (p_hat: p̂ of every held-out prompt, else None) its calibration."""
    n = cfg.eval_samples
    res = sampled_accuracy(lm, prompts, prompts.heldout, cfg, ranks, n, cfg.temperature)
    acc = res.acc
    out = {"eval_acc": float(acc.mean()), "eval_pass_at_k": {str(k): v for k, v in pass_at_ks(n, np.rint(acc * n)).items()}}
    if res.formatted is not None:
        out["eval_format_rate"] = float(res.formatted.mean())
    if cfg.eval_greedy:
        out["eval_acc_greedy"] = float(sampled_accuracy(lm, prompts, prompts.heldout, cfg, ranks, 1, 0.0).acc.mean())
    if p_hat is not None:
        out.update({"eval_" + k: v for k, v in calibration(p_hat, acc).items()})
    return Heldout(out, {"samples": n, "acc": acc.tolist(), "p_hat": None if p_hat is None else p_hat.tolist()})


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
        emb = paced_rl.prompt_embeddings(base, split.toks, tok.pad_token_id, cfg.eval_batch, ranks.device, cfg.logz_features)
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

    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    run, model = args.pop("run", None), args.pop("model", None)
    if not run and not model:
        raise SystemExit("usage: python eval.py --run=<out_dir> | --model=<hf id or path> [--key=value ...]; "
                         "tables across runs: python -m experiments.compare --runs=<dir>")
    base = {}
    if run:
        with open(os.path.join(run, "config.json")) as f:
            base = {k: v for k, v in json.load(f).items() if k in {x.name for x in dataclasses.fields(config.Config)}}
    cfg = config.make_config({**base, **config.parse_args([f"--{k}={v}" for k, v in args.items()])}, tasks.PRESETS)
    ranks = setup_distributed(cfg)
    rows = load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field, cfg.eval_answer_field or cfg.answer_field,
                        cfg.verifier)
    targets = [(model, model, None)]  # (name, model dir, state.pt or None)
    if run:
        ck = ckpt_dirs(run)
        targets = [("initial", cfg.model, None)] + [(c, os.path.join(run, c, "model"), os.path.join(run, c, "state.pt"))
                                                    for c in ck[-1:]]
    table = [model_row(name, path, state, cfg, rows, ranks) for name, path, state in targets]
    ranks.log(f"held-out: {cfg.eval_data} ({len(rows)} prompts, {cfg.eval_samples} samples at T={cfg.temperature}, greedy)")
    print_table(table, ranks.log)
    teardown(ranks.world)
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
