// CPU kernel of fastnorm::normalize_advantages. x (O, G, I) is cut into tiles that the threads
// reduce (advantages_tiles_*.cpp) in one of two layouts:
//  - runs: when G == 1 or the runs x[o, g, :] are long, each tile is a chunk of one run (one
//    group) seen as rows of kRunWidth columns, and its columns are merged into one partial;
//  - columns: otherwise the rows x[o] (G * I entries, folded by several rows when narrow, cut into
//    strips when wide) are reduced per column, and the columns merged into their groups.
// Merges run in a fixed order, so results do not depend on the thread count. A second pass over
// the same tiles writes y. Layouts with few rows of short runs are transposed first.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../advantages_args.h"
#include "../advantages_math.h"
#include "advantages_tiles.h"

namespace fastnorm {
namespace cpu {
namespace {

using adv::ColumnPartials;
using adv::Tile;

constexpr int64_t kRunWidth = 256;        // columns a run is seen in
constexpr int64_t kRunChunk = 1 << 16;    // elements of a run per tile
constexpr int64_t kMinRunLength = 2048;   // shorter runs (G > 1) take the columns layout
constexpr int64_t kFoldWidth = 256;       // narrower rows are folded into units of this width
constexpr int64_t kStripCols = 2048;      // wider rows are cut into strips of this width
constexpr int64_t kTileElems = 1 << 17;   // elements per tile in the columns layout
constexpr int64_t kMinColumnRows = 16;    // fewer rows of short runs (I > 1) are transposed
constexpr double kInf = std::numeric_limits<double>::infinity();

adv::Dtype dtype_of(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return adv::Dtype::kFloat16;
    case at::kBFloat16: return adv::Dtype::kBFloat16;
    case at::kFloat: return adv::Dtype::kFloat32;
    default: return adv::Dtype::kFloat64;
  }
}

// AVX2 + FMA kernels where the CPU has them; FASTNORM_CPU_ISA=base forces the baseline ones.
const adv::Kernels& kernels() {
  static const adv::Kernels& table = [] () -> const adv::Kernels& {
    const char* forced = std::getenv("FASTNORM_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "base") == 0) return adv::kernels_base();
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return adv::kernels_avx2();
#endif
    return adv::kernels_base();
  }();
  return table;
}

// The moments, min and max of a group's (or a column's) selected finite entries.
struct Reduction {
  Moments moments{0.0, 0.0, 0.0};
  double min = kInf;
  double max = -kInf;

  void merge(const Moments& m, double lo, double hi) {
    moments = merge_moments(moments, m);
    min = std::min(min, lo);
    max = std::max(max, hi);
  }
};

// The tiles of one call. Runs layout: tile i lies in group tile_group[i]. Columns layout: rows of
// `width` columns (`fold` rows of G * I entries each), tile i covers row chunk i / strips and
// columns [strip * kStripCols, ...) of strip i % strips; column c belongs to group (c % L) / I.
struct Plan {
  bool runs;
  std::vector<Tile> tiles;
  std::vector<int64_t> tile_group;
  int64_t width = 0, strips = 1, chunks = 0;

  explicit Plan(const AdvantageGeometry& g) {
    const int64_t L = g.groups * g.inner;
    runs = g.groups == 1 || g.inner >= kMinRunLength;
    if (runs) {
      const int64_t run_count = g.groups == 1 ? 1 : g.outer * g.groups;
      const int64_t run_length = g.groups == 1 ? g.numel : g.inner;
      for (int64_t run = 0; run < run_count; ++run) {
        for (int64_t begin = 0; begin < run_length; begin += kRunChunk) {
          const int64_t n = std::min(kRunChunk, run_length - begin);
          const int64_t cols = std::min(kRunWidth, n);
          tiles.push_back({run * run_length + begin, n / cols, cols, cols, n % cols});
          tile_group.push_back(run % g.groups);
        }
      }
      return;
    }
    const int64_t fold = 2 * L <= kFoldWidth ? kFoldWidth / L : 1;
    width = fold * L;
    const int64_t units = g.outer / fold, rest = g.outer % fold;
    const int64_t strip_cols = std::min(width, kStripCols);
    strips = (width + strip_cols - 1) / strip_cols;
    const int64_t rows_per_tile = std::max<int64_t>(1, kTileElems / strip_cols);
    chunks = std::max<int64_t>(1, (units + rows_per_tile - 1) / rows_per_tile);
    for (int64_t chunk = 0; chunk < chunks; ++chunk) {
      const int64_t r0 = chunk * rows_per_tile, rows = std::min(rows_per_tile, units - r0);
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t c0 = s * strip_cols;
        const int64_t tail = chunk + 1 == chunks ? rest * L : 0;  // rest > 0 only when strips == 1
        tiles.push_back({r0 * width + c0, rows, std::min(strip_cols, width - c0), width, tail});
      }
    }
  }
  int64_t column_of(int64_t i) const { return (i % strips) * kStripCols; }
  int64_t chunk_of(int64_t i) const { return i / strips; }
};

// Pass 1: the reduction of every group.
void reduce_groups(const Plan& plan, const adv::Data& data, adv::ReduceTileFn reduce, const AdvantageGeometry& g,
                   Reduction* groups) {
  const int64_t tiles = static_cast<int64_t>(plan.tiles.size());
  const int64_t parts = plan.runs ? tiles : plan.chunks * plan.width;
  Reduction* part = adv::thread_scratch<Reduction, adv::kPartSlot>(parts);
  Moments* moments = adv::thread_scratch<Moments, adv::kPartSlot>(plan.runs ? 0 : parts);
  double* bounds = adv::thread_scratch<double, adv::kPartSlot>(plan.runs ? 0 : 2 * parts);
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile& t = plan.tiles[i];
      if (!plan.runs) {
        const int64_t offset = plan.chunk_of(i) * plan.width + plan.column_of(i);
        reduce(data, t, {moments + offset, bounds + offset, bounds + parts + offset});
        continue;
      }
      // One group: merge the tile's columns in order.
      Moments* m = adv::thread_scratch<Moments, adv::kTileColumnsSlot>(t.cols);
      double* lo_hi = adv::thread_scratch<double, adv::kTileColumnsSlot>(2 * t.cols);
      reduce(data, t, {m, lo_hi, lo_hi + t.cols});
      Reduction r;
      for (int64_t j = 0; j < t.cols; ++j) r.merge(m[j], lo_hi[j], lo_hi[t.cols + j]);
      part[i] = r;
    }
  });
  if (plan.runs) {
    for (int64_t i = 0; i < tiles; ++i) {
      groups[plan.tile_group[i]].merge(part[i].moments, part[i].min, part[i].max);
    }
    return;
  }
  // Each column over the row chunks in order, then each group over its columns in order.
  at::parallel_for(0, plan.width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Reduction r;
      for (int64_t k = 0; k < plan.chunks; ++k) {
        const int64_t i = k * plan.width + c;
        r.merge(moments[i], bounds[i], bounds[parts + i]);
      }
      part[c] = r;
    }
  });
  const int64_t L = g.groups * g.inner;
  for (int64_t c = 0; c < plan.width; ++c) groups[(c % L) / g.inner].merge(part[c].moments, part[c].min, part[c].max);
}

// Pass 2: y for every tile, backwards (pass 1 left each thread's last tiles in cache).
void normalize_tiles(const Plan& plan, const adv::Data& data, adv::NormalizeTileFn normalize,
                     const adv::Coefficients& k) {
  at::parallel_for(0, static_cast<int64_t>(plan.tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = end - 1; i >= begin; --i) {
      adv::Coefficients tile_k = k;
      const int64_t offset = plan.runs ? plan.tile_group[i] : plan.column_of(i);
      tile_k.mean += offset;
      tile_k.scale += offset;
      if (tile_k.live) tile_k.live += offset;
      normalize(data, plan.tiles[i], tile_k);
    }
  });
}

void normalize_advantages_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& out,
                              at::Tensor& stats, double min_std, bool unbiased);

// Few rows of short runs: reduce x transposed to (O * I, G, 1) instead, a columns layout with
// many rows per column.
void normalize_transposed(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& out,
                          at::Tensor& stats, double min_std, bool unbiased, const AdvantageGeometry& g) {
  const at::Tensor xt = x.permute({0, 2, 1}).reshape({g.outer * g.inner, g.groups, 1});
  std::optional<at::Tensor> mask_t;
  if (mask) {
    const int64_t m = mask->numel();
    const at::Tensor full = mask->reshape({m, 1}).expand({m, g.mask_group}).reshape({g.outer, g.groups, g.inner});
    mask_t = full.permute({0, 2, 1}).reshape({-1});
  }
  at::Tensor yt = at::empty({g.outer * g.inner, g.groups, 1}, x.options());
  normalize_advantages_cpu(xt, mask_t, yt, stats, min_std, unbiased);
  out.copy_(yt.view({g.outer, g.inner, g.groups}).permute({0, 2, 1}));
}

void normalize_advantages_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& out,
                              at::Tensor& stats, double min_std, bool unbiased) {
  const AdvantageGeometry g = check_normalize_advantages_args(x, mask, out, stats, min_std);
  const int64_t G = g.groups;
  double* s = stats.data_ptr<double>();
  std::fill(s, s + kNumAdvantageStatRows * G, 0.0);
  if (g.numel == 0) return;
  if (G > 1 && g.inner > 1 && g.inner < kMinRunLength && g.outer < kMinColumnRows) {
    normalize_transposed(x, mask, out, stats, min_std, unbiased, g);
    return;
  }
  const at::Tensor x_c = x.contiguous();
  const at::Tensor mask_c = mask ? mask->contiguous() : at::Tensor();
  at::Tensor out_c = out.is_contiguous() ? out : at::empty_like(x_c);
  const adv::Data data{x_c.data_ptr(), out_c.data_ptr(), mask ? mask_c.data_ptr<bool>() : nullptr, g.mask_group};
  const adv::Kernels& table = kernels();
  const int dtype = static_cast<int>(dtype_of(x.scalar_type()));
  const Plan plan(g);

  Reduction* groups = adv::thread_scratch<Reduction, adv::kGroupSlot>(G);
  std::fill(groups, groups + G, Reduction{});
  reduce_groups(plan, data, table.reduce[dtype], g, groups);

  // The stats, and per group the coefficients of y: mean, scale, live.
  double* coef = adv::thread_scratch<double, adv::kGroupSlot>(3 * G);
  bool all_live = true;
  for (int64_t k = 0; k < G; ++k) {
    const Reduction& r = groups[k];
    const AdvantageGroup a = advantage_group(r.moments, r.min, r.max, min_std, unbiased);
    s[kAdvCount * G + k] = a.count;
    s[kAdvMean * G + k] = a.mean;
    s[kAdvStdRaw * G + k] = a.std_raw;
    s[kAdvNormMaxAbs * G + k] = a.norm_max_abs;
    coef[k] = a.mean;
    coef[G + k] = a.scale;
    coef[2 * G + k] = a.live ? 1.0 : 0.0;
    all_live &= a.live;
  }
  adv::Coefficients k{coef, coef + G, all_live ? nullptr : coef + 2 * G, 0};
  if (!plan.runs) {  // the columns layout reads them per column
    const int64_t W = plan.width, L = G * g.inner;
    double* col = adv::thread_scratch<double, adv::kColumnCoefSlot>(3 * W);
    for (int64_t c = 0; c < W; ++c) {
      const int64_t group = (c % L) / g.inner;
      for (int row = 0; row < 3; ++row) col[row * W + c] = coef[row * G + group];
    }
    k = {col, col + W, all_live ? nullptr : col + 2 * W, 1};
  }
  normalize_tiles(plan, data, table.normalize[dtype], k);
  if (!out_c.is_same(out)) out.copy_(out_c);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) { m.impl("normalize_advantages", &cpu::normalize_advantages_cpu); }

}  // namespace fastnorm
