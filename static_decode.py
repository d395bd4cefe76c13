"""The fast sampler (`--sampler=static`): lm.generate's tokens from a static KV cache and compiled decode steps.

lm.generate runs one Python-driven forward per token over a KV cache that grows by a concatenation each step; on a
GPU the step is a few hundred small kernel launches and the rollout runs far below the memory-bandwidth bound. Here
the cache is a transformers `StaticCache`, allocated once at its final length and written in place, so every decode
step has the same shapes and addresses; on CUDA the step is compiled (`torch.compile`, mode "reduce-overhead":
CUDA graphs), so one launch replays the whole step. Elsewhere it runs eagerly (compiling a CPU step buys little).

The tokens are lm.generate's: the same prefill (once per prompt, its keys and values copied to the G rows), the same
per-prompt generators drawn in the same order (lm.next_tokens), the same stop at EOS. Only the float rounding of
attention over a longer, masked cache differs, so a token can differ where two logits tie to rounding.

Shapes are bucketed, so a run compiles a few times rather than every step: the prompt count is padded to a power
of two with filler rows (no noise drawn, never returned), the prompt length to a power of two (at least 16) with
left padding; the cache holds the padded prompt and max_new_tokens. The two most recent buckets' caches and
compiled steps are kept per model.
"""

import collections
import weakref

import torch

from lm import Sampling, last_logits_only, next_tokens, position_ids, response_mask

KEEP = 2  # buckets (cache + compiled step) kept per model; each holds a full KV cache
_buckets = weakref.WeakKeyDictionary()  # model -> OrderedDict {(rows, length, dtype): Bucket}
_shadows = weakref.WeakKeyDictionary()  # model -> its bf16 copy


def bf16_shadow(lm):
    """A bfloat16 copy of `lm`, its weights refreshed from lm's on every call (in place: the addresses a CUDA graph
    captured stay valid). Under autocast every decode step would cast each fp32 weight to bf16 again, reading and
    writing three times the bytes of the weights; the copy costs 2 bytes a parameter once."""
    if lm not in _shadows:
        import copy

        _shadows[lm] = copy.deepcopy(lm).to(torch.bfloat16).eval().requires_grad_(False)
    shadow = _shadows[lm]
    for dst, src in zip(shadow.parameters(), lm.parameters()):
        dst.copy_(src)
    return shadow


def bucket(n: int, least: int = 1) -> int:
    """The power of two at or above max(n, least)."""
    return 1 << (max(n, least) - 1).bit_length()


class Bucket:
    """One shape's StaticCache and its decode step (compiled on CUDA)."""

    def __init__(self, lm, rows: int, length: int, compile_step: bool, device):
        from transformers import StaticCache

        self.cache = StaticCache(config=lm.config, max_cache_len=length)
        kinds = {type(layer).__name__ for layer in self.cache.layers}
        if kinds != {"StaticLayer"}:  # sliding-window layers keep a ring buffer that the prefill copy does not fill
            raise ValueError(f"sampler=static: {type(lm).__name__}'s static cache has layers {sorted(kinds)}; only full-"
                             "attention layers (StaticLayer) are supported: use --sampler=dynamic")
        self.mask = torch.zeros((rows, length), dtype=torch.long, device=device)  # attention mask, written in place

        def step(tok, mask, pos):
            out = lm(input_ids=tok, attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True)
            return out.logits[:, -1].float()

        self.step = torch.compile(step, mode="reduce-overhead", dynamic=False) if compile_step else step
        self.compiled = compile_step

    def __call__(self, tok, pos):
        logits = self.step(tok[:, None], self.mask, pos)
        return logits.clone() if self.compiled else logits  # a CUDA graph's output is overwritten by its next replay


def get_bucket(lm, rows: int, length: int, dtype, compile_step: bool, device) -> Bucket:
    kept = _buckets.setdefault(lm, collections.OrderedDict())
    key = (rows, length, dtype, compile_step)
    if key not in kept:
        kept[key] = Bucket(lm, rows, length, compile_step, device)
        while len(kept) > KEEP:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


@torch.no_grad()
def generate(lm, prompt_ids, prompt_mask, gens: list, spec: Sampling, compile_step: bool = None):
    """lm.generate's contract (same arguments, same tokens for the same generators) from a static KV cache.
    compile_step: compile the decode step (default: on CUDA)."""
    device = prompt_ids.device
    compile_step = device.type == "cuda" if compile_step is None else compile_step
    if torch.is_autocast_enabled(device.type):  # dtype=bfloat16: sample from a bf16 copy of the weights
        if torch.get_autocast_dtype(device.type) != torch.bfloat16:
            raise ValueError(f"sampler=static: autocast to {torch.get_autocast_dtype(device.type)}; only bfloat16 is supported")
        with torch.autocast(device_type=device.type, enabled=False):
            return generate(bf16_shadow(lm), prompt_ids, prompt_mask, gens, spec, compile_step)
    B, P, G, R = prompt_ids.size(0), prompt_ids.size(1), spec.group_size, spec.max_new_tokens
    Bp, Pp = bucket(B), bucket(P, 16)
    pid = torch.nn.functional.pad(prompt_ids, (Pp - P, 0), value=spec.pad_id)
    pm = torch.nn.functional.pad(prompt_mask, (Pp - P, 0))
    pid, pm = torch.cat([pid, pid[:1].expand(Bp - B, -1)]), torch.cat([pm, pm[:1].expand(Bp - B, -1)])  # filler rows
    pos = position_ids(pm)
    out = lm(input_ids=pid, attention_mask=pm, position_ids=pos, use_cache=True, **last_logits_only(lm))
    prefill, logits = out.past_key_values, out.logits[:, -1].float().repeat_interleave(G, 0)  # (Bp*G, V)
    del out
    b = get_bucket(lm, Bp * G, Pp + R, prefill.layers[0].keys.dtype, compile_step, device)
    b.cache.reset()
    for i, layer in enumerate(prefill.layers):  # each prompt's keys and values, copied to its G rows
        b.cache.update(layer.keys.repeat_interleave(G, 0), layer.values.repeat_interleave(G, 0), i)
    del prefill
    b.mask.zero_()
    b.mask[:, :Pp] = pm.repeat_interleave(G, 0)
    next_pos = pos[:, -1:].repeat_interleave(G, 0) + 1
    done = torch.zeros(Bp * G, dtype=torch.bool, device=device)
    done[B * G:] = True  # filler rows: no noise, pad tokens, never returned
    gens = list(gens) + [None] * (Bp - B)
    tokens, lps = [], [] if spec.logprobs else None
    for t in range(R):
        tok = next_tokens(logits, gens, spec, done, lps)
        tokens.append(tok)
        done |= tok == spec.eos_id
        if spec.stop_early and done.all():
            break
        if t + 1 == R:
            break  # the last token needs no forward
        b.mask[:, Pp + t] = 1
        logits = b(tok, next_pos)
        next_pos = next_pos + 1
    resp = torch.stack(tokens, 1)[:B * G]
    return (resp, torch.stack(lps, 1)[:B * G]) if spec.logprobs else resp


def agreement(lm, prompt_ids, prompt_mask, seeds: list, spec: Sampling, compile_step: bool = None) -> dict:
    """Both samplers on the same prompts and seeds: the share of equal tokens and the largest difference of the
    sampled tokens' log-probs (where the tokens agree); what the tests and experiments/gpu_check.sh assert."""
    from lm import generate as dynamic, make_generators

    spec = Sampling(**{**spec.__dict__, "logprobs": True})
    a, la = dynamic(lm, prompt_ids, prompt_mask, make_generators(seeds, prompt_ids.device), spec)
    b, lb = generate(lm, prompt_ids, prompt_mask, make_generators(seeds, prompt_ids.device), spec, compile_step)
    n = min(a.size(1), b.size(1))
    same = (a[:, :n] == b[:, :n]) & (response_mask(a[:, :n], spec.eos_id) > 0)
    return {"tokens_equal": float((a[:, :n] == b[:, :n]).float().mean()) if a.size(1) == b.size(1) else 0.0,
            "logprob_max_abs_diff": float((la[:, :n] - lb[:, :n]).abs()[same].max()) if same.any() else 0.0}
