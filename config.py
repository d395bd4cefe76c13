"""The run's configuration: `python train.py --key=value ...` (or under torchrun); `--help` lists every field.

Every number of a run is a field of Config, with a one-line comment (unit, rule of thumb, paper value)
that `--help` prints. Values come from the defaults, then a preset (tasks.PRESETS: the paper's settings,
the SmolLM2 task), then the command line. A Config checks itself when it is made (check_config): a value
out of range or an inconsistent combination stops with an error that names the field. The research
harness keeps its own fields (experiments/) and parses them with the same functions.
"""

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass

import verify


@dataclass
class Config:
    # --- run
    out_dir: str = "runs/paced"  # metrics.jsonl, checkpoints and the prompt-embedding cache go here
    seed: int = 0  # seeds the pool order, each prompt's sampling noise, Z_φ's init, the replay draws
    resume: str = ""  # a run directory: continue from its newest checkpoint (its config, then CLI overrides)
    max_steps: int = 250  # optimizer steps; the paper runs 150 on DeepScaleR
    device: str = "auto"  # auto | cpu | cuda | mps; under torchrun with CUDA each rank takes cuda:LOCAL_RANK
    dtype: str = "float32"  # float32 | bfloat16 (bf16 compute, fp32 weights) | auto (bf16 where it is native)
    dist_timeout_s: int = 900  # process-group timeout: a dead rank stops the others after this long
    preset: str = ""  # a named set of defaults (tasks.PRESETS, e.g. paper_math_1.5b); --key=value wins
    attn_impl: str = "sdpa"  # attention kernel: sdpa | flash_attention_2 (needs flash-attn) | eager
    grad_ckpt: bool = False  # gradient checkpointing: recompute activations in backward (large models)
    fsdp: bool = False  # shard the policy's weights, gradients and AdamW state over ranks (FSDP2)
    # --- model and data
    model: str = "testbed/model"  # HF hub id or local path of the initial policy (also e(x)'s model)
    train_data: str = "testbed/train.jsonl"  # json / jsonl / parquet prompts with the fields below
    eval_data: str = "testbed/heldout.jsonl"  # held-out prompts: evaluated, never trained on or pooled
    prompt_field: str = "prompt"  # the field holding the prompt text (DeepScaleR, MATH-500: problem)
    answer_field: str = "answer"  # the field holding the reference answer given to the verifier
    eval_prompt_field: str = ""  # the held-out file's prompt field, if it differs ("" = prompt_field)
    eval_answer_field: str = ""  # the held-out file's answer field, if it differs ("" = answer_field)
    prompt_suffix: str = ""  # appended to every prompt, e.g. an instruction to box the final answer
    shot_prompt: str = ""  # a worked example's question, an earlier chat turn before every prompt
    shot_response: str = ""  # its answer, in the format the verifier checks (both shot fields or neither)
    verifier: str = "testbed"  # a name in verify.VERIFIERS: testbed | math | math_boxed | code
    verifier_workers: int = 1  # responses verified at once (the code verifier: concurrent sandboxes)
    testbed_dir: str = "testbed"  # the bundled testbed, checked to be a shipped build if read; "" = none
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted (paper: 1024)
    label_fields: str = "level,form"  # row fields naming a prompt's group: each group's chosen share is logged
    # --- rollouts
    prompts_per_step: int = 32  # B, prompts per step over all ranks (divisible by the world size)
    group_size: int = 8  # G, responses per prompt (paper: 8)
    max_new_tokens: int = 6  # response-length cap in tokens (paper: 3072; the testbed needs ≤ 5)
    rollout_batch: int = 0  # prompts per generation call (bounds the KV cache); 0 = all of a rank's
    sampler: str = "dynamic"  # dynamic (growing KV cache) | static (StaticCache, CUDA-graph decode steps)
    micro_batch: int = 0  # samples per forward/backward, gradients accumulated; 0 = all at once
    logit_chunk: int = 0  # response positions per output-head chunk (big vocabularies); 0 = all
    shared_prefix: bool = False  # one forward per distinct prompt, its G responses from its KV cache
    updates_per_batch: int = 1  # optimizer steps per rollout batch, each on 1/U of it; 1 = on-policy
    temperature: float = 1.0  # sampling temperature (paper: 1.0); log-probs are of this distribution
    kl_every: int = 1  # log β·KL(π_old ‖ π_θ) every this many steps (one no-grad pass); 0 = never
    # --- PACED-RL
    beta: float = 0.05  # KL strength; p̂ = β·log Z_φ (paper: 0.05, i.e. reward multiplier 20)
    tau: float = 0.5  # target accuracy of selected prompts (paper: 0.5)
    explore_frac: float = 0.0  # share of the B prompts drawn uniformly from the rest of the pool (paper: 0)
    pool_size: int = 64  # candidates scored per step (a few × B); 0 scores the whole data set
    logz_hidden: int = 256  # width of the Z_φ MLP (paper: 3-layer MLP, width not given)
    logz_features: str = "mean"  # e(x): mean (every prompt token) | distinct (tokens not shared by all prompts) | mean_last
    logz_layer: int = -1  # e(x)'s hidden state: an index into the initial model's hidden states (-1: the last layer)
    logz_output: str = "logistic"  # logistic (σ, the linear output's gradient) | linear (unbounded) | sigmoid
    logz_init_acc: float = 0.5  # p0: every prompt's initial estimate p̂; log Z starts at p0/β
    logz_memory_passes: int = 0  # Z_φ steps a step on the TB log Z term over every group observed so far; 0: none
    logz_memory_half_life: float = 4.0  # steps: an observation's weight in that fit is 0.5^(age/this); 0: all alike
    # --- replay
    replay: str = "on"  # on | off: the error-prioritized buffer of correct trajectories
    replay_capacity: int = 128  # buffer size (paper: 128)
    replay_add_k: int = 64  # highest-error correct trajectories added per step (paper: 64)
    replay_per_step: int = 16  # replayed samples joining each update (paper: not given)
    replay_anchor: str = "current"  # π_old of a replayed sample: current (this update's) | behavior
    replay_is_clip: float = 1.0  # replayed weight min(clip, π_θold/π_behavior), detached; 0 = no weight
    replay_trains_logz: str = "group"  # replayed samples train Z_φ: group (toward their group's a(x)) | raw | off
    # --- optimization
    lr: float = 2e-4  # policy learning rate (AdamW); 3e-4 is unstable on the testbed; paper: 1e-6 at 1.5B
    logz_lr: float = 1e-2  # Z_φ learning rate (Adam): a small MLP wants a far larger one than the LLM
    logz_lr_fan_in: int = 96  # > 0: layer lr = logz_lr·sqrt(this/fan_in) (96: the testbed's); 0 = one lr
    weight_decay: float = 0.0  # policy weight decay (paper: 0.1)
    grad_clip: float = 1.0  # grad-norm clip of the policy θ (not of Z_φ); 0 = off
    nonfinite_patience: int = 3  # steps in a row skipped for a NaN / inf loss or gradient before a stop
    starve_warn_steps: int = 10  # warn when a labelled group goes this many steps unchosen; 0 = never
    # --- evaluation, logging, checkpoints
    eval_every: int = 50  # evaluate held-out prompts every this many steps (and at step 0 and the end)
    eval_samples: int = 32  # samples per held-out prompt at `temperature` (the paper: 32 for AIME)
    eval_greedy: bool = False  # also the greedy accuracy of the held-out prompts (eval_acc_greedy)
    eval_batch: int = 64  # held-out prompts per generation batch
    ckpt_every: int = 50  # write a checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2  # checkpoints kept; older ones are deleted
    report_to: str = ""  # mirror metrics.jsonl to tensorboard and/or wandb (comma-separated; report.py)

    def __post_init__(self):
        check_config(self)


def field_docs(cls) -> dict:
    """{field: comment} from the source of a config dataclass, for --help."""
    docs = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): \w+ = .*?  # (.*)", line)
        if m:
            docs[m.group(1)] = m.group(2)
    return docs


def parse_value(key: str, raw: str, default):
    try:
        if isinstance(default, bool):
            if raw.lower() in ("1", "true", "on", "yes"):
                return True
            if raw.lower() in ("0", "false", "off", "no"):
                return False
            raise ValueError
        return type(default)(raw)
    except ValueError:
        raise SystemExit(f"config: --{key}={raw!r} is not a valid {type(default).__name__}") from None


def parse_args(argv, classes=(Config,)) -> dict:
    """`--key=value` pairs -> {key: typed value}, the keys being fields of `classes`; `--help` prints every field."""
    defaults = {f.name: getattr(c(), f.name) for c in classes for f in dataclasses.fields(c)}
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(__doc__.split("\n\n")[0])
            for c in classes:
                docs = field_docs(c)
                print(f"\n{c.__name__} (override with --key=value):")
                for f in dataclasses.fields(c):
                    print(f"  {'--' + f.name + '=' + repr(defaults[f.name]):<40} {docs.get(f.name, '')}")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"config: expected --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key not in defaults:
            raise SystemExit(f"config: unknown key {key!r}; run `python train.py --help` for the list")
        out[key] = parse_value(key, raw, defaults[key])
    return out


def make_config(overrides: dict, presets: dict = None) -> Config:
    """Defaults, then the named preset's values (presets: {name: fields}), then `overrides`."""
    name, presets = overrides.get("preset", ""), presets or {}
    if name and name not in presets:
        raise SystemExit(f"config: unknown preset {name!r}; presets: {sorted(presets)}")
    return Config(**{**presets.get(name, {}), **overrides})


# The range of every numeric field, in interval notation ("[" closed, "(" open, inf unbounded). check_config
# refuses a value outside it, and any NaN or infinity, with one line naming the field, its value and the range.
RANGES = {
    "seed": "[0, inf)", "max_steps": "[0, inf)", "dist_timeout_s": "[1, inf)", "verifier_workers": "[1, inf)",
    "max_prompt_tokens": "[1, inf)", "prompts_per_step": "[1, inf)", "group_size": "[1, inf)",
    "max_new_tokens": "[1, inf)", "rollout_batch": "[0, inf)", "micro_batch": "[0, inf)", "logit_chunk": "[0, inf)",
    "updates_per_batch": "[1, inf)", "temperature": "(0, inf)", "kl_every": "[0, inf)", "beta": "(0, inf)",
    "tau": "[0, 1]", "explore_frac": "[0, 1]", "pool_size": "[0, inf)", "logz_hidden": "[1, inf)",
    "logz_init_acc": "[0, 1]", "logz_memory_passes": "[0, inf)", "logz_layer": "[-1000, 1000]", "logz_memory_half_life": "[0, inf)", "replay_capacity": "[1, inf)", "replay_add_k": "[0, inf)", "replay_per_step": "[0, inf)",
    "replay_is_clip": "[0, inf)", "lr": "(0, inf)", "logz_lr": "(0, inf)", "logz_lr_fan_in": "[0, inf)",
    "weight_decay": "[0, inf)", "grad_clip": "[0, inf)", "nonfinite_patience": "[1, inf)", "starve_warn_steps": "[0, inf)", "eval_every": "[1, inf)",
    "eval_samples": "[1, inf)", "eval_batch": "[1, inf)", "ckpt_every": "[1, inf)", "keep_ckpts": "[1, inf)",
}
CHOICES = {"replay": ("on", "off"), "replay_anchor": ("current", "behavior"),
           "replay_trains_logz": ("off", "raw", "group"), "sampler": ("dynamic", "static"), "dtype": ("float32", "bfloat16", "auto"),
           "logz_output": ("linear", "logistic", "sigmoid"), "logz_features": ("mean", "mean_last", "distinct"),
           "attn_impl": ("sdpa", "flash_attention_2", "eager")}


def in_range(value: float, interval: str) -> bool:
    """Whether a finite `value` lies in an interval written as in RANGES, e.g. "(0, 1]"."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo < value if interval[0] == "(" else lo <= value) and (value < hi if interval[-1] == ")" else value <= hi)


def check_fields(cfg, ranges: dict, choices: dict, where: str = "config"):
    """Every numeric field of `ranges` finite and inside its interval, every field of `choices` one of its values;
    the first that is not stops the run, named."""
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise SystemExit(f"{where}: {k}={getattr(cfg, k)!r}; expected one of {allowed}")
    for k, interval in ranges.items():
        v = getattr(cfg, k)
        if not math.isfinite(v) or not in_range(v, interval):
            raise SystemExit(f"{where}: {k}={v!r} is out of range: expected a finite value in {interval}")


def check_config(cfg: Config):
    """Refuse a value out of range or a combination the code cannot run, naming the field."""
    check_fields(cfg, RANGES, CHOICES)
    if cfg.updates_per_batch > cfg.prompts_per_step:
        raise SystemExit(f"config: updates_per_batch={cfg.updates_per_batch} exceeds prompts_per_step={cfg.prompts_per_step}")
    if 0 < cfg.pool_size < cfg.prompts_per_step:
        raise SystemExit(f"config: pool_size={cfg.pool_size} is smaller than prompts_per_step={cfg.prompts_per_step}")
    if cfg.fsdp and cfg.logit_chunk > 0:
        raise SystemExit("config: logit_chunk calls the model's body and head separately, which FSDP's sharded root "
                         "does not allow; with --fsdp=true bound the logits' memory with micro_batch instead")
    if set(cfg.report_to.split(",")) - {"", "tensorboard", "wandb"}:
        raise SystemExit(f"config: report_to={cfg.report_to!r}; expected a comma-separated subset of tensorboard, wandb")
    if cfg.fsdp and cfg.sampler == "static":
        raise SystemExit("config: sampler=static keeps a whole copy of the model's cache and compiled steps, which a "
                         "sharded (FSDP) model cannot run; use --sampler=dynamic with --fsdp=true")
    if bool(cfg.shot_prompt) != bool(cfg.shot_response):
        raise SystemExit(f"config: a worked example needs both shot_prompt and shot_response; got shot_prompt="
                         f"{cfg.shot_prompt!r}, shot_response={cfg.shot_response!r}")
    if cfg.verifier not in verify.VERIFIERS:
        raise SystemExit(f"config: verifier={cfg.verifier!r}; known: {sorted(verify.VERIFIERS)}")
