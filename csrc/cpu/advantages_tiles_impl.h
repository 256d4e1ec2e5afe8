// The per-chunk and per-tile CPU kernels of normalize_advantages. Included by one .cpp per
// instruction set, each of which defines FASTNORM_CPU_ISA (the namespace) and may set a target
// before including it.
//
// Every reduction works on blocks small enough to stay in cache, with the corrected two-pass
// algorithm (running_norm_math.h), and merges the blocks' moments in float64. Runs keep their
// accumulators in lanes held in registers; column tiles loop over the contiguous columns of 1 or
// 4 rows with per-column accumulators, so the compiler vectorizes them (#pragma GCC ivdep: the
// scratch arrays never alias x or y).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <stdint.h>

#include <cstring>
#include <limits>

#include "advantages_tiles.h"
#include "block_moments_impl.h"

namespace fastnorm {
namespace cpu {
namespace adv {
namespace FASTNORM_CPU_ISA {

using namespace ::fastnorm::cpu::FASTNORM_CPU_ISA;  // Acc, to_acc, from_acc, min_of, max_of, block sums

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

// ---- Runs: chunks whose entries follow a repeating pattern of group slots (Pattern), reduced in
// kLanes lanes (four AVX2 registers) kept in registers. Lane l of a block holds the entries i with
// i % kLanes == l, all in slot pattern.slot(l) as the period divides the lane count.

template <typename acc_t>
constexpr int64_t kLanes = 128 / sizeof(acc_t);
// A block is 128 entries per lane (16 KiB): float32 lane sums stay accurate to ~1e-6, and pass 2
// reads the block from L1.
template <typename acc_t>
constexpr int64_t kRunBlock = 128 * kLanes<acc_t>;

// The lanes of each slot and each lane's slot (computed once per chunk: divisions are not cheap):
// slot k holds lanes k * inner + j + m * period for j < inner.
struct LaneSlots {
  int64_t period, inner, count;
  int64_t of[kLanes<float>];

  explicit LaneSlots(const Pattern& p) : period(p.period), inner(p.inner), count(p.slots()) {
    for (int64_t l = 0; l < kLanes<float>; ++l) of[l] = p.slot(l);
  }
};

// A block's pass-1 results per slot, and the shift they give each slot: with one shift per slot,
// the shifted sums of the slot's lanes simply add up. A constant slot is exact: its shift is its
// value, every deviation 0. Slots are summed lane by lane into registers (accumulating into
// arrays indexed by slot would chain every addition through memory).
template <typename acc_t>
struct SlotSums {
  double count[kMaxSlots];
  acc_t lo[kMaxSlots], hi[kMaxSlots], shift[kMaxSlots];
};

// cnt == nullptr: lane l holds `base` entries, plus one when l < extra.
template <typename acc_t, int64_t L>
void slot_shifts(const LaneSlots& p, const acc_t* cnt, int64_t base, int64_t extra, const acc_t* sum,
                 const acc_t* lo, const acc_t* hi, SlotSums<acc_t>& s, acc_t* lane_shift) {
  for (int64_t k = 0; k < p.count; ++k) {
    double count = 0, total = 0;
    acc_t mn = std::numeric_limits<acc_t>::infinity(), mx = -mn;
    for (int64_t l0 = k * p.inner; l0 < (k + 1) * p.inner; ++l0) {
      for (int64_t l = l0; l < L; l += p.period) {
        count += cnt ? static_cast<double>(cnt[l]) : static_cast<double>(base + (l < extra ? 1 : 0));
        total += static_cast<double>(sum[l]);
        mn = min_of(mn, lo[l]);
        mx = max_of(mx, hi[l]);
      }
    }
    s.count[k] = count;
    s.lo[k] = mn;
    s.hi[k] = mx;
    s.shift[k] = count == 0 ? acc_t(0) : (mn == mx ? mn : static_cast<acc_t>(total / count));
  }
  for (int64_t l = 0; l < L; ++l) lane_shift[l] = s.shift[p.of[l]];
}

template <typename acc_t, int64_t L>
void slot_moments(const LaneSlots& p, const SlotSums<acc_t>& s, const acc_t* s1, const acc_t* s2, Reduction* out) {
  for (int64_t k = 0; k < p.count; ++k) {
    double sum1 = 0, sum2 = 0;
    for (int64_t l0 = k * p.inner; l0 < (k + 1) * p.inner; ++l0) {
      for (int64_t l = l0; l < L; l += p.period) {
        sum1 += static_cast<double>(s1[l]);
        sum2 += static_cast<double>(s2[l]);
      }
    }
    out[k].moments = moments_from_shifted_sums(s.count[k], static_cast<double>(s.shift[k]), sum1, sum2);
    out[k].min = static_cast<double>(s.lo[k]);
    out[k].max = static_cast<double>(s.hi[k]);
  }
}

// Fast path: every entry selected, in L lanes (1 for blocks shorter than kLanes with one slot).
// Pass 1 sums without testing each value: the sum is finite only if every value is. Returns false
// when one is NaN or inf (the caller takes the careful path).
template <typename scalar_t, typename acc_t, int64_t L>
bool run_block_if_finite(const scalar_t* __restrict__ x, int64_t n, const LaneSlots& p, Reduction* out) {
  const int64_t full = n - n % L;
  acc_t sum[L], lo[L], hi[L];
  for (int64_t l = 0; l < L; ++l) {
    sum[l] = acc_t(0);
    lo[l] = std::numeric_limits<acc_t>::infinity();
    hi[l] = -std::numeric_limits<acc_t>::infinity();
  }
  for (int64_t i = 0; i < full; i += L) {
    for (int64_t l = 0; l < L; ++l) {
      const acc_t v = to_acc<acc_t>(x[i + l]);
      sum[l] += v;
      lo[l] = min_of(lo[l], v);
      hi[l] = max_of(hi[l], v);
    }
  }
  for (int64_t l = 0; l < n - full; ++l) {
    const acc_t v = to_acc<acc_t>(x[full + l]);
    sum[l] += v;
    lo[l] = min_of(lo[l], v);
    hi[l] = max_of(hi[l], v);
  }
  double total = 0;
  for (int64_t l = 0; l < L; ++l) total += static_cast<double>(sum[l]);
  if (!is_finite(total)) return false;
  acc_t shift[L];
  SlotSums<acc_t> slots{};
  slot_shifts<acc_t, L>(p, nullptr, full / L, n - full, sum, lo, hi, slots, shift);
  acc_t s1[L], s2[L];
  for (int64_t l = 0; l < L; ++l) s1[l] = s2[l] = acc_t(0);
  for (int64_t i = 0; i < full; i += L) {
    for (int64_t l = 0; l < L; ++l) {
      const acc_t d = to_acc<acc_t>(x[i + l]) - shift[l];
      s1[l] += d;
      s2[l] += d * d;
    }
  }
  for (int64_t l = 0; l < n - full; ++l) {
    const acc_t d = to_acc<acc_t>(x[full + l]) - shift[l];
    s1[l] += d;
    s2[l] += d * d;
  }
  slot_moments<acc_t, L>(p, slots, s1, s2, out);
  return true;
}

// A vector of 32 bytes of T (AVX2 registers; two SSE registers on the baseline ISA). The careful
// path of runs uses these GCC vectors directly: auto-vectorized, its selects became branches.
template <typename T>
struct Vec32 {
  typedef T type __attribute__((vector_size(32)));
};

// Careful path: tests every value (finite, and selected by sel when kSelect), in two vectors of
// lanes per accumulator (kCarefulLanes); the last n % kCarefulLanes entries go to lanes one by one.
template <typename scalar_t, typename acc_t, bool kSelect>
void run_block_careful(const scalar_t* __restrict__ x, int64_t n, const acc_t* __restrict__ sel, const LaneSlots& p,
                       Reduction* out) {
  using V = typename Vec32<acc_t>::type;
  constexpr int64_t W = 32 / sizeof(acc_t), L = 2 * W;
  const int64_t full = n - n % L;
  const V zero = {}, one = zero + acc_t(1), inf = zero + std::numeric_limits<acc_t>::infinity();
  V sum[2] = {zero, zero}, cnt[2] = {zero, zero}, lo[2] = {inf, inf}, hi[2] = {-inf, -inf};
  auto load = [&](int64_t i, V& v, V& ok) {  // W lanes from i < full
    V selected = one;
    for (int64_t l = 0; l < W; ++l) v[l] = to_acc<acc_t>(x[i + l]);
    if (kSelect) std::memcpy(&selected, sel + i, sizeof(V));
    ok = (selected != zero) & (v - v == zero) ? one : zero;
  };
  for (int64_t i = 0; i < full; i += L) {
    for (int64_t k = 0; k < 2; ++k) {
      V v, ok;
      load(i + k * W, v, ok);
      sum[k] += ok != zero ? v : zero;
      cnt[k] += ok;
      lo[k] = ok != zero && v < lo[k] ? v : lo[k];
      hi[k] = ok != zero && v > hi[k] ? v : hi[k];
    }
  }
  acc_t lane_sum[L], lane_cnt[L], lane_lo[L], lane_hi[L], shift[L], s1[L], s2[L];
  for (int64_t l = 0; l < L; ++l) {
    lane_sum[l] = sum[l / W][l % W];
    lane_cnt[l] = cnt[l / W][l % W];
    lane_lo[l] = lo[l / W][l % W];
    lane_hi[l] = hi[l / W][l % W];
  }
  auto counts = [&](int64_t i) {
    return (!kSelect || sel[i] != acc_t(0)) && is_finite(to_acc<acc_t>(x[i]));
  };
  for (int64_t i = full; i < n; ++i) {
    if (!counts(i)) continue;
    const acc_t v = to_acc<acc_t>(x[i]);
    const int64_t l = i - full;
    lane_sum[l] += v;
    lane_cnt[l] += acc_t(1);
    lane_lo[l] = min_of(lane_lo[l], v);
    lane_hi[l] = max_of(lane_hi[l], v);
  }
  SlotSums<acc_t> slots{};
  slot_shifts<acc_t, L>(p, lane_cnt, 0, 0, lane_sum, lane_lo, lane_hi, slots, shift);
  V shift_v[2], t1[2] = {zero, zero}, t2[2] = {zero, zero};
  for (int64_t l = 0; l < L; ++l) shift_v[l / W][l % W] = shift[l];
  for (int64_t i = 0; i < full; i += L) {
    for (int64_t k = 0; k < 2; ++k) {
      V v, ok;
      load(i + k * W, v, ok);
      const V d = ok != zero ? v - shift_v[k] : zero;
      t1[k] += d;
      t2[k] += d * d;
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    s1[l] = t1[l / W][l % W];
    s2[l] = t2[l / W][l % W];
  }
  for (int64_t i = full; i < n; ++i) {
    if (!counts(i)) continue;
    const acc_t d = to_acc<acc_t>(x[i]) - shift[i - full];
    s1[i - full] += d;
    s2[i - full] += d * d;
  }
  slot_moments<acc_t, L>(p, slots, s1, s2, out);
}

// Exact two-pass moments of one slot of a block in double: the fallback where acc_t overflowed
// (float32 deviations beyond ~1e19, sums beyond ~3e38).
template <typename scalar_t>
Moments run_moments_fp64(const Data& d, int64_t k, int64_t n, const Pattern& p, int64_t slot) {
  const scalar_t* x = static_cast<const scalar_t*>(d.x) + k;
  auto valid = [&](int64_t i, double v) {
    return p.slot(i) == slot && is_finite(v) && (d.mask == nullptr || d.mask[(k + i) / d.mask_group]);
  };
  double count = 0, sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (valid(i, v)) {
      count += 1;
      sum += v;
    }
  }
  const double mean = count > 0 ? sum / count : 0.0;
  double s1 = 0, s2 = 0;
  for (int64_t i = 0; i < n; ++i) {
    const double v = static_cast<double>(x[i]);
    if (valid(i, v)) {
      s1 += v - mean;
      s2 += (v - mean) * (v - mean);
    }
  }
  return moments_from_shifted_sums(count, mean, s1, s2);
}

template <typename scalar_t>
void reduce_run(const Data& d, int64_t first, int64_t n, const Pattern& p, Reduction* out) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int64_t B = kRunBlock<acc_t>;
  acc_t* sel = thread_scratch<acc_t, kReduceAccSlot>(B);
  const scalar_t* x = static_cast<const scalar_t*>(d.x);
  const LaneSlots lanes(p);
  for (int64_t k = 0; k < p.slots(); ++k) out[k] = Reduction{};
  for (int64_t b = 0; b < n; b += B) {
    const int64_t k = first + b, m = n - b < B ? n - b : B;
    const int cover = mask_cover(d, k, m);
    if (cover == 0) continue;
    Reduction block[kMaxSlots];
    if (cover < 0) {
      fill_selection(d, k, m, sel);
      run_block_careful<scalar_t, acc_t, true>(x + k, m, sel, lanes, block);
    } else if (!(m < kLanes<acc_t> && p.period == 1
                     ? run_block_if_finite<scalar_t, acc_t, 1>(x + k, m, lanes, block)
                     : run_block_if_finite<scalar_t, acc_t, kLanes<acc_t>>(x + k, m, lanes, block))) {
      run_block_careful<scalar_t, acc_t, false>(x + k, m, sel, lanes, block);
    }
    for (int64_t s = 0; s < p.slots(); ++s) {
      if (!is_finite(block[s].moments.mean + block[s].moments.m2)) {
        block[s].moments = run_moments_fp64<scalar_t>(d, k, m, p, s);
      }
      out[s].moments = merge_moments(out[s].moments, block[s].moments);
      out[s].min = min_of(out[s].min, block[s].min);
      out[s].max = max_of(out[s].max, block[s].max);
    }
  }
}

// y for a chunk, with per-lane coefficients. mean = hi + lo: (x - hi) is exact for x near the mean
// (Sterbenz), so y keeps acc_t precision even when |mean| >> std.
template <typename scalar_t, typename acc_t, bool kLive>
void normalize_lanes(const scalar_t* __restrict__ x, scalar_t* __restrict__ y, int64_t n, const acc_t* hi,
                     const acc_t* lo, const acc_t* scale, const acc_t* live) {
  constexpr int64_t L = kLanes<acc_t>;
  const int64_t full = n - n % L;
  for (int64_t i = 0; i < full; i += L) {
    for (int64_t l = 0; l < L; ++l) {
      const acc_t z = ((to_acc<acc_t>(x[i + l]) - hi[l]) - lo[l]) * scale[l];
      y[i + l] = from_acc<scalar_t>(kLive ? (live[l] != acc_t(0) ? z : acc_t(0)) : z);
    }
  }
  for (int64_t l = 0; l < n - full; ++l) {
    const acc_t z = ((to_acc<acc_t>(x[full + l]) - hi[l]) - lo[l]) * scale[l];
    y[full + l] = from_acc<scalar_t>(kLive ? (live[l] != acc_t(0) ? z : acc_t(0)) : z);
  }
}

template <typename scalar_t>
void normalize_run(const Data& d, int64_t first, int64_t n, const Pattern& p, const SlotCoefficients& k) {
  using acc_t = typename Acc<scalar_t>::type;
  constexpr int64_t L = kLanes<acc_t>;
  const LaneSlots lanes(p);
  acc_t hi[L], lo[L], scale[L], live[L];
  for (int64_t l = 0; l < L; ++l) {
    const int64_t s = lanes.of[l];
    hi[l] = static_cast<acc_t>(k.mean[s]);
    lo[l] = static_cast<acc_t>(k.mean[s] - static_cast<double>(hi[l]));
    scale[l] = static_cast<acc_t>(k.scale[s]);
    live[l] = k.live == nullptr || k.live[s] != 0.0 ? acc_t(1) : acc_t(0);
  }
  const scalar_t* x = static_cast<const scalar_t*>(d.x) + first;
  scalar_t* y = static_cast<scalar_t*>(d.out) + first;
  if (k.live == nullptr) {
    normalize_lanes<scalar_t, acc_t, false>(x, y, n, hi, lo, scale, live);
  } else {
    normalize_lanes<scalar_t, acc_t, true>(x, y, n, hi, lo, scale, live);
  }
}

// ---- Columns: per-column accumulators over rows (block_moments_impl.h).

template <typename scalar_t>
void reduce_tile(const Data& d, const Tile& t, const ColumnPartials& out) {
  using acc_t = typename Acc<scalar_t>::type;
  const int64_t width = t.cols;
  acc_t* a = thread_scratch<acc_t, kReduceAccSlot>(8 * width);
  double* f64 = thread_scratch<double, kReduceF64Slot>(6 * width);
  acc_t* sel = a;
  const BlockSums<acc_t> b{a + width,     a + 2 * width, a + 3 * width, a + 4 * width,
                           a + 5 * width, a + 6 * width, a + 7 * width, f64 + 5 * width};
  const ColumnMoments tile{f64, f64 + width, f64 + 2 * width, f64 + 3 * width, f64 + 4 * width};
  for (int64_t j = 0; j < 3 * width; ++j) f64[j] = 0.0;  // n, mean, m2
  for (int64_t j = 0; j < width; ++j) {
    b.min[j] = std::numeric_limits<acc_t>::infinity();
    b.max[j] = -std::numeric_limits<acc_t>::infinity();
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
    auto select = [&](int64_t u, acc_t* s) { fill_selection(d, row_first[u], w, s); };
    auto counts = [&](int64_t u, int64_t j, double v) {
      return is_finite(v) && (d.mask == nullptr || d.mask[(row_first[u] + j) / d.mask_group]);
    };
    if (partly_selected) {
      block_sums_careful<scalar_t, acc_t, true>(rows, n, w, select, sel, b);
    } else if (!block_sums_if_finite(rows, n, w, b)) {
      block_sums_careful<scalar_t, acc_t, false>(rows, n, w, select, sel, b);
    }
    merge_block(rows, n, w, b, tile, counts);
  };

  int64_t rows_per_block = kBlockElems / (width > 0 ? width : 1);
  rows_per_block = rows_per_block < 1 ? 1 : (rows_per_block > kMaxBlockRows ? kMaxBlockRows : rows_per_block);
  for (int64_t r0 = 0; r0 < t.rows; r0 += rows_per_block) {
    reduce_block(r0, r0 + rows_per_block < t.rows ? r0 + rows_per_block : t.rows, width);
  }
  if (t.tail_cols > 0) reduce_block(t.rows, t.rows + 1, t.tail_cols);
  for (int64_t j = 0; j < width; ++j) {
    out.moments[j] = Moments{tile.n[j], tile.mean[j], tile.m2[j]};
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
    const acc_t z = ((to_acc<acc_t>(x[j]) - mean_hi[j]) - mean_lo[j]) * scale[j];
    y[j] = from_acc<scalar_t>(kLive ? (live[j] != acc_t(0) ? z : acc_t(0)) : z);
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
      {&reduce_run<c10::Half>, &reduce_run<c10::BFloat16>, &reduce_run<float>, &reduce_run<double>},
      {&normalize_run<c10::Half>, &normalize_run<c10::BFloat16>, &normalize_run<float>, &normalize_run<double>},
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
