"""The pure-PyTorch reference of fastnorm's running normalization, computed in float64.

Readable rather than fast: every kernel is tested against it, the benchmarks time it as the
baseline, and the "reference" backend runs it where no kernel is built. Functions here are pure:
they return new statistics instead of mutating their arguments.

The contract (README.md, "The running update"): for each column c, over the selected entries of
the batch (mask true and value finite) with batch count n_b, mean m_b and variance v_b (M2/n_b, or
with unbiased M2/(n_b - 1) and 0 for n_b = 1), d = m_b - mean and n_eff = min(count, max_count):

    w = n_b / (n_eff + n_b);  with momentum: w = max(1 - momentum, w)
    mean' = mean + w d;  var' = (1 - w) var + w v_b + w (1 - w) d^2;  count' = count + n_b

and y = clamp((x - mean) / clamp(std, floor, max_std), -clip, clip) with std = sqrt(var + eps), or
sqrt(var) + eps with eps_on_std, and floor = min_std, or max(min_std, min_std_rel * scale) with the
relative floor. The long-run scale, where tracked, follows each update (README, "The relative std
floor"): with w_s = max(SCALE_WEIGHT_RATIO (1 - momentum), n_b / (n_eff + n_b)),

    scale'^2 = (1 - w_s) scale^2 + w_s var'

y uses the updated statistics, or with ``previous`` those from before the batch (mean, var and
scale) in every column that has a history (count > 0); a column without one (count 0) is
normalized with its updated statistics, which are then the batch's own.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

DIAG_ROWS = ("batch_count", "batch_mean", "batch_var", "nonfinite", "clipped", "max_abs_z")
# Rows of a batch-moments table (fastnorm::batch_moments, MomentRow in csrc/running_norm_math.h).
MOMENT_ROWS = ("count", "mean", "m2", "nonfinite", "min", "max")
# The long-run scale's floor weight over the running update's (kScaleWeightRatio in
# csrc/running_norm_math.h): it follows ten times more slowly than var.
SCALE_WEIGHT_RATIO = 0.1


class RunningNormResult(NamedTuple):
    y: Optional[Tensor]  # x's shape and dtype; None when not asked for
    mean: Tensor  # float64, statistics shape
    var: Tensor
    count: Tensor
    diag: Tensor  # float64 (6, C), rows DIAG_ROWS
    scale: Optional[Tensor] = None  # float64, statistics shape, where tracked


def as_rows(x: Tensor, stats_shape: torch.Size) -> Tensor:
    """x of shape (*batch, *stats_shape) as float64 (rows, C)."""
    cols = stats_shape.numel()
    return x.reshape(-1, cols).double() if cols > 0 else x.reshape(0, 0).double()


def selection(x_rows: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Bool (rows, C): mask (a prefix of x's shape) broadcast over the remaining dims."""
    rows, cols = x_rows.shape
    if mask is None:
        return torch.ones_like(x_rows, dtype=torch.bool)
    per_row = mask.reshape(rows, -1) if rows > 0 else mask.reshape(0, 1)
    return per_row.repeat_interleave(cols // per_row.shape[1], dim=1)


def batch_moments(x_rows: Tensor, selected: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Count, mean, population variance and non-finite count per column of the selected entries."""
    finite = torch.isfinite(x_rows)
    valid = selected & finite
    n = valid.sum(0, dtype=torch.float64)
    safe_n = n.clamp(min=1)
    m = torch.where(valid, x_rows, 0.0).sum(0) / safe_n
    v = torch.where(valid, x_rows - m, 0.0).square().sum(0) / safe_n
    nonfinite = (selected & ~finite).sum(0, dtype=torch.float64)
    return n, m, v, nonfinite


def unbiased_var(n: Tensor, v: Tensor) -> Tensor:
    """The population variance v of n samples rescaled to M2/(n - 1); 0 for n <= 1 (not NaN)."""
    return torch.where(n > 1, v * n / (n - 1).clamp(min=1), 0.0)


def merge_running(
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    n_b: Tensor,
    m_b: Tensor,
    v_b: Tensor,
    *,
    momentum: Optional[float],
    max_count: Optional[float],
    scale: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """The running update of the contract with the batch variance v_b as given, and of the
    long-run scale when given (None otherwise); columns with n_b = 0, or whose result would not be
    finite, keep their statistics."""
    n_eff = count if max_count is None else count.clamp(max=max_count)
    warm_weight = n_b / (n_eff + n_b).clamp(min=1e-300)
    w = warm_weight if momentum is None else warm_weight.clamp(min=1.0 - momentum)
    d = m_b - mean
    new_mean = mean + w * d
    new_var = (1 - w) * var + w * v_b + (w * (1 - w) * d) * d  # 0, not 0 * inf, at w = 1
    keep = (n_b > 0) & torch.isfinite(new_mean) & torch.isfinite(new_var)
    new_scale = None
    if scale is not None:
        w_s = warm_weight if momentum is None else warm_weight.clamp(min=SCALE_WEIGHT_RATIO * (1.0 - momentum))
        new_scale = torch.where(keep, torch.sqrt((1 - w_s) * scale * scale + w_s * new_var), scale)
    return (
        torch.where(keep, new_mean, mean),
        torch.where(keep, new_var, var),
        torch.where(keep, count + n_b, count),
        new_scale,
    )


def std_floor(min_std: Optional[float], min_std_rel: Optional[float], scale: Optional[Tensor]):
    """The divisor's lower bound: min_std (None: none), or with min_std_rel the tensor
    max(min_std, min_std_rel * scale)."""
    if min_std_rel is None:
        return min_std
    return (min_std_rel * scale).clamp(min=min_std or 0.0)


def bounded_std(var: Tensor, eps: float, min_std: Optional[float], max_std: Optional[float],
                eps_on_std: bool = False, min_std_rel: Optional[float] = None,
                scale: Optional[Tensor] = None) -> Tensor:
    """sqrt(var + eps), or sqrt(var) + eps with eps_on_std, bounded to [floor, max_std] with floor
    = std_floor(min_std, min_std_rel, scale) (None: unbounded). TorchScript compiles it (the
    scripted rl_games adapter calls it), hence the floor's two bounds applied one after the other."""
    std = torch.sqrt(var) + eps if eps_on_std else torch.sqrt(var + eps)
    if min_std is not None:
        std = std.clamp(min=min_std)
    if min_std_rel is not None and scale is not None:
        std = torch.maximum(std, min_std_rel * scale)
    return std if max_std is None else std.clamp(max=max_std)


def _bounded_by(var: Tensor, eps: float, eps_on_std: bool, floor, max_std: Optional[float]) -> Tensor:
    std = torch.sqrt(var) + eps if eps_on_std else torch.sqrt(var + eps)
    if isinstance(floor, Tensor):
        std = torch.maximum(std, floor)
    elif floor is not None:
        std = std.clamp(min=floor)
    return std if max_std is None else std.clamp(max=max_std)


def normalize(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    *,
    eps: float,
    min_std: Optional[float],
    max_std: Optional[float],
    clip: Optional[float],
    eps_on_std: bool = False,
    scale: Optional[Tensor] = None,
    min_std_rel: Optional[float] = None,
) -> Tensor:
    """y = clamp((x - mean) / bounded_std, -clip, clip) in float64, returned in x's dtype."""
    z = (x.double() - mean) / bounded_std(var, eps, min_std, max_std, eps_on_std, min_std_rel, scale)
    y = z if clip is None else z.clamp(-clip, clip)
    return y.to(x.dtype)


def running_norm(
    x: Tensor,
    mask: Optional[Tensor],
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    *,
    momentum: Optional[float],
    max_count: Optional[float],
    eps: float,
    min_std: Optional[float],
    max_std: Optional[float],
    clip: Optional[float],
    eps_on_std: bool = False,
    unbiased: bool = False,
    scale: Optional[Tensor] = None,
    min_std_rel: Optional[float] = None,
    previous: bool = False,
    with_output: bool = True,
) -> RunningNormResult:
    """Updates the statistics with the batch x and normalizes x with the updated statistics (with
    previous, those from before the batch where count > 0). diag's batch_var row is the population
    variance, also when unbiased; its clipped and max_abs_z rows use the statistics y used."""
    shape = mean.shape
    x_rows = as_rows(x, shape)
    selected = selection(x_rows, mask)
    n_b, m_b, v_b, nonfinite = batch_moments(x_rows, selected)
    new_mean, new_var, new_count, new_scale = merge_running(
        mean.reshape(-1), var.reshape(-1), count.reshape(-1), n_b, m_b, unbiased_var(n_b, v_b) if unbiased else v_b,
        momentum=momentum, max_count=max_count, scale=_flat(scale),
    )
    if with_output:
        y_mean, y_var, y_scale = output_statistics(previous, count.reshape(-1), (mean, var, scale),
                                                   (new_mean, new_var, new_scale))
        y_rows, abs_z, clipped = _output_rows(x_rows, selected, y_mean, y_var, eps=eps, max_std=max_std,
                                              clip=clip, eps_on_std=eps_on_std,
                                              floor=std_floor(min_std, min_std_rel, y_scale))
        max_abs_z = abs_z.amax(0) if x_rows.shape[0] > 0 else torch.zeros_like(n_b)
        y = y_rows.to(x.dtype).reshape(x.shape)
    else:
        clipped = max_abs_z = torch.full_like(n_b, float("nan"))
        y = None
    diag = torch.stack([n_b, m_b, v_b, nonfinite, clipped, max_abs_z])
    return _result(y, new_mean, new_var, new_count, diag, new_scale, shape)


def output_statistics(previous: bool, count: Tensor, before: tuple, after: tuple) -> tuple:
    """The flat (mean, var, scale) that y uses: after (the updated statistics), or with previous
    before's (the statistics of shape before the batch) in the columns whose count was > 0."""
    if not previous:
        return after
    history = count > 0
    return tuple(None if new is None else torch.where(history, _flat(old), new) for old, new in zip(before, after))


def _flat(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.reshape(-1)


def _result(y, mean, var, count, diag, scale, shape) -> RunningNormResult:
    return RunningNormResult(y, mean.reshape(shape), var.reshape(shape), count.reshape(shape), diag,
                             None if scale is None else scale.reshape(shape))


def _output_rows(x_rows: Tensor, selected: Tensor, mean: Tensor, var: Tensor, *, eps: float,
                 max_std: Optional[float], clip: Optional[float], eps_on_std: bool,
                 floor) -> tuple[Tensor, Tensor, Tensor]:
    """y as float64 rows, |z| of the selected finite entries (0 elsewhere), and the per-column
    count of those with |z| > clip; floor: std_floor's lower bound of the divisor."""
    z = (x_rows - mean) / _bounded_by(var, eps, eps_on_std, floor, max_std)
    abs_z = torch.where(selected & torch.isfinite(x_rows), z.abs(), 0.0)
    clipped = (abs_z > clip).sum(0, dtype=torch.float64) if clip is not None else torch.zeros_like(mean)
    y_rows = z if clip is None else z.clamp(-clip, clip)
    return y_rows, abs_z, clipped


# ---------------------------------------------------------------- the split ops (sync across ranks)


def batch_moment_table(x: Tensor, mask: Optional[Tensor], shape: torch.Size) -> Tensor:
    """What fastnorm::batch_moments writes: float64 (6, *shape), rows MOMENT_ROWS, over the selected
    finite entries of x (*batch, *shape); a column with none reads 0, 0, 0, nonfinite, +inf, -inf."""
    x_rows = as_rows(x, shape)
    selected = selection(x_rows, mask)
    n, m, v, nonfinite = batch_moments(x_rows, selected)
    valid = selected & torch.isfinite(x_rows)
    inf = torch.full_like(n, float("inf"))
    lo = torch.where(valid, x_rows, float("inf")).amin(0) if x_rows.shape[0] > 0 else inf
    hi = torch.where(valid, x_rows, -float("inf")).amax(0) if x_rows.shape[0] > 0 else -inf
    return torch.stack([n, m, v * n, nonfinite, lo, hi]).reshape(len(MOMENT_ROWS), *shape)


def chan_merge(n: Tensor, mean: Tensor, m2: Tensor, n_b: Tensor, mean_b: Tensor,
               m2_b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Count, mean and M2 of the union of two sets (Chan et al. 1979):
    mean = mean_a + d n_b / n, M2 = M2_a + M2_b + d^2 n_a n_b / n with d = mean_b - mean_a."""
    total = n + n_b
    w_b = n_b / total.clamp(min=1)
    d = mean_b - mean
    return total, mean + d * w_b, m2 + m2_b + d * d * n * w_b


def merge_moment_tables(parts: Tensor) -> Tensor:
    """Tables parts (P >= 1, 6, *shape) merged in part order into the table of their union: counts,
    non-finite counts added, min and max, and the Chan merge of count, mean and M2."""
    n, mean, m2, nonfinite, lo, hi = parts[0]
    for part in parts[1:]:
        n_b, mean_b, m2_b, nonfinite_b, lo_b, hi_b = part
        n, mean, m2 = chan_merge(n, mean, m2, n_b, mean_b, m2_b)
        nonfinite, lo, hi = nonfinite + nonfinite_b, torch.minimum(lo, lo_b), torch.maximum(hi, hi_b)
    return torch.stack([n, mean, m2, nonfinite, lo, hi])


def merge_normalize(
    x: Tensor,
    mask: Optional[Tensor],
    parts: Tensor,
    mean: Tensor,
    var: Tensor,
    count: Tensor,
    *,
    momentum: Optional[float],
    max_count: Optional[float],
    eps: float,
    min_std: Optional[float],
    max_std: Optional[float],
    clip: Optional[float],
    eps_on_std: bool = False,
    unbiased: bool = False,
    scale: Optional[Tensor] = None,
    min_std_rel: Optional[float] = None,
    previous: bool = False,
    with_output: bool = True,
) -> RunningNormResult:
    """What fastnorm::merge_normalize computes: the running update with the merged tables parts
    (P, 6, *shape), then y for x with the statistics running_norm would use (see previous). diag
    describes the merged batch, except `clipped`, which counts x's entries; max |z| comes from the
    merged min and max."""
    shape = mean.shape
    n_b, m_b, m2_b, nonfinite, lo, hi = merge_moment_tables(parts).reshape(len(MOMENT_ROWS), -1)
    v_b = torch.where(n_b > 0, m2_b / n_b.clamp(min=1), 0.0)
    merged_v_b = torch.where(n_b > 1, m2_b / (n_b - 1).clamp(min=1), 0.0) if unbiased else v_b
    new_mean, new_var, new_count, new_scale = merge_running(
        mean.reshape(-1), var.reshape(-1), count.reshape(-1), n_b, m_b, merged_v_b, momentum=momentum,
        max_count=max_count, scale=_flat(scale),
    )
    if with_output:
        x_rows = as_rows(x, shape)
        y_mean, y_var, y_scale = output_statistics(previous, count.reshape(-1), (mean, var, scale),
                                                   (new_mean, new_var, new_scale))
        floor = std_floor(min_std, min_std_rel, y_scale)
        y_rows, _, clipped = _output_rows(x_rows, selection(x_rows, mask), y_mean, y_var, eps=eps,
                                          max_std=max_std, clip=clip, eps_on_std=eps_on_std, floor=floor)
        spread = torch.maximum(hi - y_mean, y_mean - lo) / _bounded_by(y_var, eps, eps_on_std, floor, max_std)
        max_abs_z = torch.where(n_b > 0, spread, 0.0)
        y = y_rows.to(x.dtype).reshape(x.shape)
    else:
        clipped = max_abs_z = torch.full_like(n_b, float("nan"))
        y = None
    diag = torch.stack([n_b, m_b, v_b, nonfinite, clipped, max_abs_z])
    return _result(y, new_mean, new_var, new_count, diag, new_scale, shape)
