"""Triton kernels of fastnorm::normalize_advantages and of its halves for synced calls
(fastnorm::advantage_moments, fastnorm::normalize_advantages_from; csrc/ops.cpp): x (O, G, I),
contiguous, reduced over dims 0 and 2 (the contract in fastnorm/advantages_reference.py, the
arithmetic of csrc/advantages_math.h).

A program takes BLOCK_G groups and steps over their entries in blocks of (BLOCK_O, BLOCK_G,
BLOCK_I) elements: entry (o, g, i) at o G I + g I + i. The steps of a group tile, o-blocks times
i-blocks, are cut into splits, one program each (grid: group tiles, splits). The kernels:

- `_reduce_kernel`: per-step moments of each group by the corrected two-pass algorithm (exact for
  a constant step), merged in float64 by Chan's formula, with the min and max. With several
  splits each program writes its batch-moments table (triton_kernels/moments.py; the non-finite
  row is left 0: nothing reads it) and takes a ticket from its group tile's arrival counter
  (per-call int32 zeros); the last to arrive merges the tables in split order. The group's
  statistics (advantage_group) go into stats (4, G), or, for advantage_moments, its moments into
  an advantage-moments table (5, G).
- `_merge_parts_kernel`, one program per group tile: merges the advantage-moments tables of
  several processes in part order into stats (the first half of normalize_advantages_from).
- `_normalize_kernel`, the splits in reverse order (the last entries read are in L2): y = (x - mean)
  * scale for a group with entries, 0 for one without.

Scalars (min_std, the degrees-of-freedom offset, sizes) are runtime arguments; only the blocks,
the accumulator type and which inputs and outputs exist are compile-time constants. No autotuning.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import triton
import triton.language as tl

from fastnorm.triton_kernels.moments import TABLE_ROWS, chan_merge, merge_partials, shifted_moments, store_table
from fastnorm.triton_kernels.launcher import cdiv, launch, next_power_of_2
from fastnorm.triton_kernels.running_norm import acc_type

_TABLE_ROWS = tl.constexpr(TABLE_ROWS)
# Rows of stats (AdvantageStatRow in csrc/advantages_math.h).
_S_COUNT = tl.constexpr(0)
_S_MEAN = tl.constexpr(1)
_S_STD_RAW = tl.constexpr(2)
_S_NORM_MAX_ABS = tl.constexpr(3)
# Rows of an advantage-moments table (AdvantageMomentRow in csrc/advantages_math.h).
ADVANTAGE_MOMENT_ROWS = 5
_ADVANTAGE_MOMENT_ROWS = tl.constexpr(ADVANTAGE_MOMENT_ROWS)
_A_COUNT = tl.constexpr(0)
_A_MEAN = tl.constexpr(1)
_A_M2 = tl.constexpr(2)
_A_MIN = tl.constexpr(3)
_A_MAX = tl.constexpr(4)
_INF = tl.constexpr(float("inf"))
# The size arguments that follow the batch: not specialized (see running_norm.BATCH_SIZES); inner
# stays specialized, the alignment of the rows of x depends on it.
BATCH_SIZES = ("outer", "i_blocks", "steps", "steps_per_split")


@triton.jit
def _entries(step, g, groups, inner, outer, i_blocks, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """The flat indices (BLOCK_O, BLOCK_G, BLOCK_I) of a step's entries and which exist."""
    o_block = step // i_blocks
    o = (o_block * BLOCK_O).to(tl.int64) + tl.arange(0, BLOCK_O)
    i = ((step - o_block * i_blocks) * BLOCK_I).to(tl.int64) + tl.arange(0, BLOCK_I)
    index = (o[:, None, None] * groups + g[None, :, None]) * inner + i[None, None, :]
    exists = (o < outer)[:, None, None] & (g < groups)[None, :, None] & (i < inner)[None, None, :]
    return index, exists


# mask_group is not specialized either: a mask broadcast over 1 entry (specialized to 1, a contiguous
# load) and over several must compile to one kernel, whose sums then add in the same order (on the
# H200, the two layouts of one mask gave std_raw 1e-8 apart: issue 22).
@triton.jit(do_not_specialize=BATCH_SIZES + ("mask_group",))
def _reduce_kernel(
    x_ptr, mask_ptr, mask_group, stats_ptr, table_ptr, partials_ptr, arrivals_ptr,
    outer, groups, inner, i_blocks, steps, steps_per_split,
    min_std: tl.float64, dof_offset: tl.float64,
    HAS_MASK: tl.constexpr, MOMENTS: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr, MERGE_R: tl.constexpr,
):
    group_tile = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    g = (group_tile * BLOCK_G).to(tl.int64) + tl.arange(0, BLOCK_G)
    g_ok = g < groups
    step_begin = split * steps_per_split
    step_end = tl.minimum(step_begin + steps_per_split, steps)

    n = tl.full([BLOCK_G], 0, tl.float64)
    mean = tl.full([BLOCK_G], 0, tl.float64)
    m2 = tl.full([BLOCK_G], 0, tl.float64)
    lo = tl.full([BLOCK_G], _INF, ACC)
    hi = tl.full([BLOCK_G], -_INF, ACC)
    for step in range(step_begin, step_end):
        index, exists = _entries(step, g, groups, inner, outer, i_blocks, BLOCK_O, BLOCK_I)
        x = tl.load(x_ptr + index, mask=exists, other=0.0, eviction_policy="evict_last").to(ACC)
        valid = exists & (tl.abs(x) < _INF)
        if HAS_MASK:
            valid = valid & (tl.load(mask_ptr + index // mask_group, mask=exists, other=0) != 0)
        step_lo = tl.min(tl.min(tl.where(valid, x, _INF), 2), 0)
        step_hi = tl.max(tl.max(tl.where(valid, x, -_INF), 2), 0)
        lo = tl.minimum(lo, step_lo)
        hi = tl.maximum(hi, step_hi)
        # The step's moments by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983), as in
        # the running-norm reduce: mean = shift + S1/n, M2 = S2 - S1^2/n with d = x - shift. The
        # shift is the step mean in ACC (summed as x/n so it cannot overflow), or, as in the CPU
        # kernel, the value of a constant step, whose moments are then exact (M2 = 0).
        step_n = tl.sum(tl.sum(valid.to(ACC), 2), 0)
        inv_step_n = (1.0 / tl.maximum(step_n, 1.0))[None, :, None]
        shift = tl.sum(tl.sum(tl.where(valid, x * inv_step_n, 0.0), 2), 0)
        shift = tl.where(step_lo == step_hi, step_lo, shift)
        d = tl.where(valid, x - shift[None, :, None], 0.0)
        s1 = tl.sum(tl.sum(d, 2), 0).to(tl.float64)
        s2 = tl.sum(tl.sum(d * d, 2), 0).to(tl.float64)
        if ACC != tl.float64:
            # float32 squares overflow beyond |x - mean| ~ 1e19: redo S1 and S2 in float64.
            if tl.max((~(tl.abs(s1) + s2 < _INF)).to(tl.int32), 0) > 0:
                d64 = tl.where(valid, x.to(tl.float64) - shift.to(tl.float64)[None, :, None], 0.0)
                s1 = tl.sum(tl.sum(d64, 2), 0)
                s2 = tl.sum(tl.sum(d64 * d64, 2), 0)
        step_n64, step_mean, step_m2 = shifted_moments(step_n, shift, s1, s2)
        n, mean, m2 = chan_merge(n, mean, m2, step_n64, step_mean, step_m2)

    group_lo = lo.to(tl.float64)
    group_hi = hi.to(tl.float64)
    floor = tl.full([], min_std, tl.float64)
    offset = tl.full([], dof_offset, tl.float64)
    if SPLIT:
        store_table(partials_ptr + split.to(tl.int64) * (_TABLE_ROWS * groups), g, g_ok, groups, n, mean, m2,
                    tl.full([BLOCK_G], 0, tl.float64), group_lo, group_hi)
        # Every thread's table is written before the ticket is taken (release at GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(arrivals_ptr + group_tile, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            n, mean, m2, _, group_lo, group_hi = merge_partials(partials_ptr, g, g_ok, groups, splits, BLOCK_G,
                                                                MERGE_R)
            _finish(stats_ptr, table_ptr, g, g_ok, groups, n, mean, m2, group_lo, group_hi, floor, offset, MOMENTS)
    else:
        _finish(stats_ptr, table_ptr, g, g_ok, groups, n, mean, m2, group_lo, group_hi, floor, offset, MOMENTS)


@triton.jit
def _finish(stats_ptr, table_ptr, g, g_ok, groups, n, mean, m2, lo, hi, min_std, dof_offset, MOMENTS: tl.constexpr):
    """What a group tile's moments become: its statistics, or its advantage-moments table."""
    if MOMENTS:
        tl.store(table_ptr + _A_COUNT * groups + g, n, mask=g_ok)
        tl.store(table_ptr + _A_MEAN * groups + g, mean, mask=g_ok)  # 0 without entries: never moved from 0
        tl.store(table_ptr + _A_M2 * groups + g, m2, mask=g_ok)
        tl.store(table_ptr + _A_MIN * groups + g, lo, mask=g_ok)
        tl.store(table_ptr + _A_MAX * groups + g, hi, mask=g_ok)
    else:
        _store_stats(stats_ptr, g, g_ok, groups, n, mean, m2, lo, hi, min_std, dof_offset)


@triton.jit
def _merge_parts_kernel(parts_ptr, num_parts, stats_ptr, groups, min_std: tl.float64, dof_offset: tl.float64,
                        BLOCK_G: tl.constexpr):
    """Groups of num_parts >= 1 advantage-moments tables merged in part order (merge_group_parts
    of csrc/advantages_math.h), their statistics into stats."""
    g = (tl.program_id(0) * BLOCK_G).to(tl.int64) + tl.arange(0, BLOCK_G)
    g_ok = g < groups
    n = tl.load(parts_ptr + _A_COUNT * groups + g, mask=g_ok, other=0.0)
    mean = tl.load(parts_ptr + _A_MEAN * groups + g, mask=g_ok, other=0.0)
    m2 = tl.load(parts_ptr + _A_M2 * groups + g, mask=g_ok, other=0.0)
    lo = tl.load(parts_ptr + _A_MIN * groups + g, mask=g_ok, other=_INF)
    hi = tl.load(parts_ptr + _A_MAX * groups + g, mask=g_ok, other=-_INF)
    table = parts_ptr + g
    for _ in range(1, num_parts):
        table += _ADVANTAGE_MOMENT_ROWS * groups  # a 64-bit pointer: no index overflow however many parts
        n, mean, m2 = chan_merge(n, mean, m2, tl.load(table + _A_COUNT * groups, mask=g_ok, other=0.0),
                                 tl.load(table + _A_MEAN * groups, mask=g_ok, other=0.0),
                                 tl.load(table + _A_M2 * groups, mask=g_ok, other=0.0))
        lo = tl.minimum(lo, tl.load(table + _A_MIN * groups, mask=g_ok, other=_INF))
        hi = tl.maximum(hi, tl.load(table + _A_MAX * groups, mask=g_ok, other=-_INF))
    _store_stats(stats_ptr, g, g_ok, groups, n, mean, m2, lo, hi, tl.full([], min_std, tl.float64),
                 tl.full([], dof_offset, tl.float64))


@triton.jit
def _scale(count, std_raw, min_std):
    """1 / max(std_raw, min_std) for a group with entries, 0 without (advantage_group)."""
    return tl.where(count > 0, 1.0 / tl.where(std_raw > min_std, std_raw, min_std), 0.0)


@triton.jit
def _store_stats(stats_ptr, g, g_ok, groups, n, mean, m2, lo, hi, min_std, dof_offset):
    """advantage_group of csrc/advantages_math.h: std_raw = sqrt(M2 / (n - dof_offset)), 0 below 2
    entries; norm_max_abs = max(max - mean, mean - min) * scale (y is monotonic in x); an empty
    group reads 0 throughout."""
    live = n > 0
    std_raw = tl.where(n >= 2, tl.sqrt(m2 / tl.maximum(n - dof_offset, 1.0)), 0.0)
    spread = tl.where(live, tl.maximum(hi - mean, mean - lo), 0.0)
    tl.store(stats_ptr + _S_COUNT * groups + g, n, mask=g_ok)
    tl.store(stats_ptr + _S_MEAN * groups + g, tl.where(live, mean, 0.0), mask=g_ok)
    tl.store(stats_ptr + _S_STD_RAW * groups + g, std_raw, mask=g_ok)
    tl.store(stats_ptr + _S_NORM_MAX_ABS * groups + g, spread * _scale(n, std_raw, min_std), mask=g_ok)


@triton.jit(do_not_specialize=BATCH_SIZES)
def _normalize_kernel(
    x_ptr, out_ptr, stats_ptr, outer, groups, inner, i_blocks, steps, steps_per_split, min_std: tl.float64,
    ACC: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_I: tl.constexpr,
):
    group_tile = tl.program_id(0)
    split = tl.num_programs(1) - 1 - tl.program_id(1)
    g = (group_tile * BLOCK_G).to(tl.int64) + tl.arange(0, BLOCK_G)
    g_ok = g < groups
    step_begin = split * steps_per_split
    step_end = tl.minimum(step_begin + steps_per_split, steps)

    # mean = mean_hi + mean_lo in ACC, so that x - mean_hi is exact near the mean (Sterbenz) and y
    # keeps ACC's precision even when |mean| >> std; a group without entries has scale 0 and y = 0.
    count = tl.load(stats_ptr + _S_COUNT * groups + g, mask=g_ok, other=0.0)
    mean = tl.load(stats_ptr + _S_MEAN * groups + g, mask=g_ok, other=0.0)
    std_raw = tl.load(stats_ptr + _S_STD_RAW * groups + g, mask=g_ok, other=0.0)
    scale = _scale(count, std_raw, tl.full([], min_std, tl.float64)).to(ACC)[None, :, None]
    mean_hi = mean.to(ACC)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(ACC)[None, :, None]
    mean_hi = mean_hi[None, :, None]
    live = (count > 0)[None, :, None]
    for step in range(step_begin, step_end):
        index, exists = _entries(step, g, groups, inner, outer, i_blocks, BLOCK_O, BLOCK_I)
        x = tl.load(x_ptr + index, mask=exists, other=0.0, eviction_policy="evict_first").to(ACC)
        y = tl.where(live, ((x - mean_hi) - mean_lo) * scale, 0.0)
        tl.store(out_ptr + index, y.to(out_ptr.dtype.element_ty), mask=exists, eviction_policy="evict_first")


@dataclasses.dataclass(frozen=True)
class AdvantageBlocks:
    """How the kernels cut x (O, G, I): steps of (outer, groups, inner) elements, steps_per_split
    steps a program, and `merge` tables a step of the last program's merge."""

    outer: int
    groups: int
    inner: int
    steps_per_split: int
    merge: int
    num_warps: int = 4

    def steps(self, outer: int, inner: int) -> tuple[int, int]:
        """The i-blocks and the steps of one group tile."""
        i_blocks = cdiv(inner, self.inner)
        return i_blocks, cdiv(outer, self.outer) * i_blocks

    def grid(self, outer: int, groups: int, inner: int) -> tuple[int, int]:
        return cdiv(groups, self.groups), max(1, cdiv(self.steps(outer, inner)[1], self.steps_per_split))


# A step takes at most STEP_ELEMS elements: the inner run first (contiguous), then as many groups
# as fill ROW_BYTES of a row (contiguous when the run fits), then rows. The last program of a group
# tile merges MERGE_ELEMS table columns per step, in at most MAX_MERGE_STEPS steps.
STEP_ELEMS = 2048
ROW_BYTES = 256
MERGE_ELEMS = 512
MAX_MERGE_STEPS = 8


def choose_advantage_blocks(outer: int, groups: int, inner: int, element_size: int, programs: int,
                            step_elems: int = STEP_ELEMS, row_bytes: int = ROW_BYTES,
                            step_rows: Optional[int] = None) -> AdvantageBlocks:
    """Blocks for x (outer, groups, inner) of element_size bytes, aiming at about `programs`
    programs while keeping every program's work and the merge bounded; a step takes at most
    step_rows rows of outer (a power of 2) when given."""
    block_i = min(next_power_of_2(inner), step_elems)
    block_g = min(next_power_of_2(groups), max(1, (row_bytes // element_size) // block_i))
    block_o = min(max(1, step_elems // (block_i * block_g)), step_rows or step_elems)  # not outer: one compile
    group_tiles = cdiv(groups, block_g)
    merge = max(1, MERGE_ELEMS // block_g)
    steps = cdiv(outer, block_o) * cdiv(inner, block_i)
    splits = max(1, min(cdiv(programs, group_tiles), steps, merge * MAX_MERGE_STEPS))
    return AdvantageBlocks(outer=block_o, groups=block_g, inner=block_i,
                           steps_per_split=max(1, cdiv(steps, splits)), merge=merge)


def _sizes(x: torch.Tensor, blocks: AdvantageBlocks) -> tuple[int, ...]:
    """The size arguments of the reduce and normalize kernels for x (O, G, I)."""
    outer, groups, inner = x.shape
    i_blocks, steps = blocks.steps(outer, inner)
    return outer, groups, inner, i_blocks, steps, blocks.steps_per_split


def _common(x: torch.Tensor, blocks: AdvantageBlocks) -> dict:
    return dict(ACC=acc_type(x.dtype), BLOCK_O=blocks.outer, BLOCK_G=blocks.groups, BLOCK_I=blocks.inner,
                num_warps=blocks.num_warps)


def split_scratch(splits: int, tiles: int, cols: int, device: torch.device):
    """The per-call scratch of a split-rows reduce of `tiles` group tiles: the splits' tables,
    float64 (splits, TABLE_ROWS, cols), and one int32 arrival counter per tile, zeroed. Allocated
    on the current stream at each call (a memset, captured with the kernels in a CUDA graph), so
    concurrent calls never share counters. (None, None) for a single split."""
    if splits == 1:
        return None, None
    return (torch.empty((splits, TABLE_ROWS, cols), dtype=torch.float64, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))


def _launch_reduce(x, mask, stats, table, *, min_std, unbiased, blocks):
    """The reduce kernel: the statistics into stats, or (stats None) the moments into table."""
    grid = blocks.grid(*x.shape)
    partials, arrivals = split_scratch(grid[1], grid[0], x.shape[1], x.device)
    launch(
        _reduce_kernel, grid, x, mask, x.numel() // mask.numel() if mask is not None else 1, stats, table, partials,
        arrivals, *_sizes(x, blocks), float(min_std), 1.0 if unbiased else 0.0,
        HAS_MASK=mask is not None, MOMENTS=stats is None, SPLIT=grid[1] > 1, MERGE_R=blocks.merge,
        **_common(x, blocks),
    )


def _launch_normalize(x, out, stats, *, min_std, blocks):
    launch(_normalize_kernel, blocks.grid(*x.shape), x, out, stats, *_sizes(x, blocks), float(min_std),
           **_common(x, blocks))


def launch_normalize_advantages(x: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor,
                                stats: torch.Tensor, *, min_std: float, unbiased: bool,
                                blocks: AdvantageBlocks) -> None:
    """stats (4, G) and y into out for x (O, G, I) with at least one entry, x and out contiguous;
    mask: flat uint8 whose entry k // (numel / mask.numel()) selects flat entry k, or None."""
    _launch_reduce(x, mask, stats, None, min_std=min_std, unbiased=unbiased, blocks=blocks)
    _launch_normalize(x, out, stats, min_std=min_std, blocks=blocks)


def launch_advantage_moments(x: torch.Tensor, mask: Optional[torch.Tensor], table: torch.Tensor, *,
                             blocks: AdvantageBlocks) -> None:
    """The advantage-moments table (5, G) of x (O, G, I) with at least one entry, contiguous (mask
    as in launch_normalize_advantages): for the same blocks, exactly the moments from which
    launch_normalize_advantages computes its statistics."""
    _launch_reduce(x, mask, None, table, min_std=1.0, unbiased=False, blocks=blocks)


def launch_normalize_advantages_from(x: torch.Tensor, parts: torch.Tensor, out: torch.Tensor, stats: torch.Tensor,
                                     *, min_std: float, unbiased: bool, blocks: AdvantageBlocks) -> None:
    """Merges the advantage-moments tables parts (P, 5, G) in order into stats (4, G), then writes y
    for x (O, G, I), contiguous, possibly empty, into out."""
    groups = x.shape[1]
    launch(
        _merge_parts_kernel, (cdiv(groups, blocks.groups),), parts, parts.shape[0], stats, groups, float(min_std),
        1.0 if unbiased else 0.0, BLOCK_G=blocks.groups, num_warps=blocks.num_warps,
    )
    if x.numel() > 0:
        _launch_normalize(x, out, stats, min_std=min_std, blocks=blocks)
