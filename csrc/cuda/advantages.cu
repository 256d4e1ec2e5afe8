// CUDA kernels of fastnorm::normalize_advantages and its split pair ::advantage_moments and
// ::normalize_advantages_from (the layouts are described in advantages.h).
//
// Runs layout: warp w reduces piece w % pieces_per_run of run w / pieces_per_run, its lanes taking
// consecutive vectors (coalesced loads; their width from x alone, never from the mask's layout).
// A lane sums at most kMaxVectorsPerLane vectors in float (float64 for float64 x) about one shift,
// its first selected finite value, so that the sums of its V slots add up in float64 into the
// corrected two-pass formula (moments_from_shifted_sums).
// The lanes merge by a shuffle tree and lane 0 stores the piece's moments as one column of a
// batch-moments table. Columns layout: batch_moments' reduce (running_norm.cu) writes one column
// per (group, inner index) of x viewed as (outer, groups * inner) rows.
//
// Then merge_groups_kernel merges each group's columns of the table in a fixed order (Chan
// merge, merge_summaries) and advantage_group (advantages_math.h, as the CPU kernel) gives the
// stats and the coefficients of y, which a last kernel writes, visiting x in the reverse order of
// the reduce so that its last reads are still in L2. One run (groups == 1: global, masked rows)
// takes 2 kernels: each reduce block stores its warps' pieces merged (a tree), and each block of
// the normalize merges that short table itself (a tree, the same bits in every block) instead of
// a merge kernel; block 0 writes the stats. Columns of a group each (inner == 1) skip the merge
// kernel too: the normalize reads each column's moments from the table.
//
// The split ops run these passes apart: advantage_moments the reduce and merge, storing each
// group's moments instead; normalize_advantages_from merge_group_parts_kernel (the parts' merge
// and the stats, a thread per group), then the normalize kernel.
#include "advantages.h"

#include <cuda_runtime.h>
#include <math.h>

#include <algorithm>

#include "column_state.cuh"
#include "elements.cuh"
#include "tile_grid.cuh"

namespace fastnorm {
namespace cuda {
namespace {

constexpr int kWarpsPerBlock = kThreads / kWarpSize;
// groups > 1 with runs of at most this many entries (inner) take the columns layout.
constexpr int64_t kMaxColumnsInner = 16;
// Vectors a lane sums in float: at most 128 per slot keeps the sums accurate to ~1e-6 (as in
// running_norm.cu); at least a few, so that the pieces' moments stay a small part of the traffic.
constexpr int64_t kMaxVectorsPerLane = 128;
constexpr int64_t kMinVectorsPerLane = 4;
constexpr int kUnroll = 4;  // vectors whose loads a lane issues before using any
// A group of at least this many table columns is merged by a block, smaller ones by a warp.
constexpr int64_t kBlockMergeColumns = 1024;
constexpr size_t kWorkspaceAlign = 256;

// Per group, what y needs (rows of the coefficient table, groups wide).
enum CoefRow : int { kCoefMean = 0, kCoefScale = 1, kCoefLive = 2, kNumCoefRows = 3 };

// ---------------------------------------------------------------------------------------------
// Runs layout: reduce.

// k = q * d + r for a divisor d; advance() moves k by a fixed step without dividing.
struct Quotient {
  int64_t q, r;
};

__device__ __forceinline__ Quotient advance(Quotient at, const Quotient& step, int64_t d) {
  at.q += step.q;
  at.r += step.r;
  if (at.r >= d) {
    at.r -= d;
    ++at.q;
  }
  return at;
}

// How the runs reduce reads the mask: one entry per vector (mask_group a multiple of V; also
// without a mask), or one per entry of the vector (any other mask_group, V > 1). V comes from x
// alone, so a mask's layout never changes the entries' partition, nor the sums' bits.
enum class RunMask : int { kPerVector, kPerEntry };

struct RunArgs {
  AdvantageProblem p;
  int64_t runs, run_length, pieces_per_run, piece_length;
  Quotient mask_step;  // a lane's stride through x, kWarpSize * V, divided by mask_group
  double* partials;    // (kNumMomentRows, runs * pieces_per_run): each piece's moments
  const double* coef;  // (kNumCoefRows, groups)
};

// The flat entries [first, end) of warp `warp`'s piece, and its run.
struct Piece {
  int64_t first, end, run;
};

__device__ __forceinline__ Piece piece_of(const RunArgs& a, int64_t warp) {
  const int64_t run = warp / a.pieces_per_run;
  const int64_t begin = (warp % a.pieces_per_run) * a.piece_length;
  const int64_t base = run * a.run_length;
  return {base + begin, base + lesser(a.run_length, begin + a.piece_length), run};
}

__device__ __forceinline__ bool is_selected(const bool* mask, int64_t mask_group, int64_t k) {
  return mask == nullptr || mask[k / mask_group];
}

// A lane's sums: per slot j of its vectors, the selected finite entries' count and the sums of
// their deviations from one shift and of their squares; and their min and max.
template <typename acc_t, int V>
struct LaneSums {
  acc_t shift, s1[V], s2[V], count[V], lo, hi;
  bool has_shift;
};

template <typename scalar_t, int V, RunMask kMask>
__device__ __forceinline__ void sum_lane(const RunArgs& a, const Piece& piece, int lane,
                                         LaneSums<typename Acc<scalar_t>::type, V>& t) {
  using acc_t = typename Acc<scalar_t>::type;
  const scalar_t* x = static_cast<const scalar_t*>(a.p.x);
  const bool* mask = a.p.mask;
  const int64_t stride = kWarpSize * V, first = piece.first + lane * V;
  t.shift = acc_t(0);
  t.has_shift = false;
  t.lo = static_cast<acc_t>(INFINITY);
  t.hi = -static_cast<acc_t>(INFINITY);
#pragma unroll
  for (int j = 0; j < V; ++j) t.s1[j] = t.s2[j] = t.count[j] = acc_t(0);
  Quotient at{0, 0};  // this vector's first entry k as k / mask_group, k % mask_group
  if (mask != nullptr) at = {first / a.p.mask_group, first % a.p.mask_group};
  for (int64_t k = first; k < piece.end; k += kUnroll * stride) {
    Vec<scalar_t, V> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (k + u * stride < piece.end) v[u] = load<scalar_t, V>(x + k + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t ku = k + u * stride;
      if (ku >= piece.end) continue;
      bool selected[V];
      if constexpr (kMask == RunMask::kPerEntry) {
        Quotient e = at;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          selected[j] = mask[e.q];
          if (++e.r == a.p.mask_group) e = {e.q + 1, 0};
        }
        at = advance(at, a.mask_step, a.p.mask_group);
      } else {
        const bool s = mask == nullptr || mask[at.q];
        if (mask != nullptr) at = advance(at, a.mask_step, a.p.mask_group);
#pragma unroll
        for (int j = 0; j < V; ++j) selected[j] = s;
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const acc_t value = to_acc(v[u].v[j]);
        const bool ok = selected[j] && is_finite(value);
        t.shift = ok && !t.has_shift ? value : t.shift;
        t.has_shift |= ok;
        const acc_t d = ok ? value - t.shift : acc_t(0);
        t.count[j] += ok ? acc_t(1) : acc_t(0);
        t.s1[j] += d;
        t.s2[j] = fma(d, d, t.s2[j]);
        t.lo = ok && value < t.lo ? value : t.lo;
        t.hi = ok && value > t.hi ? value : t.hi;
      }
    }
  }
}

// The lane's summary: its slots share the shift, so their sums add up (in float64).
template <typename acc_t, int V>
__device__ __forceinline__ ColumnSummary lane_summary(const LaneSums<acc_t, V>& t) {
  double count = 0.0, s1 = 0.0, s2 = 0.0;
#pragma unroll
  for (int j = 0; j < V; ++j) {
    count += static_cast<double>(t.count[j]);
    s1 += static_cast<double>(t.s1[j]);
    s2 += static_cast<double>(t.s2[j]);
  }
  return {moments_from_shifted_sums(count, t.shift, s1, s2), 0.0, static_cast<double>(t.lo),
          static_cast<double>(t.hi)};
}

// The exact two-pass moments in float64 of a lane's entries: the path for lanes whose float sums
// overflowed (huge values). Scalar arguments: a reference to the kernel's would copy them to local
// memory in every reduce.
template <typename scalar_t, int V>
__device__ __noinline__ ColumnSummary recompute_lane(const scalar_t* x, const bool* mask, int64_t mask_group,
                                                     int64_t first, int64_t end) {
  const int64_t stride = kWarpSize * V;
  ColumnSummary s = empty_column_summary();
  double sum = 0.0;
  for (int64_t k = first; k < end; k += stride) {
    for (int j = 0; j < V; ++j) {
      const double v = to_acc(x[k + j]);
      if (!is_selected(mask, mask_group, k + j) || !is_finite(v)) continue;
      s.moments.count += 1.0;
      sum += v;
      s.min = fmin(s.min, v);
      s.max = fmax(s.max, v);
    }
  }
  const double mean = sum / fmax(s.moments.count, 1.0);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = first; k < end; k += stride) {
    for (int j = 0; j < V; ++j) {
      const double v = to_acc(x[k + j]);
      if (!is_selected(mask, mask_group, k + j) || !is_finite(v)) continue;
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  s.moments = moments_from_shifted_sums(s.moments.count, mean, s1, s2);
  return s;
}

// Warp `warp`'s piece merged over its lanes (valid in lane 0; every lane must call it).
template <typename scalar_t, int V, RunMask kMask>
__device__ __forceinline__ ColumnSummary piece_summary(const RunArgs& a, int64_t warp) {
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const Piece piece = piece_of(a, warp);
  LaneSums<typename Acc<scalar_t>::type, V> sums;
  sum_lane<scalar_t, V, kMask>(a, piece, lane, sums);
  ColumnSummary s = lane_summary(sums);
  if (!is_finite(s.moments.mean) || !is_finite(s.moments.m2)) {
    s = recompute_lane<scalar_t, V>(static_cast<const scalar_t*>(a.p.x), a.p.mask, a.p.mask_group,
                                    piece.first + lane * V, piece.end);
  }
  return merge_warp_lanes(s, 1);
}

// Runs per group: each warp stores its piece's moments as column `warp` of the table.
template <typename scalar_t, int V, RunMask kMask>
__global__ void __launch_bounds__(kThreads) reduce_runs_kernel(const RunArgs a) {
  const int64_t pieces = a.runs * a.pieces_per_run;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (warp >= pieces) return;  // the whole warp
  const ColumnSummary s = piece_summary<scalar_t, V, kMask>(a, warp);
  if (threadIdx.x % kWarpSize == 0) store_column_summary(a.partials, pieces, warp, s);
}

// Lane 0 of each warp holds s: the block's warps merged by a tree in shared memory, returned to
// every thread. Every thread of the block must call it.
__device__ __forceinline__ ColumnSummary merge_block_warps(const ColumnSummary& s) {
  __shared__ ColumnSummary warps[kWarpsPerBlock];
  if (threadIdx.x % kWarpSize == 0) warps[threadIdx.x / kWarpSize] = s;
  __syncthreads();
  for (int half = kWarpsPerBlock / 2; half > 0; half /= 2) {
    const int t = static_cast<int>(threadIdx.x);
    if (t < half) warps[t] = merge_summaries(warps[t], warps[t + half]);
    __syncthreads();
  }
  const ColumnSummary r = warps[0];
  __syncthreads();  // the array may be reused
  return r;
}

// One run (groups == 1): each block stores its warps' pieces merged as column blockIdx.x of the
// table (warps past the last piece add nothing).
template <typename scalar_t, int V, RunMask kMask>
__global__ void __launch_bounds__(kThreads) reduce_one_run_kernel(const RunArgs a) {
  const int64_t pieces = a.pieces_per_run;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  const ColumnSummary s = warp < pieces ? piece_summary<scalar_t, V, kMask>(a, warp) : empty_column_summary();
  const ColumnSummary block = merge_block_warps(s);
  if (threadIdx.x == 0) store_column_summary(a.partials, gridDim.x, blockIdx.x, block);
}

// The `cols` columns of a one-run table merged by one block: thread t columns t, t + kThreads, ...
// in order, then a shuffle tree and merge_block_warps; every block that calls it gets the same bits.
__device__ __forceinline__ ColumnSummary merge_table_by_block(const double* table, int64_t cols) {
  ColumnSummary s = empty_column_summary();
  for (int64_t c = threadIdx.x; c < cols; c += kThreads) s = merge_summaries(s, column_of_part(table, 0, cols, c));
  return merge_block_warps(merge_warp_lanes(s, 1));
}

// ---------------------------------------------------------------------------------------------
// Both layouts: the merge per group.

// The table columns of group g: for a < outer_items, b < inner_items, in that order, column
// a * stride_outer + g * stride_group + b.
struct GroupColumns {
  const double* table;
  int64_t cols, outer_items, inner_items, stride_outer, stride_group;
};

struct MergeArgs {
  AdvantageProblem p;  // p.moments: store the groups' moments there (advantage_moments)
  GroupColumns columns;
  int group_threads;  // kWarpSize (a warp per group) or kThreads (a block per group)
  double* coef;
};

__device__ __forceinline__ void store_stats(const AdvantageProblem& p, int64_t g, const AdvantageGroup& r) {
  const int64_t G = p.groups;
  p.stats[kAdvCount * G + g] = r.count;
  p.stats[kAdvMean * G + g] = r.mean;
  p.stats[kAdvStdRaw * G + g] = r.std_raw;
  p.stats[kAdvNormMaxAbs * G + g] = r.norm_max_abs;
}

// Group g's stats and the coefficients of its y.
__device__ __forceinline__ void finish_group(const AdvantageProblem& p, double* coef, int64_t g,
                                             const GroupMoments& m) {
  const AdvantageGroup r = advantage_group(m.moments, m.min, m.max, p.min_std, p.unbiased);
  const int64_t G = p.groups;
  store_stats(p, g, r);
  coef[kCoefMean * G + g] = r.mean;
  coef[kCoefScale * G + g] = r.scale;
  coef[kCoefLive * G + g] = r.live ? 1.0 : 0.0;
}

// Each group's columns: thread t of the group merges columns t, t + group_threads, ... in order,
// then the threads merge by a shuffle tree and (a block per group) across warps in order.
__global__ void __launch_bounds__(kThreads) merge_groups_kernel(const MergeArgs a) {
  __shared__ ColumnSummary warp_results[kWarpsPerBlock];
  const int64_t g = static_cast<int64_t>(blockIdx.x) * (kThreads / a.group_threads) + threadIdx.x / a.group_threads;
  if (g >= a.p.groups) return;  // whole warps; a block per group never has one past the end
  const GroupColumns& c = a.columns;
  ColumnSummary s = empty_column_summary();
  for (int64_t i = threadIdx.x % a.group_threads; i < c.outer_items * c.inner_items; i += a.group_threads) {
    const int64_t column = (i / c.inner_items) * c.stride_outer + g * c.stride_group + i % c.inner_items;
    s = merge_summaries(s, column_of_part(c.table, 0, c.cols, column));
  }
  s = merge_warp_lanes(s, 1);
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  if (a.group_threads > kWarpSize) {
    if (lane == 0) warp_results[threadIdx.x / kWarpSize] = s;
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int w = 1; w < kWarpsPerBlock; ++w) s = merge_summaries(s, warp_results[w]);
  } else if (lane != 0) {
    return;
  }
  const GroupMoments m{s.moments, s.min, s.max};
  if (a.p.moments != nullptr) {
    store_group_moments(a.p.moments, a.p.groups, g, m);
  } else {
    finish_group(a.p, a.coef, g, m);
  }
}

// One run: the table's columns merged by the block of merge_table_by_block, the group finished
// (or its moments stored, advantage_moments), as normalize_runs_kernel<.., true> finishes it.
__global__ void __launch_bounds__(kThreads) merge_one_run_kernel(const MergeArgs a) {
  const ColumnSummary s = merge_table_by_block(a.columns.table, a.columns.cols);
  if (threadIdx.x != 0) return;
  const GroupMoments m{s.moments, s.min, s.max};
  if (a.p.moments != nullptr) {
    store_group_moments(a.p.moments, 1, 0, m);
  } else {
    finish_group(a.p, a.coef, 0, m);
  }
}

// normalize_advantages_from: group g of the parts merged in part order, a thread per group.
__global__ void __launch_bounds__(kThreads) merge_group_parts_kernel(const AdvantageProblem p, double* coef) {
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (g < p.groups) finish_group(p, coef, g, merge_group_parts(p.parts, p.num_parts, p.groups, g));
}

// ---------------------------------------------------------------------------------------------
// Both layouts: y.

template <typename acc_t>
struct GroupCoef {
  SplitMean<acc_t> mean;
  acc_t scale;
  bool live;
};

template <typename acc_t>
__device__ __forceinline__ GroupCoef<acc_t> coef_of(const double* coef, int64_t groups, int64_t g) {
  return {split_mean<acc_t>(coef[kCoefMean * groups + g]), static_cast<acc_t>(coef[kCoefScale * groups + g]),
          coef[kCoefLive * groups + g] != 0.0};
}

// The same coefficients straight from the group's stats (as finish_group stores them).
template <typename acc_t>
__device__ __forceinline__ GroupCoef<acc_t> coef_of(const AdvantageGroup& r) {
  return {split_mean<acc_t>(r.mean), static_cast<acc_t>(r.scale), r.live};
}

// y = (x - mean) * scale, with the split mean (elements.cuh); 0 in a group without entries.
template <typename acc_t>
__device__ __forceinline__ acc_t advantage(acc_t x, const GroupCoef<acc_t>& k) {
  return k.live ? ((x - k.mean.hi) - k.mean.lo) * k.scale : acc_t(0);
}

template <typename scalar_t, int V>
__device__ __forceinline__ Vec<scalar_t, V> advantages_of(const Vec<scalar_t, V>& v,
                                                          const GroupCoef<typename Acc<scalar_t>::type> (&k)[V]) {
  Vec<scalar_t, V> y;
#pragma unroll
  for (int j = 0; j < V; ++j) from_acc(advantage(to_acc(v.v[j]), k[j]), y.v[j]);
  return y;
}

// A lane's next kUnroll vectors of a piece ending at `end`, from entry i on.
template <typename scalar_t, int V>
__device__ __forceinline__ void load_vectors(const scalar_t* x, int64_t i, int64_t end,
                                             Vec<scalar_t, V> (&v)[kUnroll]) {
  constexpr int64_t stride = kWarpSize * V;
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    if (i + u * stride < end) v[u] = load<scalar_t, V>(x + i + u * stride);
  }
}

// Runs layout: each warp its piece, the pieces in the reverse order of the reduce. kMergeTable
// (one run): each block merges the reduce's table itself (merge_table_by_block, the same bits in
// every block) instead of a merge kernel, while its first loads of x are in flight; block 0
// writes the stats.
template <typename scalar_t, int V, bool kMergeTable>
__global__ void __launch_bounds__(kThreads) normalize_runs_kernel(const RunArgs a, int64_t table_cols) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t pieces = a.runs * a.pieces_per_run;
  const int64_t warp = pieces - 1 - (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize);
  const Piece piece = warp >= 0 ? piece_of(a, warp) : Piece{0, 0, 0};
  const scalar_t* x = static_cast<const scalar_t*>(a.p.x);
  scalar_t* y = static_cast<scalar_t*>(a.p.out);
  const int64_t stride = kWarpSize * V, first = piece.first + (threadIdx.x % kWarpSize) * V;
  Vec<scalar_t, V> v[kUnroll];
  load_vectors<scalar_t, V>(x, first, piece.end, v);
  GroupCoef<acc_t> group;
  if constexpr (kMergeTable) {
    const ColumnSummary s = merge_table_by_block(a.partials, table_cols);
    const AdvantageGroup r = advantage_group(s.moments, s.min, s.max, a.p.min_std, a.p.unbiased);
    if (blockIdx.x == 0 && threadIdx.x == 0) store_stats(a.p, 0, r);
    group = coef_of<acc_t>(r);
  }
  if (warp < 0) return;
  GroupCoef<acc_t> k[V];
  if constexpr (!kMergeTable) group = coef_of<acc_t>(a.coef, a.p.groups, piece.run % a.p.groups);
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = group;
  for (int64_t i = first; i < piece.end; i += kUnroll * stride) {
    if (i != first) load_vectors<scalar_t, V>(x, i, piece.end, v);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * stride < piece.end) store<scalar_t, V>(y + i + u * stride, advantages_of<scalar_t, V>(v[u], k));
    }
  }
}

// Columns layout: x as (outer, groups * inner) rows in column tiles (tile_grid.cuh); column c is
// in group c / inner. The blocks in the reverse order of the reduce's. kFromTable (inner == 1: a
// group per column): the coefficients straight from the reduce's table of columns, no merge kernel
// (a column merged with nothing keeps its bits), and the first row split writes the stats.
struct ColumnArgs {
  AdvantageProblem p;
  TileGrid grid;
  const double* coef;
  const double* table;
};

template <typename scalar_t, int V, bool kFromTable>
__global__ void __launch_bounds__(kThreads) normalize_columns_kernel(const ColumnArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  const Layout l = layout_of<V>(a.grid, block % a.grid.column_tiles);
  const ThreadRows rows = thread_rows(a.grid, l, block / a.grid.column_tiles);
  if (rows.n == 0) return;
  GroupCoef<acc_t> k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if constexpr (kFromTable) {
      const ColumnSummary s = column_of_part(a.table, 0, a.grid.cols, l.col + j);
      const AdvantageGroup r = advantage_group(s.moments, s.min, s.max, a.p.min_std, a.p.unbiased);
      if (block < a.grid.column_tiles && l.row_lane == 0) store_stats(a.p, l.col + j, r);
      k[j] = coef_of<acc_t>(r);
    } else {
      k[j] = coef_of<acc_t>(a.coef, a.p.groups, (l.col + j) / a.p.inner);
    }
  }
  const int64_t width = a.grid.cols;
  const scalar_t* x = static_cast<const scalar_t*>(a.p.x) + l.col;
  scalar_t* y = static_cast<scalar_t*>(a.p.out) + l.col;
  for (int64_t i = 0; i < rows.n; i += kUnroll) {
    Vec<scalar_t, V> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u < rows.n) v[u] = load<scalar_t, V>(x + rows.row(i + u) * width);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u < rows.n) store<scalar_t, V>(y + rows.row(i + u) * width, advantages_of<scalar_t, V>(v[u], k));
    }
  }
}

// The columns layout's mask where x's does not fit batch_moments' (rows, mask_cols) form:
// out[i] = mask[i * unit / mask_group] for i < n, unit the row width (one entry per row) or 1.
__global__ void __launch_bounds__(kThreads) expand_mask_kernel(const bool* mask, int64_t mask_group, int64_t unit,
                                                               int64_t n, bool* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    out[i] = mask[i * unit / mask_group];
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plans and launches.

size_t aligned(size_t bytes) { return (bytes + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign; }

int64_t row_width(const AdvantageProblem& p) { return p.groups * p.inner; }

bool reduces(const AdvantagePlan& plan) { return plan.passes != AdvantagePasses::kNormalize; }
bool normalizes(const AdvantagePlan& plan) { return plan.passes != AdvantagePasses::kReduce; }

// The runs layout with a single run (groups == 1): a partial per reduce block, no merge kernel.
bool one_run(const AdvantagePlan& plan) { return !plan.columns && plan.runs == 1; }

// Whether normalize_advantages' normalize kernel takes the reduce's table itself, without a merge
// kernel: one run (each block merges the blocks' partials) or columns of a group each (inner == 1).
bool normalize_merges(const AdvantageProblem& p, const AdvantagePlan& plan) {
  return reduces(plan) && normalizes(plan) && (one_run(plan) || (plan.columns && p.inner == 1));
}

// Blocks of the runs kernels (reduce and normalize): a warp per piece.
int64_t run_blocks(const AdvantagePlan& plan) { return ceil_div(plan.runs * plan.pieces_per_run, kWarpsPerBlock); }

// Columns of the reduce's table: x's columns, a piece per column, or (one run) a block per column.
int64_t table_columns(const AdvantageProblem& p, const AdvantagePlan& plan) {
  if (plan.columns) return row_width(p);
  return one_run(plan) ? run_blocks(plan) : plan.runs * plan.pieces_per_run;
}

// The workspace's parts, as byte offsets: the reduce's (batch_moments' scratch, the table of
// partial moments, an expanded mask), the normalize's (the per-group coefficients).
struct WorkspaceLayout {
  size_t reduce, table, coef, mask, total;
};

WorkspaceLayout workspace_layout(const AdvantageProblem& p, const AdvantagePlan& plan) {
  const int64_t table_cols = table_columns(p, plan);
  size_t mask_bytes = 0;
  if (plan.column_mask == ColumnMask::kExpandedRows) mask_bytes = p.outer;
  if (plan.column_mask == ColumnMask::kExpandedEntries) mask_bytes = p.outer * row_width(p);
  const bool reduce = reduces(plan);
  WorkspaceLayout w{};
  w.table = aligned(reduce && plan.columns ? plan.reduce.workspace_bytes : 0);
  w.coef = w.table + (reduce ? aligned(sizeof(double) * kNumMomentRows * table_cols) : 0);
  w.mask = w.coef + (normalizes(plan) ? aligned(sizeof(double) * kNumCoefRows * p.groups) : 0);
  w.total = w.mask + (reduce ? mask_bytes : 0);
  return w;
}

// The workspace's parts as pointers (null for a pass the plan does not run).
struct Scratch {
  void* reduce;
  double* table;
  double* coef;
  bool* mask;
};

Scratch scratch_of(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace) {
  const WorkspaceLayout w = workspace_layout(p, plan);
  char* base = static_cast<char*>(workspace);
  if (!reduces(plan)) return {nullptr, nullptr, reinterpret_cast<double*>(base + w.coef), nullptr};
  double* coef = normalizes(plan) ? reinterpret_cast<double*>(base + w.coef) : nullptr;
  return {base + w.reduce, reinterpret_cast<double*>(base + w.table), coef, reinterpret_cast<bool*>(base + w.mask)};
}

// The columns layout's view of x for batch_moments and normalize (the mask given separately: its
// address is only known at launch when it is expanded).
Problem columns_problem(const AdvantageProblem& p, const bool* mask, int64_t mask_cols) {
  Problem r{};
  r.dtype = p.dtype;
  r.rows = p.outer;
  r.cols = row_width(p);
  r.x = p.x;
  r.x_row_stride = r.cols;
  r.out = p.out;
  r.out_row_stride = r.cols;
  r.mask = mask;
  r.mask_cols = mask_cols;
  return r;
}

void plan_columns(const AdvantageProblem& p, AdvantagePlan& plan) {
  const int64_t width = row_width(p);
  plan.column_mask = ColumnMask::kNone;
  plan.mask_cols = 1;
  if (p.mask != nullptr && width % p.mask_group == 0) {
    plan.column_mask = ColumnMask::kDirect;
    plan.mask_cols = width / p.mask_group;
  } else if (p.mask != nullptr && p.mask_group % width == 0) {
    plan.column_mask = ColumnMask::kExpandedRows;
  } else if (p.mask != nullptr) {
    plan.column_mask = ColumnMask::kExpandedEntries;
    plan.mask_cols = width;
  }
  Problem view = columns_problem(p, p.mask, plan.mask_cols);
  // Any mask is planned as an element mask: the row splits (the entries' partition) then depend on
  // whether there is a mask, never on its layout (the kernel instances' occupancies differ).
  Problem planned = view;
  if (p.mask != nullptr) planned.mask_cols = width;
  plan.reduce = plan_running_norm(planned);
  view.with_output = true;
  plan.normalize = plan_normalize(view);
}

// The runs' vector width: 16 bytes where every run and the pointers allow it (x in the reduce, x
// and out in the normalize), whatever the mask.
template <typename scalar_t>
int run_vector_width(const AdvantageProblem& p, int64_t run_length, bool for_reduce) {
  constexpr int kVector = kVectorWidth<scalar_t>;
  const bool fit = run_length % kVector == 0 && is_vector_aligned(p.x) && (for_reduce || is_vector_aligned(p.out));
  return fit ? kVector : 1;
}

RunMask run_mask(const AdvantageProblem& p, int vector_width) {
  return p.mask != nullptr && p.mask_group % vector_width != 0 ? RunMask::kPerEntry : RunMask::kPerVector;
}

// Blocks of the runs kernels the device holds at once: the reduce's, and for one run the fewer of
// the reduce's and the merging normalize's (more registers), so that one wave of the reduce is one
// of the normalize. From x's vector width alone, so that advantage_moments gets the same pieces.
template <typename scalar_t, int V>
int64_t resident_run_blocks(bool single_run) {
  if (!single_run) return resident_blocks<reduce_runs_kernel<scalar_t, V, RunMask::kPerVector>>();
  return std::min(resident_blocks<reduce_one_run_kernel<scalar_t, V, RunMask::kPerVector>>(),
                  resident_blocks<normalize_runs_kernel<scalar_t, V, true>>());
}

// Pieces of kWarpSize * V * vectors-per-lane entries, V the reduce's vector width, the vectors per
// lane chosen to fill about one wave of warps, within [kMinVectorsPerLane, kMaxVectorsPerLane]. A
// piece is a multiple of kWarpSize entries, so the normalize may take its own vector width.
void plan_runs(const AdvantageProblem& p, AdvantagePlan& plan) {
  plan.runs = p.groups == 1 ? 1 : p.outer * p.groups;
  plan.run_length = p.groups == 1 ? p.outer * p.inner : p.inner;
  with_scalar_type(p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    plan.vector_width = run_vector_width<scalar_t>(p, plan.run_length, true);
    plan.normalize_vector_width = run_vector_width<scalar_t>(p, plan.run_length, false);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const int64_t lanes = resident_run_blocks<scalar_t, V>(plan.runs == 1) * kThreads;
      const int64_t vectors = plan.runs * ceil_div(plan.run_length, V);
      const int64_t per_lane = std::clamp(ceil_div(vectors, lanes), kMinVectorsPerLane, kMaxVectorsPerLane);
      plan.piece_length = kWarpSize * V * per_lane;
    });
  });
  plan.pieces_per_run = ceil_div(plan.run_length, plan.piece_length);
}

RunArgs run_args(const AdvantageProblem& p, const AdvantagePlan& plan, double* partials, const double* coef) {
  const int64_t stride = kWarpSize * plan.vector_width;
  const Quotient mask_step =
      p.mask != nullptr ? Quotient{stride / p.mask_group, stride % p.mask_group} : Quotient{0, 0};
  return {p, plan.runs, plan.run_length, plan.pieces_per_run, plan.piece_length, mask_step, partials, coef};
}

template <typename scalar_t, int V, RunMask kMask>
void launch_reduce_runs_as(const RunArgs& a, const AdvantagePlan& plan, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(run_blocks(plan));
  if (one_run(plan)) {
    reduce_one_run_kernel<scalar_t, V, kMask><<<grid, kThreads, 0, stream>>>(a);
  } else {
    reduce_runs_kernel<scalar_t, V, kMask><<<grid, kThreads, 0, stream>>>(a);
  }
}

void launch_reduce_runs(const RunArgs& a, const AdvantagePlan& plan, cudaStream_t stream) {
  with_scalar_type(a.p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      if constexpr (V > 1) {
        if (run_mask(a.p, V) == RunMask::kPerEntry) {
          launch_reduce_runs_as<scalar_t, V, RunMask::kPerEntry>(a, plan, stream);
          return;
        }
      }
      launch_reduce_runs_as<scalar_t, V, RunMask::kPerVector>(a, plan, stream);
    });
  });
}

// merge_table: the one-run normalize that merges the reduce's table (a.partials) itself.
void launch_normalize_runs(const RunArgs& a, const AdvantagePlan& plan, bool merge_table, int64_t table_cols,
                           cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(run_blocks(plan));
  with_scalar_type(a.p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.normalize_vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      if (merge_table) {
        normalize_runs_kernel<scalar_t, V, true><<<grid, kThreads, 0, stream>>>(a, table_cols);
      } else {
        normalize_runs_kernel<scalar_t, V, false><<<grid, kThreads, 0, stream>>>(a, table_cols);
      }
    });
  });
}

// The columns layout's mask: x's own, or expanded into `expanded`.
const bool* columns_mask(const AdvantageProblem& p, const AdvantagePlan& plan, bool* expanded, cudaStream_t stream) {
  if (plan.column_mask == ColumnMask::kNone || plan.column_mask == ColumnMask::kDirect) return p.mask;
  const bool rows = plan.column_mask == ColumnMask::kExpandedRows;
  const int64_t n = rows ? p.outer : p.outer * row_width(p);
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(ceil_div(n, kThreads), 4096));
  expand_mask_kernel<<<grid, kThreads, 0, stream>>>(p.mask, p.mask_group, rows ? row_width(p) : 1, n, expanded);
  return expanded;
}

void launch_normalize_columns(const ColumnArgs& a, const AdvantagePlan& plan, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(a.grid.column_tiles * a.grid.row_splits);
  with_scalar_type(a.p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.normalize.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      if (a.table != nullptr) {
        normalize_columns_kernel<scalar_t, V, true><<<grid, kThreads, 0, stream>>>(a);
      } else {
        normalize_columns_kernel<scalar_t, V, false><<<grid, kThreads, 0, stream>>>(a);
      }
    });
  });
}

// Pass 1: the reduce, then merge_groups_kernel, which finishes each group (stats and coefficients)
// or stores its moments (p.moments). One run: the reduce's blocks' table is merged by
// merge_one_run_kernel where the normalize does not merge it (advantage_moments, or no entries).
void reduce_pass(const AdvantageProblem& p, const AdvantagePlan& plan, const Scratch& s, cudaStream_t stream) {
  MergeArgs merge{p, {}, plan.group_threads, s.coef};
  if (one_run(plan)) {
    const int64_t blocks = run_blocks(plan);
    if (blocks > 0) launch_reduce_runs(run_args(p, plan, s.table, s.coef), plan, stream);
    if (normalize_merges(p, plan) && blocks > 0) return;
    merge.columns = {s.table, blocks, 1, blocks, 0, 1};
    merge_one_run_kernel<<<1, kThreads, 0, stream>>>(merge);
    return;
  }
  if (plan.columns) {
    const bool* mask = columns_mask(p, plan, s.mask, stream);
    Problem reduce = columns_problem(p, mask, plan.mask_cols);
    reduce.moments = s.table;
    launch_batch_moments(reduce, plan.reduce, s.reduce, stream);
    if (normalize_merges(p, plan)) return;
    merge.columns = {s.table, row_width(p), 1, p.inner, 0, p.inner};
  } else {
    const int64_t pieces = plan.runs * plan.pieces_per_run;
    if (pieces > 0) launch_reduce_runs(run_args(p, plan, s.table, s.coef), plan, stream);
    const int64_t outer_items = p.groups == 1 ? 1 : p.outer;
    merge.columns = {s.table, pieces, outer_items, plan.pieces_per_run, p.groups * plan.pieces_per_run,
                     plan.pieces_per_run};
  }
  const int64_t groups_per_block = kThreads / plan.group_threads;
  merge_groups_kernel<<<static_cast<unsigned>(ceil_div(p.groups, groups_per_block)), kThreads, 0, stream>>>(merge);
}

// Pass 2: y from the coefficients (or, one run after its reduce, from the reduce's table), where x
// has entries.
void normalize_pass(const AdvantageProblem& p, const AdvantagePlan& plan, const Scratch& s, cudaStream_t stream) {
  if (p.outer * row_width(p) == 0) return;
  if (plan.columns) {
    const LaunchPlan& n = plan.normalize;
    const TileGrid grid{p.outer, row_width(p), n.column_threads, n.column_tiles, n.row_splits, n.rows_per_split};
    launch_normalize_columns(ColumnArgs{p, grid, s.coef, normalize_merges(p, plan) ? s.table : nullptr}, plan, stream);
  } else {
    launch_normalize_runs(run_args(p, plan, s.table, s.coef), plan, normalize_merges(p, plan), table_columns(p, plan),
                          stream);
  }
}

}  // namespace

AdvantagePlan plan_advantages(const AdvantageProblem& p, AdvantagePasses passes) {
  AdvantagePlan plan{};
  plan.passes = passes;
  const int64_t numel = p.outer * row_width(p);
  plan.columns = p.groups > 1 && p.inner <= kMaxColumnsInner && numel > 0;
  plan.column_mask = ColumnMask::kNone;
  int64_t group_columns;
  if (plan.columns) {
    plan_columns(p, plan);
    group_columns = p.inner;
  } else {
    plan_runs(p, plan);
    group_columns = (p.groups == 1 ? 1 : p.outer) * plan.pieces_per_run;
  }
  plan.group_threads = group_columns >= kBlockMergeColumns || one_run(plan) ? kThreads : kWarpSize;
  plan.workspace_bytes = workspace_layout(p, plan).total;
  return plan;
}

void launch_normalize_advantages(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                 cudaStream_t stream) {
  if (p.groups == 0) return;
  const Scratch s = scratch_of(p, plan, workspace);
  reduce_pass(p, plan, s, stream);
  normalize_pass(p, plan, s, stream);
}

void launch_advantage_moments(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                              cudaStream_t stream) {
  if (p.groups == 0) return;
  reduce_pass(p, plan, scratch_of(p, plan, workspace), stream);
}

void launch_normalize_advantages_from(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                      cudaStream_t stream) {
  if (p.groups == 0) return;
  const Scratch s = scratch_of(p, plan, workspace);
  merge_group_parts_kernel<<<static_cast<unsigned>(ceil_div(p.groups, kThreads)), kThreads, 0, stream>>>(p, s.coef);
  normalize_pass(p, plan, s, stream);
}

}  // namespace cuda
}  // namespace fastnorm
