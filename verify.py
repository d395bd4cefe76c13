"""Verifiers: response text + reference answer -> reward in [0, 1].

A verifier is a plain function `fn(response: str, answer) -> float`. The public reward functions
below are total: for any string they return a number in [0, 1] within their time limit and never
raise, so TRL, verl or any other caller can use them as they are. A fault (an exception, a timeout,
a result that is not a finite number in [0, 1]) gives reward 0. Their raising form is `fn.strict`;
`score` calls it to count the faults (the `verifier_errors` metric of train.py), and wraps any other
function the same way.

- `testbed_reward`: the bundled task (testbed.py): exact match of the reversed digits of a+b.
- `math_reward`: math answers by math-verify (boxed answer first), in a worker process with a timeout.
- `boxed_math_reward`: the same, but only a final `\\boxed{}` answer counts (no box: 0); its
  `has_answer` is the format check behind the `format_rate` metrics.
- `code_reward`: runs the last fenced Python block of a response against test cases, in a sandbox
  (below). Tests come in the DeepCoder / LiveCodeBench styles: stdin/stdout
  `{"input": str, "output": str}` and function call `{"fn_name": str, "input": list, "output": any}`.

The code sandbox. Model-written code is untrusted. Each test runs in a fresh `python -I -S`
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
count), the timeout and the process-group kill remain, and the README says what that leaves open.
"""

import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import select
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


def _checked(fn, *args, **kwargs):
    """(fn's reward, 0) or, where fn raises or returns anything but a finite number in [0, 1], (0.0, 1)."""
    try:
        r = float(fn(*args, **kwargs))
        if not (math.isfinite(r) and 0.0 <= r <= 1.0):
            raise ValueError(f"reward {r} outside [0, 1]")
        return r, 0
    except Exception:  # a broken verifier must not stop a days-long run: reward 0, counted by score
        return 0.0, 1


def total(strict):
    """A reward function that never raises, from one that may: `strict`'s reward, or 0.0 on a fault.
    The raising form stays reachable as `.strict`, for callers that count faults (score)."""
    @functools.wraps(strict)
    def reward(*args, **kwargs):
        return _checked(strict, *args, **kwargs)[0]
    reward.strict = strict
    return reward


@total
def testbed_reward(response: str, answer) -> float:
    """1.0 iff the response, stripped of whitespace, equals the answer string."""
    return float(response.strip() == str(answer).strip())


# ----------------------------------------------------------------------------- code sandbox


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


def extract_code(response: str):
    """The last fenced code block (```python ... ``` or ``` ... ```), or None."""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", response, re.DOTALL | re.IGNORECASE)
    return blocks[-1] if blocks else None


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


def parse_tests(tests) -> list:
    """Tests as a list of dicts (a JSON string is decoded); raises ValueError naming what is wrong."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if not isinstance(tests, list) or not tests:
        raise ValueError(f"code tests must be a non-empty list, got {type(tests).__name__}")
    for i, t in enumerate(tests):
        if not isinstance(t, dict) or "input" not in t or "output" not in t:
            raise ValueError(f"code test {i} must be a dict with 'input' and 'output', got {t!r:.80}")
    return tests


@total
def code_reward(response: str, tests, all_or_nothing: bool = False, limits: SandboxLimits = SandboxLimits()) -> float:
    """Fraction of tests passed by the response's last fenced Python block (0 without one).
    all_or_nothing: 1.0 only if every test passes (stops at the first failure)."""
    tests = parse_tests(tests)
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


# ----------------------------------------------------------------------------- math answers


def last_boxed(text: str):
    """The content of the last \\boxed{...} (or \\fbox{...}) in text, braces matched; None if there is none."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None  # unbalanced: no answer


def _math_impl(response: str, answer: str) -> float:
    """math-verify's parse and verify, boxed answer first; runs inside the worker process."""
    from math_verify import parse, verify

    gold = parse(answer if "$" in answer or "\\boxed" in answer else f"${answer}$", parsing_timeout=None)
    boxed = last_boxed(response)
    pred = parse(f"\\boxed{{{boxed}}}" if boxed is not None else response, parsing_timeout=None)
    if not gold:  # the reference itself does not parse: reward 0, counted as a verifier error (score)
        raise ValueError(f"the reference answer {answer!r:.80} does not parse")
    if not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=None))  # gold first: the order matters


_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import verify
import math_verify  # the slow import happens before "ready", so it does not count against a call's time
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    try:
        out = {"reward": verify._math_impl(job["response"], job["answer"])}
    except BaseException as e:  # math-verify's timeout error is a BaseException
        out = {"error": f"{type(e).__name__}: {e}"[:300]}
    print(json.dumps(out), flush=True)
"""


class TimeoutWorker:
    """A persistent worker process for math verification with a per-call timeout. A call past its time
    kills the worker (a fresh one starts on the next call) and raises TimeoutError. Unlike math-verify's
    own timeout (signal.alarm), this works in any thread, and a crash inside sympy cannot take the
    trainer down."""

    def __init__(self, timeout_s: float = 5.0, start_timeout_s: float = 120.0):
        self.timeout_s, self.start_timeout_s = timeout_s, start_timeout_s
        self.proc, self.lock = None, threading.Lock()

    def _readline(self, timeout):
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def _start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER, os.path.dirname(os.path.abspath(__file__))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if (self._readline(self.start_timeout_s) or "").strip() != "ready":
            self.close()
            raise RuntimeError("math verifier worker did not start (is math-verify installed? pip install math-verify)")

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def __call__(self, response: str, answer: str) -> float:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self._start()
            self.proc.stdin.write(json.dumps({"response": response, "answer": answer}) + "\n")
            self.proc.stdin.flush()
            line = self._readline(self.timeout_s)
            if line is None or not line:
                self.close()
                raise TimeoutError(f"math verification took longer than {self.timeout_s} s (or its worker died)")
        out = json.loads(line)
        if "error" in out:
            raise ValueError(f"math-verify failed: {out['error']}")
        return out["reward"]


_math_worker = TimeoutWorker()


@total
def math_reward(response: str, answer) -> float:
    """1.0 iff the response's final answer (the last \\boxed{} if any, else the whole text) is
    mathematically equal to the reference, by math-verify. A timeout (5 s) or a failure of math-verify
    gives 0 (math_reward.strict raises them instead)."""
    return _math_worker(response, str(answer))


@total
def boxed_math_reward(response: str, answer) -> float:
    """1.0 iff the response's last \\boxed{} holds an answer mathematically equal to the reference
    (math-verify); a response without a \\boxed{} answer gets 0, whatever else it says. The format the
    prompt asks for is the format the reward checks (the smollm2_arith preset)."""
    boxed = last_boxed(response)
    return 0.0 if boxed is None else _math_worker(f"\\boxed{{{boxed}}}", str(answer))


def has_boxed(response: str) -> bool:
    return last_boxed(response) is not None


boxed_math_reward.has_answer = has_boxed  # its format check: the rollouts' and evaluation's format_rate
VERIFIERS = {"testbed": testbed_reward, "code": code_reward, "math": math_reward, "math_boxed": boxed_math_reward}


def check_answer(verifier: str, answer):
    """The reference answer in the form the verifier takes; ValueError says what is wrong with it.
    testbed: a string (numbers are accepted and written as strings); code: a list of tests (or its JSON)."""
    if verifier == "code":
        parse_tests(answer)
        return answer
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {type(answer).__name__} {answer!r:.60}")
    if isinstance(answer, str) and not answer.strip():
        raise ValueError("answer is an empty string")
    return str(answer)


def get_verifier(name: str):
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[name]


def score(fn, responses: list, answers: list, workers: int = 1):
    """Rewards for paired responses and answers, and how many verifier calls failed.
    workers > 1 verifies that many responses at once (threads: the code verifier waits on processes)."""
    fn = getattr(fn, "strict", fn)  # a total reward function hides its faults: count them
    if workers > 1 and len(responses) > 1:
        with ThreadPoolExecutor(workers) as ex:
            res = list(ex.map(lambda ra: _checked(fn, *ra), zip(responses, answers)))
    else:
        res = [_checked(fn, r, a) for r, a in zip(responses, answers)]
    return [r for r, _ in res], sum(e for _, e in res)
