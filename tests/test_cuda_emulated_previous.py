"""normalize_with="previous" and the update counter in the CUDA kernels of csrc/cuda/running_norm.cu,
run on the CPU by tests/cuda_emulator, against the float64 reference (previous=True): y of the
columns with a history written in the reduce pass from the statistics before the batch, the other
columns (count 0) normalized with the updated statistics, with one row split (one launch) and many
(the last-arriving block's update, then a normalize launch that skips the columns already written);
diag written whole by the kernels (no reset before the call); steps counted once per call inside a
kernel.
"""

from __future__ import annotations

import math

import pytest
import torch

import emulated_cuda as emu
from emulated_cuda import DTYPE_KIND, H100_SMS, ONE_SM, emulator, no_misaligned_access  # noqa: F401
from fastnorm import reference
from helpers import STAT_TOL, Y_TOL, assert_diag_close, random_mask, randn

HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=2.5, previous=True)
# (device, rows): one launch (a single row split) and the split reduce with a last-arriving block.
PATHS = {"one_launch": (ONE_SM, 45), "row_splits": (H100_SMS, 2600)}
# (3, 8): a vector (4 float32 columns) never spans two agents; (12, 2): it spans two, so that an
# agent mask can leave one vector with and without a history (written in the normalize step).
SHAPES = [(3, 8), (12, 2)]


def initial_stats(shape):
    """RunningNorm's initial statistics: mean 0, var 1, count 0 (no history)."""
    return [torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64),
            torch.zeros(shape, dtype=torch.float64)]


def check_previous_step(lib, device, x, mask, stats, hyper, scale):
    """One running_norm step against the reference; returns the plan."""
    expected = reference.running_norm(x, mask, *stats, **hyper)
    y, diag, plan = emu.running_norm(lib, device, x, mask, stats, hyper)
    torch.testing.assert_close(y, expected.y, **Y_TOL[x.dtype])
    tol = STAT_TOL[x.dtype]
    torch.testing.assert_close(stats[2], expected.count, rtol=0, atol=0)
    torch.testing.assert_close(stats[0], expected.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(stats[1], expected.var, rtol=tol["rtol"], atol=tol["atol"] * scale**2)
    assert_diag_close(diag, expected.diag, x.dtype, scale=scale)
    return plan, y, expected


@pytest.mark.parametrize("dtype", list(DTYPE_KIND), ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "rows", "agents"])
def test_first_steps_match_reference(emulator, gen, dtype, path, mask_kind):
    # Step 1: no column has a history (y from the batch itself); steps 2 and 3: every column has
    # one (y in the reduce pass), the data moving so that the statistics before differ and clip.
    device, rows = PATHS[path]
    shape = SHAPES[0]
    stats = initial_stats(shape)
    for step in range(3):
        x = randn((rows, *shape), gen, dtype=dtype, mean=3.0 * step, scale=1.0 + step)
        mask = {"none": None, "rows": random_mask((rows,), gen), "agents": random_mask((rows, shape[0]), gen)}[mask_kind]
        if mask is not None:
            mask[0] = True  # every column has a history after step 1
        plan, y, expected = check_previous_step(emulator, device, x, mask, stats, HYPER, scale=1.0 + step)
        assert (plan.row_splits > 1) == (path == "row_splits")
        assert plan.vector_width == 16 // x.element_size()
        if step > 0:
            assert expected.diag[4].sum() > rows  # many entries clip against the statistics before
        else:
            updated = reference.running_norm(x, mask, *initial_stats(shape), **dict(HYPER, previous=False))
            torch.testing.assert_close(expected.y, updated.y, rtol=0, atol=0)  # step 1 is the batch's own


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_columns_without_history_use_the_updated_statistics(emulator, gen, path, shape, dtype):
    # Step 1 leaves agents out entirely: in step 2 their columns (count 0) are normalized with the
    # updated statistics (the batch's), the others with those before the batch.
    device, rows = PATHS[path]
    agents = shape[0]
    stats = initial_stats(shape)
    first = torch.zeros(agents, dtype=torch.bool)
    first[::3] = True
    first[1] = True
    emu.running_norm(emulator, device, randn((rows, *shape), gen, dtype=dtype, mean=2.0), first.expand(rows, agents),
                     stats, HYPER)
    assert torch.equal(stats[2][:, 0] > 0, first)
    for step in range(2):  # step 2: mixed; step 3: every column has a history
        x = randn((rows, *shape), gen, dtype=dtype, mean=-4.0, scale=3.0)
        _, y, _ = check_previous_step(emulator, device, x, random_mask((rows, agents), gen), stats, HYPER, scale=3.0)
    assert (stats[2] > 0).all()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "agents"])
def test_in_place_with_non_finite_values(emulator, gen, path, mask_kind):
    # out = x: the reduce must not write y over values it may read again (the exact recompute of a
    # column holding NaN or inf), so y is written by the normalize step, with the same result.
    device, rows = PATHS[path]
    shape = SHAPES[0]
    stats = initial_stats(shape)
    emu.running_norm(emulator, device, randn((rows, *shape), gen, mean=1.0), None, stats, HYPER)
    for out_is_x in (False, True):
        x = randn((rows, *shape), gen, mean=-2.0, scale=2.0)
        x[3, 0, 0] = math.nan
        x[rows // 2, 1, 2] = math.inf
        x[:, 0, 7] = randn((rows,), gen, scale=1e30)  # float32 squares overflow: the exact recompute
        mask = random_mask((rows, shape[0]), gen) if mask_kind == "agents" else None
        expected = reference.running_norm(x, mask, *stats, **HYPER)
        y, diag, _ = emu.running_norm(emulator, device, x, mask, stats, HYPER, out=x if out_is_x else None)
        assert (y is x) == out_is_x
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32], equal_nan=True)
        torch.testing.assert_close(stats[2], expected.count, rtol=0, atol=0)
        torch.testing.assert_close(stats[1], expected.var, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(diag[[0, 3, 4]], expected.diag[[0, 3, 4]], rtol=0, atol=1)
        torch.testing.assert_close(diag[[1, 2, 5]], expected.diag[[1, 2, 5]], rtol=1e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("with_output", [True, False])
def test_diag_is_written_whole_by_the_kernels(emulator, gen, path, with_output):
    # diag holds garbage before each call (the module's diag holds the previous call's): every
    # entry is rewritten, including the clipped counts that the reduce pass accumulates, over
    # repeated calls whose workspaces start as garbage too.
    device, rows = PATHS[path]
    shape = (3, 64)  # several column tiles
    stats = initial_stats(shape)
    diag = torch.full((6, math.prod(shape)), 1e300, dtype=torch.float64)
    for step in range(3):
        x = randn((rows, *shape), gen, mean=2.0 * step, scale=1.0 + step)
        expected = reference.running_norm(x, None, *stats, with_output=with_output, **HYPER)
        emu.running_norm(emulator, device, x, None, stats, HYPER, with_output=with_output, diag=diag)
        assert_diag_close(diag, expected.diag, torch.float32, scale=1.0 + step)
        assert not with_output or step == 0 or expected.diag[4].sum() > 10 * rows  # counts that show a double count
        diag[:] = float("nan") if step % 2 else -1e300


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("previous", [False, True])
def test_running_norm_counts_one_step_per_call_with_entries(emulator, gen, path, previous):
    device, rows = PATHS[path]
    shape = (3, 64)  # several column tiles, each with its last block: the step is still counted once
    stats = initial_stats(shape)
    steps = torch.tensor(5, dtype=torch.int64)
    hyper = dict(HYPER, previous=previous)
    for call, batch_rows in enumerate([rows, 0, rows, rows]):
        emu.running_norm(emulator, device, randn((batch_rows, *shape), gen), None, stats, hyper, steps=steps)
        assert int(steps) == 5 + [1, 1, 2, 3][call]  # an empty batch is no step
    fully_masked = torch.zeros(rows, dtype=torch.bool)
    emu.running_norm(emulator, device, randn((rows, *shape), gen), fully_masked, stats, hyper, steps=steps,
                     with_output=False)
    assert int(steps) == 9  # x has entries: a step, whatever the mask (as on the CPU)


@pytest.mark.parametrize("rows", [0, 45, 2600])
def test_merge_normalize_counts_a_step_of_the_group_always(emulator, gen, rows):
    shape = (3, 64)
    stats = initial_stats(shape)
    steps = torch.tensor(0, dtype=torch.int64)
    x = randn((rows, *shape), gen)
    parts = torch.stack([emu.batch_moments(emulator, H100_SMS, x, None, shape)[0],
                         emu.batch_moments(emulator, H100_SMS, randn((7, *shape), gen), None, shape)[0]])
    for call in range(2):
        emu.merge_normalize(emulator, H100_SMS, x, None, parts, stats, HYPER, steps=steps)
        assert int(steps) == call + 1


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_normalize_previous_one_part_gives_running_norms_bits(emulator, gen, path, shape, dtype):
    # The same batch through running_norm (y in the reduce pass where every column of a vector has
    # a history) and through batch_moments + merge_normalize (y in the normalize kernel): the same
    # bits, with mixed columns (agents left out of step 1) and a reference check.
    device, rows = PATHS[path]
    fused = initial_stats(shape)
    first = torch.arange(shape[0]) % 3 != 1
    emu.running_norm(emulator, device, randn((rows, *shape), gen), first.expand(rows, shape[0]), fused, HYPER)
    split = [t.clone() for t in fused]
    for _ in range(2):
        x = randn((rows, *shape), gen, dtype=dtype, mean=3.0, scale=2.0)
        mask = random_mask((rows, shape[0]), gen)
        expected = reference.merge_normalize(x, mask, reference.batch_moment_table(x, mask, torch.Size(shape))[None],
                                             *split, **HYPER)
        y_fused, diag_fused, _ = emu.running_norm(emulator, device, x, mask, fused, HYPER)
        table, _ = emu.batch_moments(emulator, device, x, mask, shape)
        y, diag, _ = emu.merge_normalize(emulator, device, x, mask, table[None], split, HYPER)
        for a, b in zip(split, fused):
            assert torch.equal(a, b)
        assert torch.equal(y, y_fused)
        assert torch.equal(diag, diag_fused)
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_diag_close(diag, expected.diag, dtype, scale=2.0)
