// CPU kernel of fastnorm::normalize_advantages. x (O, G, I) is reduced by the threads in one of
// two layouts (kernels in advantages_tiles_*.cpp):
//  - runs: when G == 1, when the groups repeat with a short period (G * I dividing 16, 8 for
//    float64: e.g. per agent), or when the runs x[o, g, :] are long, chunks are reduced with
//    accumulators in registers;
//  - columns: otherwise the rows x[o] (G * I entries; several rows folded into one when narrow,
//    cut into strips when wide) are reduced per column in tiles, and the columns merged into their
//    groups.
// Merges run in a fixed order, so the results do not depend on the thread count. A second pass
// over the same chunks or tiles writes y. The split ops that sync across ranks run the two halves
// apart: fastnorm::advantage_moments is pass 1 alone (reduce_groups), and
// fastnorm::normalize_advantages_from merges the parts and runs pass 2 (normalize_groups).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../advantages_args.h"
#include "../advantages_math.h"
#include "advantages_tiles.h"

namespace fastnorm {
namespace cpu {
namespace {

using adv::Reduction;
using adv::Tile;

constexpr int64_t kRunChunk = 1 << 16;   // entries of a run per task
constexpr int64_t kMinRunLength = 2048;  // runs this long are reduced as runs whatever O
constexpr int64_t kFoldWidth = 256;      // narrower rows are folded into units of this width
constexpr int64_t kStripCols = 2048;     // wider rows are cut into strips of this width
constexpr int64_t kTileElems = 1 << 17;  // entries per tile in the columns layout

const adv::Kernels& kernels() { return use_avx2_kernels() ? adv::kernels_avx2() : adv::kernels_base(); }

void merge_into(Reduction& into, const Moments& m, double min, double max) {
  into.moments = merge_moments(into.moments, m);
  into.min = std::min(into.min, min);
  into.max = std::max(into.max, max);
}

// The work of one call. Runs layout: chunks of at most kRunChunk entries of runs, chunk i being
// piece i % pieces of run i / pieces. Either one run of every entry, whose groups repeat with
// `pattern` (G == 1, or G * I dividing the kernels' period), or the runs x[o, g, :], each in one
// group. Columns layout: `tiles` over rows of `width` columns (fold rows of G * I entries each);
// tile i covers row chunk i / strips and the columns from (i % strips) * kStripCols; column c
// belongs to group (c % (G * I)) / I.
struct Plan {
  bool runs, one_run;
  adv::Pattern pattern{1, 1};
  int64_t run_length = 0, pieces = 0, chunk_count = 0, groups;
  std::vector<Tile> tiles;
  int64_t width = 0, strips = 1, row_chunks = 0;

  // Runs x[o, g, :] when they are long, or longer than the rows are many (each column's fixed
  // costs would then be shared by few entries).
  Plan(const AdvantageGeometry& g, adv::Dtype dtype) : groups(g.groups) {
    const int64_t L = g.groups * g.inner;
    one_run = g.groups == 1 || adv::max_period(dtype) % L == 0;
    runs = one_run || g.inner >= kMinRunLength || g.inner > g.outer;
    if (runs) {
      if (g.groups > 1 && one_run) pattern = {L, g.inner};
      run_length = one_run ? g.numel : g.inner;
      pieces = (run_length + kRunChunk - 1) / kRunChunk;
      chunk_count = (one_run ? 1 : g.outer * g.groups) * pieces;
      return;
    }
    const int64_t fold = 2 * L <= kFoldWidth ? kFoldWidth / L : 1;
    width = fold * L;
    const int64_t units = g.outer / fold, rest = g.outer % fold;  // rest > 0 only when strips == 1
    const int64_t strip_cols = std::min(width, kStripCols);
    strips = (width + strip_cols - 1) / strip_cols;
    const int64_t rows_per_tile = std::max<int64_t>(1, kTileElems / strip_cols);
    row_chunks = std::max<int64_t>(1, (units + rows_per_tile - 1) / rows_per_tile);
    for (int64_t chunk = 0; chunk < row_chunks; ++chunk) {
      const int64_t r0 = chunk * rows_per_tile, rows = std::min(rows_per_tile, units - r0);
      const int64_t tail = chunk + 1 == row_chunks ? rest * L : 0;
      for (int64_t s = 0; s < strips; ++s) {
        const int64_t c0 = s * strip_cols;
        tiles.push_back({r0 * width + c0, rows, std::min(strip_cols, width - c0), width, tail});
      }
    }
  }
  // Runs layout: chunk i's first entry, entries, and the group of its slot 0 (slot s is group s
  // in one run).
  int64_t chunk_first(int64_t i) const { return (i / pieces) * run_length + (i % pieces) * kRunChunk; }
  int64_t chunk_size(int64_t i) const { return std::min(kRunChunk, run_length - (i % pieces) * kRunChunk); }
  int64_t chunk_group(int64_t i) const { return one_run ? 0 : (i / pieces) % groups; }
  // Columns layout: tile i's first column and row chunk.
  int64_t column_of(int64_t i) const { return (i % strips) * kStripCols; }
  int64_t row_chunk_of(int64_t i) const { return i / strips; }
};

// Pass 1, runs layout: each chunk per slot, then each group over its chunks in order.
void reduce_runs(const Plan& plan, const adv::Data& data, adv::ReduceRunFn reduce, Reduction* groups) {
  const int64_t slots = plan.pattern.slots();
  Reduction* part = thread_scratch<Reduction, adv::kPartSlot>(plan.chunk_count * slots);
  at::parallel_for(0, plan.chunk_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      reduce(data, plan.chunk_first(i), plan.chunk_size(i), plan.pattern, part + i * slots);
    }
  });
  for (int64_t i = 0; i < plan.chunk_count; ++i) {
    for (int64_t s = 0; s < slots; ++s) {
      const Reduction& r = part[i * slots + s];
      merge_into(groups[plan.chunk_group(i) + s], r.moments, r.min, r.max);
    }
  }
}

// Pass 1, columns layout: each tile per column, each column over the row chunks in order, then each
// group over its columns in order.
void reduce_columns(const Plan& plan, const adv::Data& data, adv::ReduceTileFn reduce, const AdvantageGeometry& g,
                    Reduction* groups) {
  const int64_t parts = plan.row_chunks * plan.width;
  Moments* moments = thread_scratch<Moments, adv::kPartSlot>(parts);
  double* bounds = thread_scratch<double, adv::kPartSlot>(2 * parts);
  at::parallel_for(0, static_cast<int64_t>(plan.tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = plan.row_chunk_of(i) * plan.width + plan.column_of(i);
      reduce(data, plan.tiles[i], {moments + offset, bounds + offset, bounds + parts + offset});
    }
  });
  Reduction* column = thread_scratch<Reduction, adv::kPartSlot>(plan.width);
  at::parallel_for(0, plan.width, 256, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      Reduction r;
      for (int64_t k = 0; k < plan.row_chunks; ++k) {
        const int64_t i = k * plan.width + c;
        merge_into(r, moments[i], bounds[i], bounds[parts + i]);
      }
      column[c] = r;
    }
  });
  const int64_t L = g.groups * g.inner;
  for (int64_t c = 0; c < plan.width; ++c) {
    merge_into(groups[(c % L) / g.inner], column[c].moments, column[c].min, column[c].max);
  }
}

// Pass 2: y, each thread's chunks or tiles backwards (pass 1 left its last ones in cache).
// coef holds per group the mean, scale and live (1 or 0) rows of G entries each.
void normalize_runs(const Plan& plan, const adv::Data& data, adv::NormalizeRunFn normalize, const double* coef,
                    int64_t G, bool all_live) {
  at::parallel_for(0, plan.chunk_count, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = end - 1; i >= begin; --i) {
      const int64_t k = plan.chunk_group(i);
      normalize(data, plan.chunk_first(i), plan.chunk_size(i), plan.pattern,
                {coef + k, coef + G + k, all_live ? nullptr : coef + 2 * G + k});
    }
  });
}

void normalize_columns(const Plan& plan, const adv::Data& data, adv::NormalizeTileFn normalize, const double* coef,
                       int64_t G, int64_t inner, bool all_live) {
  const int64_t W = plan.width, L = G * inner;
  double* col = thread_scratch<double, adv::kColumnCoefSlot>(3 * W);
  for (int64_t c = 0; c < W; ++c) {
    for (int row = 0; row < 3; ++row) col[row * W + c] = coef[row * G + (c % L) / inner];
  }
  at::parallel_for(0, static_cast<int64_t>(plan.tiles.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = end - 1; i >= begin; --i) {
      const int64_t c0 = plan.column_of(i);
      normalize(data, plan.tiles[i], {col + c0, col + W + c0, all_live ? nullptr : col + 2 * W + c0, 1});
    }
  });
}

// The contiguous tensors the kernels read and write, and the plan of a call on an x with entries.
// out is the caller's when it is contiguous, else a scratch tensor that finish() copies back.
struct Pass {
  at::Tensor x, mask, out;
  adv::Data data;
  int dtype;
  Plan plan;

  Pass(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in, const at::Tensor* out_in,
       const AdvantageGeometry& g)
      : x(x_in.contiguous()),
        mask(mask_in ? mask_in->contiguous() : at::Tensor()),
        out(out_in == nullptr ? at::Tensor() : (out_in->is_contiguous() ? *out_in : at::empty_like(x))),
        data{x.data_ptr(), out.defined() ? out.data_ptr() : nullptr, mask.defined() ? mask.data_ptr<bool>() : nullptr,
             g.mask_group},
        dtype(static_cast<int>(scalar_kind(x.scalar_type()))),
        plan(g, scalar_kind(x.scalar_type())) {}

  void finish(at::Tensor& caller_out) const {
    if (!out.is_same(caller_out)) caller_out.copy_(out);
  }
};

// Pass 1: each group's moments, min and max into groups (G entries).
void reduce_groups(const Pass& pass, const AdvantageGeometry& g, Reduction* groups) {
  std::fill(groups, groups + g.groups, Reduction{});
  const adv::Kernels& table = kernels();
  if (pass.plan.runs) {
    reduce_runs(pass.plan, pass.data, table.reduce_run[pass.dtype], groups);
  } else {
    reduce_columns(pass.plan, pass.data, table.reduce[pass.dtype], g, groups);
  }
}

// The stats of each group from its reduction (rows AdvantageStatRow) and, unless pass is null (x
// has no entries), pass 2: y.
void normalize_groups(const Reduction* groups, const AdvantageGeometry& g, const Pass* pass, at::Tensor& stats,
                      double min_std, bool unbiased) {
  const int64_t G = g.groups;
  double* s = stats.data_ptr<double>();
  double* coef = thread_scratch<double, adv::kGroupSlot>(3 * G);  // per group: mean, scale, live
  bool all_live = true;
  for (int64_t k = 0; k < G; ++k) {
    const AdvantageGroup a = advantage_group(groups[k].moments, groups[k].min, groups[k].max, min_std, unbiased);
    s[kAdvCount * G + k] = a.count;
    s[kAdvMean * G + k] = a.mean;
    s[kAdvStdRaw * G + k] = a.std_raw;
    s[kAdvNormMaxAbs * G + k] = a.norm_max_abs;
    coef[k] = a.mean;
    coef[G + k] = a.scale;
    coef[2 * G + k] = a.live ? 1.0 : 0.0;
    all_live &= a.live;
  }
  if (pass == nullptr) return;
  const adv::Kernels& table = kernels();
  if (pass->plan.runs) {
    normalize_runs(pass->plan, pass->data, table.normalize_run[pass->dtype], coef, G, all_live);
  } else {
    normalize_columns(pass->plan, pass->data, table.normalize[pass->dtype], coef, G, g.inner, all_live);
  }
}

void normalize_advantages_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& out,
                              at::Tensor& stats, double min_std, bool unbiased) {
  const AdvantageGeometry g = check_normalize_advantages_args(x, mask, out, stats, min_std);
  if (g.numel == 0) {
    double* s = stats.data_ptr<double>();
    std::fill(s, s + kNumAdvantageStatRows * g.groups, 0.0);  // every group empty
    return;
  }
  const Pass pass(x, mask, &out, g);
  Reduction* groups = thread_scratch<Reduction, adv::kGroupSlot>(g.groups);
  reduce_groups(pass, g, groups);
  normalize_groups(groups, g, &pass, stats, min_std, unbiased);
  pass.finish(out);
}

void advantage_moments_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& moments) {
  const AdvantageGeometry g = check_advantage_moments_args(x, mask, moments);
  const int64_t G = g.groups;
  Reduction* groups = thread_scratch<Reduction, adv::kGroupSlot>(G);
  if (g.numel == 0) {
    std::fill(groups, groups + G, Reduction{});
  } else {
    reduce_groups(Pass(x, mask, nullptr, g), g, groups);
  }
  double* table = moments.data_ptr<double>();
  for (int64_t k = 0; k < G; ++k) store_group_moments(table, G, k, {groups[k].moments, groups[k].min, groups[k].max});
}

void normalize_advantages_from_cpu(const at::Tensor& x, const at::Tensor& parts, at::Tensor& out, at::Tensor& stats,
                                   double min_std, bool unbiased) {
  const AdvantageGeometry g = check_normalize_advantages_from_args(x, parts, out, stats, min_std);
  const int64_t G = g.groups;
  Reduction* groups = thread_scratch<Reduction, adv::kGroupSlot>(G);
  const double* p = parts.data_ptr<double>();
  for (int64_t k = 0; k < G; ++k) {
    const GroupMoments m = merge_group_parts(p, parts.size(0), G, k);
    groups[k].moments = m.moments;
    groups[k].min = m.min;
    groups[k].max = m.max;
  }
  if (g.numel == 0) {
    normalize_groups(groups, g, nullptr, stats, min_std, unbiased);
    return;
  }
  const Pass pass(x, std::nullopt, &out, g);
  normalize_groups(groups, g, &pass, stats, min_std, unbiased);
  pass.finish(out);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("normalize_advantages", &cpu::normalize_advantages_cpu);
  m.impl("advantage_moments", &cpu::advantage_moments_cpu);
  m.impl("normalize_advantages_from", &cpu::normalize_advantages_from_cpu);
}

}  // namespace fastnorm
