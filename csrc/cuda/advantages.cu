// CUDA kernels of fastnorm::normalize_advantages and its split pair ::advantage_moments and
// ::normalize_advantages_from (the layouts are described in advantages.h).
//
// Runs layout: warp w reduces piece w % pieces_per_run of run w / pieces_per_run, its lanes taking
// consecutive vectors (coalesced loads). A lane sums at most kMaxVectorsPerLane vectors in float
// (float64 for float64 x) about one shift, its first selected finite value, so that the sums of
// its V slots add up in float64 into the corrected two-pass formula (moments_from_shifted_sums).
// The lanes merge by a shuffle tree and lane 0 stores the piece's moments as one column of a
// batch-moments table. Columns layout: batch_moments' reduce (running_norm.cu) writes one column
// per (group, inner index) of x viewed as (outer, groups * inner) rows.
//
// Then merge_groups_kernel merges each group's columns of the table in a fixed order (Chan
// merge, merge_summaries) and advantage_group (advantages_math.h, as the CPU kernel) gives the
// stats and the coefficients of y, which a last kernel writes, visiting x in the reverse order of
// the reduce so that its last reads are still in L2.
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
// without a mask), or V entries per vector (mask_group == 1, V > 1).
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

__device__ __forceinline__ bool is_selected(const AdvantageProblem& p, int64_t k) {
  return p.mask == nullptr || p.mask[k / p.mask_group];
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
  Quotient at{0, 0};  // kPerVector: this vector's mask entry, first / mask_group
  if (kMask == RunMask::kPerVector && mask != nullptr) at = {first / a.p.mask_group, first % a.p.mask_group};
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
#pragma unroll
        for (int j = 0; j < V; ++j) selected[j] = mask[ku + j];
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
// overflowed (huge values).
template <typename scalar_t, int V>
__device__ __noinline__ ColumnSummary recompute_lane(const RunArgs& a, const Piece& piece, int lane) {
  const scalar_t* x = static_cast<const scalar_t*>(a.p.x);
  const int64_t stride = kWarpSize * V;
  ColumnSummary s = empty_column_summary();
  double sum = 0.0;
  for (int64_t k = piece.first + lane * V; k < piece.end; k += stride) {
    for (int j = 0; j < V; ++j) {
      const double v = to_acc(x[k + j]);
      if (!is_selected(a.p, k + j) || !is_finite(v)) continue;
      s.moments.count += 1.0;
      sum += v;
      s.min = fmin(s.min, v);
      s.max = fmax(s.max, v);
    }
  }
  const double mean = sum / fmax(s.moments.count, 1.0);
  double s1 = 0.0, s2 = 0.0;
  for (int64_t k = piece.first + lane * V; k < piece.end; k += stride) {
    for (int j = 0; j < V; ++j) {
      const double v = to_acc(x[k + j]);
      if (!is_selected(a.p, k + j) || !is_finite(v)) continue;
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  s.moments = moments_from_shifted_sums(s.moments.count, mean, s1, s2);
  return s;
}

template <typename scalar_t, int V, RunMask kMask>
__global__ void __launch_bounds__(kThreads) reduce_runs_kernel(const RunArgs a) {
  const int64_t pieces = a.runs * a.pieces_per_run;
  const int64_t warp = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize;
  if (warp >= pieces) return;  // the whole warp
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const Piece piece = piece_of(a, warp);
  LaneSums<typename Acc<scalar_t>::type, V> sums;
  sum_lane<scalar_t, V, kMask>(a, piece, lane, sums);
  ColumnSummary s = lane_summary(sums);
  if (!is_finite(s.moments.mean) || !is_finite(s.moments.m2)) s = recompute_lane<scalar_t, V>(a, piece, lane);
  s = merge_warp_lanes(s, 1);
  if (lane == 0) store_column_summary(a.partials, pieces, warp, s);
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

// Group g's stats and the coefficients of its y.
__device__ __forceinline__ void finish_group(const AdvantageProblem& p, double* coef, int64_t g,
                                             const GroupMoments& m) {
  const AdvantageGroup r = advantage_group(m.moments, m.min, m.max, p.min_std, p.unbiased);
  const int64_t G = p.groups;
  p.stats[kAdvCount * G + g] = r.count;
  p.stats[kAdvMean * G + g] = r.mean;
  p.stats[kAdvStdRaw * G + g] = r.std_raw;
  p.stats[kAdvNormMaxAbs * G + g] = r.norm_max_abs;
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

// Runs layout: each warp its piece, the pieces in the reverse order of the reduce.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) normalize_runs_kernel(const RunArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t pieces = a.runs * a.pieces_per_run;
  const int64_t warp = pieces - 1 - (static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / kWarpSize);
  if (warp < 0) return;
  const Piece piece = piece_of(a, warp);
  GroupCoef<acc_t> k[V];
  const GroupCoef<acc_t> group = coef_of<acc_t>(a.coef, a.p.groups, piece.run % a.p.groups);
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = group;
  const scalar_t* x = static_cast<const scalar_t*>(a.p.x);
  scalar_t* y = static_cast<scalar_t*>(a.p.out);
  const int64_t stride = kWarpSize * V;
  for (int64_t i = piece.first + (threadIdx.x % kWarpSize) * V; i < piece.end; i += kUnroll * stride) {
    Vec<scalar_t, V> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * stride < piece.end) v[u] = load<scalar_t, V>(x + i + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * stride < piece.end) store<scalar_t, V>(y + i + u * stride, advantages_of<scalar_t, V>(v[u], k));
    }
  }
}

// Columns layout: x as (outer, groups * inner) rows in column tiles (tile_grid.cuh); column c is
// in group c / inner. The blocks in the reverse order of the reduce's.
struct ColumnArgs {
  AdvantageProblem p;
  TileGrid grid;
  const double* coef;
};

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kThreads) normalize_columns_kernel(const ColumnArgs a) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t block = gridDim.x - 1 - blockIdx.x;
  const Layout l = layout_of<V>(a.grid, block % a.grid.column_tiles);
  const ThreadRows rows = thread_rows(a.grid, l, block / a.grid.column_tiles);
  if (rows.n == 0) return;
  GroupCoef<acc_t> k[V];
#pragma unroll
  for (int j = 0; j < V; ++j) k[j] = coef_of<acc_t>(a.coef, a.p.groups, (l.col + j) / a.p.inner);
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

// The workspace's parts, as byte offsets: the reduce's (batch_moments' scratch, the table of
// partial moments, an expanded mask), the normalize's (the per-group coefficients).
struct WorkspaceLayout {
  size_t reduce, table, coef, mask, total;
};

WorkspaceLayout workspace_layout(const AdvantageProblem& p, const AdvantagePlan& plan) {
  const int64_t table_cols = plan.columns ? row_width(p) : plan.runs * plan.pieces_per_run;
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
  plan.reduce = plan_running_norm(view);
  view.with_output = true;
  plan.normalize = plan_normalize(view);
}

// The runs' vector width: 16 bytes where every run and the pointers allow it, and the mask (in the
// reduce) reads one entry per vector or one per entry.
template <typename scalar_t>
int run_vector_width(const AdvantageProblem& p, int64_t run_length, bool for_reduce) {
  constexpr int kVector = kVectorWidth<scalar_t>;
  const bool mask_fits = p.mask == nullptr || p.mask_group == 1 || p.mask_group % kVector == 0;
  const bool fit = run_length % kVector == 0 && is_vector_aligned(p.x) &&
                   (for_reduce ? mask_fits : is_vector_aligned(p.out));
  return fit ? kVector : 1;
}

RunMask run_mask(const AdvantageProblem& p, int vector_width) {
  return vector_width > 1 && p.mask != nullptr && p.mask_group == 1 ? RunMask::kPerEntry : RunMask::kPerVector;
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
      const int64_t lanes = resident_blocks<reduce_runs_kernel<scalar_t, V, RunMask::kPerVector>>() * kThreads;
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

void launch_reduce_runs(const RunArgs& a, const AdvantagePlan& plan, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(plan.runs * plan.pieces_per_run, kWarpsPerBlock));
  with_scalar_type(a.p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      if constexpr (V > 1) {
        if (run_mask(a.p, V) == RunMask::kPerEntry) {
          reduce_runs_kernel<scalar_t, V, RunMask::kPerEntry><<<grid, kThreads, 0, stream>>>(a);
          return;
        }
      }
      reduce_runs_kernel<scalar_t, V, RunMask::kPerVector><<<grid, kThreads, 0, stream>>>(a);
    });
  });
}

void launch_normalize_runs(const RunArgs& a, const AdvantagePlan& plan, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>(ceil_div(plan.runs * plan.pieces_per_run, kWarpsPerBlock));
  with_scalar_type(a.p.dtype, [&](auto element) {
    using scalar_t = decltype(element);
    with_vector_width<scalar_t>(plan.normalize_vector_width, [&](auto width) {
      constexpr int V = decltype(width)::value;
      normalize_runs_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(a);
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
      normalize_columns_kernel<scalar_t, V><<<grid, kThreads, 0, stream>>>(a);
    });
  });
}

// Pass 1: the reduce, then merge_groups_kernel, which finishes each group (stats and coefficients)
// or stores its moments (p.moments).
void reduce_pass(const AdvantageProblem& p, const AdvantagePlan& plan, const Scratch& s, cudaStream_t stream) {
  MergeArgs merge{p, {}, plan.group_threads, s.coef};
  if (plan.columns) {
    const bool* mask = columns_mask(p, plan, s.mask, stream);
    Problem reduce = columns_problem(p, mask, plan.mask_cols);
    reduce.moments = s.table;
    launch_batch_moments(reduce, plan.reduce, s.reduce, stream);
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

// Pass 2: y from the coefficients, where x has entries.
void normalize_pass(const AdvantageProblem& p, const AdvantagePlan& plan, const double* coef, cudaStream_t stream) {
  if (p.outer * row_width(p) == 0) return;
  if (plan.columns) {
    const LaunchPlan& n = plan.normalize;
    const TileGrid grid{p.outer, row_width(p), n.column_threads, n.column_tiles, n.row_splits, n.rows_per_split};
    launch_normalize_columns(ColumnArgs{p, grid, coef}, plan, stream);
  } else {
    launch_normalize_runs(run_args(p, plan, nullptr, coef), plan, stream);
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
  plan.group_threads = group_columns >= kBlockMergeColumns ? kThreads : kWarpSize;
  plan.workspace_bytes = workspace_layout(p, plan).total;
  return plan;
}

void launch_normalize_advantages(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                 cudaStream_t stream) {
  if (p.groups == 0) return;
  const Scratch s = scratch_of(p, plan, workspace);
  reduce_pass(p, plan, s, stream);
  normalize_pass(p, plan, s.coef, stream);
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
  normalize_pass(p, plan, s.coef, stream);
}

}  // namespace cuda
}  // namespace fastnorm
