// CPU kernels of fastnorm::running_norm and fastnorm::normalize: x is cut into tiles of rows x
// columns that the threads reduce (tile_kernels_*.cpp); the tile moments are merged per column in
// a fixed order (results do not depend on the thread count), the running statistics updated with
// the shared math, and a second pass over the same tiles writes y. The split ops that sync across
// ranks run the same two halves apart: fastnorm::batch_moments is pass 1 alone (reduce_batch),
// fastnorm::merge_normalize the update and pass 2 (update_and_normalize) over merged parts.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "../running_norm_args.h"
#include "../running_norm_math.h"
#include "tile_kernels.h"

namespace fastnorm {
namespace cpu {
namespace {

// About 64K elements a tile, and at least 256 rows: enough work per task, few enough per-column
// partial results (under ~5% of x) that merging them stays cheap.
constexpr int64_t kTargetTileElems = 1 << 16;
constexpr int64_t kMinChunkRows = 256;
constexpr double kInf = std::numeric_limits<double>::infinity();

const TileKernels& tile_kernels() { return use_avx2_kernels() ? tile_kernels_avx2() : tile_kernels_base(); }

// Tiles in row-major order: tile i covers row chunk i / col_tiles and column tile i % col_tiles.
struct TileGrid {
  int64_t rows, cols, rows_per_chunk, row_chunks, col_tiles;

  TileGrid(int64_t rows, int64_t cols) : rows(rows), cols(cols) {
    const int64_t width = std::min(cols, kTileCols);
    rows_per_chunk = std::max(kMinChunkRows, kTargetTileElems / std::max<int64_t>(width, 1));
    row_chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    col_tiles = (cols + kTileCols - 1) / kTileCols;
  }
  int64_t size() const { return row_chunks * col_tiles; }
  int64_t chunk_of(int64_t i) const { return i / col_tiles; }

  Tile tile(int64_t i, const at::Tensor& x, const at::Tensor* out, const at::Tensor* mask,
            const double* shift = nullptr) const {
    const int64_t chunk = i / col_tiles, col_tile = i % col_tiles;
    Tile t{};
    t.x = x.data_ptr();
    t.x_row_stride = x.stride(0);
    t.out = out ? out->data_ptr() : nullptr;
    t.out_row_stride = out ? out->stride(0) : 0;
    t.mask = mask ? mask->data_ptr<bool>() : nullptr;
    t.mask_cols = mask ? mask->size(1) : 1;
    t.mask_group = mask ? cols / mask->size(1) : cols;
    t.row_begin = chunk * rows_per_chunk;
    t.row_end = std::min(rows, t.row_begin + rows_per_chunk);
    t.col_begin = col_tile * kTileCols;
    t.col_end = std::min(cols, t.col_begin + kTileCols);
    t.shift = shift;
    return t;
  }
};

// How a column's divisor is bounded: eps and its placement, min_std and max_std, and the relative
// floor min_std_rel * scale[c] where scale is not null.
struct StdBounds {
  double eps;
  bool eps_on_std;
  double min_std, max_std;
  const double* scale;
  double min_std_rel;
};

StdBounds std_bounds(double eps, bool eps_on_std, std::optional<double> min_std, std::optional<double> max_std,
                     const double* scale, std::optional<double> min_std_rel) {
  return {eps, eps_on_std, min_std.value_or(0.0), max_std.value_or(kInf), min_std_rel ? scale : nullptr,
          min_std_rel.value_or(0.0)};
}

// 1 / bounded std per column of var, with the relative floor's scale where b has one (then
// `scale`), in this thread's scratch (valid until its next call here).
const double* inverse_std(const double* var, const double* scale, int64_t C, const StdBounds& b) {
  double* inv = thread_scratch<double, kInverseStdSlot>(C);
  for (int64_t c = 0; c < C; ++c) {
    const double floor = b.scale ? std_floor(b.min_std, b.min_std_rel, scale[c]) : b.min_std;
    inv[c] = 1.0 / bounded_std(var[c], b.eps, b.eps_on_std, floor, b.max_std);
  }
  return inv;
}

// What y is normalized with: per column the mean and 1 / bounded std, and the clamp.
struct OutputStats {
  const double* mean;
  const double* inv_std;
  std::optional<double> clip;
};

// Pass 2: y for every tile and, when clipped is not null, the per-column clip counts.
void normalize_rows(const TileGrid& grid, const at::Tensor& x_rows, const at::Tensor& out_rows,
                    const at::Tensor* mask, const OutputStats& y, double* clipped) {
  const NormalizeTileFn normalize = tile_kernels().normalize[static_cast<int>(scalar_kind(x_rows.scalar_type()))];
  const int64_t C = grid.cols;
  double* part_clipped = clipped ? thread_scratch<double, kPartClippedSlot>(grid.row_chunks * C) : nullptr;
  if (clipped) std::fill(part_clipped, part_clipped + grid.row_chunks * C, 0.0);
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    // Backwards: the reduce pass left this thread's last tiles in cache.
    for (int64_t i = end - 1; i >= begin; --i) {
      const Tile t = grid.tile(i, x_rows, &out_rows, mask);
      double* part = clipped ? part_clipped + grid.chunk_of(i) * C + t.col_begin : nullptr;
      normalize(t, y.mean, y.inv_std, y.clip.value_or(kInf), part);
    }
  });
  if (clipped == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t k = 0; k < grid.row_chunks; ++k) clipped[c] += part_clipped[k * C + c];
  }
}

// x (and the mask) as rows of contiguous columns, cut into tiles.
struct BatchRows {
  at::Tensor x;
  at::Tensor mask;  // undefined without a mask
  TileGrid grid;

  BatchRows(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in, const RowsGeometry& g)
      : x(readable_rows(x_in, g)), mask(mask_in ? mask_rows(*mask_in, g) : at::Tensor()), grid(g.rows, g.cols) {}
  const at::Tensor* mask_or_null() const { return mask.defined() ? &mask : nullptr; }
};

// Zeroes the diagnostics; without an output the clip rows are NaN (not computed).
void reset_diag(at::Tensor& diag, int64_t C, bool with_output) {
  diag.zero_();
  double* d = diag.data_ptr<double>();
  if (!with_output) std::fill(d + kClipped * C, d + (kMaxAbsZ + 1) * C, std::numeric_limits<double>::quiet_NaN());
}

// y written in the reduce pass itself (normalize_with="previous"): each tile is reduced, then
// normalized while it is still in cache, so x is read from memory once. clipped: per-column counts
// (nullptr: not counted).
struct FusedOutput {
  const at::Tensor* out_rows;
  OutputStats y;
  double* clipped;
};

// Pass 1: per-tile reductions, merged per column in row-chunk order into the batch-moments table
// `moments` (kNumMomentRows x C, rows MomentRow); with fused, also y. No rows give the empty table.
// shift (per column, may be nullptr): the running mean, near which one pass per block suffices.
void reduce_batch(const BatchRows& batch, double* moments, const double* shift, const FusedOutput* fused = nullptr) {
  const TileGrid& grid = batch.grid;
  const int64_t C = grid.cols;
  const int kind = static_cast<int>(scalar_kind(batch.x.scalar_type()));
  const ReduceTileFn reduce = tile_kernels().reduce[kind];
  const NormalizeTileFn normalize = tile_kernels().normalize[kind];
  const int64_t parts = grid.row_chunks * C;
  Moments* part_moments = thread_scratch<Moments, kPartMomentsSlot>(parts);
  double* part_f64 = thread_scratch<double, kPartF64Slot>(3 * parts);  // nonfinite, min, max
  const bool count_clipped = fused && fused->clipped;
  double* part_clipped = count_clipped ? thread_scratch<double, kPartClippedSlot>(parts) : nullptr;
  if (count_clipped) std::fill(part_clipped, part_clipped + parts, 0.0);
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = grid.chunk_of(i) * C;
      const Tile t = grid.tile(i, batch.x, nullptr, batch.mask_or_null(), shift);
      const int64_t at = offset + t.col_begin;
      reduce(t, {part_moments + at, part_f64 + at, part_f64 + parts + at, part_f64 + 2 * parts + at});
      if (fused) {  // after the reduce: out may be x itself
        normalize(grid.tile(i, batch.x, fused->out_rows, batch.mask_or_null()), fused->y.mean, fused->y.inv_std,
                  fused->y.clip.value_or(kInf), count_clipped ? part_clipped + at : nullptr);
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments m{0.0, 0.0, 0.0};
    double nonfinite = 0.0, col_min = kInf, col_max = -kInf, clipped = 0.0;
    for (int64_t k = 0; k < grid.row_chunks; ++k) {
      const int64_t i = k * C + c;
      m = merge_moments(m, part_moments[i]);
      nonfinite += part_f64[i];
      col_min = std::min(col_min, part_f64[parts + i]);
      col_max = std::max(col_max, part_f64[2 * parts + i]);
      if (count_clipped) clipped += part_clipped[i];
    }
    store_column_summary(moments, C, c, {m, nonfinite, col_min, col_max});
    if (count_clipped) fused->clipped[c] = clipped;
  }
}

// The statistics y uses with normalize_with="previous": those from before the update, saved here,
// in every column with a history (count > 0); the others read the updated ones (previous_stats).
struct SavedStats {
  double *mean, *var, *scale;
  const uint8_t* had_history;
};

SavedStats save_stats(const double* mean, const double* var, const double* count, const double* scale, int64_t C) {
  double* saved = thread_scratch<double, kPreviousStatsSlot>(3 * C);
  uint8_t* had_history = thread_scratch<uint8_t, kHistorySlot>(C);
  for (int64_t c = 0; c < C; ++c) {
    saved[c] = mean[c];
    saved[C + c] = var[c];
    saved[2 * C + c] = scale ? scale[c] : 1.0;
    had_history[c] = count[c] > 0;
  }
  return {saved, saved + C, saved + 2 * C, had_history};
}

// Replaces the saved statistics of columns without a history by the updated ones.
void fill_columns_without_history(const SavedStats& s, const double* mean, const double* var, const double* scale,
                                  int64_t C) {
  for (int64_t c = 0; c < C; ++c) {
    if (s.had_history[c]) continue;
    s.mean[c] = mean[c];
    s.var[c] = var[c];
    s.scale[c] = scale ? scale[c] : 1.0;
  }
}

bool all_have_history(const at::Tensor& count) {
  const double* n = count.data_ptr<double>();
  return std::all_of(n, n + count.numel(), [](double v) { return v > 0; });
}

// The diagnostics rows of the merged batch `merged` (a batch-moments table) and the running update
// with it.
void update_statistics(const double* merged, int64_t C, at::Tensor& mean, at::Tensor& var, at::Tensor& count,
                       at::Tensor& diag, const UpdateParams& params, double* scale) {
  double* d = diag.data_ptr<double>();
  double* mean_ptr = mean.data_ptr<double>();
  double* var_ptr = var.data_ptr<double>();
  double* count_ptr = count.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    const ColumnSummary s = column_of_part(merged, 0, C, c);
    d[kBatchCount * C + c] = s.moments.count;
    d[kBatchMean * C + c] = s.moments.mean;
    d[kBatchVar * C + c] = s.moments.count > 0 ? s.moments.m2 / s.moments.count : 0.0;
    d[kNonFinite * C + c] = s.nonfinite;
    update_running_stats(mean_ptr[c], var_ptr[c], count_ptr[c], s.moments, params, scale ? scale + c : nullptr);
  }
}

// diag's max |z| row from the merged batch's min and max (z is monotonic in x); returns whether a
// column can have clipped entries.
bool max_abs_z_from_range(const double* merged, int64_t C, const OutputStats& y, at::Tensor& diag) {
  double* max_abs_z = diag.data_ptr<double>() + kMaxAbsZ * C;
  bool any_clipped = false;
  for (int64_t c = 0; c < C; ++c) {
    const ColumnSummary s = column_of_part(merged, 0, C, c);
    max_abs_z[c] = s.moments.count > 0 ? std::max(s.max - y.mean[c], y.mean[c] - s.min) * y.inv_std[c] : 0.0;
    any_clipped |= y.clip && max_abs_z[c] > *y.clip;
  }
  return any_clipped;
}

// The running update with num_parts batch-moments tables merged in part order, the diagnostics of
// the merged batch and, when out is given, pass 2 over this batch's rows (diag must be reset).
void update_and_normalize(const BatchRows& batch, const RowsGeometry& g, const double* parts, int64_t num_parts,
                          at::Tensor& mean, at::Tensor& var, at::Tensor& count, const std::optional<at::Tensor>& out,
                          at::Tensor& diag, const UpdateParams& params, const StdBounds& bounds,
                          std::optional<double> clip, bool previous, double* scale) {
  const int64_t C = g.cols;
  const double* merged = parts;
  if (num_parts > 1) {
    double* table = thread_scratch<double, kMergedTableSlot>(kNumMomentRows * C);
    for (int64_t c = 0; c < C; ++c) store_column_summary(table, C, c, merge_column_parts(parts, num_parts, C, c));
    merged = table;
  }
  const SavedStats saved = previous && out ? save_stats(mean.data_ptr<double>(), var.data_ptr<double>(),
                                                        count.data_ptr<double>(), scale, C)
                                           : SavedStats{};
  update_statistics(merged, C, mean, var, count, diag, params, scale);
  if (!out) return;

  // Pass 2: normalize with the updated statistics, or with previous those saved. Clipped
  // entries are counted only where the max |z| exceeds clip.
  const double* y_mean = mean.data_ptr<double>();
  const double* y_var = var.data_ptr<double>();
  const double* y_scale = scale;
  if (previous) {
    fill_columns_without_history(saved, y_mean, y_var, scale, C);
    y_mean = saved.mean;
    y_var = saved.var;
    y_scale = saved.scale;
  }
  const OutputStats y{y_mean, inverse_std(y_var, y_scale, C, bounds), clip};
  const bool any_clipped = max_abs_z_from_range(merged, C, y, diag);
  if (g.rows == 0) return;
  const at::Tensor out_rows = writable_rows(*out, g);
  normalize_rows(batch.grid, batch.x, out_rows, batch.mask_or_null(), y,
                 any_clipped ? diag.data_ptr<double>() + kClipped * C : nullptr);
  finish_writable_rows(*out, out_rows);
}

// normalize_with="previous" when every column has a history: y is written in the reduce pass with
// the statistics from before the batch (one read of x), then the statistics are updated.
void reduce_normalize_then_update(const BatchRows& batch, const RowsGeometry& g, at::Tensor& mean, at::Tensor& var,
                                  at::Tensor& count, const at::Tensor& out, at::Tensor& diag,
                                  const UpdateParams& params, const StdBounds& bounds, std::optional<double> clip,
                                  double* scale) {
  const int64_t C = g.cols;
  const OutputStats y{mean.data_ptr<double>(), inverse_std(var.data_ptr<double>(), scale, C, bounds), clip};
  double* moments = thread_scratch<double, kMomentTableSlot>(kNumMomentRows * C);
  const at::Tensor out_rows = writable_rows(out, g);
  const FusedOutput fused{&out_rows, y, clip ? diag.data_ptr<double>() + kClipped * C : nullptr};
  reduce_batch(batch, moments, mean.data_ptr<double>(), &fused);
  finish_writable_rows(out, out_rows);
  max_abs_z_from_range(moments, C, y, diag);
  update_statistics(moments, C, mean, var, count, diag, params, scale);
}

UpdateParams update_params(std::optional<double> momentum, std::optional<double> max_count, bool unbiased) {
  return {momentum ? 1.0 - *momentum : 0.0, max_count.value_or(kInf), unbiased};
}

void running_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& mean, at::Tensor& var,
                      at::Tensor& count, const std::optional<at::Tensor>& out, at::Tensor& diag,
                      std::optional<double> momentum, std::optional<double> max_count, double eps,
                      std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                      bool eps_on_std, bool unbiased, const std::optional<at::Tensor>& scale,
                      std::optional<double> min_std_rel, bool previous, const std::optional<at::Tensor>& steps) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  int64_t* steps_ptr = check_steps_arg(x, steps);
  reset_diag(diag, g.cols, out.has_value());
  if (g.cols == 0 || g.rows == 0) return;
  if (steps_ptr) ++*steps_ptr;
  const BatchRows batch(x, mask, g);
  const UpdateParams params = update_params(momentum, max_count, unbiased);
  const StdBounds bounds = std_bounds(eps, eps_on_std, min_std, max_std, scale_ptr, min_std_rel);
  if (previous && out && all_have_history(count)) {
    reduce_normalize_then_update(batch, g, mean, var, count, *out, diag, params, bounds, clip, scale_ptr);
    return;
  }
  double* moments = thread_scratch<double, kMomentTableSlot>(kNumMomentRows * g.cols);
  reduce_batch(batch, moments, mean.data_ptr<double>());
  update_and_normalize(batch, g, moments, 1, mean, var, count, out, diag, params, bounds, clip, previous, scale_ptr);
}

void batch_moments_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& moments,
                       const std::optional<at::Tensor>& shift) {
  const RowsGeometry g = check_batch_moments_args(x, mask, moments, shift);
  if (g.cols == 0) return;
  reduce_batch(BatchRows(x, mask, g), moments.data_ptr<double>(), shift ? shift->data_ptr<double>() : nullptr);
}

void merge_normalize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& parts,
                         at::Tensor& mean, at::Tensor& var, at::Tensor& count, const std::optional<at::Tensor>& out,
                         at::Tensor& diag, std::optional<double> momentum, std::optional<double> max_count, double eps,
                         std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                         bool eps_on_std, bool unbiased, const std::optional<at::Tensor>& scale,
                         std::optional<double> min_std_rel, bool previous, const std::optional<at::Tensor>& steps) {
  const RowsGeometry g = check_merge_normalize_args(x, mask, parts, mean, var, count, out, diag, momentum, max_count,
                                                    eps, min_std, max_std, clip);
  double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  int64_t* steps_ptr = check_steps_arg(x, steps);
  reset_diag(diag, g.cols, out.has_value());
  if (steps_ptr) ++*steps_ptr;
  if (g.cols == 0) return;
  update_and_normalize(BatchRows(x, mask, g), g, parts.data_ptr<double>(), parts.size(0), mean, var, count, out, diag,
                       update_params(momentum, max_count, unbiased),
                       std_bounds(eps, eps_on_std, min_std, max_std, scale_ptr, min_std_rel), clip, previous,
                       scale_ptr);
}

void normalize_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, at::Tensor& out, double eps,
                   std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                   bool eps_on_std, const std::optional<at::Tensor>& scale, std::optional<double> min_std_rel) {
  const RowsGeometry g = check_normalize_args(x, mean, var, out, eps, min_std, max_std, clip);
  const double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  if (g.rows == 0 || g.cols == 0) return;
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor out_rows = writable_rows(out, g);
  const StdBounds bounds = std_bounds(eps, eps_on_std, min_std, max_std, scale_ptr, min_std_rel);
  const OutputStats y{mean.data_ptr<double>(), inverse_std(var.data_ptr<double>(), scale_ptr, g.cols, bounds), clip};
  normalize_rows(TileGrid(g.rows, g.cols), x_rows, out_rows, nullptr, y, nullptr);
  finish_writable_rows(out, out_rows);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("running_norm", &cpu::running_norm_cpu);
  m.impl("normalize", &cpu::normalize_cpu);
  m.impl("batch_moments", &cpu::batch_moments_cpu);
  m.impl("merge_normalize", &cpu::merge_normalize_cpu);
}

}  // namespace fastnorm
