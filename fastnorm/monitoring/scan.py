"""``fastnorm scan``: the advantage-normalization blow-up's signature in past runs' TensorBoard logs.

For each run (a directory with event files) it reads the seed's key series, runs the Monitor's
threshold rules (``fastnorm.monitoring.rules``) over each whole series at once, finds the first non-finite
value, and gives a verdict: "diverged at step N, preceded by ..." lists every signal that fired
within ``lookback`` logged points before the divergence, from where its streak began (e.g. the
step where the advantage std entered the vulnerability window). A run is critical when it
diverged or a critical rule fired.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import numpy as np

from fastnorm.monitoring.events import Run, RunScalars, Series, find_runs, read_scalars
from fastnorm.monitoring.rules import DEFAULT_RULES, Rule, ThresholdRule

# The seed's metric names (shared/seeds/advantage-normalization-bug.md), keyed by what they measure.
SEED_TAGS = {
    "advantages_std_raw": "train/advantages_std_raw",
    "advantages_norm_max_abs": "train/advantages_norm_max_abs",
    "grad_norm": "train/grad_norm",
    "clip_fraction": "train/clip_fraction",
    "explained_variance": "train/explained_variance",
    "policy_loss": "train/policy_loss",
    "value_loss": "train/value_loss",
    "ep_rew_mean": "rollout/ep_rew_mean",
}
REWARD_KEY = "ep_rew_mean"
MAX_ONSETS = 50
CRITICAL_STATUSES = ("diverged", "critical")


def parse_tag_mapping(items: Iterable[str]) -> dict[str, str]:
    """``["grad_norm=optim/grad_norm", ...]`` to ``SEED_TAGS`` with those keys remapped."""
    tags = dict(SEED_TAGS)
    for item in items:
        key, sep, tag = item.partition("=")
        if not sep or not key or not tag:
            raise ValueError(f"a tag mapping must look like KEY=TAG, got {item!r}")
        if key not in SEED_TAGS:
            raise ValueError(f"unknown tag key {key!r}; the keys are {', '.join(SEED_TAGS)}")
        tags[key] = tag
    return tags


def rules_by_key(rules: Iterable[Rule] = DEFAULT_RULES) -> dict[str, list[ThresholdRule]]:
    """The threshold rules that apply to each key: those matching the key's seed tag (so a
    remapped tag keeps its rules)."""
    threshold_rules = [r for r in rules if isinstance(r, ThresholdRule)]
    return {key: [r for r in threshold_rules if r.matches(tag)] for key, tag in SEED_TAGS.items()}


@dataclass
class Finding:
    """A rule that fired on a run's series: where first, how often, where each streak began."""

    rule: str
    severity: str
    key: str
    tag: str
    first_step: int
    first_value: float
    points: int
    streaks: int
    onsets: list[int]  # the steps where the first MAX_ONSETS streaks began
    message: str  # the alert message of the first point


@dataclass
class RunReport:
    run: str
    path: str
    status: str  # "diverged", "critical", "warning", "healthy" or "no data"
    verdict: str
    diverged_at: Optional[int]
    first_non_finite: Optional[dict[str, Any]]  # {"step": N, "tags": [...]}
    findings: list[Finding]
    series: dict[str, dict[str, Any]]  # key -> tag, points, first_step, last_step
    missing: list[str]
    problems: list[str]
    data: dict[str, Series] = field(default_factory=dict, repr=False)  # key -> series, for plots

    @property
    def critical(self) -> bool:
        return self.status in CRITICAL_STATUSES

    def as_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in
               ("run", "path", "status", "verdict", "diverged_at", "first_non_finite", "series", "missing",
                "problems")}
        out["findings"] = [vars(f) for f in self.findings]
        return _json_safe(out)


def _json_safe(obj: Any) -> Any:
    """Non-finite floats as the strings "nan", "inf", "-inf" (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def _streak_starts(fires: np.ndarray) -> np.ndarray:
    """Indices where a run of true values begins."""
    previous = np.concatenate(([False], fires[:-1]))
    return np.flatnonzero(fires & ~previous)


def _findings(key: str, tag: str, series: Series, rules: list[ThresholdRule]) -> list[tuple[Finding, np.ndarray]]:
    found = []
    for rule in rules:
        fires = np.asarray(rule.fires(series.values))
        if not fires.any():
            continue
        first = int(np.argmax(fires))
        starts = _streak_starts(fires)
        value = float(series.values[first])
        finding = Finding(rule.name, rule.severity, key, tag, int(series.steps[first]), value, int(fires.sum()),
                          len(starts), [int(s) for s in series.steps[starts[:MAX_ONSETS]]], rule.message(tag, value))
        found.append((finding, fires))
    return found


def _first_non_finite(data: dict[str, Series], tags: Mapping[str, str]) -> Optional[dict[str, Any]]:
    first_steps = {}
    for key, series in data.items():
        bad = ~np.isfinite(series.values)
        if bad.any():
            first_steps[tags[key]] = int(series.steps[np.argmax(bad)])
    if not first_steps:
        return None
    step = min(first_steps.values())
    return {"step": step, "tags": [tag for tag, s in first_steps.items() if s == step]}


def _preceding(fires: np.ndarray, series: Series, step: int, lookback: int) -> Optional[tuple[int, float]]:
    """(step, value) where the last streak of ``fires`` up to ``step`` began, if it fired within
    ``lookback`` logged points of ``step``."""
    before = series.steps <= step
    fired = fires[before]
    if not fired.any():
        return None
    last = len(fired) - 1 - int(np.argmax(fired[::-1]))
    if len(fired) - 1 - last > lookback:
        return None
    quiet = np.flatnonzero(~fired[:last])
    onset = int(quiet[-1]) + 1 if len(quiet) else 0
    return int(series.steps[before][onset]), float(series.values[before][onset])


def _reward_change(data: dict[str, Series], tags: Mapping[str, str], step: int) -> Optional[str]:
    series = data.get(REWARD_KEY)
    if series is None:
        return None
    finite = np.isfinite(series.values)
    before = np.flatnonzero(finite & (series.steps < step))
    after = np.flatnonzero(finite & (series.steps >= step))
    if not len(before) or not len(after):
        return None
    return f"{tags[REWARD_KEY]} went from {series.values[before[-1]]:.4g} to {series.values[after[0]]:.4g}"


def _signal(finding: Finding, step: int, value: float) -> str:
    return f"{finding.rule} from step {step} ({finding.tag} = {value:.4g})"


def analyze_run(run: Run, scalars: RunScalars, tags: Mapping[str, str],
                rules: Optional[Mapping[str, list[ThresholdRule]]] = None, lookback: int = 50) -> RunReport:
    """The findings and verdict of one run from its scalars (``tags``: key -> tag)."""
    rules = rules_by_key() if rules is None else rules
    data = {key: scalars.series[tag] for key, tag in tags.items() if tag in scalars.series}
    missing = [tag for key, tag in tags.items() if key not in data]
    summary = {key: {"tag": tags[key], "points": len(s.steps), "first_step": int(s.steps.min()),
                     "last_step": int(s.steps.max())} for key, s in data.items()}
    found = [item for key, s in data.items() for item in _findings(key, tags[key], s, rules.get(key, []))]
    findings = sorted((f for f, _ in found), key=lambda f: f.first_step)
    non_finite = _first_non_finite(data, tags)

    if not data:
        status, verdict = "no data", "none of the scanned tags were logged"
    elif non_finite is not None:
        step = non_finite["step"]
        preceded = []
        for finding, fires in found:
            onset = _preceding(fires, data[finding.key], step, lookback)
            if onset is not None:
                preceded.append((onset[0], _signal(finding, *onset)))
        status = "diverged"
        verdict = f"diverged at step {step} (first non-finite: {', '.join(non_finite['tags'])})"
        if preceded:
            verdict += ", preceded by " + "; ".join(text for _, text in sorted(preceded))
        else:
            verdict += f", with no signal in the {lookback} logged points before"
        reward = _reward_change(data, tags, step)
        if reward:
            verdict += f"; {reward}"
    else:
        critical = [f for f in findings if f.severity == "critical"]
        shown = critical or findings
        listed = "; ".join(_signal(f, f.first_step, f.first_value) for f in shown)
        if critical:
            status, verdict = "critical", f"no divergence, but critical signals: {listed}"
        elif findings:
            status, verdict = "warning", f"healthy, with warnings: {listed}"
        else:
            points = max(len(s.steps) for s in data.values())
            status, verdict = "healthy", f"healthy: no signal in {points} logged updates"
    return RunReport(run.name, run.path, status, verdict, non_finite["step"] if non_finite else None, non_finite,
                     findings, summary, missing, scalars.problems, data)


def scan(logdir: str, tags: Optional[Mapping[str, str]] = None, rules: Iterable[Rule] = DEFAULT_RULES,
         lookback: int = 50) -> list[RunReport]:
    """Reports on every run under ``logdir`` (OSError when it cannot be read; an empty list when
    it holds no event files)."""
    tags = dict(SEED_TAGS if tags is None else tags)
    by_key = rules_by_key(rules)
    return [analyze_run(run, read_scalars(run.files, tags.values()), tags, by_key, lookback)
            for run in find_runs(logdir)]


def format_text(reports: list[RunReport]) -> str:
    """The human-readable report."""
    lines = []
    for report in reports:
        lines.append(f"run {report.run}: {report.status.upper()}")
        lines.append(f"  {report.verdict}")
        for f in report.findings:
            onsets = ", ".join(map(str, f.onsets)) + (", ..." if f.streaks > len(f.onsets) else "")
            lines.append(f"  {f.severity:8s} {f.rule}: first at step {f.first_step} ({f.tag} = {f.first_value:.4g}), "
                         f"{f.points} point(s), streaks from step {onsets}")
        if report.first_non_finite:
            nf = report.first_non_finite
            lines.append(f"  critical non_finite: first at step {nf['step']} ({', '.join(nf['tags'])})")
        if report.missing:
            lines.append(f"  missing tags: {', '.join(report.missing)}")
        for problem in report.problems:
            lines.append(f"  problem: {problem}")
    critical = sum(r.critical for r in reports)
    lines.append(f"{len(reports)} run(s) scanned, {critical} critical")
    return "\n".join(lines)


def as_json(reports: list[RunReport], logdir: str, tags: Mapping[str, str]) -> dict[str, Any]:
    return {
        "logdir": logdir,
        "tags": dict(tags),
        "critical": any(r.critical for r in reports),
        "runs": [r.as_dict() for r in reports],
    }
