"""Triton kernels of fastnorm's running normalization (the contract in fastnorm/reference.py).

x is viewed as (rows, cols) with unit column stride. Two kernels run one after the other:

- `_reduce_kernel`, grid (column tiles, row splits): each program reduces its rows of one column
  tile in steps of BLOCK_R rows (per-step moments by the corrected two-pass algorithm, merged in
  float64 by Chan's formula), writes its partial moments, and takes a ticket from the tile's
  arrival counter. The last program to arrive merges the partials in split order (so results do
  not depend on timing), updates the float64 running statistics, writes the diagnostics and
  resets the counter to 0 for the next call (CUDA-graph replays see it zeroed).
- `_normalize_kernel`, same grid with the splits in reverse order (the last rows the reduce pass
  read are still in L2): y = clamp((x - mean) / bounded std) and, when asked, the clipped counts
  and max |z| per column, added to the diagnostics with atomics.

The arithmetic mirrors csrc/running_norm_math.h. Scalars (eps, bounds, momentum, sizes) are
runtime arguments, the floats in float64; only the block sizes, the accumulator type and the
presence of a mask or an output are compile-time constants. `choose_blocks` derives the blocks from the shape; there is
no autotuning.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import triton
import triton.language as tl

# Rows of the per-split partials: (splits, PARTIAL_ROWS, cols) float64.
PARTIAL_ROWS = 4
_PARTIAL_ROWS = tl.constexpr(PARTIAL_ROWS)
_P_COUNT = tl.constexpr(0)
_P_MEAN = tl.constexpr(1)
_P_M2 = tl.constexpr(2)
_P_NONFINITE = tl.constexpr(3)
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
    mean_ptr, var_ptr, count_ptr, diag_ptr, partials_ptr, arrivals_ptr,
    rows, cols, rows_per_split,
    min_weight: tl.float64, max_count: tl.float64,
    HAS_MASK: tl.constexpr, WITH_OUTPUT: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, MERGE_R: tl.constexpr,
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
        step_n64 = step_n.to(tl.float64)
        inv_n = 1.0 / tl.maximum(step_n64, 1.0)
        step_mean = shift.to(tl.float64) + s1 * inv_n
        step_m2 = s2 - s1 * s1 * inv_n
        step_m2 = tl.where(step_m2 < 0.0, 0.0, step_m2)  # rounding can go below 0; NaN/inf stay
        # Chan, Golub & LeVeque 1979 merge of the step into the program's moments:
        # mean += d n_b/n, M2 += M2_b + d^2 n_a n_b/n with d = mean_b - mean_a (merge_moments; the
        # product ordered so that an empty side gives 0, not inf * 0). Written out rather than
        # called: the interpreter is slow at device-function calls (tl.sum is one).
        total = n + step_n64
        w = step_n64 / tl.maximum(total, 1.0)
        delta = step_mean - mean
        mean += delta * w
        m2 += step_m2 + delta * n * w * delta
        n = total

    nonfinite_n = tl.sum(nonfinite, 0).to(tl.float64)
    weight_floor = tl.full([], min_weight, tl.float64)
    count_cap = tl.full([], max_count, tl.float64)
    if splits == 1:
        _update(c, col_ok, cols, n, mean, m2, nonfinite_n, mean_ptr, var_ptr, count_ptr, diag_ptr, weight_floor,
                count_cap, WITH_OUTPUT, BLOCK_C)
    else:
        partial = partials_ptr + split.to(tl.int64) * (_PARTIAL_ROWS * cols) + c
        tl.store(partial + _P_COUNT * cols, n, mask=col_ok)
        tl.store(partial + _P_MEAN * cols, mean, mask=col_ok)
        tl.store(partial + _P_M2 * cols, m2, mask=col_ok)
        tl.store(partial + _P_NONFINITE * cols, nonfinite_n, mask=col_ok)
        # Every thread's partials are written before the ticket is taken (release at GPU scope).
        tl.debug_barrier()
        ticket = tl.atomic_add(arrivals_ptr + col_tile, 1, sem="acq_rel", scope="gpu")
        if ticket == splits - 1:
            n, mean, m2, nonfinite_n = _merge_partials(c, col_ok, cols, splits, partials_ptr, BLOCK_C, MERGE_R)
            _update(c, col_ok, cols, n, mean, m2, nonfinite_n, mean_ptr, var_ptr, count_ptr, diag_ptr, weight_floor,
                    count_cap, WITH_OUTPUT, BLOCK_C)
            tl.store(arrivals_ptr + col_tile, 0)


@triton.jit
def _merge_partials(c, col_ok, cols, splits, partials_ptr, BLOCK_C: tl.constexpr, MERGE_R: tl.constexpr):
    """Run by the last program of a column tile: the moments and non-finite counts of all splits'
    partials, merged in split order."""
    n = tl.full([BLOCK_C], 0, tl.float64)
    mean = tl.full([BLOCK_C], 0, tl.float64)
    m2 = tl.full([BLOCK_C], 0, tl.float64)
    nonfinite = tl.full([BLOCK_C], 0, tl.float64)
    for s0 in range(0, splits, MERGE_R):
        s = s0 + tl.arange(0, MERGE_R)
        ok = (s < splits)[:, None] & col_ok[None, :]
        partial = partials_ptr + s[:, None].to(tl.int64) * (_PARTIAL_ROWS * cols) + c[None, :]
        # .cg: read from L2, where the other programs' writes are (not a stale L1 line).
        p_n = tl.load(partial + _P_COUNT * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_mean = tl.load(partial + _P_MEAN * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_m2 = tl.load(partial + _P_M2 * cols, mask=ok, other=0.0, cache_modifier=".cg")
        p_nonfinite = tl.load(partial + _P_NONFINITE * cols, mask=ok, other=0.0, cache_modifier=".cg")
        # MERGE_R partials at once: n = sum n_s, mean = sum n_s mean_s / n,
        # M2 = sum M2_s + sum n_s (mean_s - mean)^2 (the pairwise merge applied to all of them).
        chunk_n = tl.sum(p_n, 0)
        chunk_mean = tl.sum(p_n * p_mean, 0) / tl.maximum(chunk_n, 1.0)
        dev = p_mean - chunk_mean[None, :]
        chunk_m2 = tl.sum(p_m2 + p_n * dev * dev, 0)  # p_n * dev first: 0 for an empty partial
        # Chan's merge of the chunk into the moments so far, as in the reduce loop.
        total = n + chunk_n
        w = chunk_n / tl.maximum(total, 1.0)
        delta = chunk_mean - mean
        mean += delta * w
        m2 += chunk_m2 + delta * n * w * delta
        n = total
        nonfinite += tl.sum(p_nonfinite, 0)
    return n, mean, m2, nonfinite


@triton.jit
def _update(c, col_ok, cols, n, mean, m2, nonfinite, mean_ptr, var_ptr, count_ptr, diag_ptr, min_weight, max_count,
            WITH_OUTPUT: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merges a column tile's batch moments into the running statistics (update_running_stats of
    running_norm_math.h) and writes its diagnostics."""
    # w = max(min_weight, n_b / (min(count, max_count) + n_b)); mean' = mean + w d;
    # var' = (1 - w) var + w v_b + w (1 - w) d^2; columns without samples, or whose result would
    # not be finite, keep their statistics.
    old_mean = tl.load(mean_ptr + c, mask=col_ok, other=0.0)
    old_var = tl.load(var_ptr + c, mask=col_ok, other=1.0)
    old_count = tl.load(count_ptr + c, mask=col_ok, other=0.0)
    batch_var = m2 / tl.maximum(n, 1.0)
    n_eff = tl.minimum(old_count, max_count)
    w = tl.maximum(min_weight, n / tl.where(n > 0, n_eff + n, 1.0))
    d = mean - old_mean
    new_mean = old_mean + w * d
    new_var = (1.0 - w) * old_var + w * batch_var + (w * (1.0 - w) * d) * d  # 0, not 0 * inf, at w = 1
    keep = (n > 0) & (tl.abs(new_mean) < _INF) & (tl.abs(new_var) < _INF)
    tl.store(mean_ptr + c, tl.where(keep, new_mean, old_mean), mask=col_ok)
    tl.store(var_ptr + c, tl.where(keep, new_var, old_var), mask=col_ok)
    tl.store(count_ptr + c, tl.where(keep, old_count + n, old_count), mask=col_ok)

    tl.store(diag_ptr + _D_COUNT * cols + c, n, mask=col_ok)
    tl.store(diag_ptr + _D_MEAN * cols + c, mean, mask=col_ok)
    tl.store(diag_ptr + _D_VAR * cols + c, batch_var, mask=col_ok)
    tl.store(diag_ptr + _D_NONFINITE * cols + c, nonfinite, mask=col_ok)
    # The normalize pass accumulates the clip diagnostics from 0; without it they are NaN.
    if WITH_OUTPUT:
        start = tl.full([BLOCK_C], 0, tl.float64)
    else:
        # NaN, as inf - inf: Triton checks that a global keeps its value between compilations,
        # which a NaN global fails (NaN != NaN).
        start = tl.full([BLOCK_C], _INF - _INF, tl.float64)
    tl.store(diag_ptr + _D_CLIPPED * cols + c, start, mask=col_ok)
    tl.store(diag_ptr + _D_MAX_ABS_Z * cols + c, start, mask=col_ok)


@triton.jit
def _normalize_kernel(
    x_ptr, x_row_stride, out_ptr, out_row_stride, mask_ptr, mask_cols, mask_group,
    mean_ptr, var_ptr, diag_ptr, rows, cols, rows_per_split,
    eps: tl.float64, min_std: tl.float64, max_std: tl.float64, clip: tl.float64,
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
    std = tl.sqrt(var + tl.full([], eps, tl.float64))
    std = tl.minimum(tl.maximum(std, tl.full([], min_std, tl.float64)), tl.full([], max_std, tl.float64))
    scale = (1.0 / std).to(ACC)
    mean_hi = mean.to(ACC)
    mean_lo = (mean - mean_hi.to(tl.float64)).to(ACC)
    hi = tl.full([], clip, tl.float64).to(ACC)

    clipped = tl.full([BLOCK_R, BLOCK_C], 0, tl.int32)
    max_abs_z = tl.full([BLOCK_R, BLOCK_C], 0, ACC)
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
            abs_z = tl.where(valid, tl.abs(z), 0.0)
            clipped += (abs_z > hi).to(tl.int32)
            max_abs_z = tl.maximum(max_abs_z, abs_z)

    if WITH_DIAG:
        # Integer counts add exactly in float64, and a max does not depend on the order, so the
        # atomics keep the results deterministic. |z| >= 0 orders like its int64 bits.
        clipped_n = tl.sum(clipped, 0).to(tl.float64)
        tl.atomic_add(diag_ptr + _D_CLIPPED * cols + c, clipped_n, mask=col_ok, sem="relaxed")
        z_bits = tl.max(max_abs_z, 0).to(tl.float64).to(tl.int64, bitcast=True)
        max_ptr = (diag_ptr + _D_MAX_ABS_Z * cols).to(tl.pointer_type(tl.int64), bitcast=True)
        tl.atomic_max(max_ptr + c, z_bits, mask=col_ok, sem="relaxed")


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
    rows a program (a multiple of BLOCK_R), and `merge` partials a step of the last program's merge."""

    rows: int
    cols: int
    rows_per_split: int
    merge: int
    num_warps: int = 4

    def grid(self, rows: int, cols: int) -> tuple[int, int]:
        return triton.cdiv(cols, self.cols), max(1, triton.cdiv(rows, self.rows_per_split))


# A program steps over STEP_ELEMS elements of x at a time (16 a thread with 4 warps) made of
# 256-byte row segments (two 128-byte lines); a split covers at least 512 bytes of each of its
# columns, so the partials (32 bytes per column and split) stay under ~6% of x; the last program
# of a column tile merges MERGE_ELEMS partial values per step, in at most MAX_MERGE_STEPS steps.
STEP_ELEMS = 2048
ROW_BYTES = 256
MIN_SPLIT_BYTES = 512
MERGE_ELEMS = 512
MAX_MERGE_STEPS = 8


def choose_blocks(rows: int, cols: int, element_size: int, programs: int, step_elems: int = STEP_ELEMS,
                  row_bytes: int = ROW_BYTES) -> Blocks:
    """Blocks for x of (rows, cols) elements of element_size bytes, aiming at about `programs`
    programs (a few per SM on a GPU) while keeping every program's work and the merge bounded; a
    loop step takes at most step_elems elements in row segments of at most row_bytes."""
    block_c = min(triton.next_power_of_2(max(cols, 1)), max(1, row_bytes // element_size))
    block_r = min(triton.next_power_of_2(max(rows, 1)), max(1, step_elems // block_c))
    col_tiles = triton.cdiv(cols, block_c)
    merge = max(1, MERGE_ELEMS // block_c)
    max_splits = min(triton.cdiv(rows, max(block_r, MIN_SPLIT_BYTES // element_size)), merge * MAX_MERGE_STEPS)
    splits = max(1, min(triton.cdiv(programs, col_tiles), max_splits))
    steps_per_split = triton.cdiv(triton.cdiv(rows, block_r), splits)
    return Blocks(rows=block_r, cols=block_c, rows_per_split=max(1, steps_per_split) * block_r, merge=merge)


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _optional(value: Optional[float], default: float) -> float:
    return default if value is None else float(value)


def launch_running_norm(
    x_rows: torch.Tensor, mask_rows: Optional[torch.Tensor], mean: torch.Tensor, var: torch.Tensor,
    count: torch.Tensor, out_rows: Optional[torch.Tensor], diag: torch.Tensor, arrivals: torch.Tensor,
    *, momentum: Optional[float], max_count: Optional[float], eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float], blocks: Blocks,
) -> None:
    """Reduces x_rows (rows, cols), merges it into mean/var/count (float64, cols elements), fills
    diag (6, cols) and, when out_rows is given, writes y into it. mask_rows: (rows, mask_cols)
    uint8 or None. arrivals: int32 zeros, at least one per column tile; left zeroed."""
    rows, cols = x_rows.shape
    grid = blocks.grid(rows, cols)
    partials = torch.empty((grid[1], PARTIAL_ROWS, cols), dtype=torch.float64, device=x_rows.device)
    mask_cols = mask_rows.shape[1] if mask_rows is not None else 1
    common = dict(HAS_MASK=mask_rows is not None, ACC=_acc_type(x_rows.dtype), BLOCK_R=blocks.rows,
                  BLOCK_C=blocks.cols, num_warps=blocks.num_warps)
    wrap_triton(_reduce_kernel)[grid](
        x_rows, x_rows.stride(0), mask_rows, mask_cols, cols // mask_cols,
        mean, var, count, diag, partials, arrivals,
        rows, cols, blocks.rows_per_split,
        1.0 - momentum if momentum is not None else 0.0, _optional(max_count, math.inf),
        WITH_OUTPUT=out_rows is not None, MERGE_R=blocks.merge, **common,
    )
    if out_rows is not None:
        _launch_normalize(x_rows, out_rows, mask_rows, mean, var, diag, eps=eps, min_std=min_std, max_std=max_std,
                          clip=clip, blocks=blocks, with_diag=True)


def launch_normalize(
    x_rows: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, out_rows: torch.Tensor, *, eps: float,
    min_std: Optional[float], max_std: Optional[float], clip: Optional[float], blocks: Blocks,
) -> None:
    """y = clamp((x - mean) / clamp(sqrt(var + eps), min_std, max_std), -clip, clip) into out_rows."""
    _launch_normalize(x_rows, out_rows, None, mean, var, None, eps=eps, min_std=min_std, max_std=max_std,
                      clip=clip, blocks=blocks, with_diag=False)


def _launch_normalize(x_rows, out_rows, mask_rows, mean, var, diag, *, eps, min_std, max_std, clip, blocks, with_diag):
    rows, cols = x_rows.shape
    mask_cols = mask_rows.shape[1] if mask_rows is not None else 1
    wrap_triton(_normalize_kernel)[blocks.grid(rows, cols)](
        x_rows, x_rows.stride(0), out_rows, out_rows.stride(0), mask_rows, mask_cols, cols // mask_cols,
        mean, var, diag, rows, cols, blocks.rows_per_split,
        float(eps), _optional(min_std, 0.0), _optional(max_std, math.inf), _optional(clip, math.inf),
        HAS_MASK=mask_rows is not None, WITH_DIAG=with_diag, ACC=_acc_type(x_rows.dtype), BLOCK_R=blocks.rows,
        BLOCK_C=blocks.cols, num_warps=blocks.num_warps,
    )
