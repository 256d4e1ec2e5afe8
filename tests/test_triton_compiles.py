"""How many times the Triton kernels compile over a run: a random sequence of calls (batch sizes from
1 to thousands of rows, masks, hyper-parameters, modes, dtypes) must compile each kernel once per
combination of what a kernel is specialized on for a reason (x's dtype, which inputs exist, the mode,
whether the batch is split across programs, the mask's layout), never again for a new batch size or
a changed hyper-parameter (eps, clip, momentum, bounds: runtime arguments, not tl.constexpr).

Each launch is keyed as Triton keys its compile cache (its binder's specialization of the arguments:
constexprs, pointer dtypes and alignment, integers that are 1 or multiples of 16): on the CPU the
keys are computed without launching (a stand-in driver for an sm_90 target, CPU tensors: their
alignment is what Triton reads); on a GPU the kernels also run, and the number of kernels in
Triton's in-memory cache must equal the number of keys. One subprocess each (no TRITON_INTERPRET:
the kernels must be Triton's JITFunctions).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastnorm.triton_backend import TRITON_ERROR

SCRIPT = textwrap.dedent("""
    import math, random, sys, time
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import compute_cache_key
    from fastnorm import _triton_ops
    from fastnorm.triton_backend import TritonBackend
    from fastnorm.triton_kernels import advantages, launcher, running_norm

    DEVICE = sys.argv[1]
    if DEVICE == "cpu":
        class Sm90:  # what the binders ask the driver for
            def get_current_target(self):
                return GPUTarget("cuda", 90, 32)

        triton.runtime.driver.set_active(Sm90())
        _triton_ops._programs = lambda x: 4 * 132  # the blocks an H200 gets
        _triton_ops._steps = lambda x: {}

    keys, binders, config = {}, {}, [None]

    def recorded(kernel, grid, *args, **kwargs):
        if kernel not in binders:
            binders[kernel] = kernel.create_binder()[4]
        _, specialization, options = binders[kernel](*args, **kwargs)
        keys.setdefault((kernel.fn.__name__, config[0]), set()).add(compute_cache_key({}, specialization, options))
        if DEVICE == "cuda":
            launcher.launch(kernel, grid, *args, **kwargs)

    running_norm.launch = advantages.launch = recorded
    backend, rng = TritonBackend(), random.Random(int(sys.argv[2]))
    f64 = dict(dtype=torch.float64, device=DEVICE)
    SHAPE, COLS = (4, 12), 48

    def batch_size():
        return max(1, int(math.exp(rng.uniform(0, math.log(20000)))))

    def running_norm_call():
        rows, dtype = batch_size(), rng.choice([torch.float32, torch.bfloat16])
        mask_kind = rng.choice(["none", "rows", "agents"])
        previous, relative = rng.random() < 0.5, rng.random() < 0.5
        x = torch.randn((rows,) + SHAPE, device=DEVICE).to(dtype)
        mask = {"none": None, "rows": torch.rand(rows, device=DEVICE) < 0.7,
                "agents": torch.rand(rows, SHAPE[0], device=DEVICE) < 0.7}[mask_kind]
        mean, var, count = torch.randn(SHAPE, **f64), torch.rand(SHAPE, **f64) + 0.5, torch.full(SHAPE, 3.0, **f64)
        splits = _triton_ops.blocks_for(x, COLS).grid(rows, COLS)[1]
        config[0] = ("running_norm", dtype, mask_kind, previous, relative, splits > 1)
        backend.running_norm(
            x, mask, mean, var, count, torch.empty_like(x), torch.empty(6, COLS, **f64),
            momentum=rng.choice([None, rng.uniform(0.9, 0.999)]), max_count=rng.choice([None, rng.uniform(1e3, 1e6)]),
            eps=rng.uniform(1e-8, 1e-2), min_std=rng.choice([None, rng.uniform(1e-6, 1e-2)]),
            max_std=rng.choice([None, rng.uniform(1e2, 1e4)]), clip=rng.choice([None, rng.uniform(1.0, 10.0)]),
            eps_on_std=rng.random() < 0.5, unbiased=rng.random() < 0.5,
            scale=torch.rand(SHAPE, **f64) + 0.5 if relative else None,
            min_std_rel=rng.uniform(1e-3, 0.1) if relative else None, previous=previous,
            steps=torch.zeros((), dtype=torch.int64, device=DEVICE))

    def normalize_call():
        rows, dtype = batch_size(), rng.choice([torch.float32, torch.bfloat16])
        x = torch.randn((rows,) + SHAPE, device=DEVICE).to(dtype)
        config[0] = ("normalize", dtype)
        backend.normalize(x, torch.randn(SHAPE, **f64), torch.rand(SHAPE, **f64) + 0.5, torch.empty_like(x),
                          eps=rng.uniform(1e-8, 1e-2), min_std=rng.choice([None, 1e-3]), max_std=None,
                          clip=rng.choice([None, rng.uniform(1.0, 10.0)]))

    def advantages_call():
        n, dtype, masked = batch_size(), rng.choice([torch.float32, torch.bfloat16]), rng.random() < 0.5
        layout = rng.choice(["whole batch", "per agent"])  # (1, 1, n) or (n, 4, 1)
        x = torch.randn((1, 1, n) if layout == "whole batch" else (n, 4, 1), device=DEVICE).to(dtype)
        mask = torch.rand(x.numel(), device=DEVICE) < 0.7 if masked else None
        splits = advantages.choose_advantage_blocks(*x.shape, x.element_size(), _triton_ops._programs(x),
                                                    **_triton_ops._steps(x)).grid(*x.shape)[1]
        config[0] = ("normalize_advantages", dtype, layout, masked, splits > 1)
        backend.normalize_advantages(x, mask, torch.empty_like(x), torch.empty(4, x.shape[1], **f64),
                                     min_std=rng.uniform(1e-6, 1e-2), unbiased=rng.random() < 0.5)

    start = time.perf_counter()
    for _ in range(int(sys.argv[3])):
        rng.choice([running_norm_call, running_norm_call, normalize_call, advantages_call])()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start

    # Within a configuration, every launch of a kernel has one key: batch size and hyper-parameters
    # add no compile.
    varied = {k: len(v) for k, v in keys.items() if len(v) > 1}
    assert not varied, varied
    compiles = {}
    for (name, _), v in keys.items():
        compiles.setdefault(name, set()).update(v)
    if DEVICE == "cuda":  # what Triton compiled: as many kernels as keys
        device = torch.cuda.current_device()
        cached = {kernel.fn.__name__ + (" (advantages)" if kernel.fn.__module__.endswith("advantages") else ""):
                  len(kernel.device_caches[device][0]) for kernel in binders}
        assert sum(cached.values()) == sum(len(v) for v in compiles.values()), (cached, compiles)
    print(f"{sum(len(v) for v in compiles.values())} compiles for {len(keys)} configurations in {seconds:.1f} s:",
          {name: len(v) for name, v in compiles.items()})
""")


def run_sequence(device: str, seed: int, calls: int) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, device, str(seed), str(calls)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.skipif(TRITON_ERROR is not None, reason=str(TRITON_ERROR))
def test_batch_sizes_and_hyper_parameters_add_no_compile_keys():
    print(run_sequence("cpu", seed=20261204, calls=200))


@pytest.mark.skipif(TRITON_ERROR is not None, reason=str(TRITON_ERROR))
@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts real compiles: needs a CUDA device (the keys "
                    "are checked on the CPU by test_batch_sizes_and_hyper_parameters_add_no_compile_keys)")
def test_a_random_sequence_compiles_once_per_configuration():
    print(run_sequence("cuda", seed=7, calls=24))  # ~20 compiles: within a GPU run's 60 s a test
