"""RunningNorm in eval mode as standard PyTorch ops, for policies that leave the training process.

An exported model runs where fastnorm is not installed (ONNX Runtime, a TorchScript loader,
ExecuTorch, AOTInductor), so it must not hold fastnorm's kernels. When a RunningNorm normalizes
while being traced or exported (torch.jit.trace, torch.export, torch.onnx.export with or without
dynamo), it records ``normalize`` below instead of its kernel; torch.jit.script compiles a
``FrozenRunningNorm`` in its place (RunningNorm.__prepare_scriptable__). Both are
``clamp((x - mean) / divisor, -clip, clip)`` with the statistics as buffers. Updating the
statistics cannot be exported: RunningNorm raises instead.
"""

from typing import Final, Optional

import torch
from torch import Tensor, nn


def exporting() -> bool:
    """Whether the caller is being traced or exported: torch.jit.trace, torch.export (strict or
    not) or torch.onnx.export (its dynamo exporter runs torch.export, the other one traces).
    Two flag reads: it runs on every call of RunningNorm (torch.onnx.is_in_onnx_export costs µs)."""
    return torch.jit.is_tracing() or _exporting_flag()


# torch.compiler.is_exporting() returns torch.compiler._is_exporting_flag, which torch.export sets
# while it traces; but torch 2.11's dynamo replaces the call by True (later versions read the flag),
# so that torch.compile looked like an export there. The flag itself dynamo reads as a global.
if hasattr(torch.compiler, "_is_exporting_flag"):

    def _exporting_flag() -> bool:
        return torch.compiler._is_exporting_flag

else:  # a torch that keeps the flag elsewhere
    _exporting_flag = torch.compiler.is_exporting


def normalize(x: Tensor, mean: Tensor, divisor: Tensor, clip: Optional[float]) -> Tensor:
    """y = clamp((x - mean) / divisor, -clip, clip) in x's dtype, with standard ops only.

    Computed in float32 (float64 for float64 x), as the kernels do: the float64 mean is split
    into two floats, mean = hi + lo, so that its rounding to float32 does not show in y when
    |mean| is large beside divisor. NaN stays NaN, +-inf becomes +-clip (torch.clamp and ONNX
    Clip keep NaN)."""
    if x.dtype == torch.float64:
        z = (x - mean) / divisor
    else:
        # hi = mean rounded to float32's 24 bits, in float64: (mean + s) - s with s = mean * 2**29
        # (exact) rounds mean to a multiple of ulp(s) = 2**29 ulp(mean); then lo = mean - hi exactly.
        # Not through double(float(mean)): fusers fold that cast pair into nothing (NNC's CUDA code
        # generator does, under a traced or scripted model on a GPU), which makes lo 0. Fused
        # multiply-adds change nothing here, s being exact.
        shift = mean * 2.0**29
        hi = (mean + shift) - shift
        z = ((x.float() - hi.float()) - (mean - hi).float()) / divisor.float()
    if clip is not None:
        z = z.clamp(-clip, clip)
    return z.to(x.dtype)


class FrozenRunningNorm(nn.Module):
    """A RunningNorm's eval-mode transform with its statistics of the moment it was made
    (``RunningNorm.frozen()``): float64 buffers ``mean`` and ``divisor``, the constant ``clip``.

    This is what torch.jit.script compiles in place of a RunningNorm. Its forward takes
    RunningNorm's arguments, so scripted callers compile unchanged: ``mask`` only ever selected
    entries for the statistics and changes nothing here; an update is an error, as is a call in
    training mode when the RunningNorm it came from updates in training.
    """

    clip: Final[Optional[float]]
    forward_updates: Final[bool]

    def __init__(self, mean: Tensor, divisor: Tensor, clip: Optional[float], forward_updates: bool):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("divisor", divisor)
        self.clip = clip
        self.forward_updates = forward_updates

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, update: Optional[bool] = None,
                out: Optional[Tensor] = None) -> Tensor:
        """Normalizes x of shape (*batch, *mean.shape) with the frozen statistics."""
        if update is None:
            update = self.training and self.forward_updates
        if update:
            raise RuntimeError("FrozenRunningNorm cannot update its statistics: it is a RunningNorm exported "
                               "for inference (torch.jit.script replaces each RunningNorm of the tree it "
                               "scripts). Script a copy of the model, in eval mode, to keep training.")
        k = self.mean.dim()
        if not x.is_floating_point() or x.dim() < k or x.shape[x.dim() - k:] != self.mean.shape:
            raise ValueError(f"x must be a floating-point tensor of shape (*batch, *{self.mean.shape}), "
                             f"got {x.dtype} of shape {x.shape}")
        y = normalize(x, self.mean, self.divisor, self.clip)
        if out is None:
            return y
        return out.copy_(y)
