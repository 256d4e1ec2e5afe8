"""normalize_advantages: PPO advantage normalization with a std floor and on-device diagnostics.

The usual ``(adv - adv.mean()) / (adv.std() + 1e-8)`` turns a batch whose advantage std fell to
1e-5 (no-trade episodes, a converged policy) into normalized advantages of magnitude sqrt(n) and
then NaN. Here the divisor never falls below ``min_std``, and the statistics that show it coming
(``std_raw``, ``norm_max_abs``) come out of the same pass, on the device, without a sync.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from fastnorm import _checks, distributed, export
from fastnorm.advantages_reference import MOMENT_ROWS, STAT_ROWS, broadcast_mask
from fastnorm.backends import check_backend_name, select_backend


class AdvantageStats(NamedTuple):
    """The statistics of normalize_advantages, float64 tensors shaped like the groups (adv's shape
    without the reduced dims; () for dim=None), on adv's device."""

    mean: Tensor  # of the selected finite entries (0 for a group with none)
    std_raw: Tensor  # their std before the floor (Bessel-corrected when unbiased; 0 below 2 entries)
    count: Tensor  # selected finite entries
    norm_max_abs: Tensor  # max |y| over them (0 for a group with none)
    std_below_floor: Tensor  # bool: std_raw < min_std, the floor was used

    def as_dict(self, prefix: str = "train/advantages_") -> dict[str, float]:
        """The statistics as floats named prefix + field, e.g. "train/advantages_std_raw" (this
        synchronizes with the device: meant for logging). Of several groups: count is the total,
        mean that of all selected entries, std_raw the smallest, norm_max_abs the largest and
        std_below_floor the fraction of groups below the floor."""
        if self.count.numel() == 1:
            values = torch.stack([t.reshape(()).double() for t in self])
        elif self.count.numel() == 0:
            return {prefix + name: (0.0 if name == "count" else math.nan) for name in self._fields}
        else:
            count = self.count.reshape(-1)
            total = count.sum()
            values = torch.stack([(self.mean.reshape(-1) * count).sum() / total.clamp(min=1), self.std_raw.amin(),
                                  total, self.norm_max_abs.amax(), self.std_below_floor.double().mean()])
        return {prefix + name: value for name, value in zip(self._fields, values.tolist())}


def normalize_advantages(
    adv: Tensor,
    *,
    mask: Optional[Tensor] = None,
    dim: Union[None, int, Sequence[int]] = None,
    min_std: float = 1e-4,
    unbiased: bool = True,
    backend: str = "auto",
    out: Optional[Tensor] = None,
    sync: bool = False,
    process_group: Optional[torch.distributed.ProcessGroup] = None,
) -> tuple[Tensor, AdvantageStats]:
    r"""Normalizes advantages per group: ``y = (adv - mean) / max(std, min_std)``.

    The groups are the entries that share the indices of the dims not in ``dim``: ``dim=None``
    (all dims) normalizes the whole tensor, ``dim=0`` on a ``(T*B, A)`` tensor each agent. The
    statistics of a group come from its selected entries (``mask`` true and value finite): their
    mean and std, with Bessel's correction when ``unbiased`` (what ``adv.std()`` gives, so this is
    a drop-in for ``(adv - adv.mean()) / (adv.std() + 1e-8)``), 0 for fewer than 2 entries. Every
    entry of a group is normalized, masked or not; a group with no selected entry gives y = 0.

    Args:
        adv: float16, bfloat16, float32 or float64 advantages of any shape.
        mask: bool, shape a prefix of adv's (e.g. ``(T, B)`` for ``(T, B, A)`` advantages),
            broadcast over the remaining dims; false excludes entries from the statistics.
        dim: the reduced dim or dims, as in ``torch.std`` (None or ``()``: all).
        min_std: the floor of the divisor (> 0).
        unbiased: Bessel's correction (n - 1) for the std.
        backend: "auto", "cpu", "cuda", "reference", ... (see ``fastnorm.backends()``).
        out: where to write y (adv's shape and dtype; adv itself for in place).
        sync: take the statistics over the ranks of ``process_group`` (see below).
        process_group: the torch.distributed group to sync over (None: the default group).

    Returns:
        ``(y, stats)``: y in adv's dtype and shape, and an :class:`AdvantageStats` computed in the
        same pass (no host sync); ``stats.as_dict()`` gives floats for logging.

    With ``sync=True`` the call is a collective over ``process_group``: each rank reduces its own
    adv to per-group moments (count, mean, M2, min, max), one all-gather gives every rank all of
    them, and every rank merges them in rank order (Chan merge) and normalizes its own adv. So the
    statistics are those of one process on the concatenated advantages, bitwise the same on every
    rank, without a host sync. Every rank must call, with the same group shape (adv's shape
    without the reduced dims); the reduced dims may differ in size, down to an empty adv, and a
    rank whose mask selects nothing still takes part.
    """
    if export.exporting():
        raise RuntimeError("normalize_advantages is not for deployment: it normalizes a batch of advantages by "
                           "that batch's own statistics, a training step with no place in an exported policy. "
                           "Leave it out of the model you trace or export.")
    _check_call(adv, mask, min_std, unbiased, out, sync, process_group)
    backend = check_backend_name(backend)
    order, (outer, groups, inner), group_shape = _layout(adv.shape, reduced_dims(dim, adv.dim()))
    if not sync and out is None and order is None and not torch.compiler.is_compiling():
        one_op = getattr(select_backend(backend, adv, "normalize_advantages"), "normalized_advantages", None)
        if one_op is not None:  # the common call, as one op (csrc/normalized_advantages.cpp)
            y, count, mean, std_raw, norm_max_abs, std_below_floor = one_op(
                adv, mask, outer, groups, inner, group_shape, float(min_std), unbiased)
            return y, AdvantageStats(mean, std_raw, count, norm_max_abs, std_below_floor)

    x = adv.reshape(outer, groups, inner) if order is None else adv.permute(order).reshape(outer, groups, inner)
    if mask is not None:
        mask = mask.reshape(-1) if order is None else broadcast_mask(mask, adv.shape).permute(order).reshape(-1)
    if out is None and order is None:  # the common case: y allocated in the op's layout
        y_op = adv.new_empty((outer, groups, inner))
        y, direct = y_op.view(adv.shape), True
    else:
        y = out if out is not None else torch.empty_like(adv, memory_format=torch.contiguous_format)
        direct = order is None and y.is_contiguous()
        y_op = y.view(outer, groups, inner) if direct else adv.new_empty((outer, groups, inner))
    stats = adv.new_empty((len(STAT_ROWS),) + group_shape, dtype=torch.float64)
    if sync:
        # The fused op split around the all-gather: this rank's moments, every rank's merged.
        # A backend implements advantage_moments and normalize_advantages_from together.
        chosen = select_backend(backend, adv, "normalize_advantages_from")
        moments = torch.empty((len(MOMENT_ROWS), groups), dtype=torch.float64, device=adv.device)
        chosen.advantage_moments(x, mask, moments)
        parts = distributed.all_gather_moments(moments, process_group, "normalize_advantages(sync=True)")
        chosen.normalize_advantages_from(x, parts, y_op, stats.view(len(STAT_ROWS), groups), min_std=float(min_std),
                                         unbiased=unbiased)
    else:
        select_backend(backend, adv, "normalize_advantages").normalize_advantages(
            x, mask, y_op, stats.view(len(STAT_ROWS), groups), min_std=float(min_std), unbiased=unbiased)
    if not direct:
        target = y if order is None else y.permute(order)
        target.copy_(y_op.view(target.shape))

    count, mean, std_raw, norm_max_abs = stats.unbind(0)  # STAT_ROWS
    return y, AdvantageStats(mean, std_raw, count, norm_max_abs, std_raw < min_std)


def reduced_dims(dim: Union[None, int, Sequence[int]], ndim: int) -> tuple[int, ...]:
    """dim (None, an int or a sequence of ints, negative counting from the end, as in torch.std)
    as sorted non-negative dims; None and () mean every dim."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, int) and not isinstance(dim, bool):
        dims = [dim]
    elif isinstance(dim, (tuple, list, torch.Size)) and all(isinstance(d, int) and not isinstance(d, bool)
                                                            for d in dim):
        dims = list(dim)
    else:
        raise TypeError(f"dim must be None, an int or a tuple of ints, got {dim!r}")
    if not dims:
        return tuple(range(ndim))
    bound = max(ndim, 1)  # a 0-dim tensor takes dim 0 or -1, as in torch
    for d in dims:
        if not -bound <= d < bound:
            raise ValueError(f"dim must be in [{-bound}, {bound - 1}] for adv with {ndim} dims, got {d}")
    wrapped = sorted(d % bound for d in dims)
    if len(set(wrapped)) != len(wrapped):
        raise ValueError(f"dim names a dimension twice: {dim!r}")
    return tuple(wrapped) if ndim > 0 else ()


@functools.lru_cache(maxsize=256)
def _layout(shape: torch.Size, dims: tuple[int, ...]):
    """How adv is seen by the op: (permutation or None, (O, G, I), group shape), cached (a call
    costs microseconds). The kept dims must be adjacent for the view (O, G, I) of the reduced dims
    before and after them; otherwise the reduced dims are moved to the front."""
    kept = [d for d in range(len(shape)) if d not in dims]
    group_shape = tuple(shape[d] for d in kept)
    if not kept:
        return None, (1, 1, math.prod(shape)), group_shape
    first, last = kept[0], kept[-1] + 1
    if kept == list(range(first, last)):
        return None, (math.prod(shape[:first]), math.prod(group_shape), math.prod(shape[last:])), group_shape
    order = tuple(dims) + tuple(kept)
    return order, (math.prod(shape[d] for d in dims), math.prod(group_shape), 1), group_shape


def _check_call(adv, mask, min_std, unbiased, out, sync, process_group) -> None:
    if not isinstance(adv, Tensor):
        raise TypeError(f"adv must be a torch.Tensor, got {type(adv).__name__}")
    if adv.dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"adv must be float16, bfloat16, float32 or float64, got {adv.dtype}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
            raise TypeError(f"mask must be a bool tensor, got {got}")
        if mask.dim() > adv.dim() or tuple(mask.shape) != tuple(adv.shape[: mask.dim()]):
            raise ValueError(f"mask must have a prefix of adv's shape {tuple(adv.shape)}, got {tuple(mask.shape)}")
        if mask.device != adv.device:
            raise ValueError(f"mask is on {mask.device} but adv is on {adv.device}")
    if isinstance(min_std, bool) or not isinstance(min_std, (int, float)) or not (0 < min_std < math.inf):
        raise ValueError(f"min_std must be a finite number > 0, got {min_std!r}")
    if not isinstance(unbiased, bool):
        raise TypeError(f"unbiased must be a bool, got {type(unbiased).__name__}")
    if not isinstance(sync, bool):
        raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
    if process_group is not None and not sync:
        raise ValueError("process_group is only used with sync=True")
    if out is not None:
        if not isinstance(out, Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.shape != adv.shape or out.dtype != adv.dtype or out.device != adv.device:
            raise ValueError(f"out must match adv (shape {tuple(adv.shape)}, {adv.dtype}, {adv.device}), "
                             f"got shape {tuple(out.shape)}, {out.dtype}, {out.device}")
