"""The fastnorm::normalize_advantages op: opcheck, torch.compile, determinism, both CPU instruction
sets, and its own argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastnorm import _ops, normalize_advantages
from helpers import random_mask, randn

needs_extension = pytest.mark.skipif(_ops.EXTENSION_ERROR is not None, reason=str(_ops.EXTENSION_ERROR))
needs_cpu_kernel = pytest.mark.skipif(not _ops.has_kernel("normalize_advantages", "CPU"),
                                      reason="fastnorm._C has no CPU kernel for normalize_advantages")


def op_args(gen, device, shape=(33, 4, 3), mask_numel=33 * 4):
    x = randn(shape, gen, device=device)
    mask = random_mask((mask_numel,), gen, device) if mask_numel else None
    stats = torch.empty(4, shape[1], dtype=torch.float64, device=device)
    return x, mask, torch.empty_like(x), stats


@needs_extension
@pytest.mark.parametrize("shape,mask_numel", [((33, 4, 3), 33 * 4), ((33, 4, 3), 0), ((1, 1, 500), 5),
                                              ((4, 3, 5), 4 * 3 * 5)], ids=str)
def test_opcheck(device, gen, shape, mask_numel):
    if not _ops.has_kernel("normalize_advantages", device.type.upper()):
        pytest.skip(f"no {device.type} kernel for normalize_advantages")
    torch.library.opcheck(torch.ops.fastnorm.normalize_advantages.default, op_args(gen, device, shape, mask_numel),
                          dict(min_std=1e-4, unbiased=True))


@needs_cpu_kernel
def test_op_rejects_bad_arguments_directly(gen):
    x, mask, out, stats = op_args(gen, "cpu")
    op = torch.ops.fastnorm.normalize_advantages
    with pytest.raises(RuntimeError, match=r"x must be 3-D \(outer, groups, inner\), got shape \[33, 12\]"):
        op(x.view(33, 12), None, out.view(33, 12), stats, 1e-4, True)
    with pytest.raises(RuntimeError, match=r"stats must be a contiguous float64 tensor of shape \(4, 4\)"):
        op(x, mask, out, stats[:, :3], 1e-4, True)
    with pytest.raises(RuntimeError, match="min_std must be finite and > 0, got 0"):
        op(x, mask, out, stats, 0.0, True)
    with pytest.raises(RuntimeError, match="mask must have a number of elements that divides x's 396, got 5"):
        op(x, mask[:5], out, stats, 1e-4, True)
    with pytest.raises(RuntimeError, match="mask must be 1-D"):
        op(x, mask.view(33, 4), out, stats, 1e-4, True)
    with pytest.raises(RuntimeError, match="out must have x's dtype"):
        op(x, mask, out.double(), stats, 1e-4, True)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # out overlapping x partially
        big = torch.empty(34, 4, 3)
        op(big[1:], None, big[:-1], stats, 1e-4, True)


def test_torch_compile_fullgraph(adv_backend, device, gen):
    @torch.compile(fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    def step(adv, mask):
        y, stats = normalize_advantages(adv, mask=mask, dim=0, backend=adv_backend)
        return y * 2.0, stats.std_raw, stats.std_below_floor

    for _ in range(2):
        adv = randn((33, 4, 3), gen, device=device)
        mask = random_mask((33, 4), gen, device)
        y, std, below = step(adv, mask)
        y_eager, stats = normalize_advantages(adv, mask=mask, dim=0, backend=adv_backend)
        torch.testing.assert_close(y, y_eager * 2.0, rtol=0, atol=0)
        assert torch.equal(std, stats.std_raw) and torch.equal(below, stats.std_below_floor)


@needs_cpu_kernel
@pytest.mark.parametrize("shape,dim", [((200_003,), None), ((9_001, 7), 0), ((50_001, 8), 0), ((3, 70_001), 1)],
                         ids=str)
def test_results_do_not_depend_on_thread_count(gen, shape, dim):
    adv = randn(shape, gen)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(normalize_advantages(adv, dim=dim, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    for y, stats in results[1:]:
        assert torch.equal(y, results[0][0])
        for a, b in zip(stats, results[0][1]):
            assert torch.equal(a, b)


@needs_cpu_kernel
def test_baseline_instruction_set_matches_reference():
    """The kernels compiled for the baseline ISA (FASTNORM_CPU_ISA=base) in a fresh process."""
    script = textwrap.dedent("""
        import sys, torch
        sys.path.insert(0, sys.argv[1])
        from fastnorm import advantages_reference, normalize_advantages
        from helpers import Y_TOL, random_mask, randn
        g = torch.Generator().manual_seed(int(sys.argv[2]))
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            for shape, dims, mask_dims in [((3001,), (0,), 1), ((301, 5, 7), (0,), 2), ((9, 3000), (1,), 2),
                                           ((301, 8), (0,), 1), ((301, 4, 2), (0, 2), 3)]:
                adv = randn(shape, g, dtype=dtype, mean=1.0, scale=2.0)
                adv[3, ...] = float("nan")
                mask = random_mask(shape[:mask_dims], g)
                y, stats = normalize_advantages(adv, mask=mask, dim=dims, backend="cpu")
                ref = advantages_reference.normalize_advantages(adv, mask, dims)
                torch.testing.assert_close(y, ref.y, equal_nan=True, **Y_TOL[dtype])
                for name in ("mean", "std_raw", "count", "norm_max_abs"):
                    torch.testing.assert_close(getattr(stats, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
        print("ok")
    """)
    env = dict(os.environ, FASTNORM_CPU_ISA="base")
    seed = str(int(torch.randint(0, 2**31, ())))
    result = subprocess.run([sys.executable, "-c", script, os.path.dirname(__file__), seed], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
