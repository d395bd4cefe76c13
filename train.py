"""PACED-RL training loop. Runs as `python train.py` or `torchrun --standalone --nproc_per_node=N train.py`.

One step, one function each below (docs/DESIGN.md, "One step"):
  1. select:  score a candidate pool with p̂ = β·log Z_φ(e(x)), pick B prompts near τ   (scheduler.py)
  2. roll out G responses per prompt with the current policy, π_old := π_θ           (rollout.py)
  3. verify:  reward r ∈ {0, 1}, per-prompt accuracy a(x), error e(x) = |a − p̂|        (verify.py)
  4. replay:  draw correct trajectories stored at earlier steps                       (replay.py)
  5. update:  one optimizer step on the TB loss over fresh + replayed samples, in θ and φ (update.py,
     tb_loss.py); then this step's highest-error correct trajectories enter the buffer
  6. log:     metrics reduced over all ranks, to <out_dir>/metrics.jsonl

The rest lives in one file per concept: config.py (every field, presets, checks), methods.py (the named
methods), data.py (prompts), distributed.py (the hand-written data parallelism), checkpoint.py (atomic save,
resume), selection.py (the selectors), eval.py (held-out evaluation).

Where we depart from or fill in the paper (each a config field): the candidate pool and exploration
slots, the initial estimate p0, replayed samples drawn *before* this step's are added (a trajectory
never appears twice in one update), replayed samples anchored on the current policy with a clipped
importance weight and not training Z_φ. One optimizer step per rollout batch by default, so log π_old
is the update's own forward pass, detached. Baselines in the same loop (`--algo`, or `--method=NAME` of
methods.py): `grpo` (optionally with `--dynamic_sampling=true`) and `flowrl`; both sample uniformly, without replay.

Faults: checkpoints are atomic and checksummed (resume falls back past a damaged one), a NaN loss skips
its update on every rank, SIGINT / SIGTERM checkpoint and stop after the current step.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as ckpt
import eval as eval_lib
import logprobs
import paced_rl
import replay as replay_lib
import scheduler
import verify
from config import Config, make_config, parse_args
from data import load_data, load_tokenizer, prompt_embedding_cache
from distributed import all_sum, bf16_pays, check_ranks_agree, gather, is_sharded, print0, setup_distributed, teardown
from metrics import calibration
from rollout import Batch, dynamic_sampling, roll_and_verify, seed_of
from selection import NEEDS_EMBEDDINGS, Selector
import tasks
from tasks import exact
from update import Update, build_policy, fresh_samples, kl_sum, logprobs_nograd, optimizer_steps, replayed_samples


@dataclass
class Run:
    """Everything the steps read and change, built once by setup() (restored from a checkpoint on resume)."""
    cfg: Config
    rank: int
    world: int
    device: torch.device
    log: object  # print on rank 0
    tokenizer: object
    train_toks: list  # token ids of each training prompt
    answers: list  # its reference answer
    eval_toks: list
    eval_answers: list
    verifier: object  # verify.VERIFIERS[cfg.verifier]
    policy: paced_rl.Policy  # the LM and its log Z head (Z_φ for PACED-RL, FlowRL's head, None for GRPO)
    ref_lm: object  # π_ref, the frozen initial model: FlowRL's anchor, GRPO's optional KL; else None
    params: list  # the trainable parameters, listed once after sharding (FSDP2 swaps them while unsharded)
    opt: torch.optim.Optimizer
    emb_train: torch.Tensor  # (N, D) e(x) of the training prompts on the device (PACED-RL), else None
    emb_eval: torch.Tensor  # (M, D) of the held-out prompts, else None
    pool: scheduler.PromptPool
    selector: Selector  # the predictor that ranks the pool (selection.py), and its state
    buf: replay_lib.ReplayBuffer
    replay_rng: np.random.Generator
    step: int = 0
    rollouts: int = 0  # responses sampled so far (dynamic sampling: every round)
    skipped: int = 0  # optimizer steps skipped (non-finite, or nothing to train on)
    exact_eval: object = None  # () -> (exact accuracies, pruned mass) of the held-out prompts, else None
    warned_saturation: bool = False  # the warning that p̂ is stuck at 0 or 1 is said once a run
    nonfinite_steps: int = 0  # steps in a row whose update was skipped for a non-finite loss or gradient


def setup(cfg: Config) -> Run:
    """Process group, testbed, tokenizer, data, e(x), policy, optimizer, pool and buffer; a resumed run's state."""
    rank, world, device = setup_distributed(cfg)
    log = lambda *a: print0(*a, rank=rank)  # noqa: E731
    if cfg.prompts_per_step % world:
        raise SystemExit(f"config: prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {world}")
    if cfg.fsdp and cfg.prompts_per_step % (world * cfg.updates_per_batch):
        raise SystemExit(f"config: with --fsdp, prompts_per_step={cfg.prompts_per_step} must be divisible by world size "
                         f"× updates_per_batch = {world * cfg.updates_per_batch} (every rank steps in lockstep)")
    if cfg.dtype == "auto":  # bf16 compute where the hardware has native bf16 (distributed.bf16_pays)
        fast, why = bf16_pays(device)
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if fast else "float32")
        log(f"dtype=auto: {cfg.dtype} ({why})")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    if rank == 0:
        tasks.ensure_for(cfg, log)  # the shipped testbed checked; derived tasks the run reads, built on first use
    if world > 1:
        dist.barrier()

    start = ckpt.newest_good_checkpoint(cfg.out_dir, log) if cfg.resume else None
    tokenizer = load_tokenizer(cfg.model)
    train_rows, train_toks, eval_rows, eval_toks = load_data(cfg, tokenizer, log)
    if not cfg.resume and ckpt.ckpt_dirs(cfg.out_dir):
        raise SystemExit(f"{cfg.out_dir} already holds checkpoints of a run: continue it with --resume={cfg.out_dir}, "
                         f"or start a new run with another --out_dir")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if rank == 0 and not cfg.resume:
        with open(os.path.join(cfg.out_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    emb_train = emb_eval = None  # frozen e(x) of the *initial* model for Z_φ: computed once, cached next to the run
    if cfg.algo == "paced" or cfg.select in NEEDS_EMBEDDINGS:
        emb_train, emb_eval = prompt_embedding_cache(cfg, tokenizer.pad_token_id, train_toks, eval_toks, dtype, device, rank, world)
    policy, ref_lm, opt = build_policy(cfg, os.path.join(start, "model") if start else cfg.model, emb_train, dtype, device, world)
    run = Run(cfg, rank, world, device, log, tokenizer, train_toks, [r["answer"] for r in train_rows], eval_toks,
              [r["answer"] for r in eval_rows], verify.get_verifier(cfg.verifier), policy, ref_lm,
              [p for p in policy.parameters() if p.requires_grad], opt,
              emb_train.to(device) if emb_train is not None else None, emb_eval,
              scheduler.PromptPool(len(train_rows), cfg.pool_size if cfg.select != "uniform" else cfg.prompts_per_step, cfg.seed),
              None, replay_lib.ReplayBuffer(cfg.replay_capacity, cfg.replay_add_k), np.random.default_rng(seed_of(cfg.seed, 2)))
    # probed after the parameters are listed: a sharded root stays unsharded after a forward call without backward
    if cfg.shared_prefix and (why := logprobs.shared_prefix_check(policy.lm, len(tokenizer), device)):
        log(f"shared_prefix: off, one forward per sequence instead: {cfg.model} cannot take it ({why})")
        run.cfg = cfg = dataclasses.replace(cfg, shared_prefix=False)
    exact_on = cfg.exact_metrics == "on" or (cfg.exact_metrics == "auto" and cfg.verifier == "testbed")
    exact_train = (lambda idx: exact_of(run, [run.train_toks[j] for j in idx], [run.answers[j] for j in idx])[0]) if exact_on else None
    run.exact_eval = (lambda: exact_of(run, run.eval_toks, run.eval_answers)) if exact_on else None  # (acc, pruned mass)
    run.selector = Selector(cfg, len(train_rows), run.emb_train, exact_train, np.random.default_rng(seed_of(cfg.seed, 3)))
    if start:
        restore(run, ckpt.load_state(start))
        log(f"resumed {start} at step {run.step}")
    if rank == 0:
        ckpt.truncate_metrics(metrics_path(run), run.step)
    return run


def restore(run: Run, st: dict):
    if run.policy.logz is not None:
        run.policy.logz.load_state_dict(st["logz"])
    ckpt.load_opt_state(run.policy, run.opt, st["opt"], run.cfg)
    run.pool.load_state_dict(st["pool"])
    run.buf.load_state_dict(st["replay"])
    run.replay_rng.bit_generator.state = st["replay_rng"]
    if st.get("torch_rng"):  # dropout (FlowRL's head) draws from it; sampling has its own generators
        ckpt.set_torch_rng_state(st["torch_rng"][run.rank if len(st["torch_rng"]) == run.world else 0], run.device)
    run.step, run.rollouts, run.skipped = st["step"], st["rollouts"], st["skipped_updates"]
    if st.get("selector") is None and run.cfg.select in ("history", "hybrid", "regress"):
        raise SystemExit(f"resume: the checkpoint holds no state of select={run.cfg.select} (written with another selector)")
    if st.get("selector") is not None:
        run.selector.load_state_dict(st["selector"])


def save(run: Run, step: int):
    """A checkpoint of everything resume needs; never one of non-finite weights (the last good one stays)."""
    bad = all_sum(float(sum(int((~torch.isfinite(p.to_local() if is_sharded(p) else p.detach())).sum()) for p in run.params)),
                  run.world, run.device)  # every rank decides alike
    if bad:
        raise SystemExit(f"stopping at step {step}: {int(bad)} weights are NaN or infinite; no checkpoint written, the "
                         f"newest good one in {run.cfg.out_dir} is intact (lower --lr)")
    ckpt.save_checkpoint(run.cfg, run.policy, run.tokenizer, run.opt, {
        "step": step, "rollouts": run.rollouts, "skipped_updates": run.skipped, "pool": run.pool.state_dict(),
        "replay": run.buf.state_dict(), "replay_rng": run.replay_rng.bit_generator.state, "selector": run.selector.state_dict(),
        "torch_rng": gather(ckpt.torch_rng_state(run.device), run.world)}, run.rank)


def metrics_path(run: Run) -> str:
    return os.path.join(run.cfg.out_dir, "metrics.jsonl")


def write_metrics(run: Run, row: dict):
    if run.rank == 0:
        ckpt.append_metrics(metrics_path(run), row)


def evaluate(run: Run, final: bool = False) -> dict:
    return eval_lib.heldout_metrics(run.policy, run.tokenizer, run.eval_toks, run.eval_answers, run.verifier,
                                    run.emb_eval if run.cfg.algo == "paced" else None, run.cfg, run.device, run.rank,
                                    run.world, os.path.join(run.cfg.out_dir, "heldout_final.json") if final else None,
                                    run.exact_eval)


def exact_of(run: Run, toks, answers):
    """(exact accuracies, pruned mass) of prompts under the current policy (tasks/exact.py), sharded over ranks."""
    run.policy.eval()
    return exact.exact_accuracy_sharded(run.policy.lm, run.tokenizer, toks, answers, run.cfg, run.device, run.rank, run.world)


@torch.no_grad()
def p_hat_of(run: Run, idx) -> np.ndarray:
    """p̂ = β·log Z_φ(e(x)) of training prompts `idx`."""
    return run.policy.logz.p_hat(run.emb_train[torch.as_tensor(idx, device=run.device)]).cpu().numpy()


def select(run: Run):
    """Step 1: B prompt indices and the pool they came from, the same on every rank (same pool RNG, same state)."""
    return run.selector.choose(run.pool, lambda idx: p_hat_of(run, idx))


def roll_out(run: Run, chosen, timer: dict):
    """Steps 2-3: this rank's share of the prompts, G responses each, verified (dynamic sampling: more rounds).
    Returns (Batch, prompts rolled out over all ranks, share of all-equal groups or None, Σ first-round rewards)."""
    cfg = run.cfg
    roll = lambda chosen, rnd: roll_and_verify(run.policy.lm, run.tokenizer, run.train_toks, run.answers, run.verifier,  # noqa: E731
                                               chosen, run.step, rnd, cfg, run.device, run.rank, run.world, timer)
    run.policy.eval()
    batch = roll(chosen, 0)
    reward_sum = all_sum(float(batch.reward.sum()), run.world, run.device)
    if not cfg.dynamic_sampling:
        return batch, cfg.prompts_per_step, None, reward_sum
    batch, n_prompts, n_equal = dynamic_sampling(batch, lambda rnd: roll(select(run)[0], rnd), run.train_toks,
                                                 run.tokenizer.pad_token_id, cfg, run.device, run.rank, run.world, run.log, run.step)
    return batch, n_prompts, n_equal / n_prompts, reward_sum


def draw_replay(run: Run) -> list:
    """Step 4: replayed entries drawn from earlier steps (the same draw on every rank)."""
    cfg = run.cfg
    drawn = run.buf.sample(cfg.replay_per_step, run.replay_rng) if cfg.replay == "on" else []
    if cfg.fsdp:  # every rank must run the same number of forward passes through the sharded model
        drawn = drawn[:len(drawn) - len(drawn) % (run.world * cfg.updates_per_batch)]
    return drawn


def update(run: Run, batch: Batch, drawn: list, n_train: int) -> Update:
    """Step 5: the optimizer step(s) on fresh + this rank's share of the replayed samples."""
    cfg = run.cfg
    run.policy.train()
    old_tok = None
    if cfg.updates_per_batch > 1 and batch.idx:  # the later optimizer steps need π_old's log-probs: one pass first
        old_tok = logprobs_nograd(run.policy.lm, batch.pid, batch.pmask, batch.resp, batch.rmask, cfg, per_token=True)
    fresh = fresh_samples(batch, cfg, run.emb_train, old_tok)
    replayed = replayed_samples(drawn[run.rank::run.world], run.train_toks, run.tokenizer.pad_token_id, run.emb_train, cfg, run.device)
    upd = optimizer_steps(run.policy, run.params, run.ref_lm, run.opt, fresh, replayed, n_train, cfg, run.rank, run.world, run.device,
                          run.log, run.step)
    run.skipped += upd.skipped
    return upd


def add_to_replay(run: Run, batch: Batch, acc, p_hat, logp_old):
    """This step's correct trajectories, prioritized by e(x) = |a(x) − p̂(x)|, offered to the buffer (same on every rank)."""
    responses = [y[:n].tolist() for y, n in zip(batch.resp, batch.rmask.sum(1).tolist())]
    cands = replay_lib.correct_candidates(batch.idx, batch.reward.tolist(), responses, acc, p_hat, logp_old.tolist(),
                                          run.cfg.group_size)
    run.buf.add(sorted(sum(gather(cands, run.world), []), key=lambda c: (c["prompt"], c["response"])))


def gather_groups(run: Run, batch: Batch, acc, p_hat) -> list:
    """Every rank's groups as (prompt index, observed accuracy a, p̂), in prompt order."""
    return sorted(sum(gather([(j, float(a), float(p)) for j, a, p in zip(batch.idx, acc, p_hat)], run.world), []))


@torch.no_grad()
def logz_diagnostics(run: Run, idx, upd: Update) -> dict:
    """What a saturating or swinging Z_φ shows first: the MLP's raw output over this step's prompts after the
    update (p̂'s logit under the sigmoid: beyond ±7, p̂ is within 10⁻³ of 0 or 1 and its gradient vanishes), the
    head's gradient norm and how far Adam moved φ in this step."""
    raw = run.policy.logz.raw(run.emb_train[torch.as_tensor(idx, device=run.device)]).cpu().numpy()
    return {"logz_raw_mean": float(raw.mean()), "logz_raw_min": float(raw.min()), "logz_raw_max": float(raw.max()),
            "logz_grad_norm": float(np.mean(upd.logz_grad_norms)), "logz_step_norm": upd.logz_step_norm}


def step_metrics(run: Run, batch: Batch, recs, zero_var, reward_sum, n_train, upd: Update, kl, drawn, timer) -> dict:
    """Step 6: every metric reduced over all ranks (timings are added by the loop)."""
    cfg, paced, eos = run.cfg, run.cfg.algo == "paced", run.tokenizer.eos_token_id
    acc_all, p_all = np.array([r[1] for r in recs]), np.array([r[2] for r in recs])
    tot = lambda x: all_sum(float(x), run.world, run.device)  # noqa: E731
    n = max(n_train * cfg.group_size, 1)
    truncated = int(((batch.rmask.sum(1) == batch.rmask.size(1)) & (batch.resp[:, -1] != eos)).sum()) if batch.idx else 0
    return {
        "rollouts": run.rollouts,
        "reward_mean": reward_sum / (cfg.prompts_per_step * cfg.group_size),  # first B prompts, before any filter
        "loss": float(np.mean(upd.losses)),  # mean over the step's optimizer steps
        "skipped_updates": run.skipped,
        **(calibration(p_all, acc_all) if paced and recs else {"acc_est_abs_err": None, "acc_est_corr": None}),
        "p_hat_mean": float(p_all.mean()) if paced and recs else None,
        "groups": [[int(j), round(float(a), 4), round(float(p), 6) if paced else None] for j, a, p in recs],  # (prompt, a(x), p̂)
        **(logz_diagnostics(run, [r[0] for r in recs], upd) if paced and recs else {}),
        "beta_kl": cfg.beta * tot(kl) / n if kl is not None else None,  # None: not measured this step (kl_every)
        "zero_var_frac": zero_var if zero_var is not None else float(np.mean((acc_all == 0) | (acc_all == 1))),
        "train_prompts": n_train,
        "resp_len": tot(batch.rmask.sum()) / n,
        "truncated_frac": tot(truncated) / n,
        "verifier_errors": int(tot(timer["verifier_errors"])),
        "replay_size": len(run.buf),
        "replayed": len(drawn),
        "grad_norm": float(np.mean(upd.grad_norms)),
        **({"format_rate": tot(timer["formatted"]) / max(tot(timer["rolled"]), 1)} if "rolled" in timer else {}),
    }


def train(cfg: Config) -> dict:
    """Run (or resume) training; returns {'final': last metrics row, 'policy': the trained Policy}."""
    run = setup(cfg)
    cfg = run.cfg  # as resolved by setup (dtype=auto, a shared_prefix the model cannot take)
    stop = ckpt.StopSignal()
    start_step = run.step
    bar = tqdm(range(run.step, cfg.max_steps), initial=run.step, total=cfg.max_steps, disable=run.rank != 0, desc="train")
    for step in bar:
        run.step = step
        row = {"step": run.step, **(evaluate(run) if run.step % cfg.eval_every == 0 else {})}
        t0 = time.time()
        chosen, cand = select(run)                                                    # 1. select
        timer = {"select": time.time() - t0, "rollout": 0.0, "verify": 0.0, "verifier_errors": 0}
        if cfg.select == "oracle" or (cfg.exact_metrics == "on" and run.step % cfg.quality_every == 0):  # the choice's quality (exact)
            row.update(run.selector.quality(cand, chosen, lambda idx: p_hat_of(run, idx)))
        batch, n_prompts, zero_var, reward_sum = roll_out(run, chosen, timer)        # 2-3. roll out, verify
        acc = batch.reward.view(-1, cfg.group_size).mean(1).cpu().numpy()            # a(x), (n,)
        p_hat = p_hat_of(run, batch.idx) if cfg.algo == "paced" and batch.idx else np.zeros(len(batch.idx))
        if cfg.algo == "paced" and cfg.logz_output == "sigmoid" and not run.warned_saturation:
            said = paced_rl.saturation_warning(p_hat, run.step)
            if said:  # each rank judges its own share; only rank 0 prints (no collective: the shares differ)
                run.log(said)
                run.warned_saturation = True
        n_train = int(all_sum(len(batch.idx), run.world, run.device))
        drawn = draw_replay(run)                                                      # 4. replay
        t4 = time.time()
        upd = update(run, batch, drawn, n_train)                                      # 5. update
        run.rollouts += n_prompts * cfg.group_size
        run.nonfinite_steps = run.nonfinite_steps + 1 if upd.nonfinite else 0
        if run.nonfinite_steps >= cfg.nonfinite_patience:  # every rank counts the same (the loss is all-reduced)
            raise SystemExit(f"stopping at step {run.step}: {run.nonfinite_steps} steps in a row had a non-finite loss or "
                             f"gradient (each update skipped, the weights unchanged); the newest checkpoint in {cfg.out_dir} "
                             f"is intact. Lower --lr, or check the data and the reward")
        if cfg.replay == "on":
            add_to_replay(run, batch, acc, p_hat, upd.logp_old)
        t5 = time.time()
        run.policy.eval()
        kl = kl_sum(run.policy.lm, batch, upd.logp_old, cfg) if cfg.kl_every and step % cfg.kl_every == 0 else None  # Prop. 4.1's gap
        groups = gather_groups(run, batch, acc, p_hat)
        run.selector.observe([g[0] for g in groups], [g[1] for g in groups])  # history, regressor: learn from this step
        row.update(step_metrics(run, batch, groups, zero_var, reward_sum, n_train, upd, kl, drawn, timer))  # 6. log
        row.update({"step_s": time.time() - t0, "exact_s": run.selector.pop_exact_seconds(), "select_s": timer["select"],
                    "rollout_s": timer["rollout"], "verify_s": timer["verify"], "update_s": t5 - t4})
        write_metrics(run, row)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", **({"eval": f"{row['eval_acc']:.3f}"} if "eval_acc" in row else {}))
        if row["zero_var_frac"] > 0.8 and run.step % cfg.eval_every == 0:
            run.log(f"warning: step {run.step}: {row['zero_var_frac']:.0%} of groups have all-equal rewards (no signal)")
        stopping = all_sum(float(stop.name is not None), run.world, run.device) > 0  # all ranks stop at the same step
        if (run.step + 1) % cfg.ckpt_every == 0 or run.step + 1 == cfg.max_steps or stopping:
            check_ranks_agree(run.params, run.world)
            save(run, step + 1)
        if stopping:
            run.log(f"stopped by signal {stop.name} after step {run.step}; checkpoint written. Continue with: --resume={cfg.out_dir}")
            stop.restore()
            teardown(run.world)
            return {"final": row, "policy": run.policy, "interrupted": True}
    stop.restore()
    run.step = max(cfg.max_steps, start_step)  # a checkpoint past max_steps is evaluated where it is
    row = {"step": run.step, "rollouts": run.rollouts, **evaluate(run, final=True),
           "param_checksum": check_ranks_agree(run.params, run.world)}
    write_metrics(run, row)
    corr = row.get("eval_acc_est_corr")
    run.log(f"done: step {run.step}, held-out accuracy {row['eval_acc']:.3f}"
            + (f", calibration corr {corr:.3f}" if corr is not None else "") + f", metrics in {metrics_path(run)}")
    teardown(run.world)
    return {"final": row, "policy": run.policy}


def main(argv=None):
    overrides = parse_args(sys.argv[1:] if argv is None else argv)
    cfg = ckpt.load_run_config(overrides["resume"], overrides) if overrides.get("resume") else make_config(overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return train(cfg)["final"]
    try:
        return train(cfg)["final"]
    except (RuntimeError, dist.DistBackendError) as e:  # a collective failed: most often another rank died
        print(f"rank {os.environ.get('RANK', '?')}: stopping: a collective operation failed, most likely because another "
              f"rank died or hung (process-group timeout {cfg.dist_timeout_s} s). Cause: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
