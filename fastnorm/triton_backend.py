"""The "triton" backend: fastnorm's Triton kernels (triton_kernels/running_norm.py) through the ops
of fastnorm/_triton_ops.py.

It runs CUDA tensors, and CPU tensors only under the Triton interpreter (TRITON_INTERPRET=1 set
before fastnorm is imported), which is for tests: "auto" never picks the interpreter. Whether
triton imports and whether it interprets are read once, at import.
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
OPS = ("running_norm", "normalize")


class TritonBackend:
    """fastnorm::running_norm_triton and ::normalize_triton."""

    name = "triton"

    def __init__(self):
        # Per device, the int32 arrival counters of the split-rows merge: zero between calls (each
        # call's last programs reset theirs), grown when a call needs more column tiles.
        self._arrivals: dict[torch.device, Tensor] = {}

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

    def running_norm(self, x, mask, mean, var, count, out, diag, **hyper) -> None:
        arrivals = self._arrivals_for(x, mean.numel())
        torch.ops.fastnorm.running_norm_triton(x, mask, mean, var, count, out, diag, arrivals, **hyper)

    def normalize(self, x, mean, var, out, **hyper) -> None:
        torch.ops.fastnorm.normalize_triton(x, mean, var, out, **hyper)

    def _arrivals_for(self, x: Tensor, stats_numel: int) -> Tensor:
        needed = _triton_ops.column_tiles(x, stats_numel)
        arrivals = self._arrivals.get(x.device)
        if arrivals is None or arrivals.numel() < needed:
            arrivals = torch.zeros(max(needed, 1024), dtype=torch.int32, device=x.device)
            self._arrivals[x.device] = arrivals
        return arrivals
