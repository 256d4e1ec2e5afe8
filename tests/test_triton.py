"""The Triton backend's own machinery: the split-rows merge (forced with tiny blocks), the arrival
counters, the ops, what "auto" picks, and the kernels compiling for a GPU without one.

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

from conftest import BACKENDS_UNDER_TEST, DEVICE
from fastnorm import RunningNorm, reference
from fastnorm.backends import BACKENDS, select_backend
from fastnorm.triton_backend import INTERPRETED, TRITON_ERROR
from helpers import DTYPES, STAT_TOL, Y_TOL, assert_diag_close, random_mask, randn

needs_triton_backend = pytest.mark.skipif("triton" not in BACKENDS_UNDER_TEST,
                                          reason=f"the triton backend is not under test on {DEVICE}")
needs_triton = pytest.mark.skipif(TRITON_ERROR is not None, reason=str(TRITON_ERROR))
HYPER = dict(momentum=0.9, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=3.0)


def tiny_blocks():
    """2 rows a step, 4 columns a program, 4 rows a split, 2 partials a merge step: every split
    takes 2 steps, and the last program of each column tile merges in several steps."""
    from fastnorm.triton_kernels.running_norm import Blocks

    return Blocks(rows=2, cols=4, rows_per_split=4, merge=2, num_warps=1)


def launch(x, mask, stats, out, diag, arrivals, blocks):
    """The reduce (and normalize) kernels on x of shape (*batch, *stats shape) with these blocks."""
    from fastnorm.triton_kernels.running_norm import launch_running_norm

    mean, var, count = stats
    cols = mean.numel()
    rows = x.numel() // cols
    mask_rows = mask.reshape(rows, -1).contiguous().view(torch.uint8) if mask is not None else None
    out_rows = out.view(rows, cols) if out is not None else None
    launch_running_norm(x.reshape(rows, cols), mask_rows, mean, var, count, out_rows, diag, arrivals, blocks=blocks,
                        **HYPER)


def with_non_finite(x):
    """x with NaN, +inf and -inf in places, and one column that is NaN throughout."""
    x = x.clone()
    x[1, 0, 0] = math.nan
    x[2, 1, 3] = math.inf
    x[5, 1, 3] = -math.inf
    x[:, 0, 2] = math.nan
    return x


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
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "rows", "agents", "full"])
def test_split_rows_merge_matches_reference(device, gen, dtype, mask_kind):
    # 13 rows in splits of 4 (the last one short), 10 columns in tiles of 4 (the last one short),
    # agent masks whose groups of 5 columns straddle the tiles.
    batch, stats_shape = (13,), (2, 5)
    mask_shape = dict(none=None, rows=batch, agents=batch + stats_shape[:1], full=batch + stats_shape)[mask_kind]
    stats = fresh_stats(gen, stats_shape, device)
    arrivals = torch.zeros(8, dtype=torch.int32, device=device)
    for _ in range(3):  # the counters, left zero, serve the next call
        x = with_non_finite(randn(batch + stats_shape, gen, dtype=dtype, device=device, mean=1.0, scale=2.0))
        mask = random_mask(mask_shape, gen, device) if mask_shape else None
        expected = reference.running_norm(x, mask, *stats, **HYPER)
        out = torch.full_like(x, math.nan)
        diag = torch.full((6, 10), -7.0, dtype=torch.float64, device=device)
        launch(x, mask, stats, out, diag, arrivals, tiny_blocks())
        assert torch.equal(arrivals, torch.zeros_like(arrivals))
        torch.testing.assert_close(out, expected.y, equal_nan=True, **Y_TOL[dtype])
        assert_stats_close(stats, expected, dtype, scale=2.0)
        assert_diag_close(diag, expected.diag, dtype, scale=2.0)


@needs_triton_backend
def test_split_rows_without_output(device, gen):
    stats = fresh_stats(gen, (2, 5), device)
    x = with_non_finite(randn((13, 2, 5), gen, device=device))
    expected = reference.running_norm(x, None, *stats, with_output=False, **HYPER)
    diag = torch.zeros(6, 10, dtype=torch.float64, device=device)
    launch(x, None, stats, None, diag, torch.zeros(8, dtype=torch.int32, device=device), tiny_blocks())
    assert torch.isnan(diag[4:]).all()
    assert_diag_close(diag, expected.diag, torch.float32)
    assert_stats_close(stats, expected, torch.float32)


@needs_triton_backend
def test_split_rows_are_deterministic(device, gen):
    start = fresh_stats(gen, (2, 5), device)
    x = randn((13, 2, 5), gen, device=device, mean=3.0)
    results = []
    for _ in range(2):
        stats = tuple(s.clone() for s in start)
        out = torch.empty_like(x)
        diag = torch.empty(6, 10, dtype=torch.float64, device=device)
        launch(x, None, stats, out, diag, torch.zeros(8, dtype=torch.int32, device=device), tiny_blocks())
        results.append((out, *stats, diag))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_triton_backend
@pytest.mark.parametrize("bounds", [dict(min_std=0.0071, max_std=None), dict(min_std=None, max_std=0.0031)],
                         ids=["min_std", "max_std"])
def test_hyper_parameters_reach_the_kernels_in_float64(device, gen, bounds):
    # Triton passes Python floats as float32 unless told otherwise. With float64 data whose std
    # (~1e-3) sits near eps, a bound that binds, a clip that cuts and a weight at its floor
    # 1 - momentum, any hyper-parameter rounded to float32 moves y or the statistics by ~1e-8,
    # far beyond the float64 tolerances.
    norm = RunningNorm((3,), momentum=0.9, eps=3.3e-6, clip=2.7, backend="triton", device=device, **bounds)
    for _ in range(12):  # from the 10th step on, w = 1 - momentum
        x = 5.0 + 1e-3 * randn((16, 3), gen, dtype=torch.float64, device=device)
        x[0] += 0.1  # clipped
        expected = reference.running_norm(x, None, norm.mean, norm.var, norm.count, **hyper_of(norm))
        y = norm(x)
        torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float64])
        assert_stats_close((norm.mean, norm.var, norm.count), expected, torch.float64)
    assert (norm._diag[4] > 0).all()


@needs_triton_backend
def test_arrival_counters_are_left_zero(device, gen):
    from fastnorm._triton_ops import blocks_for

    x = randn((5000, 3, 5), gen, device=device)
    assert blocks_for(x, 15).grid(5000, 15)[1] > 1  # the split-rows path
    norm = RunningNorm((3, 5), backend="triton", device=device)
    expected = reference.running_norm(x, None, norm.mean, norm.var, norm.count, **hyper_of(norm))
    torch.testing.assert_close(norm(x), expected.y, **Y_TOL[torch.float32])
    norm.update(x)
    arrivals = BACKENDS["triton"]._arrivals[x.device]
    assert arrivals.dtype == torch.int32 and torch.equal(arrivals, torch.zeros_like(arrivals))


def hyper_of(norm):
    return dict(momentum=norm.momentum, max_count=norm.max_count, eps=norm.eps, min_std=norm.min_std,
                max_std=norm.max_std, clip=norm.clip)


@needs_triton_backend
@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("with_out", [True, False])
def test_opcheck_running_norm_triton(device, gen, with_mask, with_out):
    x = randn((33, 4, 3), gen, device=device)
    mask = random_mask((33, 4), gen, device) if with_mask else None
    args = (x, mask, *fresh_stats(gen, (4, 3), device), torch.empty_like(x) if with_out else None,
            torch.empty(6, 12, dtype=torch.float64, device=device), torch.zeros(64, dtype=torch.int32, device=device))
    torch.library.opcheck(torch.ops.fastnorm.running_norm_triton.default, args, dict(HYPER))


@needs_triton_backend
def test_opcheck_normalize_triton(device, gen):
    x = randn((33, 4, 3), gen, device=device)
    mean, var, _ = fresh_stats(gen, (4, 3), device)
    torch.library.opcheck(torch.ops.fastnorm.normalize_triton.default, (x, mean, var, torch.empty_like(x)),
                          dict(eps=1e-4, min_std=1e-2, max_std=None, clip=5.0))


@needs_triton_backend
def test_ops_reject_bad_arguments_naming_them(device, gen):
    x = randn((8, 4, 3), gen, device=device)
    mean, var, count = fresh_stats(gen, (4, 3), device)
    diag = torch.empty(6, 12, dtype=torch.float64, device=device)
    arrivals = torch.zeros(64, dtype=torch.int32, device=device)
    op = torch.ops.fastnorm.running_norm_triton
    with pytest.raises(ValueError, match="mean must be a contiguous float64 tensor"):
        op(x, None, mean.float(), var, count, None, diag, arrivals, **HYPER)
    with pytest.raises(ValueError, match=r"diag must be a contiguous float64 tensor of shape \(6, 12\)"):
        op(x, None, mean, var, count, None, diag[:, :5], arrivals, **HYPER)
    with pytest.raises(ValueError, match="arrivals must be int32 zeros"):
        op(x, None, mean, var, count, None, diag, arrivals[:0], **HYPER)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        op(x, torch.ones(8, 5, dtype=torch.bool, device=device), mean, var, count, None, diag, arrivals, **HYPER)
    with pytest.raises(ValueError, match=r"x must have shape \(\*batch, 4, 3\)"):
        torch.ops.fastnorm.normalize_triton(x[..., :2], mean, var, torch.empty_like(x[..., :2]), eps=1e-4,
                                            min_std=None, max_std=None, clip=None)


def test_auto_never_picks_the_interpreter():
    x = torch.empty(0)
    triton_backend = BACKENDS["triton"]
    assert select_backend("auto", x).name != "triton"
    if INTERPRETED:
        assert not triton_backend.not_supported_reasons(x) and triton_backend.auto_skip_reasons(x)
    elif TRITON_ERROR is None:
        assert any("TRITON_INTERPRET=1" in reason for reason in triton_backend.not_supported_reasons(x))


def test_ops_without_triton_kernels_are_named():
    reasons = BACKENDS["triton"].not_supported_reasons(torch.empty(0), "batch_moments")
    assert any("no kernel for batch_moments" in reason for reason in reasons)


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
    for _ in range(3):  # every replay finds its arrival counters zeroed by the previous one
        static_x.copy_(randn((4096, 8, 16), gen, device="cuda", mean=2.0))
        expected = reference.running_norm(static_x, None, norm.mean, norm.var, norm.count, **hyper_of(norm))
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(static_out, expected.y, **Y_TOL[torch.float32])
        torch.testing.assert_close(norm.mean, expected.mean, rtol=1e-6, atol=1e-6)
        assert torch.equal(norm.count, expected.count)


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="compiled in the run without TRITON_INTERPRET")
def test_kernels_compile_for_sm90(tmp_path):
    """Both kernels, in a few variants, through Triton's whole pipeline to sm_90 machine code,
    without a GPU (a kernel that only ever ran in the interpreter may not compile)."""
    script = textwrap.dedent("""
        import triton, triton.language as tl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from fastnorm.triton_kernels import running_norm as k

        POINTERS = {"x_ptr": "*{x}", "out_ptr": "*{x}", "mask_ptr": "*u8", "arrivals_ptr": "*i32"}
        SIZES = {"x_row_stride", "out_row_stride", "mask_cols", "mask_group", "rows", "cols", "rows_per_split"}

        def compile_kernel(kernel, x, constants):
            signature, values = {}, {}
            for p in kernel.params:
                if p.is_constexpr or constants.get(p.name, 0) is None:
                    signature[p.name], values[p.name] = "constexpr", constants[p.name]
                elif p.name.endswith("_ptr"):
                    signature[p.name] = POINTERS.get(p.name, "*fp64").format(x=x)
                elif p.name in SIZES:
                    signature[p.name] = "i32"
                else:  # a float: Triton would pass a Python float as float32 without the annotation
                    assert p.annotation_type == "fp64", (kernel.fn.__name__, p.name, p.annotation_type)
                    signature[p.name] = "fp64"
            return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=values),
                                  target=GPUTarget("cuda", 90, 32)).asm["ptx"]

        reduce = dict(HAS_MASK=True, WITH_OUTPUT=True, ACC=tl.float32, BLOCK_R=32, BLOCK_C=64, MERGE_R=16)
        ptx = compile_kernel(k._reduce_kernel, "fp32", reduce)
        assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
        compile_kernel(k._reduce_kernel, "bf16", dict(reduce, mask_ptr=None, HAS_MASK=False, WITH_OUTPUT=False))
        normalize = dict(HAS_MASK=True, WITH_DIAG=True, ACC=tl.float32, BLOCK_R=16, BLOCK_C=128)
        assert "red.global.gpu.relaxed.max.s64" in compile_kernel(k._normalize_kernel, "fp16", normalize)
        compile_kernel(k._normalize_kernel, "fp64", dict(normalize, mask_ptr=None, diag_ptr=None, HAS_MASK=False,
                                                         WITH_DIAG=False, ACC=tl.float64, BLOCK_C=32, BLOCK_R=64))
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@needs_triton
@pytest.mark.skipif(INTERPRETED, reason="traced in the run without TRITON_INTERPRET")
def test_triton_op_traces_to_its_kernels():
    """What torch.compile sees of fastnorm::running_norm_triton on a GPU, traced with fake CUDA
    tensors and a stand-in for the GPU driver: the two Triton kernels, which write only the
    statistics, the diagnostics, the workspace and y (so x is never copied)."""
    script = textwrap.dedent("""
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

        def step(x, mask, mean, var, count, out, diag, arrivals):
            torch.ops.fastnorm.running_norm_triton(x, mask, mean, var, count, out, diag, arrivals, 0.99, None,
                                                   1e-4, 1e-2, None, 10.0)
            return out

        def show(graph, inputs):
            print(graph.code)
            raise SystemExit(0)

        with FakeTensorMode():
            f64 = dict(dtype=torch.float64, device="cuda")
            x = torch.empty(4096, 16, 32, device="cuda")
            args = (x, torch.empty(4096, 16, dtype=torch.bool, device="cuda"), torch.empty(16, 32, **f64),
                    torch.empty(16, 32, **f64), torch.empty(16, 32, **f64), torch.empty_like(x),
                    torch.empty(6, 512, **f64), torch.zeros(1024, dtype=torch.int32, device="cuda"))
            aot_function(step, fw_compiler=show)(*args)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    written = re.findall(r"triton_kernel_wrapper_functional\(.*?tensors_to_clone = \[(.*?)\]", result.stdout)
    assert written == ["'mean_ptr', 'var_ptr', 'count_ptr', 'diag_ptr', 'partials_ptr', 'arrivals_ptr'",
                       "'out_ptr', 'diag_ptr'"], result.stdout
