"""Exact accuracy on the testbed: the probability that one sampled response is correct, with no sampling.

The testbed's verifier accepts a response iff its decoded text, stripped, equals the answer. So a
prompt's accuracy under the rollout's sampling distribution π_T (softmax of logits / temperature) is

    acc(x) = Σ over accepted token strings y of Π_t π_T(y_t | x, y_<t)

which teacher forcing computes exactly (docs/DESIGN.md, "Exact accuracy"). The accepted strings are more than the answer's
tokens followed by EOS: decoding skips special tokens, so `<pad>` or `<unk>` may stand anywhere among the
answer's characters, and a response that reaches `max_new_tokens` without EOS is decoded as it stands.
exact_accuracy walks that set as a tree: one batched teacher-forced pass runs every prompt along its
answer, summing the probability of EOS after the whole answer (or of the whole answer at the length
cap), and each special token that could stand in between opens a branch, run the same way in the next
pass. Branches whose probability falls below `prune` are dropped and their mass
returned as a bound: acc lies in [acc, acc + dropped].

The rollout samples with the Gumbel-max trick on uniforms clamped to [1e-20, 1 − 1e-7], which moves
a token's probability by less than 1e-6 relative; no top-k or top-p truncation is applied.
"""

import numpy as np
import torch

import lm as lm_lib
from distributed import gather


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
    # a frontier item: (prompt, response prefix, answer tokens matched, log p of the prefix); one teacher-forced
    # pass runs it along the rest of the answer, and every special token that could stand in between opens a branch
    frontier = [(i, [], 0, 0.0) for i in range(len(prompt_toks)) if len(ans_ids[i]) <= max_new_tokens]
    while frontier:
        nxt = []
        for c in range(0, len(frontier), batch_size):
            chunk = frontier[c:c + batch_size]
            seqs = [prompt_toks[i] + prefix + ans_ids[i][m:] for i, prefix, m, _ in chunk]
            pid, pmask = lm_lib.left_pad(seqs, tokenizer.pad_token_id, device)
            logits = lm(input_ids=pid, attention_mask=pmask, position_ids=lm_lib.position_ids(pmask)).logits.float()
            logp = torch.log_softmax(logits / temperature, -1).cpu().double().numpy()  # (b, T, V)
            for (i, prefix, m, lp), seq, rows in zip(chunk, seqs, logp):
                n, rest, depth = len(ans_ids[i]), ans_ids[i][m:], len(prefix)
                first = rows.shape[0] - len(seq) + len(prompt_toks[i]) + depth - 1  # the row that predicts rest[0]
                for k in range(len(rest) + 1):
                    row, d, done = rows[first + k], depth + k, m + k == n  # d response tokens so far
                    if done:  # the whole answer: EOS ends an accepted response
                        acc[i] += np.exp(lp + row[eos])
                    for t in skip:  # dropped by decoding: the response stays acceptable
                        p = lp + row[t]
                        if d + 1 == max_new_tokens:  # the length cap: decoded as it stands
                            acc[i] += np.exp(p) if done else 0.0
                        elif n - (m + k) > max_new_tokens - d - 1:
                            continue  # the rest of the answer no longer fits: never accepted
                        elif np.exp(p) >= prune:
                            nxt.append((i, prefix + rest[:k] + [t], m + k, p))
                        else:
                            dropped[i] += np.exp(p)
                    if done:
                        break
                    lp += row[rest[k]]
                    if d + 1 == max_new_tokens:  # the cap, reached by an answer token
                        acc[i] += np.exp(lp) if m + k + 1 == n else 0.0
                        break
        frontier = nxt
    return acc, dropped


def exact_accuracy_sharded(lm, tokenizer, toks: list, answers: list, cfg, ranks):
    """exact_accuracy of every prompt of `toks` at the run's temperature and length cap: each rank computes
    its share, then one gather. A sharded (FSDP) model needs every rank in lockstep, so there each computes all."""
    world = 1 if cfg.fsdp else ranks.world
    mine = list(range(ranks.rank % world, len(toks), world))
    acc, gap = exact_accuracy(lm, tokenizer, [toks[j] for j in mine], [answers[j] for j in mine], cfg.max_new_tokens,
                              cfg.temperature, ranks.device, cfg.eval_batch)
    out = np.zeros((2, len(toks)))
    for idx, a, g in gather((mine, acc, gap), world):
        out[0, idx], out[1, idx] = a, g
    return out[0], out[1]


if __name__ == "__main__":  # python -m tasks.exact [--model=testbed/model] [--data=testbed/heldout.jsonl] [--temperature=1.0]
    import json
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = {"model": "testbed/model", "data": "testbed/heldout.jsonl", "temperature": "1.0", "max_new_tokens": "6",
            **dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)}
    tok = AutoTokenizer.from_pretrained(args["model"])
    lm = AutoModelForCausalLM.from_pretrained(args["model"]).eval()
    rows = [json.loads(line) for line in open(args["data"]) if line.strip()]
    acc, gap = exact_accuracy(lm, tok, [tok(r["prompt"]).input_ids for r in rows], [r["answer"] for r in rows],
                              int(args["max_new_tokens"]), float(args["temperature"]), "cpu")
    print(f"{args['data']}: {len(rows)} prompts, exact accuracy {acc.mean():.4f} (pruned mass ≤ {gap.mean():.1e}); "
          f"{np.mean((acc > 0.1) & (acc < 0.9)):.0%} of the prompts strictly between 0.1 and 0.9")
