"""RunningNorm(normalize_with="previous") on every backend under test: y from the statistics before
the batch (the batch's own in columns without a history), the statistics updated as in the default
mode; the split ops of sync=True likewise."""

from __future__ import annotations

import pytest
import torch

from fastnorm import RunningNorm, reference
from fastnorm.backends import BACKENDS
from fastnorm.reference import MOMENT_ROWS
from helpers import DTYPES, Y_TOL, assert_diag_close, assert_stats_close, expected_step, op_hyper, random_mask, randn

SHAPES = [((37,), (5,)), ((64, 3), (7, 11)), ((300,), (257,)), ((1031,), (1,)), ((2, 129), (4, 3))]


def poisoned_like(x):
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("batch,stats", SHAPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "rows", "agents"])
def test_matches_reference(backend, device, gen, dtype, batch, stats, mask_kind):
    norm = RunningNorm(stats, backend=backend, device=device, normalize_with="previous", clip=3.0)
    for _ in range(4):
        x = randn(batch + stats, gen, dtype=dtype, device=device, mean=2.0, scale=3.0)
        mask = {"none": None, "rows": random_mask(batch, gen, device),
                "agents": random_mask(batch + stats[:1], gen, device, p=0.3)}[mask_kind]
        expected = expected_step(norm, x, mask)
        y = norm(x, mask=mask, out=poisoned_like(x))
        torch.testing.assert_close(y, expected.y, **Y_TOL[dtype])
        assert_stats_close(norm, expected, dtype, scale=3.0)
        assert_diag_close(norm._diag, expected.diag, dtype, scale=3.0)


def test_y_is_the_normalization_before_the_update(backend, device, gen):
    norm = RunningNorm((4, 6), backend=backend, device=device, normalize_with="previous")
    norm(randn((50, 4, 6), gen, device=device, mean=1.0, scale=2.0))
    x = randn((80, 4, 6), gen, device=device, mean=-3.0, scale=0.5)
    before = norm.normalize(x)
    mean = norm.mean.clone()
    y = norm(x)
    torch.testing.assert_close(y, before, rtol=0, atol=0)
    assert not torch.equal(norm.mean, mean)  # and the statistics moved


def test_first_step_is_normalized_with_the_batch_and_not_raw(backend, device, gen):
    x = randn((256, 3, 4), gen, device=device, mean=50.0, scale=10.0)
    previous = RunningNorm((3, 4), backend=backend, device=device, normalize_with="previous")(x)
    updated = RunningNorm((3, 4), backend=backend, device=device)(x)
    torch.testing.assert_close(previous, updated, rtol=0, atol=0)
    rows = previous.reshape(-1, 12)
    torch.testing.assert_close(rows.mean(0), torch.zeros(12, device=device), rtol=0, atol=1e-4)
    torch.testing.assert_close(rows.std(0, unbiased=False), torch.ones(12, device=device), rtol=0, atol=1e-3)


def test_columns_without_history_use_the_batch(backend, device, gen):
    # Agents 0 and 2 only in step 1: in step 2, agents 1 and 3 (count 0) are normalized with
    # their batch, the others with the statistics before it.
    norm = RunningNorm((4, 5), backend=backend, device=device, normalize_with="previous")
    first = torch.tensor([True, False, True, False], device=device).expand(32, 4)
    norm(randn((32, 4, 5), gen, device=device, mean=5.0), mask=first)
    assert torch.equal(norm.count[:, 0] > 0, first[0])
    x = randn((64, 4, 5), gen, device=device, mean=-7.0, scale=4.0)
    before = norm.normalize(x)
    y = norm(x)
    torch.testing.assert_close(y[:, [0, 2]], before[:, [0, 2]], rtol=0, atol=0)
    own = (x[:, [1, 3]].double() - x[:, [1, 3]].double().mean(0)) / x[:, [1, 3]].double().std(0, unbiased=False)
    torch.testing.assert_close(y[:, [1, 3]].double(), own.clamp(-10, 10), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("options", [dict(min_std_rel=0.3, min_std=1e-3), dict(eps_placement="std", eps=0.3),
                                     dict(batch_var="unbiased", momentum=None)], ids=str)
def test_options(backend, device, gen, options):
    norm = RunningNorm((3, 7), backend=backend, device=device, normalize_with="previous", **options)
    for step in range(4):
        x = randn((40, 3, 7), gen, device=device, mean=1.0, scale=0.01 if step == 3 else 2.0)
        expected = expected_step(norm, x)
        y = norm(x)
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
        assert_stats_close(norm, expected, torch.float32, scale=2.0)
        if "min_std_rel" in options:
            torch.testing.assert_close(norm.scale, expected.scale, rtol=2e-6, atol=1e-9)


def test_non_finite_values_stay_out_and_clip_counts(backend, device, gen):
    norm = RunningNorm((6,), backend=backend, device=device, normalize_with="previous", clip=2.0)
    norm(randn((100, 6), gen, device=device))
    x = randn((100, 6), gen, device=device, scale=3.0)
    x[3, 1], x[7, 2], x[9, 4] = float("nan"), float("inf"), -float("inf")
    expected = expected_step(norm, x)
    y = norm(x)
    assert torch.isnan(y[3, 1]) and y[7, 2] == 2.0 and y[9, 4] == -2.0
    assert torch.isfinite(norm.mean).all() and torch.isfinite(norm.var).all()
    assert_diag_close(norm._diag, expected.diag, torch.float32)
    assert norm._diag[4].sum() > 0  # some entries clipped, counted with the previous statistics


def test_update_and_eval_calls_are_those_of_the_default_mode(backend, device, gen):
    x = randn((70, 5), gen, device=device, mean=3.0)
    a = RunningNorm((5,), backend=backend, device=device, normalize_with="previous")
    b = RunningNorm((5,), backend=backend, device=device)
    for norm in (a, b):
        norm.update(x)
        norm.update(x * 2)
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    torch.testing.assert_close(a(x, update=False), b(x, update=False), rtol=0, atol=0)


def test_state_dict_round_trip_keeps_the_mode(device):
    norm = RunningNorm((3,), device=device, normalize_with="previous")
    restored = RunningNorm.from_state_dict(norm.state_dict())
    assert restored.normalize_with == "previous"
    old = norm.state_dict()
    del old["_extra_state"]["normalize_with"]  # a state saved before the option existed
    assert RunningNorm.from_state_dict({**old, "_extra_state": old["_extra_state"]}).normalize_with == "updated"


def test_bad_normalize_with_is_rejected():
    with pytest.raises(ValueError, match="normalize_with must be one of 'updated', 'previous', got 'before'"):
        RunningNorm((3,), normalize_with="before")


def test_split_ops_match_running_norm(split_backend, device, gen):
    # merge_normalize with previous over two ranks' moment tables: what running_norm gives for the
    # concatenated batch.
    norm = RunningNorm((4, 3), backend=split_backend, device=device, normalize_with="previous")
    norm(randn((20, 4, 3), gen, device=device), mask=torch.tensor([True, True, False, True], device=device)
         .expand(20, 4))
    backend = BACKENDS[split_backend]
    a, b = randn((30, 4, 3), gen, device=device, mean=2.0), randn((17, 4, 3), gen, device=device, scale=3.0)
    parts = torch.empty((2, len(MOMENT_ROWS), 4, 3), dtype=torch.float64, device=device)
    backend.batch_moments(a, None, parts[0])
    backend.batch_moments(b, None, parts[1])
    expected = reference.running_norm(torch.cat([a, b]), None, norm.mean, norm.var, norm.count, **op_hyper(norm))
    out = poisoned_like(a)
    state = [norm.mean.clone(), norm.var.clone(), norm.count.clone()]
    diag = torch.empty_like(norm._diag)
    steps = torch.zeros((), dtype=torch.int64, device=device)
    backend.merge_normalize(a, None, parts, *state, out, diag, steps=steps, **op_hyper(norm))
    torch.testing.assert_close(out, expected.y[:30], **Y_TOL[torch.float32])
    torch.testing.assert_close(state[0], expected.mean, rtol=2e-6, atol=2e-6)
    assert int(steps) == 1


@pytest.mark.parametrize("first_step", [True, False])
def test_in_place(backend, device, gen, first_step):
    norm = RunningNorm((4, 6), backend=backend, device=device, normalize_with="previous")
    twin = RunningNorm((4, 6), backend=backend, device=device, normalize_with="previous")
    if not first_step:
        history = randn((300, 4, 6), gen, device=device, mean=3.0)
        norm(history)
        twin(history)
    x = randn((300, 4, 6), gen, device=device, mean=-2.0, scale=2.0)
    expected = twin(x.clone())
    y = norm(x, out=x)
    assert y is x
    torch.testing.assert_close(x, expected, rtol=0, atol=0)
    torch.testing.assert_close(norm.mean, twin.mean, rtol=0, atol=0)
    torch.testing.assert_close(norm.var, twin.var, rtol=0, atol=0)
