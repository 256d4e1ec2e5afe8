// The per-tile CPU kernels. Included by one .cpp per instruction set, each of which defines
// FASTNORM_CPU_ISA (the namespace) and may set a target before including this file.
//
// A tile is processed in "units": a unit is one row, or, for whole contiguous rows narrower than
// kFoldWidth, `fold` consecutive rows seen as one row of fold * C columns (column q * C + c is
// column c of the unit's row q); per-column results are folded back at the end. Inner loops run
// over a unit's contiguous columns with per-column accumulators, so the compiler vectorizes them
// (#pragma GCC ivdep: the scratch arrays never alias x or y).
#pragma once

#include <stdint.h>

#include <limits>

#include "block_moments_impl.h"
#include "tile_kernels.h"

namespace fastnorm {
namespace cpu {
namespace FASTNORM_CPU_ISA {

// How a tile is cut into units.
struct Units {
  int64_t cols;   // the tile's columns
  int64_t fold;   // rows per unit (1: no folding)
  int64_t width;  // columns per unit: fold * cols
  int64_t count;  // units of `fold` rows; the remaining rows are processed one by one
  bool select;    // whether entries need a per-element selection array (element mask, or a row mask
                  // inside folded units)

  explicit Units(const Tile& t) {
    cols = t.col_end - t.col_begin;
    const bool whole_rows =
        t.col_begin == 0 && t.x_row_stride == cols && (t.out == nullptr || t.out_row_stride == cols);
    fold = whole_rows && 2 * cols <= kFoldWidth ? kFoldWidth / cols : 1;
    width = fold * cols;
    count = (t.row_end - t.row_begin) / fold;
    select = t.mask != nullptr && (t.mask_cols > 1 || fold > 1);
  }
  int64_t folded_rows(const Tile& t) const { return t.row_begin + count * fold; }
};

template <typename scalar_t>
inline const scalar_t* row_ptr(const Tile& t, int64_t r) {
  return static_cast<const scalar_t*>(t.x) + r * t.x_row_stride + t.col_begin;
}

template <typename scalar_t>
inline scalar_t* out_ptr(const Tile& t, int64_t r) {
  return static_cast<scalar_t*>(t.out) + r * t.out_row_stride + t.col_begin;
}

// Whether a per-row mask (or no mask) selects row r; element masks are handled by selection().
inline bool row_selected(const Tile& t, int64_t r) {
  return t.mask == nullptr || t.mask_cols > 1 || t.mask[r * t.mask_cols];
}

// sel[q * cols + c] = 1 where the mask selects column c of row r + q (q < rows), else 0.
template <typename acc_t>
inline void selection(const Tile& t, int64_t r, int64_t rows, int64_t cols, acc_t* sel) {
  for (int64_t q = 0; q < rows; ++q) {
    const bool* m = t.mask + (r + q) * t.mask_cols;
    for (int64_t c = 0; c < cols; ++c) {
      const int64_t mc = t.mask_cols == 1 ? 0 : (t.col_begin + c) / t.mask_group;
      sel[q * cols + c] = m[mc] ? acc_t(1) : acc_t(0);
    }
  }
}

// Whether entry v (selection sel, 1 or 0) enters the statistics: selected and finite.
template <bool kSelect, typename acc_t>
inline bool counted(acc_t v, acc_t sel) {
  return kSelect ? (sel != acc_t(0) && is_finite(v)) : is_finite(v);
}


// A tile's reduce state: per unit column, the running float64 moments and non-finite count; the
// block sums and selection scratch; the unit pointers of the current block and their first rows.
template <typename scalar_t, typename acc_t>
struct ReduceState {
  ColumnMoments moments;
  double* nonfinite;
  BlockSums<acc_t> block;
  acc_t* sel;
  const scalar_t** units;
  int64_t* unit_row;
  const acc_t* shift;  // per unit column, or nullptr (Tile::shift)
};

// Reduces n_units units of `rows` rows each, the first starting at row `first`, into the state's
// first `width` unit columns.
template <typename scalar_t, typename acc_t, bool kSelect>
void reduce_units(const Tile& t, int64_t first, int64_t n_units, int64_t rows, int64_t width,
                  const ReduceState<scalar_t, acc_t>& s) {
  const BlockSums<acc_t>& b = s.block;
  const int64_t cols = width / rows;
  auto select = [&](int64_t u, acc_t* sel) { selection(t, s.unit_row[u], rows, cols, sel); };
  auto counts = [&](int64_t u, int64_t j, double v) {
    const int64_t mask_col = t.mask_cols > 1 ? (t.col_begin + j % cols) / t.mask_group : 0;
    return is_finite(v) && (t.mask == nullptr || t.mask[(s.unit_row[u] + j / cols) * t.mask_cols + mask_col]);
  };
  // One-pass blocks (with a shift) need not stay in cache for a second pass: as many rows as the
  // float32 sums allow, so fewer per-column merges; a block that falls back re-reads from L3.
  const int64_t per_block = s.shift && !kSelect ? kMaxBlockRows : block_rows(width);
  for (int64_t u0 = 0; u0 < n_units; u0 += per_block) {
    const int64_t u1 = u0 + per_block < n_units ? u0 + per_block : n_units;
    int64_t n = 0;
    for (int64_t u = u0; u < u1; ++u) {
      const int64_t r = first + u * rows;
      if (!kSelect && !row_selected(t, r)) continue;
      s.unit_row[n] = r;
      s.units[n++] = row_ptr<scalar_t>(t, r);
    }
    if (n == 0) continue;
    const bool summed = !kSelect && ((s.shift && block_sums_shifted_if_finite(s.units, n, width, s.shift, b)) ||
                                     block_sums_if_finite(s.units, n, width, b));
    if (!summed) {
      block_sums_careful<scalar_t, acc_t, kSelect>(s.units, n, width, select, s.sel, b);
      for (int64_t j = 0; j < width; ++j) s.nonfinite[j] += static_cast<double>(b.nsel[j] - b.cnt[j]);
    }
    merge_block(s.units, n, width, b, s.moments, counts);
  }
}

template <typename scalar_t, typename acc_t>
void reduce_units_dispatch(const Tile& t, int64_t first, int64_t n_units, int64_t rows, int64_t width, bool select,
                           const ReduceState<scalar_t, acc_t>& s) {
  if (select) {
    reduce_units<scalar_t, acc_t, true>(t, first, n_units, rows, width, s);
  } else {
    reduce_units<scalar_t, acc_t, false>(t, first, n_units, rows, width, s);
  }
}

template <typename scalar_t>
void reduce_tile(const Tile& t, const ColumnReduction& out) {
  using acc_t = typename Acc<scalar_t>::type;
  const Units units(t);
  const int64_t w = units.width;
  acc_t* acc = thread_scratch<acc_t, kReduceAccSlot>(9 * w);
  double* f64 = thread_scratch<double, kReduceF64Slot>(7 * w);
  const int64_t max_block = kMaxBlockRows;  // block_rows() never exceeds it
  const ReduceState<scalar_t, acc_t> s{
      {f64, f64 + w, f64 + 2 * w, f64 + 4 * w, f64 + 5 * w},
      f64 + 3 * w,
      {acc + w, acc + 2 * w, acc + 3 * w, acc + 4 * w, acc + 5 * w, acc + 6 * w, acc + 7 * w, f64 + 6 * w},
      acc,
      thread_scratch<const scalar_t*, kReduceRowsSlot>(max_block),
      thread_scratch<int64_t, kReduceRowIndexSlot>(max_block),
      t.shift ? acc + 8 * w : nullptr};
  if (t.shift) {
    for (int64_t j = 0; j < w; ++j) acc[8 * w + j] = static_cast<acc_t>(t.shift[t.col_begin + j % units.cols]);
  }
  for (int64_t j = 0; j < 4 * w; ++j) f64[j] = 0.0;  // n, mean, m2, nonfinite
  for (int64_t j = 0; j < w; ++j) {
    s.block.min[j] = std::numeric_limits<acc_t>::infinity();
    s.block.max[j] = -std::numeric_limits<acc_t>::infinity();
  }
  reduce_units_dispatch(t, t.row_begin, units.count, units.fold, w, units.select, s);
  const int64_t tail = units.folded_rows(t);
  reduce_units_dispatch(t, tail, t.row_end - tail, 1, units.cols, t.mask != nullptr && t.mask_cols > 1, s);
  // Fold unit column q * cols + c into tile column c.
  for (int64_t c = 0; c < units.cols; ++c) {
    Moments m{0.0, 0.0, 0.0};
    double nonfinite = 0.0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (int64_t j = c; j < w; j += units.cols) {
      m = merge_moments(m, {s.moments.n[j], s.moments.mean[j], s.moments.m2[j]});
      nonfinite += s.nonfinite[j];
      lo = min_of(lo, static_cast<double>(s.block.min[j]));
      hi = max_of(hi, static_cast<double>(s.block.max[j]));
    }
    out.moments[c] = m;
    out.nonfinite[c] = nonfinite;
    out.min[c] = lo;
    out.max[c] = hi;
  }
}

// Per unit column normalization coefficients in acc_t. mean = mean_hi + mean_lo: (x - mean_hi)
// is exact for x near the mean (Sterbenz), so z keeps acc_t precision even when |mean| >> std.
template <typename acc_t>
struct Coefficients {
  acc_t *mean_hi, *mean_lo, *scale;
};

// y for n_units units of `rows` rows from row `first`; when kCount, also counts per unit column
// the selected finite entries with |z| > clip into n_clipped.
template <typename scalar_t, typename acc_t, bool kCount, bool kSelect>
void normalize_units(const Tile& t, int64_t first, int64_t n_units, int64_t rows, int64_t width,
                     const Coefficients<acc_t>& k, acc_t hi, acc_t* __restrict__ sel, acc_t* __restrict__ n_clipped) {
  const acc_t* __restrict__ mean_hi = k.mean_hi;
  const acc_t* __restrict__ mean_lo = k.mean_lo;
  const acc_t* __restrict__ scale = k.scale;
  for (int64_t u = 0; u < n_units; ++u) {
    const int64_t r = first + u * rows;
    const scalar_t* __restrict__ x = row_ptr<scalar_t>(t, r);
    scalar_t* __restrict__ y = out_ptr<scalar_t>(t, r);
    if (kCount && (kSelect || row_selected(t, r))) {
      if (kSelect) selection(t, r, rows, width / rows, sel);
#pragma GCC ivdep
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = to_acc<acc_t>(x[j]);
        const acc_t z = ((v - mean_hi[j]) - mean_lo[j]) * scale[j];
        y[j] = from_acc<scalar_t>(clamp_keep_nan(z, -hi, hi));
        const bool ok = counted<kSelect>(v, kSelect ? sel[j] : acc_t(1));
        n_clipped[j] += ok && (z > hi || z < -hi) ? acc_t(1) : acc_t(0);
      }
    } else {
#pragma GCC ivdep
      for (int64_t j = 0; j < width; ++j) {
        const acc_t z = ((to_acc<acc_t>(x[j]) - mean_hi[j]) - mean_lo[j]) * scale[j];
        y[j] = from_acc<scalar_t>(clamp_keep_nan(z, -hi, hi));
      }
    }
  }
}

template <typename scalar_t, typename acc_t, bool kCount>
void normalize_units_dispatch(const Tile& t, int64_t first, int64_t n_units, int64_t rows, int64_t width,
                              bool select, const Coefficients<acc_t>& k, acc_t hi, acc_t* sel, acc_t* n_clipped) {
  if (select) {
    normalize_units<scalar_t, acc_t, kCount, true>(t, first, n_units, rows, width, k, hi, sel, n_clipped);
  } else {
    normalize_units<scalar_t, acc_t, kCount, false>(t, first, n_units, rows, width, k, hi, sel, n_clipped);
  }
}

template <typename scalar_t, bool kCount>
void normalize_tile_impl(const Tile& t, const double* mean, const double* inv_std, double clip, double* clipped) {
  using acc_t = typename Acc<scalar_t>::type;
  const Units units(t);
  const int64_t w = units.width;
  acc_t* buf = thread_scratch<acc_t, kNormalizeAccSlot>(5 * w);
  const Coefficients<acc_t> k{buf, buf + w, buf + 2 * w};
  acc_t* sel = buf + 3 * w;
  acc_t* n_clipped = buf + 4 * w;
  for (int64_t j = 0; j < w; ++j) {
    const int64_t c = t.col_begin + j % units.cols;
    k.mean_hi[j] = static_cast<acc_t>(mean[c]);
    k.mean_lo[j] = static_cast<acc_t>(mean[c] - static_cast<double>(k.mean_hi[j]));
    k.scale[j] = static_cast<acc_t>(inv_std[c]);
    n_clipped[j] = acc_t(0);
  }
  const acc_t hi = static_cast<acc_t>(clip);
  const bool tail_select = t.mask != nullptr && t.mask_cols > 1;
  normalize_units_dispatch<scalar_t, acc_t, kCount>(t, t.row_begin, units.count, units.fold, w,
                                                    kCount && units.select, k, hi, sel, n_clipped);
  const int64_t tail = units.folded_rows(t);
  normalize_units_dispatch<scalar_t, acc_t, kCount>(t, tail, t.row_end - tail, 1, units.cols, kCount && tail_select,
                                                    k, hi, sel, n_clipped);
  if (!kCount) return;
  for (int64_t j = 0; j < w; ++j) clipped[j % units.cols] += static_cast<double>(n_clipped[j]);
}

template <typename scalar_t>
void normalize_tile(const Tile& t, const double* mean, const double* inv_std, double clip, double* clipped) {
  if (clipped == nullptr) {
    normalize_tile_impl<scalar_t, false>(t, mean, inv_std, clip, clipped);
  } else {
    normalize_tile_impl<scalar_t, true>(t, mean, inv_std, clip, clipped);
  }
}

inline const TileKernels& make_tile_kernels() {
  static const TileKernels kernels = {
      {&reduce_tile<c10::Half>, &reduce_tile<c10::BFloat16>, &reduce_tile<float>, &reduce_tile<double>},
      {&normalize_tile<c10::Half>, &normalize_tile<c10::BFloat16>, &normalize_tile<float>,
       &normalize_tile<double>},
  };
  return kernels;
}

}  // namespace FASTNORM_CPU_ISA
}  // namespace cpu
}  // namespace fastnorm
