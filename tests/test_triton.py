"""The Triton backend's own machinery: the ops (opcheck, argument checks), the split-rows path
through them, what "auto" picks, and the kernels tracing for a GPU without one
(their compiling for sm_80 and sm_90 is in tests/test_triton_compile.py).
The split paths forced with tiny blocks are in tests/test_triton_splits.py.

make test runs this file twice: natively (the tests that need the backend run where it runs, i.e.
on cuda) and under TRITON_INTERPRET=1 on cpu. The interpreter emulates bfloat16 and converts
float32 to bfloat16 by truncation where GPUs and the reference round to nearest, so y may be one
bfloat16 ulp off; Y_TOL's bfloat16 row (1.6e-2 absolute plus relative) already allows one ulp (at
most |y|/128), so the tolerance table is the same for every backend.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import BACKENDS_UNDER_TEST, DEVICE
from fastnorm import RunningNorm, reference
from fastnorm.backends import BACKENDS, select_backend
from fastnorm.triton_backend import INTERPRETED, TRITON_ERROR
from helpers import DTYPES, STAT_TOL, Y_TOL, assert_diag_close, op_hyper, random_mask, randn

needs_triton_backend = pytest.mark.skipif("triton" not in BACKENDS_UNDER_TEST,
                                          reason=f"the triton backend is not under test on {DEVICE}")
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=str(TRITON_ERROR))
HYPER = dict(momentum=0.9, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=3.0)
# The ops' arguments after diag: every one is required (see fastnorm/_triton_ops.py).
OP_HYPER = dict(HYPER, eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False, steps=None)


def assert_stats_close(stats, expected, dtype, scale=1.0):
    tol = STAT_TOL[dtype]
    mean, var, count = stats
    assert torch.equal(count, expected.count)
    torch.testing.assert_close(mean, expected.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(var, expected.var, rtol=tol["rtol"], atol=tol["atol"] * scale**2)


def fresh_stats(gen, shape, device):
    mean = randn(shape, gen, dtype=torch.float64, device=device)
    var = torch.rand(shape, generator=gen, dtype=torch.float64).to(device) + 0.5
    count = torch.full(shape, 3.0, dtype=torch.float64, device=device)
    return mean, var, count


@needs_triton_backend
@pytest.mark.parametrize("bounds", [dict(min_std=0.0071, max_std=None), dict(min_std=None, max_std=0.0031),
                                    dict(min_std=None, max_std=None, eps_placement="std", batch_var="unbiased")],
                         ids=["min_std", "max_std", "eps_on_std"])
def test_hyper_parameters_reach_the_kernels_in_float64(device, gen, bounds):
    # Triton passes Python floats as float32 unless told otherwise. With float64 data whose std
    # (~1e-3) sits near eps, a bound that binds, a clip that cuts and a weight at its floor
    # 1 - momentum, any hyper-parameter rounded to float32 moves y or the statistics by ~1e-8,
    # far beyond the float64 tolerances.
    norm = RunningNorm((3,), momentum=0.9, eps=3.3e-6, clip=2.7, backend="triton", device=device, **bounds)
    for _ in range(12):  # from the 10th step on, w = 1 - momentum
        x = 5.0 + 1e-3 * randn((16, 3), gen, dtype=torch.float64, device=device)
        x[0] += 0.1  # clipped
        expected = reference.running_norm(x, None, norm.mean, norm.var, norm.count, **op_hyper(norm))
        y = norm(x)
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float64])
        assert_stats_close((norm.mean, norm.var, norm.count), expected, torch.float64)
    assert (norm._diag[4] > 0).all()


@needs_triton_backend
def test_split_rows_through_the_ops(device, gen):
    # The blocks the ops choose split these rows: reduce, merge and normalize launches.
    from fastnorm._triton_ops import blocks_for

    x = randn((5000, 3, 5), gen, device=device, mean=2.0)
    assert blocks_for(x, 15).grid(5000, 15)[1] > 1
    norm = RunningNorm((3, 5), backend="triton", device=device)
    for _ in range(2):
        expected = reference.running_norm(x, None, norm.mean, norm.var, norm.count, **op_hyper(norm))
        torch.testing.assert_close(norm(x), expected.y, **Y_TOL[torch.float32])
        assert_stats_close((norm.mean, norm.var, norm.count), expected, torch.float32, scale=2.0)
    moments = torch.full((6, 3, 5), math.nan, dtype=torch.float64, device=device)
    BACKENDS["triton"].batch_moments(x, None, moments)
    want = reference.batch_moment_table(x, None, torch.Size((3, 5)))
    assert torch.equal(moments[0], want[0]) and torch.equal(moments[3:], want[3:])
    tol = STAT_TOL[torch.float32]
    torch.testing.assert_close(moments[1], want[1], rtol=tol["rtol"], atol=tol["atol"] * 2.0)
    torch.testing.assert_close(moments[2] / 5000, want[2] / 5000, rtol=tol["rtol"], atol=tol["atol"] * 4.0)  # var


@needs_triton
@pytest.mark.parametrize("op", ["running_norm", "normalize", "batch_moments", "merge_normalize",
                                "normalize_advantages", "advantage_moments", "normalize_advantages_from"])
def test_no_mutated_argument_has_a_default(op):
    # torch 2.11's custom ops index the mutated arguments in the arguments the dispatcher passes, which
    # leave out those at their defaults (pytorch issue #176078): an IndexError at every such call.
    from fastnorm import _triton_ops  # noqa: F401  (registers the ops)

    schema = getattr(torch.ops.fastnorm, f"{op}_triton").default._schema
    defaulted = [a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
                 and a.has_default_value()]
    assert defaulted == [], str(schema)


class PassThrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@needs_triton
def test_launches_are_wrapped_only_where_torch_traces():
    # wrap_triton's higher-order op costs host time in eager code and has no rule for a user's
    # TorchDispatchMode; torch.compile, make_fx and fake tensors need it.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from fastnorm.triton_kernels.launcher import torch_traces

    def traced(t):
        return t + 1 if torch_traces() else t

    assert not torch_traces()
    with PassThrough():
        assert not torch_traces()
    with FakeTensorMode():
        assert torch_traces()
    assert make_fx(traced)(torch.ones(2))(torch.ones(2))[0] == 2
    assert torch.compile(traced, backend="eager", fullgraph=True)(torch.ones(2))[0] == 2


@needs_triton
def test_only_plain_eager_calls_skip_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fastnorm._triton_ops import calls_directly

    def through_the_op(t):
        return t if calls_directly(t) else t + 1

    x = torch.ones(3)
    assert calls_directly(x)
    with PassThrough():
        assert not calls_directly(x)
    with FakeTensorMode() as mode:
        assert not calls_directly(mode.from_tensor(x))
    assert torch.compile(through_the_op, backend="eager", fullgraph=True)(x)[0] == 2
    assert torch.func.vmap(through_the_op)(x)[0] == 2
    assert torch.jit.trace(through_the_op, x, check_trace=False)(x)[0] == 2


@needs_triton_backend
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("previous", [False, True], ids=["updated", "previous"])
def test_opcheck_running_norm_triton(device, gen, with_mask, with_out, previous):
    x = randn((33, 4, 3), gen, device=device)
    mask = random_mask((33, 4), gen, device) if with_mask else None
    args = (x, mask, *fresh_stats(gen, (4, 3), device), torch.empty_like(x) if with_out else None,
            torch.empty(6, 12, dtype=torch.float64, device=device))
    steps = torch.zeros((), dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.running_norm_triton.default, args,
                          dict(OP_HYPER, previous=previous, steps=steps))


@needs_triton_backend
def test_opcheck_normalize_triton(device, gen):
    x = randn((33, 4, 3), gen, device=device)
    mean, var, _ = fresh_stats(gen, (4, 3), device)
    torch.library.opcheck(torch.ops.fastnorm.normalize_triton.default, (x, mean, var, torch.empty_like(x)),
                          dict(eps=1e-4, min_std=1e-2, max_std=None, clip=5.0))


@needs_triton_backend
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_batch_moments_triton(device, gen, with_mask):
    x = randn((33, 4, 3), gen, device=device)
    mask = random_mask((33, 4), gen, device) if with_mask else None
    moments = torch.empty(6, 4, 3, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.batch_moments_triton.default, (x, mask, moments))


@needs_triton_backend
@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("previous", [False, True], ids=["updated", "previous"])
def test_opcheck_merge_normalize_triton(device, gen, with_out, previous):
    x = randn((33, 4, 3), gen, device=device)
    mask = random_mask((33, 4), gen, device)
    parts = torch.empty(3, 6, 4, 3, dtype=torch.float64, device=device)
    for part in parts:
        torch.ops.fastnorm.batch_moments_triton(randn((17, 4, 3), gen, device=device), None, part)
    args = (x, mask, parts, *fresh_stats(gen, (4, 3), device), torch.empty_like(x) if with_out else None,
            torch.empty(6, 12, dtype=torch.float64, device=device))
    steps = torch.zeros((), dtype=torch.int64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.merge_normalize_triton.default, args,
                          dict(OP_HYPER, previous=previous, steps=steps))


@needs_triton_backend
def test_running_norm_ops_reject_bad_arguments_naming_them(device, gen):
    x = randn((8, 4, 3), gen, device=device)
    mean, var, count = fresh_stats(gen, (4, 3), device)
    diag = torch.empty(6, 12, dtype=torch.float64, device=device)
    op = torch.ops.fastnorm.running_norm_triton
    with pytest.raises(ValueError, match="mean must be a contiguous float64 tensor"):
        op(x, None, mean.float(), var, count, None, diag, **OP_HYPER)
    with pytest.raises(ValueError, match=r"diag must be a contiguous float64 tensor of shape \(6, 12\)"):
        op(x, None, mean, var, count, None, diag[:, :5], **OP_HYPER)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        op(x, torch.ones(8, 5, dtype=torch.bool, device=device), mean, var, count, None, diag, **OP_HYPER)
    with pytest.raises(ValueError, match="momentum must be in"):
        op(x, None, mean, var, count, None, diag, **dict(OP_HYPER, momentum=2.0))
    with pytest.raises(ValueError, match=r"steps must be a 0-dim int64 tensor on \S+, got torch.float32 of shape \(\)"):
        op(x, None, mean, var, count, None, diag, **dict(OP_HYPER, steps=torch.zeros((), device=device)))
    with pytest.raises(ValueError, match=r"steps must be a 0-dim int64 tensor on \S+, got torch.int64 of shape \(1,\)"):
        op(x, None, mean, var, count, None, diag,
           **dict(OP_HYPER, steps=torch.zeros(1, dtype=torch.int64, device=device)))
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4, 3\)"):
        torch.ops.fastnorm.normalize_triton(x[..., :2], mean, var, torch.empty_like(x[..., :2]), eps=1e-4,
                                            min_std=None, max_std=None, clip=None)
    moments = torch.zeros(6, 4, 3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=r"moments must be a contiguous float64 tensor of shape \(6, \*shape\)"):
        torch.ops.fastnorm.batch_moments_triton(x, None, moments[:5])
    merge = torch.ops.fastnorm.merge_normalize_triton
    with pytest.raises(ValueError, match=r"parts must be a contiguous float64 tensor of shape \(num_parts >= 1"):
        merge(x, None, moments, mean, var, count, None, diag, **OP_HYPER)  # no parts dim
    with pytest.raises(ValueError, match="parts must be a contiguous float64 tensor"):
        merge(x, None, moments[None].float(), mean, var, count, None, diag, **OP_HYPER)
    with pytest.raises(ValueError, match="clip must be > 0"):
        merge(x, None, moments[None], mean, var, count, None, diag, **dict(OP_HYPER, clip=-1.0))
    with pytest.raises(ValueError, match="steps must be a 0-dim int64 tensor"):
        merge(x, None, moments[None], mean, var, count, None, diag,
              **dict(OP_HYPER, steps=torch.zeros(2, device=device)))


@needs_triton_backend
@pytest.mark.parametrize("shape,mask_numel", [((33, 4, 3), 33 * 4), ((33, 4, 3), 0), ((1, 1, 500), 5)], ids=str)
def test_opcheck_normalize_advantages_triton(device, gen, shape, mask_numel):
    x = randn(shape, gen, device=device)
    mask = random_mask((mask_numel,), gen, device) if mask_numel else None
    args = (x, mask, torch.empty_like(x), torch.empty(4, shape[1], dtype=torch.float64, device=device))
    torch.library.opcheck(torch.ops.fastnorm.normalize_advantages_triton.default, args,
                          dict(min_std=1e-4, unbiased=True))


@needs_triton_backend
def test_advantages_op_rejects_bad_arguments_naming_them(device, gen):
    x = randn((33, 4, 3), gen, device=device)
    mask, out = random_mask((33 * 4,), gen, device), torch.full_like(x, math.nan)
    stats = torch.full((4, 4), math.nan, dtype=torch.float64, device=device)
    op = torch.ops.fastnorm.normalize_advantages_triton
    with pytest.raises(ValueError, match=r"x must be 3-D \(outer, groups, inner\), got shape \(33, 12\)"):
        op(x.view(33, 12), None, out.view(33, 12), stats, 1e-4, True)
    with pytest.raises(ValueError, match=r"stats must be a contiguous float64 tensor of shape \(4, 4\)"):
        op(x, mask, out, stats[:, :3], 1e-4, True)
    with pytest.raises(ValueError, match="min_std must be finite and > 0, got 0"):
        op(x, mask, out, stats, 0.0, True)
    with pytest.raises(ValueError, match="mask must have a number of elements that divides x's 396, got 5"):
        op(x, mask[:5], out, stats, 1e-4, True)
    with pytest.raises(ValueError, match="mask must be a 1-D"):
        op(x, mask.view(33, 4), out, stats, 1e-4, True)
    with pytest.raises(ValueError, match="out must match x"):
        op(x, mask, out.double(), stats, 1e-4, True)
    with pytest.raises(RuntimeError, match="single memory location.*out must be x itself or not overlap it"):
        big = torch.empty(34, 4, 3, device=device)
        op(big[1:], None, big[:-1], stats, 1e-4, True)
    assert out.isnan().all() and stats.isnan().all()  # nothing written


@needs_triton_backend
@pytest.mark.parametrize("shape,mask_numel,parts", [((33, 4, 3), 33 * 4, 3), ((1, 1, 500), 5, 1),
                                                    ((0, 2, 3), 0, 2)], ids=str)
def test_opcheck_advantage_split_ops_triton(device, gen, shape, mask_numel, parts):
    x = randn(shape, gen, device=device)
    mask = random_mask((mask_numel,), gen, device) if mask_numel else None
    moments = torch.empty(5, shape[1], dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.advantage_moments_triton.default, (x, mask, moments))
    torch.ops.fastnorm.advantage_moments_triton(randn((7,) + shape[1:], gen, device=device), None, moments)
    args = (x, moments.expand(parts, -1, -1).contiguous(), torch.empty_like(x),
            torch.empty(4, shape[1], dtype=torch.float64, device=device))
    torch.library.opcheck(torch.ops.fastnorm.normalize_advantages_from_triton.default, args,
                          dict(min_std=1e-4, unbiased=True))


@needs_triton_backend
def test_advantage_split_ops_reject_bad_arguments_naming_them(device, gen):
    x = randn((33, 4, 3), gen, device=device)
    out = torch.full_like(x, math.nan)
    stats = torch.full((4, 4), math.nan, dtype=torch.float64, device=device)
    moments = torch.full((5, 4), math.nan, dtype=torch.float64, device=device)
    op = torch.ops.fastnorm.advantage_moments_triton
    with pytest.raises(ValueError, match=r"moments must be a contiguous float64 tensor of shape \(5, 4\)"):
        op(x, None, torch.empty(6, 4, dtype=torch.float64, device=device))
    with pytest.raises(ValueError, match=r"moments must be a contiguous float64 tensor of shape \(5, 4\)"):
        op(x, None, moments.float())
    with pytest.raises(ValueError, match="mask must have a number of elements that divides x's 396, got 5"):
        op(x, random_mask((5,), gen, device), moments)
    op = torch.ops.fastnorm.normalize_advantages_from_triton
    with pytest.raises(ValueError, match=r"parts must be a contiguous float64 tensor of shape \(num_parts >= 1, "
                                         r"5, 4\) on \S+, got torch.float64 of shape \(2, 5, 3\)"):
        op(x, torch.zeros(2, 5, 3, dtype=torch.float64, device=device), out, stats, 1e-4, True)
    with pytest.raises(ValueError, match=r"parts must be .* of shape \(0, 5, 4\)"):
        op(x, torch.zeros(0, 5, 4, dtype=torch.float64, device=device), out, stats, 1e-4, True)
    with pytest.raises(ValueError, match=r"parts must be .* of shape \(5, 4\)"):
        op(x, moments, out, stats, 1e-4, True)
    with pytest.raises(ValueError, match="min_std must be finite and > 0, got -1"):
        op(x, moments[None], out, stats, -1.0, True)
    with pytest.raises(ValueError, match=r"stats must be a contiguous float64 tensor of shape \(4, 4\)"):
        op(x, moments[None], out, stats[:3], 1e-4, True)
    assert out.isnan().all() and stats.isnan().all() and moments.isnan().all()  # nothing written


@needs_triton_backend
def test_out_may_be_x_but_not_overlap_it_partially(device, gen):
    mean, var, count = fresh_stats(gen, (4, 3), device)
    diag = torch.empty(6, 12, dtype=torch.float64, device=device)
    big = randn((9, 4, 3), gen, device=device)
    before = [t.clone() for t in (big, mean, var, count)]
    with pytest.raises(RuntimeError, match="single memory location.*out must be x itself or not overlap it"):
        torch.ops.fastnorm.running_norm_triton(big[1:], None, mean, var, count, big[:-1], diag, **OP_HYPER)
    with pytest.raises(RuntimeError, match="single memory location.*out must not have elements that share memory"):
        torch.ops.fastnorm.normalize_triton(big[:2], mean, var, big[:1].expand(2, 4, 3), eps=1e-4, min_std=None,
                                            max_std=None, clip=None)
    assert all(torch.equal(a, b) for a, b in zip(before, (big, mean, var, count)))  # nothing written
    x = big.clone()
    expected = reference.running_norm(x, None, mean, var, count, **HYPER)
    torch.ops.fastnorm.running_norm_triton(x, None, mean, var, count, x, diag, **OP_HYPER)  # in place
    torch.testing.assert_close(x, expected.y, **Y_TOL[torch.float32])


# What an updating call may dispatch besides its Triton launches: allocations (the output, the
# scratch) and views (layouts only); no op that does device work, such as a zero_, fill_ or add_.
ALLOWED_OPS = {"aten.empty.memory_format", "aten.empty_strided.default", "aten.empty_like.default",
               "aten.view.default", "aten.view.dtype"}


class DispatchedOps(TorchDispatchMode):
    """Records the torch ops dispatched while on, those inside fastnorm's Triton ops included (their
    Python functions run with the mode on), and the names of the kernels launched. What Triton's
    interpreter dispatches inside a launch (copies of the arguments) is not recorded: on a GPU a
    launch dispatches nothing."""

    def __init__(self, monkeypatch):
        super().__init__()
        from fastnorm.triton_kernels import running_norm as kernels

        self.ops, self.launches, self._in_launch = [], [], False
        launch = kernels.launch

        def recorded(kernel, grid, *args, **kwargs):
            self.launches.append(kernel.fn.__name__)
            self._in_launch = True
            try:
                launch(kernel, grid, *args, **kwargs)
            finally:
                self._in_launch = False

        monkeypatch.setattr(kernels, "launch", recorded)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fastnorm._triton_ops import IMPLEMENTATIONS

        kwargs = kwargs or {}
        if self._in_launch:
            return func(*args, **kwargs)
        self.ops.append(str(func))
        if func.namespace == "fastnorm":
            with self:
                return IMPLEMENTATIONS[func.name()](*args, **kwargs)
        return func(*args, **kwargs)


@needs_triton_backend
@pytest.mark.parametrize("normalize_with", ["updated", "previous"])
@pytest.mark.parametrize("rows", [33, 5000, 0])
def test_an_update_dispatches_only_allocations_and_its_launches(device, gen, monkeypatch, normalize_with, rows):
    # One launch when the batch takes one split (an empty one too), else reduce, merge and normalize;
    # the diagnostics, the step counter and the scratch are written by the kernels.
    from fastnorm._triton_ops import blocks_for

    splits = blocks_for(torch.empty(rows, 3, 5, device=device), 15).grid(rows, 15)[1]
    assert (splits > 1) == (rows == 5000)
    norm = RunningNorm((3, 5), normalize_with=normalize_with, backend="triton", device=device)
    x, mask = randn((rows, 3, 5), gen, device=device), random_mask((rows, 3), gen, device)
    norm(randn((40, 3, 5), gen, device=device))  # a history, and the kernels compiled on a GPU
    norm(x, mask=mask)
    expected = reference.running_norm(x, mask, norm.mean, norm.var, norm.count, **op_hyper(norm))
    steps = int(norm.steps)
    norm._diag.fill_(math.nan)  # every element rewritten, by the kernels
    with DispatchedOps(monkeypatch) as record:
        y = norm(x, mask=mask)
    assert record.ops.count("fastnorm.running_norm_triton.default") == 1
    assert set(record.ops) - ALLOWED_OPS - {"fastnorm.running_norm_triton.default"} == set(), record.ops
    assert record.launches == (["_reduce_kernel"] if splits == 1 else
                               ["_reduce_kernel", "_merge_kernel", "_normalize_kernel"])
    assert int(norm.steps) == steps + (rows > 0)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    assert_diag_close(norm._diag, expected.diag, torch.float32)


@needs_triton_backend
@pytest.mark.parametrize("rows", [33, 5000, 0])
def test_merge_normalize_dispatches_only_allocations_and_its_launches(device, gen, monkeypatch, rows):
    from fastnorm._triton_ops import blocks_for

    splits = blocks_for(torch.empty(rows, 3, 5, device=device), 15).grid(rows, 15)[1]
    backend = BACKENDS["triton"]
    x = randn((rows, 3, 5), gen, device=device)
    parts = torch.empty(2, 6, 3, 5, dtype=torch.float64, device=device)
    for part in parts:
        backend.batch_moments(randn((17, 3, 5), gen, device=device), None, part)
    mean, var, count = fresh_stats(gen, (3, 5), device)
    diag = torch.empty(6, 15, dtype=torch.float64, device=device)
    steps = torch.zeros((), dtype=torch.int64, device=device)
    args = (x, None, parts, mean, var, count, torch.empty_like(x), diag)
    backend.merge_normalize(*args, steps=steps, previous=True, **HYPER)  # compiles the kernels on a GPU
    with DispatchedOps(monkeypatch) as record:
        backend.merge_normalize(*args, steps=steps, previous=True, **HYPER)
    assert set(record.ops) - ALLOWED_OPS - {"fastnorm.merge_normalize_triton.default"} == set(), record.ops
    assert record.launches == (["_merge_kernel"] if splits == 1 else ["_merge_kernel", "_normalize_kernel"])
    assert int(steps) == 2  # a step of the group, whatever this shard


@needs_triton_backend
@pytest.mark.parametrize("normalize_with", ["updated", "previous"])
def test_steps_count_the_updates_with_entries_as_the_reference_does(device, gen, normalize_with):
    norms = [RunningNorm((4, 3), normalize_with=normalize_with, backend=b, device=device) for b in ("triton",
                                                                                                    "reference")]
    nothing = torch.zeros(9, 4, dtype=torch.bool, device=device)
    for rows, mask in ((7, None), (0, None), (9, nothing), (5000, None), (0, None)):
        x = randn((rows, 4, 3), gen, device=device)
        for norm in norms:
            norm(x, mask=mask)
            norm.update(x[:0])  # an empty batch is no step
    assert int(norms[0].steps) == int(norms[1].steps) == 3
    torch.testing.assert_close(norms[0].mean, norms[1].mean, rtol=2e-6, atol=2e-6)


def test_auto_never_picks_the_interpreter():
    x = torch.empty(0)
    triton_backend = BACKENDS["triton"]
    assert select_backend("auto", x).name != "triton"
    if INTERPRETED:
        assert not triton_backend.not_supported_reasons(x) and triton_backend.auto_skip_reasons(x)
    elif TRITON_ERROR is None:
        assert any("TRITON_INTERPRET=1" in reason for reason in triton_backend.not_supported_reasons(x))


def test_bench_never_times_the_triton_interpreter():
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
    from running_norm import timed_backends

    x = torch.empty(0)
    for op in ("running_norm", "normalize_advantages"):
        assert "triton" not in timed_backends(x, op)
    if INTERPRETED:  # the backend can run x: the benchmark skips it nonetheless
        assert not BACKENDS["triton"].not_supported_reasons(x)


def test_ops_without_triton_kernels_are_named():
    reasons = BACKENDS["triton"].not_supported_reasons(torch.empty(0), "an_op_added_later")
    assert any("no kernel for an_op_added_later" in reason for reason in reasons)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_prefers_the_cuda_kernel_then_triton():
    x = torch.empty(0, device="cuda")
    expected = next(name for name in ("cuda", "triton", "reference") if not BACKENDS[name].not_supported_reasons(x))
    assert select_backend("auto", x).name == expected


@needs_triton_backend
@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs and sync checks need a CUDA device")
def test_cuda_graph_replays_without_host_sync(gen):
    norm = RunningNorm((8, 16), momentum=None, backend="triton", device="cuda")
    static_x = randn((4096, 8, 16), gen, device="cuda")
    static_out = torch.empty_like(static_x)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")
        try:
            norm(static_x, out=static_out)  # warm-up (compiles the kernels); must not sync
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        norm(static_x, out=static_out)
    for _ in range(3):  # every replay reruns the three launches on the same scratch
        static_x.copy_(randn((4096, 8, 16), gen, device="cuda", mean=2.0))
        expected = reference.running_norm(static_x, None, norm.mean, norm.var, norm.count, **op_hyper(norm))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, expected.y, **Y_TOL[torch.float32])
        torch.testing.assert_close(norm.mean, expected.mean, rtol=1e-6, atol=1e-6)
        assert torch.equal(norm.count, expected.count)


@needs_triton_backend
@pytest.mark.skipif(DEVICE.type != "cuda", reason="streams need a CUDA device")
def test_concurrent_streams_each_use_their_own_scratch(gen):
    # Two split-rows calls in flight at once on two streams: each merges only its own tables.
    xs = [randn((8192, 4, 16), gen, device="cuda", mean=m) for m in (-2.0, 2.0)]
    norms = [RunningNorm((4, 16), backend="triton", device="cuda") for _ in xs]
    expected = [reference.running_norm(x, None, n.mean, n.var, n.count, **op_hyper(n)) for x, n in zip(xs, norms)]
    streams = [torch.cuda.Stream() for _ in xs]
    torch.cuda.synchronize()
    ys = []
    for stream, x, norm in zip(streams, xs, norms):
        with torch.cuda.stream(stream):
            ys.append(norm(x))
    torch.cuda.synchronize()
    for y, norm, want in zip(ys, norms, expected):
        torch.testing.assert_close(y, want.y, **Y_TOL[torch.float32])
        assert_stats_close((norm.mean, norm.var, norm.count), want, torch.float32, scale=2.0)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="traced in the run without TRITON_INTERPRET")
@pytest.mark.parametrize("previous", [False, True], ids=["updated", "previous"])
def test_triton_op_traces_to_its_kernels(previous):
    """What torch.compile sees of fastnorm::running_norm_triton on a GPU, traced with fake CUDA
    tensors and a stand-in for the GPU driver: for a batch split over several programs, the three
    Triton kernels (reduce, merge, normalize) on uninitialized scratch, and no other op that does
    work (no memset, no step increment); they write only the split tables, the statistics, the step
    counter, the diagnostics, the y table and y (so x is never copied). With previous, the reduce
    writes y (of the columns with a history) and its clipped counts."""
    script = textwrap.dedent("""
        import sys
        import torch, triton
        from triton.backends.compiler import GPUTarget
        from torch._functorch.aot_autograd import aot_function
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fastnorm import _triton_ops

        class Sm90:  # the target the TTIR analysis of the kernels asks the driver for
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(Sm90())
        _triton_ops._sm_count = lambda index: 132

        def step(x, mask, mean, var, count, out, diag, steps):
            torch.ops.fastnorm.running_norm_triton(x, mask, mean, var, count, out, diag, 0.99, None, 1e-4, 1e-2,
                                                   None, 10.0, False, False, None, None, sys.argv[1] == "1", steps)
            return out

        def show(graph, inputs):
            print(graph.code)
            raise SystemExit(0)

        with FakeTensorMode():
            f64 = dict(dtype=torch.float64, device="cuda")
            x = torch.empty(4096, 16, 32, device="cuda")
            args = (x, torch.empty(4096, 16, dtype=torch.bool, device="cuda"), torch.empty(16, 32, **f64),
                    torch.empty(16, 32, **f64), torch.empty(16, 32, **f64), torch.empty_like(x),
                    torch.empty(6, 512, **f64), torch.empty((), dtype=torch.int64, device="cuda"))
            aot_function(step, fw_compiler=show)(*args)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script, str(int(previous))], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = re.findall(r"triton_kernel_wrapper_functional\(.*?tensors_to_clone = \[(.*?)\]", result.stdout)
    assert written == [("'out_ptr', 'partials_ptr', 'split_clipped_ptr'" if previous else "'partials_ptr'"),
                       "'mean_ptr', 'var_ptr', 'count_ptr', 'diag_ptr', 'steps_ptr', 'y_table_ptr'",
                       "'out_ptr', 'diag_ptr'"], result.stdout
    assert not re.search(r"aten\.(zeros|zero_|fill|add)", result.stdout), result.stdout


@needs_triton_backend
@pytest.mark.parametrize("shape,dim,with_mask", [((33, 4, 3), None, True), ((64, 5), 0, False), ((0, 3), 0, False)],
                         ids=str)
def test_common_advantage_call_is_one_op_with_the_general_paths_bits(device, gen, shape, dim, with_mask):
    # fastnorm::normalized_advantages_triton (the common call) against the general path (out= given).
    import fastnorm

    adv = randn(shape, gen, device=device)
    mask = random_mask(shape[:1], gen, device) if with_mask else None
    y, stats = fastnorm.normalize_advantages(adv, mask=mask, dim=dim, backend="triton")
    out = torch.full_like(adv, math.nan)
    y_general, stats_general = fastnorm.normalize_advantages(adv, mask=mask, dim=dim, backend="triton", out=out)
    assert torch.equal(y, y_general)
    for name in ("mean", "std_raw", "count", "norm_max_abs", "std_below_floor"):
        assert torch.equal(getattr(stats, name), getattr(stats_general, name)), name
    groups = shape[1] if dim == 0 else 1
    args = (adv, mask.reshape(-1) if mask is not None else None, adv.numel() // max(groups, 1) if dim == 0 else 1,
            groups, 1 if dim == 0 else adv.numel(), list(shape[1:]) if dim == 0 else [], 1e-4, True)
    torch.library.opcheck(torch.ops.fastnorm.normalized_advantages_triton.default, args)


@needs_triton_backend
def test_lanes_far_apart_fall_back_to_float64(device, gen):
    """Each lane of the reduce kernel (a row slot of its tiles) holds values near one of +-1e20:
    every lane's float32 sums stay finite, but moving them to the column's mean overflows, which
    must take the float64 path as an overflow in the sums does."""
    from fastnorm._triton_ops import blocks_for

    rows, cols = 512, 3
    x = randn((rows, cols), gen, device=device, mean=1.0, scale=1e-3)
    lanes = (blocks_for(x, cols).rows + 1) // 2
    slot = torch.arange(rows, device=device) % lanes
    x = x * torch.where(slot < lanes // 2, 1e20, -1e20)[:, None]
    norm = RunningNorm((cols,), momentum=None, backend="triton", device=device)
    norm(x)
    exact = x.double().var(0, unbiased=False)
    assert torch.isfinite(norm.var).all()
    torch.testing.assert_close(norm.var, exact, rtol=1e-5, atol=0)
    torch.testing.assert_close(norm.mean, x.double().mean(0), rtol=0, atol=1e-5 * 1e20)
