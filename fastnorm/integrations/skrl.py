"""skrl (skrl 2.1.1) on fastnorm: ``RunningStandardScaler`` and a PPO agent whose advantages go
through ``fastnorm.normalize_advantages``.

skrl takes its preprocessors by class in the agent's cfg, so the change is the class:

    from fastnorm.integrations.skrl import PPO, RunningStandardScaler
    cfg["observation_preprocessor"] = RunningStandardScaler   # was skrl's, same kwargs
    cfg["value_preprocessor"] = RunningStandardScaler
    agent = PPO(models=..., memory=..., cfg=cfg, ...)         # the advantages too (optional)

Pass ``fixes=True`` (and ``sync=True``) through the cfg's ``*_preprocessor_kwargs``.
"""

from __future__ import annotations

import sys
from typing import Any, Optional, Union

import torch
from torch import Tensor

from fastnorm.advantages import AdvantageStats, normalize_advantages
from fastnorm.integrations import fixes as fastnorm_fixes
from fastnorm.integrations import require
from fastnorm.running_norm import RunningNorm, _check_statistic

_skrl = require("skrl", "skrl")
_spaces = require("skrl.utils.spaces.torch", "skrl")
_ppo = require("skrl.agents.torch.ppo", "skrl")

__all__ = ["PPO", "RunningStandardScaler"]

STATE_KEYS = {"running_mean": "mean", "running_variance": "var", "current_count": "count"}  # skrl: fastnorm


class RunningStandardScaler(RunningNorm):
    """Drop-in for ``skrl.resources.preprocessors.torch.RunningStandardScaler`` on fastnorm's kernels.

    Same constructor and defaults, ``__call__(x, *, train=False, inverse=False, no_grad=True)``,
    and the same state dict (float64 ``running_mean``, ``running_variance`` of shape ``(size,)``
    and a 0-dim ``current_count``), so a checkpoint of either class loads into the other.

    By default the math is skrl's: the statistics start at the prior mean 0, variance 1, count 1,
    ``train=True`` merges the batch (all leading dims; its unbiased variance) exactly into them
    before normalizing, ``y = clamp((x - mean) / (sqrt(var) + epsilon), -clip_threshold,
    clip_threshold)``, and ``inverse=True`` gives ``std * clamp(x, -clip, clip) + mean`` (skrl's std
    there is ``sqrt(var)``, here ``sqrt(var) + epsilon``: equal within float32 rounding). Unlike
    skrl, non-finite entries never reach the statistics (NaN stays NaN in y, +-inf becomes
    +-clip_threshold) and a single-row batch merges a variance of 0 where skrl's ``torch.var``
    gives NaN statistics.

    ``fixes=True`` turns on fastnorm's fixes (``fastnorm.integrations.FIXES``): no prior (the
    statistics start from the first batch's own; skrl's count-1 prior at 0 adds about
    mean^2 / count to the variance), a warm-started EMA (momentum 0.99, not a cumulative mean
    frozen by its count) and the std floor ``min_std=1e-2``; the clamp stays ``clip_threshold``.
    ``sync=True`` (which skrl lacks) merges each update across the ranks of ``process_group``.

    The count is stored as one number, as skrl's: the most any feature reached (features differ
    only where non-finite entries were kept out). ``no_grad=False`` with an input that requires
    grad is refused: fastnorm's kernels do not backpropagate (skrl's agents never ask for it).
    """

    def __init__(
        self,
        size: Union[int, list[int], Any],
        *,
        epsilon: float = 1e-8,
        clip_threshold: float = 5.0,
        device: Optional[Union[str, torch.device]] = None,
        fixes: bool = False,
        sync: bool = False,
        process_group: Optional[torch.distributed.ProcessGroup] = None,
        backend: str = "auto",
    ) -> None:
        options = fastnorm_fixes(clip=clip_threshold) if fixes else dict(momentum=None, min_std=None,
                                                                          clip=clip_threshold)
        super().__init__(_spaces.compute_space_size(size, occupied_size=True), eps=epsilon, eps_placement="std",
                         batch_var="unbiased", device=_skrl.config.torch.parse_device(device), backend=backend,
                         sync=sync, process_group=process_group, **options)
        self.epsilon = epsilon
        self.clip_threshold = clip_threshold
        self.device = self.mean.device
        self.fixes = fixes
        self.reset()

    def forward(self, x: Optional[Tensor], *, train: bool = False, inverse: bool = False,
                no_grad: bool = True) -> Optional[Tensor]:
        """Normalizes x (``(*batch, size)``), first merging it into the statistics when ``train``;
        ``inverse=True`` de-normalizes instead (after the same update when ``train``)."""
        if x is None:
            return None
        if not no_grad and torch.is_grad_enabled() and isinstance(x, Tensor) and x.requires_grad:
            raise NotImplementedError("RunningStandardScaler: no_grad=False with an x that requires grad is not "
                                      "supported (fastnorm's kernels do not backpropagate); got x.requires_grad=True")
        with torch.no_grad():
            if inverse:
                if train:
                    self.update(x)
                return self.denormalize(x.clamp(-self.clip_threshold, self.clip_threshold))
            return super().forward(x, update=train)

    def reset(self) -> None:
        """Back to the initial statistics: skrl's prior (mean 0, var 1, count 1), or with ``fixes``
        none (count 0)."""
        super().reset()
        if not self.fixes:
            self.count.fill_(1.0)

    @property
    def running_mean(self) -> Tensor:
        return self.mean

    @property
    def running_variance(self) -> Tensor:
        return self.var

    @property
    def current_count(self) -> Tensor:
        return self.count.amax()

    # skrl's state keys in place of RunningNorm's (mean, var, count per feature, steps, extra state).
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for skrl_name in STATE_KEYS:
            value = getattr(self, skrl_name)
            destination[prefix + skrl_name] = value if keep_vars else value.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        own = {prefix + "steps": self.steps, prefix + "_extra_state": self.get_extra_state()}
        for skrl_name, name in STATE_KEYS.items():
            value = state_dict.get(prefix + skrl_name)
            if value is None:
                missing_keys.append(prefix + skrl_name)
                value = getattr(self, name)
            else:  # checked here too, so that an error names skrl's key
                _check_statistic(prefix + skrl_name, value, torch.Size([]) if name == "count" else self.shape)
                value = value.expand(self.shape)
            own[prefix + name] = value
        others = {k: v for k, v in state_dict.items()
                  if k.startswith(prefix) and k[len(prefix):] not in STATE_KEYS}
        super()._load_from_state_dict({**others, **own}, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        synced = ", sync=True" if self.sync else ""
        return (f"size={self.shape[0]}, epsilon={self.epsilon}, clip_threshold={self.clip_threshold}, "
                f"fixes={self.fixes}, backend={self.backend!r}{synced}")


class PPO(_ppo.PPO):
    """skrl's PPO whose advantages are normalized by :func:`fastnorm.normalize_advantages` (a std
    floor ``advantage_min_std`` instead of skrl's ``+ 1e-8``, which turns near-equal advantages into
    +-sqrt(n); NaN advantages kept out of the statistics; ``advantage_sync=True`` takes the
    statistics across the ranks of ``advantage_process_group``). Everything else is skrl's.

    skrl computes returns and normalized advantages in one module-level ``compute_gae`` that its
    ``update`` calls; for the duration of ``update`` that name refers to a function that runs
    skrl's own ``compute_gae`` in float64 (so ``returns - values`` recovers the raw advantages
    without float32 cancellation) and normalizes those with fastnorm. The statistics of the last
    update are in ``advantage_stats`` (an :class:`fastnorm.AdvantageStats`, on device).
    """

    def __init__(self, *args, advantage_min_std: float = 1e-4, advantage_sync: bool = False,
                 advantage_process_group: Optional[torch.distributed.ProcessGroup] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.advantage_min_std = advantage_min_std
        self.advantage_sync = advantage_sync
        self.advantage_process_group = advantage_process_group
        self.advantage_stats: Optional[AdvantageStats] = None

    def update(self, *, timestep: int, timesteps: int) -> None:
        module = sys.modules[_ppo.PPO.__module__]
        skrl_compute_gae = module.compute_gae

        def compute_gae(*, values: Tensor, **kwargs: Any) -> tuple[Tensor, Tensor]:
            as_double = {k: v.double() if isinstance(v, Tensor) and v.is_floating_point() else v
                         for k, v in kwargs.items()}
            returns, _ = skrl_compute_gae(values=values.double(), **as_double)
            advantages = (returns - values.double()).to(values.dtype)
            normalized, self.advantage_stats = normalize_advantages(
                advantages, min_std=self.advantage_min_std, sync=self.advantage_sync,
                process_group=self.advantage_process_group)
            return returns.to(values.dtype), normalized

        module.compute_gae = compute_gae
        try:
            super().update(timestep=timestep, timesteps=timesteps)
        finally:
            module.compute_gae = skrl_compute_gae

