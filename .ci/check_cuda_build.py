"""Checks an installed fastnorm built with its CUDA kernels, on a machine with or without a GPU
(make check-cuda-build runs it after `pip install` into .venv-cuda, from outside the source tree).

Usage: python .ci/check_cuda_build.py ARCH [ARCH ...]   (ARCH: 8.0, 9.0, ... as in TORCH_CUDA_ARCH_LIST)

Fails, saying what is wrong, unless: fastnorm imports from site-packages with its extension loaded;
every op named in OPS, and every fastnorm op with a CPU kernel, has a CUDA kernel registered;
fastnorm.backends() reports the cuda backend unavailable for want of a device at most; the
extension holds machine code for each ARCH; and a bad-argument call raises its whole message, on
the CPU and, where there is a GPU, on cuda (check_errors_raise.py: each in a fresh process).
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_errors_raise  # noqa: E402

OPS = ("running_norm", "normalize", "batch_moments", "merge_normalize", "normalize_advantages",
       "advantage_moments", "normalize_advantages_from")


def cuobjdump() -> str:
    """cuobjdump from CUDA_HOME, else the copy Triton ships."""
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    raise SystemExit(f"cuobjdump not found (looked at {candidates}): cannot list the extension's architectures")


def problems(archs: list[str]) -> list[str]:
    import fastnorm
    from fastnorm import _ops

    found = []
    print(f"fastnorm from {os.path.dirname(fastnorm.__file__)}; torch {torch.__version__} (CUDA {torch.version.cuda})")
    if torch.version.cuda is None:
        found.append(f"torch {torch.__version__} is not a CUDA build")
    if _ops.EXTENSION_ERROR is not None:
        return found + [_ops.EXTENSION_ERROR]
    with_cpu = sorted(name.split("::")[1] for name in torch._C._dispatch_get_registrations_for_dispatch_key("CPU")
                      if name.startswith("fastnorm::"))
    for op in sorted(set(OPS) | set(with_cpu)):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastnorm::{op}", "CUDA"):
            found.append(f"fastnorm::{op} has no CUDA kernel registered")
    print(f"CUDA kernels checked for: {', '.join(sorted(set(OPS) | set(with_cpu)))}")

    reasons = fastnorm.backends()["cuda"]
    print(f"fastnorm.backends()['cuda']: {reasons}")
    if torch.cuda.is_available() and reasons:
        found.append(f"a GPU is here but the cuda backend is unavailable: {reasons}")
    if not torch.cuda.is_available() and (len(reasons) != 1 or "no CUDA device" not in reasons[0]):
        found.append(f"the cuda backend should miss only a device, it reports: {reasons}")

    library = glob.glob(os.path.join(os.path.dirname(fastnorm.__file__), "_C*.so"))[0]
    listing = subprocess.run([cuobjdump(), "--list-elf", library], capture_output=True, text=True, check=True).stdout
    built = sorted(set(re.findall(r"\.sm_(\d+)\.cubin", listing)))
    print(f"machine code in {os.path.basename(library)}: {', '.join('sm_' + a for a in built)}")
    for arch in archs:
        if arch.replace(".", "") not in built:
            found.append(f"{library} holds no sm_{arch.replace('.', '')} machine code (found {built})")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    crashes = [p for p in map(check_errors_raise.problem, devices) if p is not None]
    if not crashes:
        print(f"bad-argument calls raised their whole message on: {', '.join(devices)}")
    return found + crashes


def main() -> None:
    archs = sys.argv[1:]
    if not archs:
        raise SystemExit(__doc__)
    found = problems(archs)
    for problem in found:
        print(f"FAILED: {problem}")
    if found:
        raise SystemExit(1)
    print("check-cuda-build: ok")


if __name__ == "__main__":
    main()
