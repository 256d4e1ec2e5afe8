"""The Triton ops fastnorm::running_norm_triton and fastnorm::normalize_triton.

They take the arguments of fastnorm::running_norm and fastnorm::normalize (csrc/ops.cpp), plus, for
running_norm_triton, `arrivals`: the int32 arrival counters of the split-rows merge, zero before
the call and left zero after it. On a GPU they are `torch.library.triton_op`s, so torch.compile
traces through them to the Triton kernels; under TRITON_INTERPRET=1 they are opaque custom ops
that run the interpreted kernels directly (a traced graph cannot call them).

Importing this module requires triton.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
from torch import Tensor

from fastnorm._checks import FLOAT_DTYPES
from fastnorm.triton_kernels.running_norm import (INTERPRETED, Blocks, choose_blocks, launch_normalize,
                                                  launch_running_norm)

# The interpreter runs the programs one after another and pays per operation rather than per
# element: few programs with large steps.
INTERPRETER_PROGRAMS = 2
INTERPRETER_STEPS = dict(step_elems=1 << 16, row_bytes=4096)


def blocks_for(x: Tensor, stats_numel: int) -> Blocks:
    """The blocks the ops use for x with statistics of stats_numel elements: about 4 programs per
    SM on a GPU."""
    cols = stats_numel
    rows = x.numel() // cols if cols > 0 else 0
    if x.device.type != "cuda":
        return choose_blocks(rows, cols, x.element_size(), INTERPRETER_PROGRAMS, **INTERPRETER_STEPS)
    return choose_blocks(rows, cols, x.element_size(), 4 * _sm_count(x.device.index))


def column_tiles(x: Tensor, stats_numel: int) -> int:
    """How many arrival counters running_norm_triton needs for x (from static facts only: no
    device query, so that torch.compile folds it)."""
    steps = INTERPRETER_STEPS if x.device.type != "cuda" else {}
    return choose_blocks(1, stats_numel, x.element_size(), 1, **steps).grid(1, stats_numel)[0]


@functools.lru_cache(maxsize=None)
def _sm_count(index: Optional[int]) -> int:
    device = index if index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(device).multi_processor_count


def _define(name: str, mutates_args: tuple[str, ...]):
    if INTERPRETED:
        def register(fn):
            op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
            op.register_fake(lambda *args, **kwargs: None)  # it only mutates its arguments
            return op
        return register
    return torch.library.triton_op(name, mutates_args=mutates_args)


def _check_statistic(x: Tensor, stat: Tensor, mean: Tensor, name: str) -> None:
    if stat.dtype != torch.float64 or not stat.is_contiguous() or stat.device != x.device or stat.shape != mean.shape:
        raise ValueError(f"fastnorm: {name} must be a contiguous float64 tensor of mean's shape {tuple(mean.shape)} "
                         f"on {x.device}, got {stat.dtype} of shape {tuple(stat.shape)} on {stat.device}")


def _check_x(x: Tensor, mean: Tensor, var: Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastnorm: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    _check_statistic(x, mean, mean, "mean")
    _check_statistic(x, var, mean, "var")
    k = mean.dim()
    if x.dim() < k or x.shape[x.dim() - k:] != mean.shape:
        raise ValueError(f"fastnorm: x must have shape (*batch, {', '.join(map(str, mean.shape))}), "
                         f"got {tuple(x.shape)}")


def _check_out(x: Tensor, out: Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"fastnorm: out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
                         f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")


def _rows_view(t: Tensor, rows: int, cols: int) -> Optional[Tensor]:
    """t as (rows, cols) with unit column stride without copying, or None where its layout does not allow it."""
    try:
        view = t.view(rows, cols)
    except RuntimeError:
        return None
    return view if cols <= 1 or view.stride(1) == 1 else None


def _readable_rows(x: Tensor, rows: int, cols: int) -> Tensor:
    view = _rows_view(x, rows, cols)
    return view if view is not None else x.contiguous().view(rows, cols)


@_define("fastnorm::running_norm_triton", ("mean", "var", "count", "out", "diag", "arrivals"))
def running_norm_triton(
    x: Tensor, mask: Optional[Tensor], mean: Tensor, var: Tensor, count: Tensor, out: Optional[Tensor],
    diag: Tensor, arrivals: Tensor, momentum: Optional[float], max_count: Optional[float], eps: float,
    min_std: Optional[float], max_std: Optional[float], clip: Optional[float],
) -> None:
    """fastnorm::running_norm on the Triton kernels (see the module docstring for `arrivals`)."""
    _check_x(x, mean, var)
    _check_statistic(x, count, mean, "count")
    cols = mean.numel()
    rows = x.numel() // cols if cols > 0 else 0
    if diag.dtype != torch.float64 or not diag.is_contiguous() or diag.shape != (6, cols) or diag.device != x.device:
        raise ValueError(f"fastnorm: diag must be a contiguous float64 tensor of shape (6, {cols}) on {x.device}, "
                         f"got {diag.dtype} of shape {tuple(diag.shape)} on {diag.device}")
    if out is not None:
        _check_out(x, out)
    if mask is not None and (mask.dtype != torch.bool or mask.device != x.device
                             or mask.dim() < x.dim() - mean.dim() or mask.shape != x.shape[:mask.dim()]):
        raise ValueError(f"fastnorm: mask must be a bool tensor on {x.device} whose shape is a prefix of x's "
                         f"{tuple(x.shape)} covering the batch dims, got {mask.dtype} {tuple(mask.shape)}")
    blocks = blocks_for(x, cols)
    tiles = blocks.grid(rows, cols)[0]
    if arrivals.dtype != torch.int32 or arrivals.device != x.device or arrivals.numel() < tiles:
        raise ValueError(f"fastnorm: arrivals must be int32 zeros on {x.device} with at least {tiles} elements, "
                         f"got {arrivals.dtype} with {arrivals.numel()} on {arrivals.device}")
    if rows == 0 or cols == 0:
        diag.zero_()
        if out is None:
            diag[4:].fill_(math.nan)
        return
    mask_rows = mask.reshape(rows, -1).contiguous().view(torch.uint8) if mask is not None else None
    out_rows = _rows_view(out, rows, cols) if out is not None else None
    scratch = out is not None and out_rows is None
    if scratch:
        out_rows = torch.empty((rows, cols), dtype=out.dtype, device=out.device)
    launch_running_norm(_readable_rows(x, rows, cols), mask_rows, mean, var, count, out_rows, diag, arrivals,
                        momentum=momentum, max_count=max_count, eps=eps, min_std=min_std, max_std=max_std, clip=clip,
                        blocks=blocks)
    if scratch:
        out.copy_(out_rows.view(out.shape))


@_define("fastnorm::normalize_triton", ("out",))
def normalize_triton(
    x: Tensor, mean: Tensor, var: Tensor, out: Tensor, eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float],
) -> None:
    """fastnorm::normalize on the Triton kernels."""
    _check_x(x, mean, var)
    _check_out(x, out)
    cols = mean.numel()
    rows = x.numel() // cols if cols > 0 else 0
    if rows == 0 or cols == 0:
        return
    out_rows = _rows_view(out, rows, cols)
    scratch = out_rows is None
    if scratch:
        out_rows = torch.empty((rows, cols), dtype=out.dtype, device=out.device)
    launch_normalize(_readable_rows(x, rows, cols), mean, var, out_rows, eps=eps, min_std=min_std, max_std=max_std,
                     clip=clip, blocks=blocks_for(x, cols))
    if scratch:
        out.copy_(out_rows.view(out.shape))
