// The fastnorm operator schemas (one TORCH_LIBRARY block), and the _C module whose import loads
// this library so that the static registrations run. Device kernels register themselves in
// cpu/running_norm.cpp, cpu/advantages.cpp, cuda/running_norm_binding.cpp,
// cuda/advantages_binding.cpp and (for every device) normalized_advantages.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastnorm, m) {
  // Reduces the batch, merges it into the float64 running statistics (mean, var, count), writes
  // y into out when given, and fills diag (6, C) with the per-column diagnostics (DiagRow).
  // eps_on_std: the divisor is sqrt(var) + eps instead of sqrt(var + eps); unbiased: the batch
  // variance merged into var is M2/(n-1) (0 for n = 1) instead of M2/n (diag's batch_var stays M2/n).
  // scale (float64, mean's shape), when given: the long-run scale, updated with the statistics
  // (update_running_stats); min_std_rel (needs scale): the divisor's lower bound is
  // max(min_std, min_std_rel * scale) (std_floor). previous: y uses the statistics from before
  // this batch in every column whose count was > 0 (the others: the updated ones, i.e. the batch's
  // own), so that y needs one read of x; diag's clipped and max_abs_z rows use what y used.
  // steps (int64, 0-dim), when given: incremented in the op when x has entries (the update count).
  m.def(
      "running_norm(Tensor x, Tensor? mask, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, "
      "Tensor(d!)? out, Tensor(e!) diag, float? momentum, float? max_count, float eps, float? min_std, "
      "float? max_std, float? clip, bool eps_on_std=False, bool unbiased=False, Tensor(f!)? scale=None, "
      "float? min_std_rel=None, bool previous=False, Tensor(g!)? steps=None) -> ()");
  // y = clamp((x - mean) / clamp(sqrt(var + eps), min_std, max_std), -clip, clip) into out
  // (sqrt(var) + eps with eps_on_std; lower bound max(min_std, min_std_rel * scale) with min_std_rel).
  m.def(
      "normalize(Tensor x, Tensor mean, Tensor var, Tensor(a!) out, float eps, float? min_std, "
      "float? max_std, float? clip, bool eps_on_std=False, Tensor? scale=None, float? min_std_rel=None) -> ()");
  // running_norm split in two halves, so that the batch moments of several processes can be
  // combined in between (RunningNorm(sync=True) all-gathers them). Running both halves on one
  // batch with parts = moments[None] gives exactly what running_norm gives.
  //
  // batch_moments: the moments of the selected finite entries of x (*batch, *shape) per column,
  // written into moments, float64 contiguous (6, *shape), rows (MomentRow in
  // running_norm_math.h): count, mean, M2 (sum of squared deviations from the mean), non-finite
  // count, min, max. A column with no entry reads 0, 0, 0, nonfinite, +inf, -inf; so does every
  // column of an empty x. Merge within a part in a fixed order: equal inputs, equal bits. shift
  // (float64, *shape), when given: the running mean, a value near each column's mean that a kernel
  // may use to sum in one pass, as running_norm does with its mean (so with the same mean, both
  // halves give running_norm's bits); the moments are those of x either way, to rounding.
  m.def("batch_moments(Tensor x, Tensor? mask, Tensor(a!) moments, Tensor? shift=None) -> ()");
  // merge_normalize: merges parts, float64 contiguous (P >= 1, 6, *shape), each a batch_moments
  // table, per column in part order p = 0..P-1 (Chan merge, merge_column_parts), so every process
  // given the same parts updates its statistics to the same bits; then the running update as in
  // running_norm, and y for this process's x into out when given. diag rows batch_count,
  // batch_mean, batch_var, nonfinite and max_abs_z describe the merged batch (max |z| from the
  // merged min and max); clipped counts this x's entries. x may be empty while parts are not.
  // previous as in running_norm; steps, when given, is incremented whatever x (a step of the group).
  m.def(
      "merge_normalize(Tensor x, Tensor? mask, Tensor parts, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, "
      "Tensor(d!)? out, Tensor(e!) diag, float? momentum, float? max_count, float eps, float? min_std, "
      "float? max_std, float? clip, bool eps_on_std=False, bool unbiased=False, Tensor(f!)? scale=None, "
      "float? min_std_rel=None, bool previous=False, Tensor(g!)? steps=None) -> ()");
  // x (O, G, I) reduced over dims 0 and 2: for each group g, over its selected finite entries
  // (mask[k / (N / mask.numel())] for flat index k, no mask: all), writes stats (4, G) (rows:
  // AdvantageStatRow) and y = (x - mean) / max(std_raw, min_std) into out (0 for an empty group).
  m.def(
      "normalize_advantages(Tensor x, Tensor? mask, Tensor(a!) out, Tensor(b!) stats, float min_std, "
      "bool unbiased) -> ()");
  // normalize_advantages with its outputs allocated: adv of any shape seen as x (outer, groups,
  // inner) (a view, or a copy where the layout needs one), mask flat as there; returns y (adv's
  // shape, contiguous), the stat rows count, mean, std_raw, norm_max_abs (float64, group_shape:
  // rows of one table) and std_below_floor (std_raw < min_std, bool). One op for the common call
  // of fastnorm.normalize_advantages, in eager mode (normalized_advantages.cpp).
  m.def(
      "normalized_advantages(Tensor adv, Tensor? mask, int outer, int groups, int inner, int[] group_shape, "
      "float min_std, bool unbiased) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // normalize_advantages split in two halves, so that the group moments of several processes can
  // be combined in between (normalize_advantages(sync=True) all-gathers them). Running both halves
  // on one x with parts = moments[None] gives exactly what normalize_advantages gives.
  //
  // advantage_moments: x (O, G, I) and mask as in normalize_advantages; writes moments, float64
  // contiguous (5, G), rows (AdvantageMomentRow in advantages_math.h): count, mean, M2 (sum of
  // squared deviations from the mean), min, max of each group's selected finite entries. A group
  // with no entry reads 0, 0, 0, +inf, -inf; so does every group of an empty x. Merge within a part
  // in a fixed order: equal inputs, equal bits.
  m.def("advantage_moments(Tensor x, Tensor? mask, Tensor(a!) moments) -> ()");
  // normalize_advantages_from: merges parts, float64 contiguous (P >= 1, 5, G), each an
  // advantage_moments table, per group in part order p = 0..P-1 (Chan merge, merge_group_parts),
  // so every process given the same parts writes the same stats bits; then, from the merged
  // moments, min and max, stats (4, G) and y for this process's x (O', G, I') into out, as
  // normalize_advantages does from its own (norm_max_abs comes from the merged min and max). No
  // mask: y covers every entry. x may be empty while parts are not.
  m.def(
      "normalize_advantages_from(Tensor x, Tensor parts, Tensor(a!) out, Tensor(b!) stats, float min_std, "
      "bool unbiased) -> ()");
}
