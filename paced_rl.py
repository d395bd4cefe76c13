"""The PACED-RL policy: any HF causal LM plus the learned partition function log Z_φ(x).

    p̂(x) = β · log Z_φ(e(x))        (Proposition 4.1: ≈ accuracy of π_old on x; tb_loss.py)

- `LogZHead`: a 3-layer MLP over a frozen prompt embedding e(x), so every prompt of the data set is
  scored without a forward pass of the LLM (paper §4). Our choices where the paper is silent: width
  `logz_hidden`, features standardized with the training set's mean/std, the MLP's output read in
  accuracy units (log Z = output/β) through one of three output forms (`logz_output`), its output layer
  zero-initialized with bias p0, so p̂ starts at p0 for every prompt and the first selections are
  effectively uniform. `param_groups` gives each layer an
  Adam rate scaled by its fan-in, so a wide real-model embedding does not let one step saturate p̂.
- `prompt_embeddings` / `frozen_embeddings`: e(x), the mean of one layer of the *initial* model's hidden states
  (`logz_layer`, the last by default) over the prompt's tokens (`logz_features`: all of them, or only those that
  differ between prompts), computed once per run (sharded over ranks) and cached in the run directory.
- `ObservationMemory` / `fit_to_memory` (our addition, `logz_memory_passes`): every group the run has observed,
  and Z_φ refitted on it each step with the TB loss's own log Z term, newer groups weighted more.
- `Policy`: an nn.Module holding the LM and the head, so one hand-written all-reduce over
  `policy.parameters()` synchronizes both.
"""

import math
import os

import numpy as np
import torch
import torch.nn as nn

from distributed import gather
from lm import left_pad, position_ids


class LogZHead(nn.Module):
    """log Z_φ(x) = v(MLP((e(x) − μ) / σ_e)) / β, a scalar per prompt; p̂ = β·log Z_φ, clipped to [0, 1] where used.

    The MLP's output is read in accuracy units, so Adam's step size reads as "accuracy per step" whatever β
    is; a raw log Z head would need its learning rate scaled by 1/β. How the output u becomes v = β·log Z:

    - output="linear": v = u, unbounded, the paper's function class. The loss sees u as it is; p̂ is u
      clipped to [0, 1] only where it is used (selection, replay priority, calibration).
    - output="logistic": v = σ(u) in the forward pass, but the gradient reaching u is that of the linear
      output, ∝ (p̂ − r): logistic regression's. Same fixed point p̂ = a(x) + β·KL as the sigmoid, and no
      factor p̂(1 − p̂) that vanishes at 0 and 1, so a prompt driven to p̂ ≈ 0 comes back once it is solved.
    - output="sigmoid": v = σ(u) with its own gradient ∝ (p̂ − r)·p̂(1 − p̂). It vanishes as p̂ nears 0 or 1:
      a prompt whose groups were all wrong for a few steps can stay at p̂ ≈ 0 however often it is solved
      later (`saturation_warning`); kept as a named option.
    """

    OUTPUTS = ("linear", "logistic", "sigmoid")

    def __init__(self, dim: int, hidden: int, beta: float, init_acc: float, output: str = "logistic"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"LogZHead: output must be one of {self.OUTPUTS}, got {output!r}")
        self.beta, self.output = beta, output
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sigma", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)  # all prompts start with the same estimate
        p0 = min(max(init_acc, 1e-4), 1 - 1e-4)
        nn.init.constant_(self.net[-1].bias, init_acc if output == "linear" else math.log(p0 / (1 - p0)))

    def set_normalization(self, emb: torch.Tensor):
        """Standardize features with statistics of the training prompts' embeddings (N, D)."""
        self.mu.copy_(emb.mean(0))
        self.sigma.copy_(emb.std(0).clamp(min=1e-6))

    def param_groups(self, lr: float, ref_fan_in: int = 0) -> list:
        """AdamW groups, no weight decay. ref_fan_in > 0: each linear layer at lr·sqrt(ref_fan_in/fan_in). Adam moves
        every weight by about lr a step whatever its gradient's size; a layer's weights start at a scale of
        1/sqrt(fan_in), so one lr is a larger relative step for a wider input, and standardized features of a real
        model (576 for SmolLM2) move the first layer's outputs several units in one step. ref_fan_in = 0: lr everywhere."""
        if ref_fan_in <= 0:
            return [{"params": list(self.parameters()), "lr": lr, "weight_decay": 0.0}]
        return [{"params": list(m.parameters()), "lr": lr * math.sqrt(ref_fan_in / m.in_features), "weight_decay": 0.0}
                for m in self.net if isinstance(m, nn.Linear)]

    def raw(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """The MLP's output u (fp32 under amp): p̂'s logit under the sigmoid and logistic outputs, p̂ under the linear."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.net((emb.float() - self.mu) / self.sigma).squeeze(-1)

    def value(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """v = β·log Z_φ as the loss takes it: unclipped, with the gradient of the output's form."""
        u = self.raw(emb)
        if self.output == "linear":
            return u
        if self.output == "sigmoid":
            return torch.sigmoid(u)
        return torch.sigmoid(u).detach() + u - u.detach()  # σ(u) forward, the linear output's gradient

    def p_hat(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """p̂: the estimated accuracy where it is used (selection, replay priority), v clipped to [0, 1]."""
        return self.value(emb).clamp(0.0, 1.0)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """log Z_φ = v/β, the scalar the trajectory-balance residual takes (never clipped)."""
        return self.value(emb) / self.beta


def saturation_warning(p_hat, step: int, eps: float = 1e-3):
    """A warning when p̂ = β·log Z_φ sits within eps of 0 (or of 1) on every prompt given, else None. There a
    sigmoid head's gradient, ∝ p̂(1 − p̂), vanishes, so it may never recover, and "nearest τ" among equal
    values is a blind choice."""
    p = np.asarray(p_hat, dtype=float)
    if p.size == 0 or not np.isfinite(p).all():
        return None
    edge = 0 if p.max() < eps else 1 if p.min() > 1 - eps else None
    if edge is None:
        return None
    return (f"warning: step {step}: β·log Z_φ is {edge} (within {eps:g}) on every selected prompt: the accuracy estimate is "
            f"saturated and the selection blind; try a smaller --logz_lr")


class Policy(nn.Module):
    """The trainable pair (π_θ, log Z head); the LM stays a plain HF model for save_pretrained. logz: the
    objective's head (Z_φ for PACED-RL), or None for an objective without one."""

    def __init__(self, lm: nn.Module, logz: nn.Module = None):
        super().__init__()
        self.lm = lm
        self.logz = logz


def distinct_spans(prompt_token_lists: list) -> list:
    """(start, end) of each prompt's own tokens: what is left once the prefix and the suffix that every prompt
    shares (the chat template, a worked example, an instruction) are cut off. A prompt that is all shared text
    keeps its whole span."""
    seqs = prompt_token_lists
    shortest = min(len(s) for s in seqs)
    pre = next((i for i in range(shortest) if len({s[i] for s in seqs}) > 1), shortest)
    suf = next((i for i in range(shortest - pre) if len({s[-1 - i] for s in seqs}) > 1), shortest - pre)
    return [(pre, len(s) - suf) if len(s) - suf > pre else (0, len(s)) for s in seqs]


POOLS = ("mean", "mean_last", "distinct")


@torch.no_grad()
def prompt_embeddings(lm, prompt_token_lists: list, pad_id: int, batch_size: int, device,
                      pool: str = "mean", layer: int = -1, spans: list = None) -> torch.Tensor:
    """The frozen e(x) that Z_φ reads, from one layer's hidden states over the prompt tokens.

    layer: an index into the model's hidden states (0 the embeddings, -1 the last layer's output). pool="mean":
    the mean over every prompt token, (N, H). "mean_last": that mean concatenated with the state at the prompt's last
    token, the position that predicts the first response token, (N, 2H). "distinct": the mean over each prompt's own
    tokens, spans[i] = (start, end) from distinct_spans, so that the template every prompt shares does not dilute it.
    """
    if pool not in POOLS:
        raise ValueError(f"prompt_embeddings: pool must be one of {POOLS}, got {pool!r}")
    if pool == "distinct" and spans is None:
        spans = distinct_spans(prompt_token_lists)
    embs = []
    for i in range(0, len(prompt_token_lists), batch_size):
        chunk = prompt_token_lists[i:i + batch_size]
        ids, mask = left_pad(chunk, pad_id, device)
        hs = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), output_hidden_states=True).hidden_states
        if not -len(hs) <= layer < len(hs):
            raise ValueError(f"prompt_embeddings: layer {layer} out of range: the model has hidden states 0..{len(hs) - 1}")
        h = hs[layer].float()  # (b, T, H)
        if pool == "distinct":  # left padding: a prompt of length n starts at column T − n
            T = ids.size(1)
            m = torch.zeros_like(mask)
            for j, (s, e) in enumerate(spans[i:i + batch_size]):
                m[j, T - len(chunk[j]) + s:T - len(chunk[j]) + e] = 1
            mask = m
        m = mask.unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if pool == "mean_last":
            e = torch.cat([e, h[:, -1]], -1)  # left padding: the last position is the last prompt token
        embs.append(e.cpu())
    return torch.cat(embs) if embs else torch.zeros(0)


class ObservationMemory:
    """Every group the run has observed: (step, prompt index, observed accuracy a(x)), checkpointed.

    Why Z_φ is refitted on it (`fit_to_memory`): the TB loss's log Z term for a group of G samples at θ = θ_old has
    the gradient 2G(log Z − a/β) (tb_loss.py), so it regresses β·log Z_φ(x) on a(x), one Adam step per step on that
    step's few groups. An MLP on frozen features learns slowly from so few steps, and forgets a group once it is no
    longer chosen. Replaying that same term over every stored group, newer groups weighted more because the policy
    moves, is the same estimator fitted on more of its own data: p̂ is still β·log Z_φ, Z_φ still sits in the TB
    residual, and Proposition 4.1's fixed point (p̂ = accuracy + β·KL) is unchanged."""

    def __init__(self):
        self.step, self.idx, self.acc = [], [], []

    def add(self, step: int, idx, acc):
        self.step += [int(step)] * len(idx)
        self.idx += [int(i) for i in idx]
        self.acc += [float(a) for a in acc]

    def __len__(self):
        return len(self.idx)

    def weighted(self, now: int, half_life: float) -> tuple:
        """(prompt indices, accuracies, weights 0.5^((now − step) / half_life)) of every observation; half_life 0 = equal."""
        age = now - np.asarray(self.step, dtype=np.float64)
        w = 0.5 ** (age / half_life) if half_life > 0 else np.ones_like(age)
        return np.asarray(self.idx), np.asarray(self.acc), w

    def state_dict(self):
        return {"step": list(self.step), "idx": list(self.idx), "acc": list(self.acc)}

    def load_state_dict(self, st):
        self.step, self.idx, self.acc = list(st["step"]), list(st["idx"]), list(st["acc"])


def fit_to_memory(head: LogZHead, opt, emb: torch.Tensor, memory: ObservationMemory, now: int, passes: int,
                  half_life: float) -> float:
    """`passes` optimizer steps of the head on the TB loss's Z_φ term over the memory: Σ w·(v(x) − a)² / Σ w, v =
    β·log Z_φ. Only the head's parameters get gradients (the optimizer skips the LM's). Every rank holds the same
    memory and head, so every rank computes the same steps. Returns the last pass's loss (0 without any)."""
    if passes <= 0 or not len(memory):
        return 0.0
    idx, a, w = memory.weighted(now, half_life)
    x = emb[torch.as_tensor(idx, device=emb.device)]
    a = torch.as_tensor(a, dtype=torch.float32, device=emb.device)
    w = torch.as_tensor(w / w.sum(), dtype=torch.float32, device=emb.device)
    for _ in range(passes):
        loss = (w * (head.value(x) - a) ** 2).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return float(loss.detach())


def frozen_embeddings(cfg, pad_id, toks: list, dtype, ranks) -> torch.Tensor:
    """e(x) of every prompt in `toks` from the initial model (cfg.model), (N, D) on the CPU: computed once,
    sharded over ranks and gathered, cached in <out_dir>/prompt_emb.pt under a key of what determines it."""
    from transformers import AutoModelForCausalLM

    path = os.path.join(cfg.out_dir, "prompt_emb.pt")
    key = {"model": cfg.model, "features": cfg.logz_features, "train": cfg.train_data, "eval": cfg.eval_data, "n": len(toks),
           **({"layer": cfg.logz_layer} if cfg.logz_layer != -1 else {})}  # (today's key for the last layer: old caches stay valid)
    emb = None
    if os.path.exists(path):
        try:
            emb = torch.load(path)
        except Exception as e:  # a cache cut short or damaged: it is only a cache, so it is recomputed
            ranks.log(f"{path} is unreadable ({type(e).__name__}): recomputing it")
    if not isinstance(emb, dict) or emb.get("key") != key:
        base = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(ranks.device).eval()
        mine = list(range(ranks.rank, len(toks), ranks.world))
        spans = distinct_spans(toks) if cfg.logz_features == "distinct" else None  # over every prompt, before sharding
        part = prompt_embeddings(base, [toks[i] for i in mine], pad_id, cfg.eval_batch, ranks.device, cfg.logz_features,
                                 cfg.logz_layer, [spans[i] for i in mine] if spans else None)
        parts = [(i, e) for i, e in gather((mine, part), ranks.world) if len(i)]
        emb = {"key": key, "emb": torch.zeros(len(toks), parts[0][1].size(1))}
        for i, e in parts:
            emb["emb"][i] = e
        if ranks.rank == 0:
            torch.save(emb, path + ".tmp")
            os.replace(path + ".tmp", path)
    return emb["emb"]
