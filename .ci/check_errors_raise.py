"""Checks that a bad argument to a fastnorm C++ op raises a RuntimeError carrying its whole message,
on each device given (default cpu), each call in a fresh process: an extension that carries its own
static copy of libstdc++ crashes there instead (SIGSEGV inside c10::str; fastnorm/_toolchain.py).

Usage: python .ci/check_errors_raise.py [cpu] [cuda]   (make build runs it; so does check_cuda_build.py)
"""

from __future__ import annotations

import subprocess
import sys

# A 2-D x where normalize_advantages needs (outer, groups, inner): the message ends in the shape,
# which c10::str formats through an ostringstream (the crash's frame).
CALL = """
import torch
import fastnorm._ops as ops
assert ops.EXTENSION_ERROR is None, ops.EXTENSION_ERROR
x = torch.randn(33, 12, device="{device}")
stats = torch.empty(5, 12, dtype=torch.float64, device="{device}")
try:
    torch.ops.fastnorm.normalize_advantages(x, None, torch.empty_like(x), stats, 1e-4, True)
except RuntimeError as error:
    print(str(error).splitlines()[0])
"""
EXPECTED = "fastnorm: x must be 3-D (outer, groups, inner), got shape [33, 12]"


def problem(device: str) -> str | None:
    """None if the call raised the whole message, else what happened."""
    result = subprocess.run([sys.executable, "-c", CALL.format(device=device)], capture_output=True, text=True)
    if result.returncode != 0:
        return (f"{device}: the bad-argument call ended the process (exit status {result.returncode}) instead of "
                f"raising: {result.stderr.strip()[-500:]}")
    if result.stdout.strip() != EXPECTED:
        return f"{device}: expected the RuntimeError {EXPECTED!r}, got {result.stdout.strip()!r}"
    return None


def main(devices: list[str]) -> int:
    found = [p for p in map(problem, devices or ["cpu"]) if p is not None]
    for p in found:
        print(f"check_errors_raise: {p}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
