"""Log-probabilities of sampled responses under a causal LM, the quantity every loss reads.

- `token_logprobs` / `sequence_logprobs`: log π(y_t | x, y_<t) per response token / summed. The mask keeps every
  token up to and including the first EOS (EOS is trained) and nothing after it, which stays right when
  pad == EOS (masking pads by token id would never train EOS, a trap of several public RL codebases).
  Logits are divided by the sampling temperature. `chunk` runs the output head a few positions at a time
  (activation checkpointing), so the (N, R, V) float32 logits of a large vocabulary never exist at once.
- shared_prefix=True: each distinct prompt runs through the model once and its responses continue from a copy
  of its KV cache (the same values and gradients, up to rounding); `shared_prefix_check` probes whether a
  model can take it, and train.setup falls back to one forward per sequence when it cannot.
"""

import torch
import torch.utils.checkpoint

from paced_rl import last_logits_only, left_pad, position_ids, right_pad


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


def token_logprobs(lm, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature: float = 1.0, chunk: int = 0,
                   prompt_state: bool = False, shared_prefix: bool = False):
    """log π(y_t | x, y_<t) per response token, (N, R), zero where resp_mask is 0; with prompt_state=True
    also the mean of the last hidden states over the prompt tokens, (N, H), from the same forward pass
    and with gradients (FlowRL's log Z head reads it).

    prompt_*: (N, P) left-padded; resp_*: (N, R) right-padded. Logits are divided by the sampling
    temperature, so at T ≠ 1 this is the log-prob of the distribution that was sampled from.
    chunk > 0: the output head runs over `chunk` response positions at a time, each chunk recomputed in
    backward (activation checkpointing), so the (N, R, V) float32 logits never exist at once: with a
    150k vocabulary and 3k-token responses they would take tens of GB. Same values and gradients.
    shared_prefix=True: each distinct prompt goes through the model once (`_shared_prefix_logprobs`);
    the same values and gradients up to rounding, for models that pass `shared_prefix_check`.
    """
    if shared_prefix:
        return _shared_prefix_logprobs(lm, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature, chunk, prompt_state)
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


def _shared_prefix_logprobs(lm, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature, chunk, prompt_state):
    """token_logprobs with one prompt pass per distinct prompt (a group's G responses share it): the prompt
    runs through the model once, with gradients, and each response continues from a copy of its keys and
    values, so the prompt's positions are computed once instead of G times (Prefix Grouper, arXiv
    2506.05433, for GRPO). Rows with equal prompts need not be adjacent (partial replay groups). Columns
    that are padding in every row are dropped first. The gradient of the copied keys and values sums
    over the G responses, which is the gradient of the plain path."""
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
    pid, pm = left_pad(prompts, 0, device)
    rid, rm = right_pad(resps, 0, device)
    try:
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            a = token_logprobs(lm, pid, pm, rid, rm)
            b = token_logprobs(lm, pid, pm, rid, rm, shared_prefix=True)
    except Exception as e:  # the model's attention or cache does not take a prefix computed apart
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    err = float(((a - b).abs() / a.abs().clamp(min=1e-3)).max())
    return None if err <= rel else f"its log-probs differ from the plain path's by {err:.1e} (relative)"


def sequence_logprobs(lm, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature: float = 1.0, chunk: int = 0):
    """Σ_t log π(y_t | x, y_<t) over masked response tokens, and the token count. Both (N,).
    Arguments as in token_logprobs."""
    tok_lp = token_logprobs(lm, prompt_ids, prompt_mask, resp_ids, resp_mask, temperature, chunk)
    return tok_lp.sum(-1), resp_mask.to(tok_lp.dtype).sum(-1)
