"""Verifiers: response text + reference answer -> reward in [0, 1].

A verifier is a plain function `fn(response: str, answer) -> float`. The public reward functions
below are total: for any string they return a number in [0, 1] within their time limit and never
raise, so TRL, verl or any other caller can use them as they are. A fault (an exception, a timeout,
a result that is not a finite number in [0, 1]) gives reward 0. Their raising form is `fn.strict`;
`score` calls it to count the faults (the `verifier_errors` metric of train.py), and wraps any other
function the same way.

- `testbed_reward`: the bundled task (tasks/testbed.py): exact match of the reversed digits of a+b.
- `math_reward`: math answers by math-verify (boxed answer first), in a worker process with a timeout
  (math_worker.py).
- `boxed_math_reward`: the same, but only a final `\\boxed{}` answer counts (no box: 0); its
  `has_answer` is the format check behind the `format_rate` metrics.
- `code_reward`: runs the last fenced Python block of a response against test cases, each in a fresh
  sandboxed process (sandbox.py). Tests come in the DeepCoder / LiveCodeBench styles: stdin/stdout
  `{"input": str, "output": str}` and function call `{"fn_name": str, "input": list, "output": any}`.
"""

import functools
import json
import math
import re
from concurrent.futures import ThreadPoolExecutor

from math_worker import last_boxed  # the boxed answer, shared with the worker process (no circle: math_worker imports nothing of ours)



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


# ----------------------------------------------------------------------------- code


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
def code_reward(response: str, tests, all_or_nothing: bool = False, limits=None) -> float:
    """Fraction of tests passed by the response's last fenced Python block (0 without one), each test run in a
    fresh sandboxed process (sandbox.py, imported on first use). all_or_nothing: 1.0 only if every test passes."""
    import sandbox

    return sandbox.code_score(response, parse_tests(tests), all_or_nothing, limits or sandbox.SandboxLimits())


# ----------------------------------------------------------------------------- math answers


_worker = None


def shared_worker():
    """The math verifiers' worker process (math_worker.py: math-verify with a timeout), started on first use."""
    global _worker
    if _worker is None:
        import math_worker

        _worker = math_worker.TimeoutWorker()
    return _worker


@total
def math_reward(response: str, answer) -> float:
    """1.0 iff the response's final answer (the last \\boxed{} if any, else the whole text) is
    mathematically equal to the reference, by math-verify. A timeout (5 s) or a failure of math-verify
    gives 0 (math_reward.strict raises them instead)."""
    return shared_worker()(response, str(answer))


@total
def boxed_math_reward(response: str, answer) -> float:
    """1.0 iff the response's last \\boxed{} holds an answer mathematically equal to the reference
    (math-verify); a response without a \\boxed{} answer gets 0, whatever else it says. The format the
    prompt asks for is the format the reward checks (the smollm2_arith preset)."""
    boxed = last_boxed(response)
    return 0.0 if boxed is None else shared_worker()(f"\\boxed{{{boxed}}}", str(answer))


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
