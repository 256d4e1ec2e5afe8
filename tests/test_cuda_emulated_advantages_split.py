"""The CUDA kernels of fastnorm::advantage_moments and fastnorm::normalize_advantages_from
(normalize_advantages split around the all-gather of normalize_advantages(sync=True)), run on the
CPU by tests/cuda_emulator: tables against the float64 reference in both layouts, one part giving
normalize_advantages' bits (whatever out's alignment), several parts (unequal, empty, fully masked
shards) giving every shard the same stats and the concatenated advantages.
"""

from __future__ import annotations

import math

import pytest
import torch

import emulated_cuda as emu
from emulated_cuda import FOUR_SMS, H100_SMS, ONE_SM, emulator, no_misaligned_access  # noqa: F401
from fastnorm import advantages_reference
from helpers import DTYPES, Y_TOL, random_mask, randn
from test_cuda_emulated_advantages import STATS_TOL, assert_matches, flat_mask

COUNT, MEAN, M2, LO, HI = range(5)
EMPTY_GROUP = [0.0, 0.0, 0.0, math.inf, -math.inf]  # a moments-table column with no entry
# (O, G, I) -> the layout the plan must pick (as tests/test_cuda_emulated_advantages.CASES).
CASES = {
    (1, 1, 4099): "runs",  # one run, odd length: scalar loads
    (1, 1, 4096): "runs",  # one run, 16-byte vectors
    (2, 3, 700): "runs",  # runs per (o, g) cut into several pieces
    (129, 5, 1): "columns",  # per agent
    (40, 6, 3): "columns",
}


def full_mask(mask, x):
    return None if mask is None else mask.repeat_interleave(x.numel() // mask.numel()).view(x.shape)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(CASES), ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "entries", "outer"])
def test_moments_match_reference(emulator, gen, dtype, shape, mask_kind):
    x = randn(shape, gen, dtype=dtype, mean=-4.0, scale=2.0)
    x.view(-1)[1] = math.nan
    x.view(-1)[-1] = math.inf
    if shape[1] > 1:
        x[:, 1, :] = -math.inf  # a group with no finite entry
    mask = flat_mask(mask_kind, shape, gen)
    got, plan = emu.advantage_moments(emulator, H100_SMS, x, mask)
    want = advantages_reference.moment_table(x, full_mask(mask, x), (0, 2)).view(5, shape[1])
    assert bool(plan.columns) == (CASES[shape] == "columns")
    for row in (COUNT, LO, HI):  # exact: counts, and input values
        assert torch.equal(got[row], want[row]), advantages_reference.MOMENT_ROWS[row]
    tol = STATS_TOL[dtype]
    torch.testing.assert_close(got[MEAN], want[MEAN], rtol=tol["rtol"], atol=tol["atol"] * 4.0)
    torch.testing.assert_close(got[M2], want[M2], rtol=tol["rtol"], atol=tol["atol"] * 16.0 * float(want[COUNT].max()))
    if shape[1] > 1:
        assert got[:, 1].tolist() == EMPTY_GROUP


# (device, shape, mask kind): every reduce the fused op has (scalar and vector runs, runs per
# group, a block merging over 1024 pieces, columns with x's mask, an expanded one, split rows).
ONE_PART_CASES = [
    (FOUR_SMS, (1, 1, 4099), "entries"),
    (FOUR_SMS, (1, 1, 4096), "entries"),
    (FOUR_SMS, (3, 5, 40), "outer"),
    (H100_SMS, (1, 1, 140_001), "none"),
    (FOUR_SMS, (129, 5, 1), "outer_groups"),
    (FOUR_SMS, (48, 4, 2), "thirds"),
    (H100_SMS, (3000, 8, 1), "outer"),
]


@pytest.mark.parametrize("device,shape,mask_kind", ONE_PART_CASES, ids=str)
def test_one_part_is_the_fused_op_bit_for_bit(emulator, gen, device, shape, mask_kind):
    x = randn(shape, gen, dtype=torch.bfloat16, mean=1.0, scale=2.0)
    x.view(-1)[5] = math.nan
    mask = flat_mask(mask_kind, shape, gen)
    moments, plan = emu.advantage_moments(emulator, device, x, mask)
    y, stats, _ = emu.normalize_advantages_from(emulator, device, x, moments[None])
    y_fused, stats_fused, fused_plan = emu.normalize_advantages(emulator, device, x, mask)
    assert (plan.pieces, plan.reduce_row_splits) == (fused_plan.pieces, fused_plan.reduce_row_splits)
    assert torch.equal(stats, stats_fused)
    assert torch.equal(y.nan_to_num(-7.0), y_fused.nan_to_num(-7.0))  # y covers every entry in both


@pytest.mark.parametrize("shape", [(1, 1, 4096), (4, 2, 256)], ids=str)
def test_a_misaligned_out_changes_no_stats_bit(emulator, gen, shape):
    # out one element past a 16-byte boundary: the normalize goes scalar, the reduce keeps its
    # vectors (its bits do not depend on out); UBSan reports any misaligned vector access.
    x = randn(shape, gen)
    buffer = torch.full((x.numel() + 1,), math.nan)
    out = buffer[1:].view(shape)
    moments, _ = emu.advantage_moments(emulator, FOUR_SMS, x)
    y, stats, plan = emu.normalize_advantages_from(emulator, FOUR_SMS, x, moments[None], out=out)
    assert plan.normalize_vector_width == 1 and plan.vector_width == 4
    buffer.fill_(math.nan)
    _, stats_fused, fused_plan = emu.normalize_advantages(emulator, FOUR_SMS, x, out=out)
    assert fused_plan.vector_width == 4 and fused_plan.normalize_vector_width == 1
    y_aligned, stats_aligned, _ = emu.normalize_advantages(emulator, FOUR_SMS, x)
    assert torch.equal(stats, stats_aligned) and torch.equal(stats_fused, stats_aligned)
    assert torch.equal(out, y_aligned) and y is out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("gi,axis", [((1, 1), 0), ((5, 1), 0), ((3, 40), 2)], ids=str)
def test_parts_merge_to_the_concatenated_advantages(emulator, gen, dtype, gi, axis):
    # Four "ranks": unequal shards of x (O, G, I) along O or I, one empty, one fully masked; every
    # shard merges the same tables.
    g, i = gi
    sizes = (29, 0, 7, 64) if axis == 0 else (13, 0, 3, 30)
    shape = (sum(sizes), g, i) if axis == 0 else (50, g, sum(sizes))
    x = randn(shape, gen, dtype=dtype, mean=3.0, scale=0.5)
    mask = random_mask(shape, gen)
    mask.narrow(axis, sizes[0], sizes[1] + sizes[2]).fill_(False)  # shards 1 (empty) and 2
    xs = [part.contiguous() for part in x.split(sizes, dim=axis)]
    masks = [part.reshape(-1) for part in mask.split(sizes, dim=axis)]
    parts = torch.stack([emu.advantage_moments(emulator, FOUR_SMS, xp, mp)[0] for xp, mp in zip(xs, masks)])
    results = [emu.normalize_advantages_from(emulator, FOUR_SMS, xp, parts)[:2] for xp in xs]
    for _, stats in results[1:]:  # the same parts, the same bits
        assert torch.equal(stats, results[0][1])
    want = advantages_reference.normalize_advantages(x, mask, (0, 2))
    want_stats = torch.stack([getattr(want, row).reshape(-1) for row in advantages_reference.STAT_ROWS])
    y = torch.cat([y for y, _ in results], dim=axis)
    assert_matches(y, results[0][1], want.y, want_stats, dtype, scale=4.0)


def test_empty_and_fully_masked_x_give_empty_tables(emulator, gen):
    for x, mask in [(torch.empty(0, 2, 3), None), (torch.empty(4, 2, 0), None),
                    (randn((9, 2, 3), gen), torch.zeros(9, dtype=torch.bool)),
                    (randn((30, 2, 1), gen), torch.zeros(30, dtype=torch.bool))]:
        moments, _ = emu.advantage_moments(emulator, ONE_SM, x, mask)
        assert moments.T.tolist() == [EMPTY_GROUP] * 2


@pytest.mark.parametrize("shape", [(40, 3, 2), (1, 1, 700)], ids=str)
def test_empty_x_takes_the_statistics_of_the_parts(emulator, gen, shape):
    others = randn(shape, gen, mean=3.0)
    empty = torch.empty((0, *shape[1:]))
    parts = torch.stack([emu.advantage_moments(emulator, ONE_SM, empty)[0],
                         emu.advantage_moments(emulator, ONE_SM, others)[0]])
    y, stats, _ = emu.normalize_advantages_from(emulator, ONE_SM, empty, parts, unbiased=False)
    _, stats_fused, _ = emu.normalize_advantages(emulator, ONE_SM, others, unbiased=False)
    assert y.shape == empty.shape
    assert torch.equal(stats, stats_fused)  # the empty part merged first changes no bit
