"""Input checks with clear messages: each names the argument, what was expected and what was given.

They read only static facts (shapes, dtypes, devices), never tensor values, so they cost nothing
under torch.compile and never synchronize with a GPU.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_x(x: Tensor, shape: torch.Size, device: torch.device, name: str = "x") -> int:
    """Checks x of shape (*batch, *shape) on device; returns the number of batch dims."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if not _ends_with(x, shape):
        raise ValueError(f"{name} must have shape (*batch, {', '.join(map(str, shape))}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the statistics are on {device}")
    return x.dim() - len(shape)


def _ends_with(x: Tensor, shape: torch.Size) -> bool:
    k = len(shape)
    if torch.jit.is_tracing():
        # The tracer hands out sizes as tensors and warns when they become bools; the check is
        # about static sizes the trace fixes anyway.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return x.dim() >= k and tuple(x.shape[x.dim() - k :]) == tuple(shape)
    return x.dim() >= k and x.shape[x.dim() - k :] == shape  # torch.Size == torch.Size: no tuples built


def check_mask(mask: Optional[Tensor], x: Tensor, batch_dims: int) -> None:
    """mask: bool, shape a prefix of x's shape covering at least the batch dims, on x's device."""
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    prefix_ok = batch_dims <= mask.dim() <= x.dim() and tuple(mask.shape) == tuple(x.shape[: mask.dim()])
    if not prefix_ok:
        raise ValueError(
            f"mask must have a prefix of x's shape {tuple(x.shape)} at least {batch_dims} dims long "
            f"(the batch dims), got {tuple(mask.shape)}"
        )
    if mask.device != x.device:
        raise ValueError(f"mask is on {mask.device} but x is on {x.device}")


def check_out(out: Optional[Tensor], x: Tensor) -> None:
    """out: x's shape, dtype and device (x itself for in-place use)."""
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype or out.device != x.device:
        raise ValueError(
            f"out must match x (shape {tuple(x.shape)}, {x.dtype}, {x.device}), "
            f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}"
        )


def check_optional_number(name: str, value, *, minimum: float = 0.0, inclusive: bool = True, allow_inf=False):
    """A finite number >= minimum (> minimum when not inclusive), or None; returns it as float."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number or None, got {type(value).__name__}")
    value = float(value)
    ok = (value >= minimum if inclusive else value > minimum) and (math.isfinite(value) or (allow_inf and value > 0))
    if not ok:
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{name} must be a finite number {relation} {minimum} or None, got {value}")
    return value


def check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    """One of the strings choices; returns it."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_out_overlap(out: Tensor, x: Tensor) -> None:
    """What at::assert_no_internal_overlap(out) and at::assert_no_partial_overlap(out, x) check in
    the C++ ops, from the layouts alone (no data is read, so fake tensors pass through): out may be
    x itself, but no two of its elements may share memory, nor may it share only part of x's. Raises
    the RuntimeError those raise (ATen's words first, so that every backend fails alike), with
    what fastnorm allows."""
    if not out.is_contiguous() and torch._debug_has_internal_overlap(out) == 1:  # contiguous: no overlap
        raise RuntimeError(f"unsupported operation: more than one element of the written-to tensor refers to a "
                           f"single memory location (fastnorm: out must not have elements that share memory, got "
                           f"strides {out.stride()} for shape {tuple(out.shape)}). Please clone() out first.")
    # at::get_overlap_status: layouts that are not dense are "too hard" and pass, as in ATen.
    if out.numel() == 0 or x.numel() == 0 or not torch._C._is_alias_of(out, x):
        return
    if not (_non_overlapping_and_dense(out) and _non_overlapping_and_dense(x)):
        return
    out_begin, x_begin = out.storage_offset() * out.element_size(), x.storage_offset() * x.element_size()
    out_end, x_end = out_begin + out.nbytes, x_begin + x.nbytes
    same = out_begin == x_begin and out_end == x_end and out.stride() == x.stride()
    if not same and out_begin < x_end and x_begin < out_end:
        raise RuntimeError("unsupported operation: some elements of the input tensor and the written-to tensor "
                           "refer to a single memory location (fastnorm: out must be x itself or not overlap it, got "
                           f"out sharing part of x's memory, bytes {out_begin}-{out_end} and {x_begin}-{x_end} of one "
                           "storage). Please clone() x first.")


def _non_overlapping_and_dense(t: Tensor) -> bool:
    """Whether some order of t's dims is contiguous (TensorImpl::is_non_overlapping_and_dense)."""
    expected = 1
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True
