"""Identical statistics on every rank: the collective of RunningNorm(sync=True), and
broadcast_state, which re-seeds every rank from one after a resume.

How ranks combine a batch. Each rank reduces its own shard to a batch-moments table (count, mean,
M2, non-finite count, min, max per column; fastnorm::batch_moments). One all-gather gives every
rank the tables of all ranks, stacked in rank order, and every rank merges them in that order
with the same code (Chan et al. 1979; fastnorm::merge_normalize) before the running update. The
all-gather only copies bytes, so every rank merges the same bits in the same order and holds
bitwise the same statistics afterwards, equal (to rounding) to one process that saw the
concatenated batch. An all-reduce of counts and sums followed by one of centred M2 would send
less for very large groups, but takes two dependent collectives, and an all-reduce's summation
order is the library's choice: bitwise identity across ranks would rest on NCCL and gloo
internals rather than on this code. The running statistics themselves are never summed across
ranks, so counts cannot inflate; a rank with an empty or fully masked shard sends an empty
table (count 0) and still takes part. The clipped counts, known only after normalizing, take a
second, small all-reduce (exact: sums of whole numbers), so the diagnostics agree too.

normalize_advantages(sync=True) does the same with its own tables (count, mean, M2, min, max per
group; fastnorm::advantage_moments and fastnorm::normalize_advantages_from): one all-gather, the
same merge on every rank, then every rank normalizes its shard with the group's statistics.
"""

from __future__ import annotations

from typing import Optional

import torch.distributed as dist
from torch import Tensor, nn

# torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old name now warns).
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def check_group(process_group: Optional[dist.ProcessGroup], what: str) -> int:
    """The size of process_group (None: the default group); a clear error when torch.distributed
    is not initialized or this process is not in the group."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs torch.distributed to be initialized first "
                           "(torch.distributed.init_process_group)")
    size = dist.get_world_size(process_group)
    if size < 1:
        raise RuntimeError(f"{what}: this process (global rank {dist.get_rank()}) is not a member of process_group")
    return size


def all_gather_moments(moments: Tensor, process_group: Optional[dist.ProcessGroup] = None,
                       what: str = "RunningNorm(sync=True)") -> Tensor:
    """Every rank's moments table moments (rows, *shape), stacked in group-rank order: (group size,
    rows, *shape), the same bits on every rank. Every rank's table must have the same shape. No
    host sync on NCCL; a group of one needs no collective. what names the caller in errors."""
    size = check_group(process_group, what)
    if size == 1:
        return moments[None]
    gathered = moments.new_empty((size * moments.shape[0], *moments.shape[1:]))
    _all_gather_single(gathered, moments, group=process_group)
    return gathered.view(size, *moments.shape)


def sum_counts(counts: Tensor, process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Sums counts (float64 whole numbers below 2^53) over the group in place. Such sums are exact
    in any order, so every rank gets the same bits whatever the all-reduce's order."""
    if dist.get_world_size(process_group) > 1:
        dist.all_reduce(counts, group=process_group)


def broadcast_state(module: nn.Module, src: int = 0, process_group: Optional[dist.ProcessGroup] = None) -> None:
    """Copies the state of every fastnorm normalizer in module (module itself included; for
    RunningNorm: mean, var, count, steps) from global rank src to every rank of process_group.

    Call it on every rank of the group after a resume, e.g. when only rank src loaded the
    checkpoint, or after the world size changed: all ranks then continue from one state, and
    since ranks never add up their running statistics, counts never inflate. The normalizers must
    be built with the same shapes, in the same order, on every rank.
    """
    normalizers = [m for m in module.modules() if hasattr(m, "BROADCAST_BUFFERS")]
    if not normalizers:
        raise ValueError(f"broadcast_state: module ({type(module).__name__}) holds no fastnorm normalizer")
    check_group(process_group, "broadcast_state")
    for norm in normalizers:
        for name in norm.BROADCAST_BUFFERS:
            dist.broadcast(getattr(norm, name), src=src, group=process_group)
