"""The initial policy's accuracy on every training prompt, measured once by sampling: the static oracle's file.

    python -m experiments.static_oracle --preset=smollm2_arith --samples=16 --out=results/smollm2_study/initial_accuracy.json

Each training prompt (in the order the loop loads them) gets `samples` responses at the run's temperature from
the initial model (`--model`), verified as in training; the file holds each prompt's share of correct ones.
`--select=static --accuracy_file=FILE` (experiments/selectors.py) then keeps the B candidates nearest τ by it:
an upper bound for predictors that learn accuracy from nothing, since it knows every prompt's accuracy at step 0
(and none of the learning after). Work is saved every `chunk` prompts to FILE.partial, so a stopped
measurement continues where it stopped. Each prompt's noise is seeded by (seed, prompt), as held-out sampling.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

import config
import data
import distributed
import rollout
import tasks


@dataclass
class OracleArgs:
    samples: int = 16  # responses per training prompt
    out: str = ""  # the JSON file written
    chunk: int = 40  # prompts between saves of the partial file


def measure(cfg, args: OracleArgs, log=print) -> dict:
    from transformers import AutoModelForCausalLM

    tasks.check_for(cfg, log)
    ranks = distributed.setup_distributed(cfg)
    if ranks.world > 1:
        raise SystemExit("static_oracle: one process (python -m experiments.static_oracle), not torchrun")
    if cfg.dtype == "auto":
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if distributed.bf16_pays(ranks.device)[0] else "float32")
    prompts = data.load_data(cfg, log)
    lm = AutoModelForCausalLM.from_pretrained(cfg.model).to(ranks.device).eval()
    n, partial = len(prompts.train.toks), args.out + ".partial"
    acc = json.load(open(partial))["acc"] if os.path.exists(partial) else []
    log(f"static oracle: {n} training prompts of {cfg.train_data}, {args.samples} samples each at T={cfg.temperature}"
        + (f"; {len(acc)} already measured ({partial})" if acc else ""))
    t0 = time.time()
    for i in tqdm(range(len(acc), n, args.chunk), initial=len(acc) // args.chunk, total=-(-n // args.chunk), desc="oracle"):
        split = data.Split(prompts.train.toks[i:i + args.chunk], prompts.train.answers[i:i + args.chunk])
        sub = dataclasses.replace(cfg, seed=cfg.seed + i)  # the noise of prompt i + k is seeded by (seed + i, 1, k): distinct
        acc += rollout.sampled_accuracy(lm, prompts, split, sub, ranks, args.samples, cfg.temperature).acc.tolist()
        with open(partial + ".tmp", "w") as f:
            json.dump({"acc": acc}, f)
        os.replace(partial + ".tmp", partial)
    rec = {"model": cfg.model, "train_data": cfg.train_data, "prompts": n, "samples": args.samples,
           "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "chunk": args.chunk, "dtype": cfg.dtype,
           "mean": float(np.mean(acc)), "seconds_this_call": round(time.time() - t0, 1), "acc": acc}
    with open(args.out + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(args.out + ".tmp", args.out)
    os.remove(partial)
    log(f"static oracle: mean accuracy {rec['mean']:.3f} over {n} prompts -> {args.out}")
    return rec


def main(argv):
    fields = config.parse_args(argv, (config.Config, OracleArgs))
    own = {f.name for f in dataclasses.fields(OracleArgs)}
    args = OracleArgs(**{k: v for k, v in fields.items() if k in own})
    if not args.out:
        raise SystemExit("static_oracle: --out=FILE is required (the accuracy file)")
    cfg = config.make_config({k: v for k, v in fields.items() if k not in own}, tasks.PRESETS)
    return measure(cfg, args)


if __name__ == "__main__":
    main(sys.argv[1:])
