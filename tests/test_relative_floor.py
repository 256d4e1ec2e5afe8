"""RunningNorm(min_std_rel=...): the relative std floor and its long-run scale on every backend under
test, against the float64 reference and the properties README states ("The relative std floor")."""

from __future__ import annotations

import math

import pytest
import torch

from fastnorm import Monitor, RunningNorm, reference
from fastnorm.backends import BACKENDS
from fastnorm.triton_backend import INTERPRETED
from helpers import STAT_TOL, Y_TOL, assert_diag_close, assert_stats_close, expected_step, op_hyper, random_mask, randn


def batch(rows, gen, device, dtype=torch.float32, collapsed=False):
    """(rows, 2, 3) of mean 5 and std 2 in every column, or with collapsed, std 2e-3 in columns (1, *)."""
    std = torch.full((2, 3), 2.0, dtype=torch.float64)
    if collapsed:
        std[1] = 2e-3
    x = 5.0 + std * torch.randn((rows, 2, 3), generator=gen, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def plus_minus(rows, std, device, mean=0.0):
    """A batch of rows alternating mean +- std in every column: batch mean and std exactly as given."""
    signs = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(rows // 2)
    return (mean + std * signs).to(device)


def skip_interpreted(backend):
    """The properties below take hundreds of updates: seconds each on a kernel, minutes under Triton's
    interpreter. Triton follows the reference there as everywhere (test_matches_reference)."""
    if backend == "triton" and INTERPRETED:
        pytest.skip("hundreds of updates under the Triton interpreter; test_matches_reference covers triton")


def divisor(norm):
    """The divisor y uses, from normalize: (x - mean) / y at x = mean + 1."""
    y = norm.normalize((norm.mean + 1.0)[None].to(torch.float64))[0]
    return 1.0 / y


@pytest.mark.parametrize("dtype,momentum,options", [
    (torch.float32, 0.99, {}),
    (torch.float64, None, dict(eps_placement="std")),
    (torch.bfloat16, 0.9, dict(batch_var="unbiased", min_std=None)),
], ids=str)
def test_matches_reference(backend, device, gen, dtype, momentum, options):
    # Step 0 sets the long-run scale; then columns (1, *) collapse, and from step 3 on their std has
    # fallen below 0.7 times their scale (the steps' weights are 1, 1/2, ..., 1/6).
    norm = RunningNorm((2, 3), momentum=momentum, min_std_rel=0.7, clip=50.0, backend=backend, device=device,
                       **options)
    scale = norm.scale.clone()
    for step in range(6):
        x = batch(40, gen, device, dtype, collapsed=step > 0)
        mask = random_mask((40,), gen, device) if step == 2 else None
        expected = expected_step(norm, x, mask)
        y = norm(x, mask=mask)
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=5.0)
        assert_diag_close(norm._diag, expected.diag, dtype, scale=5.0)
        tol = STAT_TOL[dtype]
        torch.testing.assert_close(norm.scale, expected.scale, rtol=tol["rtol"], atol=tol["atol"] * 5.0)
        assert not torch.equal(norm.scale, scale)
        scale = norm.scale.clone()
    assert norm.health()["rel_floor_fraction"] == 0.5  # the collapsed half of the columns


def test_split_ops_track_the_scale(split_backend, device, gen):
    stats = (2, 3)
    norm = RunningNorm(stats, momentum=0.9, min_std_rel=0.3, backend="reference", device=device)  # the oracle
    state = [torch.zeros(stats, dtype=torch.float64, device=device), torch.ones(stats, dtype=torch.float64,
             device=device), torch.zeros(stats, dtype=torch.float64, device=device)]
    scale = torch.ones(stats, dtype=torch.float64, device=device)
    diag = torch.full_like(norm._diag, math.nan)
    for step in range(3):
        x = batch(30, gen, device, collapsed=step > 0)
        xs = x.split((11, 19))
        parts = torch.full((2, 6) + stats, math.nan, dtype=torch.float64, device=device)
        for part, xp in zip(parts, xs):
            BACKENDS[split_backend].batch_moments(xp, None, part)
        hyper = {**op_hyper(norm), "scale": scale, "min_std_rel": 0.3}
        expected = reference.running_norm(x, None, norm.mean, norm.var, norm.count, **{**hyper, "scale": norm.scale})
        ys = []
        for xp in xs:  # every "rank" merges the same parts; only the last one's state is kept here
            fresh = [t.clone() for t in state] + [scale.clone()]
            out = torch.full_like(xp, math.nan)
            BACKENDS[split_backend].merge_normalize(xp, None, parts, *fresh[:3], out, diag,
                                                    **{**hyper, "scale": fresh[3]})
            ys.append(out)
        state, scale = fresh[:3], fresh[3]
        norm(x)
        torch.testing.assert_close(torch.cat(ys), expected.y, **Y_TOL[torch.float32])
        torch.testing.assert_close(scale, expected.scale, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[1], expected.var, rtol=1e-5, atol=1e-6)


def test_floor_binds_exactly_when_it_should(backend, device):
    # scale 2, min_std_rel 0.25: the floor is 0.5. Columns just above and just below it.
    norm = RunningNorm((4,), eps=0.0, min_std=1e-3, min_std_rel=0.25, backend=backend, device=device)
    norm.scale.fill_(2.0)
    stds = torch.tensor([0.5 * (1 + 1e-9), 0.5 * (1 - 1e-9), 0.7, 0.01], dtype=torch.float64, device=device)
    norm.var.copy_(stds.square())
    want = torch.tensor([0.5 * (1 + 1e-9), 0.5, 0.7, 0.5], dtype=torch.float64, device=device)
    torch.testing.assert_close(divisor(norm), want, rtol=1e-14, atol=0)
    # An absolute floor above the relative one wins.
    norm.min_std = 0.6
    torch.testing.assert_close(divisor(norm), torch.tensor([0.6, 0.6, 0.7, 0.6], dtype=torch.float64,
                                                           device=device), rtol=1e-14, atol=0)


def test_collapsed_variance_keeps_the_divisor_up_and_the_scale_decays_no_faster_than_stated(backend, device):
    skip_interpreted(backend)
    # The wealth feature: long-run std 1e3, then the agents converge to a spread of 1.
    momentum, rel = 0.8, 0.1
    w_s = reference.SCALE_WEIGHT_RATIO * (1 - momentum)
    norm = RunningNorm((1,), momentum=momentum, min_std_rel=rel, backend=backend, device=device)
    plain = RunningNorm((1,), momentum=momentum, backend=backend, device=device)
    for _ in range(60):  # count > n_b / w_s: the scale's weight is at its floor w_s
        batch = plus_minus(64, 1e3, device, mean=1e4)[:, None]
        norm(batch)
        plain(batch)
    scale_0 = float(norm.scale)
    assert abs(scale_0 - 1e3) < 1.0
    move = torch.tensor([[1e4 + 100.0]], dtype=torch.float64, device=device)
    for k in range(1, 71):  # the running var falls 0.8x an update, to ~1 after 62
        batch = plus_minus(64, 1.0, device, mean=1e4)[:, None]
        norm(batch)
        plain(batch)
        assert float(norm.scale) >= scale_0 * (1 - w_s) ** (k / 2) * (1 - 1e-12)
    assert float(divisor(norm)) >= rel * float(norm.scale) * (1 - 1e-12)
    # A move of 100 in a feature whose long-run std is 1e3 (the scale still ~500 after 70 updates):
    # 100 / (0.1 * scale) ~ 2, where the plain floor divides by ~1 and clamps.
    y = float(norm.normalize(move))
    assert y == pytest.approx(100.0 / (rel * float(norm.scale)), rel=1e-9) and y < 2.5
    assert float(plain.normalize(move)) == plain.clip


def test_scale_follows_a_step_change_within_stated_updates(backend, device):
    skip_interpreted(backend)
    # README: scale^2 closes 90% of a step in the variance within N = ln(100/9) / -ln(1 - w_s) updates.
    momentum = 0.8
    w_s = reference.SCALE_WEIGHT_RATIO * (1 - momentum)
    n = math.ceil(math.log(100 / 9) / -math.log(1 - w_s))
    norm = RunningNorm((1,), momentum=momentum, min_std_rel=0.1, backend=backend, device=device)
    for _ in range(60):  # count > n_b / w_s: the scale's weight is at its floor w_s
        norm(plus_minus(32, 1.0, device)[:, None])
    before = float(norm.scale) ** 2
    assert abs(before - 1.0) < 1e-3
    trace = []
    for _ in range(n):
        norm(plus_minus(32, 10.0, device)[:, None])
        trace.append(float(norm.scale) ** 2)
    assert abs(trace[-1] - 100.0) <= 0.1 * 99.0
    assert trace[n // 4] < 100.0 - 0.3 * 99.0  # slow on purpose: not there after a quarter of N


def test_small_scale_column_is_normalized_to_unit_std(backend, device, gen):
    # Package velocities of std 1e-3: the absolute floor 1e-2 shrinks them 10x; lowering it, with the
    # relative floor in place, gives them unit std.
    x_std = torch.tensor([1e-3, 1.0, 50.0], dtype=torch.float64)
    shrunk = RunningNorm((3,), backend=backend, device=device)
    lowered = RunningNorm((3,), eps=1e-12, min_std=1e-9, min_std_rel=0.1, backend=backend, device=device)
    for _ in range(20):
        x = (torch.randn((512, 3), generator=gen, dtype=torch.float64) * x_std).float().to(device)
        y_shrunk, y = shrunk(x), lowered(x)
    assert float(y_shrunk[:, 0].double().std()) < 0.15
    torch.testing.assert_close(y.double().std(0).cpu(), torch.ones(3, dtype=torch.float64), rtol=0.1, atol=0)
    assert lowered.health()["rel_floor_fraction"] == 0.0


def test_denormalize_inverts_normalize_with_the_relative_floor(device, gen):
    norm = RunningNorm((3,), min_std_rel=0.5, device=device)
    norm(randn((64, 3), gen, dtype=torch.float64, device=device, scale=4.0))
    norm.var.mul_(1e-4)  # collapsed: the relative floor binds
    x = randn((8, 3), gen, dtype=torch.float64, device=device, scale=0.1)
    torch.testing.assert_close(norm.denormalize(norm.normalize(x)), x, rtol=1e-12, atol=1e-12)
    assert norm.health()["rel_floor_fraction"] == 1.0


def test_state_dicts(device, gen):
    norm = RunningNorm((3,), min_std_rel=0.2, device=device)
    norm(randn((20, 3), gen, device=device, scale=3.0))
    state = norm.state_dict()
    assert torch.equal(state["scale"], norm.scale) and state["_extra_state"]["min_std_rel"] == 0.2
    rebuilt = RunningNorm.from_state_dict(state, device=device)
    assert rebuilt.min_std_rel == 0.2 and torch.equal(rebuilt.scale, norm.scale)
    # Saved before the relative floor existed (or without it): no scale key, none in the extra state.
    plain = RunningNorm((3,), device=device)
    plain(randn((20, 3), gen, device=device, scale=3.0))
    old = plain.state_dict()
    assert "scale" not in old
    del old["_extra_state"]["min_std_rel"]
    with pytest.warns(UserWarning, match=r"min_std_rel: saved None, module 0.2"):
        norm.load_state_dict(old)
    torch.testing.assert_close(norm.scale, plain.var.sqrt(), rtol=0, atol=0)
    # A state with a scale loads into a module without the floor, which keeps it.
    with pytest.warns(UserWarning, match="min_std_rel"):
        plain.load_state_dict(state)
    assert torch.equal(plain.scale, state["scale"])


@pytest.mark.parametrize("value,error,message", [
    (-0.1, ValueError, "min_std_rel must be a finite number >= 0.0 or None, got -0.1"),
    (math.nan, ValueError, "min_std_rel must be a finite number >= 0.0 or None, got nan"),
    (math.inf, ValueError, "min_std_rel must be a finite number"),
    ("0.1", TypeError, "min_std_rel must be a number or None, got str"),
])
def test_bad_min_std_rel_is_rejected(value, error, message):
    with pytest.raises(error, match=message):
        RunningNorm((3,), min_std_rel=value)


@pytest.mark.parametrize("value,message", [(-1.0, "scale holds negative"), (math.nan, "scale holds non-finite")])
def test_corrupted_scale_is_rejected(device, gen, value, message):
    norm = RunningNorm((3,), min_std_rel=0.1, device=device)
    norm(randn((10, 3), gen, device=device))
    state = norm.state_dict()
    state["scale"] = state["scale"].clone()
    state["scale"][0] = value
    target = RunningNorm((3,), min_std_rel=0.1, device=device)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert torch.equal(target.scale, torch.ones(3, dtype=torch.float64, device=device))


def test_monitor_warns_when_most_columns_are_held(backend, device):
    skip_interpreted(backend)
    norm = RunningNorm((4,), momentum=0.9, min_std_rel=0.1, backend=backend, device=device)
    for _ in range(50):
        norm(plus_minus(16, 10.0, device)[:, None].expand(16, 4))
    assert Monitor().update(norm.health(prefix="obs/")) == []
    for _ in range(60):  # var falls 0.9x an update: below (0.1 scale)^2 after ~45
        norm(plus_minus(16, 1e-3, device)[:, None].expand(16, 4))
    alerts = Monitor().update(norm.health(prefix="obs/"))
    assert ("relative_floor_widespread", "obs/rel_floor_fraction", 1.0) in {(a.rule, a.tag, a.value) for a in alerts}
