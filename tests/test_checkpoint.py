"""fastnorm.checkpoint: assert_finite names the first bad tensor; save refuses NaN and writes
atomically, so the previous checkpoint survives."""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from fastnorm import RunningNorm, checkpoint
from fastnorm.checkpoint import NonFiniteError
from helpers import randn


def model_and_optimizer(gen):
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=gen)))
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 2))
    optim = torch.optim.Adam(model.parameters())
    model(torch.randn(4, 5)).square().sum().backward()
    optim.step()
    return model, optim


def test_finite_states_pass(gen):
    model, optim = model_and_optimizer(gen)
    norm = RunningNorm((3,))
    norm(randn((8, 3), gen))
    checkpoint.assert_finite(model)
    checkpoint.assert_finite(optim)
    checkpoint.assert_finite({"model": model.state_dict(), "optim": optim.state_dict(), "norm": norm.state_dict(),
                              "step": 1099, "lr": 3e-4, "ids": torch.arange(3), "empty": torch.empty(0)})


def test_names_the_bad_parameter_of_a_module(gen):
    model, _ = model_and_optimizer(gen)
    with torch.no_grad():
        model[2].weight[1, 3] = math.nan
        model[2].weight[0, 0] = math.inf
    with pytest.raises(NonFiniteError, match=r"state\['2.weight'\] holds 2 non-finite of 14 values "
                                             r"\(shape \(2, 7\), dtype torch.float32; first at index \(0, 0\): inf\)") as info:
        checkpoint.assert_finite(model)
    assert info.value.path == "state['2.weight']"


def test_names_the_bad_optimizer_state(gen):
    _, optim = model_and_optimizer(gen)
    first = optim.param_groups[0]["params"][0]
    optim.state[first]["exp_avg"][2, 1] = math.nan
    with pytest.raises(NonFiniteError, match=r"optim\['state'\]\[0\]\['exp_avg'\] holds 1 non-finite"):
        checkpoint.assert_finite(optim, name="optim")


def test_reports_the_first_bad_entry_in_order(gen):
    model, optim = model_and_optimizer(gen)
    with torch.no_grad():
        model[0].bias[0] = math.nan
        model[2].bias[1] = -math.inf
    state = {"model": model.state_dict(), "optim": optim.state_dict()}
    with pytest.raises(NonFiniteError, match=r"^state\['model'\]\['0.bias'\] holds 1 non-finite"):
        checkpoint.assert_finite(state)
    state = {"lr": math.nan, "model": model.state_dict()}
    with pytest.raises(NonFiniteError, match=r"^state\['lr'\] = nan is not finite"):
        checkpoint.assert_finite(state)
    nested = {"runs": [{"x": torch.ones(2)}, (torch.ones(1), torch.tensor([1.0, math.nan], dtype=torch.float64))]}
    with pytest.raises(NonFiniteError, match=r"^state\['runs'\]\[1\]\[1\] holds 1 non-finite .* first at index \(1,\)"):
        checkpoint.assert_finite(nested)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_checks_every_float_dtype(dtype):
    t = torch.ones(4, dtype=dtype)
    t[3] = math.inf
    with pytest.raises(NonFiniteError, match=r"state\['t'\] holds 1 non-finite"):
        checkpoint.assert_finite({"t": t})


def test_save_round_trips(tmp_path, gen):
    model, optim = model_and_optimizer(gen)
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"model": model.state_dict(), "optim": optim.state_dict()}, path)
    loaded = torch.load(path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded["model"][key], value, rtol=0, atol=0)
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_refuses_nan_and_keeps_the_last_good_checkpoint(tmp_path, gen):
    model, _ = model_and_optimizer(gen)
    path = tmp_path / "ckpt.pt"
    checkpoint.save(model.state_dict(), str(path))
    good = path.read_bytes()
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(NonFiniteError, match=r"obj\['0.weight'\] holds 1 non-finite"):
        checkpoint.save(model.state_dict(), path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_a_failed_write_keeps_the_last_good_checkpoint(tmp_path, gen, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save({"w": torch.ones(3)}, path)
    good = path.read_bytes()

    def crash_mid_write(obj, f, **kwargs):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save({"w": torch.zeros(3)}, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_save_creates_files_as_open_would(tmp_path):
    checkpoint.save({"w": torch.ones(1)}, tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes(b"")
    assert (tmp_path / "a.pt").stat().st_mode == (tmp_path / "b.pt").stat().st_mode


def test_save_to_a_directory_raises(tmp_path):
    with pytest.raises(IsADirectoryError, match="path must be a file path, got the directory"):
        checkpoint.save({"w": torch.ones(1)}, tmp_path)
