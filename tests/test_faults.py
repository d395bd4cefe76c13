"""The fault suite: every way found for a run to do the wrong thing without a word around its checkpoints (resume,
eval, the run directory, settings that cannot work, failures that ended in a traceback), each held to the correct
result or to one line before any work. Small testbed, seconds a case; the multi-process cases under torchrun.

    python -m pytest -q tests/test_faults.py
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import checkpoint as ckpt
import eval as eval_py
import train
from experiments import run as lab_run
from test_all import HERE, read_metrics, run_args, small_testbed, train_rows, untimed  # noqa: F401  (a fixture)

PY = sys.executable


def quiet(capsys):
    capsys.readouterr()


def last_line(text: str) -> str:
    return [line for line in text.strip().splitlines() if line.strip()][-1]


# ------------------------------------------------------------------------------------------- resume

def test_resume_applies_a_changed_lr_for_real_and_records_it(small_testbed, tmp_path, capsys):
    """--resume=DIR --lr=5e-3 on a run made at 3e-4: the optimizer steps at 5e-3 (it restored 3e-4 before), the change is
    said once, and config.json and the next checkpoint record it."""
    out = str(tmp_path / "run")
    train.main(run_args(small_testbed, out, max_steps=2, ckpt_every=2, lr=3e-4))
    quiet(capsys)
    train.main([f"--resume={out}", "--max_steps=3", "--lr=5e-3", "--eval_every=5"])
    said = capsys.readouterr().out
    assert said.count("resume: changed from the recorded config: ") == 1
    assert "lr 0.0003 -> 0.005" in said and "eval_every 3 -> 5" in said
    st = torch.load(os.path.join(out, "ckpt_000003", "state.pt"), weights_only=False)
    assert st["opt"]["param_groups"][0]["lr"] == 5e-3 and st["config"]["lr"] == 5e-3
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["lr"] == 5e-3


def test_resume_refuses_a_field_that_defines_the_run(small_testbed, tmp_path):
    """group_size, prompts_per_step, β, the seed or the data cannot change mid-run: refused by name, nothing run."""
    out = str(tmp_path / "run")
    train.main(run_args(small_testbed, out, max_steps=2, ckpt_every=2))
    before = read_metrics(out)
    with pytest.raises(SystemExit, match=re.escape("group_size (recorded 4, asked 2), prompts_per_step (recorded 4, asked 8) "
                                                   "cannot change during a run")):
        train.main([f"--resume={out}", "--max_steps=4", "--group_size=2", "--prompts_per_step=8"])
    with pytest.raises(SystemExit, match=re.escape("beta (recorded 0.05, asked 0.1) cannot change")):
        train.main([f"--resume={out}", "--beta=0.1"])
    assert read_metrics(out) == before and ckpt.ckpt_dirs(out) == ["ckpt_000002"]


def test_harness_resume_keeps_its_method(small_testbed, tmp_path):
    """experiments.run --resume with another --method, or a harness field changed, is refused by name (it continued as
    the recorded method, or half-applied the new one); a train.py run resumed through the harness, and a harness run
    through train.py, each get one line naming the right command."""
    out, plain = str(tmp_path / "paced"), str(tmp_path / "plain")
    lab_run.main(run_args(small_testbed, out, max_steps=2, ckpt_every=2, method="paced"))
    with open(os.path.join(out, "lab.json")) as f:
        lab = f.read()
    with pytest.raises(SystemExit, match=re.escape("method (recorded 'paced', asked 'grpo') cannot change")):
        lab_run.main([f"--resume={out}", "--method=grpo"])
    with pytest.raises(SystemExit, match=re.escape("method (recorded 'paced', asked 'paced_explore') cannot change")):
        lab_run.main([f"--resume={out}", "--method=paced_explore"])
    with pytest.raises(SystemExit, match=re.escape("select (recorded 'paced', asked 'uniform') cannot change")):
        lab_run.main([f"--resume={out}", "--select=uniform"])
    with pytest.raises(SystemExit, match=re.escape("explore_frac (recorded 0.0, asked 0.5) cannot change")):
        lab_run.main([f"--resume={out}", "--explore_frac=0.5"])
    with open(os.path.join(out, "lab.json")) as f:
        assert f.read() == lab
    train.main(run_args(small_testbed, plain, max_steps=2, ckpt_every=2))
    with pytest.raises(SystemExit, match=re.escape(f"{plain} has no lab.json: it was not started by the research harness; "
                                                   f"resume it with python train.py --resume={plain}")):
        lab_run.main([f"--resume={plain}", "--max_steps=3"])
    with pytest.raises(SystemExit, match=re.escape(f"{out} is a run of the research harness")):
        train.main([f"--resume={out}", "--max_steps=3"])
    lab_run.main([f"--resume={out}", "--max_steps=3"])  # the recorded method, continued
    assert [r["step"] for r in read_metrics(out)] == [0, 1, 2, 3]


# ---------------------------------------------------------------------------------- the run directory

def test_one_run_per_directory(small_testbed, tmp_path):
    """Two runs started on one out_dir: the second stops at once with one line naming the directory and the holder's
    pid (both ran before, interleaving metrics.jsonl); the first finishes with every step once."""
    out = str(tmp_path / "run")
    first = subprocess.Popen([PY, "train.py", *run_args(small_testbed, out, max_steps=6, eval_every=6)], cwd=HERE,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lock = os.path.join(out, ckpt.RunLock.NAME)
    deadline = time.time() + 120
    while not (os.path.exists(lock) and os.path.getsize(lock)) and time.time() < deadline:
        time.sleep(0.2)
    second = subprocess.run([PY, "train.py", *run_args(small_testbed, out, max_steps=6)], cwd=HERE, capture_output=True,
                            text=True, timeout=300)
    assert second.returncode != 0
    assert re.fullmatch(rf"out_dir: {re.escape(out)} is in use by another run \(pid {first.pid} on {socket.gethostname()}\); "
                        r"wait for it to end, or give this run another --out_dir", last_line(second.stderr))
    assert "Traceback" not in second.stderr
    assert first.wait(timeout=600) == 0, first.stderr.read()[-2000:]
    assert [r["step"] for r in read_metrics(out)] == list(range(7))


def test_a_lock_left_by_a_dead_run_is_taken_over(small_testbed, tmp_path, capsys):
    """A run killed by SIGKILL cannot release its lock file's contents; the kernel drops the lock itself, and the next
    run takes the directory over, saying so once. In one process, a held lock refuses a second run before any work."""
    out = str(tmp_path / "run")
    holder = subprocess.Popen([PY, "-c", f"import checkpoint, os, signal; checkpoint.RunLock({out!r}); "
                                         "os.kill(os.getpid(), signal.SIGKILL)"], cwd=HERE)
    assert holder.wait(timeout=60) == -signal.SIGKILL
    quiet(capsys)
    train.main(run_args(small_testbed, out, max_steps=1))
    said = capsys.readouterr().out
    assert f"out_dir: taking over the lock of {out} left by a run that did not end cleanly (pid {holder.pid} on" in said
    with open(os.path.join(out, ckpt.RunLock.NAME)) as f:
        assert f.read() == ""  # released at the end: the next run says nothing
    held = ckpt.RunLock(str(tmp_path / "held"))
    try:
        with pytest.raises(SystemExit, match=re.escape(f"is in use by another run (pid {os.getpid()} on")):
            train.main(run_args(small_testbed, str(tmp_path / "held"), max_steps=1))
        assert sorted(os.listdir(tmp_path / "held")) == [ckpt.RunLock.NAME]  # nothing written by the refused run
    finally:
        held.release()


# ------------------------------------------------------------------------------------------- eval.py

def test_eval_keeps_resumes_standards(small_testbed, tmp_path, capsys):
    """eval.py --run checks a checkpoint as --resume does: weights that fail the manifest's sha256 are named and
    skipped (it reported 0.000 for them), a run without a usable checkpoint or a missing path ends with one line, and
    --initial=true evaluates the initial model on purpose."""
    out = str(tmp_path / "run")
    train.main(run_args(small_testbed, out, max_steps=2, ckpt_every=1))
    quiet(capsys)
    weights = os.path.join(out, "ckpt_000002", "model", "model.safetensors")
    with open(weights, "r+b") as f:  # one flipped byte, size unchanged
        f.seek(os.path.getsize(weights) - 100)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    table = eval_py.main([f"--run={out}", "--eval_samples=2"])
    said = capsys.readouterr().out
    assert "eval: skipping damaged checkpoint: " in said and "ckpt_000002/model/model.safetensors is corrupt" in said
    assert [r["model"] for r in table] == ["initial", "ckpt_000001"]
    with open(os.path.join(out, "ckpt_000001", "state.pt"), "r+b") as f:
        f.truncate(100)
    with pytest.raises(SystemExit, match=re.escape(f"eval: no usable checkpoint in {out} (found: ['ckpt_000001', 'ckpt_000002'])")):
        eval_py.main([f"--run={out}"])
    with pytest.raises(SystemExit, match=re.escape(f"eval: {tmp_path / 'nowhere'} does not exist")):
        eval_py.main([f"--run={tmp_path / 'nowhere'}"])
    for d in ckpt.ckpt_dirs(out):
        shutil.rmtree(os.path.join(out, d))
    with pytest.raises(SystemExit, match=re.escape(f"eval: {out} has no checkpoint (ckpt_NNNNNN) yet; --initial=true")):
        eval_py.main([f"--run={out}"])
    assert [r["model"] for r in eval_py.main([f"--run={out}", "--initial=true", "--eval_samples=2"])] == ["initial"]


# ----------------------------------------------------------------------------- settings that cannot work

def test_settings_that_cannot_work_are_refused_before_any_work(small_testbed, tmp_path):
    """B larger than the data set (it trained on all of them and logged reward_mean over the requested count), and a
    group size the objective cannot learn from (GRPO at G = 1: every advantage 0), each refused before any work."""
    out = str(tmp_path / "big")
    with pytest.raises(SystemExit, match=re.escape("prompts_per_step=500 exceeds the 400 training prompts of")):
        train.main(run_args(small_testbed, out, prompts_per_step=500, pool_size=0))
    three = tmp_path / "three.jsonl"
    three.write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)[::-1]}) + "\n" for i in range(3)))
    with pytest.raises(SystemExit, match=re.escape(f"prompts_per_step=8 exceeds the 3 training prompts of {three}")):
        train.main(run_args(small_testbed, str(tmp_path / "three"), prompts_per_step=8, pool_size=0, train_data=three))
    for d in ("big", "three"):
        assert not os.path.exists(tmp_path / d / "metrics.jsonl")
    with pytest.raises(SystemExit, match=re.escape("algo=grpo learns from group-normalized advantages, which are 0 for a "
                                                   "group of one: group_size=1 trains nothing")):
        lab_run.main(run_args(small_testbed, str(tmp_path / "g1"), method="grpo", group_size=1))
    with pytest.raises(SystemExit, match="dynamic_sampling keeps groups whose rewards differ"):
        lab_run.main(run_args(small_testbed, str(tmp_path / "d1"), method="grpo_dynamic", group_size=1))


def test_prompts_longer_than_the_models_context_are_skipped_and_counted(small_testbed, tmp_path, capsys):
    """A model whose context (max_position_embeddings) cannot hold a prompt and max_new_tokens of response: such
    prompts are skipped and counted as max_prompt_tokens' are (they were accepted without a word)."""
    model = str(tmp_path / "model")
    shutil.copytree(os.path.join(small_testbed, "model"), model)
    with open(os.path.join(model, "config.json")) as f:
        c = json.load(f)
    c["max_position_embeddings"] = 13
    with open(os.path.join(model, "config.json"), "w") as f:
        json.dump(c, f)
    from data import load_tokenizer

    tok = load_tokenizer(model)
    rows = [json.loads(line) for line in open(os.path.join(small_testbed, "train.jsonl"))]
    too_long = sum(len(tok(r["prompt"], add_special_tokens=False).input_ids) > 7 for r in rows)
    assert 0 < too_long < len(rows)
    quiet(capsys)
    train.main(run_args(small_testbed, str(tmp_path / "run"), model=model, testbed_dir="", max_steps=1, max_new_tokens=6))
    said = capsys.readouterr().out
    assert (f"skipped {too_long} of {len(rows)} prompts longer than 7 tokens (the model's context of 13 tokens less "
            f"max_new_tokens=6)") in said
    with pytest.raises(SystemExit, match="max_new_tokens=13 leaves no room for a prompt in the context of"):
        train.main(run_args(small_testbed, str(tmp_path / "run2"), model=model, testbed_dir="", max_new_tokens=13))


# ---------------------------------------------------------------------------------- one line, not a traceback

def test_bad_paths_and_files_end_with_one_line(small_testbed, tmp_path):
    """A model path that does not exist, a directory that is not a model, a data file with bytes that are not UTF-8."""
    with pytest.raises(SystemExit, match=re.escape(f"model: {tmp_path / 'nomodel'} does not exist")):
        train.main(run_args(small_testbed, str(tmp_path / "a"), model=tmp_path / "nomodel"))
    (tmp_path / "notamodel").mkdir()
    (tmp_path / "notamodel" / "weights.bin").write_bytes(b"x")
    with pytest.raises(SystemExit, match=re.escape(f"model: {tmp_path / 'notamodel'} is not a Hugging Face model directory "
                                                   "(it has no config.json)")):
        train.main(run_args(small_testbed, str(tmp_path / "b"), model=tmp_path / "notamodel"))
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n{"prompt": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(SystemExit, match=re.escape(f"data: {bad} line 3: not UTF-8 text (byte 0xe9 at column 16)")):
        train.main(run_args(small_testbed, str(tmp_path / "c"), train_data=bad))


def tmpfs(path, size: str):
    """A small tmpfs at path (the test runs as root, as CI does); skipped where mounting is not allowed."""
    os.makedirs(path, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()})")


def test_read_only_or_full_out_dir_ends_with_one_line(small_testbed, tmp_path):
    """A read-only out_dir stops the run at the start; a full disk stops it at its checkpoint, with no .tmp left behind
    and the newest checkpoint intact (it ended in torch's "unexpected pos" and left the .tmp)."""
    ro, full = tmp_path / "ro", tmp_path / "full"
    tmpfs(ro, "1m")
    try:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        with pytest.raises(SystemExit, match=re.escape(f"out_dir: cannot write to {ro / 'run'}: ") + ".*Read-only file system"):
            train.main(run_args(small_testbed, str(ro / "run"), max_steps=1))
    finally:
        subprocess.run(["umount", str(ro)])
    tmpfs(full, "1200k")  # holds the run's first files and one checkpoint (about 1.1 MB of weights), not two
    try:
        out = str(full / "run")
        with pytest.raises(SystemExit) as e:
            train.main(run_args(small_testbed, out, max_steps=4, ckpt_every=1, keep_ckpts=3))
        assert re.match(rf"checkpoint: writing {re.escape(out)}/ckpt_00000\d failed: no space left on the file system of", str(e.value))
        assert "the newest checkpoint in" in str(e.value)
        assert not [d for d in os.listdir(out) if d.endswith(".tmp")]
        for d in ckpt.ckpt_dirs(out):
            ckpt.check_checkpoint(os.path.join(out, d))  # every checkpoint left is whole
    finally:
        subprocess.run(["umount", str(full)])


def test_damaged_run_directory_and_cache_are_recovered(small_testbed, tmp_path, capsys):
    """A deleted config.json is taken from the newest checkpoint; a truncated prompt_emb.pt cache is recomputed; the
    resumed run makes the uninterrupted run's rows (both ended in tracebacks)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(run_args(small_testbed, full, max_steps=4, ckpt_every=2))
    train.main(run_args(small_testbed, part, max_steps=2, ckpt_every=2))
    os.remove(os.path.join(part, "config.json"))
    with open(os.path.join(part, "prompt_emb.pt"), "r+b") as f:
        f.truncate(64)
    quiet(capsys)
    train.main([f"--resume={part}", "--max_steps=4"])
    said = capsys.readouterr().out
    assert f"resume: {part}/config.json is missing; the run's config is taken from ckpt_000002/state.pt" in said
    assert f"{part}/prompt_emb.pt is unreadable" in said and "recomputing it" in said
    a, b = train_rows(full), train_rows(part)
    assert sorted(a) == sorted(b) == [0, 1, 2, 3]
    for s in a:
        assert untimed(a[s]) == untimed(b[s]), s


def test_ctrl_c_under_torchrun_checkpoints_every_time(small_testbed, tmp_path):
    """Ctrl-C in a terminal signals torchrun and both ranks at once (one process group), and torchrun's agent forwards
    the signal to the ranks again as it shuts down: the ranks take the repeat as the same request (a second signal used
    to abort a rank mid-checkpoint, by luck of timing), checkpoint and stop. torchrun itself then reports the signal
    and exits 1, as the README says; the checkpoint is whole and the run resumes."""
    out = str(tmp_path / "run")
    p = subprocess.Popen([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                          *run_args(small_testbed, out, max_steps=200, eval_every=1000, ckpt_every=1000)],
                         cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(os.path.join(out, "metrics.jsonl"))
                                           and len(read_metrics(out)) >= 2):
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGINT)
    stdout, stderr = p.communicate(timeout=300)
    assert f"checkpoint written. Continue with: --resume={out}" in stdout + stderr
    assert "KeyboardInterrupt" not in stderr and p.returncode == 1 and "got signal: 2" in stderr
    [d] = ckpt.ckpt_dirs(out)
    ckpt.check_checkpoint(os.path.join(out, d))
    assert int(d[5:]) == len(train_rows(out))  # the checkpoint is of the last logged step


# ---------------------------------------------------------------------------------- past one machine

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(args: list, rdzv_id: str, **popen):
    """Two torchrun agents as two nodes of one job (--nnodes=2, one process each, c10d rendezvous on 127.0.0.1, node 0
    hosting the store), as a GPU cluster would launch them; returns both Popen objects."""
    port = free_port()
    agent = lambda host: [PY, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",  # noqa: E731
                          f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}", f"--rdzv_conf=is_host={host}",
                          "train.py", *args]
    return [subprocess.Popen(agent(h), cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
            for h in ("true", "false")]


def test_two_nodes_train_stop_and_resume_as_one_node_does(small_testbed, tmp_path):
    """The multi-node launch on one machine: two agents train, checkpoint and stop, and resume to the rows of a one-node
    2-process run; a node killed (its agent and its rank) gives the other node one clear line and a non-zero exit
    within seconds."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    p = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *run_args(small_testbed, one, max_steps=4, ckpt_every=2)], cwd=HERE, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-2000:]
    for argv in (run_args(small_testbed, two, max_steps=2, ckpt_every=2), [f"--resume={two}", "--max_steps=4"]):
        nodes = two_nodes(argv, "paced_test")
        for n in nodes:
            _, err = n.communicate(timeout=600)
            assert n.returncode == 0, err[-2000:]
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert untimed(ra) == untimed(rb)
    killed = str(tmp_path / "killed")
    nodes = two_nodes(run_args(small_testbed, killed, max_steps=100000, eval_every=100000, ckpt_every=100000,
                               dist_timeout_s=60), "paced_kill")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(os.path.join(killed, "metrics.jsonl")) and len(read_metrics(killed)) >= 3):
        time.sleep(0.5)
    victim = nodes[1]
    ranks = subprocess.run(["pgrep", "-P", str(victim.pid)], capture_output=True, text=True).stdout.split()
    for pid in [victim.pid, *map(int, ranks)]:  # the node: its agent and the rank it started
        os.kill(pid, signal.SIGKILL)
    start = time.time()
    _, err = nodes[0].communicate(timeout=300)
    victim.communicate()
    assert nodes[0].returncode != 0 and time.time() - start < 60
    assert re.search(r"rank \d: stopping: a collective operation failed, most likely because another rank died", err)
