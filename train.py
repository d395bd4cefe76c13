"""PACED-RL training loop. Runs as `python train.py` or `torchrun --standalone --nproc_per_node=N train.py`.

One step of train(), top to bottom (docs/DESIGN.md, "One step"):
  1. select:  score a candidate pool with p̂ = β·log Z_φ(e(x)), keep B prompts near τ     (scheduler.py)
  2. roll out G responses per prompt with the current policy, π_old := π_θ              (rollout.py, lm.py)
  3. verify:  reward r ∈ {0, 1}, per-prompt accuracy a(x), error e(x) = |a − p̂|          (verify.py)
  4. replay:  draw correct trajectories stored at earlier steps                         (replay.py)
  5. update:  one optimizer step on the TB loss over fresh + replayed samples, in θ and φ (update.py,
     tb_loss.py); then this step's highest-error correct trajectories enter the buffer
  6. log:     metrics reduced over all ranks, to <out_dir>/metrics.jsonl (and TensorBoard / W&B: report.py)

train() takes two seams: the objective (how samples become a loss: update.PacedObjective) and the
selector (how B prompts are chosen: scheduler.PacedSelector), and probes that add metrics of their own.
The research harness (experiments/run.py) passes the baselines and the study's selectors through them;
this file never asks which one it runs.

Where we depart from or fill in the paper (each a config field): the candidate pool and exploration
slots, the initial estimate p0, replayed samples drawn *before* this step's are added (a trajectory
never appears twice in one update), replayed samples anchored on the current policy with a clipped
importance weight and training Z_φ toward their group's accuracy. One optimizer step per rollout
batch by default, so log π_old is the update's own forward pass, detached.

Faults: checkpoints are atomic and checksummed (resume falls back past a damaged one), a NaN loss skips
its update on every rank, SIGINT / SIGTERM checkpoint and stop after the current step.
"""

import dataclasses
import gc
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint as ckpt
import lm as lm_lib
import paced_rl
import replay as replay_lib
import report
import rollout
from config import Config, make_config, parse_args
from data import Prompts, load_data
from distributed import Ranks, all_sum, bf16_pays, check_ranks_agree, gather, is_sharded, setup_distributed, teardown
from metrics import calibration
from scheduler import Coverage, PacedSelector
from update import Model, PacedObjective, Update, build_model, fresh_samples, kl_sum, logprobs_nograd, optimizer_steps, replayed_samples


@dataclass
class Progress:
    """The loop's counters, checkpointed."""
    step: int = 0
    rollouts: int = 0  # responses sampled so far (a rollout variant may sample more than B·G a step)
    skipped: int = 0  # optimizer steps skipped (non-finite, or nothing to train on)
    nonfinite_steps: int = 0  # steps in a row whose update was skipped for a non-finite loss or gradient
    warned_saturation: bool = False  # the warning that p̂ is stuck at 0 or 1 is said once a run


@dataclass
class Run:
    """What the loop, the objective, the selector and the probes share; built once by setup()."""
    cfg: Config
    ranks: Ranks
    prompts: Prompts
    model: Model = None
    objective: object = None  # update.PacedObjective, or a harness objective
    selector: object = None  # scheduler.PacedSelector, or a harness selector
    buf: replay_lib.ReplayBuffer = None
    replay_rng: np.random.Generator = None
    coverage: Coverage = None
    progress: Progress = field(default_factory=Progress)
    emb: tuple = None  # (training e(x) on the device, held-out e(x)), computed on first use

    def embeddings(self) -> tuple:
        """The frozen e(x) of the training prompts (N, D) on the device and of the held-out ones (M, D)."""
        if self.emb is None:
            p = self.prompts
            e = paced_rl.frozen_embeddings(self.cfg, p.tokenizer.pad_token_id, p.train.toks + p.heldout.toks,
                                           torch.bfloat16 if self.cfg.dtype == "bfloat16" else torch.float32, self.ranks)
            self.emb = (e[:len(p.train.toks)].to(self.ranks.device), e[len(p.train.toks):])
        return self.emb


@dataclass
class Step:
    """One step's outcome, what step 6 logs."""
    rolled: rollout.Rollouts
    groups: list  # every rank's (prompt index, observed accuracy a, p̂ or None), in prompt order
    n_train: int  # prompts trained on, over all ranks
    upd: Update
    kl: float  # Σ of the k3 KL estimate over all fresh samples, or None where not measured
    replayed: int  # replayed samples in the update


def resolve(cfg: Config, ranks: Ranks) -> Config:
    """Refuse a batch the world cannot split; settle dtype=auto."""
    if cfg.prompts_per_step % ranks.world:
        raise SystemExit(f"config: prompts_per_step={cfg.prompts_per_step} must be divisible by the world size {ranks.world}")
    if cfg.fsdp and cfg.prompts_per_step % (ranks.world * cfg.updates_per_batch):
        raise SystemExit(f"config: with --fsdp, prompts_per_step={cfg.prompts_per_step} must be divisible by world size "
                         f"× updates_per_batch = {ranks.world * cfg.updates_per_batch} (every rank steps in lockstep)")
    if cfg.dtype == "auto":  # bf16 compute where the hardware has native bf16 (distributed.bf16_pays)
        fast, why = bf16_pays(ranks.device)
        cfg = dataclasses.replace(cfg, dtype="bfloat16" if fast else "float32")
        ranks.log(f"dtype=auto: {cfg.dtype} ({why})")
    return cfg


def setup(cfg: Config, objective, selector, prepare=None) -> Run:
    """Process group, data, the objective and the policy, the selector, the replay buffer; a resumed run's state.
    prepare(cfg): run on rank 0 before any data is read (the bundled tasks' check), the other ranks waiting."""
    ranks = setup_distributed(cfg)
    cfg = resolve(cfg, ranks)
    if not cfg.resume and ckpt.ckpt_dirs(cfg.out_dir):
        raise SystemExit(f"{cfg.out_dir} already holds checkpoints of a run: continue it with --resume={cfg.out_dir}, "
                         f"or start a new run with another --out_dir")
    if prepare is not None and ranks.rank == 0:
        prepare(cfg)
    if ranks.world > 1:
        dist.barrier()
    start = ckpt.newest_good_checkpoint(cfg.out_dir, ranks.log) if cfg.resume else None
    run = Run(cfg, ranks, load_data(cfg, ranks.log))
    if cfg.prompts_per_step > len(run.prompts.train.toks):  # B distinct prompts a step: refused before any work
        raise SystemExit(f"config: prompts_per_step={cfg.prompts_per_step} exceeds the {len(run.prompts.train.toks)} training "
                         f"prompts of {cfg.train_data} (after skipping those too long): lower --prompts_per_step")
    if ranks.rank == 0 and not cfg.resume:
        ckpt.write_json(os.path.join(cfg.out_dir, "config.json"), dataclasses.asdict(cfg), indent=1)
    run.objective = objective(run)
    run.model = build_model(cfg, run.objective, os.path.join(start, "model") if start else cfg.model, ranks)
    # probed after the parameters are listed: a sharded root stays unsharded after a forward call without backward
    if cfg.shared_prefix and (why := lm_lib.shared_prefix_check(run.model.policy.lm, len(run.prompts.tokenizer), ranks.device)):
        ranks.log(f"shared_prefix: off, one forward per sequence instead: {cfg.model} cannot take it ({why})")
        run.cfg = cfg = dataclasses.replace(cfg, shared_prefix=False)
        run.objective.cfg = cfg
    run.selector = selector(run)
    run.buf = replay_lib.ReplayBuffer(cfg.replay_capacity, cfg.replay_add_k)
    run.coverage = Coverage(run.prompts.train.labels, cfg.starve_warn_steps)
    run.replay_rng = np.random.default_rng(rollout.seed_of(cfg.seed, 2))
    if start:
        restore(run, ckpt.load_state(start))
        ranks.log(f"resumed {start} at step {run.progress.step}")
    if ranks.rank == 0:
        ckpt.truncate_metrics(metrics_path(run), run.progress.step)
    return run


def seams_of(run: Run) -> dict:
    """The names of the objective and the selector a checkpoint was written with: a resume must use the same."""
    return {"objective": type(run.objective).__name__, "selector": type(run.selector).__name__}


def restore(run: Run, st: dict):
    if st["seams"] != seams_of(run):
        raise SystemExit(f"resume: the checkpoint was written by the objective and selector {st['seams']}, this run has "
                         f"{seams_of(run)}: resume it with the command that started it (python -m experiments.run for "
                         f"the research harness's methods)")
    if run.model.policy.logz is not None:
        run.model.policy.logz.load_state_dict(st["logz"])
    lrs = [(g["lr"], g["weight_decay"]) for g in run.model.opt.param_groups]  # as this run's config sets them
    ckpt.load_opt_state(run.model.policy, run.model.opt, st["opt"], run.cfg)
    for g, (lr, wd) in zip(run.model.opt.param_groups, lrs):  # a resume that changes --lr applies it for real
        g["lr"], g["weight_decay"] = lr, wd
    run.selector.load_state_dict(st["selector"])
    run.objective.load_state_dict(st.get("objective") or run.objective.state_dict())  # checkpoints before the memory: empty
    run.buf.load_state_dict(st["replay"])
    run.coverage.load_state_dict(st["coverage"])
    run.replay_rng.bit_generator.state = st["replay_rng"]
    if st.get("torch_rng"):  # dropout (in a harness head) draws from it; sampling has its own generators
        rngs = st["torch_rng"]
        ckpt.set_torch_rng_state(rngs[run.ranks.rank if len(rngs) == run.ranks.world else 0], run.ranks.device)
    run.progress.step, run.progress.rollouts, run.progress.skipped = st["step"], st["rollouts"], st["skipped_updates"]


def save(run: Run, step: int):
    """A checkpoint of everything resume needs; never one of non-finite weights (the last good one stays)."""
    ranks, p = run.ranks, run.progress
    bad = all_sum(float(sum(int((~torch.isfinite(w.to_local() if is_sharded(w) else w.detach())).sum()) for w in run.model.params)),
                  ranks.world, ranks.device)  # every rank decides alike
    if bad:
        raise SystemExit(f"stopping at step {step}: {int(bad)} weights are NaN or infinite; no checkpoint written, the "
                         f"newest good one in {run.cfg.out_dir} is intact (lower --lr)")
    ckpt.save_checkpoint(run.cfg, run.model, run.prompts.tokenizer, {
        "step": step, "rollouts": p.rollouts, "skipped_updates": p.skipped, "seams": seams_of(run),
        "selector": run.selector.state_dict(), "objective": run.objective.state_dict(),
        "replay": run.buf.state_dict(), "replay_rng": run.replay_rng.bit_generator.state, "coverage": run.coverage.state_dict(),
        "torch_rng": gather(ckpt.torch_rng_state(ranks.device), ranks.world)}, ranks.rank)


def metrics_path(run: Run) -> str:
    return os.path.join(run.cfg.out_dir, "metrics.jsonl")


def evaluate(run: Run, probes: list, final: bool = False) -> dict:
    """Held-out metrics of the current policy, with each probe's additions; the final one also per prompt on disk."""
    p_hat = run.objective.p_hat(run.model.policy)  # held-out p̂, or None
    res = rollout.heldout_metrics(run.model.policy.lm, run.prompts, p_hat, run.cfg, run.ranks)
    for probe in probes:
        probe.evaluate(run, res)
    if final and run.ranks.rank == 0:
        ckpt.write_json(os.path.join(run.cfg.out_dir, "heldout_final.json"), res.per_prompt)
    return res.row


def roll_out(run: Run, chosen) -> rollout.Rollouts:
    """Steps 2-3: this rank's share of the chosen prompts, G responses each, verified."""
    return rollout.roll_out(run.model.policy.lm, run.prompts, chosen, run.progress.step, run.cfg, run.ranks)


def draw_replay(run: Run) -> list:
    """Step 4: replayed entries drawn from earlier steps (the same draw on every rank)."""
    cfg = run.cfg
    drawn = run.buf.sample(cfg.replay_per_step, run.replay_rng) if cfg.replay == "on" else []
    if cfg.fsdp:  # every rank must run the same number of forward passes through the sharded model
        drawn = drawn[:len(drawn) - len(drawn) % (run.ranks.world * cfg.updates_per_batch)]
    return drawn


def update(run: Run, batch: rollout.Batch, drawn: list, n_train: int) -> Update:
    """Step 5: the optimizer step(s) on fresh + this rank's share of the replayed samples."""
    cfg, ranks, model = run.cfg, run.ranks, run.model
    model.policy.train()
    old_tok = None
    if cfg.updates_per_batch > 1 and batch.idx:  # the later optimizer steps need π_old's log-probs: one pass first
        old_tok = logprobs_nograd(model.policy.lm, batch.seqs, cfg, per_token=True)
    fresh = run.objective.prepare(fresh_samples(batch, cfg, old_tok))
    replayed = replayed_samples(drawn[ranks.rank::ranks.world], run.prompts.train.toks, run.prompts.tokenizer.pad_token_id,
                                ranks.device)
    upd = optimizer_steps(model, run.objective, fresh, replayed, n_train, cfg, ranks)
    for w in upd.warnings:
        ranks.log(f"warning: step {run.progress.step}: {w}")
    run.progress.skipped += upd.skipped
    return upd


def add_to_replay(run: Run, batch: rollout.Batch, acc, p_hat, logp_old):
    """This step's correct trajectories, prioritized by e(x) = |a(x) − p̂(x)|, offered to the buffer (same on every rank)."""
    responses = [y[:n].tolist() for y, n in zip(batch.seqs.resp, batch.seqs.rmask.sum(1).tolist())]
    cands = replay_lib.correct_candidates(batch.idx, batch.reward.tolist(), responses, acc, p_hat, logp_old.tolist(),
                                          run.cfg.group_size)
    run.buf.add(sorted(sum(gather(cands, run.ranks.world), []), key=lambda c: (c["prompt"], c["response"])))


def step_metrics(run: Run, s: Step) -> dict:
    """Step 6: every metric reduced over all ranks (timings are added by the loop)."""
    cfg, batch, ranks = run.cfg, s.rolled.batch, run.ranks
    acc_all, p_all = np.array([g[1] for g in s.groups]), [g[2] for g in s.groups]
    has_p = bool(s.groups) and p_all[0] is not None
    tot = lambda x: all_sum(float(x), ranks.world, ranks.device)  # noqa: E731
    n = max(s.n_train * cfg.group_size, 1)
    eos, seqs = run.prompts.tokenizer.eos_token_id, batch.seqs
    truncated = int(((seqs.rmask.sum(1) == seqs.rmask.size(1)) & (seqs.resp[:, -1] != eos)).sum()) if batch.idx else 0
    tally = s.rolled.tally
    return {
        "rollouts": run.progress.rollouts,
        "reward_mean": s.rolled.reward_sum / (cfg.prompts_per_step * cfg.group_size),  # first B prompts, before any filter
        "loss": float(np.mean(s.upd.losses)),  # mean over the step's optimizer steps
        "skipped_updates": run.progress.skipped,
        **(calibration(p_all, acc_all) if has_p else {"acc_est_abs_err": None, "acc_est_corr": None}),
        "p_hat_mean": float(np.mean(p_all)) if has_p else None,
        **({"logz_grad_norm": float(np.mean(s.upd.logz_grad_norms))} if run.model.policy.logz is not None else {}),
        "beta_kl": cfg.beta * tot(s.kl) / n if s.kl is not None else None,  # None: not measured this step (kl_every)
        "zero_var_frac": s.rolled.zero_var if s.rolled.zero_var is not None else float(np.mean((acc_all == 0) | (acc_all == 1))),
        "train_prompts": s.n_train,
        "resp_len": tot(seqs.rmask.sum()) / n,
        "truncated_frac": tot(truncated) / n,
        "verifier_errors": int(tot(tally.verifier_errors)),
        "replay_size": len(run.buf),
        "replayed": s.replayed,
        "grad_norm": float(np.mean(s.upd.grad_norms)),
        **({"format_rate": tot(tally.formatted) / max(tot(tally.rolled), 1)} if tot(tally.rolled) else {}),
    }


def one_step(run: Run, row: dict) -> dict:
    """Steps 1-6 of one step into `row`; returns the Step for the probes."""
    cfg, ranks, p, policy = run.cfg, run.ranks, run.progress, run.model.policy
    t0 = time.time()
    policy.eval()
    chosen = run.selector.choose(p.step)                                                 # 1. select
    t1 = time.time()
    rolled = getattr(run.objective, "collect", roll_out)(run, chosen)                   # 2-3. roll out, verify
    batch = rolled.batch  # (a harness objective may bring a rollout variant of its own: `collect`)
    acc = batch.accuracy(cfg.group_size)                                                 # a(x), (n,)
    p_hat = run.objective.p_hat(policy, batch.idx)  # p̂ of this rank's prompts, or None (no estimate)
    has_p = p_hat is not None
    if has_p and cfg.logz_output == "sigmoid" and not p.warned_saturation:
        said = paced_rl.saturation_warning(p_hat, p.step)
        if said:  # each rank judges its own share; only rank 0 prints (no collective: the shares differ)
            ranks.log(said)
            p.warned_saturation = True
    p_hat = p_hat if p_hat is not None else np.zeros(len(batch.idx))
    n_train = int(all_sum(len(batch.idx), ranks.world, ranks.device))
    drawn = draw_replay(run)                                                             # 4. replay
    t4 = time.time()
    upd = update(run, batch, drawn, n_train)                                             # 5. update
    p.rollouts += rolled.prompts * cfg.group_size
    p.nonfinite_steps = p.nonfinite_steps + 1 if upd.nonfinite else 0
    if p.nonfinite_steps >= cfg.nonfinite_patience:  # every rank counts the same (the loss is all-reduced)
        raise SystemExit(f"stopping at step {p.step}: {p.nonfinite_steps} steps in a row had a non-finite loss or "
                         f"gradient (each update skipped, the weights unchanged); the newest checkpoint in {cfg.out_dir} "
                         f"is intact. Lower --lr, or check the data and the reward")
    if cfg.replay == "on":
        add_to_replay(run, batch, acc, p_hat, upd.logp_old)
    t5 = time.time()
    policy.eval()
    kl = kl_sum(policy.lm, batch, upd.logp_old, cfg) if cfg.kl_every and p.step % cfg.kl_every == 0 else None  # Prop. 4.1's gap
    groups = sorted(sum(gather([(j, float(a), float(q) if has_p else None) for j, a, q in zip(batch.idx, acc, p_hat)],
                               ranks.world), []))
    s = Step(rolled, groups, n_train, upd, kl, len(drawn))
    row.update(run.objective.observe(run.model, p.step, groups))  # Z_φ refitted on every observed group, if asked
    row.update(run.selector.observe(p.step, groups))
    shares, said = run.coverage.observe(p.step, [g[0] for g in groups])
    for w in said:
        ranks.log(f"warning: step {p.step}: {w}")
    row.update(shares)
    row.update(step_metrics(run, s))                                                     # 6. log
    row.update({"step_s": time.time() - t0, "select_s": t1 - t0, "rollout_s": rolled.tally.rollout_s,
                "verify_s": rolled.tally.verify_s, "update_s": t5 - t4})
    return s


def train(cfg: Config, objective=PacedObjective, selector=PacedSelector, probes=(), prepare=None) -> dict:
    """Run (or resume) training; returns {'final': last metrics row, 'policy': the trained Policy}, the policy
    in a one-process run only (a multi-rank run's weights are in its checkpoint: its model, sharded by FSDP,
    holds the process group, which teardown must be able to free; distributed.teardown says why).
    objective, selector: classes (or factories) called with the Run once the data is loaded; probes: factories
    of objects whose step(run, step, row) and evaluate(run, result) add metrics of their own; prepare: see setup."""
    lock = ckpt.RunLock(cfg.out_dir) if int(os.environ.get("RANK", "0")) == 0 else None  # one run per directory
    try:
        run = setup(cfg, objective, selector, prepare)
        result = loop(run, [make(run) for make in probes])
    finally:
        if lock is not None:
            lock.release()
    world = run.ranks.world
    if world > 1:  # the run, its sharded model and their process-group handles go before the group does
        result.pop("policy")
        del run
        gc.collect()
    teardown(world)
    return result


def loop(run: Run, probes: list) -> dict:
    """The steps from where the run stands to max_steps, a checkpoint every ckpt_every, the final evaluation.
    Returns train's result; a stop signal ends it after a checkpoint, with 'interrupted': True."""
    cfg, p = run.cfg, run.progress  # cfg as resolved by setup (dtype=auto, a shared_prefix the model cannot take)
    reporter = report.Reporter(cfg, p.step) if run.ranks.rank == 0 else None  # metrics.jsonl and its mirrors
    stop = ckpt.StopSignal()
    start_step = p.step
    bar = tqdm(range(p.step, cfg.max_steps), initial=p.step, total=cfg.max_steps, disable=run.ranks.rank != 0, desc="train")
    for step in bar:
        p.step = step
        row = {"step": step, **(evaluate(run, probes) if step % cfg.eval_every == 0 else {})}
        s = one_step(run, row)
        for probe in probes:
            row.update(probe.step(run, s, row))
        if reporter:
            reporter.log(row)
        bar.set_postfix(reward=f"{row['reward_mean']:.2f}", **({"eval": f"{row['eval_acc']:.3f}"} if "eval_acc" in row else {}))
        if row["zero_var_frac"] > 0.8 and step % cfg.eval_every == 0:
            run.ranks.log(f"warning: step {step}: {row['zero_var_frac']:.0%} of groups have all-equal rewards (no signal)")
        stopping = all_sum(float(stop.name is not None), run.ranks.world, run.ranks.device) > 0  # all ranks stop together
        if (step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.max_steps or stopping:
            check_ranks_agree(run.model.params, run.ranks.world)
            save(run, step + 1)
        if stopping:
            run.ranks.log(f"stopped by signal {stop.name} after step {step}; checkpoint written. Continue with: --resume={cfg.out_dir}")
            stop.restore()
            if reporter:
                reporter.close()
            return {"final": row, "policy": run.model.policy, "interrupted": True}
    stop.restore()
    p.step = max(cfg.max_steps, start_step)  # a checkpoint past max_steps is evaluated where it is
    row = {"step": p.step, "rollouts": p.rollouts, **evaluate(run, probes, final=True),
           "param_checksum": check_ranks_agree(run.model.params, run.ranks.world)}
    if reporter:
        reporter.log(row)
        reporter.close()
    corr = row.get("eval_acc_est_corr")
    run.ranks.log(f"done: step {p.step}, held-out accuracy {row['eval_acc']:.3f}"
                  + (f", calibration corr {corr:.3f}" if corr is not None else "") + f", metrics in {metrics_path(run)}")
    return {"final": row, "policy": run.model.policy}


def run_main(cfg: Config, **seams):
    """train() with a failed collective reported as what it most likely is: another rank died."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return train(cfg, **seams)["final"]
    try:
        return train(cfg, **seams)["final"]
    except (RuntimeError, dist.DistBackendError) as e:
        print(f"rank {os.environ.get('RANK', '?')}: stopping: a collective operation failed, most likely because another "
              f"rank died or hung (process-group timeout {cfg.dist_timeout_s} s). Cause: {str(e).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def main(argv=None):
    import tasks  # the bundled tasks: their presets, and the shipped testbed checked before the run

    overrides = parse_args(sys.argv[1:] if argv is None else argv)
    if overrides.get("resume") and os.path.exists(os.path.join(overrides["resume"], "lab.json")):
        raise SystemExit(f"resume: {overrides['resume']} is a run of the research harness (it has lab.json): resume it "
                         f"with python -m experiments.run --resume={overrides['resume']}")
    cfg = ckpt.load_run_config(overrides["resume"], overrides) if overrides.get("resume") else make_config(overrides, tasks.PRESETS)
    return run_main(cfg, prepare=tasks.check_for)


if __name__ == "__main__":
    main()
