"""RunningNorm.diagnostics() and .health() against the same numbers computed entry by entry."""

from __future__ import annotations

import math

import pytest
import torch

from fastnorm import RunningNorm, reference
from fastnorm.monitoring.diagnostics import DIAGNOSTIC_NAMES
from helpers import DTYPES, randn, random_mask

# The kernels accumulate the batch moments in float32 (float64 for float64 inputs).
DIAG_TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9)}
DEFAULT_TOL = dict(rtol=2e-5, atol=2e-5)


def expected(norm: RunningNorm, count_before: torch.Tensor, x: torch.Tensor, mask) -> dict[str, float]:
    """The diagnostics from x itself: z of every selected finite entry with the statistics after
    the update, moments per column, the update weight from the counts before it."""
    cols = norm.shape.numel()
    rows = reference.as_rows(x.cpu(), norm.shape)
    selected = reference.selection(rows, None if mask is None else mask.cpu())
    valid = selected & torch.isfinite(rows)
    mean, var, count = (t.cpu().reshape(-1) for t in (norm.mean, norm.var, norm.count))
    std = reference.bounded_std(var, norm.eps, norm.min_std, norm.max_std)
    z = (rows - mean) / std
    columns = [c for c in range(cols) if valid[:, c].any()]
    raw_std = [rows[valid[:, c], c].std(correction=0).item() for c in columns]
    col_z_mean = [z[valid[:, c], c].mean().abs().item() for c in columns]
    n = valid.sum(0, dtype=torch.float64)
    n_eff = count_before.cpu().reshape(-1).clamp(max=norm.max_count if norm.max_count else math.inf)
    weight = n / (n_eff + n)
    if norm.momentum is not None:
        weight = weight.clamp(min=1 - norm.momentum)
    zs = z[valid]
    return {
        "raw_std_min": min(raw_std), "raw_std_max": max(raw_std),
        "norm_mean": zs.mean().item(), "norm_std": zs.std(correction=0).item(),
        "norm_mean_max_abs": max(col_z_mean), "max_abs_z": zs.abs().max().item(),
        "clipped_fraction": (zs.abs() > norm.clip).double().mean().item(),
        "floor_fraction": (torch.sqrt(var + norm.eps) <= norm.min_std).double().mean().item(),
        "nonfinite_count": (selected & ~torch.isfinite(rows)).sum().item(),
        "min_count": count.min().item(),
        "update_weight": weight[n > 0].max().item(),
        "steps": norm.steps.item(),
    }


def assert_health_close(health: dict[str, float], want: dict[str, float], dtype, n_entries: int):
    tol = DIAG_TOL.get(dtype, DEFAULT_TOL)
    assert set(health) == set(want)
    for name, value in want.items():
        # An entry whose |z| rounds across clip may count differently (as in tests/helpers.py).
        atol = 2.0 / n_entries if name == "clipped_fraction" else tol["atol"]
        assert health[name] == pytest.approx(value, rel=tol["rtol"], abs=atol), name


def poison(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> None:
    """Puts NaN, +inf and -inf into three selected entries of x (mask: x's leading dims)."""
    b, a = mask.nonzero().cpu()[torch.randperm(int(mask.sum()), generator=gen)[:3]].unbind(1)
    f = torch.randint(x.shape[-1], (3,), generator=gen)
    x[b, a, f] = torch.tensor([math.nan, math.inf, -math.inf], dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum,max_count", [(0.99, None), (None, None), (None, 50.0)])
def test_diagnostics_match_entry_by_entry(backend, device, gen, dtype, momentum, max_count):
    shape = (3, 5)
    norm = RunningNorm(shape, momentum=momentum, max_count=max_count, clip=2.0, min_std=0.5, backend=backend,
                       device=device)
    for step in range(3):
        batch = (37, *shape)
        x = randn(batch, gen, dtype=dtype, device=device, mean=2.0, scale=1.5 + step)
        x[:, 0, 0] = 1.25  # a constant column: its std sits at the floor
        mask = random_mask((37, 3), gen, device=device)
        poison(x, mask, gen)
        count_before = norm.count.clone()
        norm(x, mask=mask)
    diagnostics = norm.diagnostics()
    assert set(diagnostics) == set(DIAGNOSTIC_NAMES)
    assert all(t.dim() == 0 and t.device == norm.mean.device for t in diagnostics.values())
    assert diagnostics["steps"].dtype == torch.int64
    want = expected(norm, count_before, x, mask)
    assert want["floor_fraction"] > 0 and want["clipped_fraction"] > 0 and want["nonfinite_count"] > 0
    assert_health_close(norm.health(), want, dtype, x.numel())


def test_masked_out_columns_are_left_out(backend, device, gen):
    norm = RunningNorm((4, 2), backend=backend, device=device)
    x = randn((50, 4, 2), gen, device=device)
    x[:, 1] *= 1000.0  # agent 1 is huge but masked out: it must not reach any diagnostic
    mask = torch.ones(50, 4, dtype=torch.bool, device=device)
    mask[:, 1] = False
    count_before = norm.count.clone()
    norm(x, mask=mask)
    want = expected(norm, count_before, x, mask)
    assert want["raw_std_max"] < 100
    assert_health_close(norm.health(), want, torch.float32, x.numel())


def test_before_any_update_only_the_state_is_defined(backend, device):
    norm = RunningNorm((2, 3), backend=backend, device=device)
    diagnostics = norm.diagnostics()
    undefined = set(DIAGNOSTIC_NAMES) - {"floor_fraction", "min_count", "steps"}
    assert all(math.isnan(diagnostics[name].item()) for name in undefined)
    assert norm.health(prefix="obs/") == {"obs/floor_fraction": 0.0, "obs/min_count": 0.0, "obs/steps": 0}


def test_update_without_output_leaves_z_undefined(backend, device, gen):
    norm = RunningNorm((6,), backend=backend, device=device)
    x = randn((40, 6), gen, device=device)
    count_before = norm.count.clone()
    norm.update(x)
    health = norm.health()
    assert "max_abs_z" not in health and "clipped_fraction" not in health
    want = expected(norm, count_before, x, None)
    del want["max_abs_z"], want["clipped_fraction"]
    assert_health_close(health, want, torch.float32, x.numel())


@pytest.mark.parametrize("case", ["empty batch", "everything masked", "only non-finite"])
def test_a_batch_with_no_selected_entry(backend, device, gen, case):
    norm = RunningNorm((3,), backend=backend, device=device)
    norm(randn((20, 3), gen, device=device))
    if case == "empty batch":
        norm(torch.empty(0, 3, device=device))
    elif case == "everything masked":
        norm(randn((20, 3), gen, device=device), mask=torch.zeros(20, dtype=torch.bool, device=device))
    else:
        norm(torch.full((20, 3), math.nan, device=device))
    health = norm.health()
    assert set(health) == {"floor_fraction", "nonfinite_count", "min_count", "steps"}
    assert health["nonfinite_count"] == (60.0 if case == "only non-finite" else 0.0)
    assert health["min_count"] == 20.0


def test_floor_fraction_counts_columns_held_at_min_std(backend, device, gen):
    norm = RunningNorm((4,), min_std=0.1, backend=backend, device=device)
    x = randn((64, 4), gen, device=device)
    x[:, 1] = 3.0
    x[:, 3] = 3.0 + 1e-3 * torch.randn(64, generator=gen).to(device)
    norm(x)
    assert norm.health()["floor_fraction"] == 0.5
    unfloored = RunningNorm((4,), min_std=None, backend=backend, device=device)
    unfloored(x)
    assert unfloored.health()["floor_fraction"] == 0.0


def test_update_weight_shows_frozen_statistics(backend, device, gen):
    """The stability seed's cumulative normalizer: the weight of a batch falls as 1/steps."""
    cumulative = RunningNorm((2,), momentum=None, backend=backend, device=device)
    ema = RunningNorm((2,), momentum=0.99, backend=backend, device=device)
    for _ in range(200):
        x = randn((16, 2), gen, device=device)
        cumulative(x)
        ema(x)
    assert cumulative.health()["update_weight"] == pytest.approx(1 / 200)
    assert ema.health()["update_weight"] == pytest.approx(0.01)


def test_diagnostics_read_no_value_on_the_host():
    """On meta tensors any host read (.item(), a branch on a value) raises: none happens."""
    norm = RunningNorm((3, 4), device="meta")
    diagnostics = norm.diagnostics()
    assert set(diagnostics) == set(DIAGNOSTIC_NAMES)
    assert all(t.device.type == "meta" and t.dim() == 0 for t in diagnostics.values())


def test_diagnostics_are_a_snapshot(backend, device, gen):
    norm = RunningNorm((3,), backend=backend, device=device)
    norm(randn((10, 3), gen, device=device))
    before = {k: v.clone() for k, v in norm.diagnostics().items()}
    snapshot = norm.diagnostics()
    norm(randn((10, 3), gen, device=device, mean=5.0))
    for name, value in snapshot.items():
        torch.testing.assert_close(value, before[name], equal_nan=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_diagnostics_do_not_synchronize_on_cuda(gen):
    norm = RunningNorm((3, 4), device="cuda")
    norm(randn((64, 3, 4), gen, device="cuda"))
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        diagnostics = norm.diagnostics()
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert all(t.device.type == "cuda" for t in diagnostics.values())
    assert norm.health()["steps"] == 1
