"""The update: the algorithm's loss over fresh (+ replayed) samples, in micro-batches, then the optimizer step.

    θ, φ ← AdamW step on  L = (1/N) Σ_i loss_i     (tb_loss.py: PACED-RL's TB, GRPO's clipped ratio, FlowRL)

- Each micro-batch contributes its loss sum / N, N the global sample (or token) count, so gradient
  accumulation and the all-reduce over ranks (distributed.sync_grads) give exactly the gradient of the
  global-batch loss: the same update on 1 rank or 8, with micro-batches or without.
- updates_per_batch = U > 1: U optimizer steps per rollout batch, step u on the prompts at global
  positions [u·n/U, (u+1)·n/U), anchored on the sampler's log-probs (one no-grad pass before the first).
- A non-finite loss or gradient skips that optimizer step on every rank (counted, never applied); train.py
  stops the run after `nonfinite_patience` such steps in a row.
- beta_kl: β·KL(π_old ‖ π_θ) after the update, Proposition 4.1's gap between β·log Z and accuracy: one
  no-grad pass over the fresh samples, every kl_every steps.
- shared_prefix: every log-prob pass runs each distinct prompt once and its responses from its KV cache
  (logprobs.token_logprobs); train.setup first checks that the model gives the plain path's values.
- build_policy: the LM, its log Z head and π_ref, sharded if asked, and the AdamW over θ and φ.
"""

import math
from dataclasses import dataclass

import torch

import logprobs
import paced_rl
import tb_loss
from distributed import all_sum, is_sharded, shard_model, sync_grads


@dataclass
class Update:
    """What a step's optimizer steps report."""
    losses: list  # the global loss of each optimizer step (NaN where nothing was trained)
    grad_norms: list  # θ's gradient norm before clipping, per optimizer step
    logp_old: torch.Tensor  # (nG,) log π_old(y|x) of this rank's fresh samples
    skipped: int  # optimizer steps skipped (non-finite loss or gradient, or no samples)
    nonfinite: int = 0  # of those, the ones skipped for a non-finite loss or gradient
    logz_grad_norms: list = None  # the log Z head's gradient norm, per optimizer step (0 without a head)
    logz_step_norm: float = 0.0  # ‖φ after − φ before‖ over this step's optimizer steps: the size of Adam's moves


def fresh_samples(batch, cfg, emb_train, old_tok=None) -> dict:
    """The loss inputs of this step's rollouts: advantages for the baselines, e(x) for Z_φ."""
    G, paced, has = cfg.group_size, cfg.algo == "paced", bool(batch.idx)
    return {"idx": batch.idx, "pid": batch.pid, "pmask": batch.pmask, "resp": batch.resp, "rmask": batch.rmask, "reward": batch.reward,
            "behavior": None, "train_logz": True, "old_tok": old_tok,
            "adv": tb_loss.group_advantages(batch.reward, G, cfg.adv_eps) if not paced and has else None,
            "emb": emb_train[torch.tensor(batch.idx, device=emb_train.device)].repeat_interleave(G, 0) if paced and has else None}


def replayed_samples(entries, toks, pad_id, emb_train, cfg, device):
    """The loss inputs of replayed correct trajectories (reward 1), with their sampler's log-probs; None if none."""
    if not entries:
        return None
    pid, pmask = paced_rl.left_pad([toks[e["prompt"]] for e in entries], pad_id, device)
    resp, rmask = paced_rl.right_pad([e["response"] for e in entries], pad_id, device)
    return {"pid": pid, "pmask": pmask, "resp": resp, "rmask": rmask, "reward": torch.ones(len(entries), device=device),
            "train_logz": cfg.replay_trains_logz, "behavior": torch.tensor([e["logp_behavior"] for e in entries], device=device),
            "emb": emb_train[torch.tensor([e["prompt"] for e in entries], device=device)], "adv": None, "old_tok": None}


def optimizer_steps(policy, params, ref_lm, opt, fresh, replayed, n_train, cfg, rank, world, device, log, step) -> Update:
    """U = updates_per_batch optimizer steps: step u trains on the prompts at global positions
    [u·n/U, (u+1)·n/U) of this step's batch (this rank holds positions rank, rank + world, ...) and on
    its share of the replayed samples. n_train: prompts in this update over all ranks. params: the
    trainable parameters as listed right after FSDP2 sharding (while unsharded it swaps in plain tensors)."""
    G, U = cfg.group_size, cfg.updates_per_batch
    n_rep = replayed["resp"].size(0) if replayed is not None else 0
    gpos = [rank + k * world for k in range(len(fresh["idx"]))]
    losses, gnorms, znorms, old_parts, skipped, nonfinite = [], [], [], [], 0, 0
    phi0 = [p.detach().clone() for p in policy.logz.parameters()] if policy.logz is not None else []
    for u in range(U):
        ks = [k for k, p in enumerate(gpos) if u * n_train // U <= p < (u + 1) * n_train // U]
        f_u = take(fresh, slice(ks[0] * G, (ks[-1] + 1) * G)) if ks else None
        r_lo, r_hi = u * n_rep // U, (u + 1) * n_rep // U
        r_u = take(replayed, slice(r_lo, r_hi)) if r_hi > r_lo else None
        if cfg.algo == "grpo" and cfg.grpo_agg == "token_mean":
            denom = all_sum(float(f_u["rmask"].sum()) if f_u else 0.0, world, device)
        else:
            denom = all_sum(float((f_u["resp"].size(0) if f_u else 0) + (r_u["resp"].size(0) if r_u else 0)), world, device)
        loss_local = 0.0
        if f_u:
            loss_local, old_u = loss_backward(policy, ref_lm, f_u, cfg, denom)  # old_u: log π_old(y|x), (n,)
            old_parts.append(old_u)
        if r_u:
            loss_local += loss_backward(policy, ref_lm, r_u, cfg, denom)[0]
        global_loss = all_sum(loss_local, world, device) if denom > 0 else float("nan")  # the same on every rank
        sync_grads(params, world)
        gnorm = torch.nn.utils.clip_grad_norm_(list(policy.lm.parameters()), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if is_sharded(gnorm) else gnorm)
        gnorm_z = float(torch.nn.utils.clip_grad_norm_(list(policy.logz.parameters()), float("inf"))) if policy.logz is not None else 0.0
        if denom == 0:  # dynamic sampling kept too few groups: nothing to train on in this optimizer step
            skipped += 1
            log(f"warning: step {step}: no samples to train on (dynamic sampling kept too few groups): update skipped")
        elif math.isfinite(global_loss) and math.isfinite(gnorm) and math.isfinite(gnorm_z):
            opt.step()
        else:  # a NaN or inf loss or gradient: skip this update, count it, go on (train.py stops a run that keeps doing it)
            skipped += 1
            nonfinite += 1
            log(f"warning: step {step}: non-finite loss {global_loss} or gradient norm {gnorm}: update skipped")
        opt.zero_grad(set_to_none=True)
        losses.append(global_loss)
        gnorms.append(gnorm)
        znorms.append(gnorm_z)
    logp_old = torch.cat(old_parts) if old_parts else torch.zeros(0, device=device)  # (nG,)
    moved = float(sum((p.detach() - p0).pow(2).sum() for p, p0 in zip(policy.logz.parameters(), phi0)) ** 0.5) if phi0 else 0.0
    return Update(losses, gnorms, logp_old, skipped, nonfinite, znorms, moved)


def build_policy(cfg, model_path: str, emb_train, dtype, device, world):
    """(policy, π_ref or None, AdamW): the LM from model_path (a checkpoint's on resume) with its log Z head
    (Z_φ over the frozen e(x) for PACED-RL, FlowRL's pooled head, none for GRPO), sharded with FSDP2 if asked.
    Z_φ has its own (far larger) learning rate and no weight decay. The trained LM is held in fp32 whatever
    cfg.dtype says (bfloat16 means bf16 compute under paced_rl.amp, fp32 master weights); the frozen π_ref in `dtype`."""
    from transformers import AutoModelForCausalLM

    load = lambda path, dt: AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=cfg.attn_impl).to(device)  # noqa: E731
    lm = load(model_path, torch.float32)  # same files on every rank: same weights
    if cfg.grad_ckpt:
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    ref_lm = load(cfg.model, dtype).eval().requires_grad_(False) if cfg.algo == "flowrl" or (cfg.algo == "grpo" and cfg.kl_coef > 0) else None
    if cfg.fsdp and world > 1:
        for m in (lm, ref_lm):
            if m is not None:
                shard_model(m, world, device)
    torch.manual_seed(cfg.seed)  # the log Z head's init, the same on every rank
    logz = None
    if cfg.algo == "paced":
        logz = paced_rl.LogZHead(emb_train.size(1), cfg.logz_hidden, cfg.beta, cfg.logz_init_acc, cfg.logz_output)
        logz.set_normalization(emb_train)
    elif cfg.algo == "flowrl":
        logz = paced_rl.PooledLogZHead(lm.config.hidden_size)
    policy = paced_rl.Policy(lm, logz).to(device)
    groups = [{"params": list(lm.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if isinstance(logz, paced_rl.LogZHead):  # Z_φ has its own (far larger) learning rate and no weight decay
        groups += logz.param_groups(cfg.logz_lr, cfg.logz_lr_fan_in)
    elif logz is not None:
        groups.append({"params": list(logz.parameters()), "lr": cfg.logz_lr, "weight_decay": 0.0})
    return policy, ref_lm, torch.optim.AdamW(groups)


def loss_backward(policy, ref_lm, b: dict, cfg, denom: float):
    """Forward and backward of the algorithm's loss over one batch, in micro-batches of `cfg.micro_batch`
    samples; gradients accumulate in .grad. Each micro-batch's loss is its sum over `denom` (the global
    sample or token count), so accumulation, and the sum over ranks, give exactly the gradient of the
    global-batch loss. Returns (this batch's share of the loss, log π_old of every sample, detached (N,)).

    b: prompt/response tensors, `reward` (N,), `adv` (N,) for the baselines, `emb` (N, D) for Z_φ,
    `train_logz`, `behavior`: None for fresh samples, or the sampler's log-probs of replayed samples, and
    `old_tok`: the per-token log π_old of fresh samples when updates_per_batch > 1. With one optimizer step
    per rollout batch (the default) π_old is the policy before this update, so log π_old is log π_θ
    detached (no extra forward pass); the ratio π_θ/π_old is then 1, and GRPO's clip and FlowRL's
    importance weight are inactive, as in TRL's default of one iteration per batch. Replayed samples
    (PACED-RL) are anchored per cfg.replay_anchor, weighted min(clip, π_θold/π_behavior)."""
    N = b["resp"].size(0)
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(N, 1)
    total, olds = 0.0, []
    for i in range(0, N, size):
        s = slice(i, i + size)
        args = (b["pid"][s], b["pmask"][s], b["resp"][s], b["rmask"][s], cfg.temperature, cfg.logit_chunk)
        shared = {"shared_prefix": cfg.shared_prefix}
        with paced_rl.amp(b["resp"].device, cfg.dtype == "bfloat16"):  # log-probs come out in fp32
            if cfg.algo == "flowrl":
                logp_tok, h = logprobs.token_logprobs(policy.lm, *args, prompt_state=True, **shared)  # (n, R), (n, H)
            else:
                logp_tok = logprobs.token_logprobs(policy.lm, *args, **shared)
        old_tok = b["old_tok"][s] if b.get("old_tok") is not None else logp_tok.detach()  # (n, R)
        logp, ntok, old = logp_tok.sum(-1), b["rmask"][s].sum(-1), old_tok.sum(-1)
        cur = logp.detach()
        if cfg.algo == "paced":
            log_z = policy.logz(b["emb"][s])
            if not b["train_logz"]:
                log_z = log_z.detach()
            anchor, w = old, None
            if b["behavior"] is not None:
                anchor = cur
                if cfg.replay_anchor == "behavior":
                    anchor = b["behavior"][s]
                if cfg.replay_is_clip > 0:
                    w = (cur - b["behavior"][s]).exp().clamp(max=cfg.replay_is_clip)
            loss = tb_loss.paced_tb_loss(log_z, logp, anchor, b["reward"][s], cfg.beta, weight=w, denom=denom)
        elif cfg.algo == "grpo":
            ref_tok = None
            if cfg.kl_coef > 0:
                with torch.no_grad(), paced_rl.amp(b["resp"].device, cfg.dtype == "bfloat16"):
                    ref_tok = logprobs.token_logprobs(ref_lm, *args, **shared)
            loss = tb_loss.grpo_loss(logp_tok, old_tok, b["rmask"][s], b["adv"][s], cfg.clip_eps,
                                     cfg.grpo_agg, denom, ref_tok, cfg.kl_coef)
        else:  # flowrl
            with torch.no_grad(), paced_rl.amp(b["resp"].device, cfg.dtype == "bfloat16"):
                ref = logprobs.token_logprobs(ref_lm, *args, **shared).sum(-1)
            w = (cur - old).exp().clamp(max=cfg.flowrl_is_clip)  # π_θ/π_old, detached: 1 at the first optimizer step
            loss = tb_loss.flowrl_loss(policy.logz(h), logp, ref, ntok, b["adv"][s], cfg.flowrl_reward_mult,
                                       weight=w, denom=denom)
        loss.backward()
        total += loss.item()
        olds.append(old)
    return total, torch.cat(olds)


@torch.no_grad()
def logprobs_nograd(lm, pid, pmask, resp, rmask, cfg, per_token: bool = False):
    """Response log-probs without gradients, in micro-batches: summed (N,), or per token (N, R)."""
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(resp.size(0), 1)
    with paced_rl.amp(resp.device, cfg.dtype == "bfloat16"):
        tok = torch.cat([logprobs.token_logprobs(lm, pid[i:i + size], pmask[i:i + size], resp[i:i + size],
                                                 rmask[i:i + size], cfg.temperature, cfg.logit_chunk, shared_prefix=cfg.shared_prefix)
                         for i in range(0, resp.size(0), size)])
    return tok if per_token else tok.sum(-1)


def kl_sum(lm, batch, logp_old, cfg) -> float:
    """Σ over this rank's fresh samples of the k3 estimate of KL(π_old ‖ π_θ), after the update."""
    if not batch.idx:
        return 0.0
    logp_new = logprobs_nograd(lm, batch.pid, batch.pmask, batch.resp, batch.rmask, cfg)
    return float(tb_loss.kl_k3(logp_old, logp_new).sum())


def take(b: dict, s: slice) -> dict:
    """Rows `s` of every per-sample tensor of a batch dict (other entries as they are)."""
    return {k: v[s] if torch.is_tensor(v) else v for k, v in b.items()}
