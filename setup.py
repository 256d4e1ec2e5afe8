"""Builds fastnorm and its extension fastnorm._C.

The C++ CPU kernels are always built. The CUDA kernels (csrc/cuda/*.cu and the torch binding
csrc/cuda/*.cpp) are added when torch was built with CUDA and nvcc is found, or when
FASTNORM_FORCE_CUDA=1. FASTNORM_NO_EXTENSION=1 skips the extension: the package then runs on its
pure-PyTorch reference. Build against the torch you have: pip install --no-build-isolation -e .
"""

import glob
import importlib.util
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolchain():
    """fastnorm/_toolchain.py, loaded by path (the package itself imports torch)."""
    spec = importlib.util.spec_from_file_location("_fastnorm_toolchain", os.path.join(ROOT, "fastnorm", "_toolchain.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    if os.environ.get("FASTNORM_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    toolchain = _toolchain()
    os.environ.update(toolchain.choose_compiler())  # a CXX that links libstdc++ statically is replaced

    class BuildLinkingLibstdcxx(BuildExtension.with_options(use_ninja=True)):
        """BuildExtension, then a check that each extension needs libstdc++.so.6 (_toolchain.py)."""

        def build_extensions(self):
            super().build_extensions()
            for ext in self.extensions:
                toolchain.check_extension(self.get_ext_fullpath(ext.name))

    def sources(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    with_cuda = os.environ.get("FASTNORM_FORCE_CUDA") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    # -fno-trapping-math lets GCC if-convert (and vectorize) the masked loops; NaN and inf keep
    # their IEEE meaning (no -ffast-math, which the kernels' finiteness tests rely on).
    cxx_flags = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"]
    link_flags = []
    if torch.backends.openmp.is_available():
        # at::parallel_for is inline "#pragma omp parallel": without -fopenmp it runs serially.
        # torch ships libgomp.so.1 under the same soname, so the loaded runtime is reused.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    srcs = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if with_cuda:
        srcs += sources("csrc/cuda/*.cu") + sources("csrc/cuda/*.cpp")
        extension = CUDAExtension(
            "fastnorm._C",
            srcs,
            extra_compile_args={"cxx": cxx_flags + ["-DFASTNORM_WITH_CUDA"], "nvcc": ["-O3", "-lineinfo"]},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension("fastnorm._C", srcs, extra_compile_args={"cxx": cxx_flags},
                                 extra_link_args=link_flags)
    return [extension], {"build_ext": BuildLinkingLibstdcxx}


# One extra per framework of fastnorm.integrations (pip install 'fastnorm[rsl_rl]'), pinned.
FRAMEWORKS = {
    "rsl_rl": ["rsl-rl-lib==5.5.1"],
    "rl_games": ["rl-games==1.6.5"],
    "skrl": ["skrl==2.1.1"],
    "torchrl": ["torchrl==0.14.1", "tensordict>=0.14,<0.15"],  # torchrl 0.14.1 refuses tensordict 0.15
    "gymnasium": ["gymnasium==1.4.0"],
    "sb3": ["stable-baselines3==2.9.2"],
    "vmas": ["vmas==1.5.2"],
}

ext_modules, cmdclass = _extensions()

setup(
    name="fastnorm",
    version="0.1.0",
    description="Fused running normalization for large multi-agent reinforcement learning",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["fastnorm", "fastnorm.monitoring", "fastnorm.integrations", "fastnorm.triton_kernels"],
    package_dir={"fastnorm": "fastnorm", "fastnorm.triton_kernels": "triton_kernels"},
    # The range tested: torch 2.11 (make test-oldest, in CI) to 2.14 (make check-cuda-build); README.
    install_requires=["torch>=2.11", "numpy"],
    extras_require={
        "triton": ["triton"],
        "test": ["pytest", "pytest-xdist", "pytest-timeout", "hypothesis"],
        "monitor": ["tensorboard", "google-crc32c", "matplotlib"],
        # The frameworks of fastnorm.integrations, at the versions they are tested against.
        **FRAMEWORKS,
        "integrations": sorted({req for reqs in FRAMEWORKS.values() for req in reqs}),
        # Exporting policies that hold a RunningNorm (ONNX, run with onnxruntime in the tests).
        "export": ["onnx", "onnxruntime", "onnxscript"],
        # The benchmark's peers (bench/peers.py) and its plot; `make bench` installs them.
        "bench": sorted({req for reqs in FRAMEWORKS.values() for req in reqs} | {"matplotlib"}),
    },
    entry_points={"console_scripts": ["fastnorm = fastnorm.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
