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
//
// normalize_with="previous" (Problem::previous): in a column whose count was > 0, y uses the
// statistics from before the batch, which every block reads before the reduce; a thread whose
// columns all have a history writes their y in the reduce pass, from the values it has just loaded
// (x read once), and counts their clipped entries. The tile's last block updates the statistics
// only after every block of the tile has arrived, so no block reads updated statistics as old
// ones. The other threads (a column without a history uses the updated statistics, i.e. the
// batch's own) write y in the normalize step, which skips the rest.
#include "running_norm.h"

#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>
#include <type_traits>

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
  // (kNumOutputRows, cols): what y uses per column, written by the update for the normalize launch
  // (nullptr: the normalize launch reads p's statistics, as fastnorm::normalize)
  double* outputs;
  unsigned long long* clipped;  // (cols): entries the reduce pass clipped (zeroed before the launch)
  int* arrivals;                // (column_tiles): blocks of the tile done storing their partials
};

// What y uses in a column: z = (x - mean) * inv_std; in_reduce: the reduce pass wrote its y.
struct OutputColumn {
  double mean, inv_std;
  bool in_reduce;
};

// Rows of KernelArgs::outputs (in_reduce as 1 or 0).
enum OutputRow : int { kOutputMean = 0, kOutputInvStd = 1, kOutputInReduce = 2, kNumOutputRows = 3 };

// The columns of a tile: one 128-byte segment of 2-byte elements at most.
constexpr int kMaxTileColumns = kSegmentBytes / 2;

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

// What y uses in a column of statistics mean and var (and long-run scale, read only where p.scale
// is set): the divisor bounded below by min_std, or the relative floor where larger (std_floor).
__device__ __forceinline__ OutputColumn output_of(const Problem& p, double mean, double var, double scale) {
  const double floor = p.scale != nullptr ? std_floor(p.min_std, p.min_std_rel, scale) : p.min_std;
  return {mean, 1.0 / bounded_std(var, p.eps, p.eps_on_std, floor, p.max_std), false};
}

// What y would use in column c with p's statistics as they are now.
__device__ __forceinline__ OutputColumn output_column(const Problem& p, int64_t c) {
  return output_of(p, p.mean[c], p.var[c], p.scale != nullptr ? p.scale[c] : 0.0);
}

// Whether running_norm writes y in its reduce pass where every column of a thread has a history
// (the kWritesY instance of running_norm_kernel).
__host__ __device__ inline bool reduce_writes_y(const Problem& p) {
  return p.previous && p.with_output && !p.out_overlaps_x;
}

// y written in the reduce pass: the coefficients from the statistics before the batch and the
// clipped entries counted per column. writes: every column of the thread has a history.
template <typename acc_t, int V>
struct ReduceOutput {
  bool writes;
  SplitMean<acc_t> mean[V];
  acc_t scale[V];
  unsigned clipped[V];
};

// Read before the reduce, so before the tile's last block updates the statistics.
template <typename acc_t, int V, bool kWritesY>
__device__ __forceinline__ ReduceOutput<acc_t, V> reduce_output(const Problem& p, const Layout& l) {
  ReduceOutput<acc_t, V> o;
  o.writes = kWritesY && l.has_columns;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = o.writes ? l.col + j : 0;
    const OutputColumn y = o.writes ? output_column(p, c) : OutputColumn{0.0, 0.0, false};
    o.writes = o.writes && p.count[c] > 0.0;
    o.mean[j] = split_mean<acc_t>(y.mean);
    o.scale[j] = static_cast<acc_t>(y.inv_std);
    o.clipped[j] = 0;
  }
  return o;
}

// y of row r (every entry, selected or not) from the values v the reduce loaded, as normalize_rows
// computes it, counting the selected finite entries with |z| > clip. Column j reads mask column
// mask_first + mask_step[j] (with an element mask).
template <typename scalar_t, int V, bool kElementMask>
__device__ __forceinline__ void write_reduced_row(const Problem& p, const Layout& l, int64_t r,
                                                  const Vec<scalar_t, V>& v, int64_t mask_first,
                                                  const int (&mask_step)[V],
                                                  ReduceOutput<typename Acc<scalar_t>::type, V>& o) {
  using acc_t = typename Acc<scalar_t>::type;
  const acc_t clip = static_cast<acc_t>(p.clip);
  const bool row_selected = kElementMask || is_selected(p.mask, p.mask_cols, r, 0);
  Vec<scalar_t, V> out;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const acc_t a = to_acc(v.v[j]);
    const acc_t z = ((a - o.mean[j].hi) - o.mean[j].lo) * o.scale[j];
    from_acc(clamp_keep_nan(z, -clip, clip), out.v[j]);
    const bool selected = kElementMask ? p.mask[r * p.mask_cols + mask_first + mask_step[j]] : row_selected;
    o.clipped[j] += selected && is_finite(a) && (z > clip || z < -clip) ? 1u : 0u;
  }
  store<scalar_t, V>(static_cast<scalar_t*>(p.out) + r * p.out_row_stride + l.col, out);
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
// tested: NaN or inf leave the sums non-finite, and column_state recomputes that column. Where
// o.writes, also writes y of every row (write_reduced_row).
template <typename scalar_t, int V, bool kElementMask, bool kWritesY>
__device__ __forceinline__ void sum_thread_rows(const Problem& p, const Layout& l, const ThreadRows& rows,
                                                ThreadSums<typename Acc<scalar_t>::type, V, kElementMask>& t,
                                                ReduceOutput<typename Acc<scalar_t>::type, V>& o) {
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
  // The element-mask path and y's coefficients hold more per column: fewer rows at once keeps them
  // within 128 registers. The plain path of up to 4 columns per thread keeps 2 * kUnroll rows (128
  // bytes) in flight: ~64 KB per multiprocessor, what HBM's latency needs.
  constexpr int kRowsAtOnce = V <= 4 ? (kElementMask || kWritesY ? kUnroll : 2 * kUnroll)
                              : kElementMask && kWritesY ? 1
                              : kElementMask || kWritesY ? 2
                                                         : kUnroll;
  for (int64_t k = 0; k < rows.n; k += kRowsAtOnce) {
    Vec<scalar_t, V> v[kRowsAtOnce];
    bool take[kRowsAtOnce];
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      take[u] = k + u < rows.n;
      if (take[u]) v[u] = load<scalar_t, V>(x + rows.row(k + u) * p.x_row_stride);
    }
    if (kWritesY && o.writes) {
#pragma unroll
      for (int u = 0; u < kRowsAtOnce; ++u) {
        if (take[u]) write_reduced_row<scalar_t, V, kElementMask>(p, l, rows.row(k + u), v[u], mask_first, mask_step, o);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsAtOnce; ++u) {
      if (!take[u] || (!kElementMask && !is_selected(p.mask, p.mask_cols, rows.row(k + u), 0))) continue;
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

// The tile's last block merges every split's partials of the tile with all its threads: tile
// column q gets kThreads / tile_columns consecutive threads (its lanes), lane k merging splits k,
// k + lanes, ... in order, then the lanes merge by a shuffle tree, lower lanes first (and through
// shared memory in warp order where a column's lanes span warps). Tile column q's state ends in
// shared[q]. Every thread of the block calls it; then __syncthreads.
__device__ __forceinline__ void merge_partials_of_tile(const KernelArgs& a, int64_t tile, int tile_columns,
                                                       ColumnSummary* shared) {
  const int t = static_cast<int>(threadIdx.x);
  const int lanes = kThreads / tile_columns;
  const int q = t / lanes, k = t % lanes;
  const int64_t c = tile * tile_columns + q;
  ColumnSummary s = empty_column_summary();
  if (c < a.p.cols) {
#pragma unroll 4
    for (int64_t split = k; split < a.grid.row_splits; split += lanes) {
      s = merge_summaries(s, load_partial(a, split, c));
    }
  }
  const int width = lanes < kWarpSize ? lanes : kWarpSize;
  for (int offset = 1; offset < width; offset *= 2) s = merge_summaries(s, shuffle_down(s, offset));
  constexpr int kWarpStates = kMaxTileColumns;  // where the warps' states wait, past the tile's columns
  static_assert(kWarpStates + kThreads / kWarpSize <= kMergeCapacity, "the merge's shared states");
  if (lanes > kWarpSize) {
    if (t % kWarpSize == 0) shared[kWarpStates + t / kWarpSize] = s;
    __syncthreads();
    for (int w = 1; k == 0 && w < lanes / kWarpSize; ++w) {
      s = merge_summaries(s, shared[kWarpStates + t / kWarpSize + w]);
    }
  }
  if (k == 0) shared[q] = s;
}

// With the batch's state of column c: the diagnostics (every row), the running update, and what y
// uses (returned): the statistics from before the update with p.previous where the count was > 0,
// else the updated ones. Also the bound on |z| (from the extreme values, z being monotonic in x)
// that later decides whether clipped entries are counted, as the C++ CPU kernel does.
// reduce_wrote_y: the reduce pass wrote y where every column of a thread has a history, and
// counted `clipped` of the column's entries.
__device__ __forceinline__ OutputColumn finish_column(const Problem& p, int64_t c, const ColumnSummary& s,
                                                      bool reduce_wrote_y, double clipped) {
  const Moments& m = s.moments;
  double* diag = p.diag + c;  // diagnostic row i at diag[i * p.cols]
  diag[kBatchCount * p.cols] = m.count;
  diag[kBatchMean * p.cols] = m.mean;
  diag[kBatchVar * p.cols] = m.count > 0.0 ? m.m2 / m.count : 0.0;
  diag[kNonFinite * p.cols] = s.nonfinite;
  // The statistics are read once and y's coefficients computed from registers: the stores below
  // may alias for the compiler, and a reload after them would cost a round trip to L2.
  double mean = p.mean[c], var = p.var[c], count = p.count[c], scale = p.scale != nullptr ? p.scale[c] : 0.0;
  const bool keeps_previous = p.previous && count > 0.0;
  const OutputColumn before = output_of(p, mean, var, scale);
  update_running_stats(mean, var, count, m, p.update, &scale);  // (a local: kept where p.scale is set)
  p.mean[c] = mean;
  p.var[c] = var;
  p.count[c] = count;
  if (p.scale != nullptr) p.scale[c] = scale;
  OutputColumn y = keeps_previous ? before : output_of(p, mean, var, scale);
  y.in_reduce = keeps_previous && reduce_wrote_y;
  if (p.with_output) {
    diag[kClipped * p.cols] = clipped;
    diag[kMaxAbsZ * p.cols] = m.count > 0.0 ? fmax(s.max - y.mean, y.mean - s.min) * y.inv_std : 0.0;
  } else {
    diag[kClipped * p.cols] = diag[kMaxAbsZ * p.cols] = nan("");
  }
  return y;
}

__device__ __forceinline__ void store_output_column(double* table, int64_t cols, int64_t c, const OutputColumn& y) {
  table[kOutputMean * cols + c] = y.mean;
  table[kOutputInvStd * cols + c] = y.inv_std;
  table[kOutputInReduce * cols + c] = y.in_reduce ? 1.0 : 0.0;
}

__device__ __forceinline__ OutputColumn load_output_column(const double* table, int64_t cols, int64_t c) {
  return {table[kOutputMean * cols + c], table[kOutputInvStd * cols + c], table[kOutputInReduce * cols + c] != 0.0};
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

// y of the thread's rows with the coefficients y of its columns, unless the reduce pass wrote
// them all. Every thread of the block must call it (the clip decision is taken per warp).
template <typename scalar_t, int V>
__device__ __forceinline__ void normalize_thread_rows(const Problem& p, const Layout& l, ThreadRows rows,
                                                      const OutputColumn (&y)[V]) {
  using acc_t = typename Acc<scalar_t>::type;
  SplitMean<acc_t> mean[V];
  acc_t scale[V];
  bool can_clip = false, written = l.has_columns;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = l.has_columns ? l.col + j : 0;
    mean[j] = split_mean<acc_t>(y[j].mean);
    scale[j] = static_cast<acc_t>(y[j].inv_std);
    can_clip |= l.has_columns && p.diag != nullptr && p.diag[kMaxAbsZ * p.cols + c] > p.clip;
    written = written && y[j].in_reduce;
  }
  if (written) {  // nothing left to do, but the warp's collectives still count this lane
    rows.n = 0;
    can_clip = false;
  }
  if (__any_sync(kAllLanes, can_clip)) {
    normalize_rows<scalar_t, V, true>(p, l, rows, mean, scale);
  } else {
    normalize_rows<scalar_t, V, false>(p, l, rows, mean, scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Kernels.

// The clipped entries the warp's threads counted in the reduce pass, added per tile column into
// `clipped` (shared). Every lane of the warp must call it.
template <typename acc_t, int V>
__device__ __forceinline__ void add_clipped_of_warp(const ReduceOutput<acc_t, V>& o, const Layout& l,
                                                    unsigned* clipped) {
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const unsigned n = sum_row_lanes_of_warp(o.clipped[j], l.column_threads);
    if (l.has_columns && holds_group_result(l.column_threads) && n > 0) atomicAdd(clipped + l.column_lane * V + j, n);
  }
}

// Reduce and merge, then either the running update (with one row split, y too) or, for
// batch_moments (p.moments set), the batch's table. kWritesY (reduce_writes_y): y of the columns
// with a history in the reduce pass; an instance of its own, as its coefficients and counters
// would cost the other registers. At most 128 registers, so that two blocks share a
// multiprocessor (16 warps keep enough loads in flight).
template <typename scalar_t, int V, bool kElementMask, bool kWritesY>
__global__ void __launch_bounds__(kThreads, 2) running_norm_kernel(const KernelArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  __shared__ ColumnSummary shared[kMergeCapacity];
  __shared__ unsigned clipped_of_tile[kMaxTileColumns];  // by the reduce pass (previous)
  __shared__ OutputColumn output_of_tile[kMaxTileColumns];
  __shared__ bool last_to_arrive;
  const TileGrid& g = a.grid;
  const int64_t tile = blockIdx.x % g.column_tiles, split = blockIdx.x / g.column_tiles;
  const Layout l = layout_of<V>(g, tile);
  const ThreadRows rows = thread_rows(g, l, split);
  if (kWritesY) {
    if (threadIdx.x < kMaxTileColumns) clipped_of_tile[threadIdx.x] = 0;
    __syncthreads();
  }
  {
    ReduceOutput<acc_t, V> output = reduce_output<acc_t, V, kWritesY>(a.p, l);
    ThreadSums<acc_t, V, kElementMask> sums;
    sum_thread_rows<scalar_t, V, kElementMask, kWritesY>(a.p, l, rows, sums, output);
    if (kWritesY) add_clipped_of_warp<acc_t, V>(output, l, clipped_of_tile);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      publish_row_lanes<V>(column_summary<scalar_t, V, kElementMask>(a.p, l, rows, sums, j), j, l.column_threads,
                           shared);
    }
  }
  __syncthreads();
  // One thread per tile column merges the block's row lanes and finishes the column: tile column t
  // is column t % V of column lane t / V (the indexing of shared, clipped_of_tile, output_of_tile).
  const int tile_columns = g.column_threads * V;
  const int t = static_cast<int>(threadIdx.x);
  const int64_t c = tile * tile_columns + t;
  const bool owns_column = t < tile_columns && c < g.cols;
  if (g.row_splits > 1) {
    if (owns_column) {
      double* table = a.partials + split * kNumMomentRows * a.p.cols;
      store_column_summary(table, a.p.cols, c, merged_tile_column<V>(shared, t, l.column_threads, kThreads));
      const unsigned clipped = kWritesY ? clipped_of_tile[t] : 0u;
      if (clipped > 0) atomicAdd(a.clipped + c, static_cast<unsigned long long>(clipped));
    }
    __threadfence();  // the partials are visible device-wide before the counter says they are there
    __syncthreads();
    if (threadIdx.x == 0) last_to_arrive = atomicAdd(a.arrivals + tile, 1) == g.row_splits - 1;
    __syncthreads();
    if (!last_to_arrive) return;
    __threadfence();
    merge_partials_of_tile(a, tile, tile_columns, shared);
    __syncthreads();
  }
  if (owns_column) {
    const ColumnSummary s = g.row_splits > 1 ? shared[t] : merged_tile_column<V>(shared, t, l.column_threads, kThreads);
    if (a.p.moments != nullptr) {
      store_column_summary(a.p.moments, a.p.cols, c, s);
    } else {
      const double clipped = !kWritesY            ? 0.0
                             : g.row_splits > 1 ? static_cast<double>(__ldcg(a.clipped + c))
                                                : static_cast<double>(clipped_of_tile[t]);
      const OutputColumn y = finish_column(a.p, c, s, kWritesY, clipped);
      if (g.row_splits > 1) {
        if (a.p.with_output) store_output_column(a.outputs, a.p.cols, c, y);
      } else {
        output_of_tile[t] = y;
      }
    }
  }
  if (tile == 0 && threadIdx.x == 0 && a.p.steps != nullptr) ++*a.p.steps;  // one block: the tile's last
  if (g.row_splits > 1 || !a.p.with_output) return;
  __syncthreads();  // row lane 0's updated statistics and y's coefficients are visible to the block
  OutputColumn y[V];
#pragma unroll
  for (int j = 0; j < V; ++j) y[j] = output_of_tile[l.has_columns ? l.column_lane * V + j : 0];
  normalize_thread_rows<scalar_t, V>(a.p, l, rows, y);
}

// y alone, the blocks taken in the reverse order of running_norm_kernel's (its last reads are the
// likeliest still in L2), with the coefficients a.outputs (or p's statistics where null).
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) normalize_kernel(const KernelArgs a) {
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  const Layout l = layout_of<V>(a.grid, block % a.grid.column_tiles);
  const ThreadRows rows = thread_rows(a.grid, l, block / a.grid.column_tiles);
  OutputColumn y[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    const int64_t c = l.has_columns ? l.col + j : 0;
    y[j] = a.outputs != nullptr ? load_output_column(a.outputs, a.p.cols, c) : output_column(a.p, c);
  }
  normalize_thread_rows<scalar_t, V>(a.p, l, rows, y);
}

// merge_normalize's first half, a thread per column: the parts merged in order, the running
// update, the diagnostics of the merged batch (finish_column, as running_norm) and y's
// coefficients into `outputs`; the step counted once.
__global__ void __launch_bounds__(kThreads) merge_parts_kernel(const Problem p, double* outputs) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (c < p.cols) {
    const OutputColumn y = finish_column(p, c, merge_column_parts(p.parts, p.num_parts, p.cols, c), false, 0.0);
    if (outputs != nullptr) store_output_column(outputs, p.cols, c, y);
  }
  if (c == 0 && p.steps != nullptr) ++*p.steps;
}

// ---------------------------------------------------------------------------------------------
// Host: plans and launches.

bool has_element_mask(const Problem& p) { return p.mask != nullptr && p.mask_cols > 1; }

// Calls fn with the flags of p's running_norm_kernel instance, as std::bool_constant: element mask,
// y in the reduce pass.
template <typename Fn>
auto with_kernel_flags(const Problem& p, Fn&& fn) {
  using Yes = std::true_type;
  using No = std::false_type;
  if (has_element_mask(p)) return reduce_writes_y(p) ? fn(Yes(), Yes()) : fn(Yes(), No());
  return reduce_writes_y(p) ? fn(No(), Yes()) : fn(No(), No());
}

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
  return plan;
}

// The workspace of running_norm_kernel with several splits, in this order: the partial tables, y's
// coefficients, then the counters it needs zeroed (clipped entries, arrivals), contiguous so that
// one memset resets them.
struct SplitWorkspace {
  size_t outputs, counters, counter_bytes, total;
};

SplitWorkspace split_workspace(const Problem& p, const LaunchPlan& plan) {
  SplitWorkspace w;
  w.outputs = sizeof(double) * kNumMomentRows * plan.row_splits * p.cols;
  w.counters = w.outputs + sizeof(double) * kNumOutputRows * p.cols;
  w.counter_bytes = sizeof(unsigned long long) * p.cols + sizeof(int) * plan.column_tiles;
  w.total = w.counters + w.counter_bytes;
  return w;
}

TileGrid tile_grid(const Problem& p, const LaunchPlan& plan) {
  return {p.rows, p.cols, plan.column_threads, plan.column_tiles, plan.row_splits, plan.rows_per_split};
}

// running_norm_kernel (after a reset of the counters when the rows are split), then, with several
// splits and an output, normalize_kernel.
void launch_reduce(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  KernelArgs a{p, tile_grid(p, plan), nullptr, nullptr, nullptr, nullptr};
  if (plan.row_splits > 1) {
    const SplitWorkspace w = split_workspace(p, plan);
    char* base = static_cast<char*>(workspace);
    a.partials = reinterpret_cast<double*>(base);
    a.outputs = reinterpret_cast<double*>(base + w.outputs);
    a.clipped = reinterpret_cast<unsigned long long*>(base + w.counters);
    a.arrivals = reinterpret_cast<int*>(a.clipped + p.cols);
    cudaMemsetAsync(base + w.counters, 0, w.counter_bytes, stream);
  }
  const unsigned grid = static_cast<unsigned>(plan.column_tiles * plan.row_splits);
  with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      with_kernel_flags(p, [&](auto element_mask, auto writes_y) {
        constexpr bool kElementMask = decltype(element_mask)::value, kWritesY = decltype(writes_y)::value;
        running_norm_kernel<scalar_t, V, kElementMask, kWritesY><<<grid, kThreads, 0, stream>>>(a);
      });
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
      const int64_t resident = with_kernel_flags(p, [&](auto element_mask, auto writes_y) {
        return resident_blocks<running_norm_kernel<scalar_t, V, decltype(element_mask)::value,
                                                   decltype(writes_y)::value>>();
      });
      LaunchPlan plan = tile_plan(p, sizeof(scalar_t), V, resident, true);
      if (plan.row_splits > 1) plan.workspace_bytes = split_workspace(p, plan).total;
      return plan;
    });
  });
}

void launch_running_norm(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  Problem update = p;
  update.moments = nullptr;
  if (p.rows == 0) update.steps = nullptr;  // a batch without rows is no update step
  launch_reduce(update, plan, workspace, stream);
}

void launch_batch_moments(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  Problem reduce = p;
  reduce.with_output = false;
  reduce.previous = false;
  reduce.steps = nullptr;
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

LaunchPlan plan_merge_normalize(const Problem& p) {
  LaunchPlan plan = plan_normalize(p);
  plan.workspace_bytes = sizeof(double) * kNumOutputRows * p.cols;
  return plan;
}

namespace {

// normalize_kernel with y's coefficients `outputs` (nullptr: p's statistics).
void launch_normalize_kernel(const Problem& p, const LaunchPlan& plan, double* outputs, cudaStream_t stream) {
  const KernelArgs a{p, tile_grid(p, plan), nullptr, outputs, nullptr, nullptr};
  const unsigned grid = static_cast<unsigned>(plan.column_tiles * plan.row_splits);
  with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      normalize_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(a);
    });
  });
}

}  // namespace

void launch_normalize(const Problem& p, const LaunchPlan& plan, cudaStream_t stream) {
  launch_normalize_kernel(p, plan, nullptr, stream);
}

void launch_merge_normalize(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream) {
  double* outputs = p.with_output ? static_cast<double*>(workspace) : nullptr;
  const unsigned blocks = static_cast<unsigned>(std::max<int64_t>(1, ceil_div(p.cols, kThreads)));
  merge_parts_kernel<<<blocks, kThreads, 0, stream>>>(p, outputs);
  if (p.with_output && p.rows > 0 && p.cols > 0) launch_normalize_kernel(p, plan, outputs, stream);
}

}  // namespace cuda
}  // namespace fastnorm
