"""What sharded (FSDP) training asks of a loop: every process runs the same number of forwards and backwards.

Under DDP a forward is local and only the backward of an optimizer step's last micro-batch synchronises, so the
processes may run different numbers of micro-batches. Under FSDP2 *every* forward all-gathers each wrapped block's
parameters and every backward gathers / reduce-scatters again: these are collectives, so a process that runs one
micro-batch fewer than another leaves the other waiting forever (a short last batch of an epoch, an eval set that
does not split evenly). `even_micro_batches` gives every process the same number of micro-batches, the ones a
process lacks filled with a dummy micro-batch (one real row) of weight 0: the loop runs it like any other and
multiplies its loss (and metrics) by the weight, so results are those of the unpadded run.
"""
from __future__ import annotations

from alignloop.training.loop import micro_batches, shard


def even_micro_batches(indices: list[int], rank: int, world: int, size: int) -> list[tuple[list[int], float]]:
    """This process's micro-batches of `indices` (its `shard`, split into micro-batches of `size`) with their weight:
    1.0 for real ones; padded with `([indices[0]], 0.0)` to the count of the process with the most (rank 0, whose
    shard is the longest), so every process returns the same number. [] when `indices` is empty (nothing to run
    anywhere). The dummy's loss must be multiplied by its weight (a zero gradient, but the same collectives)."""
    if not indices:
        return []
    mine = [(mb, 1.0) for mb in micro_batches(shard(indices, rank, world), size) if mb]
    most = len([mb for mb in micro_batches(shard(indices, 0, world), size) if mb])
    return mine + [([indices[0]], 0.0)] * (most - len(mine))


def step_micro_batches(batch: list[int], rank: int, world: int, size: int) -> list[list[int]]:
    """`even_micro_batches` for loops that run their own weight-0 pass (DPO, KTO): the padding micro-batches are
    empty lists instead of a dummy row, so every process still runs as many passes, and one synchronised backward
    (the last) under DDP."""
    return [mb if weight else [] for mb, weight in even_micro_batches(batch, rank, world, size)]
