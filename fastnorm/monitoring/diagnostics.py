"""RunningNorm's health in a few numbers, computed on device from the kernels' per-column
diagnostics of the last update (``norm._diag``, rows ``reference.DIAG_ROWS``) and the statistics.

``running_norm_diagnostics`` returns 0-dim tensors without a host sync (torch ops only, no branch
on a value), so it can run every step; ``as_floats`` turns them into Python floats for logging
(one sync). The names, all about the last update unless said otherwise:

    raw_std_min, raw_std_max   smallest / largest raw batch std over the updated columns
    norm_mean, norm_std        mean and std of the batch normalized with the statistics that y
                               uses (z before the clamp), pooled over every selected entry
    norm_mean_max_abs          largest |normalized batch mean| of a column: how far, in stds,
                               the raw batch mean has moved away from the running mean
    max_abs_z                  largest |z| before the clamp
    clipped_fraction           fraction of the selected entries that the clamp changed
    floor_fraction             fraction of all columns whose std is held at min_std
    nonfinite_count            selected entries that were NaN or +-inf (left out of the statistics)
    min_count                  smallest running count of any column
    update_weight              the largest weight w with which this update moved a column's
                               statistics toward the batch; tiny means frozen statistics
    steps                      update steps so far (int64)

NaN marks a value the last call does not define: nothing before the first update; the raw and
normalized moments when no column had a selected finite entry; max_abs_z and clipped_fraction
after ``update()``, which computes no output.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from fastnorm import reference

DIAGNOSTIC_NAMES = (
    "raw_std_min", "raw_std_max", "norm_mean", "norm_std", "norm_mean_max_abs", "max_abs_z",
    "clipped_fraction", "floor_fraction", "nonfinite_count", "min_count", "update_weight", "steps",
)


def running_norm_diagnostics(
    diag: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    steps: Tensor,
    *,
    momentum: Optional[float],
    max_count: Optional[float],
    eps: float,
    min_std: Optional[float],
    max_std: Optional[float],
    eps_on_std: bool = False,
) -> dict[str, Tensor]:
    """The named diagnostics (see the module docstring) from the (6, C) ``diag`` of the last
    update and the statistics after it; 0-dim float64 tensors (``steps``: int64), no host sync."""
    n, m, v, nonfinite, clipped, max_abs_z = diag.unbind(0)
    mean, var, count = mean.reshape(-1), var.reshape(-1), count.reshape(-1)
    nan = torch.full((), math.nan, dtype=torch.float64, device=diag.device)
    updated = n > 0  # false for every column before the first update (diag is NaN)
    any_updated = updated.any()
    n = torch.where(updated, n, 0.0)
    total = n.sum()

    std = reference.bounded_std(var, eps, min_std, max_std, eps_on_std)
    # z = (x - mean) / std has per column mean (m - mean) / std and variance v / std^2; pooled over
    # the columns by the law of total variance: Var = E[Var_c] + Var[E_c] (no E[z^2] - E[z]^2).
    z_mean = torch.where(updated, (m - mean) / std, 0.0)
    z_var = torch.where(updated, v / std.square(), 0.0)
    norm_mean = (n * z_mean).sum() / total
    norm_var = (n * (z_var + (z_mean - norm_mean).square())).sum() / total

    raw_std = v.clamp(min=0).sqrt()
    raw_std_min = torch.where(updated, raw_std, math.inf).amin()
    raw_std_max = torch.where(updated, raw_std, -math.inf).amax()

    # The weight of the running update (README, "The running update") from the counts after it.
    n_eff = (count - n).clamp(min=0)
    if max_count is not None:
        n_eff = n_eff.clamp(max=max_count)
    weight = n / (n_eff + n).clamp(min=1e-300)
    if momentum is not None:
        weight = weight.clamp(min=1.0 - momentum)

    at_floor = std <= min_std if min_std is not None else torch.zeros_like(std, dtype=torch.bool)

    def where_updated(value: Tensor) -> Tensor:
        return torch.where(any_updated, value, nan)

    return {
        "raw_std_min": where_updated(raw_std_min),
        "raw_std_max": where_updated(raw_std_max),
        "norm_mean": norm_mean,
        "norm_std": norm_var.sqrt(),
        "norm_mean_max_abs": where_updated(torch.where(updated, z_mean.abs(), 0.0).amax()),
        "max_abs_z": where_updated(torch.where(updated, max_abs_z, -math.inf).amax()),
        "clipped_fraction": torch.where(updated, clipped, 0.0).sum() / total,
        "floor_fraction": at_floor.double().mean(),
        "nonfinite_count": nonfinite.sum(),
        "min_count": count.amin(),
        "update_weight": where_updated(torch.where(updated, weight, 0.0).amax()),
        "steps": steps.clone(),
    }


def as_floats(diagnostics: dict[str, Tensor], prefix: str = "") -> dict[str, float]:
    """The diagnostics as Python numbers keyed ``prefix + name`` (one host sync); values the last
    call does not define (NaN) are left out, so a monitor sees NaN only where data made it."""
    if not diagnostics:
        return {}
    values = torch.stack([t.double() for t in diagnostics.values()]).tolist()
    floats = {}
    for name, value in zip(diagnostics, values):
        if math.isnan(value):
            continue
        floats[prefix + name] = int(value) if not diagnostics[name].is_floating_point() else value
    return floats
