"""The Triton kernels' split paths, forced with tiny blocks so that every reduce cuts its rows (or
steps) across several programs whose tables are merged in several steps (by the merge launch for
the running norm, by the last program to arrive for normalize_advantages): the fused running norm
and normalize_advantages and their halves for synced calls (batch_moments and merge_normalize,
advantage_moments and normalize_advantages_from), against the float64 reference. The blocks the
ops choose for these small shapes would take one program. With previous, y of the columns that
have a history comes from the reduce launch, the others' from the normalize launch.

make test runs these under TRITON_INTERPRET=1 on cpu; natively they run where the backend runs (cuda).
See tests/test_triton.py for the interpreter's bfloat16 rounding.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BACKENDS_UNDER_TEST, DEVICE
from fastnorm import advantages_reference, reference
from helpers import DTYPES, STAT_TOL, Y_TOL, assert_diag_close, random_mask, randn
from test_advantages import STATS_TOL as ADVANTAGE_TOL

pytestmark = pytest.mark.skipif("triton" not in BACKENDS_UNDER_TEST,
                                reason=f"the triton backend is not under test on {DEVICE}")
HYPER = dict(momentum=0.9, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=3.0)
# 13 rows of 10 columns, (2, 5) statistics: splits of 4 rows (the last one short), column tiles
# of 4 (the last one short), agent masks whose groups of 5 columns straddle the tiles.
BATCH, STATS, COLS = (13,), (2, 5), 10
MASK_SHAPES = dict(none=None, rows=BATCH, agents=BATCH + STATS[:1], full=BATCH + STATS)


def tiny_blocks():
    """2 rows a step, 4 columns a program, 4 rows a split, 2 tables a merge step: every split
    takes 2 steps, and the merge of each column tile takes its 4 tables in 2 steps."""
    from fastnorm.triton_kernels.running_norm import Blocks

    return Blocks(rows=2, cols=4, rows_per_split=4, merge=2, num_warps=1)


def rows_of(x, mask):
    """x (*batch, *STATS) as (rows, COLS) and the mask as the kernels take it."""
    rows = x.numel() // COLS
    return x.reshape(rows, COLS), (mask.reshape(rows, -1).contiguous().view(torch.uint8) if mask is not None else None)


def launch_fused(x, mask, stats, out, diag, previous=False):
    from fastnorm.triton_kernels.running_norm import launch_running_norm

    x_rows, mask_rows = rows_of(x, mask)
    out_rows = out.view(x_rows.shape) if out is not None else None
    launch_running_norm(x_rows, mask_rows, *stats, out_rows, diag, blocks=tiny_blocks(), previous=previous, **HYPER)


def launch_halves(x, mask, stats, out, diag, previous=False):
    """batch_moments of x, then merge_normalize with that one table: the fused op's bits."""
    from fastnorm.triton_kernels.running_norm import launch_batch_moments, launch_merge_normalize

    x_rows, mask_rows = rows_of(x, mask)
    table = torch.full((6, COLS), math.nan, dtype=torch.float64, device=x.device)
    launch_batch_moments(x_rows, mask_rows, table, blocks=tiny_blocks())
    out_rows = out.view(x_rows.shape) if out is not None else None
    launch_merge_normalize(x_rows, mask_rows, table[None], *stats, out_rows, diag, blocks=tiny_blocks(),
                           previous=previous, **HYPER)
    return table


def with_non_finite(x):
    """x with NaN, +inf and -inf in places, one column NaN throughout and one constant."""
    x = x.clone()
    x[1, 0, 0] = math.nan
    x[2, 1, 3] = math.inf
    x[5, 1, 3] = -math.inf
    x[:, 0, 2] = math.nan
    x[:, 1, 1] = x[0, 1, 1]
    return x


def fresh_stats(gen, device, without_history=()):
    """Statistics with a history of 3 samples, but in the flat columns without_history (count 0)."""
    mean = randn(STATS, gen, dtype=torch.float64, device=device)
    var = torch.rand(STATS, generator=gen, dtype=torch.float64).to(device) + 0.5
    count = torch.full(STATS, 3.0, dtype=torch.float64, device=device)
    count.view(-1)[list(without_history)] = 0.0
    return mean, var, count


# With previous, columns without a history take y from the normalize launch, the others from the
# reduce: 3 and 4 straddle the first two column tiles, 8 and 9 fill the last one.
WITHOUT_HISTORY = (3, 4, 8, 9)


def assert_stats_close(stats, expected, dtype, scale=1.0):
    tol = STAT_TOL[dtype]
    mean, var, count = stats
    assert torch.equal(count, expected.count)
    torch.testing.assert_close(mean, expected.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(var, expected.var, rtol=tol["rtol"], atol=tol["atol"] * scale**2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", list(MASK_SHAPES))
@pytest.mark.parametrize("previous", [False, True], ids=["updated", "previous"])
def test_split_rows_merge_matches_reference(device, gen, dtype, mask_kind, previous):
    stats = fresh_stats(gen, device, WITHOUT_HISTORY if previous else ())
    for _ in range(3):  # each call writes its own scratch
        x = with_non_finite(randn(BATCH + STATS, gen, dtype=dtype, device=device, mean=1.0, scale=2.0))
        mask = random_mask(MASK_SHAPES[mask_kind], gen, device) if MASK_SHAPES[mask_kind] else None
        expected = reference.running_norm(x, mask, *stats, previous=previous, **HYPER)
        out = torch.full_like(x, math.nan)
        diag = torch.full((6, COLS), -7.0, dtype=torch.float64, device=device)
        launch_fused(x, mask, stats, out, diag, previous)
        torch.testing.assert_close(out, expected.y, equal_nan=True, **Y_TOL[dtype])
        assert_stats_close(stats, expected, dtype, scale=2.0)
        assert_diag_close(diag, expected.diag, dtype, scale=2.0)


def test_split_rows_without_output(device, gen):
    stats = fresh_stats(gen, device)
    x = with_non_finite(randn(BATCH + STATS, gen, device=device))
    expected = reference.running_norm(x, None, *stats, with_output=False, **HYPER)
    diag = torch.zeros(6, COLS, dtype=torch.float64, device=device)
    launch_fused(x, None, stats, None, diag)
    assert torch.isnan(diag[4:]).all()
    assert_diag_close(diag, expected.diag, torch.float32)
    assert_stats_close(stats, expected, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "agents"])
def test_split_batch_moments_match_reference(device, gen, dtype, mask_kind):
    x = with_non_finite(randn(BATCH + STATS, gen, dtype=dtype, device=device, mean=-4.0, scale=2.0))
    mask = random_mask(MASK_SHAPES[mask_kind], gen, device) if MASK_SHAPES[mask_kind] else None
    table = launch_halves(x, mask, fresh_stats(gen, device), None, torch.empty(6, COLS, dtype=torch.float64,
                                                                                device=device))
    want = reference.batch_moment_table(x, mask, torch.Size(STATS)).view(6, COLS)
    for row in (0, 3, 4, 5):  # counts, and input values: exact
        assert torch.equal(table[row], want[row]), reference.MOMENT_ROWS[row]
    tol = STAT_TOL[dtype]
    torch.testing.assert_close(table[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * 4.0)
    torch.testing.assert_close(table[2], want[2], rtol=tol["rtol"], atol=tol["atol"] * 16.0 * BATCH[0])
    assert table[2, 6] == 0  # the constant column
    assert table[0, 2] == 0 and table[1, 2] == 0 and table[4, 2] == math.inf and table[5, 2] == -math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_output", [True, False])
@pytest.mark.parametrize("previous", [False, True], ids=["updated", "previous"])
def test_split_halves_give_the_fused_bits(device, gen, dtype, with_output, previous):
    start = fresh_stats(gen, device, WITHOUT_HISTORY if previous else ())
    x = with_non_finite(randn(BATCH + STATS, gen, dtype=dtype, device=device, mean=3.0))
    mask = random_mask(MASK_SHAPES["agents"], gen, device)
    results = []
    for launch in (launch_fused, launch_halves):
        stats = tuple(s.clone() for s in start)
        out = torch.full_like(x, math.nan) if with_output else None
        diag = torch.full((6, COLS), -7.0, dtype=torch.float64, device=device)
        launch(x, mask, stats, out, diag, previous)
        results.append((*stats, diag.nan_to_num(-1.0)) + ((out.nan_to_num(-1.0),) if with_output else ()))
    for fused, halves in zip(*results):
        assert torch.equal(fused, halves)


def test_split_rows_are_deterministic(device, gen):
    start = fresh_stats(gen, device)
    x = randn(BATCH + STATS, gen, device=device, mean=3.0)
    results = []
    for _ in range(2):
        stats = tuple(s.clone() for s in start)
        out = torch.empty_like(x)
        diag = torch.empty(6, COLS, dtype=torch.float64, device=device)
        launch_fused(x, None, stats, out, diag)
        results.append((out, *stats, diag))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- normalize_advantages

# x (5, 3, 7) in steps of (2, 2, 4): 3 o-blocks by 2 i-blocks, 6 steps per group tile, 2 group tiles
# (the last one short), every step with missing rows, groups or inner entries.
ADV_SHAPE = (5, 3, 7)


def advantage_blocks(steps_per_split):
    """1 step a split: 6 splits merged 2 tables a step; 4: 2 splits, the last one short."""
    from fastnorm.triton_kernels.advantages import AdvantageBlocks

    return AdvantageBlocks(outer=2, groups=2, inner=4, steps_per_split=steps_per_split, merge=2, num_warps=1)


def run_advantages(x, mask, blocks, unbiased=True, min_std=1e-4):
    """y (poisoned first) and stats (4, G) of the kernels on contiguous x (O, G, I)."""
    from fastnorm.triton_kernels.advantages import launch_normalize_advantages

    out = torch.full_like(x, math.nan)
    stats = torch.full((4, x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    flat_mask = mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else None
    launch_normalize_advantages(x, flat_mask, out, stats, min_std=min_std, unbiased=unbiased, blocks=blocks)
    return out, stats


def advantage_reference(x, mask, unbiased=True, min_std=1e-4):
    full_mask = mask.repeat_interleave(x.numel() // mask.numel()).view(x.shape) if mask is not None else None
    return advantages_reference.normalize_advantages(x, full_mask, (0, 2), min_std=min_std, unbiased=unbiased)


def assert_advantages_close(y, stats, ref, dtype, scale=1.0):
    tol = ADVANTAGE_TOL[dtype]
    torch.testing.assert_close(y, ref.y, equal_nan=True, **Y_TOL[dtype])
    assert torch.equal(stats[0], ref.count)
    torch.testing.assert_close(stats[1], ref.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(stats[2], ref.std_raw, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(stats[3], ref.norm_max_abs, rtol=5 * tol["rtol"], atol=5 * tol["atol"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "outer", "groups", "full"])
@pytest.mark.parametrize("steps_per_split", [1, 4])
def test_split_advantages_match_reference(device, gen, dtype, mask_kind, steps_per_split):
    x = randn(ADV_SHAPE, gen, dtype=dtype, device=device, mean=-2.0, scale=3.0)
    x[1, 0, 2], x[3, 0, 6], x[4, 2, 0] = math.nan, math.inf, -math.inf
    x[:, 1] = x[0, 1, 0]  # a constant group
    mask_shape = dict(none=None, outer=ADV_SHAPE[:1], groups=ADV_SHAPE[:2], full=ADV_SHAPE)[mask_kind]
    mask = random_mask(mask_shape, gen, device) if mask_shape else None
    y, stats = run_advantages(x, mask, advantage_blocks(steps_per_split))
    assert_advantages_close(y, stats, advantage_reference(x, mask), dtype, scale=3.0)
    if mask is None:  # exact: M2 = 0, y = 0
        assert stats[2, 1] == 0 and stats[3, 1] == 0 and not y[:, 1].any()


@pytest.mark.parametrize("unbiased", [True, False])
def test_split_advantages_of_groups_with_0_1_and_2_entries(device, gen, unbiased):
    x = randn(ADV_SHAPE, gen, device=device)
    mask = torch.zeros(ADV_SHAPE, dtype=torch.bool, device=device)
    mask[4, 1, 6] = True  # group 1: its one entry in the last step
    mask[0, 2, 0] = mask[4, 2, 5] = True  # group 2: two entries in different splits; group 0: none
    x[2, 0, 3] = math.nan
    y, stats = run_advantages(x, mask, advantage_blocks(1), unbiased=unbiased, min_std=1e-2)
    ref = advantage_reference(x, mask, unbiased=unbiased, min_std=1e-2)
    assert stats[0].tolist() == [0.0, 1.0, 2.0]
    assert not y[:, 0].any() and stats[1, 0] == 0 and stats[2, :2].tolist() == [0.0, 0.0]
    assert_advantages_close(y, stats, ref, torch.float32)


def test_split_advantages_are_deterministic(device, gen):
    x = randn(ADV_SHAPE, gen, device=device, mean=5.0)
    first, second = (run_advantages(x, None, advantage_blocks(1)) for _ in range(2))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def advantage_moments(x, mask, blocks):
    """The advantage-moments table (5, G) of the kernels, poisoned first."""
    from fastnorm.triton_kernels.advantages import launch_advantage_moments

    table = torch.full((5, x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    flat_mask = mask.reshape(-1).contiguous().view(torch.uint8) if mask is not None else None
    launch_advantage_moments(x, flat_mask, table, blocks=blocks)
    return table


def advantages_from(x, parts, blocks, unbiased=True, min_std=1e-4):
    """y (poisoned first) and stats (4, G) of normalize_advantages_from's kernels."""
    from fastnorm.triton_kernels.advantages import launch_normalize_advantages_from

    out = torch.full_like(x, math.nan)
    stats = torch.full((4, x.shape[1]), math.nan, dtype=torch.float64, device=x.device)
    launch_normalize_advantages_from(x, parts, out, stats, min_std=min_std, unbiased=unbiased, blocks=blocks)
    return out, stats


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "full"])
def test_split_advantage_moments_match_reference(device, gen, dtype, mask_kind):
    x = randn(ADV_SHAPE, gen, dtype=dtype, device=device, mean=4.0, scale=2.0)
    x[1, 0, 2], x[3, 2, 6] = math.nan, -math.inf
    x[:, 1] = x[0, 1, 0]  # a constant group
    mask = random_mask(ADV_SHAPE, gen, device) if mask_kind == "full" else None
    table = advantage_moments(x, mask, advantage_blocks(1))
    want = advantages_reference.moment_table(x, mask, (0, 2))
    for row in (0, 3, 4):  # counts, and input values: exact
        assert torch.equal(table[row], want[row]), advantages_reference.MOMENT_ROWS[row]
    tol = ADVANTAGE_TOL[dtype]
    torch.testing.assert_close(table[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * 4.0)
    torch.testing.assert_close(table[2], want[2], rtol=tol["rtol"], atol=tol["atol"] * 16.0 * float(want[0].max()))
    assert table[2, 1] == 0  # the constant group: exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("unbiased", [True, False])
def test_split_advantage_halves_give_the_fused_bits(device, gen, dtype, unbiased):
    x = randn(ADV_SHAPE, gen, dtype=dtype, device=device, mean=-1.0, scale=2.0)
    x[2, 0, 5] = math.nan
    mask = random_mask(ADV_SHAPE[:2], gen, device)
    blocks = advantage_blocks(1)
    y, stats = advantages_from(x, advantage_moments(x, mask, blocks)[None], blocks, unbiased=unbiased)
    y_fused, stats_fused = run_advantages(x, mask, blocks, unbiased=unbiased)
    assert torch.equal(y.nan_to_num(-7.0), y_fused.nan_to_num(-7.0)) and torch.equal(stats, stats_fused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_split_advantage_parts_merge_to_the_concatenated_advantages(device, gen, dtype):
    # Three "ranks" holding 2, 1 and 2 rows of O; every shard merges the same tables.
    x = randn(ADV_SHAPE, gen, dtype=dtype, device=device, mean=3.0, scale=0.5)
    mask = random_mask(ADV_SHAPE, gen, device)
    mask[2] = False  # the middle shard: fully masked
    blocks = advantage_blocks(1)
    shards = list(zip(x.split((2, 1, 2)), mask.split((2, 1, 2))))
    parts = torch.stack([advantage_moments(xs.contiguous(), ms, blocks) for xs, ms in shards])
    results = [advantages_from(xs.contiguous(), parts, blocks) for xs, _ in shards]
    for _, stats in results[1:]:
        assert torch.equal(stats, results[0][1])
    ref = advantage_reference(x, mask)
    assert_advantages_close(torch.cat([y for y, _ in results]), results[0][1], ref, dtype, scale=4.0)


@pytest.mark.parametrize("rows, cols, element_size", [(10**7, 512, 4), (4 * 10**7, 8, 4), (10**8, 1, 2),
                                                      (3 * 10**6, 48, 8), (1000, 6, 4)])
def test_reduce_lanes_sum_at_most_lane_rows(rows, cols, element_size):
    """However many rows, the splits give each lane of the reduce kernel (a row slot of its tiles of
    half a step's rows) at most LANE_ROWS rows to sum in the accumulator type."""
    from fastnorm.triton_kernels.running_norm import LANE_ROWS, choose_blocks

    for programs in (2, 528):
        blocks = choose_blocks(rows, cols, element_size, programs)
        assert blocks.rows_per_split <= (blocks.rows + 1) // 2 * LANE_ROWS, (programs, blocks)
