"""normalize_advantages split in two (advantage_moments, normalize_advantages_from), the ops behind
normalize_advantages(sync=True), on every backend under test that has them on the device
(adv_split_backend), in one process: one part is the fused op exactly, several parts are the
concatenated advantages. The multi-process runs are in test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from fastnorm import _ops, advantages_reference
from fastnorm.advantages import AdvantageStats
from fastnorm.backends import BACKENDS
from helpers import DTYPES, Y_TOL, random_mask, randn
from test_advantages import STATS_TOL, assert_matches

SPLIT_OPS = ("advantage_moments", "normalize_advantages_from")
STAT_ROWS = advantages_reference.STAT_ROWS
MOMENT_ROWS = advantages_reference.MOMENT_ROWS
EMPTY_GROUP = (0.0, 0.0, 0.0, math.inf, -math.inf)  # a moments-table column with no entry

# x (O, G, I): every layout the CPU kernel distinguishes (see test_advantages.CASES).
OGI = [(1, 1, 37), (1, 1, 2100), (129, 8, 1), (25, 4, 2), (129, 5, 1), (40, 6, 3), (3, 2, 2500), (9, 2100, 1)]
# How many entries of x one mask entry covers: none, per row of O, per (O, G), per entry.
MASK_KINDS = ["none", "rows", "groups", "entries"]


def flat_mask(kind, ogi, gen, device):
    o, g, i = ogi
    numel = {"none": 0, "rows": o, "groups": o * g, "entries": o * g * i}[kind]
    return random_mask((numel,), gen, device) if numel else None


def moments_of(backend, x, mask):
    moments = torch.full((len(MOMENT_ROWS), x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    BACKENDS[backend].advantage_moments(x, mask, moments)
    return moments


def from_parts(backend, x, parts, unbiased=True):
    """normalize_advantages_from into poisoned buffers: (y, AdvantageStats of the groups)."""
    out = torch.full_like(x, math.nan)
    stats = torch.full((len(STAT_ROWS), x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    BACKENDS[backend].normalize_advantages_from(x, parts, out, stats, min_std=1e-4, unbiased=unbiased)
    return out, as_stats(stats)


def fused(backend, x, mask, unbiased=True):
    out = torch.full_like(x, math.nan)
    stats = torch.full((len(STAT_ROWS), x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    BACKENDS[backend].normalize_advantages(x, mask, out, stats, min_std=1e-4, unbiased=unbiased)
    return out, as_stats(stats)


def as_stats(stats):
    rows = dict(zip(STAT_ROWS, stats))
    return AdvantageStats(rows["mean"], rows["std_raw"], rows["count"], rows["norm_max_abs"], rows["std_raw"] < 1e-4)


def full_mask(mask, x):
    return None if mask is None else mask.repeat_interleave(x.numel() // mask.numel()).view(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ogi", OGI, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_one_part_is_the_fused_op(adv_split_backend, device, gen, dtype, ogi, mask_kind):
    x = randn(ogi, gen, dtype=dtype, device=device, mean=1.0, scale=2.0)
    x.view(-1)[5] = math.nan
    mask = flat_mask(mask_kind, ogi, gen, device)
    unbiased = bool(torch.rand((), generator=gen) < 0.5)
    y, stats = from_parts(adv_split_backend, x, moments_of(adv_split_backend, x, mask)[None], unbiased)
    y_fused, stats_fused = fused(adv_split_backend, x, mask, unbiased)
    # The same code on the same moments: the same bits (the reference's max |y| from the merged min
    # and max is exact too: y is monotonic in x and rounding is monotonic).
    assert torch.equal(y.nan_to_num(-7.0), y_fused.nan_to_num(-7.0))
    for name, got, want in zip(stats._fields, stats, stats_fused):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ogi", [(97, 3, 5), (2, 2, 3001), (101, 8, 1)], ids=str)
def test_moments_match_reference(adv_split_backend, device, gen, dtype, ogi):
    x = randn(ogi, gen, dtype=dtype, device=device, mean=-4.0, scale=2.0)
    x[1, 0, 0] = math.nan
    x[-1, -1, -1] = math.inf
    x[:, 1, :] = -math.inf  # a group with no finite entry
    mask = flat_mask("entries", ogi, gen, device)
    got = moments_of(adv_split_backend, x, mask)
    want = advantages_reference.moment_table(x, full_mask(mask, x), (0, 2))
    count, mean, m2, lo, hi = range(len(MOMENT_ROWS))
    for row in (count, lo, hi):  # exact: counts, and input values
        assert torch.equal(got[row], want[row]), MOMENT_ROWS[row]
    tol = STATS_TOL[dtype]
    torch.testing.assert_close(got[mean], want[mean], rtol=tol["rtol"], atol=tol["atol"] * 4.0)
    torch.testing.assert_close(got[m2], want[m2], rtol=tol["rtol"], atol=tol["atol"] * 16.0 * float(want[count].max()))
    assert got[:, 1].tolist() == list(EMPTY_GROUP)


def test_empty_and_fully_masked_x_give_empty_tables(adv_split_backend, device, gen):
    backend = adv_split_backend
    x = randn((9, 2, 3), gen, device=device)
    x[0, 0, 0] = math.nan
    cases = [(randn((0, 2, 3), gen, device=device), None), (randn((4, 2, 0), gen, device=device), None),
             (x, torch.zeros(9, dtype=torch.bool, device=device))]
    expected = torch.tensor(EMPTY_GROUP, dtype=torch.float64, device=device)[:, None].expand(-1, 2)
    for x, mask in cases:
        assert torch.equal(moments_of(backend, x, mask), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("gi,axis", [((1, 1), 0), ((8, 1), 0), ((5, 3), 0), ((3, 40), 2)], ids=str)
def test_parts_merge_to_the_concatenated_advantages(adv_split_backend, device, gen, dtype, gi, axis):
    # Four "ranks": unequal shards of x (O, G, I) along O or I, one empty, one fully masked; every
    # shard merges the same tables.
    g, i = gi
    sizes = (29, 0, 7, 64) if axis == 0 else (13, 0, 3, 30)
    shape = (sum(sizes), g, i) if axis == 0 else (50, g, sum(sizes))
    x = randn(shape, gen, dtype=dtype, device=device, mean=3.0, scale=0.5)
    mask = random_mask(shape, gen, device)
    mask.narrow(axis, sizes[0], sizes[1] + sizes[2]).fill_(False)  # shards 1 (empty) and 2
    xs, masks = x.split(sizes, dim=axis), mask.split(sizes, dim=axis)
    parts = torch.stack([moments_of(adv_split_backend, xp, mp.reshape(-1)) for xp, mp in zip(xs, masks)])
    results = [from_parts(adv_split_backend, xp, parts) for xp in xs]
    for y, stats in results[1:]:  # the same parts, the same bits
        assert all(torch.equal(a, b) for a, b in zip(stats, results[0][1]))
    expected = advantages_reference.normalize_advantages(x, mask, (0, 2))
    y = torch.cat([y for y, _ in results], dim=axis)
    assert_matches(y, results[0][1], expected, dtype, scale=4.0)


def test_empty_x_takes_the_statistics_of_the_parts(adv_split_backend, device, gen):
    backend = adv_split_backend
    others = randn((40, 3, 2), gen, device=device, mean=3.0)
    empty = others[:0]
    parts = torch.stack([moments_of(backend, empty, None), moments_of(backend, others, None)])
    y, stats = from_parts(backend, empty, parts)
    _, stats_fused = fused(backend, others, None)
    assert y.shape == (0, 3, 2)
    for name, got, want in zip(stats._fields, stats, stats_fused):  # the empty part merged first changes no bit
        assert torch.equal(got, want), name


@pytest.mark.skipif(_ops.EXTENSION_ERROR is not None, reason=str(_ops.EXTENSION_ERROR))
@pytest.mark.parametrize("shape,mask_numel,parts", [((33, 4, 3), 33 * 4, 3), ((1, 1, 500), 5, 1),
                                                    ((0, 2, 3), 0, 2)], ids=str)
def test_opcheck(device, gen, shape, mask_numel, parts):
    for op in SPLIT_OPS:
        if not _ops.has_kernel(op, device.type.upper()):
            pytest.skip(f"no {device.type} kernel for {op}")
    x = randn(shape, gen, device=device)
    mask = random_mask((mask_numel,), gen, device) if mask_numel else None
    moments = torch.empty(len(MOMENT_ROWS), shape[1], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.advantage_moments.default, (x, mask, moments))
    torch.ops.fastnorm.advantage_moments(x, mask, moments)
    table = moments.expand(parts, -1, -1).contiguous()
    stats = torch.empty(len(STAT_ROWS), shape[1], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.normalize_advantages_from.default,
                          (x, table, torch.empty_like(x), stats), dict(min_std=1e-4, unbiased=True))


@pytest.mark.skipif(not all(_ops.has_kernel(op, "CPU") for op in SPLIT_OPS),
                    reason="fastnorm._C has no CPU kernels for the split advantage ops")
def test_ops_reject_bad_arguments_directly(gen):
    x = randn((33, 4, 3), gen)
    out, stats = torch.empty_like(x), torch.empty(4, 4, dtype=torch.float64)
    moments = torch.empty(5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"moments must be a contiguous float64 tensor of shape \(5, 4\), got \[6, 4\]"):
        torch.ops.fastnorm.advantage_moments(x, None, torch.empty(6, 4, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"moments must be a contiguous float64 tensor of shape \(5, 4\)"):
        torch.ops.fastnorm.advantage_moments(x, None, moments.float())
    with pytest.raises(RuntimeError, match="mask must have a number of elements that divides x's 396, got 5"):
        torch.ops.fastnorm.advantage_moments(x, random_mask((5,), gen), moments)
    op = torch.ops.fastnorm.normalize_advantages_from
    with pytest.raises(RuntimeError, match=r"parts must be a contiguous float64 tensor of shape \(num_parts >= 1, "
                                           r"5, 4\), got \[2, 5, 3\]"):
        op(x, torch.zeros(2, 5, 3, dtype=torch.float64), out, stats, 1e-4, True)
    with pytest.raises(RuntimeError, match=r"parts must be .* got \[0, 5, 4\]"):
        op(x, torch.zeros(0, 5, 4, dtype=torch.float64), out, stats, 1e-4, True)
    with pytest.raises(RuntimeError, match=r"parts must be .* got \[5, 4\]"):
        op(x, moments, out, stats, 1e-4, True)
    with pytest.raises(RuntimeError, match="min_std must be finite and > 0, got -1"):
        op(x, moments[None], out, stats, -1.0, True)
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float64 tensor of shape \(4, 4\)"):
        op(x, moments[None], out, stats[:3], 1e-4, True)

