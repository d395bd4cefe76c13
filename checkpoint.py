"""Checkpoints and resume: nothing is lost when a run stops, however it stops.

- save_checkpoint writes <out_dir>/ckpt_NNNNNN atomically (a temporary directory, then one rename):
  the HF weights and tokenizer, and state.pt with Z_φ, the optimizer, the step and rollout counters,
  the selector's state (the prompt pool's position), the replay buffer, every RNG state and the config.
- manifest.json records each file's size and sha256; newest_good_checkpoint skips (and names) a
  damaged checkpoint and falls back to the one before.
- load_state refuses a state.pt of a format this code does not know, with the reason.
- truncate_metrics drops the metrics rows past the checkpoint: a resumed run recomputes them exactly;
  append_metrics writes one row (NaN and inf as null).
- StopSignal: SIGINT / SIGTERM make the loop checkpoint and stop after the current step.
"""

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal

import torch

from config import Config

# state.pt's layout, raised whenever it changes: a checkpoint of another layout is refused, named, not misread.
STATE_FORMAT = 3


def ckpt_dirs(out_dir):
    if not os.path.isdir(out_dir):
        return []
    return sorted(d for d in os.listdir(out_dir) if re.fullmatch(r"ckpt_\d{6}", d))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def full_state(policy, opt, cfg):
    """(HF weights, optimizer state) as plain tensors; with FSDP a collective that every rank must call."""
    if not cfg.fsdp:
        return None, opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    o = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(policy.lm, options=o), get_optimizer_state_dict(policy, opt, options=o)


def load_opt_state(policy, opt, osd, cfg):
    if not cfg.fsdp:
        return opt.load_state_dict(osd)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(policy, opt, osd, options=StateDictOptions(full_state_dict=True))


def torch_rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_torch_rng_state(st, device):
    torch.set_rng_state(st["cpu"])
    if st["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(st["cuda"], device)


def save_checkpoint(cfg, model, tokenizer, state: dict, rank):
    """Atomic: written to a temporary directory, then renamed; the newest `keep_ckpts` are kept.
    manifest.json records each file's size and sha256, so a damaged file is found and named."""
    policy = model.policy
    model_sd, opt_sd = full_state(policy, model.opt, cfg)
    if rank != 0:
        return
    final = os.path.join(cfg.out_dir, f"ckpt_{state['step']:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    policy.lm.save_pretrained(os.path.join(tmp, "model"), state_dict=model_sd)
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    torch.save({"logz": policy.logz.state_dict() if policy.logz is not None else None, "opt": opt_sd, **state, "config": dataclasses.asdict(cfg),
                "format": STATE_FORMAT},
               os.path.join(tmp, "state.pt"))
    files = sorted(os.path.relpath(os.path.join(d, f), tmp) for d, _, fs in os.walk(tmp) for f in fs)
    manifest = {f: {"bytes": os.path.getsize(os.path.join(tmp, f)), "sha256": _sha256(os.path.join(tmp, f))} for f in files}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for old in ckpt_dirs(cfg.out_dir)[:-cfg.keep_ckpts]:
        shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)


def check_checkpoint(path: str):
    """Raise ValueError naming the first missing, truncated or altered file of a checkpoint."""
    mpath = os.path.join(path, "manifest.json")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{mpath} is missing or unreadable ({e})") from None
    for name, want in manifest.items():
        fp = os.path.join(path, name)
        if not os.path.exists(fp):
            raise ValueError(f"{fp} is missing")
        if os.path.getsize(fp) != want["bytes"]:
            raise ValueError(f"{fp} is truncated or altered: {os.path.getsize(fp)} bytes, expected {want['bytes']}")
        if _sha256(fp) != want["sha256"]:
            raise ValueError(f"{fp} is corrupt: sha256 differs from the manifest")


def newest_good_checkpoint(run_dir: str, log) -> str:
    """The newest checkpoint of run_dir that passes check_checkpoint; damaged ones are named and skipped."""
    for d in reversed(ckpt_dirs(run_dir)):
        try:
            check_checkpoint(os.path.join(run_dir, d))
            return os.path.join(run_dir, d)
        except ValueError as e:
            log(f"resume: skipping damaged checkpoint: {e}")
    raise SystemExit(f"resume: no usable checkpoint in {run_dir} (found: {ckpt_dirs(run_dir) or 'none'})")


def load_run_config(run_dir: str, overrides: dict) -> Config:
    dirs = ckpt_dirs(run_dir)
    if not dirs:
        raise SystemExit(f"resume: no checkpoint (ckpt_NNNNNN) in {run_dir}")
    with open(os.path.join(run_dir, "config.json")) as f:
        saved = json.load(f)
    known = {f.name for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in saved.items() if k in known}
    return Config(**{**saved, **overrides, "resume": run_dir, "out_dir": run_dir})


def truncate_metrics(path: str, step: int):
    """Keep the rows of metrics.jsonl before `step` (a resumed run recomputes the rest), atomically."""
    rows = []
    if step > 0 and os.path.exists(path):
        for line in open(path):
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut short by a crash: it lies past the checkpoint anyway
                pass
    with open(path + ".tmp", "w") as f:
        for r in rows:
            if r["step"] < step:
                f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def load_state(ckpt: str) -> dict:
    """state.pt of a checkpoint, refused with the reason if its layout is not one this code reads."""
    st = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)
    fmt = st.get("format", 1)
    if fmt != STATE_FORMAT:
        raise SystemExit(f"resume: {ckpt}/state.pt has format {fmt}; this code reads format {STATE_FORMAT}. "
                         f"Resume it with the version of the code that wrote it.")
    missing = {"step", "rollouts", "skipped_updates", "seams", "selector", "coverage", "replay", "replay_rng", "opt", "logz"} - set(st)
    if missing:
        raise SystemExit(f"resume: {ckpt}/state.pt lacks {sorted(missing)}: not a checkpoint of this code")
    return st


class StopSignal:
    """SIGINT / SIGTERM set `name`; the loop checkpoints and returns after the current step. A second Ctrl-C stops now."""

    def __init__(self):
        self.name = None
        self.old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.name is not None:
            raise KeyboardInterrupt
        self.name = signal.Signals(signum).name

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def write_json(path: str, obj):
    """A JSON file written atomically (a temporary file, then one rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f)
    os.replace(path + ".tmp", path)


def append_metrics(path: str, row: dict):
    """One row of metrics.jsonl; NaN / inf are written as null: strict JSON that every tool reads."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
