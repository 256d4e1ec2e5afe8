"""The float64 reference itself, checked against first principles (numpy, closed forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastnorm import reference

HYPER = dict(max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=10.0)


def run(batches, momentum, mask=None, **overrides):
    shape = batches[0].shape[1:]
    mean, var, count = torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64), \
        torch.zeros(shape, dtype=torch.float64)
    result = None
    for x in batches:
        result = reference.running_norm(x, mask, mean, var, count, momentum=momentum, **{**HYPER, **overrides})
        mean, var, count = result.mean, result.var, result.count
    return result


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=8), seed=st.integers(0, 2**31 - 1))
def test_cumulative_mode_is_the_statistics_of_everything_seen(sizes, seed):
    rng = np.random.default_rng(seed)
    data = rng.normal(rng.normal(0, 5), rng.uniform(0.1, 3), size=(sum(sizes), 3))
    batches = list(torch.from_numpy(data).split(sizes))
    result = run(batches, momentum=None)
    np.testing.assert_allclose(result.mean.numpy(), data.mean(0), rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(result.var.numpy(), data.var(0), rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(result.count.numpy(), [len(data)] * 3)


def test_first_update_is_the_batch_exactly_in_ema_mode():
    x = torch.randn(64, 5, dtype=torch.float64) * 3 + 2
    result = run([x], momentum=0.99)
    torch.testing.assert_close(result.mean, x.mean(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.var, x.var(0, unbiased=False), rtol=1e-12, atol=1e-12)


def test_unbiased_batch_var_is_torch_var_and_zero_for_one_sample():
    x = torch.randn(9, 4, dtype=torch.float64) * 2 + 1
    result = run([x], momentum=None, unbiased=True)
    torch.testing.assert_close(result.var, x.var(0), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result.diag[2], x.var(0, unbiased=False), rtol=1e-12, atol=1e-12)  # diag: population
    one = run([x[:1]], momentum=None, unbiased=True)  # torch.var gives NaN here
    assert torch.equal(one.var, torch.zeros(4, dtype=torch.float64)) and torch.equal(one.mean, x[0])


def test_eps_on_std_adds_eps_after_the_square_root():
    var = torch.tensor([0.0, 0.25, 4.0], dtype=torch.float64)
    torch.testing.assert_close(reference.bounded_std(var, 0.1, None, None, eps_on_std=True),
                               torch.tensor([0.1, 0.6, 2.1], dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(reference.bounded_std(var, 0.1, 0.2, 1.0, eps_on_std=True),
                               torch.tensor([0.2, 0.6, 1.0], dtype=torch.float64), rtol=1e-15, atol=0)


def test_ema_weight_bottoms_out_at_one_minus_momentum():
    # After count >> n_b / (1 - momentum) the weight is 1 - momentum: a jump moves the mean by 1%.
    batches = [torch.randn(100, 2, dtype=torch.float64) for _ in range(200)]
    before = run(batches, momentum=0.99)
    jump = torch.full((100, 2), 50.0, dtype=torch.float64)
    after = reference.running_norm(jump, None, before.mean, before.var, before.count, momentum=0.99, **HYPER)
    torch.testing.assert_close((after.mean - before.mean) / (50.0 - before.mean),
                               torch.full((2,), 0.01, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_ema_variance_of_stationary_data_is_not_shrunk():
    # The seed's Fix 1 divides an EMA of M2 by a capped count and shrinks the variance; the
    # contract's EMA of (var, mean) with the between-batch term stays unbiased.
    gen = torch.Generator().manual_seed(1234)
    batches = [torch.randn(256, 4, generator=gen, dtype=torch.float64) * 2.0 + 1.0 for _ in range(2000)]
    result = run(batches, momentum=0.99)
    assert ((result.var - 4.0).abs() < 0.25).all(), result.var
    # The seed's sketch on the same data, to show what the contract avoids.
    m2 = mean = None
    count = torch.zeros(4, dtype=torch.float64)
    for x in batches:
        m_b, m2_b = x.mean(0), ((x - x.mean(0)) ** 2).sum(0)
        if mean is None:
            mean, m2, count = m_b, m2_b, torch.full((4,), float(len(x)), dtype=torch.float64)
        else:
            mean, m2 = 0.99 * mean + 0.01 * m_b, 0.99 * m2 + 0.01 * m2_b
            count = (count + 1).clamp(max=1000)
    sketch_var = m2 / count
    assert (sketch_var < 2.0).all(), sketch_var  # a 4.0 variance reported as ~1.0


def test_masked_and_non_finite_entries_are_excluded():
    x = torch.tensor([[1.0, 2.0], [3.0, float("nan")], [100.0, 4.0], [5.0, float("inf")]], dtype=torch.float64)
    mask = torch.tensor([True, True, False, True])
    result = run([x], momentum=None, mask=mask)
    torch.testing.assert_close(result.mean, torch.tensor([3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(result.var, torch.tensor([8 / 3, 0.0], dtype=torch.float64))
    assert result.count.tolist() == [3.0, 1.0]
    assert result.diag[3].tolist() == [0.0, 2.0]  # the masked-out row does not count as non-finite


def test_output_formula_bounds():
    y = reference.normalize(torch.tensor([[0.0, 1e-3, 100.0, -float("inf"), float("nan")]]),
                            torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64),
                            eps=0.0, min_std=1e-2, max_std=None, clip=10.0)
    assert y[0, :4].tolist() == [0.0, pytest.approx(0.1), 10.0, -10.0] and torch.isnan(y[0, 4])
    y = reference.normalize(torch.tensor([[100.0]]), torch.zeros(1, dtype=torch.float64),
                            torch.full((1,), 1e6, dtype=torch.float64), eps=0.0, min_std=None, max_std=10.0, clip=None)
    assert y.item() == pytest.approx(10.0)


@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 30), min_size=1, max_size=6), seed=st.integers(0, 2**31 - 1))
def test_merged_moment_tables_are_the_concatenated_batch(sizes, seed):
    # Parts of any sizes, empty ones included, merged in order: the table of the whole batch.
    rng = np.random.default_rng(seed)
    data = rng.normal(rng.normal(0, 50), rng.uniform(0.1, 3), size=(sum(sizes), 2))
    parts = torch.stack([reference.batch_moment_table(part, None, torch.Size([2]))
                         for part in torch.from_numpy(data).split(sizes)])
    count, mean, m2, nonfinite, lo, hi = reference.merge_moment_tables(parts).numpy()
    np.testing.assert_array_equal(count, [len(data)] * 2)
    np.testing.assert_array_equal(nonfinite, [0, 0])
    if len(data) == 0:
        np.testing.assert_array_equal(np.stack([mean, m2, lo, hi]), [[0, 0], [0, 0], [np.inf] * 2, [-np.inf] * 2])
        return
    np.testing.assert_allclose(mean, data.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m2, data.var(0) * len(data), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(np.stack([lo, hi]), np.stack([data.min(0), data.max(0)]))
