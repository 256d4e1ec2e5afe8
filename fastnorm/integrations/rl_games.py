"""rl_games (rl-games 1.6.5) on fastnorm: ``RunningMeanStd``, models that build it, and agents whose
advantages go through ``fastnorm.normalize_advantages``.

rl_games' models build their normalizers themselves (``BaseModelNetwork`` scripts
``RunningMeanStd`` with ``torch.jit.script``); its extension point is the model registry, so:

    from fastnorm.integrations import rl_games as fastnorm_rl_games
    fastnorm_rl_games.register_models()          # registers "fastnorm_<name>" for every built-in model
    # in the config, the one-line change: model: {name: fastnorm_continuous_a2c_logstd}
    runner.algo_factory.register_builder("a2c_continuous", fastnorm_rl_games.A2CAgent)   # the advantages too
"""

# No `from __future__ import annotations`: TorchScript reads the annotations of the methods it compiles.
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor, nn

from fastnorm import _checks, distributed, reference
from fastnorm.advantages import normalize_advantages
from fastnorm.backends import check_backend_name, select_backend
from fastnorm.integrations import fixes as fastnorm_fixes
from fastnorm.integrations import require
from fastnorm.reference import DIAG_ROWS, MOMENT_ROWS

_models = require("rl_games.algos_torch.models", "rl_games")
_model_builder = require("rl_games.algos_torch.model_builder", "rl_games")
_a2c_continuous = require("rl_games.algos_torch.a2c_continuous", "rl_games")
_a2c_discrete = require("rl_games.algos_torch.a2c_discrete", "rl_games")

CLIP = 5.0  # rl_games clamps the normalized output to [-5, 5]


class RunningMeanStd(nn.Module):
    """Drop-in for ``rl_games.algos_torch.running_mean_std.RunningMeanStd``, on fastnorm's kernels.

    Same constructor and defaults, ``forward(input, denorm=False, mask=None)`` (updates first in
    training mode), float64 buffers ``running_mean``, ``running_var`` (shape ``insize``) and ``count``
    (0-dim), so a checkpoint of either class loads into the other; TorchScript-compilable in
    training mode, as rl_games' models script it.

    By default the math is rl_games': statistics start at the prior mean 0, var 1, count 1 and merge
    each batch exactly (Chan), ``y = clamp((x - mean) / sqrt(var + epsilon), -5, 5)``, and
    ``denorm=True`` gives ``sqrt(var + epsilon) * clamp(input, -5, 5) + mean``. Unlike rl_games,
    non-finite entries never reach the statistics (a NaN stays NaN in y), and ``mask`` (bool, or
    0/1, a prefix of input's shape covering the batch dims) selects the rows each column merges;
    rl_games reduces a masked batch to one scalar mean and variance over all columns and counts
    every row. ``per_channel`` and ``norm_only`` are not supported (rl_games' models use neither).

    ``fixes=True`` turns on fastnorm's fixes (``fastnorm.integrations.FIXES``): no prior (the
    statistics start from the first batch's own), an EMA (momentum 0.99) and the std floor
    ``min_std=1e-2``; the clamp stays rl_games' 5. ``sync=True`` (which rl_games lacks) merges each
    update's batch across the ranks of ``process_group``, as ``RunningNorm(sync=True)`` does.

    The count is one number, as rl_games': each update merges every column from it and stores the
    most any column reached (columns differ only where non-finite entries were kept out).

    Scripted, the update calls the C++ ops ``torch.ops.fastnorm.*`` (CPU and CUDA kernels; not the
    Triton or reference backends: ``backend`` applies to eager calls) and needs the compiled
    extension; ``sync=True`` calls back into Python, so such a scripted module cannot be saved with
    ``torch.jit.save`` (rl_games saves state dicts).
    """

    def __init__(self, insize: Union[int, tuple[int, ...]], epsilon: float = 1e-05, per_channel: bool = False,
                 norm_only: bool = False, *, fixes: bool = False, sync: bool = False,
                 process_group: Optional[torch.distributed.ProcessGroup] = None, backend: str = "auto",
                 device: Optional[Union[str, torch.device]] = None) -> None:
        super().__init__()
        if per_channel or norm_only:
            raise ValueError("fastnorm's RunningMeanStd supports per_channel=False and norm_only=False (what "
                             f"rl_games' models build), got per_channel={per_channel}, norm_only={norm_only}")
        if process_group is not None and not sync:
            raise ValueError("process_group is only used with sync=True")
        self.insize = insize
        self.epsilon = float(_checks.check_optional_number("epsilon", epsilon))
        self.per_channel = per_channel
        self.norm_only = norm_only
        self.fixes = fixes
        options = fastnorm_fixes(clip=CLIP) if fixes else dict(momentum=None, min_std=None, clip=CLIP)
        self.momentum: Optional[float] = options["momentum"]
        self.min_std: Optional[float] = options["min_std"]
        self.clip: float = options["clip"]
        self.sync = sync
        self.process_group = process_group
        self.backend = check_backend_name(backend)
        self.diag_rows = len(DIAG_ROWS)  # the ops' diagnostics table, per call (an attribute TorchScript reads)
        shape = torch.Size([insize] if isinstance(insize, int) else insize)
        f64 = dict(dtype=torch.float64, device=device)
        self.register_buffer("running_mean", torch.zeros(shape, **f64))
        self.register_buffer("running_var", torch.ones(shape, **f64))
        self.register_buffer("count", torch.full((), 0.0 if fixes else 1.0, **f64))  # rl_games' prior: count 1

    def forward(self, input: Tensor, denorm: bool = False, mask: Optional[Tensor] = None) -> Tensor:
        """Normalizes input (``(*batch, *insize)``), first merging it into the statistics in training
        mode; ``denorm=True`` de-normalizes instead (after the same update in training mode)."""
        if not torch.jit.is_scripting():
            batch_dims = _checks.check_x(input, self.running_mean.shape, self.running_mean.device, name="input")
            if mask is not None:
                mask = mask.to(torch.bool) if isinstance(mask, Tensor) else mask
                _checks.check_mask(mask, input, batch_dims)
        else:  # the ops check shapes and dtypes; a device without fastnorm kernels (meta) would pass them
            if input.device != self.running_mean.device:
                raise ValueError(f"input is on {input.device} but the statistics are on {self.running_mean.device}")
            if mask is not None:
                mask = mask.to(torch.bool)
        if denorm:
            if self.training:
                self._update(input, mask, None)
            return self._denormalize(input)
        y = torch.empty_like(input, memory_format=torch.contiguous_format)
        if self.training:
            self._update(input, mask, y)
        else:
            self._normalize(input, y)
        return y

    def _update(self, x: Tensor, mask: Optional[Tensor], out: Optional[Tensor]) -> None:
        # Per-call scratch: a scripted module turns non-persistent buffers into state-dict entries.
        counts = self.count.expand(self.running_mean.shape).contiguous()
        diag = torch.empty((self.diag_rows, counts.numel()), dtype=torch.float64, device=counts.device)
        if self.sync:
            self._synced_update(x, mask, counts, out, diag)
        elif torch.jit.is_scripting():
            torch.ops.fastnorm.running_norm(x, mask, self.running_mean, self.running_var, counts, out, diag,
                                            self.momentum, None, self.epsilon, self.min_std, None, self.clip)
        else:
            select_backend(self.backend, x).running_norm(
                x, mask, self.running_mean, self.running_var, counts, out, diag, momentum=self.momentum,
                max_count=None, eps=self.epsilon, min_std=self.min_std, max_std=None, clip=self.clip)
        self.count.copy_(counts.amax())

    @torch.jit.ignore
    def _synced_update(self, x: Tensor, mask: Optional[Tensor], counts: Tensor, out: Optional[Tensor],
                       diag: Tensor) -> None:
        # RunningNorm's synced update: this rank's batch moments, every rank's merged in rank order.
        backend = select_backend(self.backend, x, "merge_normalize")
        moments = torch.empty((len(MOMENT_ROWS), *self.running_mean.shape), dtype=torch.float64, device=x.device)
        backend.batch_moments(x, mask, moments)
        parts = distributed.all_gather_moments(moments, self.process_group, what="RunningMeanStd(sync=True)")
        backend.merge_normalize(x, mask, parts, self.running_mean, self.running_var, counts, out, diag,
                                momentum=self.momentum, max_count=None, eps=self.epsilon, min_std=self.min_std,
                                max_std=None, clip=self.clip)

    def _normalize(self, x: Tensor, out: Tensor) -> None:
        if torch.jit.is_scripting():
            torch.ops.fastnorm.normalize(x, self.running_mean, self.running_var, out, self.epsilon, self.min_std,
                                         None, self.clip)
        else:
            select_backend(self.backend, x).normalize(x, self.running_mean, self.running_var, out, eps=self.epsilon,
                                                      min_std=self.min_std, max_std=None, clip=self.clip)

    def _denormalize(self, y: Tensor) -> Tensor:
        # RunningNorm.denormalize of rl_games' clamped input.
        std = reference.bounded_std(self.running_var, self.epsilon, self.min_std, None)
        return (y.clamp(-self.clip, self.clip).double() * std + self.running_mean).to(y.dtype)

    def extra_repr(self) -> str:
        synced = ", sync=True" if self.sync else ""
        return f"insize={self.insize}, epsilon={self.epsilon}, fixes={self.fixes}, backend={self.backend!r}{synced}"


class RunningMeanStdObs(nn.Module):
    """Drop-in for ``rl_games.algos_torch.running_mean_std.RunningMeanStdObs``: one RunningMeanStd per
    key of a dict observation."""

    def __init__(self, insize: dict[str, Any], epsilon: float = 1e-05, per_channel: bool = False,
                 norm_only: bool = False, **options: Any) -> None:
        super().__init__()
        if not isinstance(insize, dict):
            raise TypeError(f"insize must be a dict of shapes, got {type(insize).__name__}")
        self.running_mean_std = nn.ModuleDict(
            {k: RunningMeanStd(v, epsilon, per_channel, norm_only, **options) for k, v in insize.items()})

    def forward(self, input: Dict[str, Tensor], denorm: bool = False) -> Dict[str, Tensor]:
        # Iterating the ModuleDict, not indexing it by a variable key: TorchScript compiles only that.
        out: Dict[str, Tensor] = {}
        for key, norm in self.running_mean_std.items():
            out[key] = norm(input[key], denorm)
        return out


def _with_fastnorm_normalizers(model_class: type, options: dict[str, Any]) -> type:
    """model_class (an rl_games model) whose networks hold scripted fastnorm normalizers."""

    class Network(model_class.Network):
        def __init__(self, *args, normalize_value: bool, normalize_input: bool, **kwargs) -> None:
            # rl_games' own normalizers are not built: the flags are set after its constructor.
            super().__init__(*args, normalize_value=False, normalize_input=False, **kwargs)
            self.normalize_value = normalize_value
            self.normalize_input = normalize_input
            if normalize_value:
                self.value_mean_std = torch.jit.script(RunningMeanStd((self.value_size,), **options))
            if normalize_input:
                obs_norm = RunningMeanStdObs if isinstance(self.obs_shape, dict) else RunningMeanStd
                self.running_mean_std = torch.jit.script(obs_norm(self.obs_shape, **options))

    model = type(model_class.__name__, (model_class,), {"Network": Network, "__module__": __name__})
    return model


MODELS = {
    "discrete_a2c": _models.ModelA2C,
    "multi_discrete_a2c": _models.ModelA2CMultiDiscrete,
    "continuous_a2c": _models.ModelA2CContinuous,
    "continuous_a2c_logstd": _models.ModelA2CContinuousLogStd,
    "continuous_a2c_tanh": _models.ModelA2CContinuousTanh,
    "central_value": _models.ModelCentralValue,
}


def register_models(prefix: str = "fastnorm_", **options: Any) -> list[str]:
    """Registers, for each rl_games model that normalizes (MODELS), ``prefix + name``: the same model
    with fastnorm's RunningMeanStd (``options``: ``fixes``, ``sync``, ``process_group``, ``backend``).
    Returns the registered names. Then name the model in the config, e.g.
    ``model: {name: fastnorm_continuous_a2c_logstd}`` (and ``fastnorm_central_value`` for a central
    value network's ``central_value_config``)."""
    names = []
    for name, model_class in MODELS.items():
        _model_builder.register_model(prefix + name, _with_fastnorm_normalizers(model_class, options))
        names.append(prefix + name)
    return names


class FastnormAdvantages:
    """Mixin for rl_games agents: ``normalize_advantage`` uses ``fastnorm.normalize_advantages`` (std
    floor ``advantage_min_std``, default 1e-4, from ``config``) instead of ``+ 1e-8``; with an RNN's
    ``rnn_masks``, over the masked entries as rl_games does. rl_games' ``normalize_rms_advantage``
    (a moving average) is left to rl_games."""

    def prepare_dataset(self, batch_dict: dict[str, Any]) -> None:
        if not self.normalize_advantage or self.normalize_rms_advantage:
            return super().prepare_dataset(batch_dict)
        # rl_games' own normalization off for this call; ours on the advantages it stored.
        self.normalize_advantage = False
        try:
            super().prepare_dataset(batch_dict)
        finally:
            self.normalize_advantage = True
        advantages = self.dataset.values_dict["advantages"]
        masks = batch_dict.get("rnn_masks")
        mask = masks.to(torch.bool) if self.is_rnn and masks is not None else None
        min_std = self.config.get("advantage_min_std", 1e-4)
        normalize_advantages(advantages, mask=mask, min_std=min_std, out=advantages)


class A2CAgent(FastnormAdvantages, _a2c_continuous.A2CAgent):
    """rl_games' continuous A2C/PPO agent with fastnorm's advantage normalization: register it with
    ``runner.algo_factory.register_builder("a2c_continuous", A2CAgent)``."""


class DiscreteA2CAgent(FastnormAdvantages, _a2c_discrete.DiscreteA2CAgent):
    """rl_games' discrete A2C/PPO agent with fastnorm's advantage normalization: register it with
    ``runner.algo_factory.register_builder("a2c_discrete", DiscreteA2CAgent)``."""
