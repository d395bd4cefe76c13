"""The test suite: CPU only, no network. Run with `python -m pytest -q test_all.py`.

Unit tests use tiny models built from a config; the end-to-end tests share one small testbed
(a shorter warm start than the default one) built once per session in a temporary directory.
"""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import paced_rl
import replay
import scheduler
import tb_loss
import testbed
import train
import verify

HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama and the testbed tokenizer (no warm start)."""
    tok = testbed.make_tokenizer()
    torch.manual_seed(0)
    lm = testbed.make_model(testbed.TestbedConfig(hidden=32, layers=2, heads=2), tok).eval()
    return lm, tok


@pytest.fixture(scope="session")
def small_testbed(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tb") / "testbed")
    cfg = testbed.TestbedConfig(sft_steps=200, n_train=400, n_heldout=64)
    testbed.build(out, cfg, log=None)
    return out


def run_args(tb, out, **kw):
    args = {"model": f"{tb}/model", "train_data": f"{tb}/train.jsonl", "eval_data": f"{tb}/heldout.jsonl",
            "testbed_dir": tb, "out_dir": out, "prompts_per_step": 4, "group_size": 4, "pool_size": 16,
            "eval_samples": 2, "eval_every": 3, "max_steps": 4, "replay_per_step": 4, "lr": 3e-4}
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


# ----------------------------------------------------------------------------- the loss


def test_paced_tb_loss_hand_values():
    log_z = torch.tensor([10.0, 2.0])
    logp = torch.tensor([-1.0, -3.0])
    logp_old = torch.tensor([-1.5, -2.0])
    reward = torch.tensor([1.0, 0.0])
    # δ = log Z + logp − logp_old − r/β, β = 0.1: [10 − 1 + 1.5 − 10, 2 − 3 + 2 − 0] = [0.5, 1.0]
    loss = tb_loss.paced_tb_loss(log_z, logp, logp_old, reward, 0.1)
    assert loss.item() == pytest.approx((0.25 + 1.0) / 2)
    w = torch.tensor([2.0, 0.5])
    assert tb_loss.paced_tb_loss(log_z, logp, logp_old, reward, 0.1, weight=w).item() == pytest.approx((0.5 + 0.5) / 2)
    assert tb_loss.paced_tb_loss(log_z, logp, logp_old, reward, 0.1, denom=5).item() == pytest.approx(1.25 / 5)


def test_paced_tb_loss_gradients():
    log_z = torch.tensor([10.0, 2.0], requires_grad=True)
    logp = torch.tensor([-1.0, -3.0], requires_grad=True)
    loss = tb_loss.paced_tb_loss(log_z, logp, torch.tensor([-1.5, -2.0]), torch.tensor([1.0, 0.0]), 0.1)
    loss.backward()
    # dL/dlogZ_i = dL/dlogp_i = 2 δ_i / N = [0.5, 1.0]
    assert torch.allclose(log_z.grad, torch.tensor([0.5, 1.0]))
    assert torch.allclose(logp.grad, torch.tensor([0.5, 1.0]))


def test_gradient_at_theta_old_is_reinforce_with_baseline():
    # at logp = logp_old the θ-gradient coefficient is (2/N)(log Z − r/β) = (2/(Nβ))(p̂ − r)
    beta, p_hat = 0.05, 0.3
    logp = torch.zeros(3, requires_grad=True)
    r = torch.tensor([1.0, 0.0, 1.0])
    tb_loss.paced_tb_loss(torch.full((3,), p_hat / beta), logp, torch.zeros(3), r, beta).backward()
    assert torch.allclose(logp.grad, 2 / (3 * beta) * (p_hat - r))


def test_paced_tb_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="reward must be 1-D of length 2"):
        tb_loss.paced_tb_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), torch.zeros(3), 0.05)


def test_proposition_4_1_scalar():
    """min_c E_{y~π_old}[δ²] is at c* = E[r]/β + KL(π_old‖π_θ), for a categorical toy policy."""
    g = torch.Generator().manual_seed(0)
    beta = 0.05
    p_old = torch.tensor([0.5, 0.3, 0.2])
    p_new = torch.tensor([0.4, 0.35, 0.25])
    rew = torch.tensor([1.0, 0.0, 1.0])
    y = torch.multinomial(p_old, 200_000, replacement=True, generator=g)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([c], lr=0.5)
    for _ in range(600):
        loss = tb_loss.paced_tb_loss(c.expand(len(y)), p_new.log()[y], p_old.log()[y], rew[y], beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    r_mean = rew[y].mean()
    kl = (p_old.log()[y] - p_new.log()[y]).mean()  # the sample's KL(π_old ‖ π_θ)
    assert c.item() == pytest.approx((r_mean / beta + kl).item(), abs=1e-2)
    # and β·c − β·KL recovers the accuracy of π_old exactly
    assert beta * (c.item() - kl.item()) == pytest.approx(r_mean.item(), abs=1e-3)


def test_proposition_4_1_logz_head_learns_accuracy(tiny):
    """Policy frozen, only Z_φ trained on that policy's samples: β·log Z_φ(x) -> sampled accuracy of x."""
    lm, tok = tiny
    prompts = ["1+2=", "33+4=", "505+61=", "9+9=", "12+12="]
    toks = [tok(p).input_ids for p in prompts]
    pid, pm = paced_rl.left_pad(toks, tok.pad_token_id)
    G, beta = 64, 0.05
    resp = paced_rl.generate(lm, pid, pm, G, paced_rl.make_generators(range(5), "cpu"), 3, 1.0,
                             tok.eos_token_id, tok.pad_token_id)
    # reward: the first response token is one of a prompt-specific set of tokens -> graded accuracies
    allowed = [set(range(0, 4)), set(range(0, 8)), set(range(0, 12)), set(range(0, 15)), set()]
    r = torch.tensor([float(int(resp[i, 0]) in allowed[i // G]) for i in range(5 * G)])
    acc = r.view(5, G).mean(1)
    assert acc.max() - acc.min() > 0.5  # the check below is meaningful only with spread
    emb = paced_rl.prompt_embeddings(lm, toks, tok.pad_token_id, 8, "cpu")
    torch.manual_seed(0)
    head = paced_rl.LogZHead(emb.size(1), 64, beta, 0.5)
    head.set_normalization(emb)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    logp = torch.zeros(5 * G)  # frozen policy: log π_θ = log π_old
    for _ in range(400):
        loss = tb_loss.paced_tb_loss(head(emb).repeat_interleave(G), logp, logp, r, beta)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.allclose(beta * head(emb).detach(), acc, atol=0.02)


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    lo = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.all(tb_loss.kl_k3(lo, lo) == 0)
    assert torch.all(tb_loss.kl_k3(lo, lo + torch.tensor([0.3, -0.7, 1.0])) > 0)


# ----------------------------------------------------------------------------- masks and log-probs


def test_response_mask_counts_eos_and_nothing_after():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    m = paced_rl.response_mask(resp, eos)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_response_mask_when_pad_equals_eos():
    # pad == EOS (as in many HF models): the first EOS is trained, the padding EOS tokens are not
    resp = torch.tensor([[7, 2, 2, 2]])
    assert paced_rl.response_mask(resp, 2).tolist() == [[1, 1, 0, 0]]


def test_left_padded_logprobs_equal_unpadded(tiny):
    lm, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [tok("1+2=").input_ids, tok("345+67=").input_ids]
    resps = [[4, 5, eos, pad, pad], [6, 7, 8, 9, eos]]
    pid, pm = paced_rl.left_pad(prompts, pad)
    resp = torch.tensor(resps)
    rm = paced_rl.response_mask(resp, eos)
    batch_lp, n = paced_rl.sequence_logprobs(lm, pid, pm, resp, rm)
    assert n.tolist() == [3, 5]
    for i in range(2):
        ids = torch.tensor([prompts[i] + resps[i][:int(n[i])]])
        logits = lm(input_ids=ids).logits[0, len(prompts[i]) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompts[i]):, None]).sum()
        assert batch_lp[i].item() == pytest.approx(ref.item(), abs=1e-4)


def test_generate_is_seeded_per_prompt_not_per_batch(tiny):
    lm, tok = tiny
    a, b = tok("12+34=").input_ids, tok("5+6=").input_ids
    pid, pm = paced_rl.left_pad([a, b], tok.pad_token_id)
    both = paced_rl.generate(lm, pid, pm, 4, paced_rl.make_generators([11, 22], "cpu"), 5, 1.0, tok.eos_token_id, tok.pad_token_id)
    pid, pm = paced_rl.left_pad([b], tok.pad_token_id)
    alone = paced_rl.generate(lm, pid, pm, 4, paced_rl.make_generators([22], "cpu"), 5, 1.0, tok.eos_token_id, tok.pad_token_id)
    rm = paced_rl.response_mask(alone, tok.eos_token_id)
    assert torch.equal((both[4:, :alone.size(1)] * rm), alone * rm)
    # after EOS every position is padding
    rm2 = paced_rl.response_mask(both, tok.eos_token_id)
    assert torch.all(both[rm2 == 0] == tok.pad_token_id)


# ----------------------------------------------------------------------------- scheduler


def test_select_hand_made():
    p_hat = [0.9, 0.45, 0.1, 0.5, 0.6, 0.55]
    assert scheduler.select(p_hat, 3, 0.5).tolist() == [3, 1, 5]  # |p̂−τ| = 0, .05 (tie -> lower index), .05
    assert scheduler.select(p_hat, 2, 0.1).tolist() == [2, 1]
    assert scheduler.select([0.5, 0.5, 0.5], 2, 0.5).tolist() == [0, 1]


def test_select_bad_input():
    with pytest.raises(ValueError, match="asked for 4 prompts from a pool of 3"):
        scheduler.select([0.1, 0.2, 0.3], 4, 0.5)
    with pytest.raises(ValueError, match="non-finite accuracy estimate at pool positions \\[1\\]"):
        scheduler.select([0.1, float("nan"), 0.3], 1, 0.5)


def test_pool_walks_epochs_without_replacement_and_resumes():
    pool = scheduler.PromptPool(10, 4, seed=3)
    a, b = pool.next(), pool.next()
    assert len(set(a.tolist()) | set(b.tolist())) == 8  # no repeats within an epoch
    state = pool.state_dict()
    c = pool.next()  # crosses the epoch end: new permutation
    assert pool.epoch == 1
    other = scheduler.PromptPool(10, 4, seed=3)
    other.load_state_dict(state)
    assert other.next().tolist() == c.tolist()
    assert scheduler.PromptPool(10, 0, seed=3).next().tolist() == list(range(10))  # 0: the whole set


def test_choose_prompts_uniform_and_paced():
    p = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    pool = scheduler.PromptPool(8, 8, seed=0)  # pool = whole set: arange(8)
    assert scheduler.choose_prompts(pool, lambda idx: p[idx], 2, 0.5, "paced").tolist() == [5, 4]
    assert scheduler.choose_prompts(pool, lambda idx: p[idx], 2, 0.5, "uniform").tolist() == [0, 1]
    # exploration: the last slot goes to the lowest pool position the greedy rule passed over (0)
    assert scheduler.choose_prompts(pool, lambda idx: p[idx], 3, 0.5, "paced", n_explore=1).tolist() == [5, 4, 0]
    with pytest.raises(ValueError, match="'paced' or 'uniform'"):
        scheduler.choose_prompts(pool, lambda idx: p[idx], 2, 0.5, "greedy")


# ----------------------------------------------------------------------------- replay


def entry(prompt, prio):
    return {"prompt": prompt, "response": [prompt, 2], "priority": prio, "logp_behavior": -1.0}


def test_replay_add_priority_capacity_eviction():
    buf = replay.ReplayBuffer(capacity=4, add_k=3)
    buf.add([entry(0, 0.1), entry(1, 0.9), entry(2, 0.5), entry(3, 0.7)])
    assert [e["prompt"] for e in buf.entries] == [1, 3, 2]  # only the top add_k=3 enter, by priority
    buf.add([entry(4, 0.6), entry(5, 0.05), entry(6, 0.95)])
    # capacity 4: the lowest priorities leave
    assert [e["prompt"] for e in buf.entries] == [6, 1, 3, 4]
    buf.add([entry(7, 0.6)])  # ties with prompt 4: the newer one is kept first, capacity evicts 4
    assert [e["prompt"] for e in buf.entries] == [6, 1, 3, 7]


def test_replay_estimate_error():
    assert replay.estimate_error([0.25, 1.0], [0.5, 0.25]).tolist() == [0.25, 0.75]


def test_replay_draw_and_state_round_trip():
    buf = replay.ReplayBuffer(capacity=8, add_k=8)
    buf.add([entry(i, p) for i, p in enumerate([0.0, 0.0, 0.0, 5.0])])
    rng = np.random.default_rng(0)
    draws = [buf.sample(1, rng)[0]["prompt"] for _ in range(200)]
    assert draws.count(3) > 150  # prompt 3 (priority 5) dominates the draw
    assert len({e["prompt"] for e in buf.sample(3, rng)}) == 3  # without replacement
    assert buf.sample(10, rng).__len__() == 4  # never more than the buffer holds
    other = replay.ReplayBuffer()
    other.load_state_dict(buf.state_dict())
    r1, r2 = np.random.default_rng(5), np.random.default_rng(5)
    assert buf.sample(2, r1) == other.sample(2, r2)
    assert other.capacity == 8 and len(other) == 4


# ----------------------------------------------------------------------------- verifier and input


def test_verifier_faults_count_as_zero():
    def boom(resp, ans):
        raise RuntimeError("broken")

    r, err = verify.score(boom, ["1", "2"], ["1", "2"])
    assert r == [0.0, 0.0] and err == 2
    r, err = verify.score(lambda a, b: "yes", ["1"], ["1"])
    assert r == [0.0] and err == 1
    r, err = verify.score(lambda a, b: float("nan"), ["1"], ["1"])
    assert r == [0.0] and err == 1
    r, err = verify.score(verify.testbed_reward, ["34 ", "35", ""], ["34", "34", "34"])
    assert r == [1.0, 0.0, 0.0] and err == 0


def test_bad_data_rows_are_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "", "answer": "3"}) + "\n")
    with pytest.raises(SystemExit, match=r"d.jsonl row 1: field 'prompt' must be a non-empty string"):
        train.load_prompts(str(p), "prompt", "answer")
    with pytest.raises(SystemExit, match=r"has no field 'question'"):
        train.load_prompts(str(p), "question", "answer")
    with pytest.raises(SystemExit, match="does not exist"):
        train.load_prompts(str(tmp_path / "nope.jsonl"), "prompt", "answer")


def test_cli_errors_and_help(capsys):
    with pytest.raises(SystemExit, match="unknown key 'lrr'"):
        train.parse_args(["--lrr=1"])
    with pytest.raises(SystemExit, match="--lr='fast' is not a valid float"):
        train.parse_args(["--lr=fast"])
    assert train.parse_args(["--replay_trains_logz=on", "--group_size=4"]) == {"replay_trains_logz": True, "group_size": 4}
    with pytest.raises(SystemExit) as e:
        train.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--logz_lr" in out and "Z_φ learning rate" in out


def test_testbed_is_an_ordinary_hf_model_with_a_spread(small_testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{small_testbed}/model")
    lm = AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model")
    assert tok.decode(tok("12+3=").input_ids) == "12+3=" and tok.eos_token_id != tok.pad_token_id
    train_rows = train.load_prompts(f"{small_testbed}/train.jsonl", "prompt", "answer")
    held = train.load_prompts(f"{small_testbed}/heldout.jsonl", "prompt", "answer")
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in held}  # held-out never trained on
    a, b = held[0]["prompt"].rstrip("=").split("+")
    assert held[0]["answer"] == str(int(a) + int(b))[::-1]
    assert sum(p.numel() for p in lm.parameters()) > 100_000


# ----------------------------------------------------------------------------- end to end


def test_training_run_learns(small_testbed, tmp_path):
    out = str(tmp_path / "run")
    res = train.train(train.Config(**train.parse_args(run_args(
        small_testbed, out, max_steps=30, eval_every=30, prompts_per_step=8, group_size=8, pool_size=32,
        logz_lr=3e-3))))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert len(rows) == 30 and all(math.isfinite(r["loss"]) for r in rows)
    # Z_φ's estimate moves toward the observed accuracies
    early = np.mean([r["acc_est_abs_err"] for r in rows[:5]])
    late = np.mean([r["acc_est_abs_err"] for r in rows[-5:]])
    assert late < early - 0.05, (early, late)
    # every trainable parameter changed
    from transformers import AutoModelForCausalLM

    init = dict(AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model").named_parameters())
    for name, p in res["policy"].lm.named_parameters():
        assert not torch.equal(p.detach(), init[name].detach()), name
    torch.manual_seed(0)
    head0 = paced_rl.LogZHead(res["policy"].logz.mu.numel(), 256, 0.05, 0.5)
    for (name, p), p0 in zip(res["policy"].logz.named_parameters(), head0.parameters()):
        assert not torch.equal(p.detach(), p0.detach()), name
    assert rows[-1]["rollouts"] == 30 * 8 * 8
    assert {"beta_kl", "zero_var_frac", "resp_len", "step_s", "acc_est_corr", "reward_mean"} <= set(rows[-1])
    assert "eval_acc" in rows[0] and "eval_acc_est_corr" in read_metrics(out)[-1]
    import eval as eval_lib

    table = eval_lib.main([f"--run={out}", "--eval_samples=2"])
    assert [r["model"] for r in table] == ["initial", "ckpt_000030"]
    assert all(0 <= r["sampled"] <= 1 and 0 <= r["greedy"] <= 1 for r in table)
    assert "acc_est_corr" in table[1] and "acc_est_corr" not in table[0]


def test_resume_matches_uninterrupted_run(small_testbed, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(run_args(small_testbed, full, max_steps=6, ckpt_every=3))
    train.main(run_args(small_testbed, part, max_steps=3, ckpt_every=3))
    train.main([f"--resume={part}", "--max_steps=6"])
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        ra.pop("step_s", None), rb.pop("step_s", None)
        assert ra == rb
    assert any(r["replayed"] > 0 for r in a)  # the replay buffer was part of the resumed state
    with pytest.raises(SystemExit, match="already holds checkpoints"):  # a new run never overwrites one
        train.main(run_args(small_testbed, full, max_steps=2))


def test_two_process_torchrun_agrees_with_one_process(small_testbed, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = run_args(small_testbed, "X", max_steps=4, eval_every=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *[a.replace("=X", "=" + one) for a in args]],
                   cwd=HERE, env=env, check=True, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *[a.replace("=X", "=" + two) for a in args]],
                       cwd=HERE, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    # train.py raises if the ranks' parameters (θ and φ) differ at a checkpoint or at the end
    assert "ranks disagree" not in p.stderr
    a, b = read_metrics(one), read_metrics(two)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    # Sampling is seeded per prompt, so both runs draw the same responses; batches of a different
    # shape change logits in the last float bits only. Tolerance: 1e-3 relative on every metric.
    for ra, rb in zip(a, b):
        for k in ("reward_mean", "loss", "acc_est_abs_err", "zero_var_frac", "resp_len", "eval_acc", "param_checksum"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-6), (ra["step"], k)
