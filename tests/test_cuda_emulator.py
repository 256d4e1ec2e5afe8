"""The CUDA emulator (tests/cuda_emulator) keeps its own runtime calls where a real CUDA runtime is
loaded too, as in any process that imported a CUDA build of torch (whose libcudart is global).

On the first GPU run the emulated row-split tests failed there and passed in CI: the emulated
kernels' cudaMemsetAsync, cudaDeviceGetAttribute and cudaOccupancy* calls bound to the real
libcudart, which refused host pointers, so the arrival counters were never zeroed. A decoy runtime
preloaded ahead of everything (LD_PRELOAD) stands in for that libcudart here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

import emulated_cuda

# Every runtime call the emulator defines, each failing loudly where it is the one called.
DECOY_RUNTIME = textwrap.dedent("""
    #include <stddef.h>
    int cudaGetDevice(int* device) { *device = 1 << 20; return 100; }
    int cudaDeviceGetAttribute(int* value, int attr, int device) { *value = -1; return 1; }
    int cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void* f, int b, size_t s,
                                                               unsigned int flags) { *blocks = 0; return 1; }
    int cudaMemsetAsync(void* ptr, int value, size_t bytes, void* stream) { return 1; }
    int cudaGetLastError(void) { return 1; }
""")


@pytest.fixture(scope="module")
def decoy_runtime(tmp_path_factory):
    compiler = shutil.which("gcc")
    if compiler is None or emulated_cuda.cuda_include_dir() is None:
        pytest.skip("needs gcc and the CUDA headers")
    folder = tmp_path_factory.mktemp("decoy_cudart")
    source = folder / "decoy.c"
    source.write_text(DECOY_RUNTIME)
    library = folder / "libdecoy_cudart.so"
    subprocess.run([compiler, "-shared", "-fPIC", str(source), "-o", str(library)], check=True)
    return library


def test_emulated_kernels_use_the_emulated_runtime_beside_a_real_one(decoy_runtime):
    # The row-split path is the one that memsets its counters and asks for the multiprocessors.
    here = os.path.dirname(os.path.abspath(__file__))
    command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", "row_splits and float32",
               os.path.join(here, "test_cuda_emulated_previous.py")]
    result = subprocess.run(command, cwd=os.path.dirname(here), capture_output=True, text=True,
                            env={**os.environ, "LD_PRELOAD": str(decoy_runtime)}, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout
