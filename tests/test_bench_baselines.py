"""The benchmarks' baselines compute what they claim: the seed's original normalizer is the exact
cumulative (Chan) merge with eps 1e-6 and no floor or clamp, and the eager float32 reference is
fastnorm's contract. Both are checked against fastnorm.reference (float64) over several updates.
The advantages benchmark's eager peer is the usual formula with the diagnostics fastnorm returns.
The benchmarks themselves are not run here (they measure; `make bench` runs them)."""

from __future__ import annotations

import os
import sys

import torch

from fastnorm import advantages_reference, reference
from fastnorm.advantages import reduced_dims
from helpers import randn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

from advantages import LAYOUTS, MIN_STD, eager_step  # noqa: E402
from running_norm import HYPER, _fresh_state, reference_float32_step  # noqa: E402
from seed_normalizer import RunningPerAgentWelford  # noqa: E402

# float32 statistics accumulated over a few updates of O(1) data, against float64.
F32_TOL = dict(rtol=1e-4, atol=1e-4)
SHAPE = (5, 3)


def _float64_run(batches, **hyper):
    cols = SHAPE[0] * SHAPE[1]
    mean, var, count = torch.zeros(cols, dtype=torch.float64), torch.ones(cols, dtype=torch.float64), \
        torch.zeros(cols, dtype=torch.float64)
    outputs = []
    for x in batches:
        result = reference.running_norm(x, None, mean, var, count, **hyper)
        mean, var, count = result.mean, result.var, result.count
        outputs.append(result.y)
    return outputs, mean, var


def _batches(gen):
    """A near-constant batch (eps matters), a large one, then a small one holding an outlier: its
    batch weight 10/2016 is below 1 - momentum (the EMA floor matters) and its z exceeds the clip."""
    batches = [randn((6, *SHAPE), gen, dtype=torch.float64, scale=1e-3),
               randn((2000, *SHAPE), gen, dtype=torch.float64, mean=3.0, scale=2.0),
               randn((10, *SHAPE), gen, dtype=torch.float64, mean=3.0, scale=2.0)]
    batches[2][0] += 1000.0
    return batches


def test_seed_normalizer_is_the_cumulative_merge(gen):
    batches = _batches(gen)
    expected_y, mean, var = _float64_run(batches, momentum=None, max_count=None, eps=1e-6, min_std=None,
                                         max_std=None, clip=None)
    seed = RunningPerAgentWelford(SHAPE)
    for x, y in zip(batches, expected_y):
        got = seed(x.float())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), y, **F32_TOL)
    torch.testing.assert_close(seed.mean.double().reshape(-1), mean, **F32_TOL)
    torch.testing.assert_close((seed.M2 / seed.count).double().reshape(-1), var, **F32_TOL)


def test_float32_reference_is_fastnorms_contract(gen):
    batches = _batches(gen)
    expected_y, mean, var = _float64_run(batches, **HYPER)
    assert expected_y[2].abs().max() == HYPER["clip"]  # the data reach the clamp
    state = _fresh_state(SHAPE, "cpu", torch.float32)
    for x, y in zip(batches, expected_y):
        got = reference_float32_step(x.float(), state)
        assert got.dtype == torch.float32 and got.shape == x.shape
        torch.testing.assert_close(got.double(), y, **F32_TOL)
    torch.testing.assert_close(state["mean"].double(), mean, **F32_TOL)
    torch.testing.assert_close(state["var"].double(), var, **F32_TOL)


def test_eager_advantages_peer_is_the_usual_formula_with_the_diagnostics(gen):
    for make_shape, dim, masked in LAYOUTS.values():
        shape = make_shape(16 * 37)
        adv = randn(shape, gen, mean=0.5, scale=2.0)
        mask = torch.rand(shape[0], generator=gen) < 0.7 if masked else None
        y, (mean, std, count, norm_max_abs, below) = eager_step(adv, dim, mask)
        expected = advantages_reference.normalize_advantages(adv, mask, reduced_dims(dim, adv.dim()), min_std=MIN_STD)
        torch.testing.assert_close(y.double(), expected.y.double(), **F32_TOL)
        torch.testing.assert_close(mean.double().reshape(-1), expected.mean.reshape(-1), **F32_TOL)
        torch.testing.assert_close(std.double().reshape(-1), expected.std_raw.reshape(-1), **F32_TOL)
        assert count == int(expected.count.reshape(-1)[0])
        torch.testing.assert_close(norm_max_abs.double().reshape(-1), expected.norm_max_abs.reshape(-1), **F32_TOL)
        assert torch.equal(below.reshape(-1), expected.std_below_floor.reshape(-1))
