"""Verifiers: response text + reference answer -> reward in {0, 1}.

A verifier is a plain function `fn(response: str, answer) -> float`. `score` wraps any of them so that
training never stops on a verifier fault: an exception, or a result that is not a finite number in
[0, 1], counts as reward 0 and is counted (the `verifier_errors` metric of train.py).

- `testbed_reward`: the bundled task (testbed.py): exact match of the reversed digits of a+b.
"""

import math


def testbed_reward(response: str, answer) -> float:
    """1.0 iff the response, stripped of whitespace, equals the answer string."""
    return float(response.strip() == str(answer).strip())


VERIFIERS = {"testbed": testbed_reward}


def get_verifier(name: str):
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; known: {sorted(VERIFIERS)}")
    return VERIFIERS[name]


def score(fn, responses: list, answers: list):
    """Rewards for paired responses and answers, and how many verifier calls failed."""
    rewards, errors = [], 0
    for resp, ans in zip(responses, answers):
        try:
            r = fn(resp, ans)
            r = float(r)
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise ValueError(f"reward {r} outside [0, 1]")
        except Exception:  # a broken verifier must not stop a days-long run: reward 0, counted
            r, errors = 0.0, errors + 1
        rewards.append(r)
    return rewards, errors
