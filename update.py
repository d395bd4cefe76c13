"""Step 5, the update: an objective's loss over fresh (+ replayed) samples, in micro-batches, then AdamW.

    θ, φ ← AdamW step on  L = (1/N) Σ_i loss_i     (PacedObjective: the TB loss of tb_loss.py)

- The objective is the seam between the loop and a loss: `PacedObjective` is PACED-RL's, and the
  baselines of the research harness are other objectives with the same methods. The loop never asks
  which one it runs.
- Each micro-batch contributes its loss sum / N, N the global count the objective names (samples, or
  tokens), so gradient accumulation and the all-reduce over ranks (distributed.sync_grads) give exactly
  the gradient of the global-batch loss: the same update on 1 rank or 8, with micro-batches or without.
- updates_per_batch = U > 1: U optimizer steps per rollout batch, step u on the prompts at global
  positions [u·n/U, (u+1)·n/U), anchored on the sampler's log-probs (one no-grad pass before the first).
- A non-finite loss or gradient skips that optimizer step on every rank (counted, never applied); the
  loop stops a run after `nonfinite_patience` such steps in a row.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch

import paced_rl
import tb_loss
from distributed import all_sum, is_sharded, shard_model, sync_grads
from lm import Seqs, amp, left_pad, right_pad, token_logprobs


@dataclass
class Samples:
    """The loss's inputs: one row per response."""
    seqs: Seqs
    prompt: torch.Tensor  # (N,) training-set index of each row's prompt
    reward: torch.Tensor  # (N,) verifier reward
    behavior: torch.Tensor = None  # (N,) replayed rows: the sampler's log π(y|x); None for this step's rollouts
    target: torch.Tensor = None  # (N,) replayed rows: their group's observed accuracy a(x) when they were stored
    old_tok: torch.Tensor = None  # (N, R) per-token log π_old, where updates_per_batch > 1
    adv: torch.Tensor = None  # (N,) per-row values an objective computes over whole groups (GRPO's advantages)

    def __getitem__(self, rows) -> "Samples":
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return Samples(self.seqs[rows], self.prompt[rows], self.reward[rows], pick(self.behavior), pick(self.target),
                       pick(self.old_tok), pick(self.adv))

    def __len__(self):
        return len(self.seqs)


@dataclass
class Model:
    """The trained policy (LM and its log Z head), the frozen reference model if the objective needs one, AdamW."""
    policy: paced_rl.Policy
    ref_lm: object  # π_ref, the frozen initial model, or None
    params: list  # the trainable parameters, listed once after sharding (FSDP2 swaps them while unsharded)
    opt: torch.optim.Optimizer


@dataclass
class Update:
    """What a step's optimizer steps report."""
    losses: list  # the global loss of each optimizer step (NaN where nothing was trained)
    grad_norms: list  # θ's gradient norm before clipping, per optimizer step
    logz_grad_norms: list  # the log Z head's gradient norm, per optimizer step (0 without a head)
    logp_old: torch.Tensor  # (nG,) log π_old(y|x) of this rank's fresh samples
    skipped: int  # optimizer steps skipped (non-finite loss or gradient, or no samples)
    nonfinite: int  # of those, the ones skipped for a non-finite loss or gradient
    warnings: list  # why each skipped step was skipped, for the log


def sequence_logprobs(lm, seqs: Seqs, cfg, per_token: bool = False):
    """log π(y|x) of every row under cfg's temperature, chunking, shared prefix and mixed precision: (N,), or (N, R)
    per token. With gradients unless called under torch.no_grad."""
    with amp(seqs.resp.device, cfg.dtype == "bfloat16"):  # log-probs come out in fp32
        tok = token_logprobs(lm, seqs, cfg.temperature, cfg.logit_chunk, shared_prefix=cfg.shared_prefix)
    return tok if per_token else tok.sum(-1)


class PacedObjective:
    """PACED-RL's objective: the TB loss anchored on π_old, with Z_φ = LogZHead over the frozen e(x).

    With one optimizer step per rollout batch (the default) π_old is the policy before this update, so
    log π_old is log π_θ detached (no extra forward pass). Replayed samples were drawn by an older policy:
    anchored per `replay_anchor`, weighted min(replay_is_clip, π_θold/π_behavior) (detached). Whether they train
    Z_φ is `replay_trains_logz`: off; raw, their TB residual as it is (reward 1: a buffer of correct samples
    pushes p̂ up); group, Z_φ's part of the residual with their group's accuracy a(x) in place of the reward.
    At θ = θ_old a whole group's TB loss has the log Z gradient 2G(log Z − a/β); one stored sample with
    target a gives its per-sample share, 2(log Z − a/β), so replay repeats the error-prioritized groups' Z_φ
    update, unbiased, while θ still learns from the correct sample with reward 1."""

    needs_ref = False  # no frozen π_ref: the anchor is π_old

    def __init__(self, run):
        self.cfg = run.cfg
        self.emb, self.emb_heldout = run.embeddings()  # (N, D) on the device, (M, D)
        self.memory = paced_rl.ObservationMemory()  # every observed group, when logz_memory_passes > 0

    def head(self, lm) -> torch.nn.Module:
        head = paced_rl.LogZHead(self.emb.size(1), self.cfg.logz_hidden, self.cfg.beta, self.cfg.logz_init_acc,
                                 self.cfg.logz_output)
        head.set_normalization(self.emb)
        return head

    def param_groups(self, head) -> list:
        """Z_φ has its own (far larger) learning rate and no weight decay."""
        return head.param_groups(self.cfg.logz_lr, self.cfg.logz_lr_fan_in)

    @torch.no_grad()
    def p_hat(self, policy, idx=None) -> np.ndarray:
        """p̂ = β·log Z_φ(e(x)) of training prompts idx, or of every held-out prompt (idx None)."""
        emb = self.emb_heldout if idx is None else self.emb[torch.as_tensor(idx, device=self.emb.device)]
        return policy.logz.p_hat(emb.to(self.emb.device)).cpu().numpy()

    def prepare(self, fresh: Samples) -> Samples:
        return fresh

    def observe(self, model: Model, step: int, groups: list) -> dict:
        """After the update: this step's groups (every rank's (prompt, a(x), p̂)) join the observation memory and Z_φ
        is refitted on it (`logz_memory_passes`; paced_rl.ObservationMemory says why this is still the TB estimator)."""
        passes = self.cfg.logz_memory_passes
        if passes == 0:
            return {}
        self.memory.add(step, [g[0] for g in groups], [g[1] for g in groups])
        loss = paced_rl.fit_to_memory(model.policy.logz, model.opt, self.emb, self.memory, step, passes,
                                      self.cfg.logz_memory_half_life)
        return {"logz_memory_loss": loss, "logz_memory_size": len(self.memory)}

    def state_dict(self) -> dict:
        return {"memory": self.memory.state_dict()}

    def load_state_dict(self, st: dict):
        self.memory.load_state_dict(st["memory"])

    def count(self, fresh: Samples, replayed: Samples) -> float:
        """This rank's share of the global mean's N: its samples."""
        return float((len(fresh) if fresh else 0) + (len(replayed) if replayed else 0))

    def loss(self, model: Model, s: Samples, denom: float):
        """(this micro-batch's Σ w·δ² / denom, its log π_old (n,) detached)."""
        cfg = self.cfg
        logp_tok = sequence_logprobs(model.policy.lm, s.seqs, cfg, per_token=True)  # (n, R)
        old = (s.old_tok if s.old_tok is not None else logp_tok.detach()).sum(-1)
        logp = logp_tok.sum(-1)
        cur = logp.detach()
        log_z = model.policy.logz(self.emb[s.prompt])
        anchor, w = old, None
        if s.behavior is not None:  # replayed
            anchor = s.behavior if cfg.replay_anchor == "behavior" else cur
            if cfg.replay_is_clip > 0:
                w = (cur - s.behavior).exp().clamp(max=cfg.replay_is_clip)
            if cfg.replay_trains_logz == "group":  # θ's residual with reward 1, Z_φ's with the group's accuracy
                theta = tb_loss.paced_tb_loss(log_z.detach(), logp, anchor, s.reward, cfg.beta, weight=w, denom=denom)
                z = tb_loss.paced_tb_loss(log_z, logp.detach(), anchor, s.target, cfg.beta, weight=w, denom=denom)
                return theta + z, old
            if cfg.replay_trains_logz == "off":
                log_z = log_z.detach()
        return tb_loss.paced_tb_loss(log_z, logp, anchor, s.reward, cfg.beta, weight=w, denom=denom), old


def build_model(cfg, objective, model_path: str, ranks) -> Model:
    """The LM from model_path (a checkpoint's on resume) with the objective's log Z head, π_ref where the objective
    needs it, sharded with FSDP2 if asked, and AdamW. The trained LM is held in fp32 whatever cfg.dtype says
    (bfloat16 means bf16 compute under lm.amp with fp32 master weights); the frozen π_ref in that dtype."""
    from transformers import AutoModelForCausalLM

    load = lambda path, dt: AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=cfg.attn_impl).to(ranks.device)  # noqa: E731
    lm = load(model_path, torch.float32)  # same files on every rank: same weights
    if cfg.grad_ckpt:
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    ref_lm = load(cfg.model, dtype).eval().requires_grad_(False) if objective.needs_ref else None
    if cfg.fsdp and ranks.world > 1:
        for m in (lm, ref_lm):
            if m is not None:
                shard_model(m, ranks.world, ranks.device)
    torch.manual_seed(cfg.seed)  # the log Z head's init, the same on every rank
    head = objective.head(lm)
    policy = paced_rl.Policy(lm, head).to(ranks.device)
    groups = [{"params": list(lm.parameters()), "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    groups += objective.param_groups(head) if head is not None else []
    return Model(policy, ref_lm, [p for p in policy.parameters() if p.requires_grad], torch.optim.AdamW(groups))


def fresh_samples(batch, cfg, old_tok=None) -> Samples:
    """This step's rollouts as loss inputs."""
    prompt = torch.tensor(batch.idx, dtype=torch.long, device=batch.reward.device).repeat_interleave(cfg.group_size)
    return Samples(batch.seqs, prompt, batch.reward, old_tok=old_tok)


def replayed_samples(entries, toks, pad_id, device):
    """Replayed correct trajectories (reward 1) as loss inputs, with their sampler's log-probs; None if none."""
    if not entries:
        return None
    seqs = Seqs(*left_pad([toks[e["prompt"]] for e in entries], pad_id, device),
                *right_pad([e["response"] for e in entries], pad_id, device))
    return Samples(seqs, torch.tensor([e["prompt"] for e in entries], device=device), torch.ones(len(entries), device=device),
                   behavior=torch.tensor([e["logp_behavior"] for e in entries], device=device),
                   target=torch.tensor([e["acc"] for e in entries], device=device))


def backward(model: Model, objective, s: Samples, denom: float, cfg):
    """Forward and backward of the objective's loss over `s`, `cfg.micro_batch` rows at a time; gradients
    accumulate in .grad. Returns (this rank's share of the loss, log π_old of every row (N,), detached)."""
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(len(s), 1)
    total, olds = 0.0, []
    for i in range(0, len(s), size):
        loss, old = objective.loss(model, s[i:i + size], denom)
        loss.backward()
        total += loss.item()
        olds.append(old)
    return total, torch.cat(olds)


def optimizer_steps(model: Model, objective, fresh: Samples, replayed: Samples, n_train: int, cfg, ranks) -> Update:
    """U = updates_per_batch optimizer steps: step u trains on the prompts at global positions [u·n/U, (u+1)·n/U)
    of this step's batch (this rank holds positions rank, rank + world, ...) and on its share of the replayed
    samples. n_train: prompts in this update over all ranks."""
    G, U, world, device = cfg.group_size, cfg.updates_per_batch, ranks.world, ranks.device
    policy, n_rep = model.policy, len(replayed) if replayed is not None else 0
    gpos = [ranks.rank + k * world for k in range(len(fresh) // G)]
    out = Update([], [], [], None, 0, 0, [])
    old_parts = []
    for u in range(U):
        ks = [k for k, p in enumerate(gpos) if u * n_train // U <= p < (u + 1) * n_train // U]
        f_u = fresh[ks[0] * G:(ks[-1] + 1) * G] if ks else None
        r_lo, r_hi = u * n_rep // U, (u + 1) * n_rep // U
        r_u = replayed[r_lo:r_hi] if r_hi > r_lo else None
        denom = all_sum(objective.count(f_u, r_u), world, device)
        loss_local = 0.0
        if f_u:
            loss_local, old_u = backward(model, objective, f_u, denom, cfg)
            old_parts.append(old_u)
        if r_u:
            loss_local += backward(model, objective, r_u, denom, cfg)[0]
        global_loss = all_sum(loss_local, world, device) if denom > 0 else float("nan")  # the same on every rank
        sync_grads(model.params, world)
        gnorm = torch.nn.utils.clip_grad_norm_(list(policy.lm.parameters()), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        gnorm = float(gnorm.full_tensor() if is_sharded(gnorm) else gnorm)
        gnorm_z = float(torch.nn.utils.clip_grad_norm_(list(policy.logz.parameters()), float("inf"))) if policy.logz is not None else 0.0
        if denom == 0:  # a rollout variant kept too few groups: nothing to train on in this optimizer step
            out.skipped += 1
            out.warnings.append("no samples to train on (a rollout variant kept too few groups): update skipped")
        elif math.isfinite(global_loss) and math.isfinite(gnorm) and math.isfinite(gnorm_z):
            model.opt.step()
        else:  # a NaN or inf loss or gradient: skip this update, count it, go on
            out.skipped, out.nonfinite = out.skipped + 1, out.nonfinite + 1
            out.warnings.append(f"non-finite loss {global_loss} or gradient norm {gnorm}: update skipped")
        model.opt.zero_grad(set_to_none=True)
        out.losses.append(global_loss)
        out.grad_norms.append(gnorm)
        out.logz_grad_norms.append(gnorm_z)
    out.logp_old = torch.cat(old_parts) if old_parts else torch.zeros(0, device=device)  # (nG,)
    return out


@torch.no_grad()
def logprobs_nograd(lm, seqs: Seqs, cfg, per_token: bool = False):
    """Response log-probs without gradients, `cfg.micro_batch` rows at a time: summed (N,), or per token (N, R)."""
    size = cfg.micro_batch if cfg.micro_batch > 0 else max(len(seqs), 1)
    tok = torch.cat([sequence_logprobs(lm, seqs[i:i + size], cfg, per_token=True) for i in range(0, len(seqs), size)])
    return tok if per_token else tok.sum(-1)


def kl_sum(lm, batch, logp_old, cfg) -> float:
    """Σ over this rank's fresh samples of the k3 estimate of KL(π_old ‖ π_θ), after the update."""
    if not batch.idx:
        return 0.0
    return float(tb_loss.kl_k3(logp_old, logprobs_nograd(lm, batch.seqs, cfg)).sum())
