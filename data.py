"""Prompt data: loading (local json / jsonl / parquet, or a hub data set), row checks, encoding through
the chat template (with an optional worked example as an earlier exchange), the prompt-length cap.

Every bad row stops the run with an error naming the file, the row and what is wrong; prompts over
max_prompt_tokens are skipped and counted. The held-out file is evaluated, never trained on.
"""

import json
import os
import re
from dataclasses import dataclass, field

import verify


@dataclass
class Split:
    """One split's prompts, in file order."""
    toks: list  # token ids of each prompt, chat template and suffix applied
    answers: list  # its reference answer, as the verifier takes it
    labels: dict = field(default_factory=dict)  # {label field: each prompt's value}, for the fields its rows have


@dataclass
class Prompts:
    """Everything a run knows of its task: the tokenizer, the verifier, the training and held-out prompts."""
    tokenizer: object
    verifier: object  # verify.VERIFIERS[cfg.verifier]
    train: Split
    heldout: Split


def check_model_path(path: str):
    """One line for a model path that cannot be a model: missing, a file, or a directory without config.json."""
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise SystemExit(f"model: {path} is not a Hugging Face model directory (it has no config.json)")
    elif os.path.exists(path):
        raise SystemExit(f"model: {path} is a file; expected a model directory or a hub id (org/name)")
    elif not re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        raise SystemExit(f"model: {path} does not exist (and is not a hub id of the form org/name)")


def load_tokenizer(path: str):
    """The model's tokenizer, left-padded (generation needs it), pad = EOS where it has no pad token."""
    from transformers import AutoTokenizer

    check_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a hub id that cannot be fetched, a directory without a usable tokenizer
        where = "the directory" if os.path.isdir(path) else "not a local directory, and the hub"
        raise SystemExit(f"model: no tokenizer could be loaded from {path} ({where}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise SystemExit(f"model: the tokenizer of {path} has no EOS token; responses could never end")
    return tokenizer


def load_data(cfg, log) -> Prompts:
    """The tokenizer, the verifier, and both files loaded, checked, encoded and length-capped."""
    tokenizer = load_tokenizer(cfg.model)
    label_fields = tuple(f for f in cfg.label_fields.split(",") if f)
    train_rows = load_prompts(cfg.train_data, cfg.prompt_field, cfg.answer_field, cfg.verifier, label_fields)
    eval_rows = load_prompts(cfg.eval_data, cfg.eval_prompt_field or cfg.prompt_field,
                             cfg.eval_answer_field or cfg.answer_field, cfg.verifier)
    overlap = len({r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows})
    if overlap:
        log(f"warning: {overlap} held-out prompts also appear in {cfg.train_data}")
    shot = (cfg.shot_prompt, cfg.shot_response)
    cap, why = prompt_cap(cfg)
    train_rows, train_toks = drop_long(train_rows, encode_prompts(tokenizer, train_rows, log, cfg.prompt_suffix, shot),
                                       cap, cfg.train_data, log, why)
    eval_rows, eval_toks = drop_long(eval_rows, encode_prompts(tokenizer, eval_rows, lambda *a: None, cfg.prompt_suffix, shot),
                                     cap, cfg.eval_data, log, why)
    labels = {f: [r["labels"][f] for r in train_rows] for f in train_rows[0]["labels"]}
    return Prompts(tokenizer, verify.get_verifier(cfg.verifier), Split(train_toks, [r["answer"] for r in train_rows], labels),
                   Split(eval_toks, [r["answer"] for r in eval_rows]))


def prompt_cap(cfg) -> tuple:
    """(the longest prompt a run takes, in tokens, and why): max_prompt_tokens, or less where the model's context
    (max_position_embeddings) would not hold the prompt and max_new_tokens of response."""
    from transformers import AutoConfig

    try:
        ctx = getattr(AutoConfig.from_pretrained(cfg.model), "max_position_embeddings", None)
    except Exception:  # the model itself is loaded (and its failure named) later; no limit known here
        ctx = None
    if not ctx or ctx - cfg.max_new_tokens >= cfg.max_prompt_tokens:
        return cfg.max_prompt_tokens, f"max_prompt_tokens={cfg.max_prompt_tokens}"
    if ctx <= cfg.max_new_tokens:
        raise SystemExit(f"config: max_new_tokens={cfg.max_new_tokens} leaves no room for a prompt in the context of "
                         f"{cfg.model} ({ctx} tokens)")
    return ctx - cfg.max_new_tokens, f"the model's context of {ctx} tokens less max_new_tokens={cfg.max_new_tokens}"


def check_utf8(path: str):
    """A text data file that is not UTF-8 stops the run naming its file, line and byte."""
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SystemExit(f"data: {path} line {n}: not UTF-8 text (byte 0x{line[e.start]:02x} at column "
                                 f"{e.start + 1}); convert the file to UTF-8") from None


def load_prompts(path: str, prompt_field: str, answer_field: str, verifier: str = "testbed", label_fields=()) -> list:
    """Rows of a json / jsonl / parquet file through `datasets`, checked: [{'prompt', 'answer', 'labels'}], labels
    holding the values of those `label_fields` the file has (as strings; a missing value is "none").
    Every bad row stops the run with an error naming the file, the row and what is wrong."""
    import datasets

    if not os.path.exists(path):
        hub = re.fullmatch(r"([\w.-]+/[\w.-]+)(?::([\w.-]+))?", path)  # org/name or org/name:split
        if not hub:
            raise SystemExit(f"data: {path} does not exist")
        try:
            ds = datasets.load_dataset(hub.group(1), split=hub.group(2) or "train")
        except Exception as e:
            raise SystemExit(f"data: {path} is neither a local file nor a data set that could be loaded from the "
                             f"Hugging Face hub ({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return check_rows(ds, path, prompt_field, answer_field, verifier, label_fields)
    if os.path.getsize(path) == 0:
        raise SystemExit(f"data: {path} is empty")
    if not path.endswith(".parquet"):
        check_utf8(path)
    if path.endswith(".jsonl"):  # name the line of a malformed record (datasets' own error does not)
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rec = json.loads(line)
                    except ValueError as e:
                        raise SystemExit(f"data: {path} line {n}: not valid JSON ({e})") from None
                    if not isinstance(rec, dict):
                        raise SystemExit(f"data: {path} line {n}: expected a JSON object, got {type(rec).__name__}")
    kind = "parquet" if path.endswith(".parquet") else "json"
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train")
    except Exception as e:
        raise SystemExit(f"data: {path} could not be read as {kind}: {str(e).splitlines()[0][:300]}") from None
    return check_rows(ds, path, prompt_field, answer_field, verifier, label_fields)


def check_rows(ds, path, prompt_field, answer_field, verifier, label_fields=()) -> list:
    if len(ds) == 0:
        raise SystemExit(f"data: {path} has no rows")
    for f in (prompt_field, answer_field):
        if f not in ds.column_names:
            raise SystemExit(f"data: {path} has no field {f!r}; fields: {ds.column_names}")
    rows = []
    for i, r in enumerate(ds):
        p, a = r[prompt_field], r[answer_field]
        if not isinstance(p, str) or not p.strip():
            raise SystemExit(f"data: {path} row {i}: field {prompt_field!r} must be a non-empty string, got {p!r:.60}")
        if a is None:
            raise SystemExit(f"data: {path} row {i}: field {answer_field!r} is missing")
        try:
            a = verify.check_answer(verifier, a)
        except ValueError as e:
            raise SystemExit(f"data: {path} row {i}: field {answer_field!r}: {e}") from None
        rows.append({"prompt": p, "answer": a, "labels": {f: str(r[f]) if r[f] is not None else "none"
                                                          for f in label_fields if f in ds.column_names}})
    return rows


def encode_prompts(tokenizer, rows: list, log, suffix: str = "", shot: tuple = ("", "")) -> list:
    """Token ids of each prompt (+ suffix): through the chat template when the tokenizer has one, else as is.
    shot = (question, response): a worked example, shown as one earlier exchange (the question gets the
    suffix too); ("", "") = none."""
    q, a = shot
    if bool(q) != bool(a):
        raise SystemExit(f"config: a worked example needs both shot_prompt and shot_response; got {shot!r}")
    if getattr(tokenizer, "chat_template", None):
        before = [{"role": "user", "content": q + suffix}, {"role": "assistant", "content": a}] if q else []
        texts = [tokenizer.apply_chat_template(before + [{"role": "user", "content": r["prompt"] + suffix}], tokenize=False,
                                               add_generation_prompt=True) for r in rows]
    else:
        log("tokenizer has no chat template: prompts are used as plain text")
        texts = [(f"{q}{suffix}\n{a}\n\n" if q else "") + r["prompt"] + suffix for r in rows]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]


def drop_long(rows, toks, cap, name, log, why=None):
    """Skip (and count) prompts longer than the cap; all of them too long is an error. why: what sets the cap."""
    limit = f"max_prompt_tokens={cap}" if why in (None, f"max_prompt_tokens={cap}") else f"{cap} tokens ({why})"
    keep = [i for i, t in enumerate(toks) if len(t) <= cap]
    if not keep:
        raise SystemExit(f"data: every prompt of {name} is longer than {limit} (shortest: {min(map(len, toks))} tokens)")
    if len(keep) < len(rows):
        log(f"{name}: skipped {len(rows) - len(keep)} of {len(rows)} prompts longer than {limit}")
    return [rows[i] for i in keep], [toks[i] for i in keep]

