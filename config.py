"""The run's configuration: `python train.py --key=value ...` (or under torchrun); `--help` lists every field.

Every number of a run is a field of Config, with a one-line comment (unit, rule of thumb, paper value)
that `--help` prints. Values come from the defaults, then a preset (PRESETS: the paper's settings, the
SmolLM2 task), then a named method (methods.py), then the command line. A Config checks itself when it is
made (check_config): an inconsistent combination stops with an error that names the field.
"""

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass

import methods
import verify
from tasks import smollm2


@dataclass
class Config:
    # --- run
    out_dir: str = "runs/paced"  # metrics.jsonl, checkpoints and the prompt-embedding cache go here
    seed: int = 0  # seeds the pool order, the sampling noise of every prompt, Z_φ init, replay draws
    resume: str = ""  # a run directory: continue from its newest checkpoint (its config, then CLI overrides)
    max_steps: int = 250  # optimizer steps; the paper runs 150 on DeepScaleR
    device: str = "auto"  # auto | cpu | cuda | mps; under torchrun with CUDA each rank takes cuda:LOCAL_RANK
    dtype: str = "float32"  # float32 | bfloat16: bf16 compute (autocast) with fp32 weights and AdamW state (paced_rl.amp) | auto: bf16 where the hardware has it (distributed.bf16_pays)
    dist_timeout_s: int = 900  # process-group timeout: a dead rank stops the others after this long
    preset: str = ""  # a named set of defaults (PRESETS below, e.g. paper_math_1.5b); --key=value still wins
    method: str = ""  # a named method of methods.py (grpo, paced_greedy, tb_history, ...), applied after the preset
    attn_impl: str = "sdpa"  # attention kernel: sdpa (PyTorch) | flash_attention_2 (needs flash-attn) | eager
    grad_ckpt: bool = False  # gradient checkpointing: recompute activations in backward (large models)
    fsdp: bool = False  # shard the policy's weights, gradients and AdamW state over ranks with FSDP2
    # --- model and data
    model: str = "testbed/model"  # HF hub id or local path of the initial policy (also π_ref, and e(x))
    train_data: str = "testbed/train.jsonl"  # json / jsonl prompts with the fields below
    eval_data: str = "testbed/heldout.jsonl"  # held-out prompts: evaluated, never trained on or pooled
    prompt_field: str = "prompt"  # the field holding the prompt text (DeepScaleR, MATH-500, AIME: problem)
    answer_field: str = "answer"  # the field holding the reference answer given to the verifier
    eval_prompt_field: str = ""  # the held-out file's prompt field, if it differs ("" = prompt_field)
    eval_answer_field: str = ""  # the held-out file's answer field, if it differs ("" = answer_field)
    prompt_suffix: str = ""  # appended to every prompt text, e.g. an instruction to box the final answer
    shot_prompt: str = ""  # a worked example's question, shown before every prompt as an earlier chat turn ("" = none)
    shot_response: str = ""  # its answer, in the format the verifier checks (both shot fields or neither)
    verifier: str = "testbed"  # a name in verify.VERIFIERS: testbed | math | code
    verifier_workers: int = 1  # responses verified at once (the code verifier: concurrent sandboxes)
    testbed_dir: str = "testbed"  # the bundled task's folder (shipped; checked before a run whose model or data is in it)
    testbed_check: bool = True  # refuse a testbed that is not a shipped build (tasks/testbed.py SHIPPED)
    regime: str = ""  # a difficulty regime of the testbed's training pool (testbed.REGIMES: base | mid | high); sets train_data
    max_prompt_tokens: int = 1024  # longer prompts are skipped and counted (paper: 1024)
    # --- rollouts
    prompts_per_step: int = 32  # B, prompts per step over all ranks (divisible by the world size)
    group_size: int = 8  # G, responses per prompt (paper: 8)
    max_new_tokens: int = 6  # response-length cap in tokens (paper: 3072; the testbed needs ≤ 5)
    rollout_batch: int = 0  # prompts per generation call (bounds KV-cache memory); 0 = all of a rank's prompts
    micro_batch: int = 0  # samples per forward/backward; gradients accumulate, one sync per step; 0 = all
    logit_chunk: int = 0  # response positions per output-head chunk, recomputed in backward (big vocabularies); 0 = all
    shared_prefix: bool = False  # one forward per distinct prompt in the log-prob passes, its G responses continuing from its KV cache (paced_rl)
    updates_per_batch: int = 1  # optimizer steps per rollout batch, each on 1/U of its prompts (FlowRL's code: 16); 1 = on-policy
    temperature: float = 1.0  # sampling temperature (paper: 1.0); log-probs are of this distribution
    # --- algorithm
    algo: str = "paced"  # paced (this paper) | grpo | flowrl: the baselines sample uniformly, without replay
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, roll out more prompts until B are kept
    dyn_max_rounds: int = 8  # dynamic sampling: at most this many rollout rounds of B prompts per step (DAPO: max_num_gen_batches)
    adv_eps: float = 1e-4  # GRPO / FlowRL advantage (r − group mean)/(group std + adv_eps) (TRL: 1e-4)
    clip_eps: float = 0.2  # GRPO: the token ratio π_θ/π_old is clipped to [1 − ε, 1 + ε] (TRL: 0.2)
    grpo_agg: str = "token_mean"  # GRPO loss aggregation: token_mean (Σ tokens / global token count) | seq_mean
    kl_every: int = 1  # log β·KL(π_old ‖ π_θ) every this many steps: one no-grad pass over the fresh samples after the update; 0 = never
    kl_coef: float = 0.0  # GRPO: weight of the per-token k3 KL to the initial model (TRL default: 0); > 0 loads π_ref
    flowrl_reward_mult: float = 15.0  # FlowRL: multiplier of the group-normalized reward in the residual (authors: 15)
    flowrl_is_clip: float = 10.0  # FlowRL: importance weight min(clip, π_θ/π_old) of a sequence, detached (authors: 10)
    # --- PACED-RL
    beta: float = 0.05  # KL strength; p̂ = β·log Z_φ (paper: 0.05, i.e. reward multiplier 20)
    tau: float = 0.5  # target accuracy of selected prompts (paper: 0.5)
    select: str = "paced"  # the predictor that picks B of the pool near τ: paced (β·log Z_φ) | uniform | history | regress | hybrid | oracle (selection.py)
    explore_frac: float = 0.0  # share of the B prompts drawn uniformly from the rest of the pool (0: the paper's greedy rule; RESULTS.md)
    pool_size: int = 64  # candidates scored per step (a few × B); 0 scores the whole data set
    history_forget: float = 1.0  # history / hybrid: λ, old evidence discounted per observation (MoPPS recipe default: 1, none)
    history_prior_a: float = 1.0  # history: Beta prior α₀ of a prompt never rolled out (MoPPS: 1)
    history_prior_b: float = 1.0  # history: Beta prior β₀ (MoPPS: 1)
    history_draw: str = "thompson"  # history / hybrid rank by: thompson (one posterior draw, MoPPS) | mean
    hybrid_n0: float = 8.0  # hybrid: pseudo-counts of Z_φ's prior (8 = one group's worth of evidence)
    regress_lr: float = 1e-2  # regress: Adam learning rate of the accuracy regressor (as logz_lr)
    exact_metrics: str = "auto"  # exact accuracies (exact.py): auto = in evaluation on the testbed | on = also each step's selection quality (study.sh) | off
    quality_every: int = 1  # with exact_metrics=on: the selection quality every k steps (the oracle logs it every step, free)
    logz_hidden: int = 256  # width of the Z_φ MLP (paper: 3-layer MLP, width not given)
    logz_features: str = "mean"  # e(x): mean | mean_last (mean-pooled and last-token hidden states)
    logz_output: str = "sigmoid"  # sigmoid: p̂ kept in [0, 1] | linear: unbounded MLP output
    logz_init_acc: float = 0.5  # p0: every prompt's initial estimate p̂; log Z starts at p0/β
    # --- replay
    replay: str = "on"  # on | off: the error-prioritized buffer of correct trajectories
    replay_capacity: int = 128  # buffer size (paper: 128)
    replay_add_k: int = 64  # highest-error correct trajectories added per step (paper: 64)
    replay_per_step: int = 16  # replayed samples joining each update (paper: not given)
    replay_anchor: str = "current"  # current: π_old = the policy before this update | behavior: the sampler's
    replay_is_clip: float = 1.0  # replayed weight min(clip, π_θold/π_behavior), detached; 0 = no weight
    replay_trains_logz: bool = False  # correct-only samples would push log Z_φ (so p̂) up: off
    # --- optimization
    lr: float = 2e-4  # policy learning rate (AdamW); 3e-4 is unstable on the testbed; paper: 1e-6 at 1.5B
    logz_lr: float = 1e-2  # Z_φ learning rate (Adam): a small MLP wants a far larger one than the LLM
    logz_lr_fan_in: int = 96  # > 0: each Z_φ layer trains at logz_lr·sqrt(this/fan_in), so Adam moves every weight by the same share of its initial scale at any embedding width (96: the testbed's, where logz_lr was tuned); 0 = logz_lr everywhere
    weight_decay: float = 0.0  # policy weight decay (paper: 0.1)
    nonfinite_patience: int = 3  # steps in a row whose update was skipped for a NaN / inf loss or gradient before the run stops
    grad_clip: float = 1.0  # grad-norm clip of the policy θ (Z_φ is not clipped: its scale is its own); 0 = off
    # --- evaluation, logging, checkpoints
    eval_every: int = 50  # evaluate held-out prompts every this many steps (and at step 0 and the end)
    eval_samples: int = 32  # samples per held-out prompt at `temperature` (the paper: 32 for AIME)
    eval_greedy: bool = False  # also the greedy accuracy of the held-out prompts (eval_acc_greedy)
    eval_batch: int = 64  # held-out prompts per generation batch
    ckpt_every: int = 50  # write a checkpoint every this many steps (and at the end)
    keep_ckpts: int = 2  # checkpoints kept; older ones are deleted

    def __post_init__(self):
        check_config(self)


# The paper's settings (docs/DESIGN.md, "The paper's experiments"). Hub ids are downloaded on first use; B, the pool and the
# micro-batch sizes are ours (the paper does not give them); see docs/REFERENCE.md for hardware.
_PAPER_MATH = dict(
    train_data="agentica-org/DeepScaleR-Preview-Dataset", eval_data="HuggingFaceH4/MATH-500:test",
    prompt_field="problem", answer_field="answer", verifier="math",
    prompt_suffix=" Let's think step by step and output the final answer within \\boxed{}.",
    group_size=8, temperature=1.0, max_prompt_tokens=1024, max_new_tokens=3072, beta=0.05, tau=0.5,
    lr=1e-6, weight_decay=0.1, max_steps=150, prompts_per_step=128, pool_size=512, eval_every=10,
    eval_samples=4, eval_batch=64, ckpt_every=10, dtype="bfloat16", shared_prefix=True, logz_hidden=1024, verifier_workers=8,
    testbed_dir="", out_dir="runs/paper_math")
# SmolLM2-135M-Instruct on natural-language arithmetic (tasks/smollm2.py), sized for a 2-core CPU (RESULTS.md)
_SMOL = "testbed/" + smollm2.SUBDIR
PRESETS = {
    "smollm2_arith": dict(model=_SMOL + "/model", train_data=_SMOL + "/train.jsonl", eval_data=_SMOL + "/heldout.jsonl",
                          verifier="math_boxed", prompt_suffix=smollm2.SUFFIX, shot_prompt=smollm2.SHOT[0],
                          shot_response=smollm2.SHOT[1], temperature=0.7, max_new_tokens=48, prompts_per_step=8,
                          group_size=8, pool_size=32, rollout_batch=0, micro_batch=16, logit_chunk=16, lr=1e-5,
                          max_steps=16, eval_every=8, eval_samples=2, eval_greedy=True, eval_batch=40, ckpt_every=8,
                          shared_prefix=True, dtype="auto", kl_every=4, out_dir="runs/smollm2"),
    "paper_math_1.5b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-1.5B", "micro_batch": 16, "rollout_batch": 64,
                        "logit_chunk": 512},
    "paper_math_7b": {**_PAPER_MATH, "model": "Qwen/Qwen2.5-Math-7B", "micro_batch": 4, "rollout_batch": 32,
                      "grad_ckpt": True, "fsdp": True},
}


def field_docs():
    """{field: comment} from the source of Config, for --help."""
    docs = {}
    for line in inspect.getsource(Config).splitlines():
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


def parse_args(argv) -> dict:
    """`--key=value` pairs -> {key: typed value}; `--help` prints every field."""
    defaults = Config()
    known = {f.name for f in dataclasses.fields(Config)}
    out = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            docs = field_docs()
            print(__doc__.split("\n\n")[0] + "\n\nConfig (override with --key=value):")
            for f in dataclasses.fields(Config):
                print(f"  {'--' + f.name + '=' + repr(getattr(defaults, f.name)):<40} {docs.get(f.name, '')}")
            raise SystemExit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"config: expected --key=value, got {arg!r}")
        key, raw = arg[2:].split("=", 1)
        if key not in known:
            raise SystemExit(f"config: unknown key {key!r}; run `python train.py --help` for the list")
        out[key] = parse_value(key, raw, getattr(defaults, key))
    return out


def make_config(overrides: dict) -> Config:
    """Defaults, then the preset's values, then the named method's, then the command line's. The baselines
    (algo grpo, flowrl) sample prompts uniformly and have no replay buffer, as published: select and replay
    are set so unless given."""
    name = overrides.get("preset", "")
    if name and name not in PRESETS:
        raise SystemExit(f"config: unknown preset {name!r}; presets: {sorted(PRESETS)}")
    method = overrides.get("method", "")
    merged = {**PRESETS.get(name, {}), **(methods.fields_of(method) if method else {}), **overrides}
    if merged.get("regime"):  # the regime's training file, built next to the testbed on first use
        from tasks import testbed

        if merged["regime"] not in testbed.REGIMES:
            raise SystemExit(f"config: regime={merged['regime']!r}; expected one of {sorted(testbed.REGIMES)}")
        merged["train_data"] = testbed.regime_path(merged.get("testbed_dir", Config.testbed_dir), merged["regime"])
    if merged.get("algo", "paced") != "paced":  # set explicitly to anything else, check_config names the conflict
        merged = {"select": "uniform", "replay": "off", **merged}
    return Config(**merged)


# The range of every numeric field, in interval notation ("[" closed, "(" open, inf unbounded). check_config
# refuses a value outside it, and any NaN or infinity, with one line naming the field, its value and the range.
RANGES = {
    "seed": "[0, inf)", "max_steps": "[0, inf)", "dist_timeout_s": "[1, inf)", "verifier_workers": "[1, inf)",
    "max_prompt_tokens": "[1, inf)", "prompts_per_step": "[1, inf)", "group_size": "[1, inf)",
    "max_new_tokens": "[1, inf)", "rollout_batch": "[0, inf)", "micro_batch": "[0, inf)", "logit_chunk": "[0, inf)",
    "updates_per_batch": "[1, inf)", "temperature": "(0, inf)", "dyn_max_rounds": "[1, inf)", "adv_eps": "[0, inf)",
    "clip_eps": "[0, 1)", "kl_every": "[0, inf)", "kl_coef": "[0, inf)", "flowrl_reward_mult": "[0, inf)",
    "flowrl_is_clip": "[0, inf)", "beta": "(0, inf)", "tau": "[0, 1]", "explore_frac": "[0, 1]", "pool_size": "[0, inf)",
    "history_forget": "(0, 1]", "history_prior_a": "(0, inf)", "history_prior_b": "(0, inf)", "hybrid_n0": "(0, inf)",
    "regress_lr": "(0, inf)", "quality_every": "[1, inf)", "logz_hidden": "[1, inf)", "logz_init_acc": "[0, 1]",
    "replay_capacity": "[1, inf)", "replay_add_k": "[0, inf)", "replay_per_step": "[0, inf)", "replay_is_clip": "[0, inf)",
    "lr": "(0, inf)", "logz_lr": "(0, inf)", "logz_lr_fan_in": "[0, inf)", "weight_decay": "[0, inf)",
    "grad_clip": "[0, inf)", "nonfinite_patience": "[1, inf)", "eval_every": "[1, inf)", "eval_samples": "[1, inf)", "eval_batch": "[1, inf)",
    "ckpt_every": "[1, inf)", "keep_ckpts": "[1, inf)",
}


def in_range(value: float, interval: str) -> bool:
    """Whether a finite `value` lies in an interval written as in RANGES, e.g. "(0, 1]"."""
    lo, hi = (float(x) for x in interval[1:-1].split(","))
    return (lo < value if interval[0] == "(" else lo <= value) and (value < hi if interval[-1] == ")" else value <= hi)


def check_ranges(cfg: Config):
    """Every numeric field finite and inside its RANGES interval; the first that is not stops the run, named."""
    for k, interval in RANGES.items():
        v = getattr(cfg, k)
        if not math.isfinite(v) or not in_range(v, interval):
            raise SystemExit(f"config: {k}={v!r} is out of range: expected a finite value in {interval}")


def check_config(cfg: Config):
    """Refuse a value out of range or a combination the code cannot run, naming the field."""
    choices = {"algo": ("paced", "grpo", "flowrl"), "grpo_agg": ("token_mean", "seq_mean"),
               "select": ("paced", "uniform", "history", "regress", "hybrid", "oracle"),
               "history_draw": ("thompson", "mean"), "exact_metrics": ("auto", "on", "off"), "replay": ("on", "off"), "replay_anchor": ("current", "behavior"),
               "dtype": ("float32", "bfloat16", "auto"), "logz_output": ("sigmoid", "linear"),
               "logz_features": ("mean", "mean_last"), "attn_impl": ("sdpa", "flash_attention_2", "eager")}
    for k, allowed in choices.items():
        if getattr(cfg, k) not in allowed:
            raise SystemExit(f"config: {k}={getattr(cfg, k)!r}; expected one of {allowed}")
    check_ranges(cfg)
    if cfg.algo == "flowrl" and (cfg.select != "uniform" or cfg.replay != "off"):
        raise SystemExit(f"config: algo=flowrl samples uniformly without replay (the baseline as published); got "
                         f"select={cfg.select}, replay={cfg.replay}: those are PACED-RL's switches")
    if cfg.algo == "grpo" and (cfg.select not in ("uniform", "oracle", "history", "regress") or cfg.replay != "off"):
        raise SystemExit(f"config: algo=grpo takes select=uniform | oracle | history | regress and no replay; got "
                         f"select={cfg.select}, replay={cfg.replay} (paced and hybrid read Z_φ, which only the TB loss trains)")
    if cfg.select == "oracle" and (cfg.verifier != "testbed" or cfg.exact_metrics == "off"):
        raise SystemExit("config: select=oracle needs exact accuracies, which only the testbed's exact-match verifier "
                         f"has (got verifier={cfg.verifier}, exact_metrics={cfg.exact_metrics})")
    if cfg.exact_metrics == "on" and cfg.verifier != "testbed":
        raise SystemExit(f"config: exact_metrics=on needs the testbed verifier (exact match); got verifier={cfg.verifier}")
    if cfg.updates_per_batch > cfg.prompts_per_step:
        raise SystemExit(f"config: updates_per_batch={cfg.updates_per_batch} exceeds prompts_per_step={cfg.prompts_per_step}")
    if cfg.select != "uniform" and 0 < cfg.pool_size < cfg.prompts_per_step:
        raise SystemExit(f"config: pool_size={cfg.pool_size} is smaller than prompts_per_step={cfg.prompts_per_step}")
    if cfg.fsdp and cfg.logit_chunk > 0:
        raise SystemExit("config: logit_chunk calls the model's body and head separately, which FSDP's sharded root "
                         "does not allow; with --fsdp=true bound the logits' memory with micro_batch instead")
    if bool(cfg.shot_prompt) != bool(cfg.shot_response):
        raise SystemExit(f"config: a worked example needs both shot_prompt and shot_response; got shot_prompt="
                         f"{cfg.shot_prompt!r}, shot_response={cfg.shot_response!r}")
    if cfg.method:
        methods.fields_of(cfg.method)  # refuses an unknown name with the list
    if cfg.verifier not in verify.VERIFIERS:
        raise SystemExit(f"config: verifier={cfg.verifier!r}; known: {sorted(verify.VERIFIERS)}")
