"""Any named method through the loop: `python -m experiments.run --method=grpo [--key=value ...]`, or under
`torchrun --standalone --nproc_per_node=N -m experiments.run ...`.

Fields come from the core's defaults, then a preset, then the method (experiments/methods.py), then the command
line; besides the core's fields (config.py) it takes the baselines' (baselines.BaselineConfig), the study's
(selectors.StudyConfig) and `--method`. The objective and the selector they name go into train.train's seams,
with the study's probe; everything else (checkpoints, resume, metrics, data parallelism) is the loop's own.
The harness's fields are kept in <out_dir>/lab.json, so `--resume=DIR` continues the same method.
"""

import dataclasses
import functools
import json
import os
import sys
from dataclasses import dataclass

import config
import tasks
import train
import update
from experiments import baselines, methods, selectors

LAB = (baselines.BaselineConfig, selectors.StudyConfig)


@dataclass
class MethodName:
    method: str = ""  # a named method of experiments/methods.py (grpo, paced_greedy, tb_history, ...)


def split(fields: dict) -> tuple:
    """(core fields, {lab class: its fields}, method name) of one merged dict."""
    core = {f.name for f in dataclasses.fields(config.Config)}
    lab = {c: {k: v for k, v in fields.items() if k in {f.name for f in dataclasses.fields(c)}} for c in LAB}
    return {k: v for k, v in fields.items() if k in core}, lab, fields.get("method", "")


def check_lab(cfg, base: baselines.BaselineConfig, study: selectors.StudyConfig):
    """The combinations the harness cannot run, named."""
    config.check_fields(base, baselines.RANGES, baselines.CHOICES)
    config.check_fields(study, selectors.RANGES, selectors.CHOICES)
    if base.algo == "flowrl" and (study.select != "uniform" or cfg.replay != "off"):
        raise SystemExit(f"config: algo=flowrl samples uniformly without replay (the baseline as published); got "
                         f"select={study.select}, replay={cfg.replay}: those are PACED-RL's switches")
    if base.algo == "grpo" and (study.select not in ("uniform", "oracle", "static", "history", "regress") or cfg.replay != "off"):
        raise SystemExit(f"config: algo=grpo takes select=uniform | oracle | static | history | regress and no replay; got "
                         f"select={study.select}, replay={cfg.replay} (paced and hybrid read Z_φ, which only the TB loss trains)")
    if study.select == "oracle" and (cfg.verifier != "testbed" or study.exact_metrics == "off"):
        raise SystemExit("config: select=oracle needs exact accuracies, which only the testbed's exact-match verifier "
                         f"has (got verifier={cfg.verifier}, exact_metrics={study.exact_metrics})")
    if study.exact_metrics == "on" and cfg.verifier != "testbed":
        raise SystemExit(f"config: exact_metrics=on needs the testbed verifier (exact match); got verifier={cfg.verifier}")


def make_configs(overrides: dict) -> tuple:
    """(Config, BaselineConfig, StudyConfig, method name): defaults, the preset's values, the method's, then `overrides`. The
    baselines (algo grpo, flowrl) sample prompts uniformly and have no replay buffer, as published: select and
    replay are set so unless given."""
    if overrides.get("resume"):
        with open(os.path.join(overrides["resume"], "lab.json")) as f:
            overrides = {**json.load(f), **overrides}
    method = overrides.get("method", "")
    merged = {**tasks.PRESETS.get(overrides.get("preset", ""), {}), **(methods.fields_of(method) if method else {}), **overrides}
    if merged.get("algo", "paced") != "paced":  # set explicitly to anything else, check_lab names the conflict
        merged = {"select": "uniform", "replay": "off", **merged}
    core, lab, _ = split(merged)
    base, study = baselines.BaselineConfig(**lab[baselines.BaselineConfig]), selectors.StudyConfig(**lab[selectors.StudyConfig])
    if study.regime:  # the regime's training file, built next to the testbed before the run
        from tasks import testbed

        if study.regime not in testbed.REGIMES:
            raise SystemExit(f"config: regime={study.regime!r}; expected one of {sorted(testbed.REGIMES)}")
        core["train_data"] = testbed.regime_path(core.get("testbed_dir", config.Config.testbed_dir), study.regime)
    if core.get("resume"):
        cfg = train.ckpt.load_run_config(core["resume"], core)
    else:
        cfg = config.make_config(core, tasks.PRESETS)
    check_lab(cfg, base, study)
    return cfg, base, study, method


def seams(base: baselines.BaselineConfig, study: selectors.StudyConfig) -> dict:
    """train.train's keyword arguments for this method: its objective, selector and probe."""
    objective = {"paced": update.PacedObjective, "grpo": functools.partial(baselines.GRPOObjective, lab=base),
                 "flowrl": functools.partial(baselines.FlowRLObjective, lab=base)}[base.algo]
    if base.dynamic_sampling:
        objective = (lambda inner: lambda run: baselines.DynamicSampling(inner(run), base))(objective)
    return {"objective": objective, "selector": functools.partial(selectors.make_selector, lab=study),
            "probes": [functools.partial(selectors.StudyProbe, lab=study)]}


def prepare(cfg, study: selectors.StudyConfig):
    """Rank 0, before the data is read: the bundled tasks checked, a regime's training file built on first use."""
    tasks.check_for(cfg)
    if study.regime and not os.path.exists(cfg.train_data):
        from tasks import testbed

        testbed.make_regime(cfg.testbed_dir, study.regime)


def main(argv=None):
    overrides = config.parse_args(sys.argv[1:] if argv is None else argv, (config.Config, *LAB, MethodName))
    cfg, base, study, method = make_configs(overrides)
    if int(os.environ.get("RANK", "0")) == 0 and not cfg.resume and not train.ckpt.ckpt_dirs(cfg.out_dir):
        os.makedirs(cfg.out_dir, exist_ok=True)
        lab = {"method": method, **dataclasses.asdict(base), **dataclasses.asdict(study)}
        train.ckpt.write_json(os.path.join(cfg.out_dir, "lab.json"), lab)
    return train.run_main(cfg, prepare=functools.partial(prepare, study=study), **seams(base, study))


if __name__ == "__main__":
    main()
