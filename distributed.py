"""Data parallelism written by hand: what DDP does, in one file you can read.

- setup_distributed: torchrun sets WORLD_SIZE / RANK / LOCAL_RANK; gloo on CPU, nccl on GPU, with a
  finite timeout so a dead rank stops the others instead of hanging them forever.
- Every rank holds the same weights (same files, same seed). Prompts are sharded after selection;
  each rank's loss is its share of the global-batch mean (local sum / global count).
- sync_grads: one flat all-reduce sums the gradients, so every rank applies the update of the global
  batch. all_sum / gather reduce every logged metric over all ranks, never rank 0's alone.
- check_ranks_agree: a checksum of the parameters at every checkpoint; ranks that drifted apart stop
  the run. shard_model: FSDP2 (ZeRO-3 style) for models too large to replicate.
- teardown: every rank waits for the others, then the process group is destroyed before exit.
"""

import datetime
import importlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Ranks:
    """This process's place in the job."""
    rank: int
    world: int
    device: torch.device

    def log(self, *a):
        """print on rank 0 only."""
        print0(*a, rank=self.rank)


def setup_distributed(cfg) -> Ranks:
    """This process's rank, the world size and its device. torchrun sets WORLD_SIZE; otherwise one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() and world == 1 else "cpu")
    device = torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:  # share the cores between the ranks of this machine
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1:
        # These torch modules evaluate `group=dist.group.WORLD` as a default argument when first imported.
        # Imported after init_process_group (transformers imports torch.distributed.nn while loading a
        # model), they would hold the live process group for good: destroy_process_group could not free
        # it, its gloo threads would run into interpreter shutdown, and one that releases a finished
        # collective's tensors then needs the GIL, which kills the thread inside C++: SIGABRT
        # ("terminate called without an active exception"), about once in 40 runs. Imported now, they hold None.
        for name in ("torch.distributed.nn", "torch.distributed.optim.zero_redundancy_optimizer",
                     "torch.distributed.fsdp.sharded_grad_scaler"):
            importlib.import_module(name)
        timeout = datetime.timedelta(seconds=cfg.dist_timeout_s)
        if device.type == "cuda":
            dist.init_process_group("nccl", timeout=timeout, device_id=device)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    return Ranks(rank, world, device)


def bf16_pays(device, cpu_flags: str = None) -> tuple:
    """(whether bf16 compute is faster than fp32 here, why): the rule behind dtype=auto. A CUDA GPU with
    bf16 units (compute capability 8.0 on, Ampere and later); a CPU with native bf16 instructions
    (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo), where a bf16 matmul runs several times faster than fp32.
    Without them PyTorch emulates bf16 on the CPU, slower than fp32 (its CPU autocast documentation), and
    MPS is left at fp32."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return major >= 8, f"CUDA compute capability {major}.{minor}" + ("" if major >= 8 else " (< 8.0: no bf16 units)")
    if device.type != "cpu":
        return False, f"device {device.type}"
    if cpu_flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpu_flags = next((l for l in f if l.startswith("flags")), "")
        except OSError:
            cpu_flags = ""
    found = [x for x in ("avx512_bf16", "amx_bf16") if x in cpu_flags.split()]
    return bool(found), f"CPU with {' and '.join(found)}" if found else "CPU without avx512_bf16 or amx_bf16"


def print0(*a, rank=0):
    if rank == 0:
        print(*a, flush=True)


def gather(obj, world):
    """Every rank's `obj`, as a list in rank order (one all-gather)."""
    if world == 1:
        return [obj]
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def all_sum(x: float, world, device) -> float:
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


def sync_grads(params, world):
    """Sum gradients over ranks in one flat all-reduce. Each rank's loss is its share of the global
    mean (local sum / global count), so the sum is exactly the gradient of the global-batch loss.
    Sharded (FSDP) gradients arrive already reduced, averaged over ranks: they are scaled to the sum."""
    if world == 1:
        return
    for p in params:
        if is_sharded(p) and p.grad is not None:
            p.grad.mul_(world)
    params = [p for p in params if not is_sharded(p)]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    i = 0
    for p, g in zip(params, grads):
        p.grad = flat[i:i + g.numel()].view_as(g).clone()
        i += g.numel()


def is_sharded(p) -> bool:
    return hasattr(p, "full_tensor")  # a DTensor: a parameter sharded by FSDP2


_MESHES = []  # the device meshes shard_model made: teardown takes the process group out of each


def shard_model(lm, world, device):
    """FSDP2: each decoder block, then the whole model, sharded over all ranks (ZeRO-3 style).
    FSDP reduce-scatters the gradients of sharded weights itself; sync_grads handles the rest (Z_φ)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    _MESHES.append(mesh)
    blocks = next(m for m in lm.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == lm.config.num_hidden_layers)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(lm, mesh=mesh)
    lm.set_force_sum_reduction_for_comms(True)  # gloo has no pre-multiplied sum; FSDP then averages
    return lm


def param_checksum(params) -> float:
    full = [p.full_tensor() if is_sharded(p) else p for p in params]  # all-gathers sharded weights
    return float(sum(p.detach().double().pow(2).sum() + p.detach().double().sum() for p in full))


def check_ranks_agree(params, world):
    """Raise if the ranks' parameters have drifted apart (they must be bitwise equal)."""
    c = param_checksum(params)
    if world > 1:
        cs = gather(c, world)
        if len(set(cs)) > 1:
            raise RuntimeError(f"ranks disagree on parameters: checksums {cs}")
    return c


def teardown(world):
    """Leave the process group together: wait for every rank, then destroy it, which joins its threads
    while the interpreter is still whole (setup_distributed says why that needs care). Only a group that
    nothing else holds is freed: an FSDP-sharded model keeps it (its mesh and its parameter groups hold the
    group), so the model goes first (train.train drops its run before calling this)."""
    if world > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        for mesh in _MESHES:  # torch's DTensor caches keep every mesh for good, and a mesh keeps its groups
            getattr(mesh, "_pg_registry", {}).clear()
        _MESHES.clear()
