"""The Triton ops: fastnorm::running_norm_triton, ::normalize_triton, ::batch_moments_triton,
::merge_normalize_triton, ::normalize_advantages_triton, ::advantage_moments_triton and
::normalize_advantages_from_triton.

Each takes the arguments of the fastnorm op of the same name without the suffix (csrc/ops.cpp), with
no defaults from the first mutated optional one on (torch 2.11 fails on a mutated argument left at
its default, pytorch issue #176078; the backend passes every argument), and
checks them as the C++ bindings do (csrc/running_norm_args.cpp, csrc/advantages_args.cpp), from
static facts only. On a GPU they are `torch.library.triton_op`s, so torch.compile traces through
them to the Triton kernels; under TRITON_INTERPRET=1 they are opaque custom ops that run the
interpreted kernels directly (a traced graph cannot call them). Scratch (the split-rows tables) is
allocated per call, uninitialized, on the caller's stream; the kernels write the diagnostics and
count the steps, so an updating call dispatches no torch op but allocations, views and its Triton
launches. IMPLEMENTATIONS holds the Python function behind each op (the tests trace what it
dispatches); in plain eager code the backend calls it directly (`calls_directly`), since the
dispatcher's custom-op machinery costs more host time than the kernels' launches, and each launch
is raw unless torch traces (triton_kernels/launcher.py).

Importing this module requires triton.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from fastnorm._checks import FLOAT_DTYPES, check_out_overlap
from fastnorm.triton_kernels.advantages import (ADVANTAGE_MOMENT_ROWS, choose_advantage_blocks,
                                                launch_advantage_moments, launch_normalize_advantages,
                                                launch_normalize_advantages_from)
from fastnorm.triton_kernels.moments import TABLE_ROWS
from fastnorm.triton_kernels.running_norm import (INTERPRETED, Blocks, choose_blocks, launch_batch_moments,
                                                  launch_merge_normalize, launch_normalize, launch_running_norm)

# The interpreter runs the programs one after another and pays per operation rather than per
# element: few programs with large steps. numpy sums the rows of a step one after another (a GPU
# sums them as a tree), so at most 128 rows a step keep its float32 sums within the tolerances.
INTERPRETER_PROGRAMS = 2
INTERPRETER_STEPS = dict(step_elems=1 << 16, row_bytes=4096, step_rows=128)
DIAG_ROWS = 6
ADVANTAGE_STAT_ROWS = 4


def _programs(x: Tensor) -> int:
    """How many programs a kernel over x aims at: about 4 per SM on a GPU."""
    return 4 * _sm_count(x.device.index) if x.device.type == "cuda" else INTERPRETER_PROGRAMS


def _steps(x: Tensor) -> dict:
    return INTERPRETER_STEPS if x.device.type != "cuda" else {}


def blocks_for(x: Tensor, stats_numel: int) -> Blocks:
    """The blocks the running-norm ops use for x with statistics of stats_numel elements."""
    rows = x.numel() // stats_numel if stats_numel > 0 else 0
    return _blocks(rows, stats_numel, x.element_size(), _programs(x), tuple(_steps(x).items()))


@functools.lru_cache(maxsize=4096)
def _blocks(rows: int, cols: int, element_size: int, programs: int, steps: tuple) -> Blocks:
    return choose_blocks(rows, cols, element_size, programs, **dict(steps))  # the same few shapes call after call


@functools.lru_cache(maxsize=None)
def _sm_count(index: Optional[int]) -> int:
    device = index if index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(device).multi_processor_count


IMPLEMENTATIONS: dict[str, Callable] = {}


def calls_directly(x: Tensor) -> bool:
    """Whether a call on x may skip the op and run its Python function: x a plain tensor, in eager
    code (not compiling, tracing, exporting, under a dispatch mode or a functorch transform), where
    the op would only run that function. Elsewhere the op is called, so that torch sees it."""
    return (not torch.compiler.is_compiling() and type(x) is Tensor and torch._C._len_torch_dispatch_stack() == 0
            and torch._C._get_tracing_state() is None and not torch._C._are_functorch_transforms_active())


def _define(name: str, mutates_args: tuple[str, ...]):
    def register(fn):
        # torch 2.11 cannot call a custom op whose mutated argument has a default and is left at it
        # (pytorch issue #176078: an IndexError in its ADInplaceOrView kernel).
        parameters = inspect.signature(fn).parameters
        defaulted = [p for p in mutates_args if parameters[p].default is not inspect.Parameter.empty]
        assert not defaulted, f"{name}: mutated arguments must not have defaults, got {defaulted}"
        IMPLEMENTATIONS[name] = fn
        if not INTERPRETED:
            return torch.library.triton_op(name, mutates_args=mutates_args)(fn)
        op = torch.library.custom_op(name, mutates_args=mutates_args)(fn)
        op.register_fake(lambda *args, **kwargs: None)  # it only mutates its arguments
        return op
    return register


# ---------------------------------------------------------------- argument checks


def _check_float64(x: Tensor, t: Tensor, name: str, shape: tuple, shape_text: str) -> None:
    if t.dtype != torch.float64 or not t.is_contiguous() or t.device != x.device or tuple(t.shape) != shape:
        raise ValueError(f"fastnorm: {name} must be a contiguous float64 tensor of shape {shape_text} on {x.device}, "
                         f"got {t.dtype} of shape {tuple(t.shape)} on {t.device}")


def _check_x(x: Tensor, shape: tuple) -> tuple[int, int]:
    """x: (*batch, *shape) of a supported float dtype; returns (rows, cols)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastnorm: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    k = len(shape)
    if x.dim() < k or tuple(x.shape[x.dim() - k:]) != shape:
        raise ValueError(f"fastnorm: x must have shape (*batch, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    cols = math.prod(shape)
    return (x.numel() // cols if cols > 0 else 0), cols


def _check_statistics(x: Tensor, mean: Tensor, *others: tuple[Tensor, str]) -> tuple[int, int]:
    shape = tuple(mean.shape)
    for t, name in ((mean, "mean"),) + others:
        _check_float64(x, t, name, shape, f"{shape} (mean's)")
    return _check_x(x, shape)


def _check_scale(x: Tensor, mean: Tensor, scale: Optional[Tensor], min_std_rel: Optional[float]) -> None:
    """check_scale_args: scale float64 of mean's shape; min_std_rel finite >= 0, only with a scale."""
    if min_std_rel is not None and not (math.isfinite(min_std_rel) and min_std_rel >= 0):
        raise ValueError(f"fastnorm: min_std_rel must be finite and >= 0, got {min_std_rel}")
    if min_std_rel is not None and scale is None:
        raise ValueError("fastnorm: min_std_rel needs the long-run scale, got scale=None")
    if scale is not None:
        _check_float64(x, scale, "scale", tuple(mean.shape), f"{tuple(mean.shape)} (mean's)")


def _check_mask(x: Tensor, mask: Optional[Tensor], batch_dims: int) -> None:
    if mask is not None and (mask.dtype != torch.bool or mask.device != x.device or not
                             batch_dims <= mask.dim() <= x.dim() or mask.shape != x.shape[:mask.dim()]):
        raise ValueError(f"fastnorm: mask must be a bool tensor on {x.device} whose shape is a prefix of x's "
                         f"{tuple(x.shape)} covering the {batch_dims} batch dims, got {mask.dtype} "
                         f"{tuple(mask.shape)} on {mask.device}")


def _check_steps(x: Tensor, steps: Optional[Tensor]) -> None:
    """check_steps_arg: the update counter, when given, is a 0-dim int64 tensor on x's device."""
    if steps is not None and (steps.dtype != torch.int64 or steps.dim() != 0 or steps.device != x.device):
        raise ValueError(f"fastnorm: steps must be a 0-dim int64 tensor on {x.device}, got {steps.dtype} of shape "
                         f"{tuple(steps.shape)} on {steps.device}")


def _check_out(x: Tensor, out: Tensor) -> None:
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(f"fastnorm: out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
                         f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")
    check_out_overlap(out, x)


def _check_bounds(eps: float, min_std: Optional[float], max_std: Optional[float], clip: Optional[float]) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"fastnorm: eps must be finite and >= 0, got {eps}")
    if min_std is not None and not (math.isfinite(min_std) and min_std >= 0):
        raise ValueError(f"fastnorm: min_std must be >= 0, got {min_std}")
    if max_std is not None and not max_std > 0:
        raise ValueError(f"fastnorm: max_std must be > 0, got {max_std}")
    if min_std is not None and max_std is not None and min_std > max_std:
        raise ValueError(f"fastnorm: min_std ({min_std}) must not exceed max_std ({max_std})")
    if clip is not None and not clip > 0:
        raise ValueError(f"fastnorm: clip must be > 0, got {clip}")


def _check_update(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip, scale,
                  min_std_rel, steps) -> tuple[int, int]:
    """The checks of running_norm and merge_normalize (check_running_norm_args, check_scale_args,
    check_steps_arg); returns (rows, cols)."""
    rows, cols = _check_statistics(x, mean, (var, "var"), (count, "count"))
    _check_float64(x, diag, "diag", (DIAG_ROWS, cols), f"({DIAG_ROWS}, {cols})")
    if momentum is not None and not 0 <= momentum <= 1:
        raise ValueError(f"fastnorm: momentum must be in [0, 1], got {momentum}")
    if max_count is not None and not max_count > 0:
        raise ValueError(f"fastnorm: max_count must be > 0, got {max_count}")
    _check_bounds(eps, min_std, max_std, clip)
    if out is not None:
        _check_out(x, out)
    _check_mask(x, mask, x.dim() - mean.dim())
    _check_scale(x, mean, scale, min_std_rel)
    _check_steps(x, steps)
    return rows, cols


# ---------------------------------------------------------------- layouts


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


def _mask_rows(mask: Optional[Tensor], rows: int) -> Optional[Tensor]:
    """The mask as contiguous (rows, mask_cols) uint8; None without a mask or without rows."""
    if mask is None or rows == 0:
        return None
    return mask.contiguous().view(rows, -1).view(torch.uint8)  # views only, for a contiguous mask


def _writable_rows(out: Tensor, rows: int, cols: int) -> tuple[Tensor, bool]:
    """out as (rows, cols) with unit column stride: a view, or a scratch to copy back (True)."""
    view = _rows_view(out, rows, cols)
    if view is not None:
        return view, False
    return torch.empty((rows, cols), dtype=out.dtype, device=out.device), True


# ---------------------------------------------------------------- the running-norm ops


@_define("fastnorm::running_norm_triton", ("mean", "var", "count", "out", "diag", "scale", "steps"))
def running_norm_triton(
    x: Tensor, mask: Optional[Tensor], mean: Tensor, var: Tensor, count: Tensor, out: Optional[Tensor],
    diag: Tensor, momentum: Optional[float], max_count: Optional[float], eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float], eps_on_std: bool, unbiased: bool, scale: Optional[Tensor],
    min_std_rel: Optional[float], previous: bool, steps: Optional[Tensor],
) -> None:
    """fastnorm::running_norm on the Triton kernels. An empty batch runs the kernel too: it resets
    the diagnostics and leaves the statistics and steps as they are."""
    rows, cols = _check_update(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip,
                               scale, min_std_rel, steps)
    if cols == 0:
        return
    out_rows, scratch = _writable_rows(out, rows, cols) if out is not None else (None, False)
    launch_running_norm(_readable_rows(x, rows, cols), _mask_rows(mask, rows), mean, var, count, out_rows, diag,
                        momentum=momentum, max_count=max_count, eps=eps, min_std=min_std, max_std=max_std, clip=clip,
                        eps_on_std=eps_on_std, unbiased=unbiased, scale=scale, min_std_rel=min_std_rel,
                        previous=previous, steps=steps if rows > 0 else None, blocks=blocks_for(x, cols))
    if scratch and rows > 0:
        out.copy_(out_rows.view(out.shape))


@_define("fastnorm::normalize_triton", ("out",))
def normalize_triton(
    x: Tensor, mean: Tensor, var: Tensor, out: Tensor, eps: float, min_std: Optional[float],
    max_std: Optional[float], clip: Optional[float], eps_on_std: bool = False, scale: Optional[Tensor] = None,
    min_std_rel: Optional[float] = None,
) -> None:
    """fastnorm::normalize on the Triton kernels."""
    rows, cols = _check_statistics(x, mean, (var, "var"))
    _check_scale(x, mean, scale, min_std_rel)
    _check_bounds(eps, min_std, max_std, clip)
    _check_out(x, out)
    if rows == 0 or cols == 0:
        return
    out_rows, scratch = _writable_rows(out, rows, cols)
    launch_normalize(_readable_rows(x, rows, cols), mean, var, out_rows, eps=eps, min_std=min_std, max_std=max_std,
                     clip=clip, eps_on_std=eps_on_std, scale=scale, min_std_rel=min_std_rel, blocks=blocks_for(x, cols))
    if scratch:
        out.copy_(out_rows.view(out.shape))


@_define("fastnorm::batch_moments_triton", ("moments",))
def batch_moments_triton(x: Tensor, mask: Optional[Tensor], moments: Tensor) -> None:
    """fastnorm::batch_moments on the Triton kernels: the moments running_norm_triton merges."""
    shape = tuple(moments.shape[1:])
    if moments.dim() < 1 or moments.shape[0] != TABLE_ROWS:
        raise ValueError(f"fastnorm: moments must be a contiguous float64 tensor of shape ({TABLE_ROWS}, *shape), "
                         f"got {moments.dtype} of shape {tuple(moments.shape)}")
    _check_float64(x, moments, "moments", tuple(moments.shape), f"({TABLE_ROWS}, *shape)")
    rows, cols = _check_x(x, shape)
    _check_mask(x, mask, x.dim() - len(shape))
    if cols == 0:
        return
    launch_batch_moments(_readable_rows(x, rows, cols), _mask_rows(mask, rows), moments.view(TABLE_ROWS, cols),
                         blocks=blocks_for(x, cols))


@_define("fastnorm::merge_normalize_triton", ("mean", "var", "count", "out", "diag", "scale", "steps"))
def merge_normalize_triton(
    x: Tensor, mask: Optional[Tensor], parts: Tensor, mean: Tensor, var: Tensor, count: Tensor,
    out: Optional[Tensor], diag: Tensor, momentum: Optional[float], max_count: Optional[float], eps: float,
    min_std: Optional[float], max_std: Optional[float], clip: Optional[float], eps_on_std: bool, unbiased: bool,
    scale: Optional[Tensor], min_std_rel: Optional[float], previous: bool, steps: Optional[Tensor],
) -> None:
    """fastnorm::merge_normalize on the Triton kernels; steps counts a step of the group, whatever x."""
    rows, cols = _check_update(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip,
                               scale, min_std_rel, steps)
    if parts.dim() != mean.dim() + 2 or parts.shape[0] < 1 or parts.shape[1] != TABLE_ROWS:
        raise ValueError(f"fastnorm: parts must be a contiguous float64 tensor of shape (num_parts >= 1, {TABLE_ROWS}, "
                         f"{', '.join(map(str, mean.shape))}), got {parts.dtype} of shape {tuple(parts.shape)}")
    _check_float64(x, parts, "parts", (parts.shape[0], TABLE_ROWS) + tuple(mean.shape),
                   f"(num_parts >= 1, {TABLE_ROWS}, {', '.join(map(str, mean.shape))})")
    if cols == 0 and steps is None:
        return
    out_rows, scratch = _writable_rows(out, rows, cols) if out is not None else (None, False)
    launch_merge_normalize(_readable_rows(x, rows, cols), _mask_rows(mask, rows), parts, mean, var, count, out_rows,
                           diag, momentum=momentum, max_count=max_count, eps=eps, min_std=min_std, max_std=max_std,
                           clip=clip, eps_on_std=eps_on_std, unbiased=unbiased, scale=scale, min_std_rel=min_std_rel,
                           previous=previous, steps=steps, blocks=blocks_for(x, cols))
    if scratch and rows > 0:
        out.copy_(out_rows.view(out.shape))


# ---------------------------------------------------------------- the advantages ops


def _check_advantage_x(x: Tensor) -> tuple[int, int, int]:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastnorm: x must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"fastnorm: x must be 3-D (outer, groups, inner), got shape {tuple(x.shape)}")
    return tuple(x.shape)


def _check_advantage_outputs(x: Tensor, out: Tensor, stats: Tensor, min_std: float) -> None:
    _check_out(x, out)
    groups = x.shape[1]
    _check_float64(x, stats, "stats", (ADVANTAGE_STAT_ROWS, groups), f"({ADVANTAGE_STAT_ROWS}, {groups})")
    if not (math.isfinite(min_std) and min_std > 0):
        raise ValueError(f"fastnorm: min_std must be finite and > 0, got {min_std}")


def _check_advantage_mask(x: Tensor, mask: Optional[Tensor]) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or mask.device != x.device or mask.dim() != 1:
        raise ValueError(f"fastnorm: mask must be a 1-D (flattened) bool tensor on {x.device}, got {mask.dtype} "
                         f"of shape {tuple(mask.shape)} on {mask.device}")
    if x.numel() > 0 and (mask.numel() == 0 or x.numel() % mask.numel() != 0):
        raise ValueError(f"fastnorm: mask must have a number of elements that divides x's {x.numel()}, "
                         f"got {mask.numel()}")


def _advantage_blocks(x: Tensor):
    return _cached_advantage_blocks(tuple(x.shape), x.element_size(), _programs(x), tuple(_steps(x).items()))


@functools.lru_cache(maxsize=4096)
def _cached_advantage_blocks(shape: tuple, element_size: int, programs: int, steps: tuple):
    return choose_advantage_blocks(*shape, element_size, programs, **dict(steps))


def _kernel_layout(x: Tensor) -> Tensor:
    """x (O, G, I) contiguous as the kernels take it: one group (the whole batch, whose size would
    be a specialized integer as inner) as (O * I, 1, 1), whose entries are then contiguous runs of
    the outer dim, a size Triton does not specialize on."""
    return x.view(-1, 1, 1) if x.shape[1] == 1 else x


def _flat_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    return mask.contiguous().view(torch.uint8) if mask is not None else None


def _contiguous_out(x: Tensor, out: Tensor) -> Tensor:
    """out itself when contiguous, else a scratch to copy back."""
    return out if out.is_contiguous() else torch.empty(x.shape, dtype=x.dtype, device=x.device)


@_define("fastnorm::normalize_advantages_triton", ("out", "stats"))
def normalize_advantages_triton(x: Tensor, mask: Optional[Tensor], out: Tensor, stats: Tensor, min_std: float,
                                unbiased: bool) -> None:
    """fastnorm::normalize_advantages on the Triton kernels: x (O, G, I) reduced over dims 0 and 2."""
    _check_advantage_x(x)
    _check_advantage_outputs(x, out, stats, min_std)
    _check_advantage_mask(x, mask)
    if x.numel() == 0:
        stats.zero_()
        return
    out_c = _contiguous_out(x, out)
    xk = _kernel_layout(x.contiguous())
    launch_normalize_advantages(xk, _flat_mask(mask), out_c.view(xk.shape), stats, min_std=min_std, unbiased=unbiased,
                                blocks=_advantage_blocks(xk))
    if out_c is not out:
        out.copy_(out_c)


@_define("fastnorm::advantage_moments_triton", ("moments",))
def advantage_moments_triton(x: Tensor, mask: Optional[Tensor], moments: Tensor) -> None:
    """fastnorm::advantage_moments on the Triton kernels: the moments normalize_advantages_triton
    computes its statistics from."""
    groups = _check_advantage_x(x)[1]
    _check_float64(x, moments, "moments", (ADVANTAGE_MOMENT_ROWS, groups), f"({ADVANTAGE_MOMENT_ROWS}, {groups})")
    _check_advantage_mask(x, mask)
    if x.numel() == 0:  # every group without entries
        moments[:3].zero_()
        moments[3].fill_(math.inf)
        moments[4].fill_(-math.inf)
        return
    xk = _kernel_layout(x.contiguous())
    launch_advantage_moments(xk, _flat_mask(mask), moments, blocks=_advantage_blocks(xk))


@_define("fastnorm::normalize_advantages_from_triton", ("out", "stats"))
def normalize_advantages_from_triton(x: Tensor, parts: Tensor, out: Tensor, stats: Tensor, min_std: float,
                                     unbiased: bool) -> None:
    """fastnorm::normalize_advantages_from on the Triton kernels."""
    groups = _check_advantage_x(x)[1]
    _check_advantage_outputs(x, out, stats, min_std)
    if (parts.dtype != torch.float64 or not parts.is_contiguous() or parts.dim() != 3 or parts.shape[0] < 1
            or parts.shape[1:] != (ADVANTAGE_MOMENT_ROWS, groups) or parts.device != x.device):
        raise ValueError(f"fastnorm: parts must be a contiguous float64 tensor of shape (num_parts >= 1, "
                         f"{ADVANTAGE_MOMENT_ROWS}, {groups}) on {x.device}, got {parts.dtype} of shape "
                         f"{tuple(parts.shape)} on {parts.device}")
    if groups == 0:
        return
    out_c = _contiguous_out(x, out)
    xk = _kernel_layout(x.contiguous())
    launch_normalize_advantages_from(xk, parts, out_c.view(xk.shape), stats, min_std=min_std, unbiased=unbiased,
                                     blocks=_advantage_blocks(xk))
    if out_c is not out and x.numel() > 0:
        out.copy_(out_c)


def normalized_advantages_triton(adv: Tensor, mask: Optional[Tensor], outer: int, groups: int, inner: int,
                                 group_shape: list[int], min_std: float, unbiased: bool) -> tuple[Tensor, Tensor, Tensor]:
    """fastnorm::normalized_advantages on the Triton kernels (csrc/normalized_advantages.cpp): the
    common call of fastnorm.normalize_advantages with its outputs allocated, as one op. Returns y
    (adv's shape), the stats table (4, *group_shape) and std_below_floor (std_raw < min_std)."""
    if outer * groups * inner != adv.numel() or math.prod(group_shape) != groups:
        raise ValueError(f"fastnorm: outer * groups * inner must be adv's size {adv.numel()} and group_shape "
                         f"{list(group_shape)} hold {groups} groups, got {outer} * {groups} * {inner}")
    y = adv.new_empty((outer, groups, inner))
    stats = adv.new_empty((ADVANTAGE_STAT_ROWS, *group_shape), dtype=torch.float64)
    normalize_advantages_triton_impl(adv.reshape(outer, groups, inner), None if mask is None else mask.reshape(-1), y,
                                     stats.view(ADVANTAGE_STAT_ROWS, groups), min_std, unbiased)
    return y.view(adv.shape), stats, stats[2] < min_std  # stats rows: count, mean, std_raw, norm_max_abs


normalize_advantages_triton_impl = IMPLEMENTATIONS["fastnorm::normalize_advantages_triton"]
IMPLEMENTATIONS["fastnorm::normalized_advantages_triton"] = normalized_advantages_triton
if INTERPRETED:
    _normalized = torch.library.custom_op("fastnorm::normalized_advantages_triton", mutates_args=())(
        normalized_advantages_triton)

    @_normalized.register_fake
    def _(adv, mask, outer, groups, inner, group_shape, min_std, unbiased):
        stats = adv.new_empty((ADVANTAGE_STAT_ROWS, *group_shape), dtype=torch.float64)
        return adv.new_empty(adv.shape), stats, stats[2] < min_std
else:
    torch.library.triton_op("fastnorm::normalized_advantages_triton", mutates_args=())(normalized_advantages_triton)
