"""Triton kernels of fastnorm's running normalization (the contract in fastnorm/reference.py) and of
its halves for synced updates (fastnorm::batch_moments, fastnorm::merge_normalize; csrc/ops.cpp).

x is viewed as (rows, cols) with unit column stride; a program covers BLOCK_C columns (a column
tile) and a split of the rows. The kernels:

- `_reduce_kernel`, grid (column tiles, row splits): each program reduces its rows in steps of
  2 BLOCK_R rows, loaded as four tiles before any is used; each lane of a tile (a row slot and a
  column) sums its rows in the accumulator type about its first value (the corrected two-pass
  algorithm), and at the end the lanes merge, in float64, into a batch-moments table
  (triton_kernels/moments.py). With one split the program
  holds its columns' whole batch and finishes the call itself: it updates the float64 running
  statistics, writes the diagnostics and then y, re-reading its rows (fastnorm::running_norm), or
  writes the table (fastnorm::batch_moments). With several splits each program writes its table
  to a per-call scratch, which `_merge_kernel` merges in the next launch (the last program to
  arrive could merge them instead, but its arrival counters would cost a memset per call).
  With previous (normalize_with="previous"), y of the columns that have a history (count > 0) is
  written in the reduce pass itself, from the statistics before the batch: x is read once. Only
  the columns without a history are re-read, since their y needs the batch's own statistics.
- `_merge_kernel`, one program per column tile: merges the splits' tables in split order (or, for
  fastnorm::merge_normalize, the processes' tables in part order), then updates the statistics as
  above, or writes the merged table. When a normalize launch follows, it writes what y uses (the
  y table: the mean, 1 / bounded std, and whether the column still needs y); with one split of x,
  merge_normalize's program normalizes x itself.
- `_normalize_kernel`, grid (column tiles, row splits) with the splits in reverse order (the last
  rows the reduce pass read are still in L2): y = clamp((x - mean) / bounded std) from the
  statistics (fastnorm::normalize) or from the y table, and the clipped counts, added to the
  diagnostics with atomics (whole numbers in float64: the sum does not depend on the order).

A call runs its launches and nothing else: the diagnostics and the step counter (incremented by
the updating program of the first column tile) are written by the kernels, and the scratch is
allocated uninitialized. So a running_norm call is one launch when its batch takes one split, else
three (reduce, merge, normalize), with no host sync. The statistics y reads are never written in
the same launch by another program: the merge that updates them comes after the reduce that read
them, and with one split a single program reads and then updates its columns.

The arithmetic mirrors csrc/running_norm_math.h; max |z| comes, as in the C++ kernels, from the
batch's min and max (z is monotonic in x), so the fused op and its two halves give the same bits.
Scalars (eps, bounds, clip, momentum, sizes) are runtime arguments, the floats in float64; only the
block sizes, the accumulator type, the mode and which inputs and outputs exist are compile-time
constants. `choose_blocks` derives the blocks from the shape; there is no autotuning.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

from fastnorm.reference import SCALE_WEIGHT_RATIO
from fastnorm.triton_kernels.launcher import cdiv, launch, next_power_of_2
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
# Rows of the y table: what the normalize launch after a merge uses for each column.
Y_TABLE_ROWS = 3
_Y_MEAN = tl.constexpr(0)
_Y_INV_STD = tl.constexpr(1)
_Y_PENDING = tl.constexpr(2)  # 1: y still to write; 0: written in the reduce pass
_INF = tl.constexpr(float("inf"))
# The size arguments that follow the batch (and with it the number of splits): Triton would compile
# a kernel again for each of their values that is 1 or a multiple of 16 (its integer specialization),
# which buys nothing here: they bound loops and masks, no address alignment depends on them.
BATCH_SIZES = ("rows", "rows_per_split", "num_tables")


@triton.jit
def _float64_scalars(min_weight, max_count, eps, min_std, max_std, eps_on_std, unbiased, scale_min_weight,
                     min_std_rel, clip):
    """The update's and the output's scalars as float64 values (tl.full keeps the interpreter's
    Python floats from becoming float32): min_weight, max_count, eps, min_std, max_std, eps_on_std
    and unbiased (flags 0 or 1), scale_min_weight, min_std_rel (0 without) and clip (inf without)."""
    return (tl.full([], min_weight, tl.float64), tl.full([], max_count, tl.float64), tl.full([], eps, tl.float64),
            tl.full([], min_std, tl.float64), tl.full([], max_std, tl.float64), tl.full([], eps_on_std, tl.float64),
            tl.full([], unbiased, tl.float64), tl.full([], scale_min_weight, tl.float64),
            tl.full([], min_std_rel, tl.float64), tl.full([], clip, tl.float64))


@triton.jit
def _inverse_std(var, eps, eps_on_std, min_std, max_std):
    """1 / bounded_std(var, eps, eps_on_std, min_std, max_std) of running_norm_math.h, in float64;
    eps_on_std is a flag (0 or 1)."""
    std = tl.where(eps_on_std != 0, tl.sqrt(var) + eps, tl.sqrt(var + eps))
    return 1.0 / tl.minimum(tl.maximum(std, min_std), max_std)


@triton.jit
def _output_inverse_std(var, scale, scalars, HAS_SCALE: tl.constexpr):
    """1 / the divisor y uses for var: bounded below by max(min_std, min_std_rel * scale) with the
    long-run scale (std_floor), else by min_std."""
    _, _, eps, min_std, max_std, eps_on_std, _, _, min_std_rel, _ = scalars
    floor = min_std
    if HAS_SCALE:
        floor = tl.maximum(min_std, min_std_rel * scale)
    return _inverse_std(var, eps, eps_on_std, floor, max_std)


@triton.jit
def _in_acc(mean, inv_std, clip, ACC: tl.constexpr):
    """What z = (x - mean) * inv_std needs in ACC: mean = mean_hi + mean_lo, so that x - mean_hi is
    exact near the mean (Sterbenz) and z keeps ACC's precision even when |mean| >> std; the scale;
    the clip bound."""
    mean_hi = mean.to(ACC)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(ACC)
    return mean_hi, mean_lo, inv_std.to(ACC), clip.to(ACC)


@triton.jit
def _normalized(x, mean_hi, mean_lo, scale, bound):
    """z and y = clamp(z, -bound, bound) of a block of x (rows, columns); the clamp keeps NaN as NaN
    (clamp_keep_nan)."""
    z = ((x - mean_hi[None, :]) - mean_lo[None, :]) * scale[None, :]
    return z, tl.where(z < -bound, -bound, tl.where(z > bound, bound, z))


@triton.jit
def _normalize_rows(x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_c, c, pending,
                    row_begin, row_end, mean, inv_std, clip, HAS_MASK: tl.constexpr, ACC: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Writes y of rows [row_begin, row_end) in the columns c where pending, from mean and inv_std
    (float64), and returns the clipped counts of the selected finite entries (float64). Columns not
    pending are neither read nor written; a tile without one skips its rows."""
    mean_hi, mean_lo, scale, bound = _in_acc(mean, inv_std, clip, ACC)
    clipped = tl.full([BLOCK_R, BLOCK_C], 0, tl.int32)
    row_end = tl.where(tl.max(pending.to(tl.int32), 0) > 0, row_end, row_begin)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        in_tile = (r < row_end)[:, None] & pending[None, :]
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=in_tile, other=0.0,
                    eviction_policy="evict_first").to(ACC)
        z, y = _normalized(x, mean_hi, mean_lo, scale, bound)
        tl.store(out_ptr + r[:, None] * out_row_stride + c[None, :], y.to(out_ptr.dtype.element_ty), mask=in_tile,
                 eviction_policy="evict_first")
        valid = in_tile & (tl.abs(x) < _INF)
        if HAS_MASK:
            m = tl.load(mask_ptr + r[:, None] * mask_cols + mask_c[None, :], mask=in_tile, other=0)
            valid = valid & (m != 0)
        clipped += (valid & (tl.abs(z) > bound)).to(tl.int32)
    return tl.sum(clipped, 0).to(tl.float64)


@triton.jit
def _update(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr, count_ptr, diag_ptr, scale_ptr,
            steps_ptr, scalars, HAS_SCALE: tl.constexpr, HAS_STEPS: tl.constexpr, WITH_OUTPUT: tl.constexpr,
            PREVIOUS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges a column tile's batch moments into the running statistics (update_running_stats of
    running_norm_math.h; with HAS_SCALE the long-run scale too), writes the diagnostics but the
    clipped counts, and in the first column tile increments the step counter. Returns the
    statistics y uses, the mean and 1 / bounded std (float64): the updated ones, or with PREVIOUS
    those from before in the columns with a history; and which columns had a history."""
    min_weight, max_count, _, _, _, _, unbiased, scale_min_weight, _, _ = scalars
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
    warm_weight = n / tl.where(n > 0, n_eff + n, 1.0)
    w = tl.maximum(min_weight, warm_weight)
    d = mean - old_mean
    new_mean = old_mean + w * d
    new_var = (1.0 - w) * old_var + w * merged_var + (w * (1.0 - w) * d) * d  # 0, not 0 * inf, at w = 1
    keep = (n > 0) & (tl.abs(new_mean) < _INF) & (tl.abs(new_var) < _INF)
    new_mean = tl.where(keep, new_mean, old_mean)
    new_var = tl.where(keep, new_var, old_var)
    tl.store(mean_ptr + c, new_mean, mask=col_ok)
    tl.store(var_ptr + c, new_var, mask=col_ok)
    tl.store(count_ptr + c, tl.where(keep, old_count + n, old_count), mask=col_ok)
    old_scale = tl.full([BLOCK_C], 1.0, tl.float64)
    new_scale = old_scale
    if HAS_SCALE:
        # scale'^2 = (1 - w_s) scale^2 + w_s var' with w_s = max(scale_min_weight, n_b / (n_eff + n_b)).
        old_scale = tl.load(scale_ptr + c, mask=col_ok, other=1.0)
        w_s = tl.maximum(scale_min_weight, warm_weight)
        new_scale = tl.where(keep, tl.sqrt((1.0 - w_s) * old_scale * old_scale + w_s * new_var), old_scale)
        tl.store(scale_ptr + c, new_scale, mask=col_ok)
    if HAS_STEPS:
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            tl.store(steps_ptr, tl.load(steps_ptr) + 1)

    tl.store(diag_ptr + _D_COUNT * cols + c, n, mask=col_ok)
    tl.store(diag_ptr + _D_MEAN * cols + c, mean, mask=col_ok)
    tl.store(diag_ptr + _D_VAR * cols + c, batch_var, mask=col_ok)
    tl.store(diag_ptr + _D_NONFINITE * cols + c, nonfinite, mask=col_ok)
    history = old_count > 0
    y_mean = new_mean
    y_var = new_var
    y_scale = new_scale
    if PREVIOUS:
        y_mean = tl.where(history, old_mean, new_mean)
        y_var = tl.where(history, old_var, new_var)
        y_scale = tl.where(history, old_scale, new_scale)
    inv_std = _output_inverse_std(y_var, y_scale, scalars, HAS_SCALE)
    if WITH_OUTPUT:
        # z is monotonic in x: the largest |z| comes from the batch's min or max.
        spread = tl.maximum(hi - y_mean, y_mean - lo)
        tl.store(diag_ptr + _D_MAX_ABS_Z * cols + c, tl.where(n > 0, spread * inv_std, 0.0), mask=col_ok)
    else:
        # Not computed: NaN, as inf - inf (Triton checks that a global keeps its value between
        # compilations, which a NaN global fails: NaN != NaN).
        nan = tl.full([BLOCK_C], _INF - _INF, tl.float64)
        tl.store(diag_ptr + _D_CLIPPED * cols + c, nan, mask=col_ok)
        tl.store(diag_ptr + _D_MAX_ABS_Z * cols + c, nan, mask=col_ok)
    return y_mean, inv_std, history


# A lane of the reduce kernel sums at most LANE_ROWS rows in ACC (as the CUDA kernel's threads:
# float sums of up to 128 deviations from a nearby shift stay accurate to ~1e-6), and keeps its
# counts in one int32: valid entries in the low COUNT_BITS bits, non-finite ones in the next
# COUNT_BITS, clipped ones above.
LANE_ROWS = 128
_COUNT_BITS = tl.constexpr(10)
_COUNT_MASK = tl.constexpr((1 << 10) - 1)


@triton.jit
def _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r, row_end, HAS_MASK: tl.constexpr,
               PREVIOUS: tl.constexpr, ACC: tl.constexpr):
    """Rows r (< row_end) of x in the columns c (where col_ok), in ACC; which entries are in the
    tile, and which of them the mask selects."""
    in_tile = (r < row_end)[:, None] & col_ok[None, :]
    if PREVIOUS:  # x is not read again (but in the columns without a history)
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=in_tile, other=0.0,
                    eviction_policy="evict_first").to(ACC)
    else:  # the normalize pass reads x again
        x = tl.load(x_ptr + r[:, None] * x_row_stride + c[None, :], mask=in_tile, other=0.0,
                    eviction_policy="evict_last").to(ACC)
    selected = in_tile
    if HAS_MASK:
        m = tl.load(mask_ptr + r[:, None] * mask_cols + mask_c[None, :], mask=in_tile, other=0)
        selected = selected & (m != 0)
    return x, in_tile, selected


@triton.jit
def _add_tile(x, in_tile, selected, r, shift, s1, s2, lo, hi, counts, out_ptr, out_row_stride, c, in_pass, mean_hi,
              mean_lo, z_scale, bound, PREVIOUS: tl.constexpr):
    """The lanes' state with a loaded tile added (with PREVIOUS, y of its columns in the pass
    written first): a lane without a valid entry yet takes the first as its shift; S1 += d and
    S2 += d^2 with d = x - shift; min, max; the packed counts."""
    finite = tl.abs(x) < _INF
    valid = selected & finite
    new_counts = valid.to(tl.int32) + ((selected & ~finite).to(tl.int32) << _COUNT_BITS)
    if PREVIOUS:
        z, y = _normalized(x, mean_hi, mean_lo, z_scale, bound)
        written = in_tile & in_pass[None, :]
        tl.store(out_ptr + r[:, None] * out_row_stride + c[None, :], y.to(out_ptr.dtype.element_ty), mask=written,
                 eviction_policy="evict_first")
        new_counts += (valid & written & (tl.abs(z) > bound)).to(tl.int32) << (2 * _COUNT_BITS)
    shift = tl.where(valid & ((counts & _COUNT_MASK) == 0), x, shift)
    d = tl.where(valid, x - shift, 0.0)
    lo = tl.minimum(lo, tl.where(valid, x, _INF))
    hi = tl.maximum(hi, tl.where(valid, x, -_INF))
    return shift, s1 + d, s2 + d * d, lo, hi, counts + new_counts


@triton.jit
def _merge_lanes(lane_n, shift, s1, s2):
    """Count, mean and M2 (float64) of each column of the lanes, given their counts (int32) and
    their sums S1 = sum d, S2 = sum d^2 (in ACC) of d = x - shift. Each lane's sums move to one
    shift K of the column, its mean (sum n shift + S1) / n computed in float64 and rounded to ACC:
    with delta = shift - K, to S1 + n delta and S2 + delta (2 S1 + n delta), in ACC as the sums
    were (few float64 tiles live at once), whose float64 sums over the lanes give the moments
    (shifted_moments). Equal values merge exactly: K is their value, delta 0."""
    n = tl.sum(lane_n, 0).to(tl.float64)
    k = tl.sum(lane_n.to(tl.float64) * shift.to(tl.float64) + s1.to(tl.float64), 0) / tl.maximum(n, 1.0)
    k = k.to(shift.dtype)
    lane_n = lane_n.to(shift.dtype)
    delta = shift - k[None, :]
    total_s1 = tl.sum((s1 + lane_n * delta).to(tl.float64), 0)
    total_s2 = tl.sum((s2 + delta * (2.0 * s1 + lane_n * delta)).to(tl.float64), 0)
    return shifted_moments(n, k, total_s1, total_s2)


@triton.jit
def _float64_moments(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, row_begin, row_end,
                     HAS_MASK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Count, mean and M2 in float64 of the columns' valid entries in rows [row_begin, row_end),
    by the exact two-pass algorithm: the reduce loop's moments when its float32 sums overflowed."""
    count = tl.full([BLOCK_C], 0, tl.float64)
    total = tl.full([BLOCK_C], 0, tl.float64)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        x, _, selected = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r, row_end, HAS_MASK,
                                    False, tl.float64)
        valid = selected & (tl.abs(x) < _INF)
        count += tl.sum(valid.to(tl.float64), 0)
        total += tl.sum(tl.where(valid, x, 0.0), 0)
    mean = total / tl.maximum(count, 1.0)
    s1 = tl.full([BLOCK_C], 0, tl.float64)
    s2 = tl.full([BLOCK_C], 0, tl.float64)
    for r0 in range(row_begin, row_end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        x, _, selected = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r, row_end, HAS_MASK,
                                    False, tl.float64)
        d = tl.where(selected & (tl.abs(x) < _INF), x - mean[None, :], 0.0)
        s1 += tl.sum(d, 0)
        s2 += tl.sum(d * d, 0)
    return shifted_moments(count, mean, s1, s2)


@triton.jit(do_not_specialize=BATCH_SIZES)
def _reduce_kernel(
    x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_group,
    mean_ptr, var_ptr, count_ptr, diag_ptr, scale_ptr, steps_ptr, table_ptr, partials_ptr, split_clipped_ptr,
    rows, cols, rows_per_split,
    min_weight: tl.float64, max_count: tl.float64, eps: tl.float64, min_std: tl.float64, max_std: tl.float64,
    eps_on_std: tl.float64, unbiased: tl.float64, scale_min_weight: tl.float64, min_std_rel: tl.float64,
    clip: tl.float64,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_STEPS: tl.constexpr, UPDATE: tl.constexpr,
    WITH_OUTPUT: tl.constexpr, PREVIOUS: tl.constexpr, SPLIT: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    col_tile = tl.program_id(0)
    split = tl.program_id(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    mask_c = c // mask_group
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)
    scalars = _float64_scalars(min_weight, max_count, eps, min_std, max_std, eps_on_std, unbiased, scale_min_weight,
                               min_std_rel, clip)

    # With PREVIOUS (and an output), the columns with a history get y in this pass, from the
    # statistics before the batch.
    in_pass = tl.full([BLOCK_C], 0, tl.int1)
    y_mean = tl.full([BLOCK_C], 0.0, tl.float64)
    y_inv_std = tl.full([BLOCK_C], 1.0, tl.float64)
    if PREVIOUS:
        in_pass = col_ok & (tl.load(count_ptr + c, mask=col_ok, other=0.0) > 0)
        y_mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
        scale = tl.full([BLOCK_C], 1.0, tl.float64)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + c, mask=col_ok, other=1.0)
        y_inv_std = _output_inverse_std(tl.load(var_ptr + c, mask=col_ok, other=1.0), scale, scalars, HAS_SCALE)
    mean_hi, mean_lo, z_scale, bound = _in_acc(y_mean, y_inv_std, scalars[9], ACC)

    # A step loads four tiles of LANE_R = BLOCK_R / 2 rows before using any (more bytes in flight:
    # 16 KB a program at fp32, BLOCK_C 64). Each lane (a row slot of a tile, and a column) sums its
    # rows, at most LANE_ROWS (choose_blocks), in ACC about its own shift (its first valid value),
    # so that a step only loads and adds; at the end the lanes merge into the columns' moments.
    LANE_R: tl.constexpr = (BLOCK_R + 1) // 2
    shift = tl.full([LANE_R, BLOCK_C], 0, ACC)
    s1 = tl.full([LANE_R, BLOCK_C], 0, ACC)
    s2 = tl.full([LANE_R, BLOCK_C], 0, ACC)
    lo = tl.full([LANE_R, BLOCK_C], _INF, ACC)
    hi = tl.full([LANE_R, BLOCK_C], -_INF, ACC)
    counts = tl.full([LANE_R, BLOCK_C], 0, tl.int32)
    for r0 in range(row_begin, row_end, 4 * LANE_R):
        r_a = r0 + tl.arange(0, LANE_R).to(tl.int64)
        r_b = r_a + LANE_R
        r_c = r_b + LANE_R
        r_d = r_c + LANE_R
        x_a, tile_a, selected_a = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r_a, row_end,
                                             HAS_MASK, PREVIOUS, ACC)
        x_b, tile_b, selected_b = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r_b, row_end,
                                             HAS_MASK, PREVIOUS, ACC)
        x_c, tile_c, selected_c = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r_c, row_end,
                                             HAS_MASK, PREVIOUS, ACC)
        x_d, tile_d, selected_d = _load_tile(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, r_d, row_end,
                                             HAS_MASK, PREVIOUS, ACC)
        shift, s1, s2, lo, hi, counts = _add_tile(x_a, tile_a, selected_a, r_a, shift, s1, s2, lo, hi, counts,
                                                  out_ptr, out_row_stride, c, in_pass, mean_hi, mean_lo, z_scale, bound,
                                                  PREVIOUS)
        shift, s1, s2, lo, hi, counts = _add_tile(x_b, tile_b, selected_b, r_b, shift, s1, s2, lo, hi, counts,
                                                  out_ptr, out_row_stride, c, in_pass, mean_hi, mean_lo, z_scale, bound,
                                                  PREVIOUS)
        shift, s1, s2, lo, hi, counts = _add_tile(x_c, tile_c, selected_c, r_c, shift, s1, s2, lo, hi, counts,
                                                  out_ptr, out_row_stride, c, in_pass, mean_hi, mean_lo, z_scale, bound,
                                                  PREVIOUS)
        shift, s1, s2, lo, hi, counts = _add_tile(x_d, tile_d, selected_d, r_d, shift, s1, s2, lo, hi, counts,
                                                  out_ptr, out_row_stride, c, in_pass, mean_hi, mean_lo, z_scale, bound,
                                                  PREVIOUS)
    # The per-element tiles end here: what a column needs of them first, then the merge.
    col_lo = tl.min(lo, 0).to(tl.float64)
    col_hi = tl.max(hi, 0).to(tl.float64)
    nonfinite_n = tl.sum((counts >> _COUNT_BITS) & _COUNT_MASK, 0).to(tl.float64)
    clipped_n = tl.sum(counts >> (2 * _COUNT_BITS), 0).to(tl.float64)
    n, mean, m2 = _merge_lanes(counts & _COUNT_MASK, shift, s1, s2)
    if ACC != tl.float64:
        # float32 squares overflow beyond |x - shift| ~ 1e19 (in a lane's sums or as they move to
        # the column's shift): the rows again, in float64.
        if tl.max((~(tl.abs(mean) + m2 < _INF)).to(tl.int32)) > 0:
            n, mean, m2 = _float64_moments(x_ptr, x_row_stride, mask_ptr, mask_cols, mask_c, c, col_ok, row_begin,
                                           row_end, HAS_MASK, LANE_R, BLOCK_C)
    if SPLIT:
        store_table(partials_ptr + split.to(tl.int64) * (_TABLE_ROWS * cols), c, col_ok, cols, n, mean, m2,
                    nonfinite_n, col_lo, col_hi)
        if PREVIOUS:
            tl.store(split_clipped_ptr + split.to(tl.int64) * cols + c, clipped_n, mask=col_ok)
    elif UPDATE:
        # The whole batch of these columns: the update, then y of the columns still without it.
        y_mean, y_inv_std, _ = _update(c, col_ok, cols, n, mean, m2, nonfinite_n, col_lo, col_hi, mean_ptr, var_ptr,
                                       count_ptr, diag_ptr, scale_ptr, steps_ptr, scalars, HAS_SCALE, HAS_STEPS,
                                       WITH_OUTPUT, PREVIOUS, BLOCK_C)
        if WITH_OUTPUT:
            clipped_n += _normalize_rows(x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_c, c,
                                         col_ok & ~in_pass, row_begin, row_end, y_mean, y_inv_std, scalars[9],
                                         HAS_MASK, ACC, BLOCK_R, BLOCK_C)
            tl.store(diag_ptr + _D_CLIPPED * cols + c, clipped_n, mask=col_ok)
    else:
        store_table(table_ptr, c, col_ok, cols, n, mean, m2, nonfinite_n, col_lo, col_hi)


@triton.jit(do_not_specialize=BATCH_SIZES)
def _merge_kernel(
    tables_ptr, num_tables, split_clipped_ptr, x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols,
    mask_group, mean_ptr, var_ptr, count_ptr, diag_ptr, scale_ptr, steps_ptr, table_ptr, y_table_ptr, rows, cols,
    min_weight: tl.float64, max_count: tl.float64, eps: tl.float64, min_std: tl.float64, max_std: tl.float64,
    eps_on_std: tl.float64, unbiased: tl.float64, scale_min_weight: tl.float64, min_std_rel: tl.float64,
    clip: tl.float64,
    SPLITS: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_STEPS: tl.constexpr,
    UPDATE: tl.constexpr, WITH_OUTPUT: tl.constexpr, PREVIOUS: tl.constexpr, NORMALIZE: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MERGE_R: tl.constexpr,
):
    """SPLITS: tables_ptr holds this call's split tables (merged in split order, MERGE_R a step);
    else the processes' tables of merge_normalize (merged in part order). NORMALIZE: this program
    writes y of all rows of x; else, with an output, the y table for the normalize launch."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    if SPLITS:
        n, mean, m2, nonfinite, lo, hi = merge_partials(tables_ptr, c, col_ok, cols, num_tables, BLOCK_C, MERGE_R)
    else:
        n, mean, m2, nonfinite, lo, hi = merge_column_parts(tables_ptr, c, col_ok, cols, num_tables)
    if UPDATE:
        scalars = _float64_scalars(min_weight, max_count, eps, min_std, max_std, eps_on_std, unbiased,
                                   scale_min_weight, min_std_rel, clip)
        y_mean, y_inv_std, history = _update(c, col_ok, cols, n, mean, m2, nonfinite, lo, hi, mean_ptr, var_ptr,
                                             count_ptr, diag_ptr, scale_ptr, steps_ptr, scalars, HAS_SCALE,
                                             HAS_STEPS, WITH_OUTPUT, PREVIOUS, BLOCK_C)
        if WITH_OUTPUT:
            pending = col_ok
            clipped = tl.full([BLOCK_C], 0, tl.float64)
            if SPLITS and PREVIOUS:
                # The reduce pass wrote y of the columns with a history and counted their clipped entries.
                pending = col_ok & ~history
                for s0 in range(0, num_tables, MERGE_R):
                    s = s0 + tl.arange(0, MERGE_R)
                    ok = (s < num_tables)[:, None] & col_ok[None, :]
                    clipped += tl.sum(tl.load(split_clipped_ptr + s[:, None].to(tl.int64) * cols + c[None, :], mask=ok,
                                              other=0.0), 0)
            if NORMALIZE:
                clipped += _normalize_rows(x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols,
                                           c // mask_group, c, pending, 0, rows, y_mean, y_inv_std, scalars[9],
                                           HAS_MASK, ACC, BLOCK_R, BLOCK_C)
            else:
                tl.store(y_table_ptr + _Y_MEAN * cols + c, y_mean, mask=col_ok)
                tl.store(y_table_ptr + _Y_INV_STD * cols + c, y_inv_std, mask=col_ok)
                tl.store(y_table_ptr + _Y_PENDING * cols + c, pending.to(tl.float64), mask=col_ok)
            tl.store(diag_ptr + _D_CLIPPED * cols + c, clipped, mask=col_ok)
    else:
        store_table(table_ptr, c, col_ok, cols, n, mean, m2, nonfinite, lo, hi)


@triton.jit(do_not_specialize=BATCH_SIZES)
def _normalize_kernel(
    x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_group,
    mean_ptr, var_ptr, scale_ptr, y_table_ptr, diag_ptr, rows, cols, rows_per_split,
    min_weight: tl.float64, max_count: tl.float64, eps: tl.float64, min_std: tl.float64, max_std: tl.float64,
    eps_on_std: tl.float64, unbiased: tl.float64, scale_min_weight: tl.float64, min_std_rel: tl.float64,
    clip: tl.float64,
    HAS_MASK: tl.constexpr, HAS_SCALE: tl.constexpr, FROM_Y_TABLE: tl.constexpr, WITH_DIAG: tl.constexpr,
    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """y from the statistics mean, var (and the relative floor's scale with HAS_SCALE), or with
    FROM_Y_TABLE from the y table, in its pending columns only."""
    col_tile = tl.program_id(0)
    split = tl.num_programs(1) - 1 - tl.program_id(1)
    c = col_tile * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = c < cols
    row_begin = split.to(tl.int64) * rows_per_split
    row_end = tl.minimum(row_begin + rows_per_split, rows)
    scalars = _float64_scalars(min_weight, max_count, eps, min_std, max_std, eps_on_std, unbiased, scale_min_weight,
                               min_std_rel, clip)
    if FROM_Y_TABLE:
        mean = tl.load(y_table_ptr + _Y_MEAN * cols + c, mask=col_ok, other=0.0)
        inv_std = tl.load(y_table_ptr + _Y_INV_STD * cols + c, mask=col_ok, other=1.0)
        pending = col_ok & (tl.load(y_table_ptr + _Y_PENDING * cols + c, mask=col_ok, other=0.0) != 0)
    else:
        mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
        scale = tl.full([BLOCK_C], 1.0, tl.float64)
        if HAS_SCALE:
            scale = tl.load(scale_ptr + c, mask=col_ok, other=1.0)
        inv_std = _output_inverse_std(tl.load(var_ptr + c, mask=col_ok, other=1.0), scale, scalars, HAS_SCALE)
        pending = col_ok
    clipped = _normalize_rows(x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, c // mask_group, c,
                              pending, row_begin, row_end, mean, inv_std, scalars[9], HAS_MASK, ACC, BLOCK_R, BLOCK_C)
    if WITH_DIAG:
        tl.atomic_add(diag_ptr + _D_CLIPPED * cols + c, clipped, mask=pending, sem="relaxed")


# The kernels are InterpretedFunctions when TRITON_INTERPRET=1 was set before this module was imported.
INTERPRETED = not isinstance(_reduce_kernel, triton.runtime.JITFunction)


@dataclasses.dataclass(frozen=True)
class Blocks:
    """How the kernels cut x: BLOCK_C columns a program, BLOCK_R rows a loop step, rows_per_split
    rows a program (a multiple of BLOCK_R), and `merge` tables a step of the split tables' merge."""

    rows: int
    cols: int
    rows_per_split: int
    merge: int
    num_warps: int = 4

    def __post_init__(self):
        # The reduce kernel's lanes (row slots of its tiles of half a step) sum at most LANE_ROWS rows each.
        if self.rows_per_split > (self.rows + 1) // 2 * LANE_ROWS:
            raise ValueError(f"{self} gives the reduce kernel's lanes more than {LANE_ROWS} rows each")

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        return cdiv(cols, self.cols), max(1, cdiv(rows, self.rows_per_split))


# A program steps over STEP_ELEMS elements of x at a time (16 a thread with 4 warps) made of
# 256-byte row segments (two 128-byte lines), or of 64 columns for 2-byte types (one line: 128
# columns would halve the column tiles and, under the merge's cap on splits, the programs, e.g. to
# 128 for 512 columns, one a SM); a split covers at least 768 bytes of each of its
# columns, so its table (48 bytes per column) stays under ~6% of x; the merge takes MERGE_ELEMS
# table columns per step, in at most MAX_MERGE_STEPS steps.
STEP_ELEMS = 2048
ROW_BYTES = 256
MIN_SPLIT_BYTES = 768
MERGE_ELEMS = 512
MAX_MERGE_STEPS = 8


def choose_blocks(rows: int, cols: int, element_size: int, programs: int, step_elems: int = STEP_ELEMS,
                  row_bytes: int = ROW_BYTES, step_rows: Optional[int] = None) -> Blocks:
    """Blocks for x of (rows, cols) elements of element_size bytes, aiming at about `programs`
    programs (a few per SM on a GPU) while keeping every program's work and the merge bounded; a
    loop step takes at most step_elems elements in row segments of at most row_bytes (row_bytes / 4
    columns for 2-byte types), and at most step_rows rows (a power of 2) when given."""
    block_c = min(next_power_of_2(cols), max(1, row_bytes // max(element_size, 4)))
    block_r = min(max(1, step_elems // block_c), step_rows or step_elems)  # not rows: no compile per batch size
    col_tiles = cdiv(cols, block_c)
    merge = max(1, MERGE_ELEMS // block_c)
    max_splits = min(cdiv(rows, max(block_r, MIN_SPLIT_BYTES // element_size)), merge * MAX_MERGE_STEPS)
    # But enough splits that the reduce kernel's lanes (half a step's rows) sum at most LANE_ROWS rows each.
    splits = max(1, min(cdiv(programs, col_tiles), max_splits), cdiv(rows, (block_r + 1) // 2 * LANE_ROWS))
    steps_per_split = cdiv(cdiv(rows, block_r), splits)
    return Blocks(rows=block_r, cols=block_c, rows_per_split=max(1, steps_per_split) * block_r, merge=merge)


def acc_type(dtype: torch.dtype):
    """The accumulator of x's dtype: float64 for float64, float32 otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _optional(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def _scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased, min_std_rel,
             clip) -> tuple[float, ...]:
    """The kernels' float scalars (_float64_scalars): min_weight (1 - momentum, 0 in cumulative
    mode), max_count, eps, min_std, max_std, the flags eps_on_std and unbiased (0.0 or 1.0), the
    long-run scale's floor weight SCALE_WEIGHT_RATIO * min_weight, min_std_rel (0 without) and clip."""
    min_weight = 1.0 - momentum if momentum is not None else 0.0
    return (min_weight, _optional(max_count, math.inf), float(eps), _optional(min_std, 0.0),
            _optional(max_std, math.inf), float(eps_on_std), float(unbiased), SCALE_WEIGHT_RATIO * min_weight,
            _optional(min_std_rel, 0.0), _optional(clip, math.inf))


def _rows_args(x_rows, out_rows, mask_rows) -> tuple:
    """The kernels' arguments x_ptr .. mask_group for x_rows (rows, cols), the output and the mask."""
    mask_cols = mask_rows.shape[1] if mask_rows is not None else 1
    return (x_rows, x_rows.stride(0), out_rows, out_rows.stride(0) if out_rows is not None else 0, mask_rows,
            mask_cols, max(1, x_rows.shape[1] // mask_cols))


def _float64(shape: tuple, device: torch.device) -> torch.Tensor:
    """Per-call scratch: uninitialized (the kernels write every element they read), on the
    caller's stream."""
    return torch.empty(shape, dtype=torch.float64, device=device)


def launch_running_norm(
    x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
    count: torch.Tensor, out_rows: Optional[torch.Tensor], diag: torch.Tensor, *, momentum: Optional[float],
    max_count: Optional[float], eps: float, min_std: Optional[float], max_std: Optional[float],
    clip: Optional[float], blocks: Blocks, eps_on_std: bool = False, unbiased: bool = False,
    scale: Optional[torch.Tensor] = None, min_std_rel: Optional[float] = None, previous: bool = False,
    steps: Optional[torch.Tensor] = None,
) -> None:
    """Reduces x_rows (rows >= 0, cols >= 1), merges it into mean/var/count (float64, cols elements)
    and the long-run scale when given, fills diag (6, cols), increments steps (int64, 0-dim) when
    given and, when out_rows is given, writes y into it: from the updated statistics, or with
    previous from those before x in the columns whose count was > 0. mask_rows: (rows, mask_cols)
    uint8 or None. One launch when the blocks take one split, else three."""
    rows, cols = x_rows.shape
    grid = blocks.grid(rows, cols)
    splits = grid[1]
    with_output = out_rows is not None
    previous = previous and with_output
    scalars = _scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased, min_std_rel, clip)
    partials = _float64((splits, TABLE_ROWS, cols), x_rows.device) if splits > 1 else None
    split_clipped = _float64((splits, cols), x_rows.device) if splits > 1 and previous else None
    launch(
        _reduce_kernel, grid, *_rows_args(x_rows, out_rows, mask_rows), mean, var, count, diag, scale,
        steps if splits == 1 else None, None, partials, split_clipped, rows, cols, blocks.rows_per_split, *scalars,
        HAS_MASK=mask_rows is not None, HAS_SCALE=scale is not None, HAS_STEPS=steps is not None and splits == 1,
        UPDATE=True, WITH_OUTPUT=with_output, PREVIOUS=previous, SPLIT=splits > 1, ACC=acc_type(x_rows.dtype),
        BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, num_warps=blocks.num_warps,
    )
    if splits == 1:
        return
    y_table = _float64((Y_TABLE_ROWS, cols), x_rows.device) if with_output else None
    _launch_merge(partials, from_splits=True, x_rows=x_rows, stats=(mean, var, count, diag, scale), steps=steps,
                  y_table=y_table, split_clipped=split_clipped, scalars=scalars, previous=previous,
                  with_output=with_output, blocks=blocks)
    if with_output:
        _launch_normalize(x_rows, out_rows, mask_rows, diag=diag, y_table=y_table, scalars=scalars, blocks=blocks)


def launch_batch_moments(x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], table: torch.Tensor, *,
                         blocks: Blocks) -> None:
    """The batch-moments table of x_rows (rows, cols) into table, float64 (6, cols): for the same
    blocks, exactly the moments launch_running_norm merges into the statistics."""
    rows, cols = x_rows.shape
    grid = blocks.grid(rows, cols)
    splits = grid[1]
    partials = _float64((splits, TABLE_ROWS, cols), x_rows.device) if splits > 1 else None
    scalars = _scalars(None, None, 0.0, None, None, False, False, None, None)
    launch(
        _reduce_kernel, grid, *_rows_args(x_rows, None, mask_rows), None, None, None, None, None, None,
        table if splits == 1 else None, partials, None, rows, cols, blocks.rows_per_split, *scalars,
        HAS_MASK=mask_rows is not None, HAS_SCALE=False, HAS_STEPS=False, UPDATE=False, WITH_OUTPUT=False,
        PREVIOUS=False, SPLIT=splits > 1, ACC=acc_type(x_rows.dtype), BLOCK_R=blocks.rows, BLOCK_C=blocks.cols,
        num_warps=blocks.num_warps,
    )
    if splits > 1:
        _launch_merge(partials, from_splits=True, x_rows=x_rows, table=table, scalars=scalars, blocks=blocks)


def launch_merge_normalize(
    x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], parts: torch.Tensor, mean: torch.Tensor,
    var: torch.Tensor, count: torch.Tensor, out_rows: Optional[torch.Tensor], diag: torch.Tensor, *,
    momentum: Optional[float], max_count: Optional[float], eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float], blocks: Blocks, eps_on_std: bool = False,
    unbiased: bool = False, scale: Optional[torch.Tensor] = None, min_std_rel: Optional[float] = None,
    previous: bool = False, steps: Optional[torch.Tensor] = None,
) -> None:
    """Merges the tables parts (P, 6, cols) in order into mean/var/count (and scale when given),
    fills diag, increments steps when given and, when out_rows is given, writes y for x_rows
    (rows >= 0, cols >= 0) into it, with the statistics launch_running_norm would use (previous as
    there). One launch when x takes one split or there is no output, else two."""
    rows, cols = x_rows.shape
    with_output = out_rows is not None
    normalize_here = with_output and blocks.grid(rows, cols)[1] == 1
    y_table = _float64((Y_TABLE_ROWS, cols), x_rows.device) if with_output and not normalize_here else None
    scalars = _scalars(momentum, max_count, eps, min_std, max_std, eps_on_std, unbiased, min_std_rel, clip)
    _launch_merge(parts, from_splits=False, x_rows=x_rows, mask_rows=mask_rows,
                  out_rows=out_rows if normalize_here else None, stats=(mean, var, count, diag, scale), steps=steps,
                  y_table=y_table, scalars=scalars, previous=previous, with_output=with_output, blocks=blocks)
    if y_table is not None and rows > 0:
        _launch_normalize(x_rows, out_rows, mask_rows, diag=diag, y_table=y_table, scalars=scalars, blocks=blocks)


def launch_normalize(
    x_rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, out_rows: torch.Tensor, *, eps: float,
    min_std: Optional[float], max_std: Optional[float], clip: Optional[float], blocks: Blocks,
    eps_on_std: bool = False, scale: Optional[torch.Tensor] = None, min_std_rel: Optional[float] = None,
) -> None:
    """y = clamp((x - mean) / clamp(sqrt(var + eps), floor, max_std), -clip, clip) into out_rows
    (sqrt(var) + eps with eps_on_std; floor max(min_std, min_std_rel * scale) with min_std_rel)."""
    _launch_normalize(x_rows, out_rows, None, stats=(mean, var, scale if min_std_rel is not None else None),
                      scalars=_scalars(None, None, eps, min_std, max_std, eps_on_std, False, min_std_rel, clip),
                      blocks=blocks)


def _launch_merge(tables, *, from_splits, x_rows, scalars, blocks, mask_rows=None, out_rows=None, stats=None,
                  steps=None, table=None, y_table=None, split_clipped=None, previous=False, with_output=False):
    """The merge kernel, one program per column tile (at least one, for the step counter), over
    tables: this call's split tables (from_splits) or merge_normalize's parts. With stats (mean,
    var, count, diag, scale) it updates them and, with an output, writes y of every row of x_rows
    into out_rows when given, else the y table; without, it writes the merged table."""
    rows, cols = x_rows.shape
    mean, var, count, diag, scale = stats if stats is not None else (None,) * 5
    x_args = _rows_args(x_rows, out_rows, mask_rows) if out_rows is not None else (None, 0, None, 0, None, 1, 1)
    launch(
        _merge_kernel, (max(1, cdiv(cols, blocks.cols)),), tables, tables.shape[0], split_clipped, *x_args, mean,
        var, count, diag, scale, steps, table, y_table, rows, cols, *scalars, SPLITS=from_splits,
        HAS_MASK=x_args[4] is not None, HAS_SCALE=scale is not None, HAS_STEPS=steps is not None,
        UPDATE=stats is not None, WITH_OUTPUT=with_output,
        PREVIOUS=previous and with_output, NORMALIZE=out_rows is not None, ACC=acc_type(x_rows.dtype),
        BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, MERGE_R=blocks.merge, num_warps=blocks.num_warps,
    )


def _launch_normalize(x_rows, out_rows, mask_rows, *, scalars, blocks, stats=None, y_table=None, diag=None):
    """The normalize kernel from stats (mean, var, and the relative floor's scale or None) or from
    y_table; with diag, the clipped counts of the selected entries are added to it."""
    rows, cols = x_rows.shape
    mean, var, scale = stats if stats is not None else (None,) * 3
    launch(
        _normalize_kernel, blocks.grid(rows, cols), *_rows_args(x_rows, out_rows, mask_rows), mean, var, scale,
        y_table, diag, rows, cols, blocks.rows_per_split, *scalars, HAS_MASK=mask_rows is not None,
        HAS_SCALE=scale is not None, FROM_Y_TABLE=y_table is not None, WITH_DIAG=diag is not None,
        ACC=acc_type(x_rows.dtype),
        BLOCK_R=blocks.rows, BLOCK_C=blocks.cols, num_warps=blocks.num_warps,
    )
