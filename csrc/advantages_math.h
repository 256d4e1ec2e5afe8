// Arithmetic of fastnorm::normalize_advantages and its split ops shared by every kernel (C++ CPU,
// CUDA): the moments tables ranks exchange and their merge, and what a group's moments become (std
// with its floor, the scale, max |y|). Header-only, free of torch.
#pragma once

#include "running_norm_math.h"

namespace fastnorm {

// Rows of the stats tensor written by normalize_advantages, shape (kNumAdvantageStatRows, G).
// fastnorm/advantages.py names them in the same order (STAT_ROWS).
enum AdvantageStatRow : int {
  kAdvCount = 0,       // selected, finite entries of the group
  kAdvMean = 1,        // their mean (0 for an empty group)
  kAdvStdRaw = 2,      // their std, Bessel-corrected when unbiased (0 for fewer than 2 entries)
  kAdvNormMaxAbs = 3,  // max |y| over them (0 for an empty group)
  kNumAdvantageStatRows = 4,
};

// Rows of an advantage-moments table, shape (kNumAdvantageMomentRows, G): what
// fastnorm::advantage_moments writes for one shard (one rank's x) and
// fastnorm::normalize_advantages_from reads for each of several parts.
// fastnorm/advantages_reference.py names them in the same order (MOMENT_ROWS).
enum AdvantageMomentRow : int {
  kAdvMomentCount = 0,  // selected, finite entries of the group
  kAdvMomentMean = 1,   // their mean (0 where there is none)
  kAdvMomentM2 = 2,     // their sum of squared deviations from the mean (0 where there is none)
  kAdvMomentMin = 3,    // their min (+inf where there is none)
  kAdvMomentMax = 4,    // their max (-inf where there is none)
  kNumAdvantageMomentRows = 5,
};

// A group's moments and the min and max of its entries (+inf and -inf when it has none).
struct GroupMoments {
  Moments moments;
  double min, max;
};

// Group g of part p of advantage-moments tables stored one after another (each
// kNumAdvantageMomentRows x groups).
FASTNORM_HD GroupMoments group_of_part(const double* parts, int64_t p, int64_t groups, int64_t g) {
  const double* t = parts + p * kNumAdvantageMomentRows * groups + g;
  return {{t[kAdvMomentCount * groups], t[kAdvMomentMean * groups], t[kAdvMomentM2 * groups]},
          t[kAdvMomentMin * groups], t[kAdvMomentMax * groups]};
}

// Stores a group's moments as column g of an advantage-moments table (group_of_part's inverse);
// count, mean and M2 read 0 for a group without entries.
FASTNORM_HD void store_group_moments(double* table, int64_t groups, int64_t g, const GroupMoments& m) {
  const bool live = m.moments.count > 0;
  table[kAdvMomentCount * groups + g] = m.moments.count;
  table[kAdvMomentMean * groups + g] = live ? m.moments.mean : 0.0;
  table[kAdvMomentM2 * groups + g] = live ? m.moments.m2 : 0.0;
  table[kAdvMomentMin * groups + g] = m.min;
  table[kAdvMomentMax * groups + g] = m.max;
}

// Group g of num_parts >= 1 tables merged in part order (Chan merge, merge_moments), starting from
// part 0. The order is fixed, so every process that merges the same parts gets the same bits.
FASTNORM_HD GroupMoments merge_group_parts(const double* parts, int64_t num_parts, int64_t groups, int64_t g) {
  GroupMoments s = group_of_part(parts, 0, groups, g);
  for (int64_t p = 1; p < num_parts; ++p) {
    const GroupMoments t = group_of_part(parts, p, groups, g);
    s.moments = merge_moments(s.moments, t.moments);
    s.min = t.min < s.min ? t.min : s.min;
    s.max = max_not_nan(s.max, t.max);
  }
  return s;
}

// What the normalize pass needs of a group: y = live ? (x - mean) * scale : 0.
struct AdvantageGroup {
  double count, mean, std_raw, norm_max_abs, scale;
  bool live;  // the group has at least one selected finite entry
};

// A group's statistics from its moments and the min and max of its entries:
//   std_raw = sqrt(M2 / (n - 1)) (unbiased) or sqrt(M2 / n), 0 when n < 2,
//   scale = 1 / max(std_raw, min_std),  norm_max_abs = max(max - mean, mean - min) * scale
// (y is monotonic in x, so its largest |y| comes from the smallest or largest entry).
FASTNORM_HD AdvantageGroup advantage_group(const Moments& m, double min, double max, double min_std,
                                           bool unbiased) {
  const bool live = m.count > 0;
  const double dof = unbiased ? m.count - 1.0 : m.count;
  const double std_raw = m.count >= 2 ? sqrt(m.m2 / dof) : 0.0;
  const double scale = live ? 1.0 / (std_raw > min_std ? std_raw : min_std) : 0.0;
  const double spread = live ? max_not_nan(max - m.mean, m.mean - min) : 0.0;
  return {m.count, live ? m.mean : 0.0, std_raw, spread * scale, scale, live};
}

}  // namespace fastnorm
