"""Triton kernels of fastnorm's running normalization (the contract in fastnorm/reference.py) and of
its halves for synced updates (fastnorm::batch_moments, fastnorm::merge_normalize; csrc/ops.cpp).

x is viewed as (rows, cols) with unit column stride. The kernels:

- `_reduce_kernel`, grid (column tiles, row splits): each program reduces its rows of one column
  tile in steps of BLOCK_R rows (per-step moments by the corrected two-pass algorithm, merged in
  float64 by Chan's formula) into a batch-moments table (triton_kernels/moments.py). With several
  splits, each writes its table to a per-call scratch and takes a ticket from the tile's arrival
  counter (int32 zeros allocated with the scratch, on the caller's stream); the last program to
  arrive merges the tables in split order, so results do not depend on timing. The merged moments
  then either update the float64 running statistics and write the diagnostics (fastnorm::
  running_norm), or are written out as the call's table (fastnorm::batch_moments).
- `_merge_parts_kernel`, one program per column tile: merges the tables of several processes in
  part order and updates the statistics as above (the first half of fastnorm::merge_normalize).
- `_normalize_kernel`, grid (column tiles, row splits) with the splits in reverse order (the last
  rows the reduce pass read are still in L2): y = clamp((x - mean) / bounded std) and, when asked,
  the clipped counts per column, added to the diagnostics with atomics.

The arithmetic mirrors csrc/running_norm_math.h; max |z| comes, as in the C++ kernels, from the
batch's min and max (z is monotonic in x), so the fused op and its two halves give the same bits.
Scalars (eps, bounds, momentum, sizes) are runtime arguments, the floats in float64; only the block
sizes, the accumulator type and which inputs and outputs exist are compile-time constants.
`choose_blocks` derives the blocks from the shape; there is no autotuning.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastnorm.triton_kernels.moments import (TABLE_ROWS, chan_merge, merge_column_parts, merge_partials,
                                             shifted_moments, store_table)

_TABLE_ROWS = tl.constexpr(TABLE_ROWS)
# Rows of the diagnostics (fastnorm.reference.DIAG_ROWS).
_D_COUNT = tl.constexpr(0)
_D_MEAN = tl.constexpr(1)
_D_VAR = tl.constexpr(2)
_D_NONFINITE = tl.constexpr(3)
_D_CLIPPED = tl.constexpr(4)
_D_MAX_ABS_Z = tl.constexpr(5)
_INF = tl.constexpr(float("inf"))


@triton.jit
def _reduce_kernel(
    x_ptr, x_row_stride, mask_ptr, mask_cols, mask_group,
    mean_ptr, var_ptr, count_ptr, diag_ptr, table_ptr, partials_ptr, arrivals_ptr,
    rows, cols, rows_per_split,
    min_weight: tl.float64, max_count: tl.float64, eps: tl.float64, min_std: tl.float64, max_std: tl.float64,
    eps_on_std: tl.float64, unbiased: tl.float64,
    HAS_MASK: tl.constexpr, UPDATE: tl.constexpr, WITH_OUTPUT: tl.constexpr, SPLIT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MERGE_R: tl.constexpr,
):
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    mask_c = c // mask_group
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)

    n = tl.full([BLOCK_C], 0, tl.float64)
    mean = tl.full([BLOCK_C], 0, tl.float64)
    m2 = tl.full([BLOCK_C], 0, tl.float64)
    nonfinite = tl.full([BLOCK_R, BLOCK_C], 0, tl.int32)
    lo = tl.full([BLOCK_R, BLOCK_C], _INF, ACC)
    hi = tl.full([BLOCK_R, BLOCK_C], -_INF, ACC)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        in_tile = (r < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=in_tile, other=0.0,
                    eviction_policy="evict_last").to(ACC)
        selected = in_tile
        if HAS_MASK:
            m = tl.load(mask_ptr + r[:, None] * mask_cols + mask_c[None, :], mask=in_tile, other=0)
            selected = selected & (m != 0)
        finite = tl.abs(x) < _INF
        valid = selected & finite
        nonfinite += (selected & ~finite).to(tl.int32)
        lo = tl.minimum(lo, tl.where(valid, x, _INF))
        hi = tl.maximum(hi, tl.where(valid, x, -_INF))
        # The step's moments by the corrected two-pass algorithm (Chan, Golub & LeVeque 1983): with
        # d = x - shift for a shift near the mean, S1 = sum d, S2 = sum d^2: mean = shift + S1/n,
        # M2 = S2 - S1^2/n. The shift is the step mean in ACC, summed as x/n so it cannot overflow.
        step_n = tl.sum(valid.to(ACC), 0)
        shift = tl.sum(tl.where(valid, x * (1.0 / tl.maximum(step_n, 1.0))[None, :], 0.0), 0)
        d = tl.where(valid, x - shift[None, :], 0.0)
        s1 = tl.sum(d, 0).to(tl.float64)
        s2 = tl.sum(d * d, 0).to(tl.float64)
        if ACC != tl.float64:
            # float32 squares overflow beyond |x - mean| ~ 1e19: redo S1 and S2 in float64.
            if tl.max((~(tl.abs(s1) + s2 < _INF)).to(tl.int32), 0) > 0:
                d64 = tl.where(valid, x.to(tl.float64) - shift.to(tl.float64)[None, :], 0.0)
                s1 = tl.sum(d64, 0)
                s2 = tl.sum(d64 * d64, 0)
        step_n64, step_mean, step_m2 = shifted_moments(step_n, shift, s1, s2)
        n, mean, m2 = chan_merge(n, mean, m2, step_n64, step_mean, step_m2)

    nonfinite_n = tl.sum(nonfinite, 0).to(tl.float64)
    col_lo = tl.min(lo, 0).to(tl.float64)
    col_hi = tl.max(hi, 0).to(tl.float64)
    # Scalars in float64: tl.full keeps the interpreter's Python floats from becoming float32.
    scalars = (tl.full([], min_weight, tl.float64), tl.full([], max_count, tl.float64), tl.full([], eps, tl.float64),
               tl.full([], min_std, tl.float64), tl.full([], max_std, tl.float64), tl.full([], eps_on_std, tl.float64),
               tl.full([], unbiased, tl.float64))
    if SPLIT:
        store_table(partials_ptr + split.to(tl.int64) * (_TABLE_ROWS * cols), c, col_ok, cols, n, mean, m2,
                    nonfinite_n, col_lo, col_hi)
        # Every thread's table is written before the ticket is taken (release at GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(arrivals_ptr + col_tile, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            n, mean, m2, nonfinite_n, col_lo, col_hi = merge_partials(partials_ptr, c, col_ok, cols, splits, BLOCK_C,
                                                                      MERGE_R)
            _finish(c, col_ok, cols, n, mean, m2, nonfinite_n, col_lo, col_hi, mean_ptr, var_ptr, count_ptr,
                    diag_ptr, table_ptr, scalars, UPDATE, WITH_OUTPUT, BLOCK_C)
    else:
        _finish(c, col_ok, cols, n, mean, m2, nonfinite_n, col_lo, col_hi, mean_ptr, var_ptr, count_ptr, diag_ptr,
                table_ptr, scalars, UPDATE, WITH_OUTPUT, BLOCK_C)


@triton.jit
def _finish(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr, count_ptr, diag_ptr, table_ptr,
            scalars, UPDATE: tl.constexpr, WITH_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """What a column tile's batch moments become: the running update, or the call's table."""
    if UPDATE:
        _update(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr, count_ptr, diag_ptr, scalars,
                WITH_OUTPUT, BLOCK_C)
    else:
        store_table(table_ptr, c, col_ok, cols, n, mean, m2, nonfinite, lo, hi)


@triton.jit
def _merge_parts_kernel(
    parts_ptr, num_parts, mean_ptr, var_ptr, count_ptr, diag_ptr, cols,
    min_weight: tl.float64, max_count: tl.float64, eps: tl.float64, min_std: tl.float64, max_std: tl.float64,
    eps_on_std: tl.float64, unbiased: tl.float64, WITH_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr,
):
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    n, mean, m2, nonfinite, lo, hi = merge_column_parts(parts_ptr, c, col_ok, cols, num_parts)
    scalars = (tl.full([], min_weight, tl.float64), tl.full([], max_count, tl.float64), tl.full([], eps, tl.float64),
               tl.full([], min_std, tl.float64), tl.full([], max_std, tl.float64), tl.full([], eps_on_std, tl.float64),
               tl.full([], unbiased, tl.float64))
    _update(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr, count_ptr, diag_ptr, scalars,
            WITH_OUTPUT, BLOCK_C)


@triton.jit
def _inverse_std(var, eps, eps_on_std, min_std, max_std):
    """1 / bounded_std(var, eps, eps_on_std, min_std, max_std) of running_norm_math.h, in float64;
    eps_on_std is a flag (0 or 1)."""
    std = tl.where(eps_on_std != 0, tl.sqrt(var) + eps, tl.sqrt(var + eps))
    return 1.0 / tl.minimum(tl.maximum(std, min_std), max_std)


@triton.jit
def _update(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr, count_ptr, diag_ptr, scalars,
            WITH_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges a column tile's batch moments into the running statistics (update_running_stats of
    running_norm_math.h) and writes its diagnostics; scalars: min_weight, max_count, eps, min_std,
    max_std, eps_on_std and unbiased (flags 0 or 1), float64."""
    min_weight, max_count, eps, min_std, max_std, eps_on_std, unbiased = scalars
    # v_b = M2/n, or with unbiased M2/(n-1) and 0 for n = 1 (merged_batch_var); diag keeps M2/n.
    # w = max(min_weight, n_b / (min(count, max_count) + n_b)); mean' = mean + w d;
    # var' = (1 - w) var + w v_b + w (1 - w) d^2; columns without samples, or whose result would
    # not be finite, keep their statistics.
    old_mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
    old_var = tl.load(var_ptr + c, mask=col_ok, other=1.0)
    old_count = tl.load(count_ptr + c, mask=col_ok, other=0.0)
    batch_var = m2 / tl.maximum(n, 1.0)
    merged_var = tl.where(unbiased != 0, tl.where(n > 1, m2 / tl.maximum(n - 1.0, 1.0), 0.0), batch_var)
    n_eff = tl.minimum(old_count, max_count)
    w = tl.maximum(min_weight, n / tl.where(n > 0, n_eff + n, 1.0))
    d = mean - old_mean
    new_mean = old_mean + w * d
    new_var = (1.0 - w) * old_var + w * merged_var + (w * (1.0 - w) * d) * d  # 0, not 0 * inf, at w = 1
    keep = (n > 0) & (tl.abs(new_mean) < _INF) & (tl.abs(new_var) < _INF)
    new_mean = tl.where(keep, new_mean, old_mean)
    new_var = tl.where(keep, new_var, old_var)
    tl.store(mean_ptr + c, new_mean, mask=col_ok)
    tl.store(var_ptr + c, new_var, mask=col_ok)
    tl.store(count_ptr + c, tl.where(keep, old_count + n, old_count), mask=col_ok)

    tl.store(diag_ptr + _D_COUNT * cols + c, n, mask=col_ok)
    tl.store(diag_ptr + _D_MEAN * cols + c, mean, mask=col_ok)
    tl.store(diag_ptr + _D_VAR * cols + c, batch_var, mask=col_ok)
    tl.store(diag_ptr + _D_NONFINITE * cols + c, nonfinite, mask=col_ok)
    if WITH_OUTPUT:
        # The normalize pass adds the clipped counts to 0. z is monotonic in x: the largest |z|
        # comes from the batch's min or max.
        spread = tl.maximum(hi - new_mean, new_mean - lo)
        max_abs_z = tl.where(n > 0, spread * _inverse_std(new_var, eps, eps_on_std, min_std, max_std), 0.0)
        tl.store(diag_ptr + _D_CLIPPED * cols + c, tl.full([BLOCK_C], 0, tl.float64), mask=col_ok)
        tl.store(diag_ptr + _D_MAX_ABS_Z * cols + c, max_abs_z, mask=col_ok)
    else:
        # Not computed: NaN, as inf - inf (Triton checks that a global keeps its value between
        # compilations, which a NaN global fails: NaN != NaN).
        nan = tl.full([BLOCK_C], _INF - _INF, tl.float64)
        tl.store(diag_ptr + _D_CLIPPED * cols + c, nan, mask=col_ok)
        tl.store(diag_ptr + _D_MAX_ABS_Z * cols + c, nan, mask=col_ok)


@triton.jit
def _normalize_kernel(
    x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_group,
    mean_ptr, var_ptr, diag_ptr, rows, cols, rows_per_split,
    eps: tl.float64, min_std: tl.float64, max_std: tl.float64, clip: tl.float64, eps_on_std: tl.float64,
    HAS_MASK: tl.constexpr, WITH_DIAG: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    col_tile = tl.program_id(0)
    split = tl.num_programs(1) - 1 - tl.program_id(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    mask_c = c // mask_group
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)

    # bounded_std of running_norm_math.h; mean = mean_hi + mean_lo in ACC, so that x - mean_hi is
    # exact near the mean (Sterbenz) and z keeps ACC's precision even when |mean| >> std.
    mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
    var = tl.load(var_ptr + c, mask=col_ok, other=1.0)
    # Scalars in float64: tl.full keeps the interpreter's Python floats from becoming float32.
    scale = _inverse_std(var, tl.full([], eps, tl.float64), tl.full([], eps_on_std, tl.float64),
                         tl.full([], min_std, tl.float64), tl.full([], max_std, tl.float64)).to(ACC)
    mean_hi = mean.to(ACC)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(ACC)
    hi = tl.full([], clip, tl.float64).to(ACC)

    clipped = tl.full([BLOCK_R, BLOCK_C], 0, tl.int32)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        in_tile = (r < row_end)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=in_tile, other=0.0,
                    eviction_policy="evict_first").to(ACC)
        z = ((x - mean_hi[None, :]) - mean_lo[None, :]) * scale[None, :]
        # The clamp keeps NaN as NaN (clamp_keep_nan).
        y = tl.where(z < -hi, -hi, tl.where(z > hi, hi, z))
        tl.store(out_ptr + r[:, None] * out_row_stride + c[None, :], y.to(out_ptr.dtype.element_ty),
                 mask=in_tile, eviction_policy="evict_first")
        if WITH_DIAG:
            valid = in_tile & (tl.abs(x) < _INF)
            if HAS_MASK:
                m = tl.load(mask_ptr + r[:, None] * mask_cols + mask_c[None, :], mask=in_tile, other=0)
                valid = valid & (m != 0)
            clipped += (valid & (tl.abs(z) > hi)).to(tl.int32)

    if WITH_DIAG:
        # Whole numbers add exactly in float64, whatever the order: the atomics stay deterministic.
        clipped_n = tl.sum(clipped, 0).to(tl.float64)
        tl.atomic_add(diag_ptr + _D_CLIPPED * cols + c, clipped_n, mask=col_ok, sem="relaxed")


# The kernels are InterpretedFunctions when TRITON_INTERPRET=1 was set before this module was imported.
INTERPRETED = not isinstance(_reduce_kernel, triton.runtime.JITFunction)
if INTERPRETED:
    def wrap_triton(kernel):
        """Interpreted kernels run as they are (older torch.library.wrap_triton rejects them)."""
        return kernel
else:
    from torch.library import wrap_triton  # torch.compile traces the launches to the kernels


@dataclasses.dataclass(frozen=True)
class Blocks:
    """How the kernels cut x: BLOCK_C columns a program, BLOCK_R rows a loop step, rows_per_split
    rows a program (a multiple of BLOCK_R), and `merge` tables a step of the last program's merge."""

    rows: int
    cols: int
    rows_per_split: int
    merge: int
    num_warps: int = 4

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        return triton.cdiv(cols, self.cols), max(1, triton.cdiv(rows, self.rows_per_split))


# A program steps over STEP_ELEMS elements of x at a time (16 a thread with 4 warps) made of
# 256-byte row segments (two 128-byte lines); a split covers at least 768 bytes of each of its
# columns, so its table (48 bytes per column) stays under ~6% of x; the last program of a column
# tile merges MERGE_ELEMS table columns per step, in at most MAX_MERGE_STEPS steps.
STEP_ELEMS = 2048
ROW_BYTES = 256
MIN_SPLIT_BYTES = 768
MERGE_ELEMS = 512
MAX_MERGE_STEPS = 8


def choose_blocks(rows: int, cols: int, element_size: int, programs: int, step_elems: int = STEP_ELEMS,
                  row_bytes: int = ROW_BYTES, step_rows: Optional[int] = None) -> Blocks:
    """Blocks for x of (rows, cols) elements of element_size bytes, aiming at about `programs`
    programs (a few per SM on a GPU) while keeping every program's work and the merge bounded; a
    loop step takes at most step_elems elements in row segments of at most row_bytes, and at most
    step_rows rows (a power of 2) when given."""
    block_c = min(triton.next_power_of_2(max(cols, 1)), max(1, row_bytes // element_size))
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, step_elems // block_c), step_rows or step_elems)
    col_tiles = triton.cdiv(cols, block_c)
    merge = max(1, MERGE_ELEMS // block_c)
    max_splits = min(triton.cdiv(rows, max(block_r, MIN_SPLIT_BYTES // element_size)), merge * MAX_MERGE_STEPS)
    splits = max(1, min(triton.cdiv(programs, col_tiles), max_splits))
    steps_per_split = triton.cdiv(triton.cdiv(rows, block_r), splits)
    return Blocks(rows=block_r, cols=block_c, rows_per_split=max(1, steps_per_split) * block_r, merge=merge)


def split_scratch(splits: int, tiles: int, cols: int, device: torch.device):
    """The per-call scratch of a split-rows reduce of `tiles` column (or group) tiles: the splits'
    tables, float64 (splits, TABLE_ROWS, cols), and one int32 arrival counter per tile, zeroed.
    Allocated on the current stream at each call (a memset, captured with the kernels in a CUDA
    graph), so concurrent calls never share counters. (None, None) for a single split."""
    if splits == 1:
        return None, None
    return (torch.empty((splits, TABLE_ROWS, cols), dtype=torch.float64, device=device),
            torch.zeros(tiles, dtype=torch.int32, device=device))


def acc_type(dtype: torch.dtype):
    """The accumulator of x's dtype: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _optional(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def _update_scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased) -> tuple[float, ...]:
    """min_weight (1 - momentum, 0 in cumulative mode), max_count, eps, min_std, max_std and the
    flags eps_on_std and unbiased (0.0 or 1.0) as floats."""
    return (1.0 - momentum if momentum is not None else 0.0, _optional(max_count, math.inf), float(eps),
            _optional(min_std, 0.0), _optional(max_std, math.inf), float(eps_on_std), float(unbiased))


def _launch_reduce(x_rows, mask_rows, stats, table, *, with_output, scalars, blocks):
    """The reduce kernel: into the statistics (mean, var, count, diag) when stats is given, else
    into table."""
    rows, cols = x_rows.shape
    grid = blocks.grid(rows, cols)
    partials, arrivals = split_scratch(grid[1], grid[0], cols, x_rows.device)
    mask_cols = mask_rows.shape[1] if mask_rows is not None else 1
    mean, var, count, diag = stats if stats is not None else (None,) * 4
    wrap_triton(_reduce_kernel)[grid](
        x_rows, x_rows.stride(0), mask_rows, mask_cols, cols // mask_cols,
        mean, var, count, diag, table, partials, arrivals, rows, cols, blocks.rows_per_split, *scalars,
        HAS_MASK=mask_rows is not None, UPDATE=stats is not None, WITH_OUTPUT=with_output, SPLIT=grid[1] > 1,
        ACC=acc_type(x_rows.dtype), BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, MERGE_R=blocks.merge,
        num_warps=blocks.num_warps,
    )


def launch_running_norm(
    x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
    count: torch.Tensor, out_rows: Optional[torch.Tensor], diag: torch.Tensor, *, momentum: Optional[float],
    max_count: Optional[float], eps: float, min_std: Optional[float], max_std: Optional[float],
    clip: Optional[float], blocks: Blocks, eps_on_std: bool = False, unbiased: bool = False,
) -> None:
    """Reduces x_rows (rows >= 1, cols), merges it into mean/var/count (float64, cols elements),
    fills diag (6, cols) and, when out_rows is given, writes y into it. mask_rows: (rows, mask_cols)
    uint8 or None."""
    _launch_reduce(x_rows, mask_rows, (mean, var, count, diag), None, with_output=out_rows is not None,
                   scalars=_update_scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased),
                   blocks=blocks)
    if out_rows is not None:
        _launch_normalize(x_rows, out_rows, mask_rows, mean, var, diag, eps=eps, min_std=min_std, max_std=max_std,
                          clip=clip, eps_on_std=eps_on_std, blocks=blocks)


def launch_batch_moments(x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], table: torch.Tensor, *,
                         blocks: Blocks) -> None:
    """The batch-moments table of x_rows (rows, cols) into table, float64 (6, cols): for the same
    blocks, exactly the moments launch_running_norm merges into the statistics."""
    _launch_reduce(x_rows, mask_rows, None, table, with_output=False, scalars=(0.0, math.inf, 0.0, 0.0, math.inf, 0.0, 0.0),
                   blocks=blocks)


def launch_merge_normalize(
    x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], parts: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, count: torch.Tensor, out_rows: Optional[torch.Tensor], diag: torch.Tensor, *,
    momentum: Optional[float], max_count: Optional[float], eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float], blocks: Blocks, eps_on_std: bool = False,
    unbiased: bool = False,
) -> None:
    """Merges the tables parts (P, 6, cols) in order into mean/var/count, fills diag and, when
    out_rows is given, writes y for x_rows (rows >= 0, cols) into it."""
    rows, cols = x_rows.shape
    wrap_triton(_merge_parts_kernel)[(triton.cdiv(cols, blocks.cols),)](
        parts, parts.shape[0], mean, var, count, diag, cols,
        *_update_scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased),
        WITH_OUTPUT=out_rows is not None, BLOCK_C=blocks.cols, num_warps=blocks.num_warps,
    )
    if out_rows is not None and rows > 0:
        _launch_normalize(x_rows, out_rows, mask_rows, mean, var, diag, eps=eps, min_std=min_std, max_std=max_std,
                          clip=clip, eps_on_std=eps_on_std, blocks=blocks)


def launch_normalize(
    x_rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, out_rows: torch.Tensor, *, eps: float,
    min_std: Optional[float], max_std: Optional[float], clip: Optional[float], blocks: Blocks,
    eps_on_std: bool = False,
) -> None:
    """y = clamp((x - mean) / clamp(sqrt(var + eps), min_std, max_std), -clip, clip) into out_rows
    (sqrt(var) + eps with eps_on_std)."""
    _launch_normalize(x_rows, out_rows, None, mean, var, None, eps=eps, min_std=min_std, max_std=max_std,
                      clip=clip, eps_on_std=eps_on_std, blocks=blocks)


def _launch_normalize(x_rows, out_rows, mask_rows, mean, var, diag, *, eps, min_std, max_std, clip, eps_on_std,
                      blocks):
    """The normalize kernel; with diag, the clipped counts of the selected entries are added to it."""
    rows, cols = x_rows.shape
    mask_cols = mask_rows.shape[1] if mask_rows is not None else 1
    wrap_triton(_normalize_kernel)[blocks.grid(rows, cols)](
        x_rows, x_rows.stride(0), out_rows, out_rows.stride(0), mask_rows, mask_cols, cols // mask_cols,
        mean, var, diag, rows, cols, blocks.rows_per_split,
        float(eps), _optional(min_std, 0.0), _optional(max_std, math.inf), _optional(clip, math.inf),
        float(eps_on_std), HAS_MASK=mask_rows is not None, WITH_DIAG=diag is not None, ACC=acc_type(x_rows.dtype), BLOCK_R=blocks.rows,
        BLOCK_C=blocks.cols, num_warps=blocks.num_warps,
    )
