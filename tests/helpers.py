"""Data makers and the per-dtype tolerance table shared by the tests."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastnorm import reference

# Tolerances of y against the float64 reference rounded to the same dtype: the kernels compute z
# in float32 (float64 for float64) and round once, so half precision may differ by one ulp of y
# (|y| <= clip = 10: one ulp is 2^-7 for float16, 2^-4 for bfloat16 near 10).
Y_TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}
# Tolerances of the float64 statistics: the inputs are exact in float64, the kernels accumulate
# blocks in float32 (float64 for float64 inputs) and merge them in float64.
STAT_TOL = {
    torch.float64: dict(rtol=1e-11, atol=1e-11),
    torch.float32: dict(rtol=2e-6, atol=2e-6),
    torch.float16: dict(rtol=2e-6, atol=2e-6),
    torch.bfloat16: dict(rtol=2e-6, atol=2e-6),
}
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def randn(shape: Sequence[int], gen: torch.Generator, *, dtype=torch.float32, device="cpu", mean=0.0,
          scale=1.0) -> torch.Tensor:
    """Normal data with per-column offsets and scales around mean/scale (never all zeros)."""
    shape = tuple(shape)
    cols = shape[-1] if shape else 1
    col_scale = scale * (0.5 + torch.rand(cols, generator=gen, dtype=torch.float64))
    col_mean = mean + scale * torch.randn(cols, generator=gen, dtype=torch.float64)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * col_scale + col_mean
    return x.to(dtype=dtype, device=device)


def random_mask(shape: Sequence[int], gen: torch.Generator, device="cpu", p=0.7) -> torch.Tensor:
    return (torch.rand(tuple(shape), generator=gen) < p).to(device)


# RunningNorm's non-default divisor and batch-variance options, with an eps large enough that its
# placement moves y far beyond the tolerances (sqrt(v + 0.3) against sqrt(v) + 0.3).
OPTION_CASES = [
    dict(eps_placement="std", eps=0.3),
    dict(batch_var="unbiased"),
    dict(eps_placement="std", batch_var="unbiased", eps=0.3, min_std=None),
]


def option_id(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items())


def op_hyper(norm) -> dict:
    """The keyword arguments of the running_norm and merge_normalize ops (backends, reference) for norm."""
    return dict(momentum=norm.momentum, max_count=norm.max_count, eps=norm.eps, min_std=norm.min_std,
                max_std=norm.max_std, clip=norm.clip, eps_on_std=norm.eps_placement == "std",
                unbiased=norm.batch_var == "unbiased", scale=norm.scale if norm.min_std_rel is not None else None,
                min_std_rel=norm.min_std_rel, previous=norm.normalize_with == "previous")


def expected_step(norm, x, mask=None, with_output=True) -> reference.RunningNormResult:
    """What the reference computes for norm(x, mask) from norm's current statistics."""
    return reference.running_norm(x, mask, norm.mean, norm.var, norm.count, with_output=with_output, **op_hyper(norm))


def assert_stats_close(norm, expected: reference.RunningNormResult, dtype, scale: float = 1.0,
                       tol: Optional[dict] = None):
    tol = tol or STAT_TOL[dtype]
    torch.testing.assert_close(norm.count, expected.count, rtol=0, atol=0)
    torch.testing.assert_close(norm.mean, expected.mean, rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(norm.var, expected.var, rtol=tol["rtol"], atol=tol["atol"] * scale * scale)


def assert_diag_close(diag, expected_diag, dtype, scale: float = 1.0):
    tol = STAT_TOL[dtype]
    torch.testing.assert_close(diag[0], expected_diag[0], rtol=0, atol=0)  # batch count
    torch.testing.assert_close(diag[1], expected_diag[1], rtol=tol["rtol"], atol=tol["atol"] * scale)
    torch.testing.assert_close(diag[2], expected_diag[2], rtol=tol["rtol"], atol=tol["atol"] * scale**2)
    torch.testing.assert_close(diag[3], expected_diag[3], rtol=0, atol=0)  # non-finite count
    # The clipped count may differ where |z| rounds across clip; max |z| to the output's tolerance.
    torch.testing.assert_close(diag[4], expected_diag[4], rtol=0, atol=2, equal_nan=True)
    torch.testing.assert_close(diag[5], expected_diag[5], equal_nan=True, **Y_TOL[dtype])
