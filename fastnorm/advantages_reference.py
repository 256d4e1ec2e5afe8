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

Split in two for normalize_advantages(sync=True), as the ops advantage_moments and
normalize_advantages_from: moment_table gives each group's (count, mean, M2, min, max) of one
shard, and normalize_advantages_from applies the contract to a shard with the tables of all
shards merged in order (Chan merge); norm_max_abs then comes from the merged min and max.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastnorm.reference import chan_merge

# The rows of the stats tensor the normalize_advantages op writes (csrc/advantages_math.h).
STAT_ROWS = ("count", "mean", "std_raw", "norm_max_abs")
# The rows of a moments table (fastnorm::advantage_moments, AdvantageMomentRow in csrc/advantages_math.h).
MOMENT_ROWS = ("count", "mean", "m2", "min", "max")


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
    selected = _selection(x, mask)
    n, mean, m2 = _group_moments(x, selected, dims)
    std = _std_raw(n, m2, unbiased)
    y = torch.where(n > 0, (x - mean) / std.clamp(min=min_std), 0.0)
    abs_y = torch.where(selected, y.abs(), 0.0)
    norm_max_abs = abs_y.amax(dims, keepdim=True) if _reduced_numel(x, dims) > 0 else torch.zeros_like(n)
    grouped = _grouper(x, dims)
    return AdvantageResult(y.to(adv.dtype), grouped(torch.where(n > 0, mean, 0.0)), grouped(std), grouped(n),
                           grouped(norm_max_abs), grouped(std < min_std))


def moment_table(adv: Tensor, mask: Optional[Tensor] = None, dims: Optional[Sequence[int]] = None) -> Tensor:
    """What fastnorm::advantage_moments writes, for adv's groups over dims: float64 (5, *groups),
    rows MOMENT_ROWS, of each group's selected finite entries; a group with none reads 0, 0, 0,
    +inf, -inf."""
    x = adv.double()
    dims = tuple(range(x.dim())) if dims is None else tuple(dims)
    selected = _selection(x, mask)
    n, mean, m2 = _group_moments(x, selected, dims)
    if _reduced_numel(x, dims) > 0:
        lo = torch.where(selected, x, torch.inf).amin(dims, keepdim=True)
        hi = torch.where(selected, x, -torch.inf).amax(dims, keepdim=True)
    else:
        lo, hi = torch.full_like(n, torch.inf), torch.full_like(n, -torch.inf)
    grouped = _grouper(x, dims)
    return torch.stack([grouped(t) for t in (n, torch.where(n > 0, mean, 0.0), m2, lo, hi)])


def merge_moment_tables(parts: Tensor) -> Tensor:
    """Tables parts (P >= 1, 5, *groups) merged in part order into the table of their union: the
    Chan merge of count, mean and M2, and the min and max."""
    n, mean, m2, lo, hi = parts[0]
    for n_b, mean_b, m2_b, lo_b, hi_b in parts[1:]:
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
        lo, hi = torch.minimum(lo, lo_b), torch.maximum(hi, hi_b)
    return torch.stack([n, mean, m2, lo, hi])


def normalize_advantages_from(adv: Tensor, parts: Tensor, dims: Optional[Sequence[int]] = None, *,
                              min_std: float = 1e-4, unbiased: bool = True) -> AdvantageResult:
    """The contract for adv with the statistics of the tables parts (P >= 1, 5, *groups) merged:
    what fastnorm::normalize_advantages_from computes. norm_max_abs comes from the merged min and
    max (max |y| over every shard's selected entries)."""
    x = adv.double()
    dims = tuple(range(x.dim())) if dims is None else tuple(dims)
    keep_shape = [1 if d in dims else size for d, size in enumerate(x.shape)]
    n, mean, m2, lo, hi = (row.reshape(keep_shape) for row in merge_moment_tables(parts))
    std = _std_raw(n, m2, unbiased)
    divisor = std.clamp(min=min_std)
    y = torch.where(n > 0, (x - mean) / divisor, 0.0)
    norm_max_abs = torch.where(n > 0, torch.maximum(hi - mean, mean - lo) / divisor, 0.0)
    grouped = _grouper(x, dims)
    return AdvantageResult(y.to(adv.dtype), grouped(torch.where(n > 0, mean, 0.0)), grouped(std), grouped(n),
                           grouped(norm_max_abs), grouped(std < min_std))


def _selection(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    selected = torch.isfinite(x)
    return selected if mask is None else selected & broadcast_mask(mask, x.shape)


def _group_moments(x: Tensor, selected: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean (0 when n = 0) and M2 of each group's selected entries, keeping the reduced dims."""
    n = selected.sum(dims, keepdim=True, dtype=torch.float64)
    mean = torch.where(selected, x, 0.0).sum(dims, keepdim=True) / n.clamp(min=1)
    m2 = torch.where(selected, x - mean, 0.0).square().sum(dims, keepdim=True)
    return n, mean, m2


def _std_raw(n: Tensor, m2: Tensor, unbiased: bool) -> Tensor:
    dof = n - 1 if unbiased else n
    return torch.where(n >= 2, torch.sqrt(m2 / dof.clamp(min=1)), 0.0)


def _reduced_numel(x: Tensor, dims: tuple[int, ...]) -> int:
    numel = 1
    for d in dims:
        numel *= x.shape[d]
    return numel


def _grouper(x: Tensor, dims: tuple[int, ...]):
    """Reshapes a keepdim reduction of x over dims to the group shape."""
    groups = [size for d, size in enumerate(x.shape) if d not in dims]
    return lambda t: t.reshape(groups)
