"""Exact accuracy on the testbed: the probability that one sampled response is correct, with no sampling.

The testbed's verifier accepts a response iff its decoded text, stripped, equals the answer. So a
prompt's accuracy under the rollout's sampling distribution π_T (softmax of logits / temperature) is

    acc(x) = Σ over accepted token strings y of Π_t π_T(y_t | x, y_<t)

which teacher forcing computes exactly (DESIGN.md §11). The accepted strings are more than the answer's
tokens followed by EOS: decoding skips special tokens, so `<pad>` or `<unk>` may stand anywhere among the
answer's characters, and a response that reaches `max_new_tokens` without EOS is decoded as it stands.
exact_accuracy walks that set as a tree of prefixes (one batched forward pass per depth): a prefix is
kept while it can still become accepted; EOS after the whole answer, or the whole answer at the length
cap, adds its probability. Branches whose probability falls below `prune` are dropped and their mass
returned as a bound: acc lies in [acc, acc + dropped].

The rollout samples with the Gumbel-max trick on uniforms clamped to [1e-20, 1 − 1e-7], which moves
a token's probability by less than 1e-6 relative; no top-k or top-p truncation is applied.
"""

import numpy as np
import torch

import paced_rl




@torch.no_grad()
def exact_accuracy(lm, tokenizer, prompt_toks: list, answers: list, max_new_tokens: int, temperature: float,
                   device, batch_size: int = 256, prune: float = 1e-4):
    """(acc, dropped): per prompt, the exact probability that one response sampled at `temperature` is
    accepted by verify.testbed_reward, and the probability mass of pruned branches (an upper bound on
    the error). answers: the reference strings; each must tokenize to one token per character."""
    if temperature <= 0:
        raise ValueError("exact_accuracy: needs a sampling temperature > 0 (greedy decoding is deterministic)")
    eos = tokenizer.eos_token_id
    skip = [t for t in tokenizer.all_special_ids if t != eos]  # dropped by decoding wherever they stand
    ans_ids = []
    for a in answers:
        ids = tokenizer(str(a).strip(), add_special_tokens=False).input_ids
        if tokenizer.decode(ids) != str(a).strip():
            raise ValueError(f"exact_accuracy: answer {a!r} does not round-trip through the tokenizer")
        ans_ids.append(ids)
    acc, dropped = np.zeros(len(prompt_toks)), np.zeros(len(prompt_toks))
    frontier = [(i, [], 0, 0.0) for i in range(len(prompt_toks))]  # (prompt, prefix, answer tokens matched, log p)
    for depth in range(max_new_tokens):
        nxt = []
        for s in range(0, len(frontier), batch_size):
            chunk = frontier[s:s + batch_size]
            pid, pmask = paced_rl.left_pad([prompt_toks[i] + prefix for i, prefix, _, _ in chunk], tokenizer.pad_token_id, device)
            logits = lm(input_ids=pid, attention_mask=pmask, position_ids=paced_rl.position_ids(pmask)).logits[:, -1].float()
            logp = torch.log_softmax(logits / temperature, -1).cpu().double().numpy()  # (n, V)
            for (i, prefix, m, lp), row in zip(chunk, logp):
                n = len(ans_ids[i])
                if m == n:  # the whole answer: EOS ends an accepted response
                    acc[i] += np.exp(lp + row[eos])
                for t in ([ans_ids[i][m]] if m < n else []) + skip:  # the tokens that keep it acceptable
                    p, m2 = lp + row[t], m + (m < n and t == ans_ids[i][m])
                    if depth + 1 == max_new_tokens:  # the length cap: decoded as it stands
                        acc[i] += np.exp(p) if m2 == n else 0.0
                    elif n - m2 > max_new_tokens - depth - 1:
                        continue  # the rest of the answer no longer fits: never accepted
                    elif np.exp(p) >= prune:
                        nxt.append((i, prefix + [t], m2, p))
                    else:
                        dropped[i] += np.exp(p)
        frontier = nxt
    return acc, dropped
