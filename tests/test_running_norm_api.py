"""RunningNorm's contract around the math: bad input, state dicts, hyper-parameters."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch

import fastnorm
from fastnorm import RunningNorm
from helpers import randn


def snapshot(norm):
    return {k: v.clone() for k, v in list(norm.state_dict().items()) + [("_diag", norm._diag)] if torch.is_tensor(v)}


def assert_unchanged(norm, before):
    after = snapshot(norm)
    for k, v in before.items():
        assert torch.equal(v, after[k]) or (torch.isnan(v).all() and torch.isnan(after[k]).all()), k


BAD_CALLS = [
    (lambda d, g: dict(x=randn((8, 3, 5), g, device=d)), ValueError, r"x must have shape \(\*batch, 3, 4\)"),
    (lambda d, g: dict(x=randn((4,), g, device=d)), ValueError, r"x must have shape"),
    (lambda d, g: dict(x=torch.ones(8, 3, 4, dtype=torch.int64, device=d)), TypeError, r"x must be float16"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d).to(torch.complex64)), TypeError, r"x must be float16"),
    (lambda d, g: dict(x=[[1.0] * 4] * 3), TypeError, r"x must be a torch.Tensor"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device="meta")), ValueError, r"x is on meta"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d), mask=torch.ones(8, device=d)), TypeError,
     r"mask must be a bool tensor, got torch.float32"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d), mask=torch.ones(7, dtype=torch.bool, device=d)), ValueError,
     r"mask must have a prefix of x's shape \(8, 3, 4\)"),
    (lambda d, g: dict(x=randn((2, 8, 3, 4), g, device=d), mask=torch.ones(2, dtype=torch.bool, device=d)),
     ValueError, r"at least 2 dims long"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d), mask=torch.ones(8, dtype=torch.bool, device="meta")),
     ValueError, r"mask is on meta"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d), out=torch.empty(8, 3, 5, device=d)), ValueError,
     r"out must match x"),
    (lambda d, g: dict(x=randn((8, 3, 4), g, device=d), out=torch.empty(8, 3, 4, dtype=torch.float64, device=d)),
     ValueError, r"out must match x"),
]


@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_bad_input_raises_and_changes_nothing(backend, device, gen, case, update):
    make, error, message = BAD_CALLS[case]
    norm = RunningNorm((3, 4), backend=backend, device=device)
    norm(randn((16, 3, 4), gen, device=device))
    before = snapshot(norm)
    with pytest.raises(error, match=message):
        norm(update=update, **make(device, gen))
    assert_unchanged(norm, before)


def test_bad_update_call_changes_nothing(backend, device, gen):
    norm = RunningNorm((3,), backend=backend, device=device)
    before = snapshot(norm)
    with pytest.raises(ValueError, match="mask must have a prefix"):
        norm.update(randn((8, 3), gen, device=device), mask=torch.ones(9, dtype=torch.bool, device=device))
    assert_unchanged(norm, before)


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(momentum=1.5), ValueError, "momentum must be in"),
    (dict(momentum=-0.1), ValueError, "momentum must be"),
    (dict(momentum="0.9"), TypeError, "momentum must be a number"),
    (dict(max_count=0), ValueError, "max_count must be"),
    (dict(eps=-1.0), ValueError, "eps must be"),
    (dict(eps=None), TypeError, "eps must be"),
    (dict(min_std=math.nan), ValueError, "min_std must be"),
    (dict(min_std=1.0, max_std=0.5), ValueError, r"min_std \(1.0\) must not exceed max_std"),
    (dict(clip=0.0), ValueError, "clip must be"),
    (dict(warmup=-1), ValueError, "warmup must be"),
    (dict(warmup=1.5), ValueError, "warmup must be"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(shape=(3, 0)), ValueError, "shape must be positive ints"),
    (dict(eps_placement="sqrt"), ValueError, r"eps_placement must be one of 'var', 'std', got 'sqrt'"),
    (dict(eps_placement=None), ValueError, r"eps_placement must be one of 'var', 'std', got None"),
    (dict(batch_var="sample"), ValueError, r"batch_var must be one of 'population', 'unbiased', got 'sample'"),
    (dict(batch_var=True), ValueError, r"batch_var must be one of 'population', 'unbiased', got True"),
])
def test_bad_hyper_parameters(kwargs, error, message):
    kwargs = dict(kwargs)
    shape = kwargs.pop("shape", (3,))
    with pytest.raises(error, match=message):
        RunningNorm(shape, **kwargs)


def test_explicit_backend_that_cannot_run_lists_its_reasons(gen):
    reasons = fastnorm.backends()
    assert set(reasons) >= {"cpu", "cuda", "reference"} and reasons["reference"] == []
    norm = RunningNorm((3,), backend="cuda")
    x = randn((4, 3), gen)
    with pytest.raises(RuntimeError, match=r"backend 'cuda' cannot run this input: .*x is on cpu"):
        norm(x)


def test_state_round_trip(backend, device, gen):
    norm = RunningNorm((2, 3), momentum=0.9, max_count=1e4, clip=4.0, warmup=2, backend=backend, device=device)
    for _ in range(3):
        norm(randn((20, 2, 3), gen, device=device, mean=1.0))
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert state["_extra_state"]["format_version"] == 1
    assert state["_extra_state"]["momentum"] == 0.9 and state["_extra_state"]["clip"] == 4.0
    restored = RunningNorm((2, 3), momentum=0.9, max_count=1e4, clip=4.0, warmup=2, backend=backend, device=device)
    restored(randn((5, 2, 3), gen, device=device))  # diagnostics of a batch the loaded state never saw
    restored.load_state_dict(state)
    assert torch.isnan(restored._diag).all()
    for name in ("mean", "var", "count", "steps"):
        assert torch.equal(getattr(restored, name), getattr(norm, name)), name
    assert bool(restored.ready)
    x = randn((20, 2, 3), gen, device=device)
    assert torch.equal(restored(x), norm(x))
    rebuilt = RunningNorm.from_state_dict(state, backend=backend, device=device)
    assert rebuilt.hyper_parameters() == norm.hyper_parameters()
    assert torch.equal(rebuilt.mean, state["mean"]) and torch.equal(rebuilt.count, state["count"])


@pytest.mark.parametrize("key,value,message", [
    ("mean", math.nan, "mean holds non-finite"),
    ("var", math.inf, "var holds non-finite"),
    ("var", -1.0, "var holds negative"),
    ("count", -3.0, "count holds negative"),
])
def test_load_rejects_corrupted_statistics(device, gen, key, value, message):
    norm = RunningNorm((3,), device=device)
    norm(randn((10, 3), gen, device=device))
    state = norm.state_dict()
    state[key] = state[key].clone()
    state[key][1] = value
    target = RunningNorm((3,), device=device)
    before = snapshot(target)
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(state)
    assert_unchanged(target, before)


def test_load_rejects_other_shapes_and_versions(device):
    state = RunningNorm((3,), device=device).state_dict()
    with pytest.raises(ValueError, match=r"has shape \(3,\), the module has \(4,\)"):
        RunningNorm((4,), device=device).load_state_dict(state)
    state["_extra_state"] = dict(state["_extra_state"], format_version=99)
    with pytest.raises(ValueError, match="format_version 99"):
        RunningNorm((3,), device=device).load_state_dict(state)


def test_load_with_other_hyper_parameters_warns(device):
    state = RunningNorm((3,), clip=5.0, device=device).state_dict()
    norm = RunningNorm((3,), clip=10.0, device=device)
    with pytest.warns(UserWarning, match=r"clip: saved 5.0, module 10.0"):
        norm.load_state_dict(state)
    assert norm.clip == 10.0


def test_moves_with_the_module_and_keeps_float64(device):
    norm = RunningNorm((3,)).to(device)
    for buf in (norm.mean, norm.var, norm.count, norm._diag):
        assert buf.dtype == torch.float64 and buf.device.type == device.type
    norm.mean.fill_(1 / 3)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), norm).to(device).half()  # a model-wide cast
    assert net[0].weight.dtype == torch.float16
    assert norm.mean.dtype == torch.float64 and norm.steps.dtype == torch.int64
    assert norm.mean[0].item() == 1 / 3  # not rounded through float16


def test_repr_names_the_hyper_parameters():
    text = repr(RunningNorm((2, 3), momentum=None))
    assert "shape=(2, 3)" in text and "momentum=None" in text and "clip=10.0" in text


def test_options_are_hyper_parameters_in_the_state_and_repr(device, gen):
    norm = RunningNorm((3,), eps_placement="std", batch_var="unbiased", momentum=None, device=device)
    norm(randn((10, 3), gen, device=device))
    assert norm.hyper_parameters()["eps_placement"] == "std" and norm.hyper_parameters()["batch_var"] == "unbiased"
    text = repr(norm)
    assert "eps_placement=std" in text and "batch_var=unbiased" in text
    state = norm.state_dict()
    assert state["_extra_state"]["eps_placement"] == "std" and state["_extra_state"]["batch_var"] == "unbiased"
    rebuilt = RunningNorm.from_state_dict(state, device=device)
    assert rebuilt.hyper_parameters() == norm.hyper_parameters()
    x = randn((10, 3), gen, device=device)
    assert torch.equal(rebuilt.normalize(x), norm.normalize(x))
    with pytest.warns(UserWarning, match=r"eps_placement: saved 'std', module 'var'"):
        RunningNorm((3,), batch_var="unbiased", momentum=None, device=device).load_state_dict(state)


def test_state_saved_before_the_options_loads_with_their_defaults(device, gen):
    norm = RunningNorm((3,), device=device)
    norm(randn((10, 3), gen, device=device))
    state = norm.state_dict()
    for key in ("eps_placement", "batch_var"):  # what fastnorm wrote before these options existed
        del state["_extra_state"][key]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the defaults match: no warning
        RunningNorm((3,), device=device).load_state_dict(state)
    with pytest.warns(UserWarning, match=r"eps_placement: saved 'var', module 'std'"):
        RunningNorm((3,), eps_placement="std", device=device).load_state_dict(state)
    rebuilt = RunningNorm.from_state_dict(state, device=device)
    assert rebuilt.eps_placement == "var" and rebuilt.batch_var == "population"
    assert torch.equal(rebuilt.var, norm.var)


def test_denormalize_inverts_normalize_with_eps_on_the_std(device, gen):
    norm = RunningNorm((4,), eps=0.5, eps_placement="std", min_std=None, device=device)
    norm(randn((50, 4), gen, dtype=torch.float64, device=device, scale=2.0))
    x = randn((7, 4), gen, dtype=torch.float64, device=device)
    y = norm.normalize(x)
    torch.testing.assert_close(y, (x - norm.mean) / (norm.var.sqrt() + 0.5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.denormalize(y), x, rtol=1e-12, atol=1e-12)


def test_floor_fraction_reads_the_divisor_of_the_placement(device, gen):
    # std 0.1: sqrt(0.01 + 0.02) = 0.17 is above a 0.15 floor, sqrt(0.01) + 0.02 = 0.12 below it.
    x = torch.tensor([[-0.1], [0.1]], dtype=torch.float64, device=device).expand(2, 4)
    on_var = RunningNorm((4,), eps=0.02, min_std=0.15, device=device)
    on_std = RunningNorm((4,), eps=0.02, min_std=0.15, eps_placement="std", device=device)
    on_var(x)
    on_std(x)
    assert on_var.health()["floor_fraction"] == 0.0 and on_std.health()["floor_fraction"] == 1.0
