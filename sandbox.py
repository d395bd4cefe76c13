"""The code verifier's work (verify.code_reward): a response's last fenced Python block run against test cases,
each in a fresh sandboxed process. Tests come in the DeepCoder / LiveCodeBench styles: stdin/stdout
`{"input": str, "output": str}` and function call `{"fn_name": str, "input": list, "output": any}`.

Model-written code is untrusted. Each test runs in a fresh `python -I -S`
process in its own session (process group), with an empty environment apart from PATH and LANG,
stdin from the test, stdout into an unlinked file capped by RLIMIT_FSIZE, stderr discarded, and
resource limits on CPU seconds, address space, open files and file size. A wall-clock timeout kills
the whole process group. When the trainer runs as root on Linux (containers, CI) the sandbox also
enters new mount, network and PID namespaces: private size-capped tmpfs over /tmp, /var/tmp and
/dev/shm (the working directory is one of them), no network interface but a loopback that is down,
the program as PID 1 of its namespace (when it exits, every process it started dies with it), then
drops to the `nobody` user (so it cannot write the file system, signal the trainer, or read other
processes' environments, and RLIMIT_NPROC caps forks). Without root, the namespaces and the user
switch are skipped: the limits (RLIMIT_NPROC then allows `nproc` processes beyond the user's current
count), the timeout and the process-group kill remain, and docs/REFERENCE.md says what that leaves open.

The sandbox table in docs/REFERENCE.md lists each guarantee with its default, and what is not isolated.
"""

import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass


@dataclass
class SandboxLimits:
    timeout_s: float = 6.0  # wall clock per test, from process start to kill (Python start-up included)
    cpu_s: int = 4  # RLIMIT_CPU seconds
    memory_mb: int = 512  # RLIMIT_AS
    output_mb: int = 4  # RLIMIT_FSIZE: stdout and any file written
    tmpfs_mb: int = 32  # size of each private tmpfs (root only): bounds what can be written
    nproc: int = 32  # RLIMIT_NPROC for the `nobody` user (root only; without root it would count yours)
    nofile: int = 64  # RLIMIT_NOFILE


# The process inside the sandbox: set up isolation, then run the program on the test.
_SANDBOX = r"""
import json, os, sys, resource
cfg = json.loads(sys.argv[1])
job = json.loads(sys.stdin.read())
if cfg["root"]:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x00020000 | 0x40000000 | 0x20000000) != 0:  # CLONE_NEWNS | NEWNET | NEWPID
        os._exit(97)
    if libc.mount(None, b"/", None, 16384 | (1 << 18), None) != 0:  # MS_REC | MS_PRIVATE
        os._exit(97)
    opts = ("size=%dm,mode=1777" % cfg["tmpfs_mb"]).encode()
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d) and libc.mount(b"tmpfs", d, b"tmpfs", 2 | 4, opts) != 0:  # NOSUID | NODEV
            os._exit(97)
    hide, prefix = cfg["hide_dir"], cfg["python_prefix"]
    if hide:  # the interpreter lives under a directory `nobody` cannot enter (e.g. /root/.pyenv):
        # cover that directory with an empty tmpfs and bind only the interpreter's prefix back into it
        stage = b"/tmp/.python"
        os.mkdir(stage)
        ok = libc.mount(prefix.encode(), stage, None, 4096 | 16384, None) == 0  # MS_BIND | MS_REC
        ok = ok and libc.mount(b"tmpfs", hide.encode(), b"tmpfs", 2 | 4, b"size=1m,mode=755") == 0
        os.makedirs(prefix, mode=0o755, exist_ok=True)
        ok = ok and libc.mount(stage, prefix.encode(), None, 4096 | 16384, None) == 0
        if not ok or libc.umount2(stage, 2) != 0:  # MNT_DETACH
            os._exit(97)
        os.rmdir(stage)
    pid = os.fork()  # the child is PID 1 of the new PID namespace
    if pid:
        _, st = os.waitpid(pid, 0)
        os._exit(min(255, max(0, os.waitstatus_to_exitcode(st))))
    if libc.mount(b"proc", b"/proc", b"proc", 2 | 4 | 8, None) != 0:  # this namespace's processes only
        os._exit(97)
    os.chdir("/tmp")
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    resource.setrlimit(resource.RLIMIT_NPROC, (cfg["nproc"], cfg["nproc"]))
elif cfg["user_procs"] is not None:  # RLIMIT_NPROC counts all of this user's processes: allow nproc more
    n = cfg["user_procs"] + cfg["nproc"]
    resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
for lim, v in ((resource.RLIMIT_CPU, cfg["cpu_s"]), (resource.RLIMIT_FSIZE, cfg["output_mb"] << 20),
               (resource.RLIMIT_NOFILE, cfg["nofile"]), (resource.RLIMIT_AS, cfg["memory_mb"] << 20)):
    resource.setrlimit(lim, (v, v))
with open("stdin.txt", "w") as f:
    f.write(job.get("stdin", ""))
fd = os.open("stdin.txt", os.O_RDONLY)
os.dup2(fd, 0)
sys.stdin = open(0, closefd=False)
ns = {"__name__": "__main__" if job["mode"] == "stdio" else "solution"}
exec(compile(job["program"], "solution.py", "exec"), ns)
if job["mode"] == "call":
    fn = ns.get(job["fn_name"])
    if fn is None and "Solution" in ns:
        fn = getattr(ns["Solution"](), job["fn_name"])
    result = fn(*job["args"])
    sys.stdout.write("\n" + job["marker"] + json.dumps(result) + "\n")
sys.stdout.flush()
"""


def _closed_ancestor(path: str):
    """The outermost directory above `path` that other users cannot list and enter, or None."""
    parts = os.path.abspath(path).split(os.sep)
    for i in range(2, len(parts) + 1):
        d = os.sep.join(parts[:i])
        if os.stat(d).st_mode & 0o005 != 0o005:
            return d
    return None


def _user_processes():
    """How many processes this user runs (Linux /proc), or None where that cannot be counted."""
    try:
        uid = os.getuid()
        return sum(1 for p in os.listdir("/proc") if p.isdigit() and os.stat(f"/proc/{p}").st_uid == uid)
    except OSError:
        return None


def _kill_session(pgid: int, wait_s: float = 5.0):
    """SIGKILL the process group until it is empty. The PID-namespace init is in it and exits only once
    every process of its namespace is gone, so an empty group means nothing of the program is left."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.005)


def run_sandboxed(program: str, job: dict, limits: SandboxLimits = SandboxLimits()):
    """Run `program` on one test in the sandbox. Returns (stdout text, timed_out)."""
    root = hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")
    cfg = {**limits.__dict__, "root": root, "python_prefix": sys.base_prefix, "hide_dir": _closed_ancestor(sys.base_prefix),
           "user_procs": None if root else _user_processes()}
    with tempfile.TemporaryDirectory(prefix="paced_sandbox_") as work, tempfile.TemporaryFile() as out:
        os.chmod(work, 0o700)
        p = subprocess.Popen([sys.executable, "-I", "-S", "-c", _SANDBOX, json.dumps(cfg)],
                             stdin=subprocess.PIPE, stdout=out, stderr=subprocess.DEVNULL, cwd=work,
                             env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}, start_new_session=True)
        timed_out = False
        try:
            p.communicate(json.dumps({**job, "program": program}).encode(), timeout=limits.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            p.kill()
            p.wait()
            _kill_session(p.pid)
        out.seek(0)
        text = out.read((limits.output_mb << 20) + 1).decode("utf-8", errors="replace")
    return text, timed_out


def extract_code(response: str):
    """The last fenced code block (```python ... ``` or ``` ... ```), or None."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", response, re.DOTALL | re.IGNORECASE)
    return blocks[-1] if blocks else None


def _same(a, b) -> bool:
    """Equality of JSON-like values, floats up to 1e-6 relative."""
    if isinstance(a, float) or isinstance(b, float):
        return isinstance(a, (int, float)) and isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a == b


def _lines(text: str):
    return [l.rstrip() for l in text.strip().splitlines()]


def run_test(program: str, test: dict, limits: SandboxLimits = SandboxLimits()) -> bool:
    if "fn_name" in test:
        marker = "@@PACED_RESULT@@"
        args = test["input"] if isinstance(test["input"], list) else [test["input"]]
        out, timed_out = run_sandboxed(program, {"mode": "call", "fn_name": test["fn_name"], "args": args,
                                                 "marker": marker}, limits)
        if timed_out or marker not in out:
            return False
        try:
            got = json.loads(out.rsplit(marker, 1)[1].strip().splitlines()[0])
        except (ValueError, IndexError):
            return False
        return _same(got, json.loads(json.dumps(test["output"])))
    out, timed_out = run_sandboxed(program, {"mode": "stdio", "stdin": str(test["input"])}, limits)
    return not timed_out and _lines(out) == _lines(str(test["output"]))


def code_score(response: str, tests: list, all_or_nothing: bool, limits: SandboxLimits) -> float:
    """Fraction of tests passed by the response's last fenced Python block (0 without one).
    all_or_nothing: 1.0 only if every test passes (stops at the first failure)."""
    program = extract_code(response)
    if program is None:
        return 0.0
    passed = 0
    for t in tests:
        ok = run_test(program, t, limits)
        passed += ok
        if all_or_nothing and not ok:
            return 0.0
    return passed / len(tests)
