// The interface between the CPU binding of normalize_advantages (tiling, threads, merges; in
// advantages.cpp) and its per-chunk (runs) and per-tile (columns) kernels, which are compiled once
// per instruction set (advantages_tiles_base.cpp, advantages_tiles_avx2.cpp) and picked at run
// time. Free of torch.
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <limits>
#include <vector>

#include "../running_norm_math.h"
#include "cpu_support.h"

namespace fastnorm {
namespace cpu {
namespace adv {

// A column tile's reduce block is read twice (the corrected two-pass algorithm), the second time
// from cache: at most kBlockElems elements (256 KiB of float32, within L2) and kMaxBlockRows rows,
// so that float32 shifted sums stay accurate to ~1e-6.
constexpr int64_t kBlockElems = 1 << 16;
constexpr int64_t kMaxBlockRows = 128;

// Scratch slots (cpu_support.h thread_scratch): one per buffer live at the same time as another.
enum ScratchSlot : int {
  kReduceAccSlot,
  kReduceF64Slot,
  kReduceRowsSlot,
  kNormalizeSlot,
  kPartSlot,        // the binding's per-chunk or per-column partial reductions
  kGroupSlot,       // per-group reductions and coefficients
  kColumnCoefSlot,  // per-column coefficients
};

using Dtype = ScalarKind;

// The contiguous x (and out) of the call, and its flat mask: the entry at flat index k is selected
// when mask[k / mask_group] (mask == nullptr: every entry) and it is finite.
struct Data {
  const void* x;
  void* out;
  const bool* mask;
  int64_t mask_group;
};

// The moments of a set of entries (a run, a group), and their min and max (+inf and -inf when the
// set is empty).
struct Reduction {
  Moments moments{0.0, 0.0, 0.0};
  double min = std::numeric_limits<double>::infinity();
  double max = -std::numeric_limits<double>::infinity();
};

// Runs: chunks of entries whose groups repeat with a short period. Entry i of a chunk (counted from
// its first entry, a multiple of period) is in group slot (i % period) / inner. The period divides
// max_period(dtype), so that it divides the kernels' lane counts.
constexpr int64_t kMaxSlots = 16;
constexpr int64_t max_period(Dtype t) { return t == Dtype::kFloat64 ? 8 : 16; }

struct Pattern {
  int64_t period;
  int64_t inner;
  int64_t slots() const { return period / inner; }
  int64_t slot(int64_t i) const { return (i % period) / inner; }
};

// Reduces the n entries from flat index `first`: out[s] for each slot s.
using ReduceRunFn = void (*)(const Data& data, int64_t first, int64_t n, const Pattern& pattern, Reduction* out);

// Per slot s: mean[s], scale[s] and, unless live is nullptr (every slot live), live[s] (1 or 0).
struct SlotCoefficients {
  const double* mean;
  const double* scale;
  const double* live;
};

// y = live ? (x - mean) * scale : 0 for the n entries from flat index `first`, per slot.
using NormalizeRunFn = void (*)(const Data& data, int64_t first, int64_t n, const Pattern& pattern,
                                const SlotCoefficients& k);

// A tile: `rows` rows of `cols` columns, row r starting at flat index first + r * row_stride,
// then, when tail_cols > 0, one last row of tail_cols columns at first + rows * row_stride.
struct Tile {
  int64_t first;
  int64_t rows;
  int64_t cols;
  int64_t row_stride;
  int64_t tail_cols;
};

// Per tile column j (cols entries): the moments of its selected finite entries, and their min and
// max (+inf and -inf when there is none).
struct ColumnPartials {
  Moments* moments;
  double* min;
  double* max;
};

using ReduceTileFn = void (*)(const Data& data, const Tile& tile, const ColumnPartials& out);

// The coefficients of tile column j are mean[j * stride], scale[j * stride] and, unless live is
// nullptr (every group live), live[j * stride] (1 or 0): y = live ? (x - mean) * scale : 0.
struct Coefficients {
  const double* mean;
  const double* scale;
  const double* live;
  int64_t stride;
};

using NormalizeTileFn = void (*)(const Data& data, const Tile& tile, const Coefficients& k);

struct Kernels {
  ReduceRunFn reduce_run[static_cast<int>(Dtype::kCount)];
  NormalizeRunFn normalize_run[static_cast<int>(Dtype::kCount)];
  ReduceTileFn reduce[static_cast<int>(Dtype::kCount)];
  NormalizeTileFn normalize[static_cast<int>(Dtype::kCount)];
};

// One table per instruction set; the binding picks one at run time.
const Kernels& kernels_base();
const Kernels& kernels_avx2();

}  // namespace adv
}  // namespace cpu
}  // namespace fastnorm
