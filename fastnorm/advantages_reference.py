"""The pure-PyTorch reference of fastnorm.normalize_advantages, computed in float64.

Readable rather than fast: the kernels are tested against it, the benchmark times it, and the
"reference" backend runs it. It works on the caller's tensor and dims directly (not on the
kernels' (O, G, I) view), so the tests also check how the API maps dims and masks onto the ops.

The contract, per group (the entries sharing the indices of the dims not in `dim`), over its
selected entries (mask true, broadcast over the trailing dims, and value finite) with count n,
mean m and M2 = sum (x - m)^2:

    std_raw = sqrt(M2 / (n - 1)) when unbiased, else sqrt(M2 / n);  0 when n < 2
    y = (x - m) / max(std_raw, min_std)  for every entry of the group;  y = 0 when n = 0
    norm_max_abs = max |y| over the selected entries (0 when n = 0);  std_below_floor = std_raw < min_std
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

# The rows of the stats tensor the normalize_advantages op writes (csrc/advantages_math.h).
STAT_ROWS = ("count", "mean", "std_raw", "norm_max_abs")


class AdvantageResult(NamedTuple):
    y: Tensor  # adv's shape and dtype
    mean: Tensor  # float64, the group shape (adv's shape without the reduced dims); 0 when n = 0
    std_raw: Tensor  # float64
    count: Tensor  # float64
    norm_max_abs: Tensor  # float64
    std_below_floor: Tensor  # bool


def broadcast_mask(mask: Optional[Tensor], shape: torch.Size) -> Optional[Tensor]:
    """mask, whose shape is a prefix of `shape`, broadcast over the remaining dims."""
    if mask is None:
        return None
    return mask.reshape(tuple(mask.shape) + (1,) * (len(shape) - mask.dim())).expand(shape)


def normalize_advantages(adv: Tensor, mask: Optional[Tensor] = None, dims: Optional[Sequence[int]] = None, *,
                         min_std: float = 1e-4, unbiased: bool = True) -> AdvantageResult:
    """The contract above; dims: the reduced dims (non-negative, None: all)."""
    x = adv.double()
    dims = tuple(range(x.dim())) if dims is None else tuple(dims)
    selected = torch.isfinite(x)
    if mask is not None:
        selected = selected & broadcast_mask(mask, x.shape)
    n = selected.sum(dims, keepdim=True, dtype=torch.float64)
    mean = torch.where(selected, x, 0.0).sum(dims, keepdim=True) / n.clamp(min=1)
    m2 = torch.where(selected, x - mean, 0.0).square().sum(dims, keepdim=True)
    dof = n - 1 if unbiased else n
    std = torch.where(n >= 2, torch.sqrt(m2 / dof.clamp(min=1)), 0.0)
    y = torch.where(n > 0, (x - mean) / std.clamp(min=min_std), 0.0)
    abs_y = torch.where(selected, y.abs(), 0.0)
    reduced_numel = 1
    for d in dims:
        reduced_numel *= x.shape[d]
    norm_max_abs = abs_y.amax(dims, keepdim=True) if reduced_numel > 0 else torch.zeros_like(n)
    groups = [s for d, s in enumerate(x.shape) if d not in dims]

    def grouped(t: Tensor) -> Tensor:
        return t.reshape(groups)

    return AdvantageResult(y.to(adv.dtype), grouped(torch.where(n > 0, mean, 0.0)), grouped(std), grouped(n),
                           grouped(norm_max_abs), grouped(std < min_std))
