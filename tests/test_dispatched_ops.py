"""The ops a call dispatches, so that a regression in per-call overhead fails: an updating
RunningNorm call is one fastnorm op (it counts the step and resets the diagnostics itself) plus the
allocation of y; so is normalize_advantages (csrc/normalized_advantages.cpp). Counted with a
TorchDispatchMode, which sees each op the call dispatches (not the kernels inside a fastnorm op)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastnorm
from fastnorm import RunningNorm
from helpers import random_mask, randn

ALLOCATIONS = {"aten.empty_like.default", "aten.empty.memory_format", "aten.empty_strided.default", "aten.new_empty.default"}
VIEWS = {"aten.view.default", "aten._unsafe_view.default", "aten.reshape.default", "aten.unbind.int"}


class DispatchedOps(TorchDispatchMode):
    """Records the name of every op dispatched while active."""

    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func))
        return func(*args, **(kwargs or {}))


def dispatched(call) -> list[str]:
    with DispatchedOps() as ops:
        call()
    return ops.names


def fastnorm_ops(names: list[str]) -> list[str]:
    return [n for n in names if n.startswith("fastnorm.")]


@pytest.mark.parametrize("normalize_with", ["updated", "previous"])
def test_an_updating_call_is_one_op(kernel_backend, device, gen, normalize_with):
    norm = RunningNorm((4, 8), backend=kernel_backend, device=device, normalize_with=normalize_with)
    x = randn((64, 4, 8), gen, device=device)
    norm(x)  # the first call binds the op; later ones reuse it
    names = dispatched(lambda: norm(x))
    assert len(fastnorm_ops(names)) == 1, names
    assert set(names) - set(fastnorm_ops(names)) <= ALLOCATIONS, names
    mask, out = random_mask((64,), gen, device), torch.empty_like(x)
    assert dispatched(lambda: norm(x, mask=mask, out=out)) == fastnorm_ops(names), "with out given, nothing but the op"
    assert int(norm.steps) == 3


def test_steps_are_counted_by_the_op(kernel_backend, device, gen):
    norm = RunningNorm((3,), backend=kernel_backend, device=device)
    for rows in (5, 0, 7, 0):
        norm(randn((rows, 3), gen, device=device))
    assert int(norm.steps) == 2  # empty batches are no update step
    norm.eval()
    norm(randn((5, 3), gen, device=device))
    assert int(norm.steps) == 2


def test_an_eval_call_is_one_op(kernel_backend, device, gen):
    norm = RunningNorm((4, 8), backend=kernel_backend, device=device).eval()
    x = randn((64, 4, 8), gen, device=device)
    out = torch.empty_like(x)
    assert len(fastnorm_ops(dispatched(lambda: norm(x, out=out)))) == 1


def test_normalize_advantages_is_one_op(adv_kernel_backend, device, gen):
    adv = randn((64, 4, 8), gen, device=device)
    names = dispatched(lambda: fastnorm.normalize_advantages(adv, backend=adv_kernel_backend))
    assert len(fastnorm_ops(names)) == 1 and set(names) - set(fastnorm_ops(names)) <= ALLOCATIONS | VIEWS, names
    # Per agent, with a mask and out=, the call takes the general path: still one fastnorm op.
    mask, out = random_mask((64, 4), gen, device), torch.empty_like(adv)
    names = dispatched(lambda: fastnorm.normalize_advantages(adv, mask=mask, dim=0, out=out,
                                                             backend=adv_kernel_backend))
    computing = [n for n in names if n not in ALLOCATIONS | VIEWS]
    assert len(fastnorm_ops(computing)) == 1 and len(computing) == 2, names
    assert computing[1].startswith("aten.lt."), names  # std_below_floor = std_raw < min_std


def test_bad_input_is_explained_after_the_op_refuses_it(kernel_backend, device, gen):
    # The module skips its own checks where the op checks everything; a refused call is then
    # explained by them, and changes nothing.
    norm = RunningNorm((3, 4), backend=kernel_backend, device=device)
    norm(randn((8, 3, 4), gen, device=device))
    state = {k: v.clone() for k, v in norm.state_dict().items() if isinstance(v, torch.Tensor)}
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 3, 4\), got \(8, 4, 3\)"):
        norm(randn((8, 4, 3), gen, device=device))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        norm(randn((8, 3, 4), gen, device=device), mask=torch.ones(8, device=device))
    with pytest.raises(RuntimeError, match="single memory location"):  # the op's own check: partial overlap
        x = randn((9, 3, 4), gen, device=device)
        norm(x[:8], out=x[1:])
    for k, v in state.items():
        assert torch.equal(norm.state_dict()[k], v), k
