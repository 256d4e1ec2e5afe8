"""The "triton" backend: fastnorm's Triton kernels (triton_kernels/) through the ops of
fastnorm/_triton_ops.py.

It runs CUDA tensors, and CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1 set
before fastnorm is imported), which is for tests: "auto" never picks the interpreter. Whether
triton imports and whether it interprets are read once, at import. Each method calls its op,
or in plain eager code the op's Python function (`_triton_ops.calls_directly`), positionally.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:
    import triton  # noqa: F401

    TRITON_ERROR: str | None = None
except ImportError as error:
    TRITON_ERROR = f"triton cannot be imported ({error}); pip install triton"

if TRITON_ERROR is None:
    from fastnorm import _triton_ops

    INTERPRETED = _triton_ops.INTERPRETED
else:
    INTERPRETED = False


# The ops this backend has kernels for; not_supported_reasons(x, op) names any other.
OPS = ("running_norm", "normalize", "batch_moments", "merge_normalize", "normalize_advantages", "advantage_moments",
       "normalize_advantages_from")


class TritonBackend:
    """The ops of fastnorm/_triton_ops.py, one per op in OPS. It holds no state: each call
    allocates its own scratch on the caller's stream."""

    name = "triton"
    checks_arguments = True  # every op checks all its arguments before it launches (as csrc/running_norm_args.cpp)

    def unavailable_reasons(self) -> list[str]:
        return [TRITON_ERROR] if TRITON_ERROR is not None else []

    def not_supported_reasons(self, x: Tensor, op: str = "running_norm") -> list[str]:
        reasons = self.unavailable_reasons()
        if op not in OPS:
            reasons.append(f"the triton backend has no kernel for {op}")
        if x.device.type == "cpu" and not INTERPRETED:
            reasons.append("x is on cpu: Triton runs CPU tensors only under TRITON_INTERPRET=1")
        elif x.device.type not in ("cpu", "cuda"):
            reasons.append(f"x is on {x.device.type}, this backend runs on cuda")
        return reasons

    def auto_skip_reasons(self, x: Tensor) -> list[str]:
        if x.device.type == "cpu":
            return ["the Triton interpreter is for tests; auto does not pick it"]
        return []

    def running_norm(self, x, mask, mean, var, count, out, diag, *, momentum, max_count, eps, min_std, max_std,
                     clip, eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False,
                     steps=None) -> None:
        _call("running_norm", x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip,
              eps_on_std, unbiased, scale, min_std_rel, previous, steps)

    def normalize(self, x, mean, var, out, *, eps, min_std, max_std, clip, eps_on_std=False, scale=None,
                  min_std_rel=None) -> None:
        _call("normalize", x, mean, var, out, eps, min_std, max_std, clip, eps_on_std, scale, min_std_rel)

    def batch_moments(self, x, mask, moments, shift=None) -> None:
        _call("batch_moments", x, mask, moments)  # two-pass blocks: no shift needed

    def merge_normalize(self, x, mask, parts, mean, var, count, out, diag, *, momentum, max_count, eps, min_std,
                        max_std, clip, eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False,
                        steps=None) -> None:
        _call("merge_normalize", x, mask, parts, mean, var, count, out, diag, momentum, max_count, eps, min_std,
              max_std, clip, eps_on_std, unbiased, scale, min_std_rel, previous, steps)

    def normalize_advantages(self, x, mask, out, stats, *, min_std, unbiased) -> None:
        _call("normalize_advantages", x, mask, out, stats, min_std, unbiased)

    def normalized_advantages(self, adv, mask, outer, groups, inner, group_shape, min_std, unbiased):
        args = (adv, mask, outer, groups, inner, list(group_shape), min_std, unbiased)
        if _triton_ops.calls_directly(adv):
            y, stats, std_below_floor = _triton_ops.IMPLEMENTATIONS["fastnorm::normalized_advantages_triton"](*args)
        else:
            y, stats, std_below_floor = torch.ops.fastnorm.normalized_advantages_triton.default(*args)
        count, mean, std_raw, norm_max_abs = stats.unbind(0)  # _triton_ops.ADVANTAGE_STAT_ROWS
        return y, count, mean, std_raw, norm_max_abs, std_below_floor

    def advantage_moments(self, x, mask, moments) -> None:
        _call("advantage_moments", x, mask, moments)

    def normalize_advantages_from(self, x, parts, out, stats, *, min_std, unbiased) -> None:
        _call("normalize_advantages_from", x, parts, out, stats, min_std, unbiased)


def _call(op: str, x: Tensor, *args) -> None:
    """fastnorm::<op>_triton on (x, *args), or its Python function where that may run directly."""
    name = f"fastnorm::{op}_triton"
    if _triton_ops.calls_directly(x):
        _triton_ops.IMPLEMENTATIONS[name](x, *args)
    else:
        getattr(torch.ops.fastnorm, f"{op}_triton").default(x, *args)
