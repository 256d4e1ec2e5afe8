"""Loads the compiled extension fastnorm._C and registers the fake kernels of its ops.

Importing fastnorm._C runs its TORCH_LIBRARY registrations (csrc/ops.cpp declares every schema);
the fake kernels tell torch.compile what the ops do to shapes. Without the extension the package
still works on the reference backend, and EXTENSION_ERROR says why the kernels are missing.
"""

from __future__ import annotations

import torch

try:
    from fastnorm import _C  # noqa: F401  (the import runs the op registrations)

    EXTENSION_ERROR: str | None = None
except ImportError as error:  # not built, or built against another torch
    EXTENSION_ERROR = f"the extension fastnorm._C is not built or failed to load ({error})"


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether fastnorm::<op> has a kernel for dispatch_key ("CPU", "CUDA")."""
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}", dispatch_key)


def _check_same_device(x, mean, mask, out) -> None:
    # The real kernels check this; here it keeps a meta x from passing for CPU statistics.
    for name, t in (("mean", mean), ("mask", mask), ("out", out)):
        torch._check(t is None or t.device == x.device, lambda: f"fastnorm: {name} is on {t.device} but x is on {x.device}")


if EXTENSION_ERROR is None:

    @torch.library.register_fake("fastnorm::running_norm")
    def _running_norm_fake(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip,
                           eps_on_std=False, unbiased=False, scale=None, min_std_rel=None, previous=False, steps=None):
        torch._check(diag.shape == (6, mean.numel()), lambda: "diag must have shape (6, C)")
        _check_same_device(x, mean, mask, out)

    @torch.library.register_fake("fastnorm::normalize")
    def _normalize_fake(x, mean, var, out, eps, min_std, max_std, clip, eps_on_std=False, scale=None,
                        min_std_rel=None):
        torch._check(out.shape == x.shape, lambda: "out must have x's shape")
        _check_same_device(x, mean, None, out)

    @torch.library.register_fake("fastnorm::batch_moments")
    def _batch_moments_fake(x, mask, moments, shift=None):
        torch._check(moments.dim() >= 1 and moments.shape[0] == 6, lambda: "moments must have shape (6, *shape)")

    @torch.library.register_fake("fastnorm::merge_normalize")
    def _merge_normalize_fake(x, mask, parts, mean, var, count, out, diag, momentum, max_count, eps, min_std,
                              max_std, clip, eps_on_std=False, unbiased=False, scale=None, min_std_rel=None,
                              previous=False, steps=None):
        torch._check(parts.shape[1:] == (6, *mean.shape), lambda: "parts must have shape (P, 6, *mean.shape)")
        torch._check(diag.shape == (6, mean.numel()), lambda: "diag must have shape (6, C)")

    @torch.library.register_fake("fastnorm::normalize_advantages")
    def _normalize_advantages_fake(x, mask, out, stats, min_std, unbiased):
        torch._check(out.shape == x.shape, lambda: "out must have x's shape")
        torch._check(stats.shape == (4, x.shape[1]), lambda: "stats must have shape (4, G)")

    @torch.library.register_fake("fastnorm::advantage_moments")
    def _advantage_moments_fake(x, mask, moments):
        torch._check(moments.shape == (5, x.shape[1]), lambda: "moments must have shape (5, G)")

    @torch.library.register_fake("fastnorm::normalize_advantages_from")
    def _normalize_advantages_from_fake(x, parts, out, stats, min_std, unbiased):
        torch._check(parts.dim() == 3 and parts.shape[1:] == (5, x.shape[1]), lambda: "parts must have shape (P, 5, G)")
        torch._check(out.shape == x.shape, lambda: "out must have x's shape")
        torch._check(stats.shape == (4, x.shape[1]), lambda: "stats must have shape (4, G)")
