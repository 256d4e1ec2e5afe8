"""The CUDA kernels of fastnorm::batch_moments and fastnorm::merge_normalize (running_norm split
around the all-gather of RunningNorm(sync=True)), run on the CPU by tests/cuda_emulator: tables
against the float64 reference, one part giving running_norm's bits, several parts (unequal, empty,
fully masked shards) giving every shard the same bits and the concatenated batch's statistics.
"""

from __future__ import annotations

import math

import pytest
import torch

import emulated_cuda as emu
from emulated_cuda import H100_SMS, ONE_SM, emulator, no_misaligned_access  # noqa: F401
from fastnorm import reference
from helpers import DTYPES, STAT_TOL, Y_TOL, assert_diag_close, random_mask, randn

HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=2.5)
SHAPE = (3, 8)
# (device, rows): one launch (a single row split) and the reduce with a last-arriving block's merge.
PATHS = {"one_launch": (ONE_SM, 45), "row_splits": (H100_SMS, 2600)}
COUNT, MEAN, M2, NONFINITE, LO, HI = range(6)


def make_mask(kind, rows, gen):
    if kind == "none":
        return None
    return random_mask({"rows": (rows,), "agents": (rows, SHAPE[0]), "elements": (rows, *SHAPE)}[kind], gen)


def fresh_stats(gen):
    return [randn(SHAPE, gen, dtype=torch.float64), 0.5 + torch.rand(SHAPE, generator=gen, dtype=torch.float64),
            torch.full(SHAPE, 3.0, dtype=torch.float64)]


def with_non_finite_values(x):
    rows = x.shape[0]
    x[3, 0, 0] = math.nan
    x[rows // 2, 1, 2] = math.inf
    x[:, 2, 5] = -math.inf  # a column without a finite entry
    return x


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "rows", "elements"])
def test_batch_moments_match_reference(emulator, gen, dtype, path, mask_kind):
    device, rows = PATHS[path]
    x = with_non_finite_values(randn((rows, *SHAPE), gen, dtype=dtype, mean=-4.0, scale=2.0))
    mask = make_mask(mask_kind, rows, gen)
    got, plan = emu.batch_moments(emulator, device, x, mask, SHAPE)
    want = reference.batch_moment_table(x, mask, torch.Size(SHAPE))
    assert (plan.row_splits > 1) == (path == "row_splits")
    for row in (COUNT, NONFINITE, LO, HI):  # exact: counts, and input values
        assert torch.equal(got[row], want[row]), reference.MOMENT_ROWS[row]
    tol = STAT_TOL[dtype]
    torch.testing.assert_close(got[MEAN], want[MEAN], rtol=tol["rtol"], atol=tol["atol"] * 2.0)
    torch.testing.assert_close(got[M2], want[M2], rtol=tol["rtol"], atol=tol["atol"] * 4.0 * float(want[COUNT].max()))
    assert got[COUNT, 2, 5] == 0 and got[MEAN, 2, 5] == 0 and got[M2, 2, 5] == 0
    assert got[LO, 2, 5] == math.inf and got[HI, 2, 5] == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "agents", "elements"])
def test_one_part_gives_running_norms_bits(emulator, gen, dtype, path, mask_kind):
    device, rows = PATHS[path]
    fused, split = fresh_stats(gen), None
    split = [t.clone() for t in fused]
    for with_output in (True, False):
        x = with_non_finite_values(randn((rows, *SHAPE), gen, dtype=dtype, mean=1.0, scale=2.0))
        mask = make_mask(mask_kind, rows, gen)
        y_fused, diag_fused, _ = emu.running_norm(emulator, device, x, mask, fused, HYPER, with_output=with_output)
        table, _ = emu.batch_moments(emulator, device, x, mask, SHAPE)
        y, diag, _ = emu.merge_normalize(emulator, device, x, mask, table[None], split, HYPER,
                                         with_output=with_output)
        for a, b in zip(split, fused):
            assert torch.equal(a, b)
        assert torch.equal(diag.nan_to_num(-1.0), diag_fused.nan_to_num(-1.0))
        assert with_output or diag[4:].isnan().all()  # no output: no clip diagnostics
        if with_output:
            assert torch.equal(y.nan_to_num(7.0), y_fused.nan_to_num(7.0))


@pytest.mark.parametrize("momentum,options", [(0.99, {}), (None, {}), (0.9, dict(eps_on_std=True, eps=0.3)),
                                              (None, dict(eps_on_std=True, unbiased=True, eps=0.3))], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_parts_merge_to_the_concatenated_batch(emulator, gen, momentum, options, dtype):
    # Four "ranks": unequal shards, one empty, one fully masked; each merges the same tables. The
    # largest shard takes the split reduce and normalize on the emulated H100.
    sizes, hyper = (29, 0, 7, 2600), dict(HYPER, momentum=momentum, **options)
    states = [fresh_stats(gen)]
    states += [[t.clone() for t in states[0]] for _ in sizes[1:]]
    for step in range(2):
        x = randn((sum(sizes), *SHAPE), gen, dtype=dtype, mean=0.5 * step, scale=1.5 + step)
        mask = random_mask((sum(sizes), SHAPE[0]), gen)
        mask[sizes[0]:sizes[0] + sizes[1] + sizes[2]] = False  # shards 1 (empty) and 2
        xs, masks = x.split(sizes), mask.split(sizes)
        parts = torch.stack([emu.batch_moments(emulator, H100_SMS, xp, mp, SHAPE)[0] for xp, mp in zip(xs, masks)])
        expected = reference.running_norm(x, mask, *states[0], **hyper)
        results = [emu.merge_normalize(emulator, H100_SMS, xp.contiguous(), mp, parts, st, hyper)
                   for xp, mp, st in zip(xs, masks, states)]
        for p in range(1, len(sizes)):  # the same parts, the same bits
            assert all(torch.equal(a, b) for a, b in zip(states[p], states[0]))
            assert torch.equal(results[p][1][:4], results[0][1][:4]) and torch.equal(results[p][1][5], results[0][1][5])
        tol = STAT_TOL[dtype]
        torch.testing.assert_close(states[0][2], expected.count, rtol=0, atol=0)
        torch.testing.assert_close(states[0][0], expected.mean, rtol=tol["rtol"], atol=tol["atol"] * 8)
        torch.testing.assert_close(states[0][1], expected.var, rtol=tol["rtol"], atol=tol["atol"] * 64)
        torch.testing.assert_close(torch.cat([y for y, _, _ in results]), expected.y, **Y_TOL[dtype])
        merged_diag = results[0][1].clone()
        merged_diag[4] = sum(diag[4] for _, diag, _ in results)  # clipped: each shard counts its own entries
        assert_diag_close(merged_diag, expected.diag, dtype, scale=8.0)


def test_empty_and_fully_masked_batches_give_empty_tables(emulator, gen):
    empty_column = torch.tensor([0.0, 0.0, 0.0, 0.0, math.inf, -math.inf], dtype=torch.float64)
    x = randn((50, *SHAPE), gen)
    x[0, 0, 0] = math.nan  # not selected: not counted as non-finite either
    for x, mask in [(randn((0, *SHAPE), gen), None), (x, torch.zeros(50, dtype=torch.bool))]:
        table, _ = emu.batch_moments(emulator, H100_SMS, x, mask, SHAPE)
        assert torch.equal(table, empty_column[:, None, None].expand_as(table))


def test_empty_x_still_takes_the_groups_update(emulator, gen):
    others = randn((300, *SHAPE), gen, mean=3.0)
    parts = torch.stack([emu.batch_moments(emulator, ONE_SM, others[:0], None, SHAPE)[0],
                         emu.batch_moments(emulator, ONE_SM, others, None, SHAPE)[0]])
    stats = fresh_stats(gen)
    expected = reference.merge_normalize(others[:0], None, parts, *stats, **HYPER)
    y, diag, _ = emu.merge_normalize(emulator, ONE_SM, others[:0], None, parts, stats, HYPER)
    assert y.shape == (0, *SHAPE)
    torch.testing.assert_close(stats[0], expected.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats[1], expected.var, rtol=1e-12, atol=1e-12)
    assert torch.equal(stats[2], expected.count) and torch.equal(diag[4], torch.zeros(24, dtype=torch.float64))
    torch.testing.assert_close(diag, expected.diag, rtol=1e-9, atol=1e-9)  # the group's max |z|, from its min and max
