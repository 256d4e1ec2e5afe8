// Arithmetic shared by every fastnorm kernel (C++ CPU, CUDA): moment merging, the running update,
// the bounded standard deviation and the NaN-preserving clamp. Header-only and free of torch
// headers so that plain nvcc compiles it; the CPU tests exercise exactly what the GPU runs.
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FASTNORM_HD __host__ __device__ __forceinline__
#else
#define FASTNORM_HD inline
#endif

namespace fastnorm {

// Rows of the per-column diagnostics tensor written by running_norm, shape (kNumDiagRows, C).
// fastnorm/_ops.py names them in the same order (DIAG_ROWS).
enum DiagRow : int {
  kBatchCount = 0,  // selected, finite entries of this batch
  kBatchMean = 1,   // their mean
  kBatchVar = 2,    // their population variance
  kNonFinite = 3,   // selected entries that were NaN or +-inf (excluded from the statistics)
  kClipped = 4,     // selected finite entries with |z| > clip
  kMaxAbsZ = 5,     // max |z| before the clamp over selected finite entries (0 if none)
  kNumDiagRows = 6,
};

// Count, mean and M2 (sum of squared deviations from the mean) of a set of samples.
struct Moments {
  double count;
  double mean;
  double m2;
};

// Rows of a batch-moments table, shape (kNumMomentRows, C): what fastnorm::batch_moments writes
// for one batch (or one rank's shard) and fastnorm::merge_normalize reads for each of several
// parts. fastnorm/reference.py names them in the same order (MOMENT_ROWS).
enum MomentRow : int {
  kMomentCount = 0,      // selected, finite entries
  kMomentMean = 1,       // their mean (0 where there is none)
  kMomentM2 = 2,         // their sum of squared deviations from the mean (0 where there is none)
  kMomentNonFinite = 3,  // selected entries that were NaN or +-inf
  kMomentMin = 4,        // min of the selected finite entries (+inf where there is none)
  kMomentMax = 5,        // max of the selected finite entries (-inf where there is none)
  kNumMomentRows = 6,
};

// max(a, b) for values that are never NaN; unlike fmax it compiles to one instruction, so loops
// of merges vectorize.
FASTNORM_HD double max_not_nan(double a, double b) { return a > b ? a : b; }

// Pairwise merge of two sets' moments (Chan, Golub & LeVeque 1979):
// mean = mean_a + d*n_b/n,  M2 = M2_a + M2_b + d^2*n_a*n_b/n,  d = mean_b - mean_a.
// Branch-free so that loops of merges vectorize; merging an empty set (count 0) changes nothing
// (an empty set's mean and M2 must be finite, e.g. 0).
FASTNORM_HD Moments merge_moments(const Moments& a, const Moments& b) {
  const double n = a.count + b.count;
  const double wb = b.count / max_not_nan(n, 1.0);
  const double d = b.mean - a.mean;
  return {n, a.mean + d * wb, a.m2 + b.m2 + d * a.count * wb * d};  // 0, not inf * 0, when a is empty
}

// Moments of one block from the corrected two-pass algorithm (Chan, Golub & LeVeque 1983):
// with deviations d_i = x_i - shift from any shift near the mean, S1 = sum d_i, S2 = sum d_i^2,
// mean = shift + S1/n and M2 = S2 - S1^2/n; the correction cancels the shift's rounding error.
// An empty block (count = s1 = s2 = 0) gives {0, shift, 0}.
FASTNORM_HD Moments moments_from_shifted_sums(double count, double shift, double s1, double s2) {
  const double inv_n = 1.0 / max_not_nan(count, 1.0);
  const double m2 = s2 - s1 * s1 * inv_n;
  return {count, shift + s1 * inv_n, m2 < 0.0 ? 0.0 : m2};  // rounding can go below 0; NaN/inf stay
}

// One column of a batch-moments table (MomentRow).
struct ColumnSummary {
  Moments moments;
  double nonfinite;
  double min;
  double max;
};

// A column with no entry: count, mean and M2 0, min +inf, max -inf (what batch_moments writes).
FASTNORM_HD ColumnSummary empty_column_summary() {
  return {{0.0, 0.0, 0.0}, 0.0, static_cast<double>(INFINITY), -static_cast<double>(INFINITY)};
}

// The summary of the union of two disjoint sets of a column's entries, a's taken first: the Chan
// merge of the moments, the non-finite counts added, the min and max (never NaN) kept.
FASTNORM_HD ColumnSummary merge_summaries(const ColumnSummary& a, const ColumnSummary& b) {
  return {merge_moments(a.moments, b.moments), a.nonfinite + b.nonfinite, b.min < a.min ? b.min : a.min,
          max_not_nan(a.max, b.max)};
}

// Column c of part p of batch-moments tables stored one after another (each kNumMomentRows x cols).
FASTNORM_HD ColumnSummary column_of_part(const double* parts, int64_t p, int64_t cols, int64_t c) {
  const double* t = parts + p * kNumMomentRows * cols + c;
  return {{t[kMomentCount * cols], t[kMomentMean * cols], t[kMomentM2 * cols]},
          t[kMomentNonFinite * cols], t[kMomentMin * cols], t[kMomentMax * cols]};
}

// Writes s as column c of a batch-moments table of `cols` columns (the inverse of column_of_part).
FASTNORM_HD void store_column_summary(double* table, int64_t cols, int64_t c, const ColumnSummary& s) {
  table[kMomentCount * cols + c] = s.moments.count;
  table[kMomentMean * cols + c] = s.moments.mean;
  table[kMomentM2 * cols + c] = s.moments.m2;
  table[kMomentNonFinite * cols + c] = s.nonfinite;
  table[kMomentMin * cols + c] = s.min;
  table[kMomentMax * cols + c] = s.max;
}

// Column c of num_parts >= 1 batch-moments tables merged in part order, starting from part 0
// (returned unchanged when it is the only one). The order is fixed, so every process that merges
// the same parts gets the same bits.
FASTNORM_HD ColumnSummary merge_column_parts(const double* parts, int64_t num_parts, int64_t cols, int64_t c) {
  ColumnSummary s = column_of_part(parts, 0, cols, c);
  for (int64_t p = 1; p < num_parts; ++p) s = merge_summaries(s, column_of_part(parts, p, cols, c));
  return s;
}

// Hyper-parameters of the running update. min_weight = 1 - momentum (0 in cumulative mode);
// max_count = +inf when unbounded; unbiased: the batch variance merged is M2/(n-1) (0 for n = 1)
// instead of M2/n.
struct UpdateParams {
  double min_weight;
  double max_count;
  bool unbiased;
};

// The batch variance the running update merges: M2/n, or M2/(n-1) when unbiased, 0 for a single
// sample (not NaN). n >= 1.
FASTNORM_HD double merged_batch_var(const Moments& batch, bool unbiased) {
  const double dof = unbiased ? batch.count - 1.0 : batch.count;
  return dof > 0.0 ? batch.m2 / dof : 0.0;
}

// The long-run scale's floor weight as a fraction of the running update's, 1 - momentum (README,
// "The relative std floor"): the scale follows ten times more slowly than var.
constexpr double kScaleWeightRatio = 0.1;

// The long-run scale of a column after an update that took the running variance to new_var with
// the weight w_scale = max(kScaleWeightRatio * min_weight, n_b / (n_eff + n_b)):
//   scale'^2 = (1 - w_scale) scale^2 + w_scale var'
// an EMA of the variance with its own warm start (w_scale = 1 at the first update: scale' =
// sqrt(var')), so that scale' >= sqrt(1 - w_scale) scale whatever the batch.
FASTNORM_HD double updated_scale(double scale, double new_var, double w_scale) {
  return sqrt((1.0 - w_scale) * scale * scale + w_scale * new_var);
}

// The running update of one column with the batch moments (the contract in README.md), v_b =
// merged_batch_var(batch, unbiased), and of its long-run scale where scale is not null:
//   w = max(min_weight, n_b / (min(count, max_count) + n_b))
//   mean' = mean + w d,  var' = (1-w) var + w v_b + w (1-w) d^2,  count' = count + n_b
// With min_weight = 0 this is exactly the Chan merge of the two populations; with momentum it is
// an EMA whose first updates are exact averages. A column with no samples is left unchanged, as
// is one whose result would overflow, so the statistics stay finite.
FASTNORM_HD void update_running_stats(double& mean, double& var, double& count, const Moments& batch,
                                      const UpdateParams& p, double* scale) {
  if (batch.count <= 0) return;
  const double n_eff = fmin(count, p.max_count);
  const double warm_weight = batch.count / (n_eff + batch.count);
  const double w = fmax(p.min_weight, warm_weight);
  const double d = batch.mean - mean;
  const double new_mean = mean + w * d;
  // (w (1-w) d) d rather than w (1-w) d^2: 0, not 0 * inf, at w = 1 with |d| > 1e154.
  const double new_var = (1.0 - w) * var + w * merged_batch_var(batch, p.unbiased) + (w * (1.0 - w) * d) * d;
  if (!isfinite(new_mean) || !isfinite(new_var)) return;
  mean = new_mean;
  var = new_var;
  count += batch.count;
  if (scale != nullptr) *scale = updated_scale(*scale, new_var, fmax(kScaleWeightRatio * p.min_weight, warm_weight));
}

// The lower bound of a column's divisor: min_std, or min_std_rel times the column's long-run scale
// where that is larger (min_std_rel = 0 without the relative floor).
FASTNORM_HD double std_floor(double min_std, double min_std_rel, double scale) {
  return fmax(min_std, min_std_rel * scale);
}

// The divisor of the normalization: sqrt(var + eps), or sqrt(var) + eps when eps_on_std (rsl_rl's
// and skrl's placement), bounded to [min_std, max_std].
FASTNORM_HD double bounded_std(double var, double eps, bool eps_on_std, double min_std, double max_std) {
  const double std = eps_on_std ? sqrt(var) + eps : sqrt(var + eps);
  return fmin(fmax(std, min_std), max_std);
}

// Clamp that keeps NaN as NaN (fmin/fmax and std::clamp would return a bound for NaN). Each
// step is `a > b ? a : b` with z second, which x86's maxps/minps compute exactly (the second
// operand when unordered), so it vectorizes to two instructions.
template <typename T>
FASTNORM_HD T clamp_keep_nan(T z, T lo, T hi) {
  const T at_least_lo = lo > z ? lo : z;  // NaN z gives z
  return hi < at_least_lo ? hi : at_least_lo;
}

// True for finite v. Written as v - v == 0 (inf - inf and NaN - NaN are NaN) so that it
// vectorizes; valid as long as the code is not compiled with -ffast-math.
template <typename T>
FASTNORM_HD bool is_finite(T v) {
  return v - v == T(0);
}

}  // namespace fastnorm
