// What the tile kernels of every op share, per instruction set: the accumulation types and their
// conversions, and the per-column moments of a block of rows (the corrected two-pass algorithm of
// running_norm_math.h). Included by the *_impl.h kernel headers, after the including .cpp has
// defined FASTNORM_CPU_ISA (the namespace) and set its target; every .cpp of one ISA must set the
// same target and FASTNORM_CPU_F16C, as these inline functions are shared between them.
//
// A block is `n` rows ("units") of `width` contiguous columns, given as row pointers; inner loops
// run over the columns with per-column accumulators, so the compiler vectorizes them (#pragma GCC
// ivdep: the scratch arrays never alias x).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <cstring>
#include <limits>

#include "../running_norm_math.h"

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

// Conversions between the storage type and acc_t in the hot loops. c10's are scalar code; these
// vectorize (bfloat16: a 16-bit shift each way, rounding to nearest even and NaN to 0x7FC0 as c10
// does) or use the F16C instructions (float16, in builds that define FASTNORM_CPU_F16C).
template <typename acc_t, typename scalar_t>
inline acc_t to_acc(scalar_t v) {
  return static_cast<acc_t>(v);
}
template <typename scalar_t, typename acc_t>
inline scalar_t from_acc(acc_t v) {
  return static_cast<scalar_t>(v);
}
template <>
inline float to_acc<float, c10::BFloat16>(c10::BFloat16 v) {
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
template <>
inline c10::BFloat16 from_acc<c10::BFloat16, float>(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return c10::BFloat16(static_cast<uint16_t>(f != f ? 0x7FC0u : rounded), c10::BFloat16::from_bits());
}
#ifdef FASTNORM_CPU_F16C
template <>
inline float to_acc<float, c10::Half>(c10::Half v) {
  _Float16 h;
  std::memcpy(&h, &v.x, sizeof h);
  return static_cast<float>(h);
}
template <>
inline c10::Half from_acc<c10::Half, float>(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t bits;
  std::memcpy(&bits, &h, sizeof bits);
  return c10::Half(bits, c10::Half::from_bits());
}
#endif

// min and max for values that are not NaN (one instruction each, unlike fmin/fmax).
template <typename T>
inline T min_of(T a, T b) {
  return a < b ? a : b;
}
template <typename T>
inline T max_of(T a, T b) {
  return a > b ? a : b;
}

// Per-column sums of one block; moments_from_shifted_sums turns them into moments. Pass 1 sums in
// float64 (`sum`), so the shift is close to the block mean and a constant block gets exactly its
// value (variance 0, not rounding noise). min and max run over every block of a tile: the caller
// sets them to +inf and -inf before its first block.
template <typename acc_t>
struct BlockSums {
  acc_t *cnt, *nsel, *shift, *s1, *s2, *min, *max;
  double* sum;
};

// Fast path: n units, all of whose entries are selected. Pass 1 sums without testing each value:
// a column's sum is finite only if all its values are, which one check per block confirms.
// Returns false when a value is NaN or inf (the caller then takes the careful path).
template <typename scalar_t, typename acc_t>
bool block_sums_if_finite(const scalar_t* const* units, int64_t n, int64_t width, const BlockSums<acc_t>& b) {
  double* __restrict__ sum = b.sum;
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ block_min = b.nsel;  // scratch: nsel is not needed on this path
  acc_t* __restrict__ block_max = b.cnt;
  for (int64_t j = 0; j < width; ++j) {
    sum[j] = 0.0;
    s1[j] = s2[j] = acc_t(0);
    block_min[j] = b.min[j];
    block_max[j] = b.max[j];
  }
  int64_t u = 0;
  for (; u + 4 <= n; u += 4) {
    const scalar_t *__restrict__ x0 = units[u], *__restrict__ x1 = units[u + 1];
    const scalar_t *__restrict__ x2 = units[u + 2], *__restrict__ x3 = units[u + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v0 = to_acc<acc_t>(x0[j]), v1 = to_acc<acc_t>(x1[j]);
      const acc_t v2 = to_acc<acc_t>(x2[j]), v3 = to_acc<acc_t>(x3[j]);
      sum[j] += static_cast<double>((v0 + v1) + (v2 + v3));  // exact for equal values (doublings)
      block_min[j] = min_of(block_min[j], min_of(min_of(v0, v1), min_of(v2, v3)));
      block_max[j] = max_of(block_max[j], max_of(max_of(v0, v1), max_of(v2, v3)));
    }
  }
  for (; u < n; ++u) {
    const scalar_t* __restrict__ x0 = units[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = to_acc<acc_t>(x0[j]);
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
    const scalar_t *__restrict__ x0 = units[u], *__restrict__ x1 = units[u + 1];
    const scalar_t *__restrict__ x2 = units[u + 2], *__restrict__ x3 = units[u + 3];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t m = shift[j];
      const acc_t d0 = to_acc<acc_t>(x0[j]) - m, d1 = to_acc<acc_t>(x1[j]) - m;
      const acc_t d2 = to_acc<acc_t>(x2[j]) - m, d3 = to_acc<acc_t>(x3[j]) - m;
      s1[j] += (d0 + d1) + (d2 + d3);
      s2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
    }
  }
  for (; u < n; ++u) {
    const scalar_t* __restrict__ x0 = units[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t d = to_acc<acc_t>(x0[j]) - shift[j];
      s1[j] += d;
      s2[j] += d * d;
    }
  }
  return true;
}

// Fast path with a given shift per column (the running mean), all entries selected: one pass over
// the block, S1 = sum (x - shift) and S2 = sum (x - shift)^2, 8 rows at a time so that each
// per-column accumulator is loaded and stored once per 8 rows. Valid where the shift is near the
// column's mean (S1^2 <= S2 n / 2: then M2 = S2 - S1^2/n >= S2/2 loses at most a bit to
// cancellation); a column beyond that is summed again in two passes. Returns false, changing
// nothing the caller reads, if a value is NaN or inf: the caller then takes the careful path.
template <typename scalar_t, typename acc_t>
bool block_sums_shifted_if_finite(const scalar_t* const* units, int64_t n, int64_t width,
                                  const acc_t* __restrict__ shift, const BlockSums<acc_t>& b) {
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ lo = b.nsel;  // scratch: nsel and cnt are not needed on this path
  acc_t* __restrict__ hi = b.cnt;
  for (int64_t j = 0; j < width; ++j) {
    s1[j] = s2[j] = acc_t(0);
    lo[j] = b.min[j];
    hi[j] = b.max[j];
  }
  int64_t u = 0;
  for (; u + 8 <= n; u += 8) {
    const scalar_t* const* x = units + u;
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t m = shift[j];
      acc_t v[8], d[8];
#pragma GCC unroll 8
      for (int k = 0; k < 8; ++k) {
        v[k] = to_acc<acc_t>(x[k][j]);
        d[k] = v[k] - m;
      }
      s1[j] += ((d[0] + d[1]) + (d[2] + d[3])) + ((d[4] + d[5]) + (d[6] + d[7]));
      s2[j] += ((d[0] * d[0] + d[1] * d[1]) + (d[2] * d[2] + d[3] * d[3])) +
               ((d[4] * d[4] + d[5] * d[5]) + (d[6] * d[6] + d[7] * d[7]));
      lo[j] = min_of(lo[j], min_of(min_of(min_of(v[0], v[1]), min_of(v[2], v[3])),
                                   min_of(min_of(v[4], v[5]), min_of(v[6], v[7]))));
      hi[j] = max_of(hi[j], max_of(max_of(max_of(v[0], v[1]), max_of(v[2], v[3])),
                                   max_of(max_of(v[4], v[5]), max_of(v[6], v[7]))));
    }
  }
  for (; u < n; ++u) {
    const scalar_t* __restrict__ x0 = units[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = to_acc<acc_t>(x0[j]);
      const acc_t d = v - shift[j];
      s1[j] += d;
      s2[j] += d * d;
      lo[j] = min_of(lo[j], v);
      hi[j] = max_of(hi[j], v);
    }
  }
  double probe = 0.0;  // S2 finite: every value was (and S1 then is); NaN or inf otherwise
  for (int64_t j = 0; j < width; ++j) probe += static_cast<double>(s2[j]) - static_cast<double>(s2[j]);
  if (!is_finite(probe)) return false;
  const acc_t half_n = static_cast<acc_t>(0.5 * static_cast<double>(n));
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = lo[j];
    b.max[j] = hi[j];
    b.cnt[j] = static_cast<acc_t>(n);
    b.shift[j] = shift[j];
    if (s1[j] * s1[j] <= half_n * s2[j]) continue;
    // This column's shift is too far from its mean: two passes over its n values, about their
    // mean (a column, not the block: with few rows per block some column always fails by chance).
    double sum = 0.0;
    for (int64_t u = 0; u < n; ++u) sum += static_cast<double>(to_acc<acc_t>(units[u][j]));
    const acc_t mean = static_cast<acc_t>(sum / static_cast<double>(n));
    acc_t a1 = 0, a2 = 0;
    for (int64_t u = 0; u < n; ++u) {
      const acc_t d = to_acc<acc_t>(units[u][j]) - mean;
      a1 += d;
      a2 += d * d;
    }
    s1[j] = a1;
    s2[j] = a2;
    b.shift[j] = mean;
  }
  return true;
}

// Careful path: tests every value (finite, and selected when kSelect: select(u, sel) fills sel[j]
// with 1 or 0 for column j of unit u), counting the selected entries per column in nsel.
template <typename scalar_t, typename acc_t, bool kSelect, typename Select>
void block_sums_careful(const scalar_t* const* units, int64_t n, int64_t width, Select select,
                        acc_t* __restrict__ sel, const BlockSums<acc_t>& b) {
  double* __restrict__ sum = b.sum;
  acc_t* __restrict__ cnt = b.cnt;
  acc_t* __restrict__ nsel = b.nsel;
  acc_t* __restrict__ shift = b.shift;
  acc_t* __restrict__ s1 = b.s1;
  acc_t* __restrict__ s2 = b.s2;
  acc_t* __restrict__ col_min = b.min;
  acc_t* __restrict__ col_max = b.max;
  for (int64_t j = 0; j < width; ++j) {
    sum[j] = 0.0;
    cnt[j] = nsel[j] = s1[j] = s2[j] = acc_t(0);
  }
  for (int64_t u = 0; u < n; ++u) {
    if (kSelect) select(u, sel);
    const scalar_t* __restrict__ x = units[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = to_acc<acc_t>(x[j]);
      const bool ok = (kSelect ? sel[j] != acc_t(0) : true) & is_finite(v);
      sum[j] += ok ? static_cast<double>(v) : 0.0;
      cnt[j] += ok ? acc_t(1) : acc_t(0);
      nsel[j] += kSelect ? sel[j] : acc_t(1);
      col_min[j] = ok ? min_of(col_min[j], v) : col_min[j];
      col_max[j] = ok ? max_of(col_max[j], v) : col_max[j];
    }
  }
  for (int64_t j = 0; j < width; ++j) {
    shift[j] = static_cast<acc_t>(sum[j] / static_cast<double>(cnt[j] > acc_t(1) ? cnt[j] : acc_t(1)));
  }
  for (int64_t u = 0; u < n; ++u) {
    if (kSelect) select(u, sel);
    const scalar_t* __restrict__ x = units[u];
#pragma GCC ivdep
    for (int64_t j = 0; j < width; ++j) {
      const acc_t v = to_acc<acc_t>(x[j]);
      const bool ok = (kSelect ? sel[j] != acc_t(0) : true) & is_finite(v);
      const acc_t d = ok ? v - shift[j] : acc_t(0);
      s1[j] += d;
      s2[j] += d * d;
    }
  }
}

// Running float64 moments per column (n, mean, m2), and the scratch of one block's moments.
struct ColumnMoments {
  double *n, *mean, *m2, *block_mean, *block_m2;
};

// Merges the block whose sums are b into `into`. Where acc_t overflowed (float32 deviations
// beyond ~1e19), the column's block moments are recomputed exactly in double, over the entries v
// of unit u, column j for which counts(u, j, v) (selected and finite).
template <typename scalar_t, typename acc_t, typename Counts>
void merge_block(const scalar_t* const* units, int64_t n, int64_t width, const BlockSums<acc_t>& b,
                 const ColumnMoments& into, Counts counts) {
  double probe = 0.0;  // NaN or inf only where acc_t overflowed
  for (int64_t j = 0; j < width; ++j) {
    const Moments m = moments_from_shifted_sums(b.cnt[j], b.shift[j], b.s1[j], b.s2[j]);
    into.block_mean[j] = m.mean;
    into.block_m2[j] = m.m2;
    probe += m.mean + m.m2;
  }
  if (!is_finite(probe)) {
    for (int64_t j = 0; j < width; ++j) {
      if (is_finite(into.block_mean[j]) && is_finite(into.block_m2[j])) continue;
      double count = 0, sum = 0;
      for (int64_t u = 0; u < n; ++u) {
        const double v = static_cast<double>(units[u][j]);
        if (counts(u, j, v)) {
          count += 1;
          sum += v;
        }
      }
      const double mean = count > 0 ? sum / count : 0.0;
      double s1 = 0, s2 = 0;
      for (int64_t u = 0; u < n; ++u) {
        const double v = static_cast<double>(units[u][j]);
        if (counts(u, j, v)) {
          s1 += v - mean;
          s2 += (v - mean) * (v - mean);
        }
      }
      const Moments m = moments_from_shifted_sums(count, mean, s1, s2);
      into.block_mean[j] = m.mean;
      into.block_m2[j] = m.m2;
    }
  }
  double* __restrict__ tile_n = into.n;
  double* __restrict__ tile_mean = into.mean;
  double* __restrict__ tile_m2 = into.m2;
  for (int64_t j = 0; j < width; ++j) {
    const Moments m = merge_moments({tile_n[j], tile_mean[j], tile_m2[j]},
                                    {static_cast<double>(b.cnt[j]), into.block_mean[j], into.block_m2[j]});
    tile_n[j] = m.count;
    tile_mean[j] = m.mean;
    tile_m2[j] = m.m2;
  }
}

}  // namespace FASTNORM_CPU_ISA
}  // namespace cpu
}  // namespace fastnorm
