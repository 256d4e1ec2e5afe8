"""RunningNorm: running per-(agent, feature) normalization with a warm-started EMA, a std floor,
an output clamp, masks, and statistics that no non-finite input can reach."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor, nn

from fastnorm import _checks, distributed, export, reference
from fastnorm.backends import bind_normalize, bind_running_norm, check_backend_name, select_backend
from fastnorm.monitoring.diagnostics import as_floats, running_norm_diagnostics
from fastnorm.reference import DIAG_ROWS, MOMENT_ROWS

FORMAT_VERSION = 1
HYPER_PARAMETERS = ("momentum", "max_count", "eps", "min_std", "max_std", "clip", "warmup", "eps_placement",
                    "batch_var", "min_std_rel", "normalize_with")
# Hyper-parameters added after format 1 was fixed, with the value a state saved without them had.
LATER_DEFAULTS = {"eps_placement": "var", "batch_var": "population", "min_std_rel": None, "normalize_with": "updated"}
EPS_PLACEMENTS = ("var", "std")
BATCH_VARS = ("population", "unbiased")
NORMALIZE_WITH = ("updated", "previous")
# What the ops' arguments are computed from (_op_arguments and _bound_update cache them until one
# of these is set again).
_OP_ARGUMENT_SOURCES = frozenset(HYPER_PARAMETERS + ("backend", "mean", "var", "count", "steps", "scale", "_diag"))
_OP_CACHES = ("_op_argument_cache", "_bound_update_cache", "_bound_normalize_cache")


class RunningNorm(nn.Module):
    r"""Normalizes x of shape ``(*batch, *shape)`` with running statistics of ``shape``.

    Statistics (float64 buffers ``mean``, ``var``, ``count`` of ``shape``) start at 0, 1, 0.
    Each update reduces all batch dims over the selected entries (``mask`` true, value finite):
    batch count ``n_b``, mean ``m_b``, variance ``v_b`` (population ``M2 / n_b``, or with
    ``batch_var="unbiased"`` ``M2 / (n_b - 1)``, 0 for a single sample); with ``d = m_b - mean`` and
    ``n_eff = min(count, max_count)``::

        w = n_b / (n_eff + n_b);  with momentum: w = max(1 - momentum, w)
        mean' = mean + w d;  var' = (1 - w) var + w v_b + w (1 - w) d^2;  count' = count + n_b

    Early updates are exact averages (no noisy step 1, no zero-variance start), later ones an EMA
    with weight ``1 - momentum`` (never frozen); ``momentum=None`` is the exact cumulative
    (Chan) merge. The output, with the updated statistics when updating (``normalize_with``)::

        y = clamp((x - mean) / clamp(std, floor, max_std), -clip, clip)

    with ``std = sqrt(var + eps)`` (``eps_placement="var"``) or ``sqrt(var) + eps`` (``"std"``) and
    ``floor = min_std``, or with ``min_std_rel`` the relative floor ``max(min_std, min_std_rel *
    scale)``, where ``scale`` (a float64 buffer of ``shape``, tracked only then) is the column's
    long-run std, updated with the statistics (README, "The relative std floor")::

        w_s = max((1 - momentum) / 10, n_b / (n_eff + n_b));  scale'^2 = (1 - w_s) scale^2 + w_s var'

    Non-finite inputs never enter the statistics; NaN stays NaN in y and +-inf becomes +-clip.

    Args:
        shape: the per-agent statistics shape, e.g. ``(num_agents, num_features)``.
        momentum: EMA momentum in [0, 1], or None for the exact cumulative mode.
        max_count: cap on the count used for the weight (None: uncapped).
        eps: added to the variance before the square root (or to the std, see eps_placement).
        min_std, max_std: hard bounds on the divisor (None: unbounded).
        clip: the output is clamped to [-clip, clip] (None: no clamp).
        warmup: number of updates after which ``ready`` becomes true.
        eps_placement: "var": divisor sqrt(var + eps) (default); "std": sqrt(var) + eps, as rsl_rl's
            EmpiricalNormalization and skrl's RunningStandardScaler.
        batch_var: the batch variance merged into var: "population" (M2 / n, default) or "unbiased"
            (M2 / (n - 1), as torch.var and skrl; a single sample gives 0, not NaN). The
            diagnostics' raw batch std is the population one either way.
        min_std_rel: the relative std floor (None: off): the divisor never falls below min_std_rel
            times the column's long-run std ``scale``. Its state dict then holds ``scale``; a state
            without it loads with ``scale = sqrt(var)``.
        normalize_with: which statistics an updating call normalizes x with. "updated" (default):
            those updated with x, which needs two reads of x. "previous": those from before x (y
            lags the statistics by one batch), so one pass reads x once: faster when x does not fit
            in cache. Columns with no history yet (count 0) use their updated statistics, the
            batch's own, so step 1 is never raw. Calls that do not update are the same in both.
        backend: "auto", "cpu", "cuda", "triton" or "reference" (see ``fastnorm.backends()``).
        device: where the statistics live.
        sync: combine each update's batch across the ranks of ``process_group`` (see below).
        process_group: the torch.distributed group to sync over (None: the default group).

    Call ``norm(x, mask=None, update=None, out=None)``; ``update`` defaults to ``norm.training``.
    ``mask`` is a bool tensor whose shape is a prefix of x's covering the batch dims (e.g.
    ``(B, A)`` for inactive agents); it selects entries for the statistics only. ``out`` (x's
    shape and dtype, may be x itself) receives y without allocating.

    With ``sync=True`` every update is a collective over ``process_group``: each rank's batch
    moments are all-gathered and merged in rank order (``fastnorm.distributed``), so every rank
    holds bitwise the same statistics, those of one process seeing the concatenated batch. Every
    rank must make the same sequence of updating calls (a rank with no data passes an empty or
    fully masked x) and start from the same state (``fastnorm.distributed.broadcast_state``).
    Normalizing without updating needs no communication. Under sync, ``steps`` counts the group's
    updating calls, and the diagnostics describe the group's batch, identical on every rank.
    
    In eval mode (or with ``update=False``) a model holding RunningNorm exports through
    torch.jit.trace, torch.jit.script, torch.export and torch.onnx.export (dynamo or not) as
    standard ops with the statistics as buffers, so the file runs without fastnorm
    (``fastnorm.export``); exporting an update is an error.
    """

    BROADCAST_BUFFERS = ("mean", "var", "count", "steps", "scale")  # the state broadcast_state re-seeds
    # Whether forward() updates the statistics in training mode. An adapter whose forward only
    # normalizes (its host updates through update()) sets it False, so that torch.jit.script of
    # it works in training mode too, as trace and export do.
    forward_updates: bool = True

    def __init__(
        self,
        shape: Union[int, Iterable[int]],
        *,
        momentum: Optional[float] = 0.99,
        max_count: Optional[float] = None,
        eps: float = 1e-4,
        min_std: Optional[float] = 1e-2,
        max_std: Optional[float] = None,
        clip: Optional[float] = 10.0,
        warmup: int = 0,
        eps_placement: str = "var",
        batch_var: str = "population",
        min_std_rel: Optional[float] = None,
        normalize_with: str = "updated",
        backend: str = "auto",
        device: Optional[Union[str, torch.device]] = None,
        sync: bool = False,
        process_group: Optional[torch.distributed.ProcessGroup] = None,
    ):
        super().__init__()
        self.shape = torch.Size([shape] if isinstance(shape, int) else shape)
        if any(not isinstance(n, int) or n < 1 for n in self.shape):
            raise ValueError(f"shape must be positive ints, got {tuple(shape) if not isinstance(shape, int) else shape}")
        self.momentum = _checks.check_optional_number("momentum", momentum)
        if self.momentum is not None and self.momentum > 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}")
        self.max_count = _checks.check_optional_number("max_count", max_count, inclusive=False)
        eps = _checks.check_optional_number("eps", eps)
        if eps is None:
            raise TypeError("eps must be a number >= 0, got None")
        self.eps = eps
        self.min_std = _checks.check_optional_number("min_std", min_std)
        self.max_std = _checks.check_optional_number("max_std", max_std, inclusive=False)
        if self.min_std is not None and self.max_std is not None and self.min_std > self.max_std:
            raise ValueError(f"min_std ({min_std}) must not exceed max_std ({max_std})")
        self.clip = _checks.check_optional_number("clip", clip, inclusive=False)
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an int >= 0, got {warmup!r}")
        self.warmup = warmup
        self.eps_placement = _checks.check_choice("eps_placement", eps_placement, EPS_PLACEMENTS)
        self.batch_var = _checks.check_choice("batch_var", batch_var, BATCH_VARS)
        self.min_std_rel = _checks.check_optional_number("min_std_rel", min_std_rel)
        self.normalize_with = _checks.check_choice("normalize_with", normalize_with, NORMALIZE_WITH)
        self.backend = check_backend_name(backend)
        if not isinstance(sync, bool):
            raise TypeError(f"sync must be a bool, got {type(sync).__name__}")
        if process_group is not None and not sync:
            raise ValueError("process_group is only used with sync=True")
        self.sync = sync
        self.process_group = process_group

        f64 = dict(dtype=torch.float64, device=device)
        self.register_buffer("mean", torch.zeros(self.shape, **f64))
        self.register_buffer("var", torch.ones(self.shape, **f64))
        self.register_buffer("count", torch.zeros(self.shape, **f64))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64, device=device))
        # The long-run std, starting at sqrt(var); tracked and saved only with the relative floor.
        self.register_buffer("scale", torch.ones(self.shape, **f64), persistent=self.min_std_rel is not None)
        # Per-column diagnostics of the last update (rows: reference.DIAG_ROWS); NaN before any.
        self.register_buffer("_diag", torch.full((len(DIAG_ROWS), self.shape.numel()), math.nan, **f64), persistent=False)

    # ------------------------------------------------------------------ calls

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, update: Optional[bool] = None,
                out: Optional[Tensor] = None) -> Tensor:
        """Normalizes x, first updating the statistics with it when ``update`` (default: training)."""
        if update is None:
            update = self.training
        if not export.exporting() and not (update and self.sync):
            if update:
                return self._checked_call(self._bound_update(), x, mask, out)
            if mask is not None:
                self._check_call(x, mask, out)  # the normalize op takes no mask: checked here
            return self._checked_call(self._bound_normalize(), x, None, out)
        self._check_call(x, mask, out)
        if not update:
            return self._normalize(x, out)
        y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
        self._update(x, mask, y)
        return y

    def _checked_call(self, bound_op, x: Tensor, mask: Optional[Tensor], out: Optional[Tensor]) -> Tensor:
        # The common calls, kept to one op each (an update also counts the step in it). The C++
        # kernels check every argument before touching anything, so their checks come first and
        # ours (clearer errors) run only when theirs fail; other backends are checked before.
        op, checks_arguments = bound_op
        if not checks_arguments:
            self._check_call(x, mask, out)
        try:
            y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
            op(x, mask, y)
        except (TypeError, ValueError, RuntimeError):
            self._check_call(x, mask, out)  # raises the error that names the argument, if it is one
            raise
        return y

    def update(self, x: Tensor, mask: Optional[Tensor] = None) -> None:
        """Updates the statistics with x without computing y."""
        self._check_call(x, mask, None)
        self._update(x, mask, None)

    def normalize(self, x: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """y for x with the current statistics; the statistics are not changed."""
        if not export.exporting():
            return self._checked_call(self._bound_normalize(), x, None, out)
        self._check_call(x, None, out)
        return self._normalize(x, out)

    def denormalize(self, y: Tensor) -> Tensor:
        """x = y * std + mean (the inverse of normalize where no clamp was hit), in y's dtype."""
        _checks.check_x(y, self.shape, self.mean.device, name="y")
        return (y.double() * self._divisor() + self.mean).to(y.dtype)

    def reset(self) -> None:
        """Back to the initial statistics: mean 0, var 1, count 0, scale 1, no update steps."""
        self.mean.zero_()
        self.var.fill_(1.0)
        self.scale.fill_(1.0)
        self.count.zero_()
        self.steps.zero_()
        self._diag.fill_(math.nan)

    def diagnostics(self) -> dict[str, Tensor]:
        """Named 0-dim tensors about the last update, computed on device without a host sync
        (raw batch std min/max, normalized batch mean/std, max |z|, fractions clipped and at the
        std floor, non-finite count, minimum count, update weight, steps): see fastnorm.monitoring.diagnostics."""
        return running_norm_diagnostics(
            self._diag, self.mean, self.var, self.count, self.steps, momentum=self.momentum,
            max_count=self.max_count, eps=self.eps, min_std=self.min_std, max_std=self.max_std,
            eps_on_std=self.eps_placement == "std", min_std_rel=self.min_std_rel, scale=self.scale,
        )

    def health(self, prefix: str = "") -> dict[str, float]:
        """``diagnostics()`` as floats keyed ``prefix + name`` for logging or a Monitor (this syncs);
        values the last call does not define are left out."""
        return as_floats(self.diagnostics(), prefix)

    @property
    def ready(self) -> Tensor:
        """Bool tensor: at least ``warmup`` updates done (stays on device, no sync)."""
        return self.steps >= self.warmup

    def _output_bounds(self) -> dict[str, Any]:
        """The keyword arguments of the normalize op."""
        return self._op_arguments()[0]

    def _op_arguments(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The keyword arguments of the normalize op and of the updating ops, cached (a call costs
        microseconds) until an attribute they come from is set again (__setattr__, _apply)."""
        cached = self.__dict__.get("_op_argument_cache")
        if cached is None:
            # The scale goes to the ops only with the relative floor: they track it where given.
            tracked = self.min_std_rel is not None
            bounds = dict(eps=self.eps, min_std=self.min_std, max_std=self.max_std, clip=self.clip,
                          eps_on_std=self.eps_placement == "std", scale=self.scale if tracked else None,
                          min_std_rel=self.min_std_rel)
            update = dict(bounds, momentum=self.momentum, max_count=self.max_count,
                          unbiased=self.batch_var == "unbiased", previous=self.normalize_with == "previous")
            cached = self.__dict__["_op_argument_cache"] = (bounds, update)
        return cached

    def _bound_update(self) -> tuple[Callable[[Tensor, Optional[Tensor], Optional[Tensor]], None], bool]:
        """The backend's running_norm with this module's statistics and hyper-parameters bound,
        ``f(x, mask, out)``, and whether it checks its arguments itself before changing anything.
        The backend is chosen for the statistics' device, where x must be."""
        bound = self.__dict__.get("_bound_update_cache")
        if bound is None:
            b = self._buffers
            backend = select_backend(self.backend, b["mean"])
            bound = (bind_running_norm(backend, b["mean"], b["var"], b["count"], b["_diag"], steps=b["steps"],
                                       **self._op_arguments()[1]), backend.checks_arguments)
            self.__dict__["_bound_update_cache"] = bound
        return bound

    def __getstate__(self) -> dict[str, Any]:
        # torch.save(module) and deepcopy: the cached op arguments hold closures and are rebuilt.
        state = self.__dict__.copy()
        for cache in _OP_CACHES:
            state.pop(cache, None)
        return state

    def _bound_normalize(self) -> tuple[Callable[[Tensor, Optional[Tensor], Tensor], None], bool]:
        """As _bound_update, for the normalize op (the mask argument is ignored)."""
        bound = self.__dict__.get("_bound_normalize_cache")
        if bound is None:
            b = self._buffers
            backend = select_backend(self.backend, b["mean"], "normalize")
            bound = (bind_normalize(backend, b["mean"], b["var"], **self._op_arguments()[0]), backend.checks_arguments)
            self.__dict__["_bound_normalize_cache"] = bound
        return bound

    def _forget_op_arguments(self) -> None:
        for cache in _OP_CACHES:
            self.__dict__.pop(cache, None)

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _OP_ARGUMENT_SOURCES:
            self._forget_op_arguments()

    def _divisor(self) -> Tensor:
        """The float64 divisor of the normalization, as denormalize and every export compute it
        (the kernels compute the same from _output_bounds)."""
        return reference.bounded_std(self.var, self.eps, self.min_std, self.max_std, self.eps_placement == "std",
                                     self.min_std_rel, self.scale)

    def frozen(self) -> export.FrozenRunningNorm:
        """This module's eval-mode transform as a TorchScript-compatible module of standard ops,
        with the statistics of now (copies): see fastnorm.export."""
        frozen = export.FrozenRunningNorm(self.mean.clone(), self._divisor(), self.clip, self.forward_updates)
        return frozen.train(self.training)

    def __prepare_scriptable__(self) -> export.FrozenRunningNorm:
        # torch.jit.script compiles what this returns in place of the module (and puts it in the
        # scripted tree's parent: script a copy of a model that keeps training).
        if self.training and self.forward_updates:
            raise RuntimeError("torch.jit.script compiles RunningNorm's eval-mode transform only, and this RunningNorm "
                               "is in training mode, where its forward updates the statistics. Call model.eval() "
                               "before scripting (an adapter whose forward never updates sets forward_updates = False).")
        return self.frozen()

    def _normalize(self, x: Tensor, out: Optional[Tensor]) -> Tensor:
        if export.exporting():
            y = export.normalize(x, self.mean, self._divisor(), self.clip)
            return y if out is None else out.copy_(y)
        y = out if out is not None else torch.empty_like(x, memory_format=torch.contiguous_format)
        select_backend(self.backend, x).normalize(x, self.mean, self.var, y, **self._output_bounds())
        return y

    def _check_call(self, x: Tensor, mask: Optional[Tensor], out: Optional[Tensor]) -> None:
        batch_dims = _checks.check_x(x, self.shape, self.mean.device)
        _checks.check_mask(mask, x, batch_dims)
        _checks.check_out(out, x)

    def _update(self, x: Tensor, mask: Optional[Tensor], y: Optional[Tensor]) -> None:
        if export.exporting():
            raise RuntimeError("RunningNorm cannot update its statistics inside an exported model (a call in training "
                               "mode or with update=True while being traced or exported). Call model.eval() before "
                               "exporting, or pass update=False.")
        if self.sync:
            self._synced_update(x, mask, y)
            return
        self._bound_update()[0](x, mask, y)  # one op, which also counts the step (an empty batch is none)

    def _synced_update(self, x: Tensor, mask: Optional[Tensor], y: Optional[Tensor]) -> None:
        # running_norm split around the all-gather: this rank's batch moments, every rank's merged.
        # A backend implements batch_moments and merge_normalize together.
        backend = select_backend(self.backend, x, "merge_normalize")
        moments = torch.empty((len(MOMENT_ROWS), *self.shape), dtype=torch.float64, device=x.device)
        backend.batch_moments(x, mask, moments, self.mean)  # the mean running_norm would sum about
        parts = distributed.all_gather_moments(moments, self.process_group)
        # steps counts a step of the group, whatever this rank's shard.
        backend.merge_normalize(x, mask, parts, self.mean, self.var, self.count, y, self._diag, steps=self.steps,
                                **self._op_arguments()[1])
        distributed.sum_counts(self._diag[DIAG_ROWS.index("clipped")], self.process_group)

    # ------------------------------------------------------------------ state

    def _apply(self, fn, recurse=True):
        # Module-wide casts (.half(), .to(torch.bfloat16)) must not demote the statistics: the
        # buffers follow fn's device but keep their dtype (float64, int64 steps).
        before = dict(self._buffers)
        self._forget_op_arguments()  # they hold the buffers
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def hyper_parameters(self) -> dict[str, Any]:
        """The constructor arguments that define the transform (not the backend or device)."""
        return {name: getattr(self, name) for name in HYPER_PARAMETERS}

    def get_extra_state(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "shape": list(self.shape), **self.hyper_parameters()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        state = {**LATER_DEFAULTS, **state}
        differing = {k: (state[k], getattr(self, k)) for k in HYPER_PARAMETERS if k in state and state[k] != getattr(self, k)}
        if differing:
            details = ", ".join(f"{k}: saved {saved!r}, module {own!r}" for k, (saved, own) in differing.items())
            warnings.warn(f"RunningNorm state was saved with other hyper-parameters ({details}); keeping the module's. "
                          "Use RunningNorm.from_state_dict to restore the saved ones.", stacklevel=4)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if torch.onnx.is_in_onnx_export():
            # The TorchScript-based ONNX exporter traces every state_dict value as a tensor
            # (torch.jit._unique_state_dict); the extra state is a dict, and no graph reads it.
            del destination[prefix + "_extra_state"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Validate everything before anything is copied, so a bad state changes nothing.
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None:
            _check_extra_state(extra, self.shape, prefix)
        for name in ("mean", "var", "count", "steps", "scale"):
            value = state_dict.get(prefix + name)
            if value is not None:
                _check_statistic(prefix + name, value, self.shape if name != "steps" else torch.Size([]))
        scale = state_dict.pop(prefix + "scale", None)
        if scale is None and prefix + "var" in state_dict:
            scale = state_dict[prefix + "var"].sqrt()  # a state saved without the long-run scale
        if self.min_std_rel is not None and scale is not None:
            state_dict[prefix + "scale"] = scale
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if self.min_std_rel is None and scale is not None:
            with torch.no_grad():
                self.scale.copy_(scale)  # kept, though unused, so that turning the floor on finds it
        self._diag.fill_(math.nan)  # the last call's diagnostics do not describe the loaded statistics

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any], **kwargs) -> "RunningNorm":
        """A RunningNorm with the saved shape and hyper-parameters (kwargs: backend, device, or
        overrides) and the saved statistics."""
        extra = state_dict.get("_extra_state")
        if extra is None:
            raise KeyError("state_dict has no '_extra_state': it was not saved by RunningNorm")
        _check_extra_state(extra, None, "")
        saved = {**LATER_DEFAULTS, **extra}
        params = {k: saved[k] for k in HYPER_PARAMETERS}
        params.update(kwargs)
        norm = cls(extra["shape"], **params)
        norm.load_state_dict(state_dict)
        return norm

    def extra_repr(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.hyper_parameters().items())
        synced = ", sync=True" if self.sync else ""
        return f"shape={tuple(self.shape)}, {params}, backend={self.backend!r}{synced}"


def _check_extra_state(extra: Any, shape: Optional[torch.Size], prefix: str) -> None:
    if not isinstance(extra, dict) or "format_version" not in extra:
        raise ValueError(f"{prefix}_extra_state is not a RunningNorm state (no format_version)")
    if extra["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{prefix}_extra_state has format_version {extra['format_version']}, "
                         f"this fastnorm reads {FORMAT_VERSION}")
    if shape is not None and tuple(extra.get("shape", ())) != tuple(shape):
        raise ValueError(f"{prefix}_extra_state has shape {tuple(extra.get('shape', ()))}, "
                         f"the module has {tuple(shape)}")


def _check_statistic(key: str, value: Any, shape: torch.Size) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{key} must be a tensor, got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(f"{key} must have shape {tuple(shape)}, got {tuple(value.shape)}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{key} holds non-finite values; refusing to load a corrupted state")
    if value.numel() > 0 and bool((value < 0).any()) and not key.endswith("mean"):
        raise ValueError(f"{key} holds negative values; refusing to load a corrupted state")
