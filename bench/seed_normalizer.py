"""The seed's original normalizer, `RunningPerAgentWelford`, written from its description in
shared/seeds/normalization-stability-analysis.md ("Current Design"): the baseline that the rollout
and stability benchmarks compare fastnorm with.

As the seed describes it: float32 statistics per agent and feature, Welford/Chan accumulation of
(mean, M2, count) that never decays (the count grows forever), eps = 1e-6 added to the variance,
no floor on the std and no clamp on the output. `transform` updates the statistics with the batch
first and then normalizes it with them (the seed's step-1 example divides by the first batch's own
std). Only what the seed shows is reproduced; its per-name bookkeeping is left out (one instance
per observation tensor).
"""

from __future__ import annotations

from typing import Iterable, Optional, Union

import torch
from torch import Tensor


class RunningPerAgentWelford:
    """Running mean and variance of x of shape (B, *shape), reduced over the batch dim B."""

    def __init__(self, shape: Iterable[int], eps: float = 1e-6, device: Optional[Union[str, torch.device]] = None):
        self.eps = eps
        f32 = dict(dtype=torch.float32, device=device)
        self.mean = torch.zeros(tuple(shape), **f32)
        self.M2 = torch.zeros(tuple(shape), **f32)
        self.count = torch.zeros(tuple(shape), **f32)

    def __call__(self, x: Tensor) -> Tensor:
        return self.transform(x)

    def transform(self, x: Tensor, update: bool = True) -> Tensor:
        if update:
            self._update_stats(x)
        var = self.M2 / self.count.clamp(min=1.0)
        std_b = torch.sqrt(torch.clamp(var, min=0.0) + self.eps)  # the seed's line 47
        return (x - self.mean) / std_b

    def _reduce_over_batch(self, x: Tensor) -> tuple[int, Tensor, Tensor]:
        m = x.shape[0]
        mean_b = x.mean(0)
        M2_b = ((x - mean_b) ** 2).sum(0)
        return m, mean_b, M2_b

    def _update_stats(self, x: Tensor) -> None:
        # The seed's lines 110-112: Chan et al.'s parallel merge, accumulated forever.
        m, mean_b, M2_b = self._reduce_over_batch(x)
        n = self.count
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (m / (n + m))
        self.M2 = self.M2 + M2_b + (delta ** 2) * (n * m / (n + m))
        self.count = n + m
