"""RunningNorm on every backend under test against the float64 reference (fastnorm.reference)."""

from __future__ import annotations

import math

import pytest
import torch

from fastnorm import RunningNorm, reference
from helpers import (DTYPES, OPTION_CASES, Y_TOL, assert_diag_close, assert_stats_close, expected_step, option_id,
                     random_mask, randn)

# (batch shape, statistics shape): odd sizes, primes, 1 to 3 batch dims, wide and narrow.
SHAPES = [
    ((37,), (5,)),
    ((1,), (3, 2)),
    ((64, 3), (7, 11)),
    ((5, 4, 3), (2, 3)),
    ((300,), (257,)),
    ((1031,), (1,)),
    ((2, 129), (4, 3)),
]
MASK_KINDS = ["none", "rows", "agents", "full"]


def make_mask(kind, batch, stats, gen, device):
    if kind == "none":
        return None
    if kind == "rows":
        return random_mask(batch, gen, device)
    if kind == "agents":
        return random_mask(batch + stats[:1], gen, device)
    return random_mask(batch + stats, gen, device)


def poisoned_like(x):
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,stats", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("momentum", [0.99, None])
def test_matches_reference(backend, device, gen, dtype, batch, stats, mask_kind, momentum):
    norm = RunningNorm(stats, momentum=momentum, backend=backend, device=device)
    for _ in range(3):
        x = randn(batch + stats, gen, dtype=dtype, device=device, mean=2.0, scale=3.0)
        mask = make_mask(mask_kind, batch, stats, gen, device)
        expected = expected_step(norm, x, mask)
        out = poisoned_like(x)
        y = norm(x, mask=mask, out=out)
        assert y is out and y.dtype == dtype and y.shape == x.shape
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=3.0)
        assert_diag_close(norm._diag, expected.diag, dtype, scale=3.0)


@pytest.mark.parametrize("options", OPTION_CASES, ids=option_id)
@pytest.mark.parametrize("dtype,batch,stats,mask_kind,momentum", [
    (torch.float32, (37,), (5,), "rows", 0.99),
    (torch.bfloat16, (64, 3), (7, 11), "agents", None),
    (torch.float64, (1,), (3, 2), "none", None),  # one sample: an unbiased batch variance of 0
    (torch.float16, (300,), (257,), "full", 0.9),
], ids=str)
def test_options_match_reference(backend, device, gen, options, dtype, batch, stats, mask_kind, momentum):
    norm = RunningNorm(stats, momentum=momentum, backend=backend, device=device, **options)
    for _ in range(3):
        x = randn(batch + stats, gen, dtype=dtype, device=device, mean=2.0, scale=3.0)
        mask = make_mask(mask_kind, batch, stats, gen, device)
        expected = expected_step(norm, x, mask)
        y = norm(x, mask=mask, out=poisoned_like(x))
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=3.0)
        assert_diag_close(norm._diag, expected.diag, dtype, scale=3.0)
        torch.testing.assert_close(norm.normalize(x), reference.normalize(x, norm.mean, norm.var, eps=norm.eps,
                                   min_std=norm.min_std, max_std=None, clip=norm.clip,
                                   eps_on_std=norm.eps_placement == "std"), **Y_TOL[dtype])


def test_skrl_running_standard_scaler_math(backend, device, gen):
    # skrl 2.1.1's RunningStandardScaler: count 1, mean 0, var 1 to start, the exact parallel merge
    # with torch.var's unbiased batch variance, y = clamp((x - mean) / (sqrt(var) + eps), -5, 5).
    eps = 1e-8
    norm = RunningNorm((6,), momentum=None, eps=eps, min_std=None, clip=5.0, eps_placement="std",
                       batch_var="unbiased", backend=backend, device=device)
    norm.count.fill_(1.0)
    mean = torch.zeros(6, dtype=torch.float64)
    var = torch.ones(6, dtype=torch.float64)
    count = 1.0
    for n in (32, 1, 7, 64):
        x = randn((n, 6), gen, dtype=torch.float64, device=device, mean=3.0, scale=2.0)
        xd = x.cpu()
        batch_mean, batch_var = xd.mean(0), xd.var(0) if n > 1 else torch.zeros(6, dtype=torch.float64)
        delta, total = batch_mean - mean, count + n
        m2 = var * count + batch_var * n + delta**2 * count * n / total
        mean, var, count = mean + delta * n / total, m2 / total, total
        y = norm(x)
        torch.testing.assert_close(norm.mean.cpu(), mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(norm.var.cpu(), var, rtol=1e-12, atol=1e-12)
        assert torch.equal(norm.count.cpu(), torch.full((6,), count, dtype=torch.float64))
        expected_y = ((xd - mean) / (var.sqrt() + eps)).clamp(-5.0, 5.0)
        torch.testing.assert_close(y.cpu(), expected_y, **Y_TOL[torch.float64])


def test_skrl_class_itself_gives_the_same(backend, device, gen):
    skrl = pytest.importorskip("skrl.resources.preprocessors.torch")
    scaler = skrl.RunningStandardScaler(4, device="cpu")
    norm = RunningNorm((4,), momentum=None, eps=scaler.epsilon, min_std=None, clip=scaler.clip_threshold,
                       eps_placement="std", batch_var="unbiased", backend=backend, device=device)
    norm.count.fill_(1.0)
    for n in (16, 3, 40):
        x = randn((n, 4), gen, device="cpu", mean=-2.0, scale=4.0)
        want = scaler(x, train=True)
        got = norm(x.to(device))
        # float32 x: the kernels accumulate blocks in float32, skrl reduces in float32 too.
        torch.testing.assert_close(norm.mean.cpu(), scaler.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm.var.cpu(), scaler.running_variance, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.cpu(), want, **Y_TOL[torch.float32])  # skrl divides in float32


def test_rsl_rl_empirical_normalization_math(backend, device, gen):
    # rsl_rl 5.5.1's EmpiricalNormalization(shape, eps): count 0, the exact merge with the population
    # batch variance, y = (x - mean) / (sqrt(var) + eps), no floor, no clamp; float32 statistics.
    rsl = pytest.importorskip("rsl_rl.modules.normalization")
    reference_norm = rsl.EmpiricalNormalization(5, eps=1e-2)
    norm = RunningNorm((5,), momentum=None, eps=1e-2, min_std=None, clip=None, eps_placement="std",
                       backend=backend, device=device)
    for n in (64, 9, 1, 128):
        x = randn((n, 5), gen, device="cpu", mean=1.0, scale=0.5)
        reference_norm.update(x)
        want = reference_norm(x)
        got = norm(x.to(device))
        torch.testing.assert_close(norm.mean.cpu().float(), reference_norm.mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(norm.var.cpu().float(), reference_norm._var.squeeze(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_input_and_output(backend, device, gen, dtype):
    base = randn((6, 40, 9), gen, dtype=dtype, device=device)
    x = base.transpose(0, 1)[:, :, 1:8]  # (40, 6, 7): neither rows nor columns contiguous
    assert not x.is_contiguous()
    norm = RunningNorm((6, 7), backend=backend, device=device)
    expected = expected_step(norm, x)
    out = torch.full((7, 6, 40), float("nan"), dtype=dtype, device=device).permute(2, 1, 0)
    y = norm(x, out=out)
    assert y is out
    torch.testing.assert_close(out, expected.y, **Y_TOL[dtype])
    assert_stats_close(norm, expected, dtype)


def test_in_place(backend, device, gen):
    x = randn((129, 3, 4), gen, device=device)
    norm = RunningNorm((3, 4), backend=backend, device=device)
    expected = expected_step(norm, x)
    y = norm(x, out=x)
    assert y is x
    torch.testing.assert_close(x, expected.y, **Y_TOL[torch.float32])
    assert_stats_close(norm, expected, torch.float32)


@pytest.mark.parametrize("momentum", [0.99, None])
def test_500_steps_of_drifting_data(backend, device, gen, momentum):
    norm = RunningNorm((3, 5), momentum=momentum, backend=backend, device=device)
    mean = var = count = None
    for step in range(500):
        drift_mean, drift_scale = 0.05 * step, math.exp(0.004 * step)
        x = randn((48, 3, 5), gen, device=device, mean=drift_mean, scale=drift_scale)
        expected = reference.running_norm(
            x, None, *(t if t is not None else getattr(norm, n) for t, n in
                       ((mean, "mean"), (var, "var"), (count, "count"))),
            momentum=momentum, max_count=None, eps=norm.eps, min_std=norm.min_std, max_std=None, clip=norm.clip)
        y = norm(x)
        mean, var, count = expected.mean, expected.var, expected.count
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    # The statistics ran independently for 500 steps and still agree.
    scale = math.exp(0.004 * 500)
    torch.testing.assert_close(norm.mean, mean, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(norm.var, var, rtol=1e-5, atol=1e-5 * scale**2)
    assert torch.equal(norm.count, count)
    if momentum is not None:
        # The EMA tracks the drift: the last batches' mean, not the average since step 0.
        assert (norm.mean - 0.05 * 499).abs().max() < 8 * scale


def test_max_count_keeps_the_weight_up(backend, device, gen):
    norm = RunningNorm((4,), momentum=None, max_count=100, backend=backend, device=device)
    for _ in range(20):
        norm.update(randn((50, 4), gen, device=device))
    assert torch.equal(norm.count, torch.full((4,), 1000.0, dtype=torch.float64, device=device))
    x = randn((50, 4), gen, device=device, mean=100.0)
    expected = expected_step(norm, x)
    before = norm.mean.clone()
    norm.update(x)
    assert_stats_close(norm, expected, torch.float32, scale=100.0)
    # w = 50 / (100 + 50) = 1/3 of the jump, not 50 / 1050.
    jump = (norm.mean - before) / (expected.diag[1].reshape(4) - before)
    torch.testing.assert_close(jump, torch.full_like(jump, 1 / 3), rtol=1e-9, atol=1e-9)


def test_warmup_and_ready(backend, device, gen):
    norm = RunningNorm((2,), warmup=3, backend=backend, device=device)
    assert norm.ready.dtype == torch.bool and norm.ready.device.type == device.type
    states = []
    for _ in range(4):
        states.append(bool(norm.ready))
        norm(randn((8, 2), gen, device=device))
    assert states == [False, False, False, True]
    norm(randn((0, 2), gen, device=device))  # an empty batch is no step
    norm.eval()
    norm(randn((8, 2), gen, device=device))  # nor is normalizing
    assert int(norm.steps) == 4
    norm.reset()
    assert not bool(norm.ready)


def test_first_step_is_the_batch_and_not_noisy(backend, device, gen):
    # The seed's "money = 5.0 +- small noise" start: the floor keeps y bounded from step 1.
    x = 5.0 + 1e-3 * torch.randn((256, 8), generator=gen).to(device)
    norm = RunningNorm((8,), backend=backend, device=device)
    y = norm(x)
    torch.testing.assert_close(norm.mean, x.double().mean(0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.var, x.double().var(0, unbiased=False), rtol=1e-4, atol=1e-10)
    assert y.abs().max() < 0.5  # |x - mean| <~ 4e-3 over the std floor 1e-2


def test_constant_columns(backend, device, gen):
    c = torch.randn(3, generator=gen) * 7
    x = c.expand(100, 3).clone().to(device)
    norm = RunningNorm((3,), momentum=None, backend=backend, device=device)
    y = norm(x)
    assert torch.equal(norm.var, torch.zeros(3, dtype=torch.float64, device=device))
    assert torch.equal(norm.mean, c.double().to(device))
    assert torch.equal(y, torch.zeros_like(y))
    y2 = norm(x + 1e-3)  # a tiny shift over std floor 1e-2 -> about 0.1, not a blow-up
    assert y2.abs().max() < 0.2


@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_extreme_scales(backend, device, gen, scale, dtype):
    norm = RunningNorm((5,), min_std=None, eps=0.0, backend=backend, device=device)
    for _ in range(3):
        x = randn((200, 5), gen, dtype=dtype, device=device, mean=3 * scale, scale=scale)
        expected = expected_step(norm, x)
        y = norm(x)
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=scale)


def test_large_offset_small_spread_float32(backend, device, gen):
    # mean 1e3, std 1e-3 in float32: E[x^2] - E[x]^2 would lose every digit of the variance.
    x = (1e3 + 1e-3 * torch.randn((4096, 4), generator=gen, dtype=torch.float64)).float().to(device)
    norm = RunningNorm((4,), min_std=None, eps=0.0, backend=backend, device=device)
    expected = expected_step(norm, x)
    y = norm(x)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])  # z = (x - mean) / std to float32 precision
    exact = x.double().var(0, unbiased=False)
    torch.testing.assert_close(norm.var, exact, rtol=1e-4, atol=0)
    torch.testing.assert_close(y.double().std(0, unbiased=False), torch.ones(4, dtype=torch.float64, device=device),
                               rtol=1e-3, atol=0)


def test_huge_finite_values_keep_statistics_finite(backend, device, gen):
    x = randn((100, 3), gen, device=device, scale=1e30)  # float32 squares overflow
    norm = RunningNorm((3,), momentum=None, backend=backend, device=device)
    norm(x)
    exact = x.double().var(0, unbiased=False)
    assert torch.isfinite(norm.var).all()
    torch.testing.assert_close(norm.var, exact, rtol=1e-5, atol=0)


def test_non_finite_inputs_never_reach_the_statistics(backend, device, gen):
    x = randn((64, 2, 3), gen, device=device)
    x[3, 0, 0] = float("nan")
    x[5, 1, 2] = float("inf")
    x[9, 1, 2] = float("-inf")
    x[:, 0, 1] = float("nan")  # a column with no finite entry at all
    norm = RunningNorm((2, 3), clip=5.0, backend=backend, device=device)
    y = norm(x)
    clean = x.clone()
    keep = torch.isfinite(clean)
    ref_norm = RunningNorm((2, 3), clip=5.0, backend="reference", device=device)
    ref_norm(torch.where(keep, clean, 0.0), mask=keep)
    assert_stats_close(norm, ref_norm_result(ref_norm), torch.float32)
    assert torch.isfinite(norm.mean).all() and torch.isfinite(norm.var).all()
    assert norm.count[0, 1] == 0 and norm.mean[0, 1] == 0 and norm.var[0, 1] == 1  # untouched column
    assert torch.isnan(y[3, 0, 0]) and torch.isnan(y[:, 0, 1]).all()
    assert y[5, 1, 2] == 5.0 and y[9, 1, 2] == -5.0
    nonfinite = norm._diag[3].reshape(2, 3)
    assert nonfinite[0, 0] == 1 and nonfinite[1, 2] == 2 and nonfinite[0, 1] == 64 and nonfinite.sum() == 67


def ref_norm_result(norm):
    return reference.RunningNormResult(None, norm.mean, norm.var, norm.count, norm._diag)


def test_empty_batch_changes_nothing(backend, device, gen):
    norm = RunningNorm((3, 2), backend=backend, device=device)
    norm(randn((10, 3, 2), gen, device=device))
    state = {k: v.clone() for k, v in norm.state_dict().items() if torch.is_tensor(v)}
    for x in (randn((0, 3, 2), gen, device=device), randn((4, 0, 3, 2), gen, device=device)):
        y = norm(x)
        assert y.shape == x.shape
    for k, v in norm.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, state[k]), k


def test_one_sample(backend, device, gen):
    norm = RunningNorm((4,), backend=backend, device=device)
    x = randn((4,), gen, device=device)  # no batch dim: one sample
    expected = expected_step(norm, x)
    y = norm(x)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    assert torch.equal(norm.var, torch.zeros(4, dtype=torch.float64, device=device))  # w = 1, v_b = 0
    assert torch.equal(norm.count, torch.ones(4, dtype=torch.float64, device=device))


def test_fully_masked_batch_is_no_update(backend, device, gen):
    norm = RunningNorm((3,), backend=backend, device=device)
    x = randn((20, 3), gen, device=device)
    norm(x, mask=torch.zeros(20, dtype=torch.bool, device=device))
    assert torch.equal(norm.count, torch.zeros(3, dtype=torch.float64, device=device))
    assert torch.equal(norm.mean, torch.zeros(3, dtype=torch.float64, device=device))


def test_masked_entries_are_normalized_but_not_counted(backend, device, gen):
    x = randn((30, 4, 2), gen, device=device)
    x[:10] += 1000.0  # inactive agents hold garbage
    mask = torch.ones(30, 4, dtype=torch.bool, device=device)
    mask[:10] = False
    norm = RunningNorm((4, 2), backend=backend, device=device)
    y = norm(x, mask=mask)
    torch.testing.assert_close(norm.mean, x[10:].double().mean(0), rtol=1e-6, atol=1e-6)
    assert (y[:10] == norm.clip).all()  # computed (and clamped), just not counted


def test_update_normalize_and_eval(backend, device, gen):
    a = RunningNorm((3,), backend=backend, device=device)
    b = RunningNorm((3,), backend=backend, device=device)
    x = randn((50, 3), gen, device=device)
    y_a = a(x)
    b.update(x)
    assert torch.isnan(b._diag[4:]).all()  # no output, no clip diagnostics
    assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    torch.testing.assert_close(b.normalize(x), y_a, rtol=1e-6, atol=1e-6)
    b.eval()
    stats = (b.mean.clone(), b.var.clone())
    x2 = randn((50, 3), gen, device=device, mean=5.0)
    y_eval = b(x2, mask=torch.ones(50, dtype=torch.bool, device=device))
    assert torch.equal(b.mean, stats[0]) and torch.equal(b.var, stats[1])
    expected = reference.normalize(x2, b.mean, b.var, eps=b.eps, min_std=b.min_std, max_std=b.max_std, clip=b.clip)
    torch.testing.assert_close(y_eval, expected, **Y_TOL[torch.float32])
    b(x2, update=True)
    assert not torch.equal(b.mean, stats[0])


def test_denormalize_inverts_normalize(backend, device, gen):
    norm = RunningNorm((2, 3), clip=None, backend=backend, device=device)
    x = randn((40, 2, 3), gen, device=device, mean=4.0, scale=2.0, dtype=torch.float64)
    y = norm(x)
    torch.testing.assert_close(norm.denormalize(y), x, rtol=1e-10, atol=1e-10)


def test_max_std_and_clip_none(backend, device, gen):
    norm = RunningNorm((3,), max_std=0.5, clip=None, backend=backend, device=device)
    x = randn((64, 3), gen, device=device, scale=10.0)
    expected = expected_step(norm, x)
    y = norm(x)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    assert y.abs().max() > 10  # nothing clamps it


def test_row_strided_views(backend, device, gen):
    # x and out as column slices of wider tensors: rows are contiguous but strided apart.
    wide_x = randn((300, 9), gen, device=device)
    x = wide_x[:, 2:7]
    wide_out = torch.full((300, 8), float("nan"), device=device)
    out = wide_out[:, 1:6]
    norm = RunningNorm((5,), backend=backend, device=device)
    mask = random_mask((300,), gen, device)
    expected = expected_step(norm, x, mask)
    y = norm(x, mask=mask, out=out)
    assert y is out
    torch.testing.assert_close(out, expected.y, **Y_TOL[torch.float32])
    assert torch.isnan(wide_out[:, 0]).all() and torch.isnan(wide_out[:, 6:]).all()  # nothing outside out
    assert_stats_close(norm, expected, torch.float32)


def test_float64_values_near_the_overflow_limit(backend, device, gen):
    # A column whose spread overflows float64 (deviations ~1e200 square to inf) keeps its
    # statistics rather than taking a wrong (or zero) variance; ordinary columns still update.
    x = randn((50, 2), gen, dtype=torch.float64, device=device)
    x[:, 0] = x[:, 0] * 1e200
    norm = RunningNorm((2,), momentum=None, backend=backend, device=device)
    norm(x)
    assert norm.mean[0] == 0 and norm.var[0] == 1 and norm.count[0] == 0
    torch.testing.assert_close(norm.mean[1], x[:, 1].mean(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.var[1], x[:, 1].var(unbiased=False), rtol=1e-12, atol=1e-12)
