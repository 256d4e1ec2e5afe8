#!/bin/bash
# On a GPU machine (issue 23): the CUDA normalize_advantages kernels' device time, standalone (nvcc,
# no torch build; with OLD=path/to/an/older/advantages.cu, that version too, for a before/after),
# then, where fastnorm._C is built (python setup.py build_ext --inplace), the op beside the copy
# and the eager formula (bench/cuda_advantages_device_time.py). About 1 minute without the build.
set -u
NVCC=${NVCC:-nvcc}
PY=${PY:-python3}
tmp=$(mktemp -d)
build() {  # build ADVANTAGES_CU OUTPUT
  $NVCC -O3 -arch=sm_90 -std=c++17 -I csrc/cuda bench/cuda_advantages_device_time.cu "$1" csrc/cuda/running_norm.cu \
    -o "$2" 2>&1 | grep -v -i warning | grep -v '^$' | head -20
}
if [ -n "${OLD:-}" ]; then
  build "$OLD" "$tmp/old" && echo "== kernels of $OLD" && timeout 90 "$tmp/old"
fi
build csrc/cuda/advantages.cu "$tmp/new" && echo "== kernels of this tree" && timeout 90 "$tmp/new"
if $PY -c "import fastnorm._C" 2>/dev/null; then
  echo "== through torch" && timeout 180 $PY bench/cuda_advantages_device_time.py
else
  echo "fastnorm._C is not built: the torch-level timing skipped"
fi
rm -rf "$tmp"
