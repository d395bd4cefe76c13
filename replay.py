"""Accuracy-estimate-error-prioritized replay (docs/DESIGN.md, "Where we depart from or fill in the paper").

After a group of G responses for prompt x is verified, its observed accuracy is a(x) = correct/G and
the estimation error is e(x) = |a(x) − p̂(x)|, with p̂ = β·log Z_φ(x). Only *correct* trajectories
are stored, with priority e(x): the prompts whose difficulty the scheduler misjudged most.
Paper: each step the `add_k` = 64 correct trajectories with the largest e(x) enter a buffer of
capacity 128, and replayed samples join the update batch.

Open in the paper; our choices (each a config field in config.py):
- eviction: when full, the lowest-priority entries leave (ties: the oldest first);
- drawing: `n` entries without replacement, with probability ∝ priority, from an RNG that every
  rank holds in the same state, so every rank draws the same entries; drawn entries stay;
- each entry keeps its group's observed accuracy a(x), the target of Z_φ under `replay_trains_logz=group`;
- the anchor π_old of a replayed sample and whether it trains Z_φ are set in config.py, applied in update.py.
"""

import numpy as np


def estimate_error(acc, p_hat):
    """e(x) = |a(x) − p̂(x)|, elementwise."""
    return np.abs(np.asarray(acc, dtype=np.float64) - np.asarray(p_hat, dtype=np.float64))


def correct_candidates(prompts, rewards, responses, acc, p_hat, logp_behavior, group_size: int) -> list:
    """A step's correct trajectories as buffer entries, each with its prompt's priority e(x) = |a(x) − p̂(x)|.
    prompts, acc, p_hat: one per group (n,); rewards, responses (token lists), logp_behavior: one per sample (n·G)."""
    cands = []
    for k, j in enumerate(prompts):
        e = float(estimate_error(acc[k], p_hat[k]))
        for i in range(k * group_size, (k + 1) * group_size):
            if rewards[i] == 1.0:
                cands.append({"prompt": j, "response": responses[i], "priority": e, "logp_behavior": float(logp_behavior[i]),
                              "acc": float(acc[k])})
    return cands


class ReplayBuffer:
    """Entries are dicts with at least 'prompt' (data-set index), 'response' (token ids), 'priority'."""

    def __init__(self, capacity: int = 128, add_k: int = 64):
        self.capacity, self.add_k = capacity, add_k
        self.entries = []
        self._added = 0  # insertion counter: age for tie-breaking

    def __len__(self):
        return len(self.entries)

    def add(self, candidates: list):
        """Insert the `add_k` highest-priority candidates (correct trajectories), then evict to capacity."""
        order = sorted(range(len(candidates)), key=lambda i: (-candidates[i]["priority"], i))[:self.add_k]
        for i in order:
            self.entries.append({**candidates[i], "age": self._added})
            self._added += 1
        # keep the highest priorities; among equals the newest
        self.entries.sort(key=lambda e: (-e["priority"], -e["age"]))
        del self.entries[self.capacity:]

    def sample(self, n: int, rng: np.random.Generator) -> list:
        """Up to n entries without replacement, P(entry) ∝ priority (+1e-6 so zero priority can be drawn)."""
        n = min(n, len(self.entries))
        if n == 0:
            return []
        p = np.array([e["priority"] for e in self.entries], dtype=np.float64) + 1e-6
        idx = rng.choice(len(self.entries), size=n, replace=False, p=p / p.sum())
        return [self.entries[i] for i in sorted(idx)]

    def state_dict(self):
        return {"capacity": self.capacity, "add_k": self.add_k, "entries": [dict(e) for e in self.entries],
                "added": self._added}

    def load_state_dict(self, s):
        self.capacity, self.add_k = s["capacity"], s["add_k"]
        self.entries = [dict(e) for e in s["entries"]]
        self._added = s["added"]
