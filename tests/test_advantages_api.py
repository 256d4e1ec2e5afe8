"""normalize_advantages' contract around the math: bad input, dims, masks, the stats and their
logging names, backend choice."""

from __future__ import annotations

import math

import pytest
import torch

import fastnorm
from fastnorm import advantages_reference, normalize_advantages
from helpers import random_mask, randn

BAD_CALLS = [
    (lambda d, g: dict(adv=[1.0, 2.0]), TypeError, r"adv must be a torch.Tensor, got list"),
    (lambda d, g: dict(adv=torch.ones(8, dtype=torch.int64, device=d)), TypeError, r"adv must be float16.*int64"),
    (lambda d, g: dict(mask=torch.ones(8, device=d)), TypeError, r"mask must be a bool tensor, got torch.float32"),
    (lambda d, g: dict(mask=torch.ones(7, dtype=torch.bool, device=d)), ValueError,
     r"mask must have a prefix of adv's shape \(8, 3\), got \(7,\)"),
    (lambda d, g: dict(mask=torch.ones(8, 3, 1, dtype=torch.bool, device=d)), ValueError, r"mask must have a prefix"),
    (lambda d, g: dict(mask=torch.ones(8, dtype=torch.bool, device="meta")), ValueError, r"mask is on meta"),
    (lambda d, g: dict(dim=2), ValueError, r"dim must be in \[-2, 1\] for adv with 2 dims, got 2"),
    (lambda d, g: dict(dim=(0, -2)), ValueError, r"dim names a dimension twice"),
    (lambda d, g: dict(dim=1.0), TypeError, r"dim must be None, an int or a tuple of ints, got 1.0"),
    (lambda d, g: dict(dim=True), TypeError, r"dim must be None, an int or a tuple of ints"),
    (lambda d, g: dict(min_std=0.0), ValueError, r"min_std must be a finite number > 0, got 0.0"),
    (lambda d, g: dict(min_std=-1e-4), ValueError, r"min_std must be a finite number > 0"),
    (lambda d, g: dict(min_std=math.nan), ValueError, r"min_std must be a finite number > 0"),
    (lambda d, g: dict(min_std=None), ValueError, r"min_std must be a finite number > 0, got None"),
    (lambda d, g: dict(unbiased=1), TypeError, r"unbiased must be a bool, got int"),
    (lambda d, g: dict(sync=1), TypeError, r"sync must be a bool, got int"),
    (lambda d, g: dict(process_group=object()), ValueError, r"process_group is only used with sync=True"),
    (lambda d, g: dict(backend="gpu"), ValueError, r"backend must be one of"),
    (lambda d, g: dict(out=torch.full((8, 4), 1.5, device=d)), ValueError, r"out must match adv \(shape \(8, 3\)"),
    (lambda d, g: dict(out=torch.full((8, 3), 1.5, dtype=torch.float64, device=d)), ValueError, r"out must match adv"),
]


@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_raises_and_writes_nothing(adv_backend, device, gen, case):
    make, error, message = BAD_CALLS[case]
    adv = randn((8, 3), gen, device=device)
    before = adv.clone()
    kwargs = {"backend": adv_backend, **make(device, gen)}
    adv = kwargs.pop("adv", adv)
    out = kwargs.setdefault("out", torch.full((8, 3), math.nan, device=device))
    out_before = out.clone()
    with pytest.raises(error, match=message):
        normalize_advantages(adv, **kwargs)
    if isinstance(adv, torch.Tensor) and adv.dtype == before.dtype:
        assert torch.equal(adv, before)
    torch.testing.assert_close(out, out_before, rtol=0, atol=0, equal_nan=True)


def test_a_backend_that_cannot_run_says_why(device, gen):
    other = "cpu" if device.type != "cpu" else "cuda"
    with pytest.raises(RuntimeError, match=f"fastnorm backend '{other}' cannot run this input"):
        normalize_advantages(randn((8, 3), gen, device=device), backend=other)


def test_sync_needs_an_initialized_process_group(device, gen):
    adv = randn((16, 3), gen, device=device)
    out = torch.full_like(adv, math.nan)
    with pytest.raises(RuntimeError, match=r"normalize_advantages\(sync=True\) needs torch.distributed to be "
                                           r"initialized"):
        normalize_advantages(adv, dim=0, sync=True, out=out)
    assert bool(out.isnan().all())  # nothing written


@pytest.mark.parametrize("dim,same_as", [(-1, 2), ((), None), ([1, 0], (0, 1)), ((-3, 2), (0, 2))], ids=str)
def test_dims_follow_torch_std(adv_backend, device, gen, dim, same_as):
    adv = randn((6, 5, 4), gen, device=device)
    y, stats = normalize_advantages(adv, dim=dim, backend=adv_backend)
    y_same, stats_same = normalize_advantages(adv, dim=same_as, backend=adv_backend)
    assert torch.equal(y, y_same) and torch.equal(stats.std_raw, stats_same.std_raw)
    torch.testing.assert_close(stats.std_raw, adv.double().std(dim=dim), rtol=1e-6, atol=0)


def test_zero_dim_adv(adv_backend, device):
    adv = torch.tensor(3.5, device=device)
    for dim in (None, 0, -1):
        y, stats = normalize_advantages(adv, dim=dim, backend=adv_backend)
        assert y.shape == () and float(y) == 0 and float(stats.count) == 1 and stats.mean.shape == ()


def test_stats_shapes_dtypes_and_device(adv_backend, device, gen):
    adv = randn((10, 4, 3), gen, device=device, dtype=torch.bfloat16)
    for dim, groups in [(None, ()), (0, (4, 3)), ((0, 2), (4,)), (1, (10, 3)), (2, (10, 4))]:
        y, stats = normalize_advantages(adv, dim=dim, backend=adv_backend)
        assert y.dtype == torch.bfloat16 and y.shape == adv.shape and y.is_contiguous()
        for name, t in zip(stats._fields, stats):
            assert t.shape == groups and t.device.type == device.type, name
            assert t.dtype == (torch.bool if name == "std_below_floor" else torch.float64), name


def test_mask_is_broadcast_over_the_trailing_dims(adv_backend, device, gen):
    adv = randn((12, 5, 3), gen, device=device)
    mask = random_mask((12, 5), gen, device)
    full = mask[:, :, None].expand(12, 5, 3).contiguous()
    for dim in (None, 0, (0, 2), 1):
        y, stats = normalize_advantages(adv, mask=mask, dim=dim, backend=adv_backend)
        y_full, stats_full = normalize_advantages(adv, mask=full, dim=dim, backend=adv_backend)
        torch.testing.assert_close(y, y_full, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(stats.std_raw, stats_full.std_raw, rtol=1e-9, atol=0)


def test_masked_entries_are_normalized_but_not_counted(adv_backend, device, gen):
    adv = randn((40, 3), gen, device=device)
    adv[:10] += 1000.0  # inactive agents hold garbage
    mask = torch.ones(40, dtype=torch.bool, device=device)
    mask[:10] = False
    y, stats = normalize_advantages(adv, mask=mask, backend=adv_backend)
    torch.testing.assert_close(stats.mean, adv[10:].double().mean(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.std_raw, adv[10:].double().std(), rtol=1e-6, atol=0)
    assert float(stats.count) == 90 and (y[:10] > 100).all()  # normalized with the active entries' statistics
    assert float(stats.norm_max_abs) < 10  # over the selected entries only


def test_as_dict_uses_the_seeds_metric_names(adv_backend, device, gen):
    adv = randn((64,), gen, device=device)
    _, stats = normalize_advantages(adv, backend=adv_backend)
    logged = stats.as_dict()
    assert list(logged) == ["train/advantages_mean", "train/advantages_std_raw", "train/advantages_count",
                            "train/advantages_norm_max_abs", "train/advantages_std_below_floor"]
    assert all(isinstance(v, float) for v in logged.values())
    assert logged["train/advantages_std_raw"] == float(stats.std_raw) and logged["train/advantages_count"] == 64.0
    assert logged["train/advantages_std_below_floor"] == 0.0
    assert list(stats.as_dict(prefix="adv/")) == ["adv/mean", "adv/std_raw", "adv/count", "adv/norm_max_abs",
                                                  "adv/std_below_floor"]


def test_as_dict_summarizes_groups(adv_backend, device, gen):
    adv = randn((50, 4), gen, device=device)
    adv[:, 3] = 0.25  # a constant group: std 0, below the floor
    mask = random_mask((50, 4), gen, device)
    _, stats = normalize_advantages(adv, mask=mask, dim=0, backend=adv_backend)
    logged = stats.as_dict()
    selected = adv.double()[mask]
    assert logged["train/advantages_count"] == float(mask.sum())
    assert math.isclose(logged["train/advantages_mean"], float(selected.mean()), rel_tol=2e-6, abs_tol=2e-6)
    assert logged["train/advantages_std_raw"] == 0.0
    assert logged["train/advantages_norm_max_abs"] == float(stats.norm_max_abs.max())
    assert logged["train/advantages_std_below_floor"] == 0.25


def test_reference_backend_matches_the_reference_module(device, gen):
    adv = randn((30, 4), gen, device=device)
    mask = random_mask((30,), gen, device)
    y, stats = normalize_advantages(adv, mask=mask, dim=0, backend="reference")
    ref = advantages_reference.normalize_advantages(adv, mask, (0,))
    assert torch.equal(y, ref.y) and torch.equal(stats.std_raw, ref.std_raw) and torch.equal(stats.count, ref.count)


def test_exported():
    assert fastnorm.normalize_advantages is normalize_advantages
    assert "normalize_advantages" in fastnorm.__all__ and "AdvantageStats" in fastnorm.__all__
