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
    if base.dynamic_sampling and cfg.group_size < 2:
        raise SystemExit("config: dynamic_sampling keeps groups whose rewards differ, which a group of one never has; "
                         "use group_size >= 2")
    if base.algo in ("grpo", "flowrl") and cfg.group_size < 2:
        raise SystemExit(f"config: algo={base.algo} learns from group-normalized advantages, which are 0 for a group of "
                         f"one: group_size={cfg.group_size} trains nothing; use group_size >= 2")
    if study.exact_metrics == "on" and cfg.verifier != "testbed":
        raise SystemExit(f"config: exact_metrics=on needs the testbed verifier (exact match); got verifier={cfg.verifier}")


def resumed_lab(overrides: dict) -> dict:
    """A resumed run's harness fields (lab.json), with `overrides`: a method or harness field that differs from the
    recorded one is refused by name (they define the run); the core's fields go to checkpoint.load_run_config."""
    run_dir = overrides["resume"]
    path = os.path.join(run_dir, "lab.json")
    if not os.path.exists(path):
        if not os.path.isdir(run_dir):
            raise SystemExit(f"resume: {run_dir} does not exist")
        raise SystemExit(f"resume: {run_dir} has no lab.json: it was not started by the research harness; resume it "
                         f"with python train.py --resume={run_dir}")
    try:
        with open(path) as f:
            lab = json.load(f)
    except ValueError as e:
        raise SystemExit(f"resume: {path} is unreadable ({e})") from None
    names = {f.name for c in (*LAB, MethodName) for f in dataclasses.fields(c)}
    differ = {k: (lab.get(k), v) for k, v in overrides.items() if k in names and lab.get(k) != v}
    if differ:
        raise SystemExit(f"resume: {', '.join(f'{k} (recorded {a!r}, asked {b!r})' for k, (a, b) in differ.items())} "
                         f"cannot change during a run; start a new run with another --out_dir")
    return lab


def make_configs(overrides: dict) -> tuple:
    """(Config, BaselineConfig, StudyConfig, method name): defaults, the preset's values, the method's, then `overrides`. The
    baselines (algo grpo, flowrl) sample prompts uniformly and have no replay buffer, as published: select and
    replay are set so unless given. On resume: the recorded run's fields, with only what may change mid-run applied."""
    if overrides.get("resume"):
        lab = resumed_lab(overrides)
        core, _, _ = split(overrides)
        cfg = train.ckpt.load_run_config(overrides["resume"], core)
        _, fields, method = split(lab)
        base, study = baselines.BaselineConfig(**fields[baselines.BaselineConfig]), selectors.StudyConfig(**fields[selectors.StudyConfig])
        check_lab(cfg, base, study)
        return cfg, base, study, method
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


def prepare(cfg, study: selectors.StudyConfig, lab: dict = None):
    """Rank 0, holding the run directory's lock, before the data is read: a new run's harness fields written to
    <out_dir>/lab.json; the bundled tasks checked, a regime's training file built on first use."""
    if lab is not None and not cfg.resume:
        train.ckpt.write_json(os.path.join(cfg.out_dir, "lab.json"), lab)
    tasks.check_for(cfg)
    if study.regime and not os.path.exists(cfg.train_data):
        from tasks import testbed

        testbed.make_regime(cfg.testbed_dir, study.regime)


def main(argv=None):
    overrides = config.parse_args(sys.argv[1:] if argv is None else argv, (config.Config, *LAB, MethodName))
    cfg, base, study, method = make_configs(overrides)
    lab = {"method": method, **dataclasses.asdict(base), **dataclasses.asdict(study)}
    return train.run_main(cfg, prepare=functools.partial(prepare, study=study, lab=lab), **seams(base, study))


if __name__ == "__main__":
    main()
