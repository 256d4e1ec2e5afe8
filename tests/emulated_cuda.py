"""The CUDA kernels of csrc/cuda/*.cu built for the CPU emulator (tests/cuda_emulator) and called
through ctypes: the build (once per session), mirrors of the launchers' problem structs, and one
call per op. Used by tests/test_cuda_emulated*.py.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMULATOR_DIR = os.path.join(ROOT, "tests", "cuda_emulator")
KERNEL_SOURCES = ("running_norm.cu", "advantages.cu")
DTYPE_KIND = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
# Emulated devices (cuda_emulator.h: emu::multiprocessors): 1 multiprocessor keeps the row splits
# and pieces few, 132 (an H100) splits any batch of a few thousand rows.
ONE_SM, FOUR_SMS, H100_SMS = 0, 1, 2
# kernel<<<grid, block, shared, stream>>>(args) -> emu::launch(grid, block, shared, stream, [&] { kernel(args); })
LAUNCH = re.compile(r"([A-Za-z_]\w*(?:<[^<>;]*>)?)<<<([^;]*?)>>>\(([^;]*)\);")


def cuda_include_dir():
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "include", "cuda_fp16.h")):
            return os.path.join(root, "include")
    return None


class UpdateParams(ctypes.Structure):
    _fields_ = [("min_weight", ctypes.c_double), ("max_count", ctypes.c_double), ("unbiased", ctypes.c_bool)]


class Problem(ctypes.Structure):
    """Mirror of fastnorm::cuda::Problem (csrc/cuda/running_norm.h); its size is checked."""

    _fields_ = [("dtype", ctypes.c_int), ("rows", ctypes.c_int64), ("cols", ctypes.c_int64),
                ("x", ctypes.c_void_p), ("x_row_stride", ctypes.c_int64), ("with_output", ctypes.c_bool),
                ("out", ctypes.c_void_p), ("out_row_stride", ctypes.c_int64),
                ("mask", ctypes.c_void_p), ("mask_cols", ctypes.c_int64),
                ("mean", ctypes.c_void_p), ("var", ctypes.c_void_p), ("count", ctypes.c_void_p),
                ("diag", ctypes.c_void_p), ("update", UpdateParams),
                ("eps", ctypes.c_double), ("min_std", ctypes.c_double), ("max_std", ctypes.c_double),
                ("clip", ctypes.c_double), ("eps_on_std", ctypes.c_bool), ("moments", ctypes.c_void_p),
                ("parts", ctypes.c_void_p),
                ("num_parts", ctypes.c_int64), ("scale", ctypes.c_void_p), ("min_std_rel", ctypes.c_double),
                ("previous", ctypes.c_bool), ("out_overlaps_x", ctypes.c_bool), ("steps", ctypes.c_void_p)]


class Plan(ctypes.Structure):
    _fields_ = [("vector_width", ctypes.c_int64), ("column_threads", ctypes.c_int64),
                ("column_tiles", ctypes.c_int64), ("row_splits", ctypes.c_int64)]


class AdvantageProblem(ctypes.Structure):
    """Mirror of fastnorm::cuda::AdvantageProblem (csrc/cuda/advantages.h); its size is checked."""

    _fields_ = [("dtype", ctypes.c_int), ("outer", ctypes.c_int64), ("groups", ctypes.c_int64),
                ("inner", ctypes.c_int64), ("x", ctypes.c_void_p), ("out", ctypes.c_void_p),
                ("mask", ctypes.c_void_p), ("mask_group", ctypes.c_int64), ("stats", ctypes.c_void_p),
                ("min_std", ctypes.c_double), ("unbiased", ctypes.c_bool), ("moments", ctypes.c_void_p),
                ("parts", ctypes.c_void_p), ("num_parts", ctypes.c_int64)]


class AdvantagePlan(ctypes.Structure):
    """What the emulated advantage ops report of their plan (tests/cuda_emulator/emulated_ops.cpp)."""

    _fields_ = [("columns", ctypes.c_int64), ("vector_width", ctypes.c_int64), ("pieces", ctypes.c_int64),
                ("group_threads", ctypes.c_int64), ("column_mask", ctypes.c_int64),
                ("reduce_row_splits", ctypes.c_int64), ("normalize_vector_width", ctypes.c_int64)]


# ColumnMask (csrc/cuda/advantages.h).
COLUMN_MASKS = ("none", "direct", "expanded_rows", "expanded_entries")


@functools.lru_cache(maxsize=None)
def _build() -> ctypes.CDLL:
    """Compiles the kernels and emulated_ops.cpp into one library (once per session)."""
    include = cuda_include_dir()
    compiler = shutil.which("g++")
    if include is None or compiler is None:
        raise FileNotFoundError("the CUDA emulation needs g++ and the CUDA headers (cuda_fp16.h under "
                                "$CUDA_HOME/include)")
    build = tempfile.mkdtemp(prefix="fastnorm_cuda_emulator_")
    rewritten = []
    for name in KERNEL_SOURCES:
        with open(os.path.join(ROOT, "csrc", "cuda", name)) as f:
            source, launches = LAUNCH.subn(lambda m: f"::emu::launch({m[2]}, [&] {{ {m[1]}({m[3]}); }});", f.read())
        assert launches >= 3, f"found no kernel launch to rewrite in {name}"
        path = os.path.join(build, name.replace(".cu", "_emulated.cpp"))
        with open(path, "w") as f:
            f.write(source)
        rewritten.append(path)
    library = os.path.join(build, "libfastnorm_cuda_emulated.so")
    # UBSan's alignment check stands in for the GPU's fault on a misaligned vector access (x86 allows
    # them): it reports on stderr, which the tests' no_misaligned_access fixture turns into a failure.
    # -Bsymbolic: the launchers call the emulator's CUDA runtime functions (emulated_ops.cpp:
    # cudaMemsetAsync, cudaDeviceGetAttribute, ...), not libcudart's, which a CUDA build of torch
    # loads into the global scope (without it, there the counters were never zeroed and the device
    # was the real one: the row-split cases failed on a GPU machine and passed on CPU-only torch;
    # tests/test_cuda_emulator.py preloads a decoy runtime).
    command = [compiler, "-std=c++17", "-O1", "-U_FORTIFY_SOURCE", "-fsanitize=alignment", "-fPIC", "-shared",
               "-Wall", "-Wno-unknown-pragmas", "-include", os.path.join(EMULATOR_DIR, "cuda_emulator.h"),
               "-I", os.path.join(ROOT, "csrc", "cuda"), "-I", include, *rewritten,
               os.path.join(EMULATOR_DIR, "emulated_ops.cpp"), "-Wl,--no-undefined", "-Wl,-Bsymbolic", "-o", library]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(library)
    lib.emulated_problem_bytes.restype = ctypes.c_size_t
    lib.emulated_advantage_problem_bytes.restype = ctypes.c_size_t
    assert lib.emulated_problem_bytes() == ctypes.sizeof(Problem), "Problem's mirror is out of date"
    assert lib.emulated_advantage_problem_bytes() == ctypes.sizeof(AdvantageProblem), \
        "AdvantageProblem's mirror is out of date"
    return lib


@pytest.fixture
def emulator() -> ctypes.CDLL:
    """The built library, or a skip where g++ or the CUDA headers are missing. (A test module
    imports this fixture and no_misaligned_access.)"""
    try:
        return _build()
    except FileNotFoundError as missing:
        pytest.skip(str(missing))


@pytest.fixture(autouse=True)
def no_misaligned_access(capfd):
    """Fails a test after which UBSan reported a misaligned access (a fault on a GPU)."""
    yield
    err = capfd.readouterr().err
    assert "runtime error" not in err, err


# cudaError_t values the emulated launches report (cuda_runtime_api.h).
CUDA_ERROR_INVALID_CONFIGURATION = 9


def check_launched(status: int, op: str) -> None:
    """Fails where an emulated op's launches left a CUDA error (what the binding's
    C10_CUDA_KERNEL_LAUNCH_CHECK raises on a GPU), e.g. a launch configuration CUDA refuses."""
    assert status == 0, f"{op}: the launches left CUDA error {status}"


def make_problem(x_rows, mean, var, hyper, *, out_rows=None, mask_rows=None, count=None, diag=None, steps=None):
    """The launchers' problem, as the binding builds it; hyper holds the op's keyword arguments
    (previous among them) and steps, when given, is the 0-dim int64 update counter."""
    p = Problem()
    p.dtype = DTYPE_KIND[x_rows.dtype]
    p.rows, p.cols = x_rows.shape
    p.x, p.x_row_stride = x_rows.data_ptr(), x_rows.stride(0)
    if out_rows is not None:
        p.with_output, p.out, p.out_row_stride = True, out_rows.data_ptr(), out_rows.stride(0)
        p.out_overlaps_x = out_rows.data_ptr() == x_rows.data_ptr()  # the tests' only overlap: out=x
    if steps is not None:
        assert steps.dtype == torch.int64 and steps.dim() == 0
        p.steps = steps.data_ptr()
    if mask_rows is not None:
        p.mask, p.mask_cols = mask_rows.data_ptr(), mask_rows.shape[1]
    if mean is not None:
        p.mean, p.var = mean.data_ptr(), var.data_ptr()
    if count is not None:
        p.count, p.diag = count.data_ptr(), diag.data_ptr()
    if hyper is not None:
        momentum, max_count = hyper.get("momentum"), hyper.get("max_count")
        p.update = UpdateParams(0.0 if momentum is None else 1.0 - momentum,
                                math.inf if max_count is None else max_count, hyper.get("unbiased", False))
        p.eps = hyper["eps"]
        p.min_std = hyper["min_std"] or 0.0
        p.max_std = math.inf if hyper["max_std"] is None else hyper["max_std"]
        p.clip = math.inf if hyper["clip"] is None else hyper["clip"]
        p.eps_on_std = hyper.get("eps_on_std", False)
        if hyper.get("scale") is not None:
            p.scale, p.min_std_rel = hyper["scale"].data_ptr(), hyper.get("min_std_rel") or 0.0
        p.previous = hyper.get("previous", False) and p.with_output
    return p


def as_rows(x, cols):
    """x (rows, *stats_shape) as a (rows, cols) view with unit column stride, as the binding sees it."""
    x_rows = x.reshape(x.shape[0], cols)
    assert x_rows.data_ptr() == x.data_ptr() and (cols <= 1 or x_rows.stride(1) == 1)
    return x_rows


def mask_as_rows(mask, rows):
    return mask.reshape(rows, mask.numel() // rows if rows else 1).contiguous() if mask is not None else None


def running_norm(lib, device, x, mask, stats, hyper, *, out=None, with_output=True, steps=None, diag=None):
    """fastnorm::running_norm on x (rows, *stats_shape), mutating stats (and steps, when given);
    returns (y, diag, plan). y is poisoned (NaN) first, diag (unless given) filled with -7, so that an
    unwritten element shows."""
    mean, var, count = stats
    cols = mean.numel()
    if with_output and out is None:
        out = torch.full_like(x, float("nan"))
    if diag is None:
        diag = torch.full((6, cols), -7.0, dtype=torch.float64)
    mask_rows = mask_as_rows(mask, x.shape[0])  # alive until the call returns (it may be a copy)
    problem = make_problem(as_rows(x, cols), mean, var, hyper, out_rows=out.reshape(x.shape[0], cols) if out is not None
                           else None, mask_rows=mask_rows, count=count, diag=diag, steps=steps)
    plan = Plan()
    check_launched(lib.emulated_running_norm(device, ctypes.byref(problem), ctypes.byref(plan)), "running_norm")
    return out, diag, plan


def batch_moments(lib, device, x, mask, stats_shape):
    """fastnorm::batch_moments of x (rows, *stats_shape): the table (6, *stats_shape) (poisoned
    first) and the plan."""
    cols = math.prod(stats_shape)
    moments = torch.full((6, *stats_shape), float("nan"), dtype=torch.float64)
    mask_rows = mask_as_rows(mask, x.shape[0])  # alive until the call returns (it may be a copy)
    problem = make_problem(as_rows(x, cols), None, None, None, mask_rows=mask_rows)
    problem.moments = moments.data_ptr()
    plan = Plan()
    check_launched(lib.emulated_batch_moments(device, ctypes.byref(problem), ctypes.byref(plan)), "batch_moments")
    return moments, plan


def merge_normalize(lib, device, x, mask, parts, stats, hyper, *, with_output=True, steps=None):
    """fastnorm::merge_normalize of the tables parts (P, 6, *stats_shape) with x, mutating stats (and
    steps, when given); returns (y or None, diag, plan), y and diag poisoned first."""
    mean, var, count = stats
    cols = mean.numel()
    out = torch.full_like(x, float("nan")) if with_output else None
    diag = torch.full((6, cols), -7.0, dtype=torch.float64)
    parts = parts.contiguous()
    mask_rows = mask_as_rows(mask, x.shape[0])  # alive until the call returns (it may be a copy)
    problem = make_problem(as_rows(x, cols), mean, var, hyper, out_rows=out.reshape(x.shape[0], cols) if with_output
                           else None, mask_rows=mask_rows, count=count, diag=diag, steps=steps)
    problem.parts, problem.num_parts = parts.data_ptr(), parts.shape[0]
    plan = Plan()
    check_launched(lib.emulated_merge_normalize(device, ctypes.byref(problem), ctypes.byref(plan)), "merge_normalize")
    return out, diag, plan


def advantage_problem(x, mask=None, *, out=None, stats=None, min_std=1e-4, unbiased=True):
    """The launchers' problem of x (O, G, I) contiguous with a flat mask, as the binding builds it."""
    assert x.dim() == 3 and x.is_contiguous()
    p = AdvantageProblem()
    p.dtype = DTYPE_KIND[x.dtype]
    p.outer, p.groups, p.inner = x.shape
    p.x = x.data_ptr()
    if out is not None:
        assert out.is_contiguous() and out.shape == x.shape
        p.out, p.stats = out.data_ptr(), stats.data_ptr()
    if mask is not None and x.numel() > 0:
        assert mask.dim() == 1 and mask.is_contiguous() and x.numel() % mask.numel() == 0
        p.mask, p.mask_group = mask.data_ptr(), x.numel() // mask.numel()
    p.min_std, p.unbiased = min_std, unbiased
    return p


def normalize_advantages(lib, device, x, mask=None, *, min_std=1e-4, unbiased=True, out=None):
    """fastnorm::normalize_advantages on x (O, G, I) contiguous with a flat mask: (y, stats (4, G),
    plan), y (poisoned first unless out is given) and stats poisoned so that an unwritten element
    shows."""
    if out is None:
        out = torch.full_like(x, float("nan"))
    stats = torch.full((4, x.shape[1]), -7.0, dtype=torch.float64)
    p = advantage_problem(x, mask, out=out, stats=stats, min_std=min_std, unbiased=unbiased)
    plan = AdvantagePlan()
    status = lib.emulated_normalize_advantages(device, ctypes.byref(p), ctypes.byref(plan))
    check_launched(status, "normalize_advantages")
    return out, stats, plan


def advantage_moments(lib, device, x, mask=None):
    """fastnorm::advantage_moments of x (O, G, I) contiguous with a flat mask: the table (5, G)
    (poisoned first) and the plan."""
    moments = torch.full((5, x.shape[1]), float("nan"), dtype=torch.float64)
    p = advantage_problem(x, mask)
    p.moments = moments.data_ptr()
    plan = AdvantagePlan()
    check_launched(lib.emulated_advantage_moments(device, ctypes.byref(p), ctypes.byref(plan)), "advantage_moments")
    return moments, plan


def normalize_advantages_from(lib, device, x, parts, *, min_std=1e-4, unbiased=True, out=None):
    """fastnorm::normalize_advantages_from of the tables parts (P, 5, G) with x (O, G, I) contiguous:
    (y, stats (4, G), plan), y (unless out is given) and stats poisoned first."""
    if out is None:
        out = torch.full_like(x, float("nan"))
    stats = torch.full((4, x.shape[1]), -7.0, dtype=torch.float64)
    parts = parts.contiguous()
    assert parts.dim() == 3 and parts.shape[1:] == (5, x.shape[1]) and parts.shape[0] >= 1
    p = advantage_problem(x, out=out, stats=stats, min_std=min_std, unbiased=unbiased)
    p.parts, p.num_parts = parts.data_ptr(), parts.shape[0]
    plan = AdvantagePlan()
    status = lib.emulated_normalize_advantages_from(device, ctypes.byref(p), ctypes.byref(plan))
    check_launched(status, "normalize_advantages_from")
    return out, stats, plan
