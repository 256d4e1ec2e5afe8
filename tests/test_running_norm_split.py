"""running_norm split in two (batch_moments, merge_normalize), the ops behind RunningNorm(sync=True),
on every backend under test that has them on the device (split_backend), in one process: one part
is the fused op exactly, several parts are the concatenated batch. The multi-process runs are in
test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from fastnorm import RunningNorm, reference
from fastnorm.backends import BACKENDS
from helpers import (DTYPES, OPTION_CASES, STAT_TOL, Y_TOL, assert_diag_close, op_hyper, option_id, random_mask,
                     randn)
from test_running_norm import MASK_KINDS, make_mask, poisoned_like

SHAPES = [((37,), (5,)), ((64, 3), (7, 11)), ((5, 4, 3), (2, 3)), ((40,), (257,))]
NUM_MOMENT_ROWS = len(reference.MOMENT_ROWS)


def fresh_state(stats, device):
    f64 = dict(dtype=torch.float64, device=device)
    return [torch.zeros(stats, **f64), torch.ones(stats, **f64), torch.zeros(stats, **f64)]


def moments_of(backend, x, mask, stats, shift=None):
    """batch_moments of x; with shift the running mean, what running_norm sums about."""
    moments = torch.full((NUM_MOMENT_ROWS, *stats), math.nan, dtype=torch.float64, device=x.device)
    BACKENDS[backend].batch_moments(x, mask, moments, shift)
    return moments


def split_step(backend, x, mask, parts, state, diag, norm, with_output=True):
    """merge_normalize on x with the tables parts: y (poisoned first) or None; updates state."""
    out = poisoned_like(x) if with_output else None
    BACKENDS[backend].merge_normalize(x, mask, parts, *state, out, diag, **op_hyper(norm))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,stats", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_one_part_is_the_fused_op(split_backend, device, gen, dtype, batch, stats, mask_kind):
    norm = RunningNorm(stats, momentum=0.9, backend=split_backend, device=device)
    state = fresh_state(stats, device)
    diag = torch.full_like(norm._diag, math.nan)
    for step in range(3):
        with_output = step != 1  # the middle step updates without an output
        x = randn(batch + stats, gen, dtype=dtype, device=device, mean=2.0, scale=3.0)
        mask = make_mask(mask_kind, batch, stats, gen, device)
        parts = moments_of(split_backend, x, mask, stats, shift=norm.mean)[None]
        y = split_step(split_backend, x, mask, parts, state, diag, norm, with_output)
        y_fused = norm(x, mask=mask) if with_output else norm.update(x, mask=mask)
        if split_backend == "reference":  # v_b goes through M2 = v_b n and back: rounding only
            tol = dict(rtol=1e-12, atol=1e-12)
            for got, want in zip(state, (norm.mean, norm.var, norm.count)):
                torch.testing.assert_close(got, want, **tol)
            torch.testing.assert_close(diag, norm._diag, equal_nan=True, **tol)
            if with_output:
                torch.testing.assert_close(y, y_fused, **Y_TOL[dtype])
            continue
        # A kernel runs the same code in both: the same bits.
        assert torch.equal(state[0], norm.mean) and torch.equal(state[1], norm.var)
        assert torch.equal(state[2], norm.count)
        assert torch.equal(diag.nan_to_num(-1.0), norm._diag.nan_to_num(-1.0))
        if with_output:
            assert torch.equal(y, y_fused)


@pytest.mark.parametrize("options", OPTION_CASES, ids=option_id)
@pytest.mark.parametrize("batch", [(1,), (37,)], ids=str)
def test_one_part_is_the_fused_op_with_options(split_backend, device, gen, options, batch):
    stats = (2, 3)
    norm = RunningNorm(stats, momentum=0.9, backend=split_backend, device=device, **options)
    state = fresh_state(stats, device)
    diag = torch.full_like(norm._diag, math.nan)
    for _ in range(3):
        x = randn(batch + stats, gen, device=device, mean=2.0, scale=3.0)
        mask = make_mask("rows", batch, stats, gen, device) if batch != (1,) else None
        parts = moments_of(split_backend, x, mask, stats, shift=norm.mean)[None]
        y = split_step(split_backend, x, mask, parts, state, diag, norm)
        expected = reference.running_norm(x, mask, norm.mean, norm.var, norm.count, **op_hyper(norm))
        y_fused = norm(x, mask=mask)
        torch.testing.assert_close(y_fused, expected.y, **Y_TOL[torch.float32])
        tol = dict(rtol=1e-12, atol=1e-12) if split_backend == "reference" else dict(rtol=0, atol=0)
        for got, want in zip(state, (norm.mean, norm.var, norm.count)):
            torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(y, y_fused, **(Y_TOL[torch.float32] if split_backend == "reference" else tol))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shift", ["none", "near", "far"])
def test_batch_moments_match_reference(split_backend, device, gen, dtype, mask_kind, shift):
    batch, stats = (97, 2), (3, 5)
    x = randn(batch + stats, gen, dtype=dtype, device=device, mean=-4.0, scale=2.0)
    x[3, 0, 1, 2] = math.nan
    x[5, 1, 0, 0] = math.inf
    x[:, :, 2, 4] = -math.inf  # a column with no finite entry
    mask = make_mask(mask_kind, batch, stats, gen, device)
    # The shift is a computational aid (a running mean near the data, or one far from it): the
    # moments are those of x either way.
    offset = {"none": None, "near": 0.5, "far": 1e4}[shift]
    shift_to = None if offset is None else x.double().nan_to_num(0, 0, 0).mean((0, 1)) + offset
    got = moments_of(split_backend, x, mask, stats, shift=shift_to)
    want = reference.batch_moment_table(x, mask, torch.Size(stats))
    count, mean, m2, nonfinite, lo, hi = range(NUM_MOMENT_ROWS)
    for row in (count, nonfinite, lo, hi):  # exact: counts, and input values
        assert torch.equal(got[row], want[row]), reference.MOMENT_ROWS[row]
    tol = STAT_TOL[dtype]
    torch.testing.assert_close(got[mean], want[mean], rtol=tol["rtol"], atol=tol["atol"] * 2.0)
    torch.testing.assert_close(got[m2], want[m2], rtol=tol["rtol"], atol=tol["atol"] * 4.0 * float(want[count].max()))
    assert got[count, 2, 4] == 0 and got[mean, 2, 4] == 0 and got[m2, 2, 4] == 0
    assert got[lo, 2, 4] == math.inf and got[hi, 2, 4] == -math.inf


def test_empty_and_fully_masked_batches_give_empty_tables(split_backend, device, gen):
    stats = (2, 3)
    empty_row = torch.tensor([0.0, 0.0, 0.0, 0.0, math.inf, -math.inf], dtype=torch.float64, device=device)
    x = randn((9,) + stats, gen, device=device)
    x[0, 0, 0] = math.nan  # not selected: not counted as non-finite either
    cases = [(randn((0,) + stats, gen, device=device), None),
             (randn((4, 0) + stats, gen, device=device), torch.ones(4, 0, dtype=torch.bool, device=device)),
             (x, torch.zeros(9, dtype=torch.bool, device=device))]
    for x, mask in cases:
        table = moments_of(split_backend, x, mask, stats)
        assert torch.equal(table, empty_row[:, None, None].expand_as(table))


@pytest.mark.parametrize("momentum,options", [(0.99, {}), (None, {}), (0.99, OPTION_CASES[0]), (None, OPTION_CASES[1]),
                                              (0.9, OPTION_CASES[2])], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_parts_merge_to_the_concatenated_batch(split_backend, device, gen, momentum, options, dtype):
    # Four "ranks": unequal shards, one empty, one fully masked; every part merges the same tables.
    stats, sizes = (4, 3), (29, 0, 7, 64)
    norm = RunningNorm(stats, momentum=momentum, backend="reference", device=device, **options)  # the oracle
    states = [fresh_state(stats, device) for _ in sizes]
    diags = [torch.full_like(norm._diag, math.nan) for _ in sizes]
    for step in range(4):
        x = randn((sum(sizes),) + stats, gen, dtype=dtype, device=device, mean=0.5 * step, scale=1.5 + step)
        mask = random_mask((sum(sizes), stats[0]), gen, device)
        mask[sizes[0]:sizes[0] + sizes[1] + sizes[2]] = False  # shards 1 (empty) and 2
        xs, masks = x.split(sizes), mask.split(sizes)
        parts = torch.stack([moments_of(split_backend, xp, mp, stats) for xp, mp in zip(xs, masks)])
        ys = [split_step(split_backend, xp, mp, parts, st, dg, norm)
              for xp, mp, st, dg in zip(xs, masks, states, diags)]
        expected = reference.running_norm(x, mask, norm.mean, norm.var, norm.count, **op_hyper(norm))
        norm(x, mask=mask)
        for p in range(1, len(sizes)):  # the same parts, the same bits
            assert all(torch.equal(a, b) for a, b in zip(states[p], states[0]))
            assert torch.equal(diags[p][:4], diags[0][:4]) and torch.equal(diags[p][5], diags[0][5])
        tol = STAT_TOL[dtype]
        torch.testing.assert_close(states[0][2], expected.count, rtol=0, atol=0)
        torch.testing.assert_close(states[0][0], expected.mean, rtol=tol["rtol"], atol=tol["atol"] * 8)
        torch.testing.assert_close(states[0][1], expected.var, rtol=tol["rtol"], atol=tol["atol"] * 64)
        torch.testing.assert_close(torch.cat(ys), expected.y, **Y_TOL[dtype])
        merged_diag = diags[0].clone()
        merged_diag[4] = sum(d[4] for d in diags)  # clipped: each part counts its own entries
        assert_diag_close(merged_diag, expected.diag, dtype, scale=8.0)


def test_empty_x_still_takes_the_group_update(split_backend, device, gen):
    stats = (5,)
    norm = RunningNorm(stats, backend=split_backend, device=device)
    others = randn((40,) + stats, gen, device=device, mean=3.0)
    parts = torch.stack([moments_of(split_backend, randn((0,) + stats, gen, device=device), None, stats),
                         moments_of(split_backend, others, None, stats, shift=norm.mean)])
    state, diag = fresh_state(stats, device), torch.full_like(norm._diag, math.nan)
    y = split_step(split_backend, others[:0], None, parts, state, diag, norm)
    norm(others)
    assert y.shape == (0, 5)
    torch.testing.assert_close(state[0], norm.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state[1], norm.var, rtol=1e-12, atol=1e-12)
    assert torch.equal(state[2], norm.count) and torch.equal(diag[4], torch.zeros_like(diag[4]))
    torch.testing.assert_close(diag[5], norm._diag[5], rtol=1e-6, atol=1e-6)  # the group's max |z|


def test_sync_needs_an_initialized_process_group(split_backend, device, gen):
    norm = RunningNorm((3,), sync=True, backend=split_backend, device=device)
    before = [t.clone() for t in (norm.mean, norm.var, norm.count, norm.steps)]
    with pytest.raises(RuntimeError, match=r"RunningNorm\(sync=True\) needs torch.distributed to be initialized"):
        norm(randn((8, 3), gen, device=device))
    assert all(torch.equal(a, b) for a, b in zip(before, (norm.mean, norm.var, norm.count, norm.steps)))
    norm.eval()
    norm(randn((8, 3), gen, device=device))  # normalizing alone needs no group


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(sync=1), TypeError, "sync must be a bool, got int"),
    (dict(process_group=object()), ValueError, "process_group is only used with sync=True"),
])
def test_bad_sync_arguments(kwargs, error, message):
    with pytest.raises(error, match=message):
        RunningNorm((3,), **kwargs)
