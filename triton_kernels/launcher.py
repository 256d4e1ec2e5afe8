"""How fastnorm's Triton kernels are launched: raw where the tensors are real, through
`torch.library.wrap_triton` where torch traces.

`wrap_triton` routes a launch through a higher-order op, which torch.compile, export and make_fx
need to see the kernel and what it mutates, but which costs tens of microseconds of host time per
eager launch (flash-attention issue #2818, PR #2823) and has no rule for a user's TorchDispatchMode.
So a launch is wrapped only while Dynamo compiles or one of torch's tracing modes (fake tensors,
functionalization, proxy tracing) is on; the interpreter's kernels always run as they are. Decided
from static facts at each launch, so Dynamo folds the choice away.

Also: plain-integer cdiv and next_power_of_2 for the launchers (triton's are constexpr functions
that cost microseconds a call on the host).
"""

from __future__ import annotations

import torch
from triton.runtime import JITFunction

_TRACING_MODES = (torch._C._TorchDispatchModeKey.FAKE, torch._C._TorchDispatchModeKey.FUNCTIONAL,
                  torch._C._TorchDispatchModeKey.PROXY)


def torch_traces() -> bool:
    """Whether Dynamo is compiling or a fake, functional or proxy mode is on: tensors here may not
    be real, and a launch must reach the tracer as a higher-order op."""
    if torch.compiler.is_compiling():
        return True
    return any(torch._C._get_dispatch_mode(key) is not None for key in _TRACING_MODES)


def launch(kernel, grid: tuple[int, ...], *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), through wrap_triton where torch traces a compiled kernel."""
    if isinstance(kernel, JITFunction) and torch_traces():
        from torch.library import wrap_triton

        wrap_triton(kernel)[grid](*args, **kwargs)
    else:
        kernel[grid](*args, **kwargs)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(0, n - 1).bit_length()
