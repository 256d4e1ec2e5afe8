// The per-tile CPU kernels. Included by one .cpp per instruction set, each of which defines
// FASTNORM_CPU_ISA (the namespace) and may set a target before including this file. The loops run
// over contiguous columns with no cross-iteration dependence, so the compiler vectorizes them.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

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

// Selection of one row: per-row masks decide the whole row, element masks fill sel[].
template <typename acc_t>
inline bool select_row(const Tile& t, int64_t row, const int32_t* mask_col, acc_t* sel) {
  if (t.mask == nullptr) return true;
  const bool* m = t.mask + row * t.mask_cols;
  if (t.mask_cols == 1) return m[0];
  const int64_t width = t.col_end - t.col_begin;
  for (int64_t j = 0; j < width; ++j) sel[j] = m[mask_col[j]] ? acc_t(1) : acc_t(0);
  return true;
}

inline bool has_element_mask(const Tile& t) { return t.mask != nullptr && t.mask_cols > 1; }

inline void fill_mask_columns(const Tile& t, int32_t* mask_col) {
  if (!has_element_mask(t)) return;
  for (int64_t j = 0; j < t.col_end - t.col_begin; ++j) {
    mask_col[j] = static_cast<int32_t>((t.col_begin + j) / t.mask_group);
  }
}

// Exact two-pass moments of one column of a block in double: the fallback when acc_t overflowed
// (fp32 deviations beyond ~1e19).
template <typename scalar_t>
Moments block_column_moments_fp64(const Tile& t, int64_t row_begin, int64_t row_end, int64_t j) {
  const scalar_t* x = static_cast<const scalar_t*>(t.x) + t.col_begin + j;
  const int64_t c = t.col_begin + j;
  auto selected = [&](int64_t r) {
    return t.mask == nullptr || t.mask[r * t.mask_cols + (t.mask_cols == 1 ? 0 : c / t.mask_group)];
  };
  double n = 0, sum = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const double v = static_cast<double>(x[r * t.x_row_stride]);
    if (selected(r) && is_finite(v)) {
      n += 1;
      sum += v;
    }
  }
  const double mean = n > 0 ? sum / n : 0.0;
  double s1 = 0, s2 = 0;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const double v = static_cast<double>(x[r * t.x_row_stride]);
    if (selected(r) && is_finite(v)) {
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  return moments_from_shifted_sums(n, mean, s1, s2);
}

template <typename scalar_t, bool kElementMask>
void reduce_tile_impl(const Tile& t, Moments* moments, double* nonfinite) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.col_end - t.col_begin;
  acc_t sel[kTileCols], sum[kTileCols], cnt[kTileCols], nsel[kTileCols];
  acc_t shift[kTileCols], s1[kTileCols], s2[kTileCols];
  int32_t mask_col[kTileCols];
  fill_mask_columns(t, mask_col);
  for (int64_t j = 0; j < width; ++j) {
    moments[j] = Moments{0.0, 0.0, 0.0};
    nonfinite[j] = 0.0;
  }
  for (int64_t b0 = t.row_begin; b0 < t.row_end; b0 += kBlockRows) {
    const int64_t b1 = b0 + kBlockRows < t.row_end ? b0 + kBlockRows : t.row_end;
    for (int64_t j = 0; j < width; ++j) sum[j] = cnt[j] = nsel[j] = s1[j] = s2[j] = acc_t(0);
    acc_t rows_selected = 0;
    // Pass 1: count and sum of the selected finite entries -> the block's shift (its mean).
    for (int64_t r = b0; r < b1; ++r) {
      if (!select_row(t, r, mask_col, sel)) continue;
      rows_selected += 1;
      const scalar_t* __restrict__ x = static_cast<const scalar_t*>(t.x) + r * t.x_row_stride + t.col_begin;
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = static_cast<acc_t>(x[j]);
        const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
        sum[j] += ok ? v : acc_t(0);
        cnt[j] += ok ? acc_t(1) : acc_t(0);
        if (kElementMask) nsel[j] += sel[j];
      }
    }
    for (int64_t j = 0; j < width; ++j) shift[j] = cnt[j] > 0 ? sum[j] / cnt[j] : acc_t(0);
    // Pass 2 (rows still in cache): shifted sums for the corrected two-pass moments.
    for (int64_t r = b0; r < b1; ++r) {
      if (!select_row(t, r, mask_col, sel)) continue;
      const scalar_t* __restrict__ x = static_cast<const scalar_t*>(t.x) + r * t.x_row_stride + t.col_begin;
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = static_cast<acc_t>(x[j]);
        const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
        const acc_t d = ok ? v - shift[j] : acc_t(0);
        s1[j] += d;
        s2[j] += d * d;
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      const double selected = kElementMask ? static_cast<double>(nsel[j]) : static_cast<double>(rows_selected);
      nonfinite[j] += selected - static_cast<double>(cnt[j]);
      if (cnt[j] == acc_t(0)) continue;
      Moments block = moments_from_shifted_sums(cnt[j], shift[j], s1[j], s2[j]);
      if (!is_finite(block.mean) || !is_finite(block.m2)) {
        block = block_column_moments_fp64<scalar_t>(t, b0, b1, j);
      }
      moments[j] = merge_moments(moments[j], block);
    }
  }
}

template <typename scalar_t>
void reduce_tile(const Tile& t, Moments* moments, double* nonfinite) {
  if (has_element_mask(t)) {
    reduce_tile_impl<scalar_t, true>(t, moments, nonfinite);
  } else {
    reduce_tile_impl<scalar_t, false>(t, moments, nonfinite);
  }
}

template <typename scalar_t, bool kDiag, bool kElementMask>
void normalize_tile_impl(const Tile& t, const double* mean, const double* inv_std, double clip,
                         double* clipped, double* max_abs_z) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.col_end - t.col_begin;
  // mean = mean_hi + mean_lo in acc_t: (x - mean_hi) is exact for x near the mean (Sterbenz), so
  // z keeps acc_t precision even when |mean| >> std.
  acc_t mean_hi[kTileCols], mean_lo[kTileCols], scale[kTileCols], sel[kTileCols];
  acc_t n_clipped[kTileCols], max_abs[kTileCols];
  int32_t mask_col[kTileCols];
  fill_mask_columns(t, mask_col);
  for (int64_t j = 0; j < width; ++j) {
    const double m = mean[t.col_begin + j];
    mean_hi[j] = static_cast<acc_t>(m);
    mean_lo[j] = static_cast<acc_t>(m - static_cast<double>(mean_hi[j]));
    scale[j] = static_cast<acc_t>(inv_std[t.col_begin + j]);
    n_clipped[j] = max_abs[j] = acc_t(0);
  }
  const acc_t hi = static_cast<acc_t>(clip), lo = -hi;
  // Rows in reverse order: the reduce pass touched the tile's last rows most recently.
  for (int64_t r = t.row_end - 1; r >= t.row_begin; --r) {
    const scalar_t* __restrict__ x = static_cast<const scalar_t*>(t.x) + r * t.x_row_stride + t.col_begin;
    scalar_t* __restrict__ y = static_cast<scalar_t*>(t.out) + r * t.out_row_stride + t.col_begin;
    if (kDiag && select_row(t, r, mask_col, sel)) {
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = static_cast<acc_t>(x[j]);
        const acc_t z = ((v - mean_hi[j]) - mean_lo[j]) * scale[j];
        y[j] = static_cast<scalar_t>(clamp_keep_nan(z, lo, hi));
        const bool ok = kElementMask ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
        const acc_t a = ok ? (z < acc_t(0) ? -z : z) : acc_t(0);
        n_clipped[j] += a > hi ? acc_t(1) : acc_t(0);
        max_abs[j] = a > max_abs[j] ? a : max_abs[j];
      }
    } else {
      for (int64_t j = 0; j < width; ++j) {
        const acc_t v = static_cast<acc_t>(x[j]);
        const acc_t z = ((v - mean_hi[j]) - mean_lo[j]) * scale[j];
        y[j] = static_cast<scalar_t>(clamp_keep_nan(z, lo, hi));
      }
    }
  }
  if (kDiag) {
    for (int64_t j = 0; j < width; ++j) {
      clipped[j] += static_cast<double>(n_clipped[j]);
      max_abs_z[j] = static_cast<double>(max_abs[j]) > max_abs_z[j] ? static_cast<double>(max_abs[j]) : max_abs_z[j];
    }
  }
}

template <typename scalar_t>
void normalize_tile(const Tile& t, const double* mean, const double* inv_std, double clip, double* clipped,
                    double* max_abs_z) {
  if (clipped == nullptr) {
    normalize_tile_impl<scalar_t, false, false>(t, mean, inv_std, clip, clipped, max_abs_z);
  } else if (has_element_mask(t)) {
    normalize_tile_impl<scalar_t, true, true>(t, mean, inv_std, clip, clipped, max_abs_z);
  } else {
    normalize_tile_impl<scalar_t, true, false>(t, mean, inv_std, clip, clipped, max_abs_z);
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
