"""Pieces of the training loop every trainer shares: the accelerator, seeds, batch planning, the optimizer step.

Batch planning is explicit so that runs are exactly reproducible and invariant: the global batch of one optimizer
step is the same list of examples whatever the number of processes and accumulation steps; each process takes a
contiguous slice of it and splits that into micro-batches. Losses are normalised by the size of the whole global
batch (examples or tokens), counted identically on every process, so 1 process × batch 8 == 1 × 4 × 2 accumulation
== 2 processes × 4 (given the same seed and no dropout).
"""
from __future__ import annotations

import logging
import math
import os
import random

import numpy as np
import torch
from accelerate import Accelerator, FullyShardedDataParallelPlugin, PartialState
from accelerate.utils import DistributedType

from alignloop.errors import ConfigError

log = logging.getLogger("alignloop")


def make_accelerator(mixed_precision: str = "no"):
    """An `accelerate.Accelerator` (works unchanged under `accelerate launch`; on CPU-only machines launch several
    processes with `accelerate launch --multi_gpu --num_processes N` or `torchrun`). bf16/fp16 autocast is for GPUs:
    fp16 on CPU is refused with a clear message; bf16 on CPU runs (slowly) through CPU autocast. FSDP: launch with
    `accelerate launch --config_file examples/accelerate/fsdp2.yaml` (on GPUs, and on CPU through `fsdp_on_cpu`)."""
    if mixed_precision not in ("no", "bf16", "fp16"):
        raise ConfigError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {mixed_precision!r}")
    if mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("mixed_precision 'fp16' needs a GPU; use 'no' (or 'bf16') on CPU")
    # cpu=True on a machine without CUDA: only then does accelerate join the processes of `accelerate launch
    # --multi_gpu` / `torchrun` into one gloo group instead of training each alone.
    acc = Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())
    fsdp_on_cpu(acc, mixed_precision)
    if acc.distributed_type == DistributedType.FSDP and not getattr(acc, "is_fsdp2", False):
        # every FSDP path here (sharded checkpoints, final save, the refusals) is FSDP2's; FSDP1 would run unguarded
        raise ConfigError("FSDP1 is not supported (accelerate's default fsdp_version is 1): set fsdp_version: 2 in "
                          "the accelerate config (FSDP_VERSION=2), e.g. examples/accelerate/fsdp2.yaml")
    return acc


def fsdp_asked() -> bool:
    """Whether the launch asked for FSDP: `accelerate launch --config_file examples/accelerate/fsdp2.yaml` sets
    ACCELERATE_USE_FSDP=true and the FSDP_* variables (which `FullyShardedDataParallelPlugin()` reads); under
    `torchrun`, set them yourself (ACCELERATE_USE_FSDP=true FSDP_VERSION=2 ...)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def fsdp_on_cpu(accelerator, mixed_precision: str = "no") -> bool:
    """Put accelerate's FSDP2 path in place where FSDP was asked for but accelerate fell back to DDP on CPU.

    Why: accelerate (1.16) turns FSDP on only for GPU-like distributed types; on a CPU-only machine the same launch
    silently becomes MULTI_CPU, i.e. DDP over gloo with every parameter replicated. PyTorch's FSDP2 (`fully_shard`)
    runs on CPU with gloo, so we do what `AcceleratorState` does for a GPU: the FSDP plugin built from the same
    environment variables, distributed type FSDP in both of accelerate's shared states (the process state too, as
    `AcceleratorState.__init__` does, so a later `AcceleratorState()` reads FSDP). From there `prepare`,
    `clip_grad_norm_`, `no_sync` and `get_state_dict` take accelerate's own FSDP2 branches. Only FSDP2: FSDP1's
    CPU support is not what accelerate's FSDP1 code expects. True when it was put in place."""
    if not fsdp_asked() or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return False
    plugin = FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError("FSDP on CPU needs FSDP2: set fsdp_version: 2 in the accelerate config (FSDP_VERSION=2)")
    if mixed_precision != "no":
        plugin.set_mixed_precision(mixed_precision)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState().distributed_type = DistributedType.FSDP
    if accelerator.is_main_process:
        log.warning("FSDP asked for on CPU: accelerate would fall back to DDP (MULTI_CPU); using its FSDP2 path over "
                    "gloo instead (%d processes, parameters sharded)", accelerator.num_processes)
    return True


def seed_everything(seed: int, rank: int = 0) -> None:
    """A distinct RNG stream per process (dropout, sampling); data order comes from `epoch_order`, identical on
    every process."""
    s = seed + 1_000_003 * rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(n, generator=g).tolist()


def plan_epoch(n: int, global_batch_size: int, seed: int, epoch: int, shuffle: bool = True,
               drop_last: bool = False) -> list[list[int]]:
    """The global batches of one epoch, as lists of example indices (the last one may be short unless drop_last)."""
    order = epoch_order(n, seed, epoch, shuffle)
    batches = [order[i:i + global_batch_size] for i in range(0, n, global_batch_size)]
    if drop_last and batches and len(batches[-1]) < global_batch_size:
        batches.pop()
    return batches


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """This process's contiguous slice of a global batch (sizes differ by at most one)."""
    per, extra = divmod(len(indices), world)
    start = rank * per + min(rank, extra)
    return indices[start:start + per + (1 if rank < extra else 0)]


def computed_in_shards(n: int, rank: int, world: int, compute) -> torch.Tensor:
    """`compute(indices) -> [len(indices), ...]` run on this process's `shard` of range(n), the shares gathered:
    the full [n, ...] on every process (e.g. reference log-probs precomputed once for the whole dataset)."""
    mine = shard(list(range(n)), rank, world)
    part = compute(mine)
    if world == 1:
        return part
    gathered: list = [None] * world
    torch.distributed.all_gather_object(gathered, (mine, part))
    full = part.new_zeros((n, *part.shape[1:]))
    for idx, vals in gathered:
        full[idx] = vals
    return full


def micro_batches(indices: list[int], size: int) -> list[list[int]]:
    return [indices[i:i + size] for i in range(0, len(indices), size)] or [[]]


def steps_per_epoch(n: int, global_batch_size: int, drop_last: bool = False) -> int:
    return n // global_batch_size if drop_last else math.ceil(n / global_batch_size)


def optimizer_step(accelerator, model, optimizer, scheduler, max_grad_norm: float | None) -> float:
    """Clip the gradient norm (if asked), step, schedule, zero. Returns the pre-clip gradient norm."""
    if max_grad_norm:
        norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
    else:
        norm = torch.sqrt(sum((p.grad.detach().float() ** 2).sum() for p in model.parameters() if p.grad is not None))
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def take_indices(n: int, count: int, seed: int, epoch: int, pos: int) -> tuple[list[int], int, int]:
    """The next `count` indices of an endless walk over shuffled epochs of n items (`epoch_order`), from position
    `pos` of `epoch` -> (indices, epoch, pos after them): the prompt stream of the RL trainers, resumable exactly
    from the (epoch, pos) a checkpoint stored."""
    out: list[int] = []
    while len(out) < count:
        take = epoch_order(n, seed, epoch)[pos:pos + count - len(out)]
        out += take
        pos += len(take)
        if pos >= n:
            epoch, pos = epoch + 1, 0
    return out, epoch, pos


def global_batches(n: int, global_batch_size: int, seed: int, *, epoch: int = 0, batch_in_epoch: int = 0,
                   shuffle: bool = True):
    """Endless stream of (epoch, position after this batch, example indices, last batch of the epoch?).
    Start mid-epoch for exact resume with the (epoch, batch_in_epoch) a checkpoint stored."""
    while True:
        batches = plan_epoch(n, global_batch_size, seed, epoch, shuffle)
        for b in range(batch_in_epoch, len(batches)):
            yield epoch, b + 1, batches[b], b + 1 == len(batches)
        epoch, batch_in_epoch = epoch + 1, 0


class null_context:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def sync_context(accelerator, model, micro_index: int, n_micro: int):
    """Skip the DDP gradient all-reduce on every micro-batch but the last of an optimizer step."""
    return accelerator.no_sync(model) if micro_index < n_micro - 1 else null_context()


def set_threads(threads: int | None = None) -> int:
    """Torch intra-op threads. Default: all cores on an idle machine, 1 on a busy one (several threads contending
    for busy cores make small models many times slower: measured 0.18 s vs 2.2 s per step)."""
    if threads is None:
        n = os.cpu_count() or 1
        try:
            busy = os.getloadavg()[0] > n - 0.5
        except OSError:
            busy = False
        threads = 1 if busy else n
    torch.set_num_threads(max(1, threads))
    return threads
