"""Monitor: raises alerts on training scalars each update, logs them, and writes TensorBoard.

    monitor = fastnorm.Monitor(writer=SummaryWriter(logdir))
    scalars = {**obs_norm.health(prefix="obs/"), **adv_stats.as_dict(prefix="train/advantages_"),
               "train/grad_norm": grad_norm, "train/explained_variance": ev}
    for alert in monitor.update(scalars, step=update):
        ...   # alert.severity, .rule, .tag, .step, .value, .message

The rules and their default thresholds are those of ``fastnorm.monitoring.rules`` (the seed analyses).
"""

from __future__ import annotations

import logging
from typing import Any, Iterable, Mapping, Optional

from fastnorm.monitoring.rules import DEFAULT_RULES, SEVERITIES, Alert, Rule

LOG_LEVELS = {"warning": logging.WARNING, "critical": logging.CRITICAL}


def _as_float(tag: str, value: Any) -> float:
    numel = getattr(value, "numel", None)
    if callable(numel) and numel() != 1:
        raise ValueError(f"scalars[{tag!r}] must be a number or a one-element tensor, "
                         f"got a tensor of shape {tuple(value.shape)}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"scalars[{tag!r}] must be a number or a one-element tensor, "
                        f"got {type(value).__name__}") from None


class Monitor:
    """Checks each update's scalars against alert rules.

    Args:
        thresholds: ``{rule name: threshold}`` overriding the rules' defaults (a number, or a pair
            for the range rules); None for a rule switches it off. See ``fastnorm.monitoring.rules``.
        rules: the rules to start from (default: ``fastnorm.monitoring.rules.DEFAULT_RULES``).
        writer: a ``torch.utils.tensorboard.SummaryWriter``; each update writes the scalars (when
            ``write_scalars``) and the number of alerts per severity (``monitor/warning``,
            ``monitor/critical``), and the messages of new alerts as text (``monitor/alerts``).
        logger: where alerts are logged (default: the ``fastnorm.monitor`` logger). An alert is
            logged when its (rule, tag) starts firing, at WARNING or CRITICAL, and once more at
            INFO when it stops, so a condition that lasts does not flood the log; ``update``
            returns every alert of every step.
    """

    def __init__(
        self,
        thresholds: Optional[Mapping[str, Any]] = None,
        *,
        rules: Optional[Iterable[Rule]] = None,
        writer: Any = None,
        write_scalars: bool = True,
        logger: Optional[logging.Logger] = None,
    ):
        self.rules: list[Rule] = []
        for rule in DEFAULT_RULES if rules is None else rules:
            self.add_rule(rule)
        self.set_thresholds(thresholds or {})
        self.writer = writer
        self.write_scalars = write_scalars
        self.logger = logger or logging.getLogger("fastnorm.monitor")
        self.totals = {severity: 0 for severity in SEVERITIES}
        self._next_step = 0
        self._firing: set[tuple[str, str]] = set()

    def add_rule(self, rule: Rule) -> None:
        """Adds a rule (anything with ``name``, ``severity``, ``threshold``, ``check`` and
        ``with_threshold``; see ``fastnorm.monitoring.rules``); names are unique."""
        for attribute in ("name", "severity", "threshold", "check", "with_threshold"):
            if not hasattr(rule, attribute):
                raise TypeError(f"rule must have a {attribute!r} attribute, got {type(rule).__name__}")
        if rule.severity not in SEVERITIES:
            raise ValueError(f"rule {rule.name!r}: severity must be one of {SEVERITIES}, got {rule.severity!r}")
        if any(r.name == rule.name for r in self.rules):
            raise ValueError(f"a rule named {rule.name!r} is already in this monitor")
        self.rules.append(rule)

    def set_thresholds(self, thresholds: Mapping[str, Any]) -> None:
        """Sets rules' thresholds by rule name; None removes the rule. Checks every name before
        changing anything."""
        names = [rule.name for rule in self.rules]
        unknown = sorted(set(thresholds) - set(names))
        if unknown:
            raise ValueError(f"thresholds name unknown rules {unknown}; the rules are {names}")
        updated = [rule if rule.name not in thresholds else
                   None if thresholds[rule.name] is None else rule.with_threshold(thresholds[rule.name])
                   for rule in self.rules]
        self.rules = [rule for rule in updated if rule is not None]

    @property
    def thresholds(self) -> dict[str, Any]:
        """``{rule name: threshold}`` of the rules in force."""
        return {rule.name: rule.threshold for rule in self.rules}

    def update(self, scalars: Mapping[str, Any], step: Optional[int] = None) -> list[Alert]:
        """Checks one update's scalars (numbers or one-element tensors; a tensor costs a host
        sync each, so prefer ``RunningNorm.health()`` and ``stats.as_dict()``) and returns the
        alerts. ``step`` defaults to one more than the previous update's (0 first)."""
        if not isinstance(scalars, Mapping):
            raise TypeError(f"scalars must be a mapping of tag to number, got {type(scalars).__name__}")
        step = self._next_step if step is None else int(step)
        values = {str(tag): _as_float(str(tag), value) for tag, value in scalars.items()}
        alerts = [alert for rule in self.rules for alert in rule.check(values, step)]
        new_alerts = self._log(alerts, step)
        for alert in alerts:
            self.totals[alert.severity] += 1
        if self.writer is not None:
            self._write(values, alerts, new_alerts, step)
        self._next_step = step + 1
        return alerts

    def _log(self, alerts: list[Alert], step: int) -> list[Alert]:
        firing = {(alert.rule, alert.tag) for alert in alerts}
        new_alerts = [alert for alert in alerts if (alert.rule, alert.tag) not in self._firing]
        for alert in new_alerts:
            self.logger.log(LOG_LEVELS[alert.severity], "step %d: %s [%s]", step, alert.message, alert.rule)
        for rule, tag in sorted(self._firing - firing):
            self.logger.info("step %d: %s no longer fires on %s", step, rule, tag)
        self._firing = firing
        return new_alerts

    def _write(self, values: dict[str, float], alerts: list[Alert], new_alerts: list[Alert], step: int) -> None:
        if self.write_scalars:
            for tag, value in values.items():
                self.writer.add_scalar(tag, value, step)
        for severity in SEVERITIES:
            self.writer.add_scalar(f"monitor/{severity}", sum(a.severity == severity for a in alerts), step)
        if new_alerts:
            text = "  \n".join(f"**{a.severity}** {a.message} [{a.rule}]" for a in new_alerts)
            self.writer.add_text("monitor/alerts", text, step)
