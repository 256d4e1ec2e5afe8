// How a block merges its threads' knowledge of a column (a ColumnSummary, running_norm_math.h):
// warp shuffles within a warp, then shared memory across warps, in a fixed order so that results
// never depend on timing. The merge itself is the shared one (merge_summaries), as on the CPU.
#pragma once

#include "../running_norm_math.h"

namespace fastnorm {
namespace cuda {

constexpr unsigned kAllLanes = 0xffffffffu;
constexpr int kWarpSize = 32;

__device__ __forceinline__ ColumnSummary shuffle_down(const ColumnSummary& s, int offset) {
  return {{__shfl_down_sync(kAllLanes, s.moments.count, offset), __shfl_down_sync(kAllLanes, s.moments.mean, offset),
           __shfl_down_sync(kAllLanes, s.moments.m2, offset)},
          __shfl_down_sync(kAllLanes, s.nonfinite, offset),
          __shfl_down_sync(kAllLanes, s.min, offset),
          __shfl_down_sync(kAllLanes, s.max, offset)};
}

// The warp's lanes that share a column lane (lane % column_threads, column_threads a power of two)
// merged by a shuffle tree, lower lanes first: the lanes below column_threads hold the result.
// Every lane of the warp must call it.
__device__ __forceinline__ ColumnSummary merge_warp_lanes(ColumnSummary s, int column_threads) {
  for (int offset = column_threads; offset < kWarpSize; offset *= 2) s = merge_summaries(s, shuffle_down(s, offset));
  return s;
}

// A block's threads are laid out as threadIdx.x = row_lane * column_threads + column_lane, with
// column_threads a power of two. Threads of a warp that share a column lane merge by shuffles (a
// tree), after which one thread per column lane in each group of merge_group_threads threads (a
// warp, or one row lane when it is wider) holds the group's state.
__device__ __forceinline__ int merge_group_threads(int column_threads) {
  return column_threads > kWarpSize ? column_threads : kWarpSize;
}

// Whether this thread holds its group's state after the warp tree.
__device__ __forceinline__ bool holds_group_result(int column_threads) {
  return static_cast<int>(threadIdx.x) % merge_group_threads(column_threads) < column_threads;
}

// The first half of merging a block's row lanes for column j of the thread's V columns: the warp
// tree, then the group holders store their states in `shared`, which holds
// block_threads / merge_group_threads(column_threads) * column_threads * V states: group g's state
// of tile column t (column j = t % V of column lane t / V) at g * column_threads * V + t. Every
// thread of the block calls it for each j; then __syncthreads; then merged_tile_column.
template <int V>
__device__ __forceinline__ void publish_row_lanes(ColumnSummary s, int j, int column_threads, ColumnSummary* shared) {
  s = merge_warp_lanes(s, column_threads);
  if (!holds_group_result(column_threads)) return;
  const int group = static_cast<int>(threadIdx.x) / merge_group_threads(column_threads);
  const int column_lane = static_cast<int>(threadIdx.x) % column_threads;
  shared[(group * column_threads + column_lane) * V + j] = s;
}

// The second half, by one thread per tile column (t < column_threads * V): the merge over the
// whole block of tile column t, the groups taken in order. A thread per column, not per column
// lane, keeps the float64 chain at groups - 1 merges instead of V times as many.
template <int V>
__device__ __forceinline__ ColumnSummary merged_tile_column(const ColumnSummary* shared, int t, int column_threads,
                                                            int block_threads) {
  const int groups = block_threads / merge_group_threads(column_threads);
  const int tile_columns = column_threads * V;
  ColumnSummary s = shared[t];
  for (int g = 1; g < groups; ++g) s = merge_summaries(s, shared[g * tile_columns + t]);
  return s;
}

// The sum of v over the row lanes of this warp that share this thread's column lane, valid where
// holds_group_result(column_threads). Every lane of the warp must call it.
__device__ __forceinline__ unsigned sum_row_lanes_of_warp(unsigned v, int column_threads) {
  for (int offset = column_threads; offset < kWarpSize; offset *= 2) v += __shfl_down_sync(kAllLanes, v, offset);
  return v;
}

}  // namespace cuda
}  // namespace fastnorm
