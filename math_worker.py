"""The math verifiers' worker (verify.math_reward, verify.boxed_math_reward): math-verify in a persistent
process of its own, with a timeout per call.

math-verify's own timeout (signal.alarm) works only in the main thread, and sympy can take minutes on a
hostile answer or crash; here a call past its time kills the worker, a fresh one starts on the next call,
and the trainer never waits longer than the timeout.
"""

import json
import os
import select
import subprocess
import sys
import threading


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


def math_impl(response: str, answer: str) -> float:
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
import math_worker
import math_verify  # the slow import happens before "ready", so it does not count against a call's time
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    try:
        out = {"reward": math_worker.math_impl(job["response"], job["answer"])}
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
