"""``fastnorm scan --plot``: each run's key series, one row per run, with the alerts marked.

Warnings are orange dots, critical alerts red crosses, thresholds dashed lines, and the first
non-finite value a red vertical line. Needs matplotlib (the optional extra ``fastnorm[monitor]``);
uses the Agg canvas directly, so no GUI backend or global pyplot state is involved.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np

from fastnorm.monitoring.events import MissingExtraError
from fastnorm.monitoring.rules import DEFAULT_RULES, Rule, ThresholdRule
from fastnorm.monitoring.scan import SEED_TAGS, RunReport, rules_by_key

LOG_SCALE_KEYS = ("advantages_std_raw", "advantages_norm_max_abs", "grad_norm")
COLORS = {"warning": "tab:orange", "critical": "tab:red"}
MARKERS = {"warning": "o", "critical": "x"}


def _threshold_lines(rule: ThresholdRule) -> list[float]:
    if rule.kind == "outside":
        return list(rule.threshold)
    if rule.kind == "abs_above":
        return [rule.threshold, -rule.threshold]
    return [rule.threshold]


def plot_reports(reports: list[RunReport], path: str, rules: Iterable[Rule] = DEFAULT_RULES) -> None:
    """Draws ``reports`` (from ``fastnorm.monitoring.scan.scan``) into an image file (format from the suffix)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise MissingExtraError(f"--plot needs the optional extra: pip install 'fastnorm[monitor]' ({error})") from None
    by_key: Mapping[str, list[ThresholdRule]] = rules_by_key(rules)
    keys = [key for key in SEED_TAGS if any(key in r.data for r in reports)] or [next(iter(SEED_TAGS))]
    rows = max(len(reports), 1)
    figure = Figure(figsize=(3.2 * len(keys), 2.4 * rows))
    FigureCanvasAgg(figure)
    # Fixed spacing: a layout engine costs more than drawing 10^5-point series.
    axes = figure.subplots(rows, len(keys), squeeze=False,
                           gridspec_kw=dict(left=0.05, right=0.99, bottom=0.1, top=0.9, wspace=0.35, hspace=0.5))
    for row, report in enumerate(reports):
        for col, key in enumerate(keys):
            ax = axes[row][col]
            ax.set_title(f"{report.run}: {key}" if col == 0 else key, fontsize=8)
            ax.tick_params(labelsize=7)
            series = report.data.get(key)
            if series is None:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, fontsize=8)
                continue
            ax.plot(series.steps, series.values, lw=0.8, color="tab:blue")
            if key in LOG_SCALE_KEYS and np.any(series.values > 0):
                ax.set_yscale("log")
            for rule in by_key.get(key, []):
                for level in _threshold_lines(rule):
                    ax.axhline(level, ls="--", lw=0.6, color=COLORS[rule.severity])
                fires = np.asarray(rule.fires(series.values))
                if fires.any():
                    ax.scatter(series.steps[fires], series.values[fires], s=12, marker=MARKERS[rule.severity],
                               color=COLORS[rule.severity], zorder=3)
            if report.diverged_at is not None:
                ax.axvline(report.diverged_at, color="tab:red", lw=1.0)
        axes[row][0].set_ylabel(report.status, fontsize=8)
    figure.savefig(path, dpi=100)
