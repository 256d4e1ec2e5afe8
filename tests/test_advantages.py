"""normalize_advantages on every backend that has it, against the float64 reference
(fastnorm.advantages_reference), and the seed's failure modes it must prevent."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastnorm import advantages_reference, normalize_advantages
from fastnorm.advantages import reduced_dims
from helpers import DTYPES, Y_TOL, random_mask, randn

# Tolerances of the float64 statistics against the reference: the kernels accumulate blocks in
# float32 (float64 for float64 data; half precision is exact in float32) and merge them in float64.
# norm_max_abs comes from the float64 statistics and the extreme entries, not from the rounded y.
STATS_TOL = {
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
}

# (shape, dim): every layout the CPU kernel distinguishes, with odd sizes.
CASES = [
    ((37,), None),  # one short run
    ((300, 7), None),  # one run of many rows and a partial last row
    ((129, 8), 0),  # groups repeating every 8 entries: one run with 8 slots
    ((50, 4, 2), (0, 2)),  # groups of 2 adjacent entries repeating every 8
    ((33, 16), 0),  # period 16: one run for float-accumulated dtypes, columns for float64
    ((129, 5), 0),  # columns, narrow rows folded, a remainder of rows
    ((64, 3, 7), 0),  # columns, groups of two dims
    ((40, 6, 3), (0, 2)),  # columns, groups of 3 entries per row
    ((5, 4, 3), (0, -1)),  # few rows of short runs: transposed
    ((3, 2500), 1),  # long runs, one group each
    ((6, 5, 4), 1),  # kept dims not adjacent: permuted
    ((9, 2100), 0),  # columns cut into strips
]
MASK_KINDS = ["none", "leading", "full"]


def make_mask(kind, shape, gen, device):
    if kind == "none" or len(shape) == 0:
        return None
    return random_mask(shape[:1] if kind == "leading" else shape, gen, device)


def expected(adv, mask=None, dim=None, **kwargs):
    return advantages_reference.normalize_advantages(adv, mask, reduced_dims(dim, adv.dim()), **kwargs)


def assert_matches(y, stats, ref, dtype, scale=1.0):
    tol = STATS_TOL[dtype]
    torch.testing.assert_close(y, ref.y, equal_nan=True, **Y_TOL[dtype])
    assert torch.equal(stats.count, ref.count)
    torch.testing.assert_close(stats.mean, ref.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(stats.std_raw, ref.std_raw, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(stats.norm_max_abs, ref.norm_max_abs, rtol=5 * tol["rtol"], atol=5 * tol["atol"])
    assert torch.equal(stats.std_below_floor, ref.std_below_floor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,dim", CASES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_matches_reference(adv_backend, device, gen, dtype, shape, dim, mask_kind):
    adv = randn(shape, gen, dtype=dtype, device=device, mean=0.5, scale=2.0)
    mask = make_mask(mask_kind, shape, gen, device)
    out = torch.full_like(adv, math.nan)
    y, stats = normalize_advantages(adv, mask=mask, dim=dim, backend=adv_backend, out=out)
    assert y is out and y.dtype == dtype
    ref = expected(adv, mask, dim)
    assert stats.count.shape == ref.count.shape and stats.mean.dtype == torch.float64
    assert_matches(y, stats, ref, dtype, scale=2.0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=st.lists(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 33, 130]), max_size=4), data=st.data())
def test_random_layouts_match_reference(adv_backend, device, shape, data):
    # Any dims (adjacent or not), any mask prefix, any dtype: every way the API maps onto the op.
    dims = data.draw(st.none() | st.sets(st.integers(0, max(len(shape) - 1, 0)), min_size=1), label="dims")
    dims = None if dims is None or not shape else sorted(dims)
    mask_dims = data.draw(st.integers(0, len(shape)), label="mask_dims")
    dtype = data.draw(st.sampled_from(DTYPES), label="dtype")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    adv = randn(shape, g, dtype=dtype, device=device, mean=1.0, scale=2.0)
    mask = random_mask(shape[:mask_dims], g, device) if data.draw(st.booleans(), label="masked") else None
    y, stats = normalize_advantages(adv, mask=mask, dim=dims, backend=adv_backend)
    assert_matches(y, stats, expected(adv, mask, dims), dtype, scale=2.0)


@pytest.mark.parametrize("shape,dim", [((50, 3), None), ((50, 3), 0), ((5, 4, 3), (0, 2))], ids=str)
def test_biased_std(adv_backend, device, gen, shape, dim):
    adv = randn(shape, gen, device=device)
    y, stats = normalize_advantages(adv, dim=dim, unbiased=False, backend=adv_backend)
    assert_matches(y, stats, expected(adv, None, dim, unbiased=False), torch.float32)
    exact = adv.double().std(dim=reduced_dims(dim, adv.dim()), unbiased=False)
    torch.testing.assert_close(stats.std_raw, exact, rtol=2e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_drop_in_for_the_usual_formula(adv_backend, device, gen, dtype):
    # With std >> min_std the result is the usual formula's, globally and per agent (dim=0).
    # The formula's + 1e-8 changes y by a relative 1e-8 / std, beyond float64's own tolerance.
    tol = {k: max(v, 1e-7) for k, v in Y_TOL[dtype].items()}
    adv = randn((2048, 6), gen, dtype=dtype, device=device, mean=0.3, scale=1.5)
    y, stats = normalize_advantages(adv, backend=adv_backend)
    torch.testing.assert_close(y, (adv - adv.mean()) / (adv.std() + 1e-8), **tol)
    torch.testing.assert_close(stats.std_raw, adv.double().std(), rtol=1e-6, atol=0)
    y, stats = normalize_advantages(adv, dim=0, backend=adv_backend)
    torch.testing.assert_close(y, (adv - adv.mean(0)) / (adv.std(0) + 1e-8), **tol)


@pytest.mark.parametrize("raw_std", [1e-5, 1e-6])
def test_the_seeds_vulnerability_window(adv_backend, device, gen, raw_std):
    # No-trade episodes: 2048 advantages equal but for one, the raw std deep inside [1e-8, 1e-4].
    n = 2048
    level = float(torch.rand((), generator=gen)) + 0.5
    adv = torch.full((n,), level, dtype=torch.float32)
    adv[int(torch.randint(n, (), generator=gen))] += raw_std * math.sqrt(n)  # unbiased std = |d| / sqrt(n)
    adv = adv.to(device)
    naive = (adv - adv.mean()) / (adv.std() + 1e-8)
    assert naive.abs().max() > 40  # the bug: about sqrt(2047) = 45, whatever the std
    y, stats = normalize_advantages(adv, min_std=1e-4, backend=adv_backend)
    assert float(y.abs().max()) < 10 and float(stats.norm_max_abs) < 10
    assert bool(stats.std_below_floor)
    torch.testing.assert_close(stats.std_raw, adv.double().std(), rtol=1e-6, atol=0)
    assert abs(float(stats.std_raw) / raw_std - 1) < 0.05  # float32 rounding of the one outlier
    logged = stats.as_dict()
    assert logged["train/advantages_norm_max_abs"] < 10 and logged["train/advantages_std_raw"] < 1e-4


def test_groups_of_0_1_and_2_entries(adv_backend, device, gen):
    adv = randn((4, 4), gen, device=device)
    adv[1, 0] = math.nan  # in the group with no selected entry: y is still 0
    # dim=0: the groups are the columns, with 0, 1, 2 and 4 selected entries.
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 0, 0, 1], [0, 0, 0, 1]], dtype=torch.bool, device=device)
    y, stats = normalize_advantages(adv, mask=mask, dim=0, backend=adv_backend)
    assert stats.count.tolist() == [0.0, 1.0, 2.0, 4.0]
    assert torch.equal(y[:, 0], torch.zeros(4, device=device))
    assert stats.mean[0] == 0 and stats.std_raw[0] == 0 and stats.norm_max_abs[0] == 0
    assert stats.std_raw[1] == 0 and y[0, 1] == 0 and stats.norm_max_abs[1] == 0  # one entry: y = 0 there
    a, b = adv[0, 2].double(), adv[1, 2].double()
    torch.testing.assert_close(stats.std_raw[2], (a - b).abs() / math.sqrt(2), rtol=1e-6, atol=0)
    torch.testing.assert_close(y[:2, 2].abs(), torch.full((2,), 1 / math.sqrt(2), device=device), rtol=1e-6, atol=0)
    assert stats.std_below_floor.tolist() == [True, True, False, False]
    assert_matches(y, stats, expected(adv, mask, 0), torch.float32)


def test_no_entry_and_one_entry_overall(adv_backend, device, gen):
    adv = randn((30, 2), gen, device=device)
    y, stats = normalize_advantages(adv, mask=torch.zeros(30, dtype=torch.bool, device=device), backend=adv_backend)
    assert torch.equal(y, torch.zeros_like(y))
    assert [float(t) for t in stats] == [0.0, 0.0, 0.0, 0.0, 1.0]
    y, stats = normalize_advantages(adv[:1, :1], backend=adv_backend)
    assert float(y) == 0 and float(stats.count) == 1 and float(stats.std_raw) == 0


def test_constant_groups_are_exact(adv_backend, device, gen):
    # All advantages equal (a deterministic environment): std_raw exactly 0, y exactly 0.
    c = torch.randn(3, generator=gen, dtype=torch.float64).float() * 7
    for adv, dim in [(c.expand(5000, 3), 0), (c[:1].expand(70_001), None), (c.view(3, 1).expand(2, 3, 3000), (0, 2))]:
        adv = adv.contiguous().to(device)
        y, stats = normalize_advantages(adv, dim=dim, backend=adv_backend)
        values = c.double().to(device)[: stats.mean.numel()].reshape(stats.mean.shape)
        assert torch.equal(stats.mean, values) and not stats.std_raw.any() and not stats.norm_max_abs.any()
        assert torch.equal(y, torch.zeros_like(y)) and stats.std_below_floor.all()


def test_large_offset_small_spread_float32(adv_backend, device, gen):
    # mean 1e3, std 1e-3 in float32: E[x^2] - E[x]^2 loses every digit of the variance.
    adv = (1e3 + 1e-3 * torch.randn(4096, generator=gen, dtype=torch.float64)).float().to(device)
    exact = adv.double().std()
    naive = ((adv * adv).mean() - adv.mean() ** 2) * (4096 / 4095)
    assert abs(float(naive) - float(exact) ** 2) > 0.5 * float(exact) ** 2
    y, stats = normalize_advantages(adv, backend=adv_backend)
    torch.testing.assert_close(stats.std_raw, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.double().std(), torch.ones((), dtype=torch.float64, device=device), rtol=1e-3, atol=0)
    assert_matches(y, stats, expected(adv), torch.float32, scale=1e3)


def test_non_finite_entries_are_excluded(adv_backend, device, gen):
    adv = randn((50, 3), gen, device=device)
    adv[3, 0], adv[7, 1], adv[9, 1] = math.nan, math.inf, -math.inf
    adv[:, 2] = math.nan  # a group with no finite entry
    adv[::7, 2] = math.inf
    y, stats = normalize_advantages(adv, dim=0, backend=adv_backend)
    ref = expected(adv, None, 0)
    assert_matches(y, stats, ref, torch.float32)
    assert torch.isnan(y[3, 0]) and y[7, 1] == math.inf and y[9, 1] == -math.inf
    assert torch.equal(y[:, 2], torch.zeros(50, device=device))
    assert stats.count.tolist() == [49.0, 48.0, 0.0] and torch.isfinite(stats.mean).all()


def test_huge_values_keep_statistics_finite(adv_backend, device, gen):
    adv = randn((300, 2), gen, device=device, scale=1e30)  # float32 squares overflow
    y, stats = normalize_advantages(adv, dim=0, backend=adv_backend)
    torch.testing.assert_close(stats.std_raw, adv.double().std(0), rtol=1e-5, atol=0)
    assert_matches(y, stats, expected(adv, None, 0), torch.float32, scale=1e30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input_and_output(adv_backend, device, gen, dtype):
    base = randn((6, 40, 9), gen, dtype=dtype, device=device)
    adv = base.transpose(0, 1)[:, :, 1:8]  # (40, 6, 7)
    assert not adv.is_contiguous()
    mask = random_mask((40, 6), gen, device)
    out = torch.full((7, 6, 40), math.nan, dtype=dtype, device=device).permute(2, 1, 0)
    for dim in (None, 0, (0, 2)):
        y, stats = normalize_advantages(adv, mask=mask, dim=dim, out=out, backend=adv_backend)
        assert y is out
        assert_matches(out, stats, expected(adv, mask, dim), dtype)


def test_in_place(adv_backend, device, gen):
    adv = randn((129, 3), gen, device=device)
    ref = expected(adv, None, 0)
    y, stats = normalize_advantages(adv, dim=0, out=adv, backend=adv_backend)
    assert y is adv
    assert_matches(adv, stats, ref, torch.float32)


def test_empty_inputs(adv_backend, device, gen):
    for shape, dim, groups in [((0,), None, ()), ((0, 3), 0, (3,)), ((4, 0), 0, (0,)), ((2, 0, 3), (0, 2), (0,))]:
        adv = torch.empty(shape, device=device)
        y, stats = normalize_advantages(adv, dim=dim, backend=adv_backend)
        assert y.shape == adv.shape and stats.count.shape == groups
        assert (stats.count == 0).all() and (stats.std_raw == 0).all() and (stats.norm_max_abs == 0).all()


def test_large_inputs_span_many_tiles(adv_kernel_backend, device, gen):
    # Many tiles of every layout: the merge order, the partial buffers, the last partial rows.
    for shape, dim, mask_shape in [((300_001,), None, (300_001,)), ((20_011, 7), 0, (20_011,)),
                                   ((20_011, 16), 0, (20_011,)), ((9_001, 4, 2), (0, 2), (9_001, 4, 2)),
                                   ((2, 70_001), 1, (2, 70_001)), ((3, 700, 40), (0, 2), (3, 700))]:
        adv = randn(shape, gen, device=device, mean=-3.0, scale=0.5)
        mask = random_mask(mask_shape, gen, device)
        y, stats = normalize_advantages(adv, mask=mask, dim=dim, backend=adv_kernel_backend)
        ref = expected(adv, mask, dim)
        torch.testing.assert_close(y, ref.y, **Y_TOL[torch.float32])
        assert torch.equal(stats.count, ref.count)
        torch.testing.assert_close(stats.mean, ref.mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats.std_raw, ref.std_raw, rtol=1e-6, atol=0)
        torch.testing.assert_close(stats.norm_max_abs, ref.norm_max_abs, rtol=1e-5, atol=0)
