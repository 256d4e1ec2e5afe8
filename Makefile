# fastnorm: two commands on a fresh machine.
#   make bench   the benchmark on the default device (cuda when available, else cpu)
#   make test    the test suite
#   make check-cuda   compiles the CUDA sources without a GPU (CI runs it before make test)
#   make check-cuda-build   builds, links and loads the CUDA extension against a CUDA torch, no GPU
#   make gpu-check OUT=dir  on a GPU machine: build, tests and benchmark on cuda (.ci/gpu_check.py)
#   make test-oldest   the reference and Triton-interpreter tests under the oldest torch supported (CI runs it)
# Each creates .venv if missing (reusing a torch that $(PYTHON) already has, else installing
# $(TORCH_SPEC)), installs what it needs and builds the extension; both are idempotent.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fastnorm-deps
BUILD_STAMP := $(VENV)/.fastnorm-build
BENCH_STAMP := $(VENV)/.fastnorm-bench-deps
EXTRAS_STAMP := $(VENV)/.fastnorm-test-extras
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench build clean check-cuda check-cuda-build gpu-check gpu-kernels gpu-check-rehearsal gpu-wheels test-oldest

# The second run tests the Triton kernels on the CPU through Triton's interpreter (the tests of
# the triton backend only: -k triton), in $(INTERPRETER_WORKERS) xdist workers: the interpreter is
# single-threaded Python (12 minutes in one process here, 2026-12-04).
INTERPRETER_WORKERS ?= 2
INTERPRETER_TESTS := tests/test_running_norm.py tests/test_running_norm_api.py tests/test_running_norm_split.py \
  tests/test_ops.py tests/test_advantages.py tests/test_advantages_api.py tests/test_advantages_ops.py \
  tests/test_advantages_split.py tests/test_triton.py tests/test_triton_splits.py tests/test_relative_floor.py \
  tests/test_normalize_with_previous.py
test: $(BUILD_STAMP) $(EXTRAS_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 FASTNORM_TEST_DEVICE=cpu FASTNORM_TEST_BACKENDS=triton $(PY) -m pytest -q -k triton \
	  -n $(INTERPRETER_WORKERS) $(PYTEST_ARGS) $(INTERPRETER_TESTS)

bench: $(BUILD_STAMP) $(BENCH_STAMP)
	$(PY) bench/run.py $(BENCH_ARGS)

build: $(BUILD_STAMP)

# A venv; when $(PYTHON) already has torch (a CUDA image, say), the venv sees that interpreter's
# site-packages through a .pth file instead of downloading torch again.
$(PY):
	$(PYTHON) -m venv $(VENV)
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  site=$$($(PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"); \
	  $(PYTHON) -c "import sysconfig; p = sysconfig.get_paths(); print(p['purelib']); print(p['platlib'])" \
	    > $$site/_fastnorm_reuse_torch.pth; \
	  echo "reusing the torch of $(PYTHON)"; \
	fi

$(DEPS_STAMP): $(PY) setup.py
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q "setuptools>=64" wheel ninja numpy pytest pytest-xdist pytest-timeout hypothesis triton tensorboard google-crc32c matplotlib
	touch $@

# The editable install registers the package (without compiling); build_ext then builds the
# extension in place, incrementally, quietly: its output goes to $(BUILD_LOG), printed if it fails.
# Last, a bad-argument call in a fresh process must raise its whole message (a libstdc++ linked
# statically crashes there: fastnorm/_toolchain.py).
BUILD_LOG := $(VENV)/build.log
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES) fastnorm/_toolchain.py
	FASTNORM_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	@echo "building fastnorm._C (log: $(BUILD_LOG))"
	@.ci/quiet $(BUILD_LOG) $(PY) setup.py build_ext --inplace
	$(PY) .ci/check_errors_raise.py cpu
	touch $@

# Every .cu under csrc/ through nvcc for sm_90 with torch's half-precision flags, and the CUDA torch
# bindings through a C++ syntax check against the installed torch's headers (the CPU wheel ships
# c10/cuda): a syntax or type error fails without a GPU. Each step is skipped, with a message,
# where nvcc or the CUDA headers are missing. Linking needs a CUDA torch: `make build` there.
NVCC ?= nvcc
CUDA_HOME ?= /usr/local/cuda
NVCC_FLAGS ?= -arch=sm_90 -std=c++17 -O3 -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
	-D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__

check-cuda: $(DEPS_STAMP)
	@if command -v $(NVCC) >/dev/null 2>&1; then \
	  for f in $$(find csrc -name '*.cu'); do echo "$(NVCC) $$f"; $(NVCC) $(NVCC_FLAGS) -c $$f -o /dev/null || exit 1; done; \
	else echo "check-cuda: $(NVCC) not found: CUDA kernels not compiled"; fi
	@torch_inc=$$($(PY) -c "from torch.utils import cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))"); \
	if [ -f $(CUDA_HOME)/include/cuda_runtime_api.h ] && $(PY) -c "import torch, os, sys; \
	    sys.exit(not os.path.exists(os.path.join(os.path.dirname(torch.__file__), 'include/c10/cuda/CUDAStream.h')))"; then \
	  for f in $$(find csrc/cuda -name '*.cpp'); do echo "$(CXX) -fsyntax-only $$f"; \
	    $(CXX) -std=c++20 -fsyntax-only -Wall -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE $$torch_inc -I$(CUDA_HOME)/include $$f || exit 1; done; \
	else echo "check-cuda: no CUDA headers under $(CUDA_HOME) or torch without c10/cuda headers: bindings not checked"; fi

# The CUDA extension as `pip install` builds it on a GPU machine, here without a GPU: an sdist of
# this tree (what MANIFEST.in ships), installed into its own venv $(CUDA_VENV) holding a CUDA build
# of torch ($(CUDA_TORCH_SPEC): CUDA 13.0, as nvcc here), for the architectures users have; then,
# from outside the tree, every op must have a CUDA kernel, the cuda backend must lack only a device,
# and the extension must hold machine code for each architecture (.ci/check_cuda_build.py).
CUDA_VENV ?= .venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
CUDA_ARCHS ?= 8.0 8.6 8.9 9.0
MAX_JOBS ?= $(shell nproc)
CUDA_PY := $(CUDA_VENV)/bin/python
CUDA_DEPS_STAMP := $(CUDA_VENV)/.fastnorm-deps

$(CUDA_DEPS_STAMP):
	test -x $(CUDA_PY) || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_PY) -m pip install -q "$(CUDA_TORCH_SPEC)" "setuptools>=64" wheel ninja numpy
	@$(CUDA_PY) -c "import sys, torch; sys.exit(torch.version.cuda is None and \
	  'torch ' + torch.__version__ + ' in $(CUDA_VENV) is not a CUDA build; set CUDA_TORCH_SPEC')"
	touch $@

check-cuda-build: $(CUDA_DEPS_STAMP)
	rm -rf $(CUDA_VENV)/sdist
	@.ci/quiet $(CUDA_VENV)/sdist.log env FASTNORM_NO_EXTENSION=1 $(CUDA_PY) setup.py sdist -d $(CUDA_VENV)/sdist
	@echo "building the sdist's extension for $(CUDA_ARCHS) (log: $(CUDA_VENV)/build.log)"
	@.ci/quiet $(CUDA_VENV)/build.log env CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST="$(CUDA_ARCHS)" \
	  MAX_JOBS=$(MAX_JOBS) $(CUDA_PY) -m pip install -v --no-build-isolation --no-deps --force-reinstall --no-cache-dir \
	  $(CUDA_VENV)/sdist/fastnorm-*.tar.gz
	cd /tmp && CUDA_HOME=$(CUDA_HOME) $(abspath $(CUDA_PY)) $(CURDIR)/.ci/check_cuda_build.py $(CUDA_ARCHS)

# Everything a GPU loan must verify, in one command (.ci/gpu_check.py: build with CUDA for sm_90,
# the tests on cuda, bench/run.py --quick, a summary against bench/NOTES.md), with the python that
# holds the machine's CUDA torch. gpu-check-rehearsal runs each stage tiny on this CPU (CI does).
GPU_PYTHON ?= python3
OUT ?= gpu-check-out
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_PYTHON) .ci/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

# The focused second call of a loan (about 4 minutes, on the machine gpu-check left warm, whose
# build it reuses): the kernel-level checks of issue 23's predictions in bench/NOTES.md, each
# bounded, into OUT: the CUDA running_norm variants, the CUDA advantages kernels (standalone and
# through torch), the Triton host time and reduce-plan sweep.
gpu-kernels:
	mkdir -p $(OUT)
	$(GPU_PYTHON) -c "import fastnorm.triton_kernels" 2>/dev/null || FASTNORM_NO_EXTENSION=1 \
	  $(GPU_PYTHON) -m pip install -q --no-build-isolation --no-deps --no-index -e .
	-TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=$$(nproc) $(GPU_PYTHON) setup.py build_ext --inplace > $(OUT)/kernels-build.log 2>&1
	-PYTHONUNBUFFERED=1 timeout 100 $(GPU_PYTHON) bench/cuda_variants.py 2>&1 | tee $(OUT)/cuda_variants.txt
	-PY=$(GPU_PYTHON) timeout 80 bash bench/cuda_advantages_device_time.sh 2>&1 | tee $(OUT)/cuda_advantages.txt
	-PYTHONUNBUFFERED=1 timeout 90 $(GPU_PYTHON) bench/triton_host_time.py --sweep 2>&1 | tee $(OUT)/triton_host_time.txt

gpu-check-rehearsal: $(BUILD_STAMP)
	$(PY) .ci/gpu_check.py --cpu-rehearsal --out $(VENV)/gpu-check-rehearsal

# The wheels .ci/gpu_check.py installs on the GPU machine, which has no network (Python 3.12, torch
# 2.11): the pure-Python frameworks at setup.py's versions and what they import that the image
# lacks (/work/.library/device/KINDS.md), into .whl/ (gitignored; carried with carry=[".whl"]).
# tensordict (rsl-rl-lib needs it) is compiled, against no torch. torchrl's compiled extension was
# built for another torch and does not load on 2.11 (torchrl warns; its replay-buffer C++ parts are
# missing), its Python parts run: tests/test_integrations_torchrl.py passes on torch 2.11 here. vmas
# and gym (vmas imports it) are sdists only: built into wheels here. Files already in .whl/ are kept:
# idempotent. README, "The GPU check".
GPU_WHEELS ?= rsl-rl-lib==5.5.1 tensordict==0.14.3 pyvers==0.2.3 gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 \
	skrl==2.1.1 gymnasium==1.4.0 farama-notifications==0.0.6 stable-baselines3==2.9.2 \
	pyglet==1.5.27 gym-notices==0.0.8 rl-games==1.6.5 tensorboardx==2.6.5 torchrl==0.14.1 hoptorch==0.1.4
GPU_SDISTS ?= vmas==1.5.2 gym==0.26.2
GPU_WHEEL_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
gpu-wheels:
	mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps $(GPU_WHEEL_PLATFORM) -d .whl $(GPU_WHEELS)
	for spec in $(GPU_SDISTS); do ls .whl/$${spec%%==*}-$${spec##*==}-*.whl >/dev/null 2>&1 || \
	  $(PYTHON) -m pip wheel -q --no-deps -w .whl $$spec || exit 1; done
	@du -ch .whl/*.whl | tail -1

# The frameworks the integrations are tested in, and the export tests' ONNX tools: the tests need
# them all (none is skipped in CI), so a failed install fails here.
$(EXTRAS_STAMP): setup.py | $(BUILD_STAMP)
	FASTNORM_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[integrations,export]"
	touch $@

# The benchmark's peers and plotting (fastnorm[bench]). If they cannot be installed the benchmark
# still runs and lists each missing peer as skipped, with the reason; the install is retried next time.
$(BENCH_STAMP): setup.py | $(BUILD_STAMP)
	if FASTNORM_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation -e ".[bench]"; then touch $@; \
	else echo "warning: fastnorm[bench] did not install; the benchmark skips the peers it lacks"; fi

clean:
	rm -rf build fastnorm/_C*.so $(BUILD_STAMP)

# The oldest torch setup.py admits, as the GPU image runs it: torch 2.11 with triton 3.6, in its own
# venv $(OLDEST_VENV) (a CUDA build of torch, 4.7 GB, run on the CPU; triton 3.6's interpreter breaks
# with numpy >= 2.3). The package goes in without its extension, so the tests run what runs there
# on the CPU: the suite on the reference backend (the CUDA emulator and the Triton compile tests
# included; not the framework integrations, whose frameworks this venv lacks), then the Triton
# kernels through Triton's interpreter (the second run of `test`).
OLDEST_VENV ?= .venv-torch211
OLDEST_SPEC ?= torch==2.11.0 triton==3.6.0 numpy<2.3
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.fastnorm-deps
# Less of the interpreter run than `test` does, to keep CI short: not the two largest shapes of
# test_running_norm.py's dtype x mask x momentum sweep (the 2.13 run has them; the previous-mode
# sweep keeps them here) nor its 500-step drift test: 40% of the run's time.
OLDEST_INTERPRETER_K := triton and not test_500_steps and not (test_matches_reference and (257 or 1031) and not previous)
NEEDS_FRAMEWORKS := $(wildcard tests/test_integrations_*.py tests/test_rl_games.py tests/test_rsl_rl.py \
  tests/test_frameworks_distributed.py tests/test_vmas_*.py)

$(OLDEST_STAMP): setup.py
	@echo "installing $(OLDEST_SPEC) into $(OLDEST_VENV) (log: $(OLDEST_VENV)/install.log)"
	@test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	@.ci/quiet $(OLDEST_VENV)/install.log sh -c '$(OLDEST_PY) -m pip install $(foreach r,$(OLDEST_SPEC),"$(r)") \
	  "setuptools>=64" wheel pytest pytest-xdist hypothesis && \
	  FASTNORM_NO_EXTENSION=1 $(OLDEST_PY) -m pip install --no-build-isolation --no-deps -e .'
	@touch $@

test-oldest: $(OLDEST_STAMP)
	FASTNORM_TEST_DEVICE=cpu FASTNORM_TEST_BACKENDS=reference $(OLDEST_PY) -m pytest -q \
	  $(addprefix --ignore=,$(NEEDS_FRAMEWORKS)) $(PYTEST_ARGS) tests
	TRITON_INTERPRET=1 FASTNORM_TEST_DEVICE=cpu FASTNORM_TEST_BACKENDS=triton $(OLDEST_PY) -m pytest -q \
	  -k "$(OLDEST_INTERPRETER_K)" -n $(INTERPRETER_WORKERS) $(PYTEST_ARGS) $(INTERPRETER_TESTS)
