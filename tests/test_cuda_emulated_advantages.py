"""The CUDA kernels of fastnorm::normalize_advantages (csrc/cuda/advantages.cu), run on the CPU by
tests/cuda_emulator, against the float64 reference: both layouts (runs: one run of every entry,
or runs per group cut into pieces; columns: batch_moments' reduce over rows), every mask form,
groups of 0, 1 and 2 entries, NaN/inf, huge values, large offsets, empty inputs, in place, and
the merge by a warp or by a block per group.
"""

from __future__ import annotations

import math

import pytest
import torch

import emulated_cuda as emu
from emulated_cuda import COLUMN_MASKS, FOUR_SMS, H100_SMS, ONE_SM, emulator, no_misaligned_access  # noqa: F401
from fastnorm.backends import BACKENDS
from helpers import DTYPES, Y_TOL, random_mask, randn

# As tests/test_advantages.py: float32 block sums (float64 for float64) merged in float64.
STATS_TOL = {
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
}
# (O, G, I) -> the layout the plan must pick.
CASES = {
    (1, 1, 4099): "runs",  # one run (G == 1), odd length: scalar loads
    (1, 1, 4096): "runs",  # one run, 16-byte vectors
    (37, 1, 9): "runs",  # G == 1 is one run whatever O and I
    (3, 5, 40): "runs",  # a run per (o, g)
    (2, 3, 700): "runs",  # runs cut into several pieces
    (129, 5, 1): "columns",  # per agent: groups of single columns
    (64, 8, 2): "columns",
    (40, 6, 3): "columns",
}


def flat_mask(kind, shape, gen):
    """A flat mask with numel(x) / mask_group entries: per entry, per (o, g), per o, per two o, or
    per 3 entries."""
    numel, outer = math.prod(shape), shape[0]
    size = {"none": 0, "entries": numel, "outer_groups": outer * shape[1], "outer": outer,
            "outer_pairs": outer // 2 if outer % 2 == 0 else outer,
            "thirds": numel // 3 if numel % 3 == 0 else numel}[kind]
    return random_mask((size,), gen) if size else None


def expected(x, mask, **kwargs):
    """The reference backend on the op's (O, G, I) view: (y, stats (4, G))."""
    out = torch.empty_like(x)
    stats = torch.empty(4, x.shape[1], dtype=torch.float64)
    BACKENDS["reference"].normalize_advantages(x, mask, out, stats, **kwargs)
    return out, stats


def assert_matches(y, stats, want_y, want_stats, dtype, scale=1.0):
    tol = STATS_TOL[dtype]
    torch.testing.assert_close(y, want_y, equal_nan=True, **Y_TOL[dtype])
    assert torch.equal(stats[0], want_stats[0])  # counts
    torch.testing.assert_close(stats[1], want_stats[1], rtol=tol["rtol"], atol=tol["atol"] * scale)  # mean
    torch.testing.assert_close(stats[2], want_stats[2], rtol=tol["rtol"], atol=tol["atol"] * scale)  # std_raw
    torch.testing.assert_close(stats[3], want_stats[3], rtol=5 * tol["rtol"], atol=5 * tol["atol"])  # norm_max_abs


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", list(CASES), ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "entries", "outer"])
def test_matches_reference(emulator, gen, dtype, shape, mask_kind):
    x = randn(shape, gen, dtype=dtype, mean=0.5, scale=2.0)
    mask = flat_mask(mask_kind, shape, gen)
    y, stats, plan = emu.normalize_advantages(emulator, H100_SMS, x, mask)
    assert bool(plan.columns) == (CASES[shape] == "columns")
    assert_matches(y, stats, *expected(x, mask), dtype, scale=2.0)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (3, 4, 32), (48, 4, 2), (60, 4, 1)], ids=str)
@pytest.mark.parametrize("mask_kind", ["entries", "outer_groups", "outer", "outer_pairs", "thirds"])
def test_every_mask_form(emulator, gen, shape, mask_kind):
    # Runs read one mask entry per vector, or V per vector, or (odd groups) go scalar; columns use
    # x's mask as rows x mask columns, or expand it per row or per entry.
    x = randn(shape, gen, scale=3.0)
    mask = flat_mask(mask_kind, shape, gen)
    y, stats, plan = emu.normalize_advantages(emulator, FOUR_SMS, x, mask)
    if plan.columns:
        width, group = shape[1] * shape[2], x.numel() // mask.numel()
        form = "direct" if width % group == 0 else "expanded_rows" if group % width == 0 else "expanded_entries"
        assert COLUMN_MASKS[plan.column_mask] == form
    assert_matches(y, stats, *expected(x, mask), torch.float32, scale=3.0)


@pytest.mark.parametrize("shape", [(4, 4, 1), (4, 4, 20)], ids=str)
def test_groups_of_0_1_and_2_entries(emulator, gen, shape):
    x = randn(shape, gen)
    selected = torch.zeros(shape, dtype=torch.bool)
    selected[:, 1, 0] = True  # group 1: every row's first entry, group 2: 1 entry, group 3: 2 entries
    selected[2, 2, 0] = True
    selected[0, 3, 0] = selected[3, 3, -1] = True
    mask = selected.reshape(-1)
    y, stats, plan = emu.normalize_advantages(emulator, ONE_SM, x, mask)
    assert bool(plan.columns) == (shape[2] == 1)
    want_y, want_stats = expected(x, mask)
    assert_matches(y, stats, want_y, want_stats, torch.float32)
    assert stats[0].tolist() == [0.0, 4.0, 1.0, 2.0]
    assert torch.equal(y[:, 0], torch.zeros_like(y[:, 0]))  # no entry: y = 0
    assert stats[2, 2] == 0 and stats[3, 2] == 0  # one entry: std 0, divided by the floor, y = 0 there
    torch.testing.assert_close(y[:, 2], (x[:, 2] - x[2, 2, 0]) * 1e4, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 1, 600), (50, 3, 1), (5, 3, 40)], ids=str)
def test_non_finite_entries_are_excluded(emulator, gen, shape):
    x = randn(shape, gen)
    x[0, 0, 0] = math.nan
    x[-1, 0, -1] = math.inf
    x[-1, -1, shape[2] // 2] = -math.inf
    if shape[1] > 1:
        x[:, 1, :] = math.nan  # a group without a finite entry: y = 0 there
    y, stats, _ = emu.normalize_advantages(emulator, FOUR_SMS, x)
    want_y, want_stats = expected(x, None)
    assert_matches(y, stats, want_y, want_stats, torch.float32)
    assert torch.isnan(y[0, 0, 0]) and y[-1, 0, -1] == math.inf


@pytest.mark.parametrize("shape", [(1, 1, 3000), (300, 2, 1), (4, 2, 300)], ids=str)
def test_huge_values_keep_statistics_finite(emulator, gen, shape):
    x = randn(shape, gen, scale=1e30)  # float32 squares overflow: the float64 recompute
    y, stats, _ = emu.normalize_advantages(emulator, FOUR_SMS, x)
    want_y, want_stats = expected(x, None)
    assert torch.isfinite(stats).all()
    torch.testing.assert_close(y, want_y, **Y_TOL[torch.float32])
    torch.testing.assert_close(stats, want_stats, rtol=1e-5, atol=0)


@pytest.mark.parametrize("shape", [(1, 1, 4096), (2048, 2, 1)], ids=str)
def test_large_offset_small_spread_float32(emulator, gen, shape):
    # mean 1e3, std 1e-3: the shifted sums keep the std that E[x^2] - E[x]^2 would lose.
    x = (1e3 + 1e-3 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    y, stats, _ = emu.normalize_advantages(emulator, ONE_SM, x)
    want_y, want_stats = expected(x, None)
    torch.testing.assert_close(stats[2], want_stats[2], rtol=1e-4, atol=0)
    torch.testing.assert_close(y, want_y, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("unbiased", [True, False])
def test_biased_and_unbiased_std(emulator, gen, unbiased):
    for shape in [(1, 1, 700), (90, 3, 1)]:
        x = randn(shape, gen)
        y, stats, _ = emu.normalize_advantages(emulator, ONE_SM, x, min_std=1e-3, unbiased=unbiased)
        assert_matches(y, stats, *expected(x, None, min_std=1e-3, unbiased=unbiased), torch.float32)


def test_in_place(emulator, gen):
    for shape in [(1, 1, 1000), (100, 3, 2)]:
        x = randn(shape, gen)
        want_y, want_stats = expected(x, None)
        y, stats, _ = emu.normalize_advantages(emulator, FOUR_SMS, x, out=x)
        assert y is x
        assert_matches(x, stats, want_y, want_stats, torch.float32)


def test_empty_inputs(emulator):
    for shape in [(1, 1, 0), (0, 3, 1), (2, 3, 0), (0, 1, 5)]:
        y, stats, _ = emu.normalize_advantages(emulator, H100_SMS, torch.empty(shape))
        assert y.shape == shape and torch.equal(stats, torch.zeros(4, shape[1], dtype=torch.float64))


def test_block_merges_a_group_of_many_pieces(emulator, gen):
    # One run of 140001 entries (odd: scalar loads) on the emulated H100: over 1024 pieces of 128
    # entries, merged by a whole block.
    x = randn((1, 1, 140_001), gen, mean=-3.0, scale=0.5)
    mask = random_mask((140_001,), gen)
    y, stats, plan = emu.normalize_advantages(emulator, H100_SMS, x, mask)
    assert plan.vector_width == 1 and plan.pieces >= 1024 and plan.group_threads == 256
    assert_matches(y, stats, *expected(x, mask), torch.float32)


def test_columns_with_split_rows(emulator, gen):
    # Enough rows for batch_moments' split reduce and last-arriving block's merge.
    x = randn((3000, 8, 1), gen, dtype=torch.bfloat16)
    mask = flat_mask("outer", x.shape, gen)
    y, stats, plan = emu.normalize_advantages(emulator, H100_SMS, x, mask)
    assert plan.columns and plan.reduce_row_splits > 1
    assert_matches(y, stats, *expected(x, mask), torch.bfloat16)


@pytest.mark.parametrize("shape,group", [((1, 1, 180), 3), ((1, 1, 4096), 2), ((1, 1, 4104), 6),
                                         ((3, 5, 40), 5), ((2, 3, 700), 7), ((12, 15, 1), 3), ((12, 5, 3), 15)],
                         ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mask_layout_does_not_change_the_bits(emulator, gen, shape, group, dtype):
    # A mask over groups of entries and the same mask expanded per entry select the same entries:
    # the plan (the entries' partition, the order of the sums) must not depend on its layout.
    x = randn(shape, gen, dtype=dtype, mean=0.5, scale=2.0)
    mask = random_mask((x.numel() // group,), gen)
    y, stats, plan = emu.normalize_advantages(emulator, H100_SMS, x, mask)
    y_full, stats_full, plan_full = emu.normalize_advantages(emulator, H100_SMS, x, mask.repeat_interleave(group))
    assert (plan.vector_width, plan.pieces, plan.reduce_row_splits) == \
        (plan_full.vector_width, plan_full.pieces, plan_full.reduce_row_splits)
    assert torch.equal(stats, stats_full) and torch.equal(y, y_full)
