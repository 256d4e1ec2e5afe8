"""Backend choice, in one place.

Each backend states why it cannot take an input (`not_supported_reasons(x)`); "auto" takes the
first in AUTO_ORDER that can, and an explicit backend that cannot raises an error listing its
reasons. Decisions read static facts only (device type, dtype, what was built), so torch.compile
folds them away.

Every backend implements the same calls, mutating their output arguments in place:
  running_norm(x, mask, mean, var, count, out, diag, *, momentum, max_count, eps, min_std,
               max_std, clip, eps_on_std, unbiased, scale, min_std_rel, previous, steps)
                  reduce + merge into (mean, var, count, and scale when given) + y into out (if given),
                  with previous y from the statistics before the batch where count > 0; steps (int64
                  0-dim, when given) += 1 when x has entries, inside the op
  normalize(x, mean, var, out, *, eps, min_std, max_std, clip, eps_on_std, scale, min_std_rel)
  normalize_advantages(x, mask, out, stats, *, min_std, unbiased)
                  x (O, G, I), mask flat (see csrc/ops.cpp); stats (4, G) rows STAT_ROWS
and running_norm split in two for RunningNorm(sync=True), which combines the halves across ranks
(schemas and semantics in csrc/ops.cpp; the float64 reference in fastnorm.reference):
  batch_moments(x, mask, moments, shift=None)
                                    the batch-moments table (6, *shape) of x alone (shift: the
                                    running mean, which running_norm sums about: its bits)
  merge_normalize(x, mask, parts, mean, var, count, out, diag, **hyper)
                                    merge the tables parts (P, 6, *shape) in order, update, y
                                    (steps, when given, += 1 whatever x: a step of the group)
and normalize_advantages split in two for normalize_advantages(sync=True), likewise:
  advantage_moments(x, mask, moments)  the moments table (5, G) of x's groups alone
  normalize_advantages_from(x, parts, out, stats, *, min_std, unbiased)
                                    merge the tables parts (P, 5, G) in order, stats, y
A backend may lack an op on some device: not_supported_reasons(x, op) then says so. A kernel
backend may also offer the common call of fastnorm.normalize_advantages as one op:
  normalized_advantages(adv, mask, outer, groups, inner, group_shape, min_std, unbiased)
                                    -> (y, count, mean, std_raw, norm_max_abs, std_below_floor),
                                    outputs allocated (csrc/normalized_advantages.cpp)
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
from torch import Tensor

from fastnorm import _ops, advantages_reference, reference
from fastnorm.triton_backend import TritonBackend


class Backend(Protocol):
    name: str
    # Whether running_norm checks every argument (raising before it changes anything), so that a
    # module may skip its own checks on the hot path and run them only to explain a failure.
    checks_arguments: bool

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all on this installation (empty: it can)."""

    def not_supported_reasons(self, x: Tensor, op: str = "running_norm") -> list[str]:
        """Why this backend cannot run op on x (empty: it can)."""

    def auto_skip_reasons(self, x: Tensor) -> list[str]:
        """Why "auto" passes over this backend for x although it can take it (empty: auto may pick it)."""

    def running_norm(self, x, mask, mean, var, count, out, diag, **hyper) -> None: ...

    def normalize(self, x, mean, var, out, **hyper) -> None: ...

    def batch_moments(self, x, mask, moments, shift=None) -> None: ...

    def merge_normalize(self, x, mask, parts, mean, var, count, out, diag, **hyper) -> None: ...

    def normalize_advantages(self, x, mask, out, stats, **hyper) -> None: ...

    def advantage_moments(self, x, mask, moments) -> None: ...

    def normalize_advantages_from(self, x, parts, out, stats, **hyper) -> None: ...


class ExtensionBackend:
    """The C++ kernels of fastnorm._C for one device type (fastnorm::running_norm, ::normalize)."""

    checks_arguments = True  # csrc/running_norm_args.cpp, before any kernel runs

    def __init__(self, name: str, device_type: str, dispatch_key: str):
        self.name = name
        self.device_type = device_type
        self._unavailable = []
        if _ops.EXTENSION_ERROR is not None:
            self._unavailable.append(_ops.EXTENSION_ERROR)
        elif not _ops.has_kernel("running_norm", dispatch_key):
            self._unavailable.append(f"fastnorm._C was built without {dispatch_key} kernels")
        # Ops added later may not have a kernel for every device yet.
        self._missing_ops = [] if self._unavailable else [
            op for op in ("normalize_advantages", "batch_moments", "merge_normalize", "advantage_moments",
                          "normalize_advantages_from")
            if not _ops.has_kernel(op, dispatch_key)]
        self._dispatch_key = dispatch_key

    def unavailable_reasons(self) -> list[str]:
        return list(self._unavailable)

    def not_supported_reasons(self, x: Tensor, op: str = "running_norm") -> list[str]:
        reasons = self.unavailable_reasons()
        if op in self._missing_ops:
            reasons.append(f"fastnorm._C has no {self._dispatch_key} kernel for {op}")
        if x.device.type != self.device_type:
            reasons.append(f"x is on {x.device.type}, this backend runs on {self.device_type}")
        return reasons

    def auto_skip_reasons(self, x: Tensor) -> list[str]:
        return []

    def running_norm(self, x, mask, mean, var, count, out, diag, *, momentum, max_count, eps, min_std, max_std,
                     clip, eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False,
                     steps=None) -> None:
        # The overload, positionally: keyword arguments cost a few microseconds per call.
        torch.ops.fastnorm.running_norm.default(x, mask, mean, var, count, out, diag, momentum, max_count, eps,
                                                min_std, max_std, clip, eps_on_std, unbiased, scale, min_std_rel,
                                                previous, steps)

    def bind_running_norm(self, mean, var, count, diag, *, momentum, max_count, eps, min_std, max_std, clip,
                          eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False,
                          steps=None) -> Callable[[Tensor, Optional[Tensor], Optional[Tensor]], None]:
        op = torch.ops.fastnorm.running_norm.default
        hyper = (momentum, max_count, eps, min_std, max_std, clip, eps_on_std, unbiased, scale, min_std_rel, previous,
                 steps)

        def running_norm(x, mask, out):
            op(x, mask, mean, var, count, out, diag, *hyper)

        return running_norm

    def bind_normalize(self, mean, var, *, eps, min_std, max_std, clip, eps_on_std=False, scale=None,
                       min_std_rel=None) -> Callable[[Tensor, Optional[Tensor], Tensor], None]:
        op = torch.ops.fastnorm.normalize.default
        hyper = (eps, min_std, max_std, clip, eps_on_std, scale, min_std_rel)

        def normalize(x, mask, out):
            op(x, mean, var, out, *hyper)

        return normalize

    def normalize(self, x, mean, var, out, **hyper) -> None:
        torch.ops.fastnorm.normalize(x, mean, var, out, **hyper)

    def batch_moments(self, x, mask, moments, shift=None) -> None:
        torch.ops.fastnorm.batch_moments(x, mask, moments, shift)

    def merge_normalize(self, x, mask, parts, mean, var, count, out, diag, **hyper) -> None:
        torch.ops.fastnorm.merge_normalize(x, mask, parts, mean, var, count, out, diag, **hyper)

    def normalize_advantages(self, x, mask, out, stats, *, min_std, unbiased) -> None:
        torch.ops.fastnorm.normalize_advantages.default(x, mask, out, stats, min_std, unbiased)

    def normalized_advantages(self, adv, mask, outer, groups, inner, group_shape, min_std, unbiased):
        return torch.ops.fastnorm.normalized_advantages.default(adv, mask, outer, groups, inner, group_shape, min_std,
                                                                unbiased)

    def advantage_moments(self, x, mask, moments) -> None:
        torch.ops.fastnorm.advantage_moments(x, mask, moments)

    def normalize_advantages_from(self, x, parts, out, stats, **hyper) -> None:
        torch.ops.fastnorm.normalize_advantages_from(x, parts, out, stats, **hyper)


class ReferenceBackend:
    """fastnorm.reference: pure PyTorch in float64, any device; the slow, always-available one."""

    name = "reference"
    checks_arguments = False

    def unavailable_reasons(self) -> list[str]:
        return []

    def not_supported_reasons(self, x: Tensor, op: str = "running_norm") -> list[str]:
        return []

    def auto_skip_reasons(self, x: Tensor) -> list[str]:
        return []

    def running_norm(self, x, mask, mean, var, count, out, diag, *, steps=None, **hyper) -> None:
        result = reference.running_norm(x, mask, mean, var, count, with_output=out is not None, **hyper)
        _store(result, mean, var, count, out, diag, hyper.get("scale"))
        if steps is not None and x.numel() > 0:
            steps.add_(1)

    def normalize(self, x, mean, var, out, **hyper) -> None:
        out.copy_(reference.normalize(x, mean, var, **hyper))

    def batch_moments(self, x, mask, moments, shift=None) -> None:
        moments.copy_(reference.batch_moment_table(x, mask, moments.shape[1:]))  # exact: no shift needed

    def merge_normalize(self, x, mask, parts, mean, var, count, out, diag, *, steps=None, **hyper) -> None:
        result = reference.merge_normalize(x, mask, parts, mean, var, count, with_output=out is not None, **hyper)
        _store(result, mean, var, count, out, diag, hyper.get("scale"))
        if steps is not None:
            steps.add_(1)

    def normalize_advantages(self, x, mask, out, stats, **hyper) -> None:
        result = advantages_reference.normalize_advantages(x, _full_mask(x, mask), (0, 2), **hyper)
        _store_advantages(result, out, stats)

    def advantage_moments(self, x, mask, moments) -> None:
        moments.copy_(advantages_reference.moment_table(x, _full_mask(x, mask), (0, 2)))

    def normalize_advantages_from(self, x, parts, out, stats, **hyper) -> None:
        _store_advantages(advantages_reference.normalize_advantages_from(x, parts, (0, 2), **hyper), out, stats)


def _full_mask(x: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """The ops' flat mask of x (O, G, I), entry k reading mask[k // (N // M)], as a full one."""
    if mask is None:
        return None
    return mask.repeat_interleave(x.numel() // max(mask.numel(), 1)).view(x.shape)


def _store_advantages(result: advantages_reference.AdvantageResult, out, stats) -> None:
    out.copy_(result.y)
    stats.copy_(torch.stack([getattr(result, row) for row in advantages_reference.STAT_ROWS]))


def _store(result: reference.RunningNormResult, mean, var, count, out, diag, scale) -> None:
    mean.copy_(result.mean)
    var.copy_(result.var)
    count.copy_(result.count)
    if scale is not None:
        scale.copy_(result.scale)
    diag.copy_(result.diag)
    if out is not None:
        out.copy_(result.y)


BACKENDS: dict[str, Backend] = {
    "cuda": ExtensionBackend("cuda", "cuda", "CUDA"),
    "cpu": ExtensionBackend("cpu", "cpu", "CPU"),
    "reference": ReferenceBackend(),
    "triton": TritonBackend(),
}
AUTO_ORDER = ("cuda", "triton", "cpu", "reference")
BACKEND_NAMES = ("auto",) + tuple(BACKENDS)


def backends() -> dict[str, list[str]]:
    """Each backend's name and the reasons it is unavailable here (an empty list: available). The
    cuda backend built but without a visible GPU says that alone."""
    reasons = {name: backend.unavailable_reasons() for name, backend in BACKENDS.items()}
    if not reasons["cuda"] and not torch.cuda.is_available():
        reasons["cuda"] = ["built with its CUDA kernels, but no CUDA device is visible here"]
    return reasons


def check_backend_name(name: str) -> str:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    return name


def bind_running_norm(backend: Backend, mean, var, count, diag, **hyper) -> Callable[[Tensor, Optional[Tensor],
                                                                                   Optional[Tensor]], None]:
    """backend.running_norm with everything but (x, mask, out) bound, for a module that calls it
    with the same statistics and hyper-parameters every time: the C++ kernels' op is then called
    positionally (keyword arguments cost microseconds a call)."""
    if isinstance(backend, ExtensionBackend):
        return backend.bind_running_norm(mean, var, count, diag, **hyper)
    return lambda x, mask, out: backend.running_norm(x, mask, mean, var, count, out, diag, **hyper)


def bind_normalize(backend: Backend, mean, var, **hyper) -> Callable[[Tensor, Optional[Tensor], Tensor], None]:
    """backend.normalize bound as bind_running_norm binds running_norm: f(x, mask, out), mask unused."""
    if isinstance(backend, ExtensionBackend):
        return backend.bind_normalize(mean, var, **hyper)
    return lambda x, mask, out: backend.normalize(x, mean, var, out, **hyper)


# select_backend's choices: they depend on static facts only (the name, x's device, the op); keyed
# by the device itself, which is cheaper to get than its type.
_CHOICES: dict[tuple[str, torch.device, str], Backend] = {}


def select_backend(name: str, x: Tensor, op: str = "running_norm") -> Backend:
    """The backend that runs op on x: the named one, or for "auto" the first in AUTO_ORDER that can."""
    key = (name, x.device, op)
    backend = _CHOICES.get(key)
    if backend is None:
        backend = _choose(name, x, op)
        _CHOICES[key] = backend
    return backend


def _choose(name: str, x: Tensor, op: str) -> Backend:
    if name != "auto":
        backend = BACKENDS[name]
        reasons = backend.not_supported_reasons(x, op)
        if reasons:
            raise RuntimeError(f"fastnorm backend {name!r} cannot run this input: " + "; ".join(reasons))
        return backend
    for candidate in AUTO_ORDER:
        backend = BACKENDS[candidate]
        if not backend.not_supported_reasons(x, op) and not backend.auto_skip_reasons(x):
            return backend
    raise AssertionError("the reference backend takes every input")


def default_backend(device: Optional[torch.device] = None) -> str:
    """The name "auto" picks for a float32 tensor on device (CPU by default)."""
    x = torch.empty(0, device=device or "cpu")
    return select_backend("auto", x).name
