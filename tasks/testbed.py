"""The bundled testbed: a tiny base model and a verifiable task with graded difficulty.

No weights or data can be downloaded in CI or in a classroom, so the project makes its own
(docs/DESIGN.md, "The bundled tasks"):

- a character tokenizer (digits, '+', '=', pad, unk, EOS) saved as an ordinary HF fast tokenizer;
- a task: "a+b=" -> the digits of a+b written in reverse (least significant first), then EOS.
  Operands have 1 to `max_digits` digits, drawn per operand, so difficulty is graded by the
  operand lengths and the carries: "3+4=" is easy, "482+957=" is hard;
- a train / held-out split of disjoint prompts, written as jsonl with fields `prompt`, `answer`
  and loaded through `datasets`, exactly like a real prompt dataset;
- a ~0.5M-parameter Llama-style model from a config, warm-started by a short supervised run
  (loss on answer tokens only), saved with `save_pretrained` and reloaded by train.py with
  `from_pretrained`, the same code path as Qwen2.5-Math.

Build it by hand with `python -m tasks.testbed --out=testbed`; train.py builds it on first use.
`python -m tasks.testbed --regimes` prints each difficulty regime's share of all-equal groups at the warm start.
"""

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from tqdm import tqdm

SPECIAL = ["<pad>", "<unk>", "</s>"]
CHARS = list("0123456789+=")


@dataclass
class TestbedConfig:
    max_digits: int = 3  # operands have 1..max_digits digits; 3 gives easy, medium and hard prompts
    n_train: int = 4000  # training prompts (the RL pool); disjoint from held-out
    n_heldout: int = 256  # held-out prompts: never trained on, never in the scheduler's pool
    hidden: int = 96  # model width
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads
    sft_steps: int = 600  # supervised warm-start steps; sets where the difficulty frontier lies
    sft_batch: int = 128  # sequences per warm-start step
    sft_lr: float = 2e-3  # one-cycle peak learning rate of the warm start (AdamW)
    seed: int = 0  # seeds the task split and the warm start


# ----------------------------------------------------------------------------- tokenizer, model


def make_tokenizer():
    """A character-level HF fast tokenizer; left padding, as generation needs."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + CHARS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tk.decoder = decoders.Fuse()  # characters join with no spaces
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", padding_side="left")


def make_model(cfg: TestbedConfig, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(vocab_size=len(tokenizer), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                     num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                     num_key_value_heads=cfg.heads, max_position_embeddings=64,
                     tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                     eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return LlamaForCausalLM(mc)


# ----------------------------------------------------------------------------- task


def make_problem(rng: random.Random, max_digits: int):
    na, nb = rng.randint(1, max_digits), rng.randint(1, max_digits)
    a = rng.randint(0 if na == 1 else 10 ** (na - 1), 10 ** na - 1)
    b = rng.randint(0 if nb == 1 else 10 ** (nb - 1), 10 ** nb - 1)
    return f"{a}+{b}=", str(a + b)[::-1]


def make_splits(cfg: TestbedConfig):
    """Disjoint train and held-out prompt lists of {'prompt', 'answer'} dicts."""
    rng = random.Random(cfg.seed)
    seen, rows = set(), []
    n = cfg.n_train + cfg.n_heldout
    space = sum(10 ** i for i in range(1, cfg.max_digits + 1)) ** 2
    if n > space // 2:
        raise ValueError(f"testbed: {n} prompts asked for but only {space} distinct sums exist")
    while len(rows) < n:
        p, a = make_problem(rng, cfg.max_digits)
        if p not in seen:
            seen.add(p)
            rows.append({"prompt": p, "answer": a})
    return rows[cfg.n_heldout:], rows[:cfg.n_heldout]


# ----------------------------------------------------------------------------- warm start


def sft(model, tokenizer, cfg: TestbedConfig, log=print):
    """Supervised warm start on fresh random problems, loss on answer tokens (and EOS) only."""
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.sft_lr, total_steps=cfg.sft_steps, pct_start=0.1)
    eos = tokenizer.eos_token_id
    model.train()
    bar = tqdm(range(cfg.sft_steps), desc="testbed warm start", disable=log is None)
    for _ in bar:
        seqs, masks = [], []
        for _ in range(cfg.sft_batch):
            p, a = make_problem(rng, cfg.max_digits)
            pi = tokenizer(p, add_special_tokens=False).input_ids
            ai = tokenizer(a, add_special_tokens=False).input_ids + [eos]
            seqs.append(pi + ai)
            masks.append([0] * len(pi) + [1] * len(ai))
        T = max(map(len, seqs))
        ids = torch.tensor([s + [tokenizer.pad_token_id] * (T - len(s)) for s in seqs])  # (B, T) right pad
        lm = torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.float)  # (B, T)
        att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]  # predicts tokens 1..T-1
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none")
        loss = (nll * lm[:, 1:].reshape(-1)).sum() / lm[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


def build(out: str, cfg: TestbedConfig = TestbedConfig(), log=print):
    """Write <out>/model (HF weights + tokenizer), <out>/train.jsonl, <out>/heldout.jsonl atomically."""
    t0 = time.time()
    tmp = out.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    train, held = make_splits(cfg)
    for name, rows in (("train", train), ("heldout", held)):
        with open(os.path.join(tmp, f"{name}.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    tokenizer = make_tokenizer()
    torch.manual_seed(cfg.seed)
    model = make_model(cfg, tokenizer)
    sft(model, tokenizer, cfg, log=log)
    model.save_pretrained(os.path.join(tmp, "model"))
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    with open(os.path.join(tmp, "testbed_config.json"), "w") as f:
        json.dump({**cfg.__dict__, "build_seconds": round(time.time() - t0, 1)}, f, indent=1)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    if log:
        log(f"testbed built in {time.time() - t0:.0f}s at {out}")
    return out


# Difficulty regimes: how many training prompts carry no signal. A share w of the training pool is
# replaced by sums with an operand one digit longer than the warm start saw (exact accuracy 0.000 at the
# warm start: every group all-wrong). The warm start solves no bucket always (its easiest, 1-digit sums,
# are at 0.90), so the uninformative prompts come from the hard side. w was set by measurement at the
# warm start (`python -m tasks.testbed --regimes` prints the expected share of all-equal groups of G = 8
# under uniform sampling): base 0.32, mid 0.62, high 0.80. The held-out set is the same for all.
REGIMES = {"base": 0.0, "mid": 0.42, "high": 0.73}


def regime_path(out: str, name: str) -> str:
    return os.path.join(out, f"train_{name}.jsonl")


def make_regime(out: str, name: str, max_digits: int = 3, seed: int = 0) -> str:
    """<out>/train_<name>.jsonl: <out>/train.jsonl with a share REGIMES[name] of its prompts (the same
    ones for a given seed) replaced by new sums with a (max_digits + 1)-digit operand, written
    atomically through `datasets` like the rest of the testbed; never a held-out prompt."""
    import datasets

    if name not in REGIMES:
        raise ValueError(f"testbed: unknown regime {name!r}; regimes: {sorted(REGIMES)}")
    base = datasets.load_dataset("json", data_files=os.path.join(out, "train.jsonl"), split="train").to_list()
    held = {r["prompt"] for r in datasets.load_dataset("json", data_files=os.path.join(out, "heldout.jsonl"), split="train")}
    rng = random.Random(seed + 7)
    n_hard = round(REGIMES[name] * len(base))
    keep = sorted(rng.sample(range(len(base)), len(base) - n_hard))
    seen, hard = {r["prompt"] for r in base} | held, []
    while len(hard) < n_hard:
        p, a = make_problem(rng, max_digits + 1)
        if max(len(x) for x in p.rstrip("=").split("+")) == max_digits + 1 and p not in seen:
            seen.add(p)
            hard.append({"prompt": p, "answer": a})
    rows = [base[i] for i in keep] + hard
    rng.shuffle(rows)
    path = regime_path(out, name)
    datasets.Dataset.from_list(rows).to_json(path + ".tmp", lines=True)
    os.replace(path + ".tmp", path)
    return path


def regime_shares(out: str, group_size: int = 8, n: int = 512) -> dict:
    """{regime: expected share of all-equal groups under uniform sampling at the warm start}, from the
    exact accuracies of n prompts of each regime's file (temperature 1, the testbed's 6-token cap)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from metrics import all_equal_share
    from tasks import exact

    tok = AutoTokenizer.from_pretrained(os.path.join(out, "model"))
    lm = AutoModelForCausalLM.from_pretrained(os.path.join(out, "model")).eval()
    shares = {}
    for name in REGIMES:
        path = regime_path(out, name)
        if not os.path.exists(path):
            make_regime(out, name)
        rows = [json.loads(line) for line in open(path)]
        rows = random.Random(0).sample(rows, min(n, len(rows)))
        acc, _ = exact.exact_accuracy(lm, tok, [tok(r["prompt"]).input_ids for r in rows], [r["answer"] for r in rows], 6, 1.0, "cpu")
        shares[name] = all_equal_share(acc, group_size)
    return shares


def ensure(out: str, log=print):
    """Build the testbed at `out` unless a complete one is already there."""
    if not os.path.exists(os.path.join(out, "testbed_config.json")):
        build(out, log=log)
    return out


if __name__ == "__main__":
    cfg = TestbedConfig()
    out = "testbed"
    if "--regimes" in sys.argv[1:]:  # each regime's expected share of all-equal groups at the warm start
        where = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), out)
        for name, share in regime_shares(ensure(where)).items():
            print(f"{name}: {REGIMES[name]:.0%} of the pool replaced; expected all-equal share of groups of 8 "
                  f"under uniform sampling at the warm start: {share:.2f}")
        raise SystemExit(0)
    for arg in sys.argv[1:]:
        k, _, v = arg.lstrip("-").partition("=")
        if k == "out":
            out = v
        elif k in {f.name for f in fields(cfg)}:
            setattr(cfg, k, type(getattr(cfg, k))(v))
        else:
            raise SystemExit(f"testbed.py: unknown option {arg!r}; options: out, " + ", ".join(f.name for f in fields(cfg)))
    build(out, cfg)
