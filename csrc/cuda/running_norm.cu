// CUDA kernels of fastnorm::running_norm and fastnorm::normalize, and of the split pair
// fastnorm::batch_moments (the reduce alone) and fastnorm::merge_normalize.
//
// x is viewed as rows of contiguous columns. A block covers a tile of columns, one 128-byte row
// segment wide (column_threads threads of vector_width columns each, so that a warp's loads are
// coalesced 16-byte loads), and a split of the rows; its threads are column lanes x row lanes.
// Each thread sums its rows (at most kMaxRowsPerThread) in float (float64 for float64 x) about a
// shift taken from the data; the sums become float64 moments, which the block merges across its
// row lanes (running_norm_math.h's Chan merge, through warp shuffles and shared memory).
//
// With one split per tile a block holds the whole batch of its columns: it updates the running
// statistics and normalizes its rows in the same launch. With several, each block stores its
// partial moments and the last block of a tile to arrive (threadfence + atomic counter) merges
// them and updates the statistics; a second launch normalizes, visiting x in the reverse order
// so that what the first launch read last is still in L2. batch_moments runs the same reduce and
// writes the merged moments instead of updating; merge_normalize merges given tables per column,
// updates, and runs the normalize launch.
#include "running_norm.h"

#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>

#include "column_state.cuh"
#include "elements.cuh"
#include "tile_grid.cuh"

namespace fastnorm {
namespace cuda {
namespace {

constexpr int kSegmentBytes = 128;  // the width of a tile's row segment: one L2 line
// Rows a thread sums in float: as in the C++ CPU kernel's blocks, float sums of at most 128
// deviations from a nearby shift stay accurate to ~1e-6. The plan splits rows to respect it.
constexpr int64_t kMaxRowsPerThread = 128;
constexpr int64_t kMinRowsPerThread = 4;
constexpr int kUnroll = 4;  // rows whose loads a thread issues before using any (memory parallelism)
// With several splits, each reads at least this many bytes of every column, so that its partial
// moments (a batch-moments table column: kNumMomentRows float64) cost under 10% of the traffic. (A
// larger floor leaves mid-sized batches with too few blocks to fill the device, which costs more.)
constexpr int64_t kMinSplitBytesPerColumn = 512;
// States the block merges through shared memory (publish_row_lanes): one per group (a warp, or a
// wider row lane: then fewer groups) and tile column; a tile is at most 64 columns (2-byte types).
constexpr int kMergeCapacity = kThreads / kWarpSize * (kSegmentBytes / 2);

// ---------------------------------------------------------------------------------------------
// Where a thread works (tile_grid.cuh).

struct KernelArgs {
  Problem p;
  TileGrid grid;
  double* partials;  // row_splits batch-moments tables (kNumMomentRows, cols), one per split
  int* arrivals;     // (column_tiles): blocks of the tile done storing their partials
};

// The mask column that column `col` reads (0 for a per-row mask).
__device__ __forceinline__ int64_t mask_column(const Problem& p, int64_t col) {
  return p.mask_cols > 1 ? col / (p.cols / p.mask_cols) : 0;
}

__device__ __forceinline__ bool is_selected(const bool* mask, int64_t mask_cols, int64_t row, int64_t mask_col) {
  return mask == nullptr || mask[row * mask_cols + mask_col];
}

// ---------------------------------------------------------------------------------------------
// Reduce: one thread's rows.

// One column of x as the careful path reads it.
template <typename scalar_t>
struct ColumnReader {
  const scalar_t* x;  // at the column
  int64_t row_stride;
  const bool* mask;
  int64_t mask_cols, mask_col;
};

// The exact two-pass moments in float64 of one column over a thread's rows: the path for the rows
// that hold NaN or inf (the fast path does not test values) or whose float sums overflowed.
template <typename scalar_t>
__device__ __noinline__ ColumnSummary recompute_column(ColumnReader<scalar_t> c, ThreadRows rows) {
  ColumnSummary s = empty_column_summary();
  double sum = 0.0;
  for (int64_t k = 0; k < rows.n; ++k) {
    const int64_t r = rows.row(k);
    if (!is_selected(c.mask, c.mask_cols, r, c.mask_col)) continue;
    const double v = to_acc(c.x[r * c.row_stride]);
    if (!is_finite(v)) {
      s.nonfinite += 1.0;
      continue;
    }
    s.moments.count += 1.0;
    sum += v;
    s.min = fmin(s.min, v);
    s.max = fmax(s.max, v);
  }
  const double mean = sum / fmax(s.moments.count, 1.0);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = 0; k < rows.n; ++k) {
    const int64_t r = rows.row(k);
    const double v = to_acc(c.x[r * c.row_stride]);
    if (!is_selected(c.mask, c.mask_cols, r, c.mask_col) || !is_finite(v)) continue;
    s1 += v - mean;
    s2 += (v - mean) * (v - mean);
  }
  s.moments = moments_from_shifted_sums(s.moments.count, mean, s1, s2);
  return s;
}

// A thread's sums over its rows for each of its V columns, about a shift taken from the data (its
// first selected value), in acc_t: the corrected two-pass formula (moments_from_shifted_sums)
// turns them into moments. Without an element mask whole rows are selected together: one count.
template <typename acc_t, int V, bool kElementMask>
struct ThreadSums {
  static constexpr int kCounts = kElementMask ? V : 1;
  acc_t shift[V], s1[V], s2[V], lo[V], hi[V];
  acc_t count[kCounts], nonfinite[kCounts];
  bool has_shift[kCounts];
};

// Sums the thread's rows. Without an element mask (no mask, or a per-row one) values are not
// tested: NaN or inf leave the sums non-finite, and column_state recomputes that column.
template <typename scalar_t, int V, bool kElementMask>
__device__ __forceinline__ void sum_thread_rows(const Problem& p, const Layout& l, const ThreadRows& rows,
                                                ThreadSums<typename Acc<scalar_t>::type, V, kElementMask>& t) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + l.col;
  // Column j reads mask column mask_first + mask_step[j] (a small offset: one register each).
  const int64_t mask_first = kElementMask ? mask_column(p, l.col) : 0;
  int mask_step[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    mask_step[j] = kElementMask ? static_cast<int>(mask_column(p, l.col + j) - mask_first) : 0;
    t.shift[j] = t.s1[j] = t.s2[j] = acc_t(0);
    t.lo[j] = static_cast<acc_t>(INFINITY);
    t.hi[j] = -static_cast<acc_t>(INFINITY);
  }
#pragma unroll
  for (int i = 0; i < t.kCounts; ++i) {
    t.count[i] = t.nonfinite[i] = acc_t(0);
    t.has_shift[i] = false;
  }
  // The element-mask path holds more per column: fewer rows at once keeps it within 128 registers.
  constexpr int kRowsAtOnce = kElementMask && V > 4 ? 2 : kUnroll;
  for (int64_t k = 0; k < rows.n; k += kRowsAtOnce) {
    Vec<scalar_t, V> v[kRowsAtOnce];
    bool take[kRowsAtOnce];
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      take[u] = k + u < rows.n;
      if (!take[u]) continue;
      const int64_t r = rows.row(k + u);
      v[u] = load<scalar_t, V>(x + r * p.x_row_stride);
      if (!kElementMask) take[u] = is_selected(p.mask, p.mask_cols, r, 0);
    }
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      if (!take[u]) continue;
      if constexpr (kElementMask) {
        const bool* mask_row = p.mask + rows.row(k + u) * p.mask_cols + mask_first;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t a = to_acc(v[u].v[j]);
          const bool selected = mask_row[mask_step[j]];
          const bool ok = selected && is_finite(a);
          t.nonfinite[j] += selected && !ok ? acc_t(1) : acc_t(0);
          t.shift[j] = ok && !t.has_shift[j] ? a : t.shift[j];
          t.has_shift[j] |= ok;
          const acc_t d = ok ? a - t.shift[j] : acc_t(0);
          t.count[j] += ok ? acc_t(1) : acc_t(0);
          t.s1[j] += d;
          t.s2[j] = fma(d, d, t.s2[j]);
          t.lo[j] = ok ? fmin(t.lo[j], a) : t.lo[j];
          t.hi[j] = ok ? fmax(t.hi[j], a) : t.hi[j];
        }
      } else {
        acc_t a[V];
#pragma unroll
        for (int j = 0; j < V; ++j) a[j] = to_acc(v[u].v[j]);
        if (!t.has_shift[0]) {
#pragma unroll
          for (int j = 0; j < V; ++j) t.shift[j] = a[j];
          t.has_shift[0] = true;
        }
        t.count[0] += acc_t(1);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const acc_t d = a[j] - t.shift[j];
          t.s1[j] += d;
          t.s2[j] = fma(d, d, t.s2[j]);
          t.lo[j] = fmin(t.lo[j], a[j]);  // fmin skips NaN; an inf leaves s1 non-finite
          t.hi[j] = fmax(t.hi[j], a[j]);
        }
      }
    }
  }
}

// The summary of column j of the thread's sums.
template <typename scalar_t, int V, bool kElementMask>
__device__ __forceinline__ ColumnSummary column_summary(const Problem& p, const Layout& l, const ThreadRows& rows,
                                                    const ThreadSums<typename Acc<scalar_t>::type, V, kElementMask>& t,
                                                    int j) {
  const int i = kElementMask ? j : 0;
  if (is_finite(t.s1[j]) && is_finite(t.s2[j])) {
    return {moments_from_shifted_sums(t.count[i], t.shift[j], t.s1[j], t.s2[j]), t.nonfinite[i], t.lo[j], t.hi[j]};
  }
  const ColumnReader<scalar_t> reader{static_cast<const scalar_t*>(p.x) + l.col + j, p.x_row_stride, p.mask,
                                      p.mask_cols, mask_column(p, l.col + j)};
  return recompute_column<scalar_t>(reader, rows);
}

// ---------------------------------------------------------------------------------------------
// Merge across splits, the running update, normalize.

// Column col of split `split`'s partial table, read from L2 (__ldcg): the other blocks wrote it,
// and an L1 line could be stale.
__device__ __forceinline__ ColumnSummary load_partial(const KernelArgs& a, int64_t split, int64_t col) {
  const int64_t cols = a.p.cols;
  const double* t = a.partials + split * kNumMomentRows * cols + col;
  return {{__ldcg(t + kMomentCount * cols), __ldcg(t + kMomentMean * cols), __ldcg(t + kMomentM2 * cols)},
          __ldcg(t + kMomentNonFinite * cols), __ldcg(t + kMomentMin * cols), __ldcg(t + kMomentMax * cols)};
}

// This thread's share of the merge of every split's partials of column `col`: splits row_lane,
// row_lane + row_threads, ... in order (the block's row lanes then merge the shares).
__device__ __forceinline__ ColumnSummary merge_partials(const KernelArgs& a, const Layout& l, int64_t col) {
  ColumnSummary s = empty_column_summary();
  if (!l.has_columns) return s;
  for (int64_t split = l.row_lane; split < a.grid.row_splits; split += l.row_threads) {
    s = merge_summaries(s, load_partial(a, split, col));
  }
  return s;
}

// With the batch's state of column c: the diagnostics, the running update and the bound on |z|
// (from the extreme values, z being monotonic in x) that later decides whether clipped entries are
// counted, as the C++ CPU kernel does.
__device__ __forceinline__ void finish_column(const Problem& p, int64_t c, const ColumnSummary& s) {
  const Moments& m = s.moments;
  double* diag = p.diag + c;  // diagnostic row i at diag[i * p.cols]
  diag[kBatchCount * p.cols] = m.count;
  diag[kBatchMean * p.cols] = m.mean;
  diag[kBatchVar * p.cols] = m.count > 0.0 ? m.m2 / m.count : 0.0;
  diag[kNonFinite * p.cols] = s.nonfinite;
  double mean = p.mean[c], var = p.var[c], count = p.count[c];
  update_running_stats(mean, var, count, m, p.update);
  p.mean[c] = mean;
  p.var[c] = var;
  p.count[c] = count;
  if (p.with_output) {
    const double inv_std = 1.0 / bounded_std(var, p.eps, p.eps_on_std, p.min_std, p.max_std);
    diag[kClipped * p.cols] = 0.0;
    diag[kMaxAbsZ * p.cols] = m.count > 0.0 ? fmax(s.max - mean, mean - s.min) * inv_std : 0.0;
  } else {
    diag[kClipped * p.cols] = diag[kMaxAbsZ * p.cols] = nan("");
  }
}

// y for the thread's rows, last to first (the reverse of the reduce: recent reads are the cached
// ones), z from the split mean (elements.cuh: acc_t precision even where |mean| >> std). With
// kCountClipped, also counts per column the selected finite entries with |z| > clip into diag.
template <typename scalar_t, int V, bool kCountClipped>
__device__ __forceinline__ void normalize_rows(const Problem& p, const Layout& l, const ThreadRows& rows,
                                               const SplitMean<typename Acc<scalar_t>::type> (&mean)[V],
                                               const typename Acc<scalar_t>::type (&scale)[V]) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x = static_cast<const scalar_t*>(p.x) + l.col;
  scalar_t* y = static_cast<scalar_t*>(p.out) + l.col;
  const acc_t clip = static_cast<acc_t>(p.clip);
  unsigned clipped[V];
  int64_t mask_col[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    clipped[j] = 0;
    mask_col[j] = kCountClipped ? mask_column(p, l.col + j) : 0;
  }
  constexpr int kRowsAtOnce = kCountClipped ? 1 : kUnroll;  // counting is the rare path: fewer registers
  for (int64_t k = rows.n - 1; k >= 0; k -= kRowsAtOnce) {
    Vec<scalar_t, V> v[kRowsAtOnce];
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      if (k - u >= 0) v[u] = load<scalar_t, V>(x + rows.row(k - u) * p.x_row_stride);
    }
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      if (k - u < 0) continue;
      const int64_t r = rows.row(k - u);
      Vec<scalar_t, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t a = to_acc(v[u].v[j]);
        const acc_t z = ((a - mean[j].hi) - mean[j].lo) * scale[j];
        from_acc(clamp_keep_nan(z, -clip, clip), out.v[j]);
        if constexpr (kCountClipped) {
          const bool ok = is_selected(p.mask, p.mask_cols, r, mask_col[j]) && is_finite(a);
          clipped[j] += ok && (z > clip || z < -clip) ? 1u : 0u;
        }
      }
      store<scalar_t, V>(y + r * p.out_row_stride, out);
    }
  }
  if constexpr (kCountClipped) {
#pragma unroll
    for (int j = 0; j < V; ++j) clipped[j] = sum_row_lanes_of_warp(clipped[j], l.column_threads);
    if (!l.has_columns || !holds_group_result(l.column_threads)) return;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (clipped[j] > 0) atomicAdd(p.diag + kClipped * p.cols + l.col + j, static_cast<double>(clipped[j]));
    }
  }
}

// The normalization coefficients of the thread's columns from the current statistics, then y.
// Every thread of the block must call it (the clip decision is taken per warp).
template <typename scalar_t, int V>
__device__ __forceinline__ void normalize_thread_rows(const Problem& p, const Layout& l, const ThreadRows& rows) {
  using acc_t = typename Acc<scalar_t>::type;
  SplitMean<acc_t> mean[V];
  acc_t scale[V];
  bool can_clip = false;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = l.has_columns ? l.col + j : 0;
    mean[j] = split_mean<acc_t>(p.mean[c]);
    scale[j] = static_cast<acc_t>(1.0 / bounded_std(p.var[c], p.eps, p.eps_on_std, p.min_std, p.max_std));
    can_clip |= l.has_columns && p.diag != nullptr && p.diag[kMaxAbsZ * p.cols + c] > p.clip;
  }
  if (__any_sync(kAllLanes, can_clip)) {
    normalize_rows<scalar_t, V, true>(p, l, rows, mean, scale);
  } else {
    normalize_rows<scalar_t, V, false>(p, l, rows, mean, scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// Reduce and merge, then either the running update (with one row split, y too) or, for
// batch_moments (p.moments set), the batch's table. At most 128 registers, so that two blocks
// share a multiprocessor (16 warps keep enough loads in flight).
template <typename scalar_t, int V, bool kElementMask>
__global__ void __launch_bounds__(kThreads, 2) running_norm_kernel(const KernelArgs a) {
  __shared__ ColumnSummary shared[kMergeCapacity];
  __shared__ bool last_to_arrive;
  const TileGrid& g = a.grid;
  const int64_t tile = blockIdx.x % g.column_tiles, split = blockIdx.x / g.column_tiles;
  const Layout l = layout_of<V>(g, tile);
  const ThreadRows rows = thread_rows(g, l, split);
  {
    ThreadSums<typename Acc<scalar_t>::type, V, kElementMask> sums;
    sum_thread_rows<scalar_t, V, kElementMask>(a.p, l, rows, sums);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      publish_row_lanes<V>(column_summary<scalar_t, V, kElementMask>(a.p, l, rows, sums, j), j, l.column_threads,
                           shared);
    }
  }
  __syncthreads();
  const bool merges = l.row_lane == 0 && l.has_columns;  // the threads that hold the block's merge
  if (g.row_splits > 1) {
    if (merges) {
      double* table = a.partials + split * kNumMomentRows * a.p.cols;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        store_column_summary(table, a.p.cols, l.col + j, merged_row_lanes<V>(shared, j, l.column_threads, kThreads));
      }
    }
    __threadfence();  // the partials are visible device-wide before the counter says they are there
    __syncthreads();
    if (threadIdx.x == 0) last_to_arrive = atomicAdd(a.arrivals + tile, 1) == g.row_splits - 1;
    __syncthreads();
    if (!last_to_arrive) return;
    __threadfence();
#pragma unroll
    for (int j = 0; j < V; ++j) publish_row_lanes<V>(merge_partials(a, l, l.col + j), j, l.column_threads, shared);
    __syncthreads();
  }
  if (merges) {
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const ColumnSummary s = merged_row_lanes<V>(shared, j, l.column_threads, kThreads);
      if (a.p.moments != nullptr) {
        store_column_summary(a.p.moments, a.p.cols, l.col + j, s);
      } else {
        finish_column(a.p, l.col + j, s);
      }
    }
  }
  if (g.row_splits > 1 || !a.p.with_output) return;
  __syncthreads();  // row lane 0's updated statistics are visible to the block
  normalize_thread_rows<scalar_t, V>(a.p, l, rows);
}

// y alone, the blocks taken in the reverse order of running_norm_kernel's (its last reads are the
// likeliest still in L2).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) normalize_kernel(const KernelArgs a) {
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  const Layout l = layout_of<V>(a.grid, block % a.grid.column_tiles);
  const ThreadRows rows = thread_rows(a.grid, l, block / a.grid.column_tiles);
  normalize_thread_rows<scalar_t, V>(a.p, l, rows);
}

// merge_normalize's first half, a thread per column: the parts merged in order, the running
// update and the diagnostics of the merged batch (finish_column, as running_norm).
__global__ void __launch_bounds__(kThreads) merge_parts_kernel(const Problem p) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < p.cols) finish_column(p, c, merge_column_parts(p.parts, p.num_parts, p.cols, c));
}

// ---------------------------------------------------------------------------------------------
// Host: plans and launches.

bool has_element_mask(const Problem& p) { return p.mask != nullptr && p.mask_cols > 1; }

// The widest vector the layout allows: 16-byte aligned rows (or a single row) whose width is a
// multiple of it, in x and in out.
template <typename scalar_t>
int vector_width(const Problem& p) {
  constexpr int kVector = kVectorWidth<scalar_t>;
  const auto fits = [&](const void* ptr, int64_t row_stride) {
    return is_vector_aligned(ptr) && (p.rows <= 1 || row_stride % kVector == 0);
  };
  const bool fit = p.cols % kVector == 0 && fits(p.x, p.x_row_stride) && (!p.with_output || fits(p.out, p.out_row_stride));
  return fit ? kVector : 1;
}

// Tiles one 128-byte segment wide (narrower for narrow x). Row splits: enough to fill (not exceed)
// one wave of blocks, and to keep every thread at kMaxRowsPerThread rows or fewer, but (with
// partials) few enough that each split reads kMinSplitBytesPerColumn of each column, and never so
// many that a thread gets fewer than kMinRowsPerThread rows.
LaunchPlan tile_plan(const Problem& p, int element_bytes, int vector_width, int64_t resident, bool with_partials) {
  LaunchPlan plan{};
  plan.vector_width = vector_width;
  const int64_t col_vectors = p.cols / vector_width;
  int column_threads = kSegmentBytes / (vector_width * element_bytes);
  while (column_threads > 1 && column_threads / 2 >= col_vectors) column_threads /= 2;
  plan.column_threads = column_threads;
  plan.column_tiles = ceil_div(col_vectors, column_threads);
  const int64_t row_threads = kThreads / column_threads;
  int64_t min_rows = kMinRowsPerThread * row_threads;
  if (with_partials) min_rows = std::max(min_rows, kMinSplitBytesPerColumn / element_bytes);
  // At most one wave: a few blocks more than the device holds would double the time.
  const int64_t wanted = std::min(resident / plan.column_tiles, p.rows / min_rows);
  const int64_t splits = std::max({int64_t{1}, wanted, ceil_div(p.rows, row_threads * kMaxRowsPerThread)});
  plan.rows_per_split = std::max<int64_t>(1, ceil_div(p.rows, splits));
  plan.row_splits = std::max<int64_t>(1, ceil_div(p.rows, plan.rows_per_split));
  if (with_partials && plan.row_splits > 1) {
    plan.workspace_bytes = sizeof(double) * kNumMomentRows * plan.row_splits * p.cols + sizeof(int) * plan.column_tiles;
  }
  return plan;
}

KernelArgs kernel_args(const Problem& p, const LaunchPlan& plan, void* workspace) {
  const TileGrid grid{p.rows, p.cols, plan.column_threads, plan.column_tiles, plan.row_splits, plan.rows_per_split};
  KernelArgs a{p, grid, nullptr, nullptr};
  if (plan.workspace_bytes > 0) {
    a.partials = static_cast<double*>(workspace);
    a.arrivals = reinterpret_cast<int*>(a.partials + kNumMomentRows * plan.row_splits * p.cols);
  }
  return a;
}

// running_norm_kernel (after a reset of the arrival counters when the rows are split), then, with
// several splits and an output, normalize_kernel.
void launch_reduce(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  const KernelArgs a = kernel_args(p, plan, workspace);
  if (plan.row_splits > 1) cudaMemsetAsync(a.arrivals, 0, sizeof(int) * plan.column_tiles, stream);
  const unsigned grid = static_cast<unsigned>(plan.column_tiles * plan.row_splits);
  with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      if (has_element_mask(p)) {
        running_norm_kernel<scalar_t, V, true><<<grid, kThreads, 0, stream>>>(a);
      } else {
        running_norm_kernel<scalar_t, V, false><<<grid, kThreads, 0, stream>>>(a);
      }
      if (plan.row_splits > 1 && p.with_output) normalize_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(a);
    });
  });
}

}  // namespace

LaunchPlan plan_running_norm(const Problem& p) {
  return with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    return with_vector_width<scalar_t>(vector_width<scalar_t>(p), [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t resident = has_element_mask(p) ? resident_blocks<running_norm_kernel<scalar_t, V, true>>()
                                                   : resident_blocks<running_norm_kernel<scalar_t, V, false>>();
      return tile_plan(p, sizeof(scalar_t), V, resident, true);
    });
  });
}

void launch_running_norm(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  Problem update = p;
  update.moments = nullptr;
  launch_reduce(update, plan, workspace, stream);
}

void launch_batch_moments(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  Problem reduce = p;
  reduce.with_output = false;
  launch_reduce(reduce, plan, workspace, stream);
}

LaunchPlan plan_normalize(const Problem& p) {
  return with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    return with_vector_width<scalar_t>(vector_width<scalar_t>(p), [&](auto width) {
      constexpr int V = decltype(width)::value;
      return tile_plan(p, sizeof(scalar_t), V, resident_blocks<normalize_kernel<scalar_t, V>>(), false);
    });
  });
}

void launch_normalize(const Problem& p, const LaunchPlan& plan, cudaStream_t stream) {
  const KernelArgs a = kernel_args(p, plan, nullptr);
  const unsigned grid = static_cast<unsigned>(plan.column_tiles * plan.row_splits);
  with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      normalize_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(a);
    });
  });
}

void launch_merge_normalize(const Problem& p, const LaunchPlan& plan, cudaStream_t stream) {
  merge_parts_kernel<<<static_cast<unsigned>(ceil_div(p.cols, kThreads)), kThreads, 0, stream>>>(p);
  if (p.with_output && p.rows > 0) launch_normalize(p, plan, stream);
}

}  // namespace cuda
}  // namespace fastnorm
