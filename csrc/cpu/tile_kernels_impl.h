// The per-tile CPU kernels. Included by one .cpp per instruction set, each of which defines
// FASTNORM_CPU_ISA (the namespace) and may set a target before including this file.
//
// Inner loops run over the contiguous columns of 1 or 4 rows with per-column accumulators, so the
// compiler vectorizes them (#pragma GCC ivdep: the scratch arrays never alias x or y); taking 4
// rows at a time loads and stores each accumulator once per 4 elements.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <limits>
#include <vector>

#include "tile_kernels.h"

namespace fastnorm {
namespace cpu {
namespace FASTNORM_CPU_ISA {

// Accumulate half precision and float32 in float, float64 in double.
template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

// min and max for values that are not NaN (one instruction each, unlike fmin/fmax).
template <typename T>
inline T min_of(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
inline T max_of(T a, T b) {
  return a > b ? a : b;
}

inline bool has_element_mask(const Tile& t) { return t.mask != nullptr && t.mask_cols > 1; }

inline bool row_selected(const Tile& t, int64_t row) {
  return t.mask == nullptr || t.mask_cols > 1 || t.mask[row * t.mask_cols];
}

// Per tile column j, the mask column it reads (element masks only).
inline std::vector<int32_t> mask_columns(const Tile& t) {
  std::vector<int32_t> mask_col;
  if (!has_element_mask(t)) return mask_col;
  for (int64_t c = t.col_begin; c < t.col_end; ++c) mask_col.push_back(static_cast<int32_t>(c / t.mask_group));
  return mask_col;
}

// sel[j] = 1 where the element mask selects (row, column j), else 0.
template <typename acc_t>
inline void fill_selection(const Tile& t, int64_t row, const int32_t* mask_col, acc_t* sel) {
  const bool* m = t.mask + row * t.mask_cols;
  for (int64_t j = 0; j < t.col_end - t.col_begin; ++j) sel[j] = m[mask_col[j]] ? acc_t(1) : acc_t(0);
}

template <typename scalar_t>
inline const scalar_t* row_ptr(const Tile& t, int64_t r) {
  return static_cast<const scalar_t*>(t.x) + r * t.x_row_stride + t.col_begin;
}

// Per-column sums of one block of rows, in acc_t; the corrected two-pass algorithm of
// running_norm_math.h turns them into moments.
template <typename acc_t>
struct BlockSums {
  acc_t *cnt, *nsel, *shift, *s1, *s2;
  acc_t *min, *max;  // running over the whole tile, not reset per block
};

// Fast path: n selected rows, all of whose columns are selected. Pass 1 sums without testing
// each value: a column's sum is finite only if all its values are, which one check per block
// confirms. Returns false when a value is NaN or inf (the caller then takes the careful path).
template <typename scalar_t, typename acc_t>
bool block_sums_if_finite(const scalar_t* const* rows, int64_t n, int64_t width, const BlockSums<acc_t>& b) {
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ block_min = b.nsel;  // scratch: nsel is not needed on this path
  acc_t* __restrict__ block_max = b.cnt;
  for (int64_t j = 0; j < width; ++j) {
    shift[j] = s1[j] = s2[j] = acc_t(0);
    block_min[j] = b.min[j];
    block_max[j] = b.max[j];
  }
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) {
    const scalar_t *__restrict__ x0 = rows[r], *__restrict__ x1 = rows[r + 1];
    const scalar_t *__restrict__ x2 = rows[r + 2], *__restrict__ x3 = rows[r + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v0 = static_cast<acc_t>(x0[j]), v1 = static_cast<acc_t>(x1[j]);
      const acc_t v2 = static_cast<acc_t>(x2[j]), v3 = static_cast<acc_t>(x3[j]);
      shift[j] += (v0 + v1) + (v2 + v3);
      const acc_t lo = min_of(min_of(v0, v1), min_of(v2, v3)), hi = max_of(max_of(v0, v1), max_of(v2, v3));
      block_min[j] = min_of(block_min[j], lo);
      block_max[j] = max_of(block_max[j], hi);
    }
  }
  for (; r < n; ++r) {
    const scalar_t* __restrict__ x0 = rows[r];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x0[j]);
      shift[j] += v;
      block_min[j] = min_of(block_min[j], v);
      block_max[j] = max_of(block_max[j], v);
    }
  }
  acc_t probe = 0;  // 0 if every sum is finite, else NaN
  for (int64_t j = 0; j < width; ++j) probe += shift[j] - shift[j];
  if (!is_finite(probe)) return false;
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = block_min[j];
    b.max[j] = block_max[j];
  }
  const acc_t inv_n = acc_t(1) / static_cast<acc_t>(n > 0 ? n : 1);
  for (int64_t j = 0; j < width; ++j) {
    shift[j] *= inv_n;
    b.cnt[j] = static_cast<acc_t>(n);
  }
  // Pass 2 (rows still in cache): shifted sums.
  for (r = 0; r + 4 <= n; r += 4) {
    const scalar_t *__restrict__ x0 = rows[r], *__restrict__ x1 = rows[r + 1];
    const scalar_t *__restrict__ x2 = rows[r + 2], *__restrict__ x3 = rows[r + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t m = shift[j];
      const acc_t d0 = static_cast<acc_t>(x0[j]) - m, d1 = static_cast<acc_t>(x1[j]) - m;
      const acc_t d2 = static_cast<acc_t>(x2[j]) - m, d3 = static_cast<acc_t>(x3[j]) - m;
      s1[j] += (d0 + d1) + (d2 + d3);
      s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; r < n; ++r) {
    const scalar_t* __restrict__ x0 = rows[r];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t d = static_cast<acc_t>(x0[j]) - shift[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  return true;
}

// Careful path: tests every value (finite, and selected by an element mask when there is one),
// and counts the selected entries per column in nsel.
template <typename scalar_t, typename acc_t, bool kElementMask>
void block_sums_careful(const Tile& t, const scalar_t* const* rows, const int64_t* row_index, int64_t n,
                        const int32_t* mask_col, acc_t* __restrict__ sel, const BlockSums<acc_t>& b) {
  const int64_t width = t.col_end - t.col_begin;
  acc_t* __restrict__ cnt = b.cnt;
  acc_t* __restrict__ nsel = b.nsel;
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ col_min = b.min;
  acc_t* __restrict__ col_max = b.max;
  for (int64_t j = 0; j < width; ++j) cnt[j] = nsel[j] = shift[j] = s1[j] = s2[j] = acc_t(0);
  for (int64_t r = 0; r < n; ++r) {
    if (kElementMask) fill_selection(t, row_index[r], mask_col, sel);
    const scalar_t* __restrict__ x = rows[r];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
      shift[j] += ok ? v : acc_t(0);
      cnt[j] += ok ? acc_t(1) : acc_t(0);
      nsel[j] += kElementMask ? sel[j] : acc_t(1);
      col_min[j] = ok ? min_of(col_min[j], v) : col_min[j];
      col_max[j] = ok ? max_of(col_max[j], v) : col_max[j];
    }
  }
  for (int64_t j = 0; j < width; ++j) shift[j] = shift[j] / (cnt[j] > acc_t(1) ? cnt[j] : acc_t(1));
  for (int64_t r = 0; r < n; ++r) {
    if (kElementMask) fill_selection(t, row_index[r], mask_col, sel);
    const scalar_t* __restrict__ x = rows[r];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
      const acc_t d = ok ? v - shift[j] : acc_t(0);
      s1[j] += d;
      s2[j] += d * d;
    }
  }
}

// Exact two-pass moments of column j of a block in double: the fallback where acc_t overflowed
// (fp32 deviations beyond ~1e19).
template <typename scalar_t>
Moments column_moments_fp64(const Tile& t, const scalar_t* const* rows, const int64_t* row_index, int64_t n,
                            int64_t j) {
  const int64_t mask_c = t.mask_cols > 1 ? (t.col_begin + j) / t.mask_group : 0;
  auto valid = [&](int64_t r, double v) {
    return is_finite(v) && (t.mask == nullptr || t.mask[row_index[r] * t.mask_cols + mask_c]);
  };
  double count = 0, sum = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double v = static_cast<double>(rows[r][j]);
    if (valid(r, v)) {
      count += 1;
      sum += v;
    }
  }
  const double mean = count > 0 ? sum / count : 0.0;
  double s1 = 0, s2 = 0;
  for (int64_t r = 0; r < n; ++r) {
    const double v = static_cast<double>(rows[r][j]);
    if (valid(r, v)) {
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  return moments_from_shifted_sums(count, mean, s1, s2);
}

template <typename scalar_t, bool kElementMask>
void reduce_tile_impl(const Tile& t, const ColumnReduction& out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.col_end - t.col_begin;
  const int64_t rows_per_block = block_rows(width);
  acc_t* sel = thread_scratch<acc_t, kReduceAccSlot>(8 * width);
  const BlockSums<acc_t> b{sel + width,     sel + 2 * width, sel + 3 * width, sel + 4 * width,
                           sel + 5 * width, sel + 6 * width, sel + 7 * width};
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = std::numeric_limits<acc_t>::infinity();
    b.max[j] = -std::numeric_limits<acc_t>::infinity();
  }
  double* nonfinite = out.nonfinite;
  double* __restrict__ tile_n = thread_scratch<double, kReduceF64Slot>(5 * width);
  for (int64_t j = 0; j < 3 * width; ++j) tile_n[j] = 0.0;
  double* __restrict__ tile_mean = tile_n + width;
  double* __restrict__ tile_m2 = tile_mean + width;
  double* __restrict__ block_mean = tile_m2 + width;
  double* __restrict__ block_m2 = block_mean + width;
  const scalar_t** rows = thread_scratch<const scalar_t*, kReduceRowsSlot>(rows_per_block);
  int64_t* row_index = thread_scratch<int64_t, kReduceRowIndexSlot>(rows_per_block);
  const std::vector<int32_t> mask_col = mask_columns(t);
  for (int64_t j = 0; j < width; ++j) nonfinite[j] = 0.0;

  for (int64_t b0 = t.row_begin; b0 < t.row_end; b0 += rows_per_block) {
    const int64_t b1 = b0 + rows_per_block < t.row_end ? b0 + rows_per_block : t.row_end;
    int64_t n = 0;  // the block's selected rows
    for (int64_t r = b0; r < b1; ++r) {
      if (!row_selected(t, r)) continue;
      row_index[n] = r;
      rows[n++] = row_ptr<scalar_t>(t, r);
    }
    if (n == 0) continue;
    if (kElementMask || !block_sums_if_finite(rows, n, width, b)) {
      block_sums_careful<scalar_t, acc_t, kElementMask>(t, rows, row_index, n, mask_col.data(), sel, b);
      for (int64_t j = 0; j < width; ++j) nonfinite[j] += static_cast<double>(b.nsel[j] - b.cnt[j]);
    }
    for (int64_t j = 0; j < width; ++j) {
      const Moments m = moments_from_shifted_sums(b.cnt[j], b.shift[j], b.s1[j], b.s2[j]);
      block_mean[j] = m.mean;
      block_m2[j] = m.m2;
    }
    double probe = 0.0;  // NaN or inf only where acc_t overflowed
    for (int64_t j = 0; j < width; ++j) probe += block_mean[j] + block_m2[j];
    if (!is_finite(probe)) {
      for (int64_t j = 0; j < width; ++j) {
        if (is_finite(block_mean[j]) && is_finite(block_m2[j])) continue;
        const Moments m = column_moments_fp64(t, rows, row_index, n, j);
        block_mean[j] = m.mean;
        block_m2[j] = m.m2;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const Moments m = merge_moments({tile_n[j], tile_mean[j], tile_m2[j]},
                                      {static_cast<double>(b.cnt[j]), block_mean[j], block_m2[j]});
      tile_n[j] = m.count;
      tile_mean[j] = m.mean;
      tile_m2[j] = m.m2;
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    out.moments[j] = Moments{tile_n[j], tile_mean[j], tile_m2[j]};
    out.min[j] = static_cast<double>(b.min[j]);
    out.max[j] = static_cast<double>(b.max[j]);
  }
}

template <typename scalar_t>
void reduce_tile(const Tile& t, const ColumnReduction& out) {
  if (has_element_mask(t)) {
    reduce_tile_impl<scalar_t, true>(t, out);
  } else {
    reduce_tile_impl<scalar_t, false>(t, out);
  }
}

// Per-column normalization coefficients in acc_t. mean = mean_hi + mean_lo: (x - mean_hi) is
// exact for x near the mean (Sterbenz), so z keeps acc_t precision even when |mean| >> std.
template <typename acc_t>
struct Coefficients {
  acc_t *mean_hi, *mean_lo, *scale;
};

template <typename scalar_t, typename acc_t>
inline acc_t z_score(scalar_t x, acc_t mean_hi, acc_t mean_lo, acc_t scale) {
  return ((static_cast<acc_t>(x) - mean_hi) - mean_lo) * scale;
}

// y for n consecutive rows from r, without diagnostics.
template <typename scalar_t, typename acc_t>
void normalize_rows(const Tile& t, int64_t r, int64_t n, const Coefficients<acc_t>& k, acc_t hi) {
  const int64_t width = t.col_end - t.col_begin;
  const acc_t* __restrict__ mean_hi = k.mean_hi;
  const acc_t* __restrict__ mean_lo = k.mean_lo;
  const acc_t* __restrict__ scale = k.scale;
  for (int64_t i = r; i < r + n; ++i) {
    const scalar_t* __restrict__ x = row_ptr<scalar_t>(t, i);
    scalar_t* __restrict__ y = static_cast<scalar_t*>(t.out) + i * t.out_row_stride + t.col_begin;
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      y[j] = static_cast<scalar_t>(clamp_keep_nan(z_score(x[j], mean_hi[j], mean_lo[j], scale[j]), -hi, hi));
    }
  }
}

// y for one selected row, counting per column the selected finite entries with |z| > clip.
template <typename scalar_t, typename acc_t, bool kElementMask>
void normalize_row_counting_clipped(const Tile& t, int64_t r, const Coefficients<acc_t>& k, acc_t hi,
                                    const acc_t* __restrict__ sel, acc_t* __restrict__ n_clipped) {
  const int64_t width = t.col_end - t.col_begin;
  const acc_t* __restrict__ mean_hi = k.mean_hi;
  const acc_t* __restrict__ mean_lo = k.mean_lo;
  const acc_t* __restrict__ scale = k.scale;
  const scalar_t* __restrict__ x = row_ptr<scalar_t>(t, r);
  scalar_t* __restrict__ y = static_cast<scalar_t*>(t.out) + r * t.out_row_stride + t.col_begin;
#pragma GCC ivdep
  for (int64_t j = 0; j < width; ++j) {
    const acc_t v = static_cast<acc_t>(x[j]);
    const acc_t z = ((v - mean_hi[j]) - mean_lo[j]) * scale[j];
    y[j] = static_cast<scalar_t>(clamp_keep_nan(z, -hi, hi));
    const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
    n_clipped[j] += ok && (z > hi || z < -hi) ? acc_t(1) : acc_t(0);
  }
}

template <typename scalar_t, bool kCountClipped, bool kElementMask>
void normalize_tile_impl(const Tile& t, const double* mean, const double* inv_std, double clip, double* clipped) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.col_end - t.col_begin;
  acc_t* buf = thread_scratch<acc_t, kNormalizeAccSlot>(5 * width);
  const Coefficients<acc_t> k{buf, buf + width, buf + 2 * width};
  acc_t* sel = buf + 3 * width;
  acc_t* n_clipped = buf + 4 * width;
  for (int64_t j = 0; j < width; ++j) n_clipped[j] = acc_t(0);
  for (int64_t j = 0; j < width; ++j) {
    const double m = mean[t.col_begin + j];
    k.mean_hi[j] = static_cast<acc_t>(m);
    k.mean_lo[j] = static_cast<acc_t>(m - static_cast<double>(k.mean_hi[j]));
    k.scale[j] = static_cast<acc_t>(inv_std[t.col_begin + j]);
  }
  const acc_t hi = static_cast<acc_t>(clip);
  if (!kCountClipped) {
    normalize_rows<scalar_t>(t, t.row_begin, t.row_end - t.row_begin, k, hi);
    return;
  }
  const std::vector<int32_t> mask_col = mask_columns(t);
  for (int64_t r = t.row_begin; r < t.row_end; ++r) {
    if (!row_selected(t, r)) {
      normalize_rows<scalar_t>(t, r, 1, k, hi);
      continue;
    }
    if (kElementMask) fill_selection(t, r, mask_col.data(), sel);
    normalize_row_counting_clipped<scalar_t, acc_t, kElementMask>(t, r, k, hi, sel, n_clipped);
  }
  for (int64_t j = 0; j < width; ++j) clipped[j] += static_cast<double>(n_clipped[j]);
}

template <typename scalar_t>
void normalize_tile(const Tile& t, const double* mean, const double* inv_std, double clip, double* clipped) {
  if (clipped == nullptr) {
    normalize_tile_impl<scalar_t, false, false>(t, mean, inv_std, clip, clipped);
  } else if (has_element_mask(t)) {
    normalize_tile_impl<scalar_t, true, true>(t, mean, inv_std, clip, clipped);
  } else {
    normalize_tile_impl<scalar_t, true, false>(t, mean, inv_std, clip, clipped);
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
