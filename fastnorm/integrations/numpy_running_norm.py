"""A RunningNorm behind the numpy ``RunningMeanStd`` interface of Gymnasium and Stable-Baselines3.

Both libraries keep observation statistics in a ``RunningMeanStd``: numpy ``mean``, ``var`` and
``count`` (count prior 1e-4, mean 0, var 1), ``update(batch)``. NumpyRunningNorm keeps them in a
float64 fastnorm RunningNorm instead (non-finite entries never reach them), shows them as numpy
views under the same names, and normalizes numpy arrays with RunningNorm's kernels. It imports
neither library; fastnorm.integrations.gymnasium and .sb3 mix it into theirs.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from fastnorm.backends import select_backend
from fastnorm.reference import DIAG_ROWS
from fastnorm.running_norm import RunningNorm

COUNT_PRIOR = 1e-4  # the initial count of Gymnasium's and SB3's RunningMeanStd
STATISTICS = ("mean", "var", "count")
_FASTNORM_DEFAULTS = {name: p.default for name, p in inspect.signature(RunningNorm).parameters.items()}


def running_norm_arguments(fixes: bool, eps: float, clip: Optional[float]) -> dict[str, Any]:
    """RunningNorm's arguments for a host that computes ``(x - mean) / sqrt(var + eps)`` clipped to
    ``clip`` (None: no clip) with cumulative statistics. ``fixes=False``: exactly that (momentum
    None is the Chan merge the hosts use). ``fixes=True``: fastnorm's warm-started EMA momentum,
    std floor and clamp (the host's clip, else fastnorm's), keeping the host's eps."""
    if not isinstance(fixes, bool):
        raise TypeError(f"fixes must be a bool, got {type(fixes).__name__}")
    if not fixes:
        return dict(momentum=None, eps=eps, min_std=None, clip=clip)
    return dict(momentum=_FASTNORM_DEFAULTS["momentum"], eps=eps, min_std=_FASTNORM_DEFAULTS["min_std"],
                clip=_FASTNORM_DEFAULTS["clip"] if clip is None else clip)


class NumpyRunningNorm:
    """Running statistics of numpy batches ``(*batch, *shape)``, held by a float64 RunningNorm.

    ``mean``, ``var`` (float64 numpy views of the statistics: writing to them writes the
    statistics) and ``count`` (a float while every element has seen the same number of finite
    values, else the per-element array) read like a ``RunningMeanStd``'s. Non-finite entries are
    left out of the statistics (NaN stays NaN in the output); ``last_nonfinite`` and
    ``nonfinite_count`` count them (last update, all updates) and a RuntimeWarning says so.

    Args:
        shape: the statistics' shape (one observation's).
        eps, clip, fixes: see :func:`running_norm_arguments`.
        count: the initial count (RunningMeanStd's prior 1e-4; mean 0, var 1).
    """

    def __init__(self, shape: Sequence[int], *, eps: float, clip: Optional[float] = None, fixes: bool = False,
                 count: float = COUNT_PRIOR):
        self.fixes = fixes
        self._norm = RunningNorm(tuple(shape), **running_norm_arguments(fixes, eps, clip))
        self._norm.count.fill_(count)
        self.last_nonfinite = 0
        self.nonfinite_count = 0
        self._bind()

    @property
    def norm(self) -> RunningNorm:
        """The RunningNorm that holds the statistics. Its ``steps`` is counted here and written into
        it when read: change the statistics through this object (the setters, load_statistics)."""
        self._norm.steps.fill_(self._steps)
        return self._norm

    def _bind(self) -> None:
        # What RunningNorm's forward works out on every call, worked out once, so that the call
        # is from_numpy, the backend's op and a look at the non-finite count (RunningNorm._update
        # without its argument checks, which the op repeats; steps is counted in Python and
        # written into the module when `norm` is read).
        norm = self._norm
        self._steps = int(norm.steps)
        self._views = {name: getattr(norm, name).numpy() for name in STATISTICS}
        self._statistics = (norm.mean, norm.var, norm.count)
        self._diag = norm._diag
        self._nonfinite_row = norm._diag[DIAG_ROWS.index("nonfinite")].numpy()
        self._backend = select_backend(norm.backend, norm.mean)
        self._bounds = norm._output_bounds()
        self._hyper = dict(momentum=norm.momentum, max_count=norm.max_count, **self._bounds)
        self._kept = None  # (x, y) of the last update, until normalize(x) takes y

    # ------------------------------------------------------------------ RunningMeanStd's names

    @property
    def mean(self) -> np.ndarray:
        return self._views["mean"]

    @mean.setter
    def mean(self, value) -> None:
        self._views["mean"][...] = value
        self._kept = None

    @property
    def var(self) -> np.ndarray:
        return self._views["var"]

    @var.setter
    def var(self, value) -> None:
        self._views["var"][...] = value
        self._kept = None

    @property
    def count(self):
        count = self._views["count"]
        first = count.flat[0]
        return float(first) if (count == first).all() else count.copy()

    @count.setter
    def count(self, value) -> None:
        self._views["count"][...] = value
        self._kept = None

    # ------------------------------------------------------------------ calls

    def update(self, x: np.ndarray) -> None:
        """Merges the batch x ``(*batch, *shape)`` into the statistics. The same pass normalizes x
        with the updated statistics: a ``normalize`` of this very array next returns that."""
        x_tensor, y, y_array = _with_output(x)
        self._running_norm(x_tensor, y)
        self._kept = (x, y_array)

    def update_normalize(self, x: np.ndarray) -> np.ndarray:
        """Updates the statistics with x, then normalizes x with them (one fused pass)."""
        x, y, y_array = _with_output(x)
        self._running_norm(x, y)
        return y_array

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """x normalized with the current statistics, in x's float dtype (float32 for integers)."""
        kept, self._kept = self._kept, None
        if kept is not None and kept[0] is x:
            return kept[1]
        x, y, y_array = _with_output(x)
        self._backend.normalize(x, self._statistics[0], self._statistics[1], y, **self._bounds)
        return y_array

    def denormalize(self, y: np.ndarray) -> np.ndarray:
        """y * std + mean: the inverse of normalize where no clip was hit."""
        return self._norm.denormalize(_as_tensor(y)).numpy()

    def _running_norm(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> None:
        self._kept = None
        self._backend.running_norm(x, None, *self._statistics, y, self._diag, **self._hyper)
        if x.numel() == 0:  # an empty batch is no update step
            self.last_nonfinite = 0
            return
        self._steps += 1
        # count_nonzero is the cheapest look at a small array; the sum only when there is something.
        self.last_nonfinite = int(self._nonfinite_row.sum()) if np.count_nonzero(self._nonfinite_row) else 0
        if self.last_nonfinite:
            self.nonfinite_count += self.last_nonfinite
            warnings.warn("fastnorm: non-finite inputs were left out of the running statistics (counted in "
                          "nonfinite_count); they stay non-finite in the normalized output", RuntimeWarning,
                          stacklevel=3)

    # ------------------------------------------------------------------ copies and pickles

    def load_statistics(self, mean, var, count) -> None:
        """Sets the statistics (broadcast to the shape), refusing non-finite or negative ones."""
        shape = tuple(self._norm.shape)
        values = {name: torch.from_numpy(np.array(np.broadcast_to(value, shape), dtype=np.float64))
                  for name, value in zip(STATISTICS, (mean, var, count))}
        self._norm.load_state_dict({**values, "steps": self._norm.steps.clone()}, strict=False)
        self._kept = None

    def __getstate__(self) -> dict[str, Any]:
        # numpy statistics and RunningNorm's arguments, not the module.
        return {"shape": tuple(self._norm.shape), "fixes": self.fixes,
                "hyper_parameters": self._norm.hyper_parameters(),
                **{name: self._views[name].copy() for name in STATISTICS}, "steps": self._steps,
                "nonfinite_count": self.nonfinite_count}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.fixes = state["fixes"]
        self._norm = RunningNorm(state["shape"], **state["hyper_parameters"])
        self._norm.steps.fill_(state["steps"])
        self._bind()
        self.load_statistics(*(state[name] for name in STATISTICS))
        self.last_nonfinite = 0
        self.nonfinite_count = state["nonfinite_count"]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._norm.extra_repr()}, fixes={self.fixes})"


def _as_tensor(x) -> torch.Tensor:
    """A CPU tensor sharing x's memory where it can (float x, contiguous, writable)."""
    return torch.from_numpy(_as_float_array(x))


def _as_float_array(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind != "f" or x.dtype == np.float16:
        return x.astype(np.float32)
    if not (x.flags.c_contiguous and x.flags.writeable):
        return x.copy()
    return x


def _with_output(x) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """x as a tensor, and a fresh output as a tensor and as the numpy array it shares memory with."""
    x = _as_float_array(x)
    y = np.empty_like(x)
    return torch.from_numpy(x), torch.from_numpy(y), y
