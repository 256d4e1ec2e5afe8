// Arithmetic of fastnorm::normalize_advantages shared by every kernel (C++ CPU, CUDA): what a
// group's moments become (std with its floor, the scale, max |y|). Header-only, free of torch.
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
