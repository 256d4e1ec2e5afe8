"""The implementations the running-norm benchmark compares, each a `Case`: a name, a setup that
builds the state once, and a step that runs one call on x (timed).

The memory floor is a plain copy of x into a preallocated tensor: one read and one write of x,
the bytes every implementation must move at least.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import fastnorm
from fastnorm import reference


@dataclass
class Case:
    name: str
    step: Callable[[], object]
    note: str = ""
    setup_seconds: Optional[float] = None  # e.g. compile time, reported apart


def copy_case(x: torch.Tensor) -> Case:
    dst = torch.empty_like(x)
    return Case("copy (memory floor)", lambda: dst.copy_(x))


def fastnorm_case(x: torch.Tensor, stats_shape, backend: str) -> Case:
    norm = fastnorm.RunningNorm(stats_shape, backend=backend, device=x.device)
    out = torch.empty_like(x)
    return Case(f"fastnorm {backend}", lambda: norm(x, out=out), "update + normalize, out=")


def reference_case(x: torch.Tensor, stats_shape) -> Case:
    state = _fresh_state(stats_shape, x.device)
    return Case("reference (eager, float64)", lambda: _reference_step(x, state))


def compiled_reference_case(x: torch.Tensor, stats_shape) -> Case:
    import time

    state = _fresh_state(stats_shape, x.device)
    compiled = torch.compile(_reference_step, dynamic=False)
    start = time.perf_counter()
    compiled(x, state)
    compile_seconds = time.perf_counter() - start
    return Case("torch.compile(reference)", lambda: compiled(x, state), setup_seconds=compile_seconds)


def batch_norm_case(x: torch.Tensor, stats_shape) -> Case:
    cols = int(torch.Size(stats_shape).numel())
    rows = x.numel() // cols
    running_mean = torch.zeros(cols, device=x.device, dtype=x.dtype)
    running_var = torch.ones(cols, device=x.device, dtype=x.dtype)
    flat = x.view(rows, cols)
    return Case("F.batch_norm (train)", lambda: F.batch_norm(flat, running_mean, running_var, training=True,
                                                            momentum=0.01), "no floor, no clamp: speed peer only")


def _fresh_state(stats_shape, device):
    f64 = dict(dtype=torch.float64, device=device)
    return {"mean": torch.zeros(stats_shape, **f64), "var": torch.ones(stats_shape, **f64),
            "count": torch.zeros(stats_shape, **f64)}


def _reference_step(x, state):
    result = reference.running_norm(x, None, state["mean"], state["var"], state["count"], momentum=0.99,
                                    max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=10.0)
    state["mean"].copy_(result.mean)
    state["var"].copy_(result.var)
    state["count"].copy_(result.count)
    return result.y
