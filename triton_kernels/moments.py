"""Triton helpers shared by fastnorm's kernels: batch-moments tables and their merges.

A table holds, for each of `cols` columns (or groups), rows of float64 in the order of MomentRow in
csrc/running_norm_math.h: count, mean, M2 (sum of squared deviations from the mean), non-finite
count, min, max. A column without entries reads 0, 0, 0, nonfinite, +inf, -inf. The split-rows
reduce kernels write one table per split (their partials), which the last program of a column tile
merges in split order (`merge_partials`); fastnorm::merge_normalize merges the tables of several
processes one after another (`merge_column_parts`, the mirror of the header's function), each
step a `chan_merge`.
"""

from __future__ import annotations

import triton
import triton.language as tl

TABLE_ROWS = 6
_TABLE_ROWS = tl.constexpr(TABLE_ROWS)
_COUNT = tl.constexpr(0)
_MEAN = tl.constexpr(1)
_M2 = tl.constexpr(2)
_NONFINITE = tl.constexpr(3)
_MIN = tl.constexpr(4)
_MAX = tl.constexpr(5)
_INF = tl.constexpr(float("inf"))


@triton.jit
def store_table(table_ptr, c, col_ok, cols, n, mean, m2, nonfinite, lo, hi):
    """Columns c (where col_ok) of the table at table_ptr."""
    tl.store(table_ptr + _COUNT * cols + c, n, mask=col_ok)
    tl.store(table_ptr + _MEAN * cols + c, mean, mask=col_ok)
    tl.store(table_ptr + _M2 * cols + c, m2, mask=col_ok)
    tl.store(table_ptr + _NONFINITE * cols + c, nonfinite, mask=col_ok)
    tl.store(table_ptr + _MIN * cols + c, lo, mask=col_ok)
    tl.store(table_ptr + _MAX * cols + c, hi, mask=col_ok)


@triton.jit
def merge_partials(partials_ptr, c, col_ok, cols, splits, BLOCK_C: tl.constexpr, MERGE_R: tl.constexpr):
    """Columns c of the tables partials_ptr[0 .. splits-1] merged in split order, MERGE_R tables a
    step. Run by the last program of a column tile: it reads the other programs' writes from L2."""
    n = tl.full([BLOCK_C], 0, tl.float64)
    mean = tl.full([BLOCK_C], 0, tl.float64)
    m2 = tl.full([BLOCK_C], 0, tl.float64)
    nonfinite = tl.full([BLOCK_C], 0, tl.float64)
    lo = tl.full([BLOCK_C], _INF, tl.float64)
    hi = tl.full([BLOCK_C], -_INF, tl.float64)
    for s0 in range(0, splits, MERGE_R):
        s = s0 + tl.arange(0, MERGE_R)
        ok = (s < splits)[:, None] & col_ok[None, :]
        table = partials_ptr + s[:, None].to(tl.int64) * (_TABLE_ROWS * cols) + c[None, :]
        # .cg: from L2, where the other programs' writes are (not a stale L1 line).
        p_n = tl.load(table + _COUNT * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_mean = tl.load(table + _MEAN * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_m2 = tl.load(table + _M2 * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_nonfinite = tl.load(table + _NONFINITE * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_lo = tl.load(table + _MIN * cols, mask=ok, other=_INF, cache_modifier=".cg")
        p_hi = tl.load(table + _MAX * cols, mask=ok, other=-_INF, cache_modifier=".cg")
        # MERGE_R tables at once: n = sum n_s, mean = shift + sum n_s (mean_s - shift) / n,
        # M2 = sum M2_s + sum n_s (mean_s - mean)^2 (the pairwise merge applied to all of them).
        # The shift, the smallest mean of a non-empty table, makes equal means merge exactly.
        chunk_n = tl.sum(p_n, 0)
        shift = tl.where(chunk_n > 0, tl.min(tl.where(p_n > 0, p_mean, _INF), 0), 0.0)
        chunk_mean = shift + tl.sum(p_n * (p_mean - shift[None, :]), 0) / tl.maximum(chunk_n, 1.0)
        dev = p_mean - chunk_mean[None, :]
        chunk_m2 = tl.sum(p_m2 + p_n * dev * dev, 0)  # p_n * dev first: 0 for an empty table
        n, mean, m2 = chan_merge(n, mean, m2, chunk_n, chunk_mean, chunk_m2)
        nonfinite += tl.sum(p_nonfinite, 0)
        lo = tl.minimum(lo, tl.min(p_lo, 0))
        hi = tl.maximum(hi, tl.max(p_hi, 0))
    return n, mean, m2, nonfinite, lo, hi


@triton.jit
def chan_merge(n, mean, m2, n_b, mean_b, m2_b):
    """Count, mean and M2 of the union of two sets, operation for operation as merge_moments of
    running_norm_math.h (Chan et al. 1979): mean = mean_a + d w_b, M2 = M2_a + M2_b + d n_a w_b d,
    w_b = n_b / max(n, 1), d = mean_b - mean_a; merging an empty set changes nothing."""
    total = n + n_b
    w_b = n_b / tl.maximum(total, 1.0)
    d = mean_b - mean
    return total, mean + d * w_b, m2 + m2_b + d * n * w_b * d


@triton.jit
def shifted_moments(count, shift, s1, s2):
    """Count, mean and M2 in float64 of a set given its count and its sums S1 = sum d, S2 = sum d^2
    of d = x - shift, as moments_from_shifted_sums of running_norm_math.h (the corrected two-pass
    algorithm, Chan, Golub & LeVeque 1983): mean = shift + S1/n, M2 = S2 - S1^2/n, which rounding
    can take below 0 (clamped to 0; NaN and inf stay)."""
    n = count.to(tl.float64)
    inv_n = 1.0 / tl.maximum(n, 1.0)
    m2 = s2 - s1 * s1 * inv_n
    return n, shift.to(tl.float64) + s1 * inv_n, tl.where(m2 < 0.0, 0.0, m2)


@triton.jit
def merge_column_parts(parts_ptr, c, col_ok, cols, num_parts):
    """Columns c of num_parts >= 1 tables at parts_ptr merged in part order starting from part 0,
    as merge_column_parts of running_norm_math.h, so that every process merging the same tables
    gets the same bits."""
    n = tl.load(parts_ptr + _COUNT * cols + c, mask=col_ok, other=0.0)
    mean = tl.load(parts_ptr + _MEAN * cols + c, mask=col_ok, other=0.0)
    m2 = tl.load(parts_ptr + _M2 * cols + c, mask=col_ok, other=0.0)
    nonfinite = tl.load(parts_ptr + _NONFINITE * cols + c, mask=col_ok, other=0.0)
    lo = tl.load(parts_ptr + _MIN * cols + c, mask=col_ok, other=_INF)
    hi = tl.load(parts_ptr + _MAX * cols + c, mask=col_ok, other=-_INF)
    table = parts_ptr + c
    for _ in range(1, num_parts):
        table += _TABLE_ROWS * cols  # a 64-bit pointer: no index overflow however many parts
        n, mean, m2 = chan_merge(n, mean, m2, tl.load(table + _COUNT * cols, mask=col_ok, other=0.0),
                                 tl.load(table + _MEAN * cols, mask=col_ok, other=0.0),
                                 tl.load(table + _M2 * cols, mask=col_ok, other=0.0))
        nonfinite += tl.load(table + _NONFINITE * cols, mask=col_ok, other=0.0)
        lo = tl.minimum(lo, tl.load(table + _MIN * cols, mask=col_ok, other=_INF))
        hi = tl.maximum(hi, tl.load(table + _MAX * cols, mask=col_ok, other=-_INF))
    return n, mean, m2, nonfinite, lo, hi
