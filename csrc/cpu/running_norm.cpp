// CPU kernels of fastnorm::running_norm and fastnorm::normalize: x is cut into tiles of rows x
// columns that the threads reduce (tile_kernels_*.cpp); the tile moments are merged per column in
// a fixed order (results do not depend on the thread count), the running statistics updated with
// the shared math, and a second pass over the same tiles writes y.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "../running_norm_args.h"
#include "../running_norm_math.h"
#include "tile_kernels.h"

namespace fastnorm {
namespace cpu {
namespace {

// About 64K elements a tile: enough work per task, small enough to balance two or more threads.
constexpr int64_t kTargetTileElems = 1 << 16;
constexpr double kInf = std::numeric_limits<double>::infinity();

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    default: return ScalarKind::kFloat64;
  }
}

// AVX2 + FMA kernels where the CPU has them; FASTNORM_CPU_ISA=base forces the baseline ones.
const TileKernels& tile_kernels() {
  static const TileKernels& kernels = [] () -> const TileKernels& {
    const char* forced = std::getenv("FASTNORM_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "base") == 0) return tile_kernels_base();
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return tile_kernels_avx2();
#endif
    return tile_kernels_base();
  }();
  return kernels;
}

// Tiles in row-major order: tile i covers row chunk i / col_tiles and column tile i % col_tiles.
struct TileGrid {
  int64_t rows, cols, rows_per_chunk, row_chunks, col_tiles;

  TileGrid(int64_t rows, int64_t cols) : rows(rows), cols(cols) {
    const int64_t width = std::min(cols, kTileCols);
    rows_per_chunk = std::max(kBlockRows, kTargetTileElems / std::max<int64_t>(width, 1));
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

std::vector<double> inverse_std(const at::Tensor& var, double eps, std::optional<double> min_std,
                                std::optional<double> max_std) {
  const double* v = var.data_ptr<double>();
  std::vector<double> inv(var.numel());
  for (int64_t c = 0; c < var.numel(); ++c) {
    inv[c] = 1.0 / bounded_std(v[c], eps, min_std.value_or(0.0), max_std.value_or(kInf));
  }
  return inv;
}

// Second pass: y for every tile, and (when clipped is not null) the per-column clip diagnostics.
void normalize_rows(const TileGrid& grid, const at::Tensor& x_rows, const at::Tensor& out_rows,
                    const at::Tensor* mask, const at::Tensor& mean, const std::vector<double>& inv_std,
                    std::optional<double> clip, double* clipped, double* max_abs_z) {
  const NormalizeTileFn normalize = tile_kernels().normalize[static_cast<int>(scalar_kind(x_rows.scalar_type()))];
  const double* mean_ptr = mean.data_ptr<double>();
  const double clip_value = clip.value_or(kInf);
  const int64_t C = grid.cols;
  std::vector<double> part_clipped, part_max;
  if (clipped != nullptr) {
    part_clipped.assign(grid.row_chunks * C, 0.0);
    part_max.assign(grid.row_chunks * C, 0.0);
  }
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    // Backwards: the reduce pass left this thread's last tiles in cache.
    for (int64_t i = end - 1; i >= begin; --i) {
      const Tile t = grid.tile(i, x_rows, &out_rows, mask);
      const int64_t offset = grid.chunk_of(i) * C + t.col_begin;
      normalize(t, mean_ptr, inv_std.data(), clip_value, clipped ? part_clipped.data() + offset : nullptr,
                clipped ? part_max.data() + offset : nullptr);
    }
  });
  if (clipped == nullptr) return;
  for (int64_t c = 0; c < C; ++c) {
    clipped[c] = 0.0;
    max_abs_z[c] = 0.0;
    for (int64_t k = 0; k < grid.row_chunks; ++k) {
      clipped[c] += part_clipped[k * C + c];
      max_abs_z[c] = std::max(max_abs_z[c], part_max[k * C + c]);
    }
  }
}

void running_norm_cpu(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& mean, at::Tensor& var,
                      at::Tensor& count, const std::optional<at::Tensor>& out, at::Tensor& diag,
                      std::optional<double> momentum, std::optional<double> max_count, double eps,
                      std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  const int64_t C = g.cols;
  diag.zero_();
  if (C == 0) return;
  double* d = diag.data_ptr<double>();
  double* batch_count = d + kBatchCount * C;
  double* batch_mean = d + kBatchMean * C;
  double* batch_var = d + kBatchVar * C;
  double* nonfinite = d + kNonFinite * C;
  if (!out) {
    std::fill(d + kClipped * C, d + kNumDiagRows * C, std::numeric_limits<double>::quiet_NaN());
  }
  if (g.rows == 0) return;

  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor mask_2d = mask ? mask_rows(*mask, g) : at::Tensor();
  const at::Tensor* mask_ptr = mask ? &mask_2d : nullptr;
  const TileGrid grid(g.rows, C);

  // Pass 1: per-tile moments, merged per column in row-chunk order.
  const ReduceTileFn reduce = tile_kernels().reduce[static_cast<int>(scalar_kind(x.scalar_type()))];
  std::vector<Moments> part(grid.row_chunks * C);
  std::vector<double> part_nonfinite(grid.row_chunks * C);
  at::parallel_for(0, grid.size(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const Tile t = grid.tile(i, x_rows, nullptr, mask_ptr);
      const int64_t offset = grid.chunk_of(i) * C + t.col_begin;
      reduce(t, part.data() + offset, part_nonfinite.data() + offset);
    }
  });

  const UpdateParams params{momentum ? 1.0 - *momentum : 0.0, max_count.value_or(kInf)};
  double* mean_ptr = mean.data_ptr<double>();
  double* var_ptr = var.data_ptr<double>();
  double* count_ptr = count.data_ptr<double>();
  for (int64_t c = 0; c < C; ++c) {
    Moments m{0.0, 0.0, 0.0};
    for (int64_t k = 0; k < grid.row_chunks; ++k) {
      m = merge_moments(m, part[k * C + c]);
      nonfinite[c] += part_nonfinite[k * C + c];
    }
    batch_count[c] = m.count;
    batch_mean[c] = m.mean;
    batch_var[c] = m.count > 0 ? m.m2 / m.count : 0.0;
    update_running_stats(mean_ptr[c], var_ptr[c], count_ptr[c], m, params);
  }

  if (!out) return;
  // Pass 2: normalize with the updated statistics.
  const at::Tensor out_rows = writable_rows(*out, g);
  normalize_rows(grid, x_rows, out_rows, mask_ptr, mean, inverse_std(var, eps, min_std, max_std), clip,
                 d + kClipped * C, d + kMaxAbsZ * C);
  finish_writable_rows(*out, out_rows);
}

void normalize_cpu(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, at::Tensor& out, double eps,
                   std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip) {
  const RowsGeometry g = check_normalize_args(x, mean, var, out, eps, min_std, max_std, clip);
  if (g.rows == 0 || g.cols == 0) return;
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor out_rows = writable_rows(out, g);
  normalize_rows(TileGrid(g.rows, g.cols), x_rows, out_rows, nullptr, mean, inverse_std(var, eps, min_std, max_std),
                 clip, nullptr, nullptr);
  finish_writable_rows(out, out_rows);
}

}  // namespace
}  // namespace cpu

TORCH_LIBRARY_IMPL(fastnorm, CPU, m) {
  m.impl("running_norm", &cpu::running_norm_cpu);
  m.impl("normalize", &cpu::normalize_cpu);
}

}  // namespace fastnorm
