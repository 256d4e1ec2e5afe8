"""TorchRL: ``RunningNormTransform``, a TorchRL ``Transform`` over fastnorm's RunningNorm, and the
PPO losses (``ClipPPOLoss``, ``PPOLoss``, ``KLPENPPOLoss``) with their advantage normalization
through ``fastnorm.normalize_advantages``.

    env = TransformedEnv(base_env, RunningNormTransform(in_keys=[("agents", "observation")],
                                                        mask_key=("agents", "active")))
    loss = ClipPPOLoss(actor, critic, normalize_advantage=True, normalize_advantage_exclude_dims=(-2,))

Where TorchRL's ``VecNormV2`` keeps float32 E[x] and E[x^2] (its variance E[x^2] - E[x]^2 cancels to
0 or below for large means: NaN on the first batch with ``decay=1``), this transform keeps float64
mean, variance and count per entry of the statistics, never lets a non-finite input reach them,
and with ``sync=True`` combines every update across the ranks of a process group.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from fastnorm.advantages import AdvantageStats, normalize_advantages
from fastnorm.integrations import require
from fastnorm.running_norm import RunningNorm

require("torchrl", "torchrl")

from tensordict import NestedKey, TensorDictBase, unravel_key  # noqa: E402
from torchrl.data.tensor_specs import Composite, Unbounded  # noqa: E402
from torchrl.envs.common import EnvBase  # noqa: E402
from torchrl.envs.transforms import Transform  # noqa: E402
from torchrl.envs.transforms.utils import _set_missing_tolerance  # noqa: E402
from torchrl.envs.utils import ExplorationType, exploration_type  # noqa: E402
from torchrl import objectives  # noqa: E402

__all__ = ["ClipPPOLoss", "FastnormAdvantages", "KLPENPPOLoss", "PPOLoss", "RunningNormTransform"]

KEY_SEP = "/"  # joins a nested key into a module name ("." is not allowed there)


class RunningNormTransform(Transform):
    """Normalizes ``in_keys`` with running statistics over the env's batch dims, written to ``out_keys``.

    Each in_key gets its own :class:`fastnorm.RunningNorm` whose statistics shape is the entry's
    shape beyond the env's batch size, read from the parent env's spec (e.g. ``(n_agents,
    n_features)`` for ``("agents", "observation")`` of a multi-agent env with ``batch_size=(N,)``:
    statistics per agent and feature, reduced over the N envs). Without a parent env the shape is
    taken from the first tensordict seen: the entry's shape beyond the tensordict's batch dims.

    The statistics are updated on every ``env.step`` and ``env.reset`` of data collection and are
    fixed during evaluation: under TorchRL's evaluation context (``set_exploration_type`` to
    DETERMINISTIC, MODE or MEAN) and while frozen (:meth:`freeze`, as ``VecNormV2``). (TorchRL puts
    every transform in eval mode when it is attached to an env, so ``env.train()`` / ``env.eval()``
    do not say whether data is collected.) At a partial reset only the envs (or agents) the reset
    key marks update the statistics. ``forward`` (replay buffers, offline data) only normalizes.
    In a ``ParallelEnv``, put the transform on the outer env: one update per step of all workers.
    The statistics live in the transform's ``state_dict`` (and so in the ``TransformedEnv``'s) as
    ``norms.<key>.mean``, ``.var``, ``.count``, ``.steps`` (and ``.scale`` with ``min_std_rel``; ``<key>``: the nested key joined by "/").

    Args:
        in_keys: the float entries to normalize, e.g. ``[("agents", "observation")]``.
        out_keys: where to write the normalized entries (default: ``in_keys``, in place).
        mask_key: an optional bool entry whose shape is a prefix of the normalized entries'
            (e.g. ``("agents", "active")`` of shape ``(N, n_agents)``); false entries are left out
            of the statistics (inactive agents) and are still normalized.
        decay: the EMA momentum of :class:`fastnorm.RunningNorm` (weight of the old statistics
            once warm; early updates are exact averages). ``None`` or 1: the exact cumulative mean
            and variance (``VecNormV2``'s ``decay=1``, without its cancellation).
        eps, min_std, max_std, clip, max_count: as in :class:`fastnorm.RunningNorm`: the divisor is
            ``clamp(sqrt(var + eps), min_std, max_std)`` and the output is clamped to ``[-clip, clip]``.
        min_std_rel: the relative std floor of :class:`fastnorm.RunningNorm` (None: off): the divisor
            never falls below ``min_std_rel`` times each column's long-run std; the state dict then
            also holds ``norms.<key>.scale``.
        backend: the fastnorm backend ("auto", "cpu", "cuda", "triton", "reference").
        sync: combine each update across the ranks of ``process_group`` (TorchRL has no rank sync);
            every rank must then step its env the same number of times.
        process_group: the torch.distributed group for ``sync`` (None: the default group).
    """

    def __init__(
        self,
        in_keys: Sequence[NestedKey],
        out_keys: Optional[Sequence[NestedKey]] = None,
        *,
        mask_key: Optional[NestedKey] = None,
        decay: Optional[float] = 0.99,
        eps: float = 1e-4,
        min_std: Optional[float] = 1e-2,
        max_std: Optional[float] = None,
        clip: Optional[float] = 10.0,
        max_count: Optional[float] = None,
        min_std_rel: Optional[float] = None,
        backend: str = "auto",
        sync: bool = False,
        process_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        in_keys = _key_list(in_keys)
        out_keys = list(in_keys) if out_keys is None else _key_list(out_keys)
        if len(out_keys) != len(in_keys):
            raise ValueError(f"out_keys must have one key per in_key ({len(in_keys)}), got {len(out_keys)}")
        super().__init__(in_keys=in_keys, out_keys=out_keys)
        self.mask_key = None if mask_key is None else unravel_key(mask_key)
        self.norm_kwargs = dict(momentum=decay, eps=eps, min_std=min_std, max_std=max_std, clip=clip,
                                max_count=max_count, min_std_rel=min_std_rel, backend=backend, sync=sync, process_group=process_group)
        RunningNorm(1, **self.norm_kwargs)  # checks the arguments now rather than at the first step
        self.norms = nn.ModuleDict()
        self.frozen = False

    # ------------------------------------------------------------------ statistics

    def norm(self, in_key: NestedKey) -> RunningNorm:
        """The RunningNorm of ``in_key`` (created from the parent env's spec or the first data)."""
        return self.norms[_module_name(unravel_key(in_key))]

    def freeze(self) -> "RunningNormTransform":
        """Stops updating the statistics (normalizing goes on); see :meth:`unfreeze`."""
        self.frozen = True
        return self

    def unfreeze(self) -> "RunningNormTransform":
        """Updates the statistics again during data collection."""
        self.frozen = False
        return self

    def _create_norm(self, in_key: NestedKey, shape: torch.Size, device: Optional[torch.device]) -> RunningNorm:
        norm = RunningNorm(shape, device=device, **self.norm_kwargs)
        self.norms[_module_name(in_key)] = norm
        return norm

    def _norm_for(self, in_key: NestedKey, value: Tensor, batch_dims: int) -> RunningNorm:
        name = _module_name(in_key)
        if name not in self.norms:
            return self._create_norm(in_key, value.shape[batch_dims:], value.device)
        return self.norms[name]

    def set_container(self, container: Union[Transform, EnvBase]) -> None:
        super().set_container(container)
        parent = self.parent
        if parent is None:
            return
        specs = parent.output_spec
        for in_key in self.in_keys:
            if _module_name(in_key) in self.norms:
                continue
            for group in ("full_observation_spec", "full_reward_spec"):
                spec = specs[group]
                if in_key in spec.keys(True, True):
                    leaf = spec[in_key]
                    self._create_norm(in_key, leaf.shape[len(parent.batch_size):], leaf.device or parent.device)
                    break

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A transform that has not seen its env yet takes the statistics shapes from the state.
        for in_key in self.in_keys:
            name = _module_name(in_key)
            saved_mean = state_dict.get(f"{prefix}norms.{name}.mean")
            if name not in self.norms and isinstance(saved_mean, Tensor):
                self._create_norm(in_key, saved_mean.shape, saved_mean.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ------------------------------------------------------------------ calls

    def _normalize_keys(self, tensordict: TensorDictBase, update: bool,
                        selected: Optional[dict] = None) -> TensorDictBase:
        mask = None
        if self.mask_key is not None:
            mask = tensordict.get(self.mask_key, None)
            if mask is None and not self.missing_tolerance:
                raise KeyError(f"{type(self).__name__}: mask_key {self.mask_key!r} not found in the tensordict")
        for in_key, out_key in zip(self.in_keys, self.out_keys):
            value = tensordict.get(in_key, None)
            if value is None:
                if self.missing_tolerance:
                    continue
                raise KeyError(f"{type(self).__name__}: in_key {in_key!r} not found in the tensordict")
            norm = self._norm_for(in_key, value, tensordict.batch_dims)
            key_mask = _and_masks(mask, None if selected is None else selected.get(in_key))
            tensordict.set(out_key, norm(value, mask=key_mask, update=update))
        return tensordict

    @property
    def _updating(self) -> bool:
        return not self.frozen and exploration_type() in (None, ExplorationType.RANDOM)

    def _call(self, next_tensordict: TensorDictBase) -> TensorDictBase:
        return self._normalize_keys(next_tensordict, update=self._updating)

    def _reset(self, tensordict: TensorDictBase, tensordict_reset: TensorDictBase) -> TensorDictBase:
        # Rewards are missing at reset; the envs the reset keys do not mark keep their data.
        resets = {in_key: _reset_mask(tensordict, in_key) for in_key in self.in_keys}
        with _set_missing_tolerance(self, True):
            return self._normalize_keys(tensordict_reset, update=self._updating, selected=resets)

    def forward(self, tensordict: TensorDictBase) -> TensorDictBase:
        """Normalizes ``in_keys`` of ``tensordict`` (e.g. sampled from a replay buffer) without
        updating the statistics."""
        return self._normalize_keys(tensordict, update=False)

    # ------------------------------------------------------------------ specs

    def _transform_spec(self, spec: Composite) -> Composite:
        for in_key, out_key in zip(self.in_keys, self.out_keys):
            if in_key not in spec.keys(True, True):
                continue
            leaf = spec[in_key]
            if not leaf.dtype.is_floating_point:
                raise TypeError(f"{type(self).__name__} normalizes float entries; {in_key!r} has dtype {leaf.dtype}")
            # Normalized values are no longer within the entry's bounds (if any).
            spec[out_key] = Unbounded(shape=leaf.shape, device=leaf.device, dtype=leaf.dtype)
        return spec

    def transform_observation_spec(self, observation_spec: Composite) -> Composite:
        return self._transform_spec(observation_spec)

    def transform_reward_spec(self, reward_spec: Composite) -> Composite:
        return self._transform_spec(reward_spec)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in_keys={self.in_keys}, out_keys={self.out_keys}, mask_key={self.mask_key!r})"


class FastnormAdvantages:
    """Mixin for TorchRL's PPO losses: ``normalize_advantage=True`` goes through
    :func:`fastnorm.normalize_advantages`, with the same groups (``normalize_advantage_exclude_dims``
    keeps e.g. the agents dim apart: per-agent statistics), the same ``"shifted_valid"`` mask and
    Bessel's correction as TorchRL's, and a divisor never below ``advantage_min_std`` (TorchRL
    clamps at 1e-6, or 1e-4 with a mask). The statistics of the last normalization are in
    ``advantage_stats`` (an :class:`fastnorm.AdvantageStats`, on device); ``advantage_sync=True``
    takes them across the ranks of ``advantage_process_group``. Every other argument is TorchRL's.
    """

    def __init__(self, *args, advantage_min_std: float = 1e-4, advantage_sync: bool = False,
                 advantage_process_group: Optional[torch.distributed.ProcessGroup] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.advantage_min_std = advantage_min_std
        self.advantage_sync = advantage_sync
        self.advantage_process_group = advantage_process_group
        self.advantage_stats: Optional[AdvantageStats] = None

    def _standardize_advantage(self, advantage: Tensor, tensordict: TensorDictBase) -> Tensor:
        mask = tensordict.get("shifted_valid", default=None)
        if mask is not None:
            while mask.ndim < advantage.ndim:
                mask = mask.unsqueeze(-1)
            mask = mask.expand_as(advantage).bool()
        excluded = {d % advantage.ndim for d in self.normalize_advantage_exclude_dims}
        reduced = tuple(d for d in range(advantage.ndim) if d not in excluded)
        normalized, self.advantage_stats = normalize_advantages(
            advantage, mask=mask, dim=reduced, min_std=self.advantage_min_std, unbiased=True,
            sync=self.advantage_sync, process_group=self.advantage_process_group)
        return normalized


class ClipPPOLoss(FastnormAdvantages, objectives.ClipPPOLoss):
    """TorchRL's ``ClipPPOLoss`` with its advantages through fastnorm (see :class:`FastnormAdvantages`)."""


class PPOLoss(FastnormAdvantages, objectives.PPOLoss):
    """TorchRL's ``PPOLoss`` with its advantages through fastnorm (see :class:`FastnormAdvantages`)."""


class KLPENPPOLoss(FastnormAdvantages, objectives.KLPENPPOLoss):
    """TorchRL's ``KLPENPPOLoss`` with its advantages through fastnorm (see :class:`FastnormAdvantages`)."""


def _key_list(keys: Union[NestedKey, Sequence[NestedKey]]) -> list[NestedKey]:
    return [unravel_key(k) for k in ([keys] if isinstance(keys, (str, tuple)) else keys)]


def _module_name(key: NestedKey) -> str:
    return KEY_SEP.join(key) if isinstance(key, tuple) else key


def _reset_mask(tensordict: Optional[TensorDictBase], in_key: NestedKey) -> Optional[Tensor]:
    """The reset entry nearest to in_key (``(*prefix, "_reset")``, then up to the root) without
    its trailing singleton dim, e.g. (N,) from "_reset" (N, 1); None when nothing marks a reset."""
    if tensordict is None:
        return None
    prefix = in_key[:-1] if isinstance(in_key, tuple) else ()
    for depth in range(len(prefix), -1, -1):
        reset = tensordict.get(unravel_key((*prefix[:depth], "_reset")), None)
        if reset is not None:
            return reset.squeeze(-1) if reset.ndim > tensordict.batch_dims and reset.shape[-1] == 1 else reset
    return None


def _and_masks(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """Both masks (shapes prefixes of one entry's shape), as one mask of the longer's shape."""
    if a is None or b is None:
        return a if b is None else b
    short, long = (a, b) if a.ndim <= b.ndim else (b, a)
    return short.reshape(*short.shape, *[1] * (long.ndim - short.ndim)) & long
