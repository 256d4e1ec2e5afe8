// The interface between the CPU binding (tiling, threads, merges) and the per-tile kernels, which
// are compiled once per instruction set (tile_kernels_base.cpp, tile_kernels_avx2.cpp) and picked
// at run time. Free of torch headers.
#pragma once

#include <stdint.h>

#include "../running_norm_math.h"

namespace fastnorm {
namespace cpu {

// Columns of one tile; 256 fp32 columns are 1 KiB a row, so a block of rows stays in L1/L2.
constexpr int64_t kTileCols = 256;
// Rows reduced per block: pass 1 (block mean) and pass 2 (shifted sums) re-read them from cache.
constexpr int64_t kBlockRows = 64;

enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kCount = 4 };

// A tile of x viewed as rows of contiguous columns: rows [row_begin, row_end), columns
// [col_begin, col_end) with col_end - col_begin <= kTileCols.
struct Tile {
  const void* x;
  int64_t x_row_stride;
  void* out;  // normalize only
  int64_t out_row_stride;
  // Selection mask, contiguous (rows, mask_cols) bools; column c reads mask column c / mask_group.
  // nullptr selects everything; mask_cols == 1 is a per-row mask.
  const bool* mask;
  int64_t mask_cols;
  int64_t mask_group;
  int64_t row_begin, row_end, col_begin, col_end;
};

// Reduces the tile's selected finite entries: moments[j] and nonfinite[j] for column col_begin + j.
using ReduceTileFn = void (*)(const Tile& tile, Moments* moments, double* nonfinite);

// y = clamp((x - mean) * inv_std, -clip, clip) for the tile; mean and inv_std are indexed by
// absolute column. When clipped is not null, also accumulates per tile column the number of
// selected finite entries with |z| > clip, and their max |z| into max_abs_z.
using NormalizeTileFn = void (*)(const Tile& tile, const double* mean, const double* inv_std,
                                 double clip, double* clipped, double* max_abs_z);

struct TileKernels {
  ReduceTileFn reduce[static_cast<int>(ScalarKind::kCount)];
  NormalizeTileFn normalize[static_cast<int>(ScalarKind::kCount)];
};

// One table per instruction set; the binding picks one at run time.
const TileKernels& tile_kernels_base();
const TileKernels& tile_kernels_avx2();

}  // namespace cpu
}  // namespace fastnorm
