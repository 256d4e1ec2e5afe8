"""Monitor and its rules: every default rule at and around its seed threshold, configuration,
logging, and the TensorBoard scalars it writes."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fastnorm import Monitor, RunningNorm
from fastnorm.monitoring.events import find_runs, read_scalars
from fastnorm.monitoring.rules import DEFAULT_RULES, FrozenStatisticsRule, ThresholdRule
from helpers import randn


def below(x: float) -> float:
    return float(np.nextafter(x, -math.inf))


def above(x: float) -> float:
    return float(np.nextafter(x, math.inf))


# (rule, severity, tag, value, fires): each seed threshold exactly, one ulp either side, and far.
THRESHOLD_CASES = [
    ("advantages_std_low", "warning", "train/advantages_std_raw", v, fires)
    for v, fires in [(below(1e-4), True), (1e-4, False), (above(1e-4), False), (2e-5, True), (0.0, True), (0.05, False)]
] + [
    ("advantages_norm_extreme", "critical", "train/advantages_norm_max_abs", v, fires)
    for v, fires in [(below(100.0), False), (100.0, False), (above(100.0), True), (385.2, True), (4.1, False)]
] + [
    ("grad_norm_explosion", "critical", "train/grad_norm", v, fires)
    for v, fires in [(below(1000.0), False), (1000.0, False), (above(1000.0), True), (2847.3, True), (0.5, False)]
] + [
    ("explained_variance_negative", "critical", "train/explained_variance", v, fires)
    for v, fires in [(below(-0.5), True), (-0.5, False), (above(-0.5), False), (-3.2, True), (0.75, False)]
] + [
    ("relative_floor_widespread", "warning", "obs/rel_floor_fraction", v, fires)
    for v, fires in [(below(0.5), False), (0.5, False), (above(0.5), True), (1.0, True), (0.0, False)]
] + [
    ("clip_fraction_high", "warning", "train/clip_fraction", v, fires)
    for v, fires in [(below(0.9), False), (0.9, False), (above(0.9), True), (0.98, True), (0.2, False)]
] + [
    ("loss_explosion", "warning", tag, v, fires)
    for tag in ("train/policy_loss", "train/value_loss")
    for v, fires in [(below(10.0), False), (10.0, False), (above(10.0), True), (-10.0, False), (below(-10.0), True),
                     (156.8, True), (-47.3, True), (0.12, False)]
] + [
    ("normalized_std_out_of_range", "warning", "obs/norm_std", v, fires)
    for v, fires in [(below(0.5), True), (0.5, True), (above(0.5), False), (1.0, False), (below(2.0), False),
                     (2.0, True), (above(2.0), True), (15.7, True), (0.0, True)]
] + [
    ("normalized_mean_out_of_range", "warning", "obs/norm_mean", v, fires)
    for v, fires in [(below(-3.0), True), (-3.0, True), (above(-3.0), False), (0.1, False), (below(3.0), False),
                     (3.0, True), (above(3.0), True)]
]


@pytest.mark.parametrize("rule,severity,tag,value,fires", THRESHOLD_CASES)
def test_default_rule_at_and_around_its_threshold(rule, severity, tag, value, fires):
    alerts = Monitor().update({tag: value}, step=7)
    if not fires:
        assert alerts == []
        return
    assert len(alerts) == 1
    alert = alerts[0]
    assert (alert.severity, alert.rule, alert.tag, alert.step, alert.value) == (severity, rule, tag, 7, value)
    assert tag in alert.message


@pytest.mark.parametrize("tag", ["train/advantages_std_raw", "train/grad_norm", "obs/norm_std", "my/own_metric"])
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_any_non_finite_value_is_critical_and_alone(tag, value):
    alerts = Monitor().update({tag: value, "train/grad_norm" if tag != "train/grad_norm" else "x": 0.5}, step=3)
    assert [(a.severity, a.rule, a.tag, a.step) for a in alerts] == [("critical", "non_finite", tag, 3)]
    assert alerts[0].value == value or (math.isnan(value) and math.isnan(alerts[0].value))


# Frozen statistics: update weight below 1e-3 while the largest normalized column mean exceeds 0.5.
FROZEN_CASES = [
    (below(1e-3), above(0.5), True), (1e-3, above(0.5), False), (below(1e-3), 0.5, False),
    (1e-4, 3.0, True), (0.01, 3.0, False), (1e-4, 0.1, False),
]


@pytest.mark.parametrize("weight,drift,fires", FROZEN_CASES)
def test_frozen_statistics_at_and_around_its_thresholds(weight, drift, fires):
    scalars = {"obs/update_weight": weight, "obs/norm_mean_max_abs": drift, "rew/update_weight": 0.5,
               "rew/norm_mean_max_abs": 5.0}
    alerts = Monitor().update(scalars, step=1)
    assert [(a.rule, a.severity, a.tag, a.value) for a in alerts] == (
        [("frozen_statistics", "warning", "obs/norm_mean_max_abs", drift)] if fires else [])


def test_frozen_statistics_from_a_running_norm(backend, device, gen):
    """The stability seed's issue 2: a cumulative normalizer stops following a shifted input;
    the default EMA follows it."""
    monitor = Monitor()
    cumulative = RunningNorm((4,), momentum=None, backend=backend, device=device)
    ema = RunningNorm((4,), momentum=0.99, backend=backend, device=device)
    for step in range(1200):
        x = randn((32, 4), gen, device=device, mean=0.0 if step < 1100 else 5.0)
        cumulative(x)
        ema(x)
    alerts = monitor.update({**cumulative.health(prefix="cumulative/"), **ema.health(prefix="ema/")})
    assert {(a.rule, a.tag) for a in alerts} >= {("frozen_statistics", "cumulative/norm_mean_max_abs")}
    assert not any(a.rule == "frozen_statistics" and a.tag.startswith("ema/") for a in alerts)


def test_a_healthy_normalizer_raises_nothing(backend, device, gen):
    """Stationary data: each column keeps its mean and scale (randn would draw new ones per call)."""
    norm = RunningNorm((3, 4), backend=backend, device=device)
    monitor = Monitor()
    col_mean = randn((3, 4), gen, device=device, mean=3.0, scale=2.0)
    col_scale = 1.0 + torch.rand((3, 4), generator=gen).to(device)
    for _ in range(20):
        norm(col_mean + col_scale * torch.randn((256, 3, 4), generator=gen).to(device))
        assert monitor.update(norm.health(prefix="obs/")) == []


def test_an_exploding_normalized_std_is_reported(backend, device, gen):
    """The stability seed's early explosion: statistics from a near-constant batch, then real data."""
    norm = RunningNorm((2,), momentum=None, min_std=None, eps=1e-6, clip=None, backend=backend, device=device)
    norm(5.0 + 1e-3 * randn((256, 2), gen, device=device))
    norm(5.0 + randn((4, 2), gen, device=device))
    alerts = Monitor().update(norm.health(prefix="obs/"))
    assert "normalized_std_out_of_range" in {a.rule for a in alerts}


def test_every_default_rule_has_a_case():
    tested = {case[0] for case in THRESHOLD_CASES} | {"frozen_statistics", "non_finite"}
    assert tested == {rule.name for rule in DEFAULT_RULES}


def test_steps_count_from_zero_unless_given():
    monitor = Monitor()
    assert [a.step for a in monitor.update({"train/grad_norm": 2e3})] == [0]
    assert [a.step for a in monitor.update({"train/grad_norm": 2e3})] == [1]
    assert [a.step for a in monitor.update({"train/grad_norm": 2e3}, step=50)] == [50]
    assert [a.step for a in monitor.update({"train/grad_norm": 2e3})] == [51]
    assert monitor.totals == {"warning": 0, "critical": 4}


def test_thresholds_are_configurable():
    monitor = Monitor(thresholds={"grad_norm_explosion": 10.0, "normalized_std_out_of_range": (0.1, 9.0),
                                  "clip_fraction_high": None})
    assert monitor.thresholds["grad_norm_explosion"] == 10.0
    assert "clip_fraction_high" not in monitor.thresholds
    assert [a.rule for a in monitor.update({"train/grad_norm": above(10.0)})] == ["grad_norm_explosion"]
    assert monitor.update({"train/grad_norm": 10.0, "obs/norm_std": 5.0, "train/clip_fraction": 1.0}) == []
    assert [a.rule for a in monitor.update({"obs/norm_std": 9.0})] == ["normalized_std_out_of_range"]


@pytest.mark.parametrize("thresholds,error,message", [
    ({"grad_norm": 10.0}, ValueError, r"unknown rules \['grad_norm'\]; the rules are"),
    ({"grad_norm_explosion": "big"}, ValueError, "threshold must be a finite number, got 'big'"),
    ({"grad_norm_explosion": math.inf}, ValueError, "threshold must be a finite number"),
    ({"normalized_std_out_of_range": (2.0, 0.5)}, ValueError, r"low < high, got \(2.0, 0.5\)"),
    ({"normalized_std_out_of_range": 1.0}, ValueError, "must be a pair"),
    ({"frozen_statistics": (0.0, 0.5)}, ValueError, "pair \\(max_weight, min_drift\\) of positive numbers"),
    ({"non_finite": 1.0}, ValueError, "has no threshold"),
])
def test_bad_thresholds_raise(thresholds, error, message):
    with pytest.raises(error, match=message):
        Monitor(thresholds=thresholds)


def test_rules_can_be_added():
    monitor = Monitor()
    monitor.add_rule(ThresholdRule("entropy_collapse", "*entropy_loss", "below", -5.0, "critical", "entropy collapsed"))
    alerts = monitor.update({"train/entropy_loss": -12.5, "train/grad_norm": 0.5}, step=1099)
    assert [(a.rule, a.severity, a.tag, a.value) for a in alerts] == [
        ("entropy_collapse", "critical", "train/entropy_loss", -12.5)]
    assert "entropy collapsed" in alerts[0].message
    with pytest.raises(ValueError, match="already in this monitor"):
        monitor.add_rule(FrozenStatisticsRule())
    only = Monitor(rules=[ThresholdRule("x_high", "x", "above", 1.0, "warning")])
    assert [a.rule for a in only.update({"x": 2.0, "train/grad_norm": 1e9})] == ["x_high"]


@pytest.mark.parametrize("kwargs,message", [
    (dict(kind="over"), "kind must be one of"),
    (dict(severity="fatal"), "severity must be one of"),
    (dict(tags=()), "tags must be non-empty strings"),
])
def test_bad_rules_raise(kwargs, message):
    args = dict(name="r", tags="x", kind="above", threshold=1.0, severity="warning") | kwargs
    with pytest.raises(ValueError, match=message):
        ThresholdRule(**args)


def test_scalars_may_be_tensors_and_must_be_scalars():
    monitor = Monitor()
    alerts = monitor.update({"train/grad_norm": torch.tensor(2847.3), "train/clip_fraction": torch.tensor([0.98])})
    assert {a.rule for a in alerts} == {"grad_norm_explosion", "clip_fraction_high"}
    with pytest.raises(ValueError, match=r"scalars\['train/grad_norm'\] must be a number or a one-element tensor, "
                                         r"got a tensor of shape \(2,\)"):
        monitor.update({"train/grad_norm": torch.ones(2)})
    with pytest.raises(TypeError, match=r"scalars\['x'\] must be a number .* got str"):
        monitor.update({"x": "high"})
    with pytest.raises(TypeError, match="scalars must be a mapping"):
        monitor.update([("x", 1.0)])


def test_alerts_are_logged_when_they_start_and_stop(caplog):
    monitor = Monitor()
    with caplog.at_level(logging.INFO, logger="fastnorm.monitor"):
        monitor.update({"train/grad_norm": 2847.3, "train/advantages_std_raw": 5e-5}, step=1)
        monitor.update({"train/grad_norm": 3000.0, "train/advantages_std_raw": 2e-5}, step=2)
        monitor.update({"train/grad_norm": 0.5, "train/advantages_std_raw": 1e-5}, step=3)
    records = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert records == [
        (logging.WARNING, "step 1: train/advantages_std_raw = 5e-05, below 0.0001: advantage std in the "
                          "vulnerability window, dividing by it blows advantages up [advantages_std_low]"),
        (logging.CRITICAL, "step 1: train/grad_norm = 2847, above 1000: gradient explosion [grad_norm_explosion]"),
        (logging.INFO, "step 3: grad_norm_explosion no longer fires on train/grad_norm"),
    ]


def test_writes_scalars_and_alert_counts_to_tensorboard(tmp_path):
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    pytest.importorskip("google_crc32c")
    writer = tensorboard.SummaryWriter(str(tmp_path))
    monitor = Monitor(writer=writer)
    monitor.update({"train/grad_norm": 0.5, "train/advantages_std_raw": 0.05}, step=10)
    monitor.update({"train/grad_norm": 2847.3, "train/advantages_std_raw": 2e-5}, step=11)
    monitor.update({"train/grad_norm": math.nan, "train/advantages_std_raw": 2e-5}, step=12)
    writer.close()
    (run,) = find_runs(str(tmp_path))
    tags = ["train/grad_norm", "train/advantages_std_raw", "monitor/warning", "monitor/critical"]
    series = read_scalars(run.files, tags).series
    assert series["train/grad_norm"].steps.tolist() == [10, 11, 12]
    np.testing.assert_allclose(series["train/grad_norm"].values, [0.5, 2847.3, math.nan], rtol=1e-6)
    assert series["monitor/critical"].values.tolist() == [0, 1, 1]
    assert series["monitor/warning"].values.tolist() == [0, 1, 1]


def window_advantages(gen, n: int = 2**17, std: float = 1e-5) -> torch.Tensor:
    """The advantage seed's no-trade batch: n equal advantages but one, with raw (Bessel) std
    ``std``: one outlier delta above the rest gives std = delta / sqrt(n)."""
    adv = torch.full((n,), float(torch.rand((), generator=gen, dtype=torch.float64)), dtype=torch.float64)
    adv[int(torch.randint(n, (), generator=gen))] += std * math.sqrt(n)
    return adv


def test_the_naive_formula_in_the_window_is_critical(gen):
    adv = window_advantages(gen)
    naive = (adv - adv.mean()) / (adv.std() + 1e-8)
    scalars = {"train/advantages_std_raw": adv.std().item(), "train/advantages_norm_max_abs": naive.abs().max().item()}
    assert scalars["train/advantages_norm_max_abs"] > 300
    alerts = Monitor().update(scalars, step=1099)
    assert {(a.rule, a.severity) for a in alerts} == {("advantages_std_low", "warning"),
                                                      ("advantages_norm_extreme", "critical")}


def test_normalize_advantages_stats_in_the_window_are_a_warning_only(gen):
    """The same batch through normalize_advantages (issue 5) and its stats.as_dict() names: the low
    raw std is flagged, the floored normalized advantages are not extreme."""
    import fastnorm

    normalize_advantages = getattr(fastnorm, "normalize_advantages", None)
    if normalize_advantages is None:
        pytest.skip("fastnorm.normalize_advantages (issue 5) is not in this build")
    _, stats = normalize_advantages(window_advantages(gen), min_std=1e-4)
    scalars = stats.as_dict(prefix="train/advantages_")
    assert {"train/advantages_std_raw", "train/advantages_norm_max_abs"} <= set(scalars)
    alerts = Monitor().update(scalars, step=1099)
    assert [(a.rule, a.severity, a.tag) for a in alerts] == [
        ("advantages_std_low", "warning", "train/advantages_std_raw")]
