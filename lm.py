"""The causal-LM plumbing every pass shares: padding, mixed precision, sampling with a KV cache, log-probs.

- Padding: prompts are left-padded, responses right-padded (`left_pad`, `right_pad`); `position_ids` skips
  the left padding; `response_mask` keeps every response token up to and including the first EOS and
  nothing after it, which stays right when pad == EOS (masking pads by token id would never train EOS,
  a trap of several public RL codebases).
- `amp`: mixed precision for `dtype=bfloat16` (bf16 matmuls, fp32 weights, log-probs and losses).
- `generate`: G sampled responses per prompt, one prefill per prompt shared by its G responses, a KV
  cache, temperature, a length cap, stop at EOS. Each prompt draws its noise from its own generator seeded
  by (seed, step, prompt id), so a prompt's samples do not depend on the rank or batch it lands in.
- `token_logprobs`: log π(y_t | x, y_<t) per response token at the sampling temperature. `chunk` runs the
  output head a few positions at a time (recomputed in backward), so the (N, R, V) float32 logits of a
  large vocabulary never exist at once. `shared_prefix=True` runs each distinct prompt once and its
  responses from a copy of its KV cache; `shared_prefix_check` probes whether a model can take it.
"""

import inspect
from dataclasses import dataclass

import torch
import torch.utils.checkpoint


@dataclass
class Seqs:
    """Prompt / response pairs, one per row, as every pass takes them."""
    pid: torch.Tensor  # (N, P) prompt ids, left-padded
    pmask: torch.Tensor  # (N, P)
    resp: torch.Tensor  # (N, R) response ids, right-padded
    rmask: torch.Tensor  # (N, R) 1 on response tokens up to and including the first EOS

    def __getitem__(self, rows) -> "Seqs":
        return Seqs(self.pid[rows], self.pmask[rows], self.resp[rows], self.rmask[rows])

    def __len__(self):
        return self.resp.size(0)


@dataclass
class Sampling:
    """How generate samples: G responses per prompt, at most max_new_tokens each, at `temperature` (0 = greedy)."""
    group_size: int
    max_new_tokens: int
    temperature: float
    eos_id: int
    pad_id: int
    stop_early: bool = True  # False: every step runs even when all rows have ended (FSDP ranks need lockstep)
    logprobs: bool = False  # also return each sampled token's log π (the sampler's own, for agreement checks)


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


def next_tokens(logits, gens: list, spec: Sampling, done, logprobs: list = None):
    """One token per row from logits (B*G, V) (float32): the Gumbel-max trick, each prompt's G rows drawn from
    that prompt's generator (gens[b]; None: a filler row, no draw); pad_id where `done`. With a list `logprobs`,
    appends each token's log π at the sampling temperature (0 where done)."""
    B, G, V = len(gens), spec.group_size, logits.size(-1)
    if spec.temperature > 0:
        logits = logits / spec.temperature
        u = torch.empty((B, G, V), device=logits.device)  # each prompt's noise from its own generator
        for b, g in enumerate(gens):
            if g is None:
                u[b].fill_(0.5)  # a filler row: no draw
            else:
                torch.rand((G, V), generator=g, device=g.device, out=u[b])
        gumbel = u.view(B * G, V).clamp_(1e-20, 1 - 1e-7).log_().neg_().log_().neg_()  # -log(-log u), in place
        tok = (logits + gumbel).argmax(-1)
    else:
        tok = logits.argmax(-1)
    tok = torch.where(done, torch.full_like(tok, spec.pad_id), tok)
    if logprobs is not None:
        lp = logits.gather(-1, tok[:, None]).squeeze(-1) - torch.logsumexp(logits, -1)
        logprobs.append(lp.masked_fill(done, 0.0))
    return tok


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, gens: list, spec: Sampling):
    """Sample spec.group_size responses for each of the B prompts.

    prompt_ids, prompt_mask: (B, P) left-padded. gens: B torch.Generators (one per prompt).
    Returns response ids (B*G, R), row b*G+g the g-th sample of prompt b; after EOS, pad_id; with
    spec.logprobs also each token's log π (B*G, R) as sampled. Sampling uses the Gumbel-max trick with
    per-prompt noise (`next_tokens`). A sharded (FSDP) model runs collectives in every forward, so there
    spec.stop_early=False keeps every rank making the same number of calls. The static sampler
    (static_decode.py) returns the same tokens for the same generators.
    """
    B, G = prompt_ids.size(0), spec.group_size
    pos = position_ids(prompt_mask)
    # each prompt's prefill once, shared by its G responses; only the last position's logits (large vocabularies)
    out = lm(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=pos, use_cache=True, **last_logits_only(lm))
    cache, logits = out.past_key_values, out.logits[:, -1].float().repeat_interleave(G, 0)  # (B*G, V)
    cache.batch_repeat_interleave(G)
    mask = prompt_mask.repeat_interleave(G, 0)
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
    done = torch.zeros(B * G, dtype=torch.bool, device=prompt_ids.device)
    tokens, lps = [], [] if spec.logprobs else None
    for _ in range(spec.max_new_tokens):
        tok = next_tokens(logits, gens, spec, done, lps)
        tokens.append(tok)
        done |= tok == spec.eos_id
        if spec.stop_early and done.all():
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = lm(input_ids=tok[:, None], attention_mask=mask, position_ids=next_pos,
                 past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1].float()
        next_pos = next_pos + 1
    return (torch.stack(tokens, 1), torch.stack(lps, 1)) if spec.logprobs else torch.stack(tokens, 1)


def _token_logprobs(head, h, targets, temperature: float):
    """log π(target) from hidden states through the output head: (N, r, H), (N, r) -> (N, r), in float32."""
    logits = head(h).float()
    if temperature > 0:
        logits = logits / temperature
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, -1)


def _response_logprobs(lm, x, targets, temperature: float, chunk: int):
    """log π(targets), (N, r): x holds the logits (chunk <= 0) or the last hidden states, which go through the
    output head `chunk` positions at a time, each chunk recomputed in backward."""
    if chunk <= 0:
        return _token_logprobs(lambda v: v, x, targets, temperature)
    head = lm.get_output_embeddings()
    return torch.cat([torch.utils.checkpoint.checkpoint(_token_logprobs, head, x[:, i:i + chunk], targets[:, i:i + chunk],
                                                        temperature, use_reentrant=False)
                      for i in range(0, x.size(1), chunk)], 1)


def _prompt_mean(h, mask):
    """The mean of hidden states h (N, P, H) over the positions where mask (N, P) is 1, in float32: (N, H)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(1).float() / m.sum(1).clamp(min=1).float()


def token_logprobs(lm, seqs: Seqs, temperature: float = 1.0, chunk: int = 0, prompt_state: bool = False,
                   shared_prefix: bool = False):
    """log π(y_t | x, y_<t) per response token, (N, R), zero where seqs.rmask is 0; with prompt_state=True
    also the mean of the last hidden states over the prompt tokens, (N, H), from the same forward pass
    and with gradients (a log Z head over the policy's own states reads it).

    Logits are divided by the sampling
    temperature, so at T ≠ 1 this is the log-prob of the distribution that was sampled from.
    chunk > 0: the output head runs over `chunk` response positions at a time, each chunk recomputed in
    backward (activation checkpointing), so the (N, R, V) float32 logits never exist at once: with a
    150k vocabulary and 3k-token responses they would take tens of GB. Same values and gradients.
    shared_prefix=True: each distinct prompt goes through the model once (`_shared_prefix_logprobs`);
    the same values and gradients up to rounding, for models that pass `shared_prefix_check`.
    """
    if shared_prefix:
        return _shared_prefix_logprobs(lm, seqs, temperature, chunk, prompt_state)
    prompt_ids, prompt_mask, resp_ids, resp_mask = seqs.pid, seqs.pmask, seqs.resp, seqs.rmask
    ids = torch.cat([prompt_ids, resp_ids], 1)
    mask = torch.cat([prompt_mask, resp_mask], 1)
    P = prompt_ids.size(1)
    kw = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
    if chunk <= 0:
        out = lm(**kw, output_hidden_states=prompt_state)
        x = out.logits[:, P - 1:-1]  # (N, R, V): position P-1+t predicts response token t
        h_all = out.hidden_states[-1] if prompt_state else None
    else:
        h_all = lm.base_model(**kw).last_hidden_state
        x = h_all[:, P - 1:-1]  # (N, R, H)
    tok_lp = _response_logprobs(lm, x, resp_ids, temperature, chunk)  # (N, R)
    tok_lp = tok_lp * resp_mask.to(tok_lp.dtype)
    if not prompt_state:
        return tok_lp
    return tok_lp, _prompt_mean(h_all[:, :P], prompt_mask)


def _shared_prefix_logprobs(lm, seqs: Seqs, temperature, chunk, prompt_state):
    """token_logprobs with one prompt pass per distinct prompt (a group's G responses share it): the prompt
    runs through the model once, with gradients, and each response continues from a copy of its keys and
    values, so the prompt's positions are computed once instead of G times (Prefix Grouper, arXiv
    2506.05433, for GRPO). Rows with equal prompts need not be adjacent (partial replay groups). Columns
    that are padding in every row are dropped first. The gradient of the copied keys and values sums
    over the G responses, which is the gradient of the plain path."""
    prompt_ids, prompt_mask, resp_ids, resp_mask = seqs.pid, seqs.pmask, seqs.resp, seqs.rmask
    P, R = prompt_ids.size(1), resp_ids.size(1)
    p0 = int(prompt_mask.any(0).long().argmax()) if prompt_mask.any() else P - 1  # first column not padding everywhere
    r1 = max(int(resp_mask.any(0).nonzero().max()) + 1 if resp_mask.any() else 1, 1)  # columns up to the last response token
    pid, pm, resp, rm = prompt_ids[:, p0:], prompt_mask[:, p0:], resp_ids[:, :r1], resp_mask[:, :r1]
    uniq, inv = torch.unique(torch.cat([pid, pm], 1), dim=0, return_inverse=True)  # (U, 2P'), (N,)
    upid, upm = uniq[:, :pid.size(1)], uniq[:, pid.size(1):]
    kw = dict(input_ids=upid, attention_mask=upm, position_ids=position_ids(upm), use_cache=True)
    if chunk <= 0:
        out = lm(**kw, output_hidden_states=prompt_state, **last_logits_only(lm))
        first = out.logits[:, -1:]  # (U, 1, V): the prompt's last position predicts response token 0
        h_prompt = out.hidden_states[-1] if prompt_state else None
    else:
        out = lm.base_model(**kw)
        h_prompt = out.last_hidden_state  # (U, P', H)
        first = h_prompt[:, -1:]
    cache = out.past_key_values
    if not hasattr(cache, "batch_select_indices"):
        raise RuntimeError(f"shared_prefix: {type(lm).__name__} returned no selectable KV cache ({type(cache).__name__})")
    cache.batch_select_indices(inv)  # each row's copy of its prompt's keys and values (differentiable)
    rest = first[inv]  # (N, 1, V or H)
    if r1 > 1:
        mask = torch.cat([pm, rm[:, :-1]], 1)
        kw = dict(input_ids=resp[:, :-1], attention_mask=mask, position_ids=position_ids(mask)[:, pid.size(1):],
                  past_key_values=cache, use_cache=True)
        nxt = lm(**kw).logits if chunk <= 0 else lm.base_model(**kw).last_hidden_state  # (N, r1-1, V or H)
        rest = torch.cat([rest, nxt], 1)  # (N, r1, V or H)
    tok_lp = _response_logprobs(lm, rest, resp, temperature, chunk)
    tok_lp = torch.nn.functional.pad(tok_lp * rm.to(tok_lp.dtype), (0, R - r1))  # (N, R), zeros past r1
    if not prompt_state:
        return tok_lp
    return tok_lp, _prompt_mean(h_prompt, upm)[inv]


@torch.no_grad()
def shared_prefix_check(lm, vocab: int, device, rel: float = 1e-4):
    """None if the shared-prefix path gives this model the plain path's log-probs on a small probe (two
    left-padded prompts of different lengths, responses of different lengths, one shared prompt), else the
    reason it cannot be used. Runs in fp32 without autocast. A model that rejects a KV cache in a
    training forward (gradient checkpointing) or returns none cannot take it."""
    if getattr(lm, "is_activation_checkpointing", False) or getattr(lm, "gradient_checkpointing", False):
        return "gradient checkpointing recomputes the forward without a KV cache"
    g = torch.Generator().manual_seed(0)
    toks = lambda n: torch.randint(1, vocab, (n,), generator=g).tolist()  # noqa: E731
    prompts, resps = [toks(7), toks(4), toks(7)], [toks(5), toks(3), toks(1)]
    prompts[2] = prompts[0]
    seqs = Seqs(*left_pad(prompts, 0, device), *right_pad(resps, 0, device))
    try:
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            a = token_logprobs(lm, seqs)
            b = token_logprobs(lm, seqs, shared_prefix=True)
    except Exception as e:  # the model's attention or cache does not take a prefix computed apart
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    err = float(((a - b).abs() / a.abs().clamp(min=1e-3)).max())
    return None if err <= rel else f"its log-probs differ from the plain path's by {err:.1e} (relative)"

