"""The PACED-RL policy: any HF causal LM plus the learned partition function log Z_φ(x).

    p̂(x) = β · log Z_φ(e(x))        (Proposition 4.1: ≈ accuracy of π_old on x; tb_loss.py)

- `LogZHead`: a 3-layer MLP over a frozen prompt embedding e(x). The embedding is the mean of the
  *initial* model's last hidden states over the prompt tokens, computed once (`prompt_embeddings`),
  so every prompt in the data set is scored without a forward pass of the LLM (paper §4).
  Our choices where the paper is silent: width `logz_hidden`, features standardized with the
  training set's mean/std, the MLP's output read in accuracy units (log Z = output/β), its output
  layer zero-initialized with bias p0, so p̂ starts at p0 for every prompt and the first selections
  are effectively uniform. `LogZHead.p_hat` gives p̂ directly, `forward` gives log Z = p̂/β for the loss;
  `param_groups` gives each layer an Adam rate scaled by its fan-in, so a wide real-model embedding does not
  make one step saturate p̂ (RESULTS.md, "Why Z_φ dies on SmolLM2").
- `PooledLogZHead`: FlowRL's head (a baseline), over the policy's own mean-pooled prompt states.
- `Policy`: an nn.Module holding the LM and the head, so one hand-written all-reduce over
  `policy.parameters()` synchronizes both.
- `generate`: batched sampling of G responses per prompt with a KV cache, left padding, temperature,
  a length cap and stop at EOS. Each prompt draws its noise from its own generator seeded by
  (seed, step, prompt id), so a prompt's samples do not depend on the rank or batch it lands in.
- `amp`: mixed precision for `dtype=bfloat16` (bf16 matmuls, fp32 weights and log-probs; Z_φ stays fp32).
- `position_ids`, `left_pad`, `right_pad`, `response_mask`: the padding conventions every pass shares
  (prompts left-padded, responses right-padded; the mask keeps the first EOS). The log-probs of the
  responses are `logprobs.py`'s.
"""

import inspect
import math

import numpy as np
import torch
import torch.nn as nn


class LogZHead(nn.Module):
    """log Z_φ(x) = σ(MLP((e(x) − μ) / σ_e)) / β, a scalar per prompt.

    The head's output is in accuracy units (it *is* p̂), so Adam's step size reads as "accuracy per
    step" whatever β is; a raw log Z head would need its learning rate scaled by 1/β. The sigmoid
    (output="sigmoid", our default) keeps p̂ in [0, 1] for prompts far from those trained on, where a
    linear output extrapolates; it caps log Z at 1/β, which Proposition 4.1 exceeds only by the KL term.
    """

    def __init__(self, dim: int, hidden: int, beta: float, init_acc: float, output: str = "sigmoid"):
        super().__init__()
        if output not in ("sigmoid", "linear"):
            raise ValueError(f"LogZHead: output must be 'sigmoid' or 'linear', got {output!r}")
        self.beta, self.output = beta, output
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sigma", torch.ones(dim))
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[-1].weight)  # all prompts start with the same estimate
        p0 = min(max(init_acc, 1e-4), 1 - 1e-4)
        nn.init.constant_(self.net[-1].bias, math.log(p0 / (1 - p0)) if output == "sigmoid" else init_acc)

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
        """The MLP's output: p̂'s logit under the sigmoid output, p̂ itself under the linear one (fp32 under amp)."""
        with torch.autocast(device_type=emb.device.type, enabled=False):
            return self.net((emb.float() - self.mu) / self.sigma).squeeze(-1)

    def p_hat(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """p̂ = β·log Z_φ: the estimated accuracy, the MLP's output read in accuracy units."""
        out = self.raw(emb)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (N, D) -> (N,)
        """log Z_φ = p̂/β, the scalar the trajectory-balance residual takes."""
        return self.p_hat(emb) / self.beta


def saturation_warning(p_hat, step: int, eps: float = 1e-3):
    """A warning when p̂ = β·log Z_φ sits within eps of 0 (or of 1) on every prompt given: a sigmoid head
    there has a vanishing gradient and may never recover, and choosing "nearest τ" among equal values
    is blind (seen on SmolLM2, RESULTS.md). None otherwise."""
    p = np.asarray(p_hat, dtype=float)
    if p.size == 0 or not np.isfinite(p).all():
        return None
    edge = 0 if p.max() < eps else 1 if p.min() > 1 - eps else None
    if edge is None:
        return None
    return (f"warning: step {step}: β·log Z_φ is {edge} (within {eps:g}) on every selected prompt: the accuracy estimate is "
            f"saturated and the selection blind; try a smaller --logz_lr (RESULTS.md: Z_φ on SmolLM2)")


class PooledLogZHead(nn.Module):
    """FlowRL's log Z head (a baseline, as its authors' code builds it): over the *policy's own* mean-pooled prompt
    hidden states, gradients flowing into the LM; [Linear(H, H), GELU, LayerNorm, Dropout] × 2, then
    Linear(H, 1). Its output is log Z in the units of FlowRL's residual, not an accuracy estimate."""

    def __init__(self, dim: int, dropout: float = 0.1):
        super().__init__()
        block = lambda: [nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim), nn.Dropout(dropout)]  # noqa: E731
        self.net = nn.Sequential(*block(), *block(), nn.Linear(dim, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (N, H) -> (N,)
        return self.net(h.float()).squeeze(-1)


class Policy(nn.Module):
    """The trainable pair (π_θ, Z_φ); the LM stays a plain HF model for save_pretrained.
    logz is a LogZHead (PACED-RL), a PooledLogZHead (FlowRL) or None (GRPO has no partition function)."""

    def __init__(self, lm: nn.Module, logz: LogZHead):
        super().__init__()
        self.lm = lm
        self.logz = logz


def amp(device, enabled: bool):
    """Mixed precision (`dtype=bfloat16`): the LM's matmuls in bf16 under autocast while its weights, gradients
    and AdamW state stay fp32, so a step of lr 1e-6 is not rounded away; log-softmax, log-probs, losses and
    Z_φ stay fp32. enabled=False is a no-op."""
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=enabled)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding: the first real token is position 0. (N, T) -> (N, T)"""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask(resp: torch.Tensor, eos_id: int) -> torch.Tensor:
    """1 for response tokens up to and including the first EOS, 0 after it. (N, R) -> (N, R)"""
    is_eos = (resp == eos_id).long()
    eos_before = is_eos.cumsum(-1) - is_eos  # EOS tokens strictly before each position
    return (eos_before == 0).long()


def left_pad(seqs: list, pad_id: int, device=None):
    """Token-id lists -> (ids, mask), both (N, T), padded on the left."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, T - len(s):] = 1
    return ids.to(device), mask.to(device)


def right_pad(seqs: list, pad_id: int, device=None):
    """Token-id lists -> (ids, mask), both (N, T), padded on the right (responses)."""
    ids, mask = left_pad([list(s)[::-1] for s in seqs], pad_id, device)
    return ids.flip(1), mask.flip(1)


def last_logits_only(lm) -> dict:
    """The forward's keyword that computes the logits of the last position only (a prefill needs no others;
    with a 150k vocabulary the rest are large), where the model takes it."""
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}


def make_generators(seeds: list, device) -> list:
    gens = []
    for s in seeds:
        g = torch.Generator(device=device)
        g.manual_seed(int(s))
        gens.append(g)
    return gens


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, group_size: int, gens: list, max_new_tokens: int,
             temperature: float, eos_id: int, pad_id: int, stop_early: bool = True) -> torch.Tensor:
    """Sample `group_size` responses for each of the B prompts.

    prompt_ids, prompt_mask: (B, P) left-padded. gens: B torch.Generators (one per prompt).
    Returns response ids (B*G, R), row b*G+g the g-th sample of prompt b; after EOS, pad_id.
    temperature == 0 means greedy. Sampling uses the Gumbel-max trick with per-prompt noise.
    stop_early=False runs all max_new_tokens steps even when every row has ended: a sharded (FSDP)
    model runs collectives in every forward, so all ranks must make the same number of calls.
    """
    B, G = prompt_ids.size(0), group_size
    pos = position_ids(prompt_mask)
    # each prompt's prefill once, shared by its G responses; only the last position's logits (large vocabularies)
    out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, **last_logits_only(lm))
    cache, logits = out.past_key_values, out.logits[:, -1].float().repeat_interleave(G, 0)  # (B*G, V)
    cache.batch_repeat_interleave(G)
    mask = prompt_mask.repeat_interleave(G, 0)
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
    done = torch.zeros(B * G, dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        if temperature > 0:
            u = torch.empty((B, G, logits.size(-1)), device=gens[0].device)  # each prompt's noise from its own generator
            for b, g in enumerate(gens):
                torch.rand((G, logits.size(-1)), generator=g, device=g.device, out=u[b])
            gumbel = u.view(B * G, -1).clamp_(1e-20, 1 - 1e-7).log_().neg_().log_().neg_()  # -log(-log u), in place
            tok = (logits / temperature).add_(gumbel.to(logits.device)).argmax(-1)
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done |= tok == eos_id
        if stop_early and done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                 past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    return torch.stack(tokens, 1)


@torch.no_grad()
def prompt_embeddings(lm, prompt_token_lists: list, pad_id: int, batch_size: int, device,
                      pool: str = "mean") -> torch.Tensor:
    """The frozen e(x) that Z_φ reads, from the last hidden state over the prompt tokens.

    pool="mean": the mean over prompt tokens, (N, H). pool="mean_last": that mean concatenated with
    the state at the prompt's last token, the position that predicts the first response token, (N, 2H).
    """
    if pool not in ("mean", "mean_last"):
        raise ValueError(f"prompt_embeddings: pool must be 'mean' or 'mean_last', got {pool!r}")
    embs = []
    for i in range(0, len(prompt_token_lists), batch_size):
        ids, mask = left_pad(prompt_token_lists[i:i + batch_size], pad_id, device)
        h = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
               output_hidden_states=True).hidden_states[-1].float()  # (b, T, H)
        m = mask.unsqueeze(-1).float()
        e = (h * m).sum(1) / m.sum(1).clamp(min=1)
        if pool == "mean_last":
            e = torch.cat([e, h[:, -1]], -1)  # left padding: the last position is the last prompt token
        embs.append(e.cpu())
    return torch.cat(embs) if embs else torch.zeros(0)
