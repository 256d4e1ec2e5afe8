"""The CUDA kernels of csrc/cuda/running_norm.cu, run on the CPU by tests/cuda_emulator, against
the float64 reference: their logic (plans, tiles, row splits, the last-arriving block's merge,
masks, non-finite and huge values, clip counts, the vector and scalar paths) is checked on every
machine with g++ and the CUDA headers, GPU or not. Races between blocks, the memory model and
speed are for tests/test_cuda.py, on a GPU.
"""

from __future__ import annotations

import ctypes
import math

import pytest
import torch

from emulated_cuda import (CUDA_ERROR_INVALID_CONFIGURATION, DTYPE_KIND, FOUR_SMS, H100_SMS, ONE_SM, Plan,  # noqa: F401
                           check_launched, emulator, make_problem, no_misaligned_access)
from emulated_cuda import running_norm as emulated_step
from fastnorm import reference
from helpers import STAT_TOL, Y_TOL, assert_diag_close, random_mask, randn

HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=2.5)


def fresh_stats(shape, gen):
    return (randn(shape, gen, dtype=torch.float64), 0.5 + torch.rand(shape, generator=gen, dtype=torch.float64),
            torch.full(shape, 3.0, dtype=torch.float64))


def check_step(lib, device, x, mask, stats, hyper, scale=1.0):
    """Runs a step and compares it with the reference (y, statistics, diagnostics); returns the plan."""
    mean, var, count = stats
    expected = reference.running_norm(x, mask, mean, var, count, **hyper)
    y, diag, plan = emulated_step(lib, device, x, mask, stats, hyper)
    torch.testing.assert_close(y, expected.y, **Y_TOL[x.dtype])
    tol = STAT_TOL[x.dtype]
    torch.testing.assert_close(count, expected.count, rtol=0, atol=0)
    torch.testing.assert_close(mean, expected.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(var, expected.var, rtol=tol["rtol"], atol=tol["atol"] * scale**2)
    assert_diag_close(diag, expected.diag, x.dtype, scale=scale)
    return plan


def make_mask(kind, rows, stats_shape, gen):
    if kind == "none":
        return None
    return random_mask((rows,) if kind == "rows" else (rows, stats_shape[0]), gen)


# (device, rows, statistics shape): one launch (a single row split) and two launches (several).
PATHS = {"one_launch": (ONE_SM, 45, (3, 8)), "row_splits": (H100_SMS, 2600, (3, 8))}


@pytest.mark.parametrize("dtype", list(DTYPE_KIND), ids=str)
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "rows", "agents"])
def test_matches_reference(emulator, gen, dtype, path, mask_kind):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    for _ in range(2):  # the second step starts from the first's statistics
        x = randn((rows, *shape), gen, dtype=dtype, mean=1.0, scale=2.0)
        plan = check_step(emulator, device, x, make_mask(mask_kind, rows, shape, gen), stats, HYPER, scale=2.0)
        assert (plan.row_splits > 1) == (path == "row_splits")
        assert plan.vector_width == 16 // x.element_size()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("options", [dict(eps_on_std=True, eps=0.3), dict(unbiased=True),
                                     dict(eps_on_std=True, unbiased=True, eps=0.3, min_std=None)], ids=str)
def test_eps_on_std_and_unbiased_match_reference(emulator, gen, path, options):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    hyper = {**HYPER, **options}
    for batch_rows in (rows, 1):  # one row: an unbiased batch variance of 0
        x = randn((batch_rows, *shape), gen, mean=1.0, scale=2.0)
        check_step(emulator, device, x, make_mask("rows", batch_rows, shape, gen), stats, hyper, scale=2.0)
    x = randn((rows, *shape), gen, scale=4.0)
    out = torch.full_like(x, float("nan"))
    problem = make_problem(x.reshape(rows, -1), stats[0], stats[1], hyper, out_rows=out.reshape(rows, -1))
    check_launched(emulator.emulated_normalize(device, ctypes.byref(problem), ctypes.byref(Plan())), "normalize")
    expected = reference.normalize(x, stats[0], stats[1], eps=hyper["eps"], min_std=hyper["min_std"], max_std=None,
                                   clip=hyper["clip"], eps_on_std=hyper.get("eps_on_std", False))
    torch.testing.assert_close(out, expected, **Y_TOL[torch.float32])


@pytest.mark.parametrize("path", list(PATHS))
def test_relative_floor_and_long_run_scale_match_reference(emulator, gen, path):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    scale = 2.0 + torch.rand(shape, generator=gen, dtype=torch.float64)  # the floor binds in some columns
    for _ in range(2):
        x = randn((rows, *shape), gen, mean=1.0, scale=1.0)
        hyper = {**HYPER, "min_std_rel": 0.6, "scale": scale}
        expected = reference.running_norm(x, None, *stats, **hyper)
        check_step(emulator, device, x, None, stats, hyper)
        torch.testing.assert_close(scale, expected.scale, **STAT_TOL[torch.float32])
    out = torch.full_like(x, float("nan"))
    problem = make_problem(x.reshape(rows, -1), stats[0], stats[1], hyper, out_rows=out.reshape(rows, -1))
    check_launched(emulator.emulated_normalize(device, ctypes.byref(problem), ctypes.byref(Plan())), "normalize")
    expected = reference.normalize(x, stats[0], stats[1], eps=HYPER["eps"], min_std=HYPER["min_std"], max_std=None,
                                   clip=HYPER["clip"], scale=scale, min_std_rel=0.6)
    torch.testing.assert_close(out, expected, **Y_TOL[torch.float32])


@pytest.mark.parametrize("path", list(PATHS))
def test_scalar_path_for_unaligned_rows(emulator, gen, path):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    wide = randn((rows, 1 + math.prod(shape)), gen, scale=3.0)
    x = wide[:, 1:].view(rows, *shape)  # 4 bytes past a 16-byte boundary
    plan = check_step(emulator, device, x, None, stats, HYPER, scale=3.0)
    assert plan.vector_width == 1 and (plan.row_splits > 1) == (path == "row_splits")


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("mask_kind", ["none", "elements"])
def test_non_finite_and_huge_values(emulator, gen, path, mask_kind):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    x = randn((rows, *shape), gen)
    x[3, 0, 0] = float("nan")
    x[rows // 2, 1, 2] = float("inf")
    x[rows - 1, 1, 2] = float("-inf")
    x[:, 2, 5] = float("nan")  # a column without a finite entry
    x[:, 0, 7] = randn((rows,), gen, scale=1e30)  # float32 squares overflow
    mask = None if mask_kind == "none" else random_mask((rows, *shape), gen)
    mean, var, count = stats
    expected = reference.running_norm(x, mask, mean, var, count, **HYPER)
    y, diag, _ = emulated_step(emulator, device, x, mask, stats, HYPER)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32], equal_nan=True)
    torch.testing.assert_close(count, expected.count, rtol=0, atol=0)
    torch.testing.assert_close(mean, expected.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var, expected.var, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(diag[[0, 3]], expected.diag[[0, 3]], rtol=0, atol=0)  # counts, non-finite
    torch.testing.assert_close(diag[[1, 2, 5]], expected.diag[[1, 2, 5]], rtol=1e-5, atol=1e-5, equal_nan=True)
    assert count.reshape(-1)[2 * 8 + 5] == 3.0  # the NaN column keeps its statistics


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("masked", [False, True])
def test_large_offset_small_spread(emulator, gen, path, masked):
    # mean 1e3, std 1e-3 in float32: the shifted sums keep the variance E[x^2] - E[x]^2 would lose.
    device, rows, shape = PATHS[path]
    x = (1e3 + 1e-3 * torch.randn((rows, *shape), generator=gen, dtype=torch.float64)).float()
    mask = random_mask((rows, *shape), gen) if masked else None
    stats = (torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64),
             torch.zeros(shape, dtype=torch.float64))
    hyper = dict(HYPER, momentum=None, min_std=None, eps=0.0)
    expected = reference.running_norm(x, mask, *stats, **hyper)
    emulated_step(emulator, device, x, mask, stats, hyper)
    torch.testing.assert_close(stats[1], expected.var, rtol=1e-4, atol=0)


@pytest.mark.parametrize("path", list(PATHS))
def test_in_place_and_statistics_only(emulator, gen, path):
    device, rows, shape = PATHS[path]
    stats = fresh_stats(shape, gen)
    x = randn((rows, *shape), gen)
    expected = reference.running_norm(x, None, *stats, **HYPER)
    y, _, _ = emulated_step(emulator, device, x, None, stats, HYPER, out=x)
    assert y is x
    torch.testing.assert_close(x, expected.y, **Y_TOL[torch.float32])
    update_only = fresh_stats(shape, gen)
    x = randn((rows, *shape), gen)
    expected = reference.running_norm(x, None, *update_only, **HYPER, with_output=False)
    _, diag, _ = emulated_step(emulator, device, x, None, update_only, HYPER, with_output=False)
    torch.testing.assert_close(update_only[1], expected.var, **STAT_TOL[torch.float32])
    assert_diag_close(diag, expected.diag, torch.float32)


def test_empty_batch_writes_diagnostics_only(emulator, gen):
    stats = fresh_stats((3, 8), gen)
    before = [t.clone() for t in stats]
    y, diag, plan = emulated_step(emulator, H100_SMS, torch.empty(0, 3, 8), None, stats, HYPER)
    assert plan.row_splits == 1
    for a, b in zip(stats, before):
        assert torch.equal(a, b)
    assert torch.equal(diag, torch.zeros(6, 24, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_normalize(emulator, gen, dtype):
    rows, shape = 300, (5, 8)
    x = randn((rows, *shape), gen, dtype=dtype, scale=4.0)
    mean, var, _ = fresh_stats(shape, gen)
    out = torch.full_like(x, float("nan"))
    problem = make_problem(x.reshape(rows, -1), mean, var, HYPER, out_rows=out.reshape(rows, -1))
    plan = Plan()
    check_launched(emulator.emulated_normalize(H100_SMS, ctypes.byref(problem), ctypes.byref(plan)), "normalize")
    expected = reference.normalize(x, mean, var, eps=HYPER["eps"], min_std=HYPER["min_std"], max_std=None,
                                   clip=HYPER["clip"])
    torch.testing.assert_close(out, expected, **Y_TOL[dtype])
    assert plan.row_splits > 1


def test_launches_refuse_what_cuda_refuses(emulator):
    # What an sm_90 launch refuses with cudaErrorInvalidConfiguration: an empty grid, more than
    # 2^31 - 1 blocks, a block of 0 or more than 1024 threads, over 48 KB of dynamic shared memory.
    status = emulator.emulated_launch_status
    status.argtypes = [ctypes.c_ulonglong, ctypes.c_longlong, ctypes.c_size_t]
    assert status(1, 256, 0) == 0 and status(2, 256, 48 * 1024) == 0  # (a valid launch runs: kept small)
    for grid, block, shared in [(0, 256, 0), (2**31, 256, 0), (1, 0, 0), (1, 1056, 0), (1, 256, 48 * 1024 + 1)]:
        assert status(grid, block, shared) == CUDA_ERROR_INVALID_CONFIGURATION, (grid, block, shared)


@pytest.mark.parametrize("device", [ONE_SM, FOUR_SMS, H100_SMS])
@pytest.mark.parametrize("with_out", [True, False])
def test_opcheck_arguments_launch_what_cuda_accepts(emulator, gen, device, with_out):
    # tests/test_ops.py::test_opcheck_running_norm[True-False]'s arguments (a mask per agent, no
    # out), which met "CUDA error: invalid argument" on the H200: every launch of the op is one
    # that CUDA accepts (check_launched), on every device size, and the step is right.
    x = randn((33, 4, 3), gen)
    mask = random_mask((33, 4), gen)
    stats = fresh_stats((4, 3), gen)
    mean, var, count = stats
    expected = reference.running_norm(x, mask, mean, var, count, **HYPER, with_output=with_out)
    y, diag, _ = emulated_step(emulator, device, x, mask, stats, HYPER, with_output=with_out)
    if with_out:
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    torch.testing.assert_close(count, expected.count, rtol=0, atol=0)
    torch.testing.assert_close(var, expected.var, **STAT_TOL[torch.float32])
    assert_diag_close(diag, expected.diag, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(1,), (2,), (4,), (8,), (64,)], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "rows"])
def test_narrow_tiles_with_row_splits(emulator, gen, dtype, shape, mask_kind):
    # A tile of 1-64 columns: its last block merges the splits' partials with 4 to 256 threads per
    # column, lanes spanning up to 8 warps; at 4 columns or fewer enough splits (68-136) that
    # several of a column's warps hold some, and more splits than lanes at 64 columns.
    rows = 70000 if math.prod(shape) <= 4 else 5000
    stats = fresh_stats(shape, gen)
    for _ in range(2):
        x = randn((rows, *shape), gen, dtype=dtype, mean=1.0, scale=2.0)
        plan = check_step(emulator, H100_SMS, x, make_mask(mask_kind, rows, shape, gen), stats, HYPER, scale=2.0)
        assert plan.row_splits > 1
