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
- RunLock: one run per directory; a second run on the same out_dir stops at once, naming the holder.
- load_run_config: a resumed run's config is the recorded one; a field given again on the command line is applied
  only where it may change mid-run (RESUMABLE), else refused by name (docs/REFERENCE.md, "Resume").
- A checkpoint that cannot be written (read-only or full disk) stops the run with one line and leaves no
  temporary directory; the newest checkpoint stays intact.
"""

import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket

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


def write_failure(path: str, e: Exception) -> str:
    """Why writing under `path` failed, in words: a read-only or full file system, or the error itself."""
    d = path if os.path.isdir(path) else os.path.dirname(path) or "."
    code = getattr(e, "errno", None)
    if code == errno.EROFS or (code in (errno.EACCES, errno.EPERM)) or not os.access(d, os.W_OK):
        return f"{d} is not writable ({os.strerror(code) if code else 'permission denied'})"
    try:
        free = shutil.disk_usage(d).free
    except OSError:
        free = None
    if code == errno.ENOSPC or (free is not None and free < 1 << 20):
        return f"no space left on the file system of {d} ({free or 0} bytes free)"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


def save_checkpoint(cfg, model, tokenizer, state: dict, rank):
    """Atomic: written to a temporary directory, then renamed; the newest `keep_ckpts` are kept.
    manifest.json records each file's size and sha256, so a damaged file is found and named. A write that fails
    (read-only or full disk) removes the temporary directory and stops the run with one line."""
    policy = model.policy
    model_sd, opt_sd = full_state(policy, model.opt, cfg)
    if rank != 0:
        return
    final = os.path.join(cfg.out_dir, f"ckpt_{state['step']:06d}")
    tmp = final + ".tmp"
    try:
        _write_checkpoint(cfg, policy, tokenizer, state, model_sd, opt_sd, final, tmp)
    except Exception as e:  # a full disk is an OSError, torch.save's RuntimeError ("unexpected pos") or safetensors' own
        shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"checkpoint: writing {final} failed: {write_failure(cfg.out_dir, e)}. Nothing was replaced: the "
                         f"newest checkpoint in {cfg.out_dir} is intact; free space or fix the permissions, then "
                         f"--resume={cfg.out_dir}") from None
    for old in ckpt_dirs(cfg.out_dir)[:-cfg.keep_ckpts]:
        shutil.rmtree(os.path.join(cfg.out_dir, old), ignore_errors=True)


def _write_checkpoint(cfg, policy, tokenizer, state, model_sd, opt_sd, final, tmp):
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


def newest_good_checkpoint(run_dir: str, log, what: str = "resume") -> str:
    """The newest checkpoint of run_dir that passes check_checkpoint; damaged ones are named and skipped."""
    for d in reversed(ckpt_dirs(run_dir)):
        try:
            check_checkpoint(os.path.join(run_dir, d))
            return os.path.join(run_dir, d)
        except ValueError as e:
            log(f"{what}: skipping damaged checkpoint: {e}")
    raise SystemExit(f"{what}: no usable checkpoint in {run_dir} (found: {ckpt_dirs(run_dir) or 'none'})")


# The fields a resumed run may change: how long it runs, its learning rates, evaluation and checkpoint cadence,
# logging, and how the same computation is laid out (devices, batching, kernels). Every other field defines the run
# (model, data, seed, objective, selection, group size, β, features, ...) and is refused on resume, by name.
RESUMABLE = ("max_steps", "lr", "logz_lr", "weight_decay", "grad_clip", "nonfinite_patience", "eval_every", "eval_samples",
             "eval_greedy", "eval_batch", "ckpt_every", "keep_ckpts", "report_to", "kl_every", "starve_warn_steps",
             "dist_timeout_s", "device", "attn_impl", "grad_ckpt", "rollout_batch", "sampler", "micro_batch", "logit_chunk",
             "shared_prefix", "verifier_workers")


def recorded_config(run_dir: str, log=print, what: str = "resume") -> dict:
    """The run's recorded fields: config.json, or where it is missing or unreadable the newest good checkpoint's copy
    (said once)."""
    if not os.path.isdir(run_dir):
        raise SystemExit(f"{what}: {run_dir} does not exist")
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        why = "is missing" if isinstance(e, FileNotFoundError) else f"is unreadable ({str(e).splitlines()[0][:120]})"
    for d in reversed(ckpt_dirs(run_dir)):
        try:
            check_checkpoint(os.path.join(run_dir, d))
            cfg = torch.load(os.path.join(run_dir, d, "state.pt"), weights_only=False)["config"]
        except (ValueError, OSError, RuntimeError, KeyError, EOFError):
            continue
        log(f"{what}: {path} {why}; the run's config is taken from {d}/state.pt")
        return {**cfg, "resume": ""}
    raise SystemExit(f"{what}: {path} {why}, and no checkpoint of {run_dir} holds a readable copy")


def load_run_config(run_dir: str, overrides: dict, log=None) -> Config:
    """The recorded config of run_dir with `overrides` (the command line's fields) applied where they may change
    mid-run (RESUMABLE), each change said once; a field that defines the run is refused by name. config.json is
    rewritten with the changes, so the directory always says what the run does."""
    log = log or (print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None))
    saved = recorded_config(run_dir, log)  # names a directory that does not exist
    if not ckpt_dirs(run_dir):
        raise SystemExit(f"resume: no checkpoint (ckpt_NNNNNN) in {run_dir}")
    known = {f.name: f.default for f in dataclasses.fields(Config)}
    saved = {k: v for k, v in saved.items() if k in known}
    asked = {k: v for k, v in overrides.items() if k not in ("resume", "out_dir")}
    changed = {k: (saved.get(k, known[k]), v) for k, v in asked.items() if v != saved.get(k, known[k])}
    fixed = {k: c for k, c in changed.items() if k not in RESUMABLE}
    if fixed:
        raise SystemExit(f"resume: {', '.join(f'{k} (recorded {a!r}, asked {b!r})' for k, (a, b) in fixed.items())} "
                         f"cannot change during a run; start a new run with another --out_dir, or resume without "
                         f"{'it' if len(fixed) == 1 else 'them'} (fields a resume may change: docs/REFERENCE.md, Resume)")
    cfg = Config(**{**saved, **asked, "resume": run_dir, "out_dir": run_dir})
    if changed:
        log("resume: changed from the recorded config: " + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        if int(os.environ.get("RANK", "0")) == 0:
            write_json(os.path.join(run_dir, "config.json"), {**dataclasses.asdict(cfg), "resume": saved.get("resume", "")},
                       indent=1)
    return cfg


class RunLock:
    """One run per directory: an exclusive lock (flock) on <out_dir>/run.lock for the run's lifetime, holding the
    holder's pid and host. The kernel drops it when the process dies however it dies, so a lock left by a dead run
    is taken over (said once); a second live run on the same directory stops at once, naming the holder."""

    NAME = "run.lock"

    def __init__(self, out_dir: str, log=print):
        try:
            os.makedirs(out_dir, exist_ok=True)
            self.fd = os.open(os.path.join(out_dir, self.NAME), os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise SystemExit(f"out_dir: cannot write to {out_dir}: {write_failure(out_dir, e)}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise SystemExit(f"out_dir: {out_dir} is in use by another run ({holder}); wait for it to end, or give this "
                             f"run another --out_dir") from None
        left = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
        if left:
            log(f"out_dir: taking over the lock of {out_dir} left by a run that did not end cleanly ({left})")
        me = f"pid {os.getpid()} on {socket.gethostname()}".encode()
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, me, 0)
        except OSError as e:
            raise SystemExit(f"out_dir: cannot write to {out_dir}: {write_failure(out_dir, e)}") from None

    def release(self):
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # an empty lock file: the last run ended cleanly
            except OSError:
                pass
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


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
    """SIGINT / SIGTERM set `name`; the loop checkpoints and returns after the current step. A second Ctrl-C stops now,
    except under torchrun: there one Ctrl-C reaches every rank twice (from the terminal, then forwarded by torchrun's
    agent as it shuts down), so a repeat is the same request; the agent kills the ranks itself if they do not end
    within its shutdown timeout (30 s)."""

    def __init__(self):
        self.name = None
        self.under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self.old = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if self.name is not None and not self.under_torchrun:
            raise KeyboardInterrupt
        self.name = self.name or signal.Signals(signum).name

    def restore(self):
        for sig, h in self.old.items():
            signal.signal(sig, h)


def write_json(path: str, obj, indent=None):
    """A JSON file written atomically (a temporary file, then one rename)."""
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=indent)
    os.replace(path + ".tmp", path)


def append_metrics(path: str, row: dict):
    """One row of metrics.jsonl; NaN / inf are written as null: strict JSON that every tool reads."""
    row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
