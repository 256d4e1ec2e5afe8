"""Alert rules over training scalars, with the seed analyses' thresholds as the defaults.

A rule looks at one update's scalars (``{tag: float}``) and returns the alerts it raises. Tags are
matched with shell patterns (``fnmatch``; ``*`` also matches ``/``), so ``*grad_norm`` matches
``train/grad_norm`` and ``critic/grad_norm``. Every rule has a ``name``, a ``severity``
("warning" or "critical"), a ``threshold`` and ``with_threshold`` (how a Monitor configures it),
and ``check(scalars, step)``. ThresholdRule's test also takes numpy arrays, which is how
``fastnorm scan`` runs the same rules over whole logged series.

Defaults (``DEFAULT_RULES``; the seeds are shared/seeds/advantage-normalization-bug.md and
normalization-stability-analysis.md):

    advantages_std_low            *advantages_std_raw < 1e-4           warning   (vulnerability window)
    advantages_norm_extreme       *advantages_norm_max_abs > 100       critical
    grad_norm_explosion           *grad_norm > 1000                    critical
    explained_variance_negative   *explained_variance < -0.5           critical
    clip_fraction_high            *clip_fraction > 0.9                 warning
    loss_explosion                |*policy_loss|, |*value_loss| > 10   warning
    normalized_std_out_of_range   *norm_std outside (0.5, 2.0)         warning
    normalized_mean_out_of_range  *norm_mean outside (-3, 3)           warning
    relative_floor_widespread     *rel_floor_fraction > 0.5            warning   (RunningNorm(min_std_rel=...):
                                  most columns' spread collapsed below min_std_rel times their long-run std)
    frozen_statistics             *update_weight < 1e-3 while the same
                                  prefix's norm_mean_max_abs > 0.5     warning
    non_finite                    any tag NaN or +-inf                 critical

A threshold rule ignores non-finite values: those raise ``non_finite`` alone.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Union

import numpy as np

SEVERITIES = ("warning", "critical")
KINDS = ("above", "below", "abs_above", "outside")

Threshold = Union[float, tuple[float, float]]


@dataclass(frozen=True)
class Alert:
    """One rule firing on one scalar at one step."""

    severity: str
    rule: str
    tag: str
    step: int
    value: float
    message: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Rule(Protocol):
    name: str
    severity: str
    threshold: Any

    def check(self, scalars: Mapping[str, float], step: int) -> list[Alert]: ...

    def with_threshold(self, threshold: Any) -> "Rule": ...


def _check_severity(severity: str) -> None:
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES}, got {severity!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _format_threshold(kind: str, threshold: Threshold) -> str:
    if kind == "outside":
        return f"outside ({threshold[0]:g}, {threshold[1]:g})"
    return {"above": "above", "below": "below", "abs_above": "|value| above"}[kind] + f" {threshold:g}"


@dataclass(frozen=True)
class ThresholdRule:
    """Fires on each finite scalar whose tag matches one of ``tags`` and that crosses ``threshold``.

    ``kind``: "above" (value > threshold), "below" (value < threshold), "abs_above"
    (|value| > threshold) or "outside" (threshold = (low, high); fires unless low < value < high).
    """

    name: str
    tags: tuple[str, ...]
    kind: str
    threshold: Threshold
    severity: str
    description: str = ""

    def __post_init__(self):
        object.__setattr__(self, "tags", (self.tags,) if isinstance(self.tags, str) else tuple(self.tags))
        if not self.tags or not all(isinstance(t, str) and t for t in self.tags):
            raise ValueError(f"rule {self.name!r}: tags must be non-empty strings, got {self.tags!r}")
        if self.kind not in KINDS:
            raise ValueError(f"rule {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        _check_severity(self.severity)
        if self.kind == "outside":
            ok = (isinstance(self.threshold, (tuple, list)) and len(self.threshold) == 2
                  and all(_is_number(t) for t in self.threshold) and self.threshold[0] < self.threshold[1])
            if not ok:
                raise ValueError(f"rule {self.name!r}: threshold must be a pair (low, high) of finite numbers "
                                 f"with low < high, got {self.threshold!r}")
            object.__setattr__(self, "threshold", (float(self.threshold[0]), float(self.threshold[1])))
        elif not _is_number(self.threshold):
            raise ValueError(f"rule {self.name!r}: threshold must be a finite number, got {self.threshold!r}")

    def matches(self, tag: str) -> bool:
        return any(fnmatch.fnmatchcase(tag, pattern) for pattern in self.tags)

    def fires(self, values):
        """Whether each value crosses the threshold (a bool, or a bool array for an array);
        false for non-finite values."""
        values = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            if self.kind == "above":
                crossed = values > self.threshold
            elif self.kind == "below":
                crossed = values < self.threshold
            elif self.kind == "abs_above":
                crossed = np.abs(values) > self.threshold
            else:
                low, high = self.threshold
                crossed = (values <= low) | (values >= high)
        return crossed & np.isfinite(values)

    def message(self, tag: str, value: float) -> str:
        text = f"{tag} = {value:.4g}, {_format_threshold(self.kind, self.threshold)}"
        return f"{text}: {self.description}" if self.description else text

    def check(self, scalars: Mapping[str, float], step: int) -> list[Alert]:
        return [
            Alert(self.severity, self.name, tag, step, value, self.message(tag, value))
            for tag, value in scalars.items()
            if self.matches(tag) and self.fires(value)
        ]

    def with_threshold(self, threshold: Threshold) -> "ThresholdRule":
        return dataclasses.replace(self, threshold=threshold)


@dataclass(frozen=True)
class NonFiniteRule:
    """Fires on every scalar that is NaN or +-inf."""

    name: str = "non_finite"
    severity: str = "critical"
    threshold: None = None

    def __post_init__(self):
        _check_severity(self.severity)

    def check(self, scalars: Mapping[str, float], step: int) -> list[Alert]:
        return [
            Alert(self.severity, self.name, tag, step, value, f"{tag} = {value}: non-finite value")
            for tag, value in scalars.items()
            if not math.isfinite(value)
        ]

    def with_threshold(self, threshold: None) -> "NonFiniteRule":
        if threshold is not None:
            raise ValueError(f"rule {self.name!r} has no threshold, got {threshold!r}")
        return self


@dataclass(frozen=True)
class FrozenStatisticsRule:
    """Fires when a normalizer's statistics are frozen while the raw data moves away from them.

    For each tag ``P + "update_weight"`` (``RunningNorm.health(prefix=P)``) with a scalar
    ``P + "norm_mean_max_abs"`` beside it: fires when the update weight is below
    ``threshold[0]`` (the statistics need more than 1/weight updates to follow a change; the
    stability seed's cumulative normalizer reached 1e-4 at step 10^4) while some column's raw
    batch mean is more than ``threshold[1]`` running stds away from its running mean.
    """

    name: str = "frozen_statistics"
    severity: str = "warning"
    threshold: tuple[float, float] = (1e-3, 0.5)

    WEIGHT = "update_weight"
    DRIFT = "norm_mean_max_abs"

    def __post_init__(self):
        _check_severity(self.severity)
        ok = (isinstance(self.threshold, (tuple, list)) and len(self.threshold) == 2
              and all(_is_number(t) and t > 0 for t in self.threshold))
        if not ok:
            raise ValueError(f"rule {self.name!r}: threshold must be a pair (max_weight, min_drift) of positive "
                             f"numbers, got {self.threshold!r}")
        object.__setattr__(self, "threshold", (float(self.threshold[0]), float(self.threshold[1])))

    def check(self, scalars: Mapping[str, float], step: int) -> list[Alert]:
        max_weight, min_drift = self.threshold
        alerts = []
        for tag, weight in scalars.items():
            if not tag.endswith(self.WEIGHT):
                continue
            drift_tag = tag[: -len(self.WEIGHT)] + self.DRIFT
            drift = scalars.get(drift_tag)
            if drift is None or not (weight < max_weight and drift > min_drift):
                continue
            message = (f"{drift_tag} = {drift:.4g} above {min_drift:g} while {tag} = {weight:.3g} below "
                       f"{max_weight:g}: statistics frozen while the raw mean moves")
            alerts.append(Alert(self.severity, self.name, drift_tag, step, drift, message))
        return alerts

    def with_threshold(self, threshold: tuple[float, float]) -> "FrozenStatisticsRule":
        return dataclasses.replace(self, threshold=threshold)


DEFAULT_RULES: tuple[Rule, ...] = (
    ThresholdRule("advantages_std_low", ("*advantages_std_raw",), "below", 1e-4, "warning",
                  "advantage std in the vulnerability window, dividing by it blows advantages up"),
    ThresholdRule("advantages_norm_extreme", ("*advantages_norm_max_abs",), "above", 100.0, "critical",
                  "normalized advantages extreme"),
    ThresholdRule("grad_norm_explosion", ("*grad_norm",), "above", 1000.0, "critical", "gradient explosion"),
    ThresholdRule("explained_variance_negative", ("*explained_variance",), "below", -0.5, "critical",
                  "value function diverged"),
    ThresholdRule("clip_fraction_high", ("*clip_fraction",), "above", 0.9, "warning",
                  "almost every policy update clipped"),
    ThresholdRule("loss_explosion", ("*policy_loss", "*value_loss"), "abs_above", 10.0, "warning",
                  "loss exploding"),
    ThresholdRule("normalized_std_out_of_range", ("*norm_std",), "outside", (0.5, 2.0), "warning",
                  "normalized data far from unit std"),
    ThresholdRule("normalized_mean_out_of_range", ("*norm_mean",), "outside", (-3.0, 3.0), "warning",
                  "normalized data far from zero mean"),
    ThresholdRule("relative_floor_widespread", ("*rel_floor_fraction",), "above", 0.5, "warning",
                  "most columns held at the relative std floor: their spread collapsed against their long-run std"),
    FrozenStatisticsRule(),
    NonFiniteRule(),
)
