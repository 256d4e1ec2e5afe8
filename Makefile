# fastnorm: two commands on a fresh machine.
#   make bench   the benchmark on the default device (cuda when available, else cpu)
#   make test    the test suite
# Each creates .venv if missing (reusing a torch that $(PYTHON) already has, else installing
# $(TORCH_SPEC)), installs what it needs and builds the extension; both are idempotent.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.fastnorm-deps
BUILD_STAMP := $(VENV)/.fastnorm-build
SOURCES := setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' 2>/dev/null)
BENCH_ARGS ?=
PYTEST_ARGS ?=

.PHONY: test bench build clean

# The second run tests the Triton kernels on the CPU through Triton's interpreter (the tests of
# the triton backend only: -k triton).
test: $(BUILD_STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)
	TRITON_INTERPRET=1 FASTNORM_TEST_DEVICE=cpu FASTNORM_TEST_BACKENDS=triton $(PY) -m pytest -q -k triton \
	  $(PYTEST_ARGS) tests/test_running_norm.py tests/test_running_norm_api.py tests/test_ops.py tests/test_triton.py

bench: $(BUILD_STAMP)
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
	$(PY) -m pip install -q "setuptools>=64" wheel ninja numpy pytest hypothesis triton
	touch $@

# The editable install registers the package (without compiling); build_ext then builds the
# extension in place, incrementally.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	FASTNORM_NO_EXTENSION=1 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) setup.py -q build_ext --inplace
	touch $@

clean:
	rm -rf build fastnorm/_C*.so $(BUILD_STAMP)
