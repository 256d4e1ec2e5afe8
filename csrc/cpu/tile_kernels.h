// The interface between the CPU binding (tiling, threads, merges) and the per-tile kernels, which
// are compiled once per instruction set (tile_kernels_base.cpp, tile_kernels_avx2.cpp) and picked
// at run time. Free of torch headers.
#pragma once

#include <stdint.h>

#include "cpu_support.h"

#include "../running_norm_math.h"

namespace fastnorm {
namespace cpu {

// Columns of one tile. Tiles span whole rows up to this width: reading rows in part (column
// strips) ran 2.5x slower here than whole rows, as the hardware prefetchers lose the stream.
constexpr int64_t kTileCols = 2048;
// A reduce block is re-read from cache by its second pass: about 64K elements (256 KiB of fp32,
// within L2) and at most 128 rows, so float32 block sums stay accurate to ~1e-6. Shorter blocks
// cost more: each ends with a per-column merge (two float64 divisions).
constexpr int64_t kBlockElems = 1 << 16;
constexpr int64_t kMaxBlockRows = 128;

// Tiles of whole contiguous rows narrower than this are processed as "super-rows" of
// kFoldWidth / C consecutive rows, so the column loops stay long enough to vectorize well.
constexpr int64_t kFoldWidth = 256;

// Rows per reduce block for a tile `width` columns wide.
inline int64_t block_rows(int64_t width) {
  const int64_t rows = kBlockElems / (width > 0 ? width : 1);
  return rows < 1 ? 1 : (rows > kMaxBlockRows ? kMaxBlockRows : rows);
}

// Scratch slots (cpu_support.h thread_scratch): one per buffer live at the same time as another.
enum ScratchSlot : int {
  kReduceAccSlot,
  kReduceF64Slot,
  kReduceRowsSlot,
  kReduceRowIndexSlot,
  kNormalizeAccSlot,
  kPartMomentsSlot,
  kPartF64Slot,
  kPartClippedSlot,
  kMomentTableSlot,   // the batch-moments table of running_norm (kNumMomentRows x C)
  kInverseStdSlot,    // per column: 1 / bounded std (C)
  kMergedTableSlot,   // merge_normalize's parts merged (kNumMomentRows x C)
  kPreviousStatsSlot, // per column: mean, var and scale from before the update (3 x C)
  kHistorySlot,       // per column: whether count was > 0 before the update (C bytes)
};

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
  // Reduce only: per absolute column, a value near the column's mean (the running mean), which
  // lets the reduce take one pass per block; nullptr: the two-pass blocks.
  const double* shift;
};

// What the reduce pass finds per column over the tile's selected finite entries.
struct ColumnReduction {
  Moments* moments;
  double* nonfinite;  // selected entries that were NaN or +-inf
  double* min;        // +inf where there is no entry
  double* max;        // -inf where there is no entry
};

// Reduces the tile; writes entry j of each output for column col_begin + j.
using ReduceTileFn = void (*)(const Tile& tile, const ColumnReduction& out);

// y = clamp((x - mean) * inv_std, -clip, clip) for the tile; mean and inv_std are indexed by
// absolute column. When clipped is not null, also adds per tile column the number of selected
// finite entries with |z| > clip.
using NormalizeTileFn = void (*)(const Tile& tile, const double* mean, const double* inv_std,
                                 double clip, double* clipped);

struct TileKernels {
  ReduceTileFn reduce[static_cast<int>(ScalarKind::kCount)];
  NormalizeTileFn normalize[static_cast<int>(ScalarKind::kCount)];
};

// One table per instruction set; the binding picks one at run time.
const TileKernels& tile_kernels_base();
const TileKernels& tile_kernels_avx2();

}  // namespace cpu
}  // namespace fastnorm
