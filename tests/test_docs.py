"""Every command that README.md, RESULTS.md and docs/ print, checked at --help level: the script or module it names
exists, and every --key=value it passes is a field that command takes, with a value it accepts (the presets and
methods resolved, the config's ranges checked). A flag that a command refuses cannot stand in the docs.

    python -m pytest -q tests/test_docs.py
"""

import glob
import importlib.util
import os
import re

import pytest

import config
import tasks
from experiments import run as lab_run

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCS = ["README.md", "RESULTS.md", *sorted(glob.glob("docs/*.md", root_dir=HERE))]
PLACEHOLDER = re.compile(r"[$<]|^[A-Z][A-Z_0-9]*([,:][A-Z][A-Z_0-9]*)*$|^\.\.\.$")  # $HOST, <dir>, DIR, RUN_A,RUN_B


def commands() -> list:
    """(file, command) for every line of a code block and every inline code span that runs python, torchrun or bash."""
    out = []
    for name in DOCS:
        text = open(os.path.join(HERE, name)).read()
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S)
        inline = re.findall(r"`([^`\n]+(?:\n[^`\n]+)*)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for line in [line for b in blocks for line in b.splitlines()] + [" ".join(i.split()) for i in inline]:
            line = re.split(r"\s+#\s", line)[0].strip()
            m = re.search(r"(?:^|&& |; )((?:[A-Z_]+=\S+ )*(?:python3?|torchrun|bash) .*)", line)
            if m:
                out.append((name, m.group(1)))
    return out


def split_command(cmd: str):
    """(kind, target, args): kind script | module | bash | other."""
    words = [w for w in cmd.split() if not re.fullmatch(r"[A-Z_]+=\S+", w)]
    head, rest = words[0], words[1:]
    if head == "bash":
        return "bash", rest[0] if rest else "", rest[1:]
    if head == "torchrun":  # the launcher's own flags, then the script or -m module
        while rest and rest[0].startswith("--"):
            rest = rest[1:]
    if rest[:1] == ["-m"]:
        return "module", rest[1] if len(rest) > 1 else "", rest[2:]
    if rest and rest[0].endswith(".py"):
        return "script", rest[0], rest[1:]
    return "other", " ".join(rest), []


def check_fields(args: list, classes: tuple, extra=()):
    """Every --key=value is a field of `classes` (or one of `extra`); values that are not placeholders parse, and the
    whole config is made (presets and ranges) when none is a placeholder."""
    pairs = [a[2:].split("=", 1) for a in args if a.startswith("--") and "=" in a]
    assert all(a.startswith("--") and "=" in a or PLACEHOLDER.search(a) for a in args), args
    known = {f for c in classes for f in c.__dataclass_fields__} | set(extra)
    unknown = [k for k, _ in pairs if k not in known]
    assert not unknown, f"unknown fields {unknown}"
    concrete = [f"--{k}={v}" for k, v in pairs if not PLACEHOLDER.search(v) and k not in extra]
    parsed = config.parse_args(concrete, classes)
    if len(concrete) == len(pairs):
        return parsed
    return None


CMDS = commands()


def test_the_docs_print_commands():
    """The collector finds the README's two commands and the docs' others (it is not silently empty)."""
    found = {c for _, c in CMDS}
    assert "torchrun --standalone --nproc_per_node=2 train.py" in found and "bash .ci/run" in found
    assert len(found) > 30


@pytest.mark.parametrize("where,cmd", CMDS, ids=[re.sub(r"[^\w.:=/-]+", "_", f"{w}:{c[:60]}") for w, c in CMDS])
def test_every_printed_command_is_one_the_code_takes(where, cmd):
    kind, target, args = split_command(cmd)
    if kind == "bash":
        assert os.path.exists(os.path.join(HERE, target)), f"{where}: {cmd}: no script {target}"
    elif kind == "module":
        if target in ("pytest", "venv"):
            return
        assert importlib.util.find_spec(target) is not None, f"{where}: {cmd}: no module {target}"
        if target == "experiments.run":
            got = check_fields(args, (config.Config, *lab_run.LAB, lab_run.MethodName))
            if got is not None and not got.get("resume"):
                lab_run.make_configs(got)  # the method, the preset, the harness's combinations
    elif kind == "script":
        assert os.path.exists(os.path.join(HERE, target)), f"{where}: {cmd}: no file {target}"
        if target == "train.py":
            got = check_fields(args, (config.Config,))
            if got is not None and not got.get("resume"):
                config.make_config(got, tasks.PRESETS)
        elif target == "eval.py":
            check_fields(args, (config.Config,), extra=("run", "model", "initial"))
