"""Evaluation: held-out accuracy (sampled and greedy) and the calibration of p̂ = β·log Z_φ.

    python eval.py --run=runs/paced              # newest checkpoint of a run, and its initial model
    python eval.py --model=testbed/model         # any HF model on the run config's held-out data
    python eval.py --preset=paper_math_1.5b --model=<ckpt>/model --eval_data=HuggingFaceH4/aime_2024 --eval_samples=32

Reports mean accuracy over `eval_samples` samples per prompt (the paper: 32 for AIME), greedy
accuracy, and pass@k for k = 1, 2, 4, ... up to eval_samples (the unbiased estimator of Chen et al.).

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
import torch.distributed as dist


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


def calibration(p_hat, acc) -> dict:
    """How well p̂ estimates the observed per-prompt accuracy a."""
    p_hat, acc = np.asarray(p_hat, float), np.asarray(acc, float)
    return {"acc_est_corr": pearson(p_hat, acc), "acc_est_abs_err": float(np.abs(p_hat - acc).mean())}


@torch.no_grad()
def sampled_accuracy(lm, tokenizer, toks, answers, fn, cfg, device, rank, world, n_samples, temperature):
    """Per-prompt accuracy over `n_samples` samples (temperature 0: one greedy sample), for every
    prompt in `toks`, in order; the work is sharded over ranks and gathered."""
    import train
    import verify

    n = 1 if temperature == 0 else n_samples
    sub = dataclasses.replace(cfg, group_size=n)
    mine = list(range(rank, len(toks), world))
    n_mine = len(mine)
    mine += [mine[0] if mine else 0] * (-(-len(toks) // world) - n_mine)  # equal shards: a sharded model needs lockstep
    recs = []
    for i in range(0, len(mine), cfg.eval_batch):
        idx = mine[i:i + cfg.eval_batch]
        seeds = [train.seed_of(cfg.seed, 1, j) for j in idx]
        texts = train.rollout(lm, tokenizer, [toks[j] for j in idx], seeds, sub, device, temperature)[-1]
        for k, j in enumerate(idx):
            if i + k >= n_mine:
                break  # padding of this rank's shard: not scored
            r, _ = verify.score(fn, texts[k * n:(k + 1) * n], [answers[j]] * n, cfg.verifier_workers)
            recs.append((j, sum(r) / n))
    recs = sorted(sum(train.gather(recs, world), []))
    return np.array([a for _, a in recs])


def main(argv):
    import train
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    run, model = args.pop("run", None), args.pop("model", None)
    if not run and not model:
        raise SystemExit("usage: python eval.py --run=<out_dir> | --model=<hf id or path> [--key=value ...]")
    base = {}
    if run:
        with open(os.path.join(run, "config.json")) as f:
            base = {k: v for k, v in json.load(f).items() if k in {x.name for x in dataclasses.fields(train.Config)}}
    overrides = train.parse_args([f"--{k}={v}" for k, v in args.items()])
    cfg = train.make_config({**base, **overrides})
    rank, world, device = train.setup_distributed(cfg)
    log = lambda *a: train.print0(*a, rank=rank)  # noqa: E731
    rows = train.load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field,
                              cfg.eval_answer_field or cfg.answer_field, cfg.verifier)
    fn = train.verify.get_verifier(cfg.verifier)
    targets = []  # (name, model dir, state.pt or None)
    if run:
        ck = train.ckpt_dirs(run)
        targets.append(("initial", cfg.model, None))
        if ck:
            targets.append((ck[-1], os.path.join(run, ck[-1], "model"), os.path.join(run, ck[-1], "state.pt")))
    else:
        targets.append((model, model, None))
    table = []
    for name, path, state in targets:
        tok = AutoTokenizer.from_pretrained(path)
        tok.padding_side = "left"
        toks = train.encode_prompts(tok, rows, lambda *a: None, cfg.prompt_suffix)
        lm = AutoModelForCausalLM.from_pretrained(path).to(device).eval()
        answers = [r["answer"] for r in rows]
        acc = sampled_accuracy(lm, tok, toks, answers, fn, cfg, device, rank, world, cfg.eval_samples, cfg.temperature)
        greedy = sampled_accuracy(lm, tok, toks, answers, fn, cfg, device, rank, world, 1, 0.0)
        row = {"model": name, "sampled": float(acc.mean()), "greedy": float(greedy.mean()),
               "mid_frac": float(((acc > 0.1) & (acc < 0.9)).mean()),
               "pass_at_k": pass_at_ks(cfg.eval_samples, np.rint(acc * cfg.eval_samples))}
        if state:  # calibration of p̂ on these prompts: e(x) from the initial model, as in training
            import paced_rl
            st = torch.load(state, weights_only=False)
            base = AutoModelForCausalLM.from_pretrained(cfg.model).to(device).eval()
            emb = paced_rl.prompt_embeddings(base, toks, tok.pad_token_id, cfg.eval_batch, device, cfg.logz_features)
            del base
            head = paced_rl.LogZHead(emb.size(1), cfg.logz_hidden, cfg.beta, cfg.logz_init_acc, cfg.logz_output)
            head.load_state_dict(st["logz"])
            with torch.no_grad():
                row.update(calibration((cfg.beta * head(emb)).numpy(), acc))
        table.append(row)
    log(f"held-out: {cfg.eval_data} ({len(rows)} prompts, {cfg.eval_samples} samples at T={cfg.temperature}, greedy)")
    ks = list(table[0]["pass_at_k"])
    log("| model | sampled acc | greedy acc | " + " | ".join(f"pass@{k}" for k in ks)
        + " | prompts with 0.1<acc<0.9 | p̂ corr | mean abs(p̂−a) |")
    log("|---" * (6 + len(ks)) + "|")
    for r in table:
        c, e = r.get("acc_est_corr"), r.get("acc_est_abs_err")
        log(f"| {r['model']} | {r['sampled']:.3f} | {r['greedy']:.3f} | "
            + " | ".join(f"{r['pass_at_k'][k]:.3f}" for k in ks)
            + f" | {r['mid_frac']:.2f} | {'' if c is None else f'{c:.2f}'} | {'' if e is None else f'{e:.3f}'} |")
    if world > 1:
        dist.destroy_process_group()
    return table


if __name__ == "__main__":
    main(sys.argv[1:])
