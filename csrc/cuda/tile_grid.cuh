// How the CUDA kernels cover x viewed as rows of contiguous columns: a 1-D grid of blocks of
// kThreads threads, block b covering column tile b % column_tiles of row split b / column_tiles;
// a block's threads are column lanes x row lanes (threadIdx.x = row_lane * column_threads +
// column_lane), each column lane holding V consecutive columns. Also how many blocks the device
// holds at once, which the plans use to fill one wave.
#pragma once

#include <cuda_runtime.h>
#include <stdint.h>

#include <algorithm>
#include <atomic>

namespace fastnorm {
namespace cuda {

constexpr int kThreads = 256;  // threads of every block

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int64_t lesser(int64_t a, int64_t b) { return a < b ? a : b; }

struct TileGrid {
  int64_t rows, cols;
  int column_threads;  // a power of two dividing kThreads
  int64_t column_tiles, row_splits, rows_per_split;
};

// Where a thread works.
struct Layout {
  int column_threads, row_threads, column_lane, row_lane;
  int64_t col;       // the first of this thread's V columns
  bool has_columns;  // false for lanes past the last column
};

template <int V>
__device__ __forceinline__ Layout layout_of(const TileGrid& g, int64_t tile) {
  Layout l;
  l.column_threads = g.column_threads;
  l.row_threads = kThreads / g.column_threads;
  l.column_lane = static_cast<int>(threadIdx.x) % g.column_threads;
  l.row_lane = static_cast<int>(threadIdx.x) / g.column_threads;
  l.col = (tile * g.column_threads + l.column_lane) * V;
  l.has_columns = l.col < g.cols;
  return l;
}

// The rows a thread visits in its block's split: first + k * step for k in [0, n).
struct ThreadRows {
  int64_t first, step, n;
  __device__ __forceinline__ int64_t row(int64_t k) const { return first + k * step; }
};

__device__ __forceinline__ ThreadRows thread_rows(const TileGrid& g, const Layout& l, int64_t split) {
  const int64_t first = split * g.rows_per_split + l.row_lane;
  const int64_t end = lesser(g.rows, (split + 1) * g.rows_per_split);
  const int64_t n = l.has_columns && first < end ? (end - first + l.row_threads - 1) / l.row_threads : 0;
  return {first, l.row_threads, n};
}

// Blocks of kKernel (launched with kThreads threads) the current device holds at once, cached per
// device.
template <auto kKernel>
int64_t resident_blocks() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> cache[kMaxDevices];
  int device = 0;
  int multiprocessors = 0, per_multiprocessor = 0;
  if (cudaGetDevice(&device) == cudaSuccess && device < kMaxDevices && cache[device].load() > 0) {
    return cache[device].load();
  }
  if (cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_multiprocessor, kKernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // a query that failed only costs the plan its precision
    return 1024;
  }
  const int64_t blocks = std::max<int64_t>(1, int64_t{multiprocessors} * per_multiprocessor);
  if (device < kMaxDevices) cache[device].store(blocks);
  return blocks;
}

}  // namespace cuda
}  // namespace fastnorm
