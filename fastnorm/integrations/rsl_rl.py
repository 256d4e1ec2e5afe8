"""rsl_rl (rsl-rl-lib 5.5.1) on fastnorm: ``EmpiricalNormalization`` and a PPO whose advantages go
through ``fastnorm.normalize_advantages``.

In the runner's config, the one-line change (the same for "critic"; RNNModel and CNNModel too):

    "actor": {"class_name": "fastnorm.integrations.rsl_rl:MLPModel", "obs_normalization": True, ...}
    "algorithm": {"class_name": "fastnorm.integrations.rsl_rl:PPO", ...}     # the advantages too
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from fastnorm.advantages import normalize_advantages
from fastnorm.integrations import fixes as fastnorm_fixes
from fastnorm.integrations import require
from fastnorm.running_norm import RunningNorm

_rsl_rl_models = require("rsl_rl.models", "rsl_rl")
_rsl_rl_algorithms = require("rsl_rl.algorithms", "rsl_rl")

_HOST_KEYS = ("_mean", "_var", "_std", "count")


class EmpiricalNormalization(nn.Module):
    """Drop-in for ``rsl_rl.modules.normalization.EmpiricalNormalization``, statistics in float64.

    Same constructor, defaults, methods (``forward`` normalizes only, ``update`` learns only in
    training mode and until ``count >= until``, ``inverse``), properties (``mean``, ``std``: copies in
    the default float dtype, as rsl_rl's) and state-dict keys (``_mean``, ``_var``, ``_std`` of
    shape (1, *shape), ``count``): a checkpoint of either class loads into the other. The state dict
    holds float64 ``_mean``, ``_var`` and ``_std`` (rsl_rl's class casts them to float32 on load) and
    ``count`` as a long: the most samples any column has merged.

    By default the math is rsl_rl's: the exact cumulative (Chan) merge from count 0, population
    batch variance, ``y = (x - mean) / (sqrt(var) + eps)``, no clamp. Unlike rsl_rl, non-finite
    entries never reach the statistics (each column merges its finite entries; a NaN in x stays
    NaN in y). ``fixes=True`` turns on fastnorm's fixes (``fastnorm.integrations.FIXES``): an EMA
    warm-started from the first batch (momentum 0.99), the std floor ``min_std=1e-2`` and the clamp
    to [-10, 10].

    ``sync`` (default: whether torch.distributed is initialized when the module is built, as
    rsl_rl's runner does before it builds the models) merges every update's batch across ranks,
    as rsl_rl's all-reduces do, through ``RunningNorm(sync=True)``: every rank gets bitwise the same
    statistics. The RunningNorm holding the statistics is ``.norm`` (``diagnostics()``, ``health()``).
    """

    # Python-side views of the statistics; a scripted export needs forward only.
    __jit_unused_properties__ = ["mean", "std", "_mean", "_var", "_std", "count"]

    def __init__(self, shape: Union[int, tuple[int, ...], list[int]], eps: float = 1e-2,
                 until: Optional[int] = None, *, fixes: bool = False, sync: Optional[bool] = None,
                 backend: str = "auto", device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        if sync is None:
            sync = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.eps = eps
        self.until = until
        self.fixes = fixes
        options = fastnorm_fixes() if fixes else dict(momentum=None, min_std=None, clip=None)
        self.norm = RunningNorm(shape, eps=eps, eps_placement="std", backend=backend, device=device, sync=sync,
                                **options)
        self.norm.forward_updates = False  # rsl_rl updates through update(): scripting works in training mode
        self.register_state_dict_post_hook(_host_state_dict)

    @property
    def mean(self) -> Tensor:
        """The running mean, shape ``shape``, in the default float dtype (a copy)."""
        return self.norm.mean.to(torch.get_default_dtype(), copy=True)

    @property
    def std(self) -> Tensor:
        """The running standard deviation sqrt(var) (without eps), in the default float dtype (a copy)."""
        return self.norm.var.sqrt().to(torch.get_default_dtype())

    # rsl_rl's buffers, read-only: (1, *shape) copies in the default float dtype.
    @property
    def _mean(self) -> Tensor:
        return self.mean.unsqueeze(0)

    @property
    def _var(self) -> Tensor:
        return self.norm.var.to(torch.get_default_dtype(), copy=True).unsqueeze(0)

    @property
    def _std(self) -> Tensor:
        return self.std.unsqueeze(0)

    @property
    def count(self) -> Tensor:
        """Samples learned so far (0-dim long): the most any column has merged."""
        return self.norm.count.amax().round().long()

    def forward(self, x: Tensor) -> Tensor:
        """Normalizes x (``(batch, *shape)``) with the current statistics; never updates them. Exports
        (TorchScript, ONNX) hold it as standard ops: see fastnorm.export."""
        return self.norm(x, update=False)

    @torch.jit.unused
    def update(self, x: Tensor) -> None:
        """Learns x's statistics: only in training mode, and while ``count < until``."""
        if not self.training:
            return
        if self.until is not None and int(self.count) >= self.until:
            return
        self.norm.update(x)

    @torch.jit.unused
    def inverse(self, y: Tensor) -> Tensor:
        """De-normalizes y: ``y * (sqrt(var) + eps) + mean``."""
        return self.norm.denormalize(y)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # rsl_rl's keys become the RunningNorm's, validated by its own loader; _std is sqrt(_var).
        norm = self.norm
        present = {name: state_dict.pop(prefix + name) for name in _HOST_KEYS if prefix + name in state_dict}
        if not present:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        if strict:
            missing_keys.extend(prefix + name for name in _HOST_KEYS if name not in present)
        host_shape = (1, *norm.shape)
        for name in ("_mean", "_var", "_std"):
            value = present.get(name)
            if value is not None and tuple(value.shape) != host_shape:
                error_msgs.append(f"size mismatch for {prefix}{name}: expected shape {host_shape}, "
                                  f"got {tuple(value.shape)}")
                return
        count = present.get("count")
        if count is not None and count.numel() != 1:
            error_msgs.append(f"size mismatch for {prefix}count: expected one element, got shape {tuple(count.shape)}")
            return
        inner = prefix + "norm."
        state_dict[inner + "mean"] = present["_mean"].reshape(norm.shape) if "_mean" in present else norm.mean
        state_dict[inner + "var"] = present["_var"].reshape(norm.shape) if "_var" in present else norm.var
        state_dict[inner + "count"] = count.expand(norm.shape) if count is not None else norm.count
        state_dict[inner + "steps"] = norm.steps
        state_dict[inner + "_extra_state"] = norm.get_extra_state()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _host_state_dict(module: EmpiricalNormalization, state_dict, prefix: str, local_metadata) -> None:
    """The state dict under rsl_rl's keys instead of the RunningNorm's."""
    for key in [k for k in state_dict if k.startswith(prefix + "norm.")]:
        del state_dict[key]
    norm = module.norm
    state_dict[prefix + "_mean"] = norm.mean.detach().unsqueeze(0)
    state_dict[prefix + "_var"] = norm.var.detach().unsqueeze(0)
    state_dict[prefix + "_std"] = norm.var.detach().sqrt().unsqueeze(0)
    state_dict[prefix + "count"] = module.count


def _with_fastnorm_normalizer(model_class: type) -> type:
    """model_class (an rsl_rl model) whose observation normalizer is fastnorm's EmpiricalNormalization."""

    class Model(model_class):
        __doc__ = (f"rsl_rl's {model_class.__name__} with fastnorm's EmpiricalNormalization (``fixes`` passed "
                   "through) as its observation normalizer; in the runner's config: ``{\"class_name\": "
                   f"\"fastnorm.integrations.rsl_rl:{model_class.__name__}\", \"obs_normalization\": True, ...}}``.")

        def __init__(self, *args, fixes: bool = False, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            if self.obs_normalization:
                self.obs_normalizer = EmpiricalNormalization(self.obs_dim, fixes=fixes)

    Model.__name__ = Model.__qualname__ = model_class.__name__
    return Model


MLPModel = _with_fastnorm_normalizer(_rsl_rl_models.MLPModel)
RNNModel = _with_fastnorm_normalizer(_rsl_rl_models.RNNModel)
CNNModel = _with_fastnorm_normalizer(_rsl_rl_models.CNNModel)


class PPO(_rsl_rl_algorithms.PPO):
    """rsl_rl's PPO whose rollout advantages are normalized by ``fastnorm.normalize_advantages``: a
    std floor ``advantage_min_std`` instead of ``+ 1e-8`` (a batch of near-equal advantages is no
    longer blown up to +-sqrt(n)), NaN advantages kept out of the statistics. Use it as
    ``{"algorithm": {"class_name": "fastnorm.integrations.rsl_rl:PPO", ...}}``. Normalizes the whole
    rollout once, rsl_rl's default (``normalize_advantage_per_mini_batch=False``)."""

    def __init__(self, *args, advantage_min_std: float = 1e-4, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.normalize_advantage_per_mini_batch:
            raise ValueError("fastnorm.integrations.rsl_rl.PPO normalizes the rollout's advantages once: "
                             "normalize_advantage_per_mini_batch must be False, got True")
        self.advantage_min_std = advantage_min_std

    def compute_returns(self, obs) -> None:
        # rsl_rl normalizes in compute_returns unless per mini-batch: skip its formula, apply ours.
        self.normalize_advantage_per_mini_batch = True
        try:
            super().compute_returns(obs)
        finally:
            self.normalize_advantage_per_mini_batch = False
        advantages = self.storage.advantages
        normalize_advantages(advantages, min_std=self.advantage_min_std, out=advantages)
