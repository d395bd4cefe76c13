"""The bundled testbed: a tiny base model and a verifiable task with graded difficulty.

No weights or data can be downloaded in CI or in a classroom, so the project makes its own
(docs/DESIGN.md, "The bundled tasks"):

- a character tokenizer (digits, '+', '=', pad, unk, EOS) saved as an ordinary HF fast tokenizer;
- a task: "a+b=" -> the digits of a+b written in reverse (least significant first), then EOS.
  Operands have 1 to `max_digits` digits, drawn per operand, so difficulty is graded by the
  operand lengths and the carries: "3+4=" is easy, "482+957=" is hard;
- a train / held-out split of disjoint prompts, written as jsonl with fields `prompt`, `answer`
  and loaded through `datasets`, exactly like a real prompt dataset;
- a ~0.3M-parameter Llama-style model from a config, warm-started by supervised training (loss on answer
  tokens only) until its accuracy on validation sums reaches `sft_target` (`sft` says why it stops at an
  accuracy and not a step count), saved with `save_pretrained` and reloaded by train.py with
  `from_pretrained`, the same code path as Qwen2.5-Math.

The built testbed ships in the repository (testbed/, and testbed/small for the tests), each with a
MANIFEST.json (recipe, where the warm start stopped, sha256 of every file); `check` is what a run calls.
Rebuild from scratch with `python -m tasks.testbed --out=DIR [--seed=N --sft_target=...]` (the small one:
`--out=testbed/small --n_train=400 --n_heldout=64 --sft_target=0.05 --sft_approach=0`); a run refuses a build
whose digest is not in SHIPPED unless `--testbed_dir=''`.
`python -m tasks.testbed --regimes` prints each difficulty regime's share of all-equal groups at the warm start.
"""

import dataclasses
import hashlib
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
ANSWER_CAP = 6  # response tokens of the testbed's runs (Config.max_new_tokens): a sum of ≤ 4 digits and EOS


@dataclass
class TestbedConfig:
    max_digits: int = 3  # operands have 1..max_digits digits; 3 gives easy, medium and hard prompts
    n_train: int = 4000  # training prompts (the RL pool); disjoint from held-out
    n_heldout: int = 256  # held-out prompts: never trained on, never in the scheduler's pool
    n_val: int = 1024  # validation sums that judge the warm start's stop (drawn as the task draws, never held-out)
    hidden: int = 96  # model width
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads
    sft_target: float = 0.5  # the warm start stops at the first check whose validation accuracy (answer_prob) reaches this
    sft_lr: float = 1e-3  # AdamW learning rate of the warm start, constant after a linear warm-up
    sft_warmup: int = 60  # warm-up steps of that learning rate
    sft_approach: float = 0.1  # once validation accuracy is within this of sft_target, the learning rate drops ...
    sft_approach_lr: float = 0.25  # ... to sft_lr × this, so one check's progress (the overshoot) stays small
    sft_batch: int = 128  # sequences per warm-start step
    sft_eval_every: int = 5  # steps between validation checks (each one teacher-forced pass over the validation sums)
    sft_max_steps: int = 4000  # a warm start that has not reached sft_target by then fails the build
    seed: int = 0  # seeds the model's init and the warm start's problems
    split_seed: int = 0  # seeds the train / held-out / validation prompts (fixed, so builds of any seed share them)


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
    rng = random.Random(cfg.split_seed)
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


def make_val(cfg: TestbedConfig, held: list) -> list:
    """n_val (prompt, answer) pairs drawn as the task draws them, repeats allowed, never a held-out prompt:
    the warm start's stop is judged on these, so the held-out set stays untouched by every choice of the build."""
    rng, banned, out = random.Random(cfg.split_seed + 2), {r["prompt"] for r in held}, []
    while len(out) < cfg.n_val:
        p, a = make_problem(rng, cfg.max_digits)
        if p not in banned:
            out.append((p, a))
    return out


# ----------------------------------------------------------------------------- warm start


def exact_mean(model, tokenizer, pairs) -> float:
    """Mean exact accuracy (tasks/exact.py: no sampling) of (prompt, answer) pairs, sampled at temperature 1 with
    the runs' response cap of ANSWER_CAP tokens."""
    from tasks import exact

    model.eval()
    acc, _ = exact.exact_accuracy(model, tokenizer, [tokenizer(p).input_ids for p, _ in pairs], [a for _, a in pairs],
                                  ANSWER_CAP, 1.0, "cpu")
    return float(acc.mean())


def encode(tokenizer, pairs) -> tuple:
    """(ids, attention, answer mask) of prompt + answer + EOS sequences, right-padded, (B, T) each; the answer
    mask marks the tokens the warm start learns: the answer's and EOS."""
    eos, seqs, masks = tokenizer.eos_token_id, [], []
    for p, a in pairs:
        pi = tokenizer(p, add_special_tokens=False).input_ids
        ai = tokenizer(a, add_special_tokens=False).input_ids + [eos]
        seqs.append(pi + ai)
        masks.append([0] * len(pi) + [1] * len(ai))
    T = max(map(len, seqs))
    ids = torch.tensor([s + [tokenizer.pad_token_id] * (T - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
    return ids, att, torch.tensor([m + [0] * (T - len(m)) for m in masks], dtype=torch.float)


def answer_logprobs(model, ids, att, mask):
    """(B,) Σ over the answer's tokens and EOS of log π(token | prefix), and the (B, T-1) per-token NLLs."""
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]  # predicts tokens 1..T-1
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="none").view(ids.size(0), -1)
    return -(nll * mask[:, 1:]).sum(1), nll


@torch.no_grad()
def answer_prob(model, tokenizer, pairs) -> float:
    """Mean over (prompt, answer) pairs of π(answer, EOS | prompt) at temperature 1: one teacher-forced pass.
    The main term of the exact accuracy (tasks/exact.py adds the strings with skipped special tokens in
    between, which a trained model all but never writes); the warm start's cheap stopping signal."""
    model.eval()
    ids, att, mask = encode(tokenizer, pairs)
    return float(answer_logprobs(model, ids, att, mask)[0].exp().mean())


def sft(model, tokenizer, cfg: TestbedConfig, val: list, log=print) -> dict:
    """Supervised warm start on fresh random problems, loss on answer tokens (and EOS) only, stopped at the first
    check (every sft_eval_every steps) at which answer_prob on `val` reaches sft_target.

    Why a stop by accuracy and not a fixed step count: the task is learned in a jump, and where a run of fixed
    length stops relative to that jump is decided by float rounding (the same 600-step recipe landed at held-out
    0.17 under one CPU's kernels and 0.46 under another's). Stopped at a validation accuracy, every build lands
    at that accuracy up to one check's progress, whichever kernels computed it; near the target the learning rate
    drops (sft_approach) so that one check's progress is small. Returns {'steps', 'val_acc'}."""
    rng = random.Random(cfg.seed + 1)
    torch.manual_seed(cfg.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.sft_lr, weight_decay=0.0)
    approach = [1.0]  # the learning rate's factor: drops once, near the target
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg.sft_warmup) * approach[0])
    bar = tqdm(range(1, cfg.sft_max_steps + 1), desc="testbed warm start", disable=log is None)
    val_acc = 0.0
    for step in bar:
        model.train()
        ids, att, mask = encode(tokenizer, [make_problem(rng, cfg.max_digits) for _ in range(cfg.sft_batch)])
        _, nll = answer_logprobs(model, ids, att, mask)
        loss = (nll * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % cfg.sft_eval_every == 0:
            val_acc = answer_prob(model, tokenizer, val)
            bar.set_postfix(loss=f"{loss.item():.3f}", val=f"{val_acc:.3f}")
            if val_acc >= cfg.sft_target:
                model.eval()
                return {"steps": step, "val_acc": round(val_acc, 4)}
            if val_acc >= cfg.sft_target - cfg.sft_approach:
                approach[0] = cfg.sft_approach_lr
    raise RuntimeError(f"testbed: the warm start did not reach validation accuracy {cfg.sft_target} in "
                       f"sft_max_steps={cfg.sft_max_steps} steps (last check: {val_acc:.3f}); raise sft_max_steps or sft_lr")


# ----------------------------------------------------------------------------- build, manifest, check

# The shipped builds, {folder in the repository: digest of its files}; a run refuses any other build unless
# --testbed_dir='', wherever it lies
SHIPPED = {"testbed": "57d8886192c9b9d3074de275802a823fce6679334a21651113f90a93e3ba599f",
           "testbed/small": "1909c4f432ca16965d8d535695a8878f8fdaa1e85d8974fcb5a60ed843917653"}
MANIFEST = "MANIFEST.json"  # {config, warm start, sha256 of every built file}: written by build, read by check
BUILT = ("train.jsonl", "heldout.jsonl", "model")  # what build writes; anything else in the folder (regimes, SmolLM2) is derived


def file_digests(out: str) -> dict:
    """{relative path: sha256} of every file that build writes (model/ walked), present or not."""
    paths = []
    for top in BUILT:
        full = os.path.join(out, top)
        if os.path.isdir(full):
            paths += [os.path.relpath(os.path.join(r, n), out) for r, _, ns in os.walk(full) for n in ns]
        else:
            paths.append(top)
    digests = {}
    for rel in sorted(paths):
        full = os.path.join(out, rel)
        if os.path.exists(full):
            with open(full, "rb") as f:
                digests[rel] = hashlib.sha256(f.read()).hexdigest()
    return digests


def digest_of(files: dict) -> str:
    """One sha256 over a build's file digests: the name the README and the checks use for a build."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def build(out: str, cfg: TestbedConfig = TestbedConfig(), log=print):
    """Write <out>/model (HF weights + tokenizer), <out>/train.jsonl, <out>/heldout.jsonl and <out>/MANIFEST.json
    atomically."""
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
    warm = sft(model, tokenizer, cfg, make_val(cfg, held), log=log)
    warm["heldout_acc"] = round(exact_mean(model, tokenizer, [(r["prompt"], r["answer"]) for r in held]), 4)  # reported, never used
    model.save_pretrained(os.path.join(tmp, "model"))
    tokenizer.save_pretrained(os.path.join(tmp, "model"))
    files = file_digests(tmp)
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "warm_start": warm, "digest": digest_of(files), "files": files}, f, indent=1)
    os.makedirs(out, exist_ok=True)
    for name in (MANIFEST, *BUILT):  # the manifest goes first: a build stopped halfway fails the check, never passes it
        target = os.path.join(out, name)
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
    for name in (*BUILT, MANIFEST):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    shutil.rmtree(tmp)
    if log:
        log(f"testbed built in {time.time() - t0:.0f}s at {out}: warm start stopped at step {warm['steps']}, validation "
            f"accuracy {warm['val_acc']:.3f}, held-out {warm['heldout_acc']:.3f}")
    return out


def check(out: str) -> dict:
    """The manifest of the testbed at `out`, after checking that every file is the one it lists and that the build
    is one of SHIPPED. Raises SystemExit with one line naming what differs."""
    path = os.path.join(out, MANIFEST)
    if not os.path.exists(path):
        raise SystemExit(f"testbed: {path} is missing. The shipped testbed is part of the repository (restore it with "
                         f"`git checkout -- {out}`); `python -m tasks.testbed --out={out}` builds one from scratch")
    with open(path) as f:
        man = json.load(f)
    files = file_digests(out)
    bad = sorted(k for k in set(files) | set(man["files"]) if files.get(k) != man["files"].get(k))
    if bad:
        raise SystemExit(f"testbed: {out} differs from its {MANIFEST} in {', '.join(bad)} (changed, missing or added); "
                         f"restore it with `git checkout -- {out}` or rebuild it with `python -m tasks.testbed --out={out}`")
    if man["digest"] not in SHIPPED.values():
        raise SystemExit(f"testbed: {out} is not a shipped build (digest {man['digest'][:12]}, built with "
                         f"{man['config']}): its numbers are not the README's. Restore it with `git checkout -- {out}`, "
                         f"or run on it anyway with --testbed_dir=''")
    return man


# Difficulty regimes: how many training prompts carry no signal. A share w of the training pool is
# replaced by sums with an operand one digit longer than the warm start saw (exact accuracy 0.000 at the
# warm start: every group all-wrong). The warm start solves no bucket always (its easiest, 1-digit sums,
# are at 0.90), so the uninformative prompts come from the hard side. w was set by measurement at the
# warm start (`python -m tasks.testbed --regimes` prints the expected share of all-equal groups of G = 8
# under uniform sampling): base 0.29, mid 0.60, high 0.78 on the shipped testbed. The held-out set is the same
# for all.
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


if __name__ == "__main__":
    cfg = TestbedConfig()
    out = "testbed"
    if "--regimes" in sys.argv[1:]:  # each regime's expected share of all-equal groups at the warm start
        where = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), out)
        check(where)
        for name, share in regime_shares(where).items():
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
