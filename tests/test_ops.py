"""The registered fastnorm ops: opcheck, torch.compile, determinism, and both CPU instruction sets."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastnorm import RunningNorm, _ops
from helpers import Y_TOL, expected_step, random_mask, randn

needs_extension = pytest.mark.skipif(_ops.EXTENSION_ERROR is not None, reason=str(_ops.EXTENSION_ERROR))
HYPER = dict(momentum=0.99, max_count=None, eps=1e-4, min_std=1e-2, max_std=None, clip=5.0)


def skip_without_kernel(op, device):
    """Skips on a device that fastnorm._C has no kernel of op for (backends list it as missing)."""
    if not _ops.has_kernel(op, device.type.upper()):
        pytest.skip(f"fastnorm._C has no {device.type} kernel for {op}")


def op_args(gen, device, dtype=torch.float32, with_out=True, with_mask=True):
    x = randn((33, 4, 3), gen, dtype=dtype, device=device)
    mask = random_mask((33, 4), gen, device) if with_mask else None
    stats = [torch.zeros(4, 3, dtype=torch.float64, device=device) + randn((4, 3), gen, device=device).double(),
             torch.rand(4, 3, generator=gen, dtype=torch.float64).to(device) + 0.5,
             torch.full((4, 3), 7.0, dtype=torch.float64, device=device)]
    out = torch.empty_like(x) if with_out else None
    diag = torch.empty(6, 12, dtype=torch.float64, device=device)
    return (x, mask, *stats, out, diag)


@needs_extension
@pytest.mark.parametrize("with_out", [True, False])
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_running_norm(device, gen, with_out, with_mask):
    args = op_args(gen, device, with_out=with_out, with_mask=with_mask)
    torch.library.opcheck(torch.ops.fastnorm.running_norm.default, args, HYPER)


@needs_extension
def test_opcheck_normalize(device, gen):
    x = randn((33, 4, 3), gen, device=device)
    mean = randn((4, 3), gen, device=device).double()
    var = torch.rand(4, 3, generator=gen, dtype=torch.float64).to(device)
    torch.library.opcheck(torch.ops.fastnorm.normalize.default, (x, mean, var, torch.empty_like(x)),
                          dict(eps=1e-4, min_std=1e-2, max_std=None, clip=5.0))


@needs_extension
@pytest.mark.parametrize("with_mask", [True, False])
def test_opcheck_batch_moments(device, gen, with_mask):
    skip_without_kernel("batch_moments", device)
    x, mask = op_args(gen, device, with_mask=with_mask)[:2]
    moments = torch.empty(6, 4, 3, dtype=torch.float64, device=device)
    torch.library.opcheck(torch.ops.fastnorm.batch_moments.default, (x, mask, moments))


@needs_extension
@pytest.mark.parametrize("with_out", [True, False])
def test_opcheck_merge_normalize(device, gen, with_out):
    skip_without_kernel("batch_moments", device)
    skip_without_kernel("merge_normalize", device)
    x, mask, mean, var, count, out, diag = op_args(gen, device, with_out=with_out)
    parts = torch.empty(3, 6, 4, 3, dtype=torch.float64, device=device)
    for part in parts:
        torch.ops.fastnorm.batch_moments(randn((17, 4, 3), gen, device=device), None, part)
    torch.library.opcheck(torch.ops.fastnorm.merge_normalize.default, (x, mask, parts, mean, var, count, out, diag),
                          HYPER)


@needs_extension
def test_opcheck_with_eps_on_std_and_unbiased(device, gen):
    skip_without_kernel("merge_normalize", device)
    options = dict(eps_on_std=True, unbiased=True)
    args = op_args(gen, device)
    torch.library.opcheck(torch.ops.fastnorm.running_norm.default, args, {**HYPER, **options})
    x, mask, mean, var, count, out, diag = op_args(gen, device)
    torch.library.opcheck(torch.ops.fastnorm.normalize.default, (x, mean, var, out),
                          dict(eps=1e-4, min_std=1e-2, max_std=None, clip=5.0, eps_on_std=True))
    parts = torch.empty(2, 6, 4, 3, dtype=torch.float64, device=device)
    for part in parts:
        torch.ops.fastnorm.batch_moments(randn((1, 4, 3), gen, device=device), None, part)  # single samples
    torch.library.opcheck(torch.ops.fastnorm.merge_normalize.default, (x, mask, parts, mean, var, count, out, diag),
                          {**HYPER, **options})


@needs_extension
def test_split_ops_reject_bad_arguments_directly(device, gen):
    skip_without_kernel("batch_moments", device)
    skip_without_kernel("merge_normalize", device)
    x, mask, mean, var, count, out, diag = op_args(gen, device)
    moments = torch.zeros(6, 4, 3, dtype=torch.float64, device=device)
    with pytest.raises(RuntimeError, match=r"moments must be a contiguous float64 tensor of shape \(6, \*shape\)"):
        torch.ops.fastnorm.batch_moments(x, mask, moments[:5])
    with pytest.raises(RuntimeError, match=r"x must have shape \(\*batch, \[3, 4\]\), got \[33, 4, 3\]"):
        torch.ops.fastnorm.batch_moments(x, mask, torch.zeros(6, 3, 4, dtype=torch.float64, device=device))
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.fastnorm.batch_moments(x, mask.float(), moments)
    merge = torch.ops.fastnorm.merge_normalize
    with pytest.raises(RuntimeError, match=r"parts must be a contiguous float64 tensor of shape \(num_parts >= 1"):
        merge(x, mask, moments, mean, var, count, out, diag, **HYPER)  # no parts dim
    with pytest.raises(RuntimeError, match="parts must be a contiguous float64 tensor"):
        merge(x, mask, moments[None].float(), mean, var, count, out, diag, **HYPER)
    with pytest.raises(RuntimeError, match="parts must be a contiguous float64 tensor"):
        merge(x, mask, moments[:0][None], mean, var, count, out, diag, **HYPER)
    with pytest.raises(RuntimeError, match="clip must be > 0"):
        merge(x, mask, moments[None], mean, var, count, out, diag, **dict(HYPER, clip=-1.0))


@needs_extension
def test_op_rejects_bad_arguments_directly(device, gen):
    x, mask, mean, var, count, out, diag = op_args(gen, device)
    with pytest.raises(RuntimeError, match="mean must be float64"):
        torch.ops.fastnorm.running_norm(x, mask, mean.float(), var, count, out, diag, **HYPER)
    with pytest.raises(RuntimeError, match=r"diag must be a contiguous float64 tensor of shape \(6, 12\)"):
        torch.ops.fastnorm.running_norm(x, mask, mean, var, count, out, diag[:, :5], **HYPER)
    with pytest.raises(RuntimeError, match="momentum must be in"):
        torch.ops.fastnorm.running_norm(x, mask, mean, var, count, out, diag, **dict(HYPER, momentum=2.0))
    with pytest.raises(RuntimeError, match="unsupported operation"):  # out overlapping x partially
        big = torch.empty(34, 4, 3, device=device)
        torch.ops.fastnorm.running_norm(big[1:], mask, mean, var, count, big[:-1], diag, **HYPER)


def test_torch_compile_fullgraph(backend, device, gen):
    eager = RunningNorm((4, 3), backend=backend, device=device)
    compiled_norm = RunningNorm((4, 3), backend=backend, device=device)

    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(norm, x, mask):
        y = norm(x, mask=mask)
        return y * 2.0, norm.ready

    for _ in range(3):
        x = randn((33, 4, 3), gen, device=device)
        mask = random_mask((33, 4), gen, device)
        y_compiled, ready = step(compiled_norm, x, mask)
        y_eager = eager(x, mask=mask) * 2.0
        torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
        assert torch.equal(compiled_norm.mean, eager.mean) and torch.equal(compiled_norm.var, eager.var)
    assert int(compiled_norm.steps) == 3 and bool(ready)


@needs_extension
def test_results_do_not_depend_on_thread_count(gen):
    x = randn((70_000, 3, 5), gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            norm = RunningNorm((3, 5), backend="cpu")
            y = norm(x)
            results.append((y, norm.mean.clone(), norm.var.clone(), norm._diag.clone()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@needs_extension
def test_baseline_instruction_set_matches_reference(tmp_path):
    """The kernels compiled for the baseline ISA (FASTNORM_CPU_ISA=base) in a fresh process."""
    script = textwrap.dedent("""
        import torch, sys
        sys.path.insert(0, sys.argv[1])
        from fastnorm import RunningNorm
        from helpers import Y_TOL, assert_stats_close, expected_step, random_mask, randn
        g = torch.Generator().manual_seed(int(sys.argv[2]))
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            norm = RunningNorm((5, 7), backend="cpu")
            for _ in range(2):
                x = randn((301, 5, 7), g, dtype=dtype, mean=1.0, scale=2.0)
                mask = random_mask((301, 5), g)
                expected = expected_step(norm, x, mask)
                torch.testing.assert_close(norm(x, mask=mask), expected.y, **Y_TOL[dtype])
                assert_stats_close(norm, expected, dtype, scale=2.0)
        print("ok")
    """)
    env = dict(os.environ, FASTNORM_CPU_ISA="base")
    seed = str(int(torch.randint(0, 2**31, ())))
    tests_dir = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", script, tests_dir, seed], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_large_batch_spans_many_tiles(kernel_backend, device, gen):
    # Enough rows for many row chunks and column tiles (merge order, partial buffers).
    x = randn((9000, 300), gen, device=device, mean=-3.0, scale=0.5)
    mask = random_mask((9000, 300), gen, device)
    norm = RunningNorm((300,), momentum=None, backend=kernel_backend, device=device)
    expected = expected_step(norm, x, mask)
    y = norm(x, mask=mask)
    torch.testing.assert_close(y, expected.y, **Y_TOL[torch.float32])
    torch.testing.assert_close(norm.mean, expected.mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(norm.var, expected.var, rtol=1e-5, atol=1e-7)
    assert torch.equal(norm.count, expected.count)
