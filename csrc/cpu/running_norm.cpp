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

  Tile tile(int64_t i, const at::Tensor& x, const at::Tensor* out, const at::Tensor* mask) const {
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
    return t;
  }
};

// 1 / bounded std per column, in this thread's scratch (valid until its next call here).
const double* inverse_std(const at::Tensor& var, double eps, bool eps_on_std, std::optional<double> min_std,
                          std::optional<double> max_std) {
  const double* v = var.data_ptr<double>();
  double* inv = thread_scratch<double, kInverseStdSlot>(var.numel());
  for (int64_t c = 0; c < var.numel(); ++c) {
    inv[c] = 1.0 / bounded_std(v[c], eps, eps_on_std, min_std.value_or(0.0), max_std.value_or(kInf));
  }
  return inv;
}

// Second pass: y for every tile and, when clipped is not null, the per-column clip counts.
void normalize_rows(const TileGrid& grid, const at::Tensor& x_rows, const at::Tensor& out_rows,
                    const at::Tensor* mask, const at::Tensor& mean, const double* inv_std,
                    std::optional<double> clip, double* clipped) {
  const NormalizeTileFn normalize = tile_kernels().normalize[static_cast<int>(scalar_kind(x_rows.scalar_type()))];
  const int64_t C = grid.cols;
  double* part_clipped = clipped ? thread_scratch<double, kPartClippedSlot>(grid.row_chunks * C) : nullptr;
  if (clipped) std::fill(part_clipped, part_clipped + grid.row_chunks * C, 0.0);
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    // Backwards: the reduce pass left this thread's last tiles in cache.
    for (int64_t i = end - 1; i >= begin; --i) {
      const Tile t = grid.tile(i, x_rows, &out_rows, mask);
      double* part = clipped ? part_clipped + grid.chunk_of(i) * C + t.col_begin : nullptr;
      normalize(t, mean.data_ptr<double>(), inv_std, clip.value_or(kInf), part);
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

// Pass 1: per-tile reductions, merged per column in row-chunk order into the batch-moments table
// `moments` (kNumMomentRows x C, rows MomentRow). No rows give the empty table.
void reduce_batch(const BatchRows& batch, double* moments) {
  const TileGrid& grid = batch.grid;
  const int64_t C = grid.cols;
  const ReduceTileFn reduce = tile_kernels().reduce[static_cast<int>(scalar_kind(batch.x.scalar_type()))];
  const int64_t parts = grid.row_chunks * C;
  Moments* part_moments = thread_scratch<Moments, kPartMomentsSlot>(parts);
  double* part_f64 = thread_scratch<double, kPartF64Slot>(3 * parts);  // nonfinite, min, max
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile t = grid.tile(i, batch.x, nullptr, batch.mask_or_null());
      const int64_t offset = grid.chunk_of(i) * C + t.col_begin;
      reduce(t, {part_moments + offset, part_f64 + offset, part_f64 + parts + offset, part_f64 + 2 * parts + offset});
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    Moments m{0.0, 0.0, 0.0};
    double nonfinite = 0.0, col_min = kInf, col_max = -kInf;
    for (int64_t k = 0; k < grid.row_chunks; ++k) {
      const int64_t i = k * C + c;
      m = merge_moments(m, part_moments[i]);
      nonfinite += part_f64[i];
      col_min = std::min(col_min, part_f64[parts + i]);
      col_max = std::max(col_max, part_f64[2 * parts + i]);
    }
    moments[kMomentCount * C + c] = m.count;
    moments[kMomentMean * C + c] = m.mean;
    moments[kMomentM2 * C + c] = m.m2;
    moments[kMomentNonFinite * C + c] = nonfinite;
    moments[kMomentMin * C + c] = col_min;
    moments[kMomentMax * C + c] = col_max;
  }
}

// The running update with num_parts batch-moments tables merged in part order, the diagnostics of
// the merged batch and, when out is given, pass 2 over this batch's rows (diag must be reset).
void update_and_normalize(const BatchRows& batch, const RowsGeometry& g, const double* parts, int64_t num_parts,
                          at::Tensor& mean, at::Tensor& var, at::Tensor& count, const std::optional<at::Tensor>& out,
                          at::Tensor& diag, std::optional<double> momentum, std::optional<double> max_count,
                          double eps, std::optional<double> min_std, std::optional<double> max_std,
                          std::optional<double> clip, bool eps_on_std, bool unbiased) {
  const int64_t C = g.cols;
  double* d = diag.data_ptr<double>();
  double* batch_count = d + kBatchCount * C;
  double* clipped = d + kClipped * C;
  double* max_abs_z = d + kMaxAbsZ * C;
  const UpdateParams params{momentum ? 1.0 - *momentum : 0.0, max_count.value_or(kInf), unbiased};
  double* mean_ptr = mean.data_ptr<double>();
  double* var_ptr = var.data_ptr<double>();
  double* count_ptr = count.data_ptr<double>();
  double* col_min = thread_scratch<double, kColumnBoundsSlot>(2 * C);
  double* col_max = col_min + C;
  for (int64_t c = 0; c < C; ++c) {
    const ColumnSummary s = merge_column_parts(parts, num_parts, C, c);
    batch_count[c] = s.moments.count;
    d[kBatchMean * C + c] = s.moments.mean;
    d[kBatchVar * C + c] = s.moments.count > 0 ? s.moments.m2 / s.moments.count : 0.0;
    d[kNonFinite * C + c] = s.nonfinite;
    col_min[c] = s.min;
    col_max[c] = s.max;
    update_running_stats(mean_ptr[c], var_ptr[c], count_ptr[c], s.moments, params);
  }
  if (!out) return;

  // Pass 2: normalize with the updated statistics. z is monotonic in x, so the max |z| of a
  // column comes from its min and max; only when it exceeds clip are clipped entries counted.
  const double* inv_std = inverse_std(var, eps, eps_on_std, min_std, max_std);
  bool any_clipped = false;
  for (int64_t c = 0; c < C; ++c) {
    max_abs_z[c] = batch_count[c] > 0
                       ? std::max(col_max[c] - mean_ptr[c], mean_ptr[c] - col_min[c]) * inv_std[c]
                       : 0.0;
    any_clipped |= clip && max_abs_z[c] > *clip;
  }
  if (g.rows == 0) return;
  const at::Tensor out_rows = writable_rows(*out, g);
  normalize_rows(batch.grid, batch.x, out_rows, batch.mask_or_null(), mean, inv_std, clip,
                 any_clipped ? clipped : nullptr);
  finish_writable_rows(*out, out_rows);
}

void running_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& mean, at::Tensor& var,
                      at::Tensor& count, const std::optional<at::Tensor>& out, at::Tensor& diag,
                      std::optional<double> momentum, std::optional<double> max_count, double eps,
                      std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                      bool eps_on_std, bool unbiased) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  reset_diag(diag, g.cols, out.has_value());
  if (g.cols == 0 || g.rows == 0) return;
  const BatchRows batch(x, mask, g);
  double* moments = thread_scratch<double, kMomentTableSlot>(kNumMomentRows * g.cols);
  reduce_batch(batch, moments);
  update_and_normalize(batch, g, moments, 1, mean, var, count, out, diag, momentum, max_count, eps, min_std,
                       max_std, clip, eps_on_std, unbiased);
}

void batch_moments_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& moments) {
  const RowsGeometry g = check_batch_moments_args(x, mask, moments);
  if (g.cols == 0) return;
  reduce_batch(BatchRows(x, mask, g), moments.data_ptr<double>());
}

void merge_normalize_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& parts,
                         at::Tensor& mean, at::Tensor& var, at::Tensor& count, const std::optional<at::Tensor>& out,
                         at::Tensor& diag, std::optional<double> momentum, std::optional<double> max_count, double eps,
                         std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                         bool eps_on_std, bool unbiased) {
  const RowsGeometry g = check_merge_normalize_args(x, mask, parts, mean, var, count, out, diag, momentum, max_count,
                                                    eps, min_std, max_std, clip);
  reset_diag(diag, g.cols, out.has_value());
  if (g.cols == 0) return;
  update_and_normalize(BatchRows(x, mask, g), g, parts.data_ptr<double>(), parts.size(0), mean, var, count, out, diag,
                       momentum, max_count, eps, min_std, max_std, clip, eps_on_std, unbiased);
}

void normalize_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, at::Tensor& out, double eps,
                   std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                   bool eps_on_std) {
  const RowsGeometry g = check_normalize_args(x, mean, var, out, eps, min_std, max_std, clip);
  if (g.rows == 0 || g.cols == 0) return;
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor out_rows = writable_rows(out, g);
  normalize_rows(TileGrid(g.rows, g.cols), x_rows, out_rows, nullptr, mean,
                 inverse_std(var, eps, eps_on_std, min_std, max_std), clip, nullptr);
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
