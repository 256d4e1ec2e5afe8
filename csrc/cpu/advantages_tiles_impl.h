// The per-tile CPU kernels of normalize_advantages. Included by one .cpp per instruction set, each
// of which defines FASTNORM_CPU_ISA (the namespace) and may set a target before including it.
//
// Inner loops run over the contiguous columns of 1 or 4 rows with per-column accumulators, so the
// compiler vectorizes them (#pragma GCC ivdep: the scratch arrays never alias x or y). Blocks of
// rows are reduced with the corrected two-pass algorithm (running_norm_math.h) while in cache and
// merged per column in float64.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <limits>

#include "advantages_tiles.h"

namespace fastnorm {
namespace cpu {
namespace adv {
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

// Whether the mask selects all (1), none (0) or some (-1) of the `width` entries from flat index k.
inline int mask_cover(const Data& d, int64_t k, int64_t width) {
  if (d.mask == nullptr) return 1;
  const int64_t q = k / d.mask_group;
  if (q != (k + width - 1) / d.mask_group) return -1;
  return d.mask[q] ? 1 : 0;
}

// sel[j] = 1 where the mask selects flat index k + j (j < width), else 0.
template <typename acc_t>
inline void fill_selection(const Data& d, int64_t k, int64_t width, acc_t* __restrict__ sel) {
  const int64_t group = d.mask_group;
  if (group == 1) {
    const bool* __restrict__ m = d.mask + k;
    for (int64_t j = 0; j < width; ++j) sel[j] = m[j] ? acc_t(1) : acc_t(0);
    return;
  }
  int64_t q = k / group;
  int64_t next = (q + 1) * group - k;  // the column where mask entry q + 1 starts
  for (int64_t j = 0; j < width; ++q, next += group) {
    const acc_t v = d.mask[q] ? acc_t(1) : acc_t(0);
    const int64_t stop = next < width ? next : width;
    for (; j < stop; ++j) sel[j] = v;
  }
}

// Per-column sums of one block of rows; moments_from_shifted_sums turns them into moments. Pass 1
// sums in float64 (`sum`): for float32 data a block's sum is then exact, so the shift is the float
// nearest the block mean and a constant block gets exactly its value (variance 0, not rounding
// noise). min and max run over the whole tile; block_min and block_max are scratch.
template <typename acc_t>
struct BlockSums {
  acc_t *cnt, *shift, *s1, *s2, *min, *max, *block_min, *block_max;
  double* sum;
};

// Fast path: n rows, all of whose entries are selected. Pass 1 sums without testing each value:
// a column's sum is finite only if all its values are, which one check per block confirms.
// Returns false when a value is NaN or inf (the caller then takes the careful path).
template <typename scalar_t, typename acc_t>
bool block_sums_if_finite(const scalar_t* const* rows, int64_t n, int64_t width, const BlockSums<acc_t>& b) {
  double* __restrict__ sum = b.sum;
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ block_min = b.block_min;
  acc_t* __restrict__ block_max = b.block_max;
  for (int64_t j = 0; j < width; ++j) {
    sum[j] = 0.0;
    s1[j] = s2[j] = acc_t(0);
    block_min[j] = b.min[j];
    block_max[j] = b.max[j];
  }
  int64_t u = 0;
  for (; u + 4 <= n; u += 4) {
    const scalar_t *__restrict__ x0 = rows[u], *__restrict__ x1 = rows[u + 1];
    const scalar_t *__restrict__ x2 = rows[u + 2], *__restrict__ x3 = rows[u + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v0 = static_cast<acc_t>(x0[j]), v1 = static_cast<acc_t>(x1[j]);
      const acc_t v2 = static_cast<acc_t>(x2[j]), v3 = static_cast<acc_t>(x3[j]);
      sum[j] += (static_cast<double>(v0) + static_cast<double>(v1)) +
                (static_cast<double>(v2) + static_cast<double>(v3));
      block_min[j] = min_of(block_min[j], min_of(min_of(v0, v1), min_of(v2, v3)));
      block_max[j] = max_of(block_max[j], max_of(max_of(v0, v1), max_of(v2, v3)));
    }
  }
  for (; u < n; ++u) {
    const scalar_t* __restrict__ x0 = rows[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x0[j]);
      sum[j] += static_cast<double>(v);
      block_min[j] = min_of(block_min[j], v);
      block_max[j] = max_of(block_max[j], v);
    }
  }
  double probe = 0;  // 0 if every sum is finite, else NaN
  for (int64_t j = 0; j < width; ++j) probe += sum[j] - sum[j];
  if (!is_finite(probe)) return false;
  const double count = static_cast<double>(n);
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = block_min[j];
    b.max[j] = block_max[j];
    shift[j] = static_cast<acc_t>(sum[j] / count);
    b.cnt[j] = static_cast<acc_t>(n);
  }
  // Pass 2 (the block is still in cache): shifted sums.
  for (u = 0; u + 4 <= n; u += 4) {
    const scalar_t *__restrict__ x0 = rows[u], *__restrict__ x1 = rows[u + 1];
    const scalar_t *__restrict__ x2 = rows[u + 2], *__restrict__ x3 = rows[u + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t m = shift[j];
      const acc_t d0 = static_cast<acc_t>(x0[j]) - m, d1 = static_cast<acc_t>(x1[j]) - m;
      const acc_t d2 = static_cast<acc_t>(x2[j]) - m, d3 = static_cast<acc_t>(x3[j]) - m;
      s1[j] += (d0 + d1) + (d2 + d3);
      s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; u < n; ++u) {
    const scalar_t* __restrict__ x0 = rows[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t d = static_cast<acc_t>(x0[j]) - shift[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  return true;
}

// Careful path: tests every value (finite, and selected when kSelect). row_first[u] is the flat
// index of row u's first entry.
template <typename scalar_t, typename acc_t, bool kSelect>
void block_sums_careful(const Data& d, const scalar_t* const* rows, const int64_t* row_first, int64_t n,
                        int64_t width, acc_t* __restrict__ sel, const BlockSums<acc_t>& b) {
  double* __restrict__ sum = b.sum;
  acc_t* __restrict__ cnt = b.cnt;
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ col_min = b.min;
  acc_t* __restrict__ col_max = b.max;
  for (int64_t j = 0; j < width; ++j) {
    sum[j] = 0.0;
    cnt[j] = s1[j] = s2[j] = acc_t(0);
  }
  for (int64_t u = 0; u < n; ++u) {
    if (kSelect) fill_selection(d, row_first[u], width, sel);
    const scalar_t* __restrict__ x = rows[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      const bool ok = kSelect ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
      sum[j] += ok ? static_cast<double>(v) : 0.0;
      cnt[j] += ok ? acc_t(1) : acc_t(0);
      col_min[j] = ok ? min_of(col_min[j], v) : col_min[j];
      col_max[j] = ok ? max_of(col_max[j], v) : col_max[j];
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    shift[j] = static_cast<acc_t>(sum[j] / static_cast<double>(cnt[j] > acc_t(1) ? cnt[j] : acc_t(1)));
  }
  for (int64_t u = 0; u < n; ++u) {
    if (kSelect) fill_selection(d, row_first[u], width, sel);
    const scalar_t* __restrict__ x = rows[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = static_cast<acc_t>(x[j]);
      const bool ok = kSelect ? (sel[j] != acc_t(0) && is_finite(v)) : is_finite(v);
      const acc_t dev = ok ? v - shift[j] : acc_t(0);
      s1[j] += dev;
      s2[j] += dev * dev;
    }
  }
}

// Exact two-pass moments of column j of a block in double: the fallback where acc_t overflowed
// (float32 deviations beyond ~1e19).
template <typename scalar_t>
Moments column_moments_fp64(const Data& d, const scalar_t* const* rows, const int64_t* row_first, int64_t n,
                            int64_t j) {
  auto valid = [&](int64_t u, double v) {
    return is_finite(v) && (d.mask == nullptr || d.mask[(row_first[u] + j) / d.mask_group]);
  };
  double count = 0, sum = 0;
  for (int64_t u = 0; u < n; ++u) {
    const double v = static_cast<double>(rows[u][j]);
    if (valid(u, v)) {
      count += 1;
      sum += v;
    }
  }
  const double mean = count > 0 ? sum / count : 0.0;
  double s1 = 0, s2 = 0;
  for (int64_t u = 0; u < n; ++u) {
    const double v = static_cast<double>(rows[u][j]);
    if (valid(u, v)) {
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  return moments_from_shifted_sums(count, mean, s1, s2);
}

template <typename scalar_t>
void reduce_tile(const Data& d, const Tile& t, const ColumnPartials& out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.cols;
  acc_t* a = thread_scratch<acc_t, kReduceAccSlot>(9 * width);
  const BlockSums<acc_t> b{a, a + width, a + 2 * width, a + 3 * width, a + 4 * width, a + 5 * width,
                           a + 6 * width, a + 7 * width, thread_scratch<double, kReduceF64Slot>(6 * width)};
  acc_t* sel = a + 8 * width;
  double* __restrict__ tile_n = b.sum + width;
  double* __restrict__ tile_mean = b.sum + 2 * width;
  double* __restrict__ tile_m2 = b.sum + 3 * width;
  double* __restrict__ block_mean = b.sum + 4 * width;
  double* __restrict__ block_m2 = b.sum + 5 * width;
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = std::numeric_limits<acc_t>::infinity();
    b.max[j] = -std::numeric_limits<acc_t>::infinity();
    tile_n[j] = tile_mean[j] = tile_m2[j] = 0.0;
  }
  const scalar_t** rows = thread_scratch<const scalar_t*, kReduceRowsSlot>(kMaxBlockRows);
  int64_t* row_first = thread_scratch<int64_t, kReduceRowsSlot>(kMaxBlockRows);
  const scalar_t* x = static_cast<const scalar_t*>(d.x);

  // Rows [r0, r1) of `w` columns: their selected rows' moments, merged into the tile's.
  auto reduce_block = [&](int64_t r0, int64_t r1, int64_t w) {
    int64_t n = 0;
    bool partly_selected = false;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t k = t.first + r * t.row_stride;
      const int cover = mask_cover(d, k, w);
      if (cover == 0) continue;
      partly_selected |= cover < 0;
      row_first[n] = k;
      rows[n++] = x + k;
    }
    if (n == 0) return;
    if (partly_selected) {
      block_sums_careful<scalar_t, acc_t, true>(d, rows, row_first, n, w, sel, b);
    } else if (!block_sums_if_finite(rows, n, w, b)) {
      block_sums_careful<scalar_t, acc_t, false>(d, rows, row_first, n, w, sel, b);
    }
    double probe = 0.0;  // NaN or inf only where acc_t overflowed
    for (int64_t j = 0; j < w; ++j) {
      const Moments m = moments_from_shifted_sums(b.cnt[j], b.shift[j], b.s1[j], b.s2[j]);
      block_mean[j] = m.mean;
      block_m2[j] = m.m2;
      probe += m.mean + m.m2;
    }
    if (!is_finite(probe)) {
      for (int64_t j = 0; j < w; ++j) {
        if (is_finite(block_mean[j]) && is_finite(block_m2[j])) continue;
        const Moments m = column_moments_fp64(d, rows, row_first, n, j);
        block_mean[j] = m.mean;
        block_m2[j] = m.m2;
      }
    }
    for (int64_t j = 0; j < w; ++j) {
      const Moments m = merge_moments({tile_n[j], tile_mean[j], tile_m2[j]},
                                      {static_cast<double>(b.cnt[j]), block_mean[j], block_m2[j]});
      tile_n[j] = m.count;
      tile_mean[j] = m.mean;
      tile_m2[j] = m.m2;
    }
  };

  int64_t rows_per_block = kBlockElems / (width > 0 ? width : 1);
  rows_per_block = rows_per_block < 1 ? 1 : (rows_per_block > kMaxBlockRows ? kMaxBlockRows : rows_per_block);
  for (int64_t r0 = 0; r0 < t.rows; r0 += rows_per_block) {
    reduce_block(r0, r0 + rows_per_block < t.rows ? r0 + rows_per_block : t.rows, width);
  }
  if (t.tail_cols > 0) reduce_block(t.rows, t.rows + 1, t.tail_cols);
  for (int64_t j = 0; j < width; ++j) {
    out.moments[j] = Moments{tile_n[j], tile_mean[j], tile_m2[j]};
    out.min[j] = static_cast<double>(b.min[j]);
    out.max[j] = static_cast<double>(b.max[j]);
  }
}

// y for `w` columns of one row. mean = mean_hi + mean_lo: (x - mean_hi) is exact for x near the
// mean (Sterbenz), so y keeps acc_t precision even when |mean| >> std.
template <typename scalar_t, typename acc_t, bool kLive>
inline void normalize_row(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t w,
                          const acc_t* __restrict__ mean_hi, const acc_t* __restrict__ mean_lo,
                          const acc_t* __restrict__ scale, const acc_t* __restrict__ live) {
#pragma GCC ivdep
  for (int64_t j = 0; j < w; ++j) {
    const acc_t z = ((static_cast<acc_t>(x[j]) - mean_hi[j]) - mean_lo[j]) * scale[j];
    y[j] = static_cast<scalar_t>(kLive ? (live[j] != acc_t(0) ? z : acc_t(0)) : z);
  }
}

template <typename scalar_t>
void normalize_tile(const Data& d, const Tile& t, const Coefficients& k) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.cols;
  acc_t* buf = thread_scratch<acc_t, kNormalizeSlot>(4 * width);
  acc_t *mean_hi = buf, *mean_lo = buf + width, *scale = buf + 2 * width, *live = buf + 3 * width;
  for (int64_t j = 0; j < width; ++j) {
    const double m = k.mean[j * k.stride];
    mean_hi[j] = static_cast<acc_t>(m);
    mean_lo[j] = static_cast<acc_t>(m - static_cast<double>(mean_hi[j]));
    scale[j] = static_cast<acc_t>(k.scale[j * k.stride]);
    live[j] = k.live ? static_cast<acc_t>(k.live[j * k.stride]) : acc_t(1);
  }
  const scalar_t* x = static_cast<const scalar_t*>(d.x);
  scalar_t* y = static_cast<scalar_t*>(d.out);
  for (int64_t r = 0; r <= t.rows; ++r) {
    const int64_t w = r < t.rows ? width : t.tail_cols;
    const int64_t first = t.first + r * t.row_stride;
    if (k.live) {
      normalize_row<scalar_t, acc_t, true>(x + first, y + first, w, mean_hi, mean_lo, scale, live);
    } else {
      normalize_row<scalar_t, acc_t, false>(x + first, y + first, w, mean_hi, mean_lo, scale, live);
    }
  }
}

inline const Kernels& make_kernels() {
  static const Kernels kernels = {
      {&reduce_tile<c10::Half>, &reduce_tile<c10::BFloat16>, &reduce_tile<float>, &reduce_tile<double>},
      {&normalize_tile<c10::Half>, &normalize_tile<c10::BFloat16>, &normalize_tile<float>,
       &normalize_tile<double>},
  };
  return kernels;
}

}  // namespace FASTNORM_CPU_ISA
}  // namespace adv
}  // namespace cpu
}  // namespace fastnorm
