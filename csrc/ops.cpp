// The fastnorm operator schemas (one TORCH_LIBRARY block), and the _C module whose import loads
// this library so that the static registrations run. Device kernels register themselves in
// cpu/running_norm.cpp and cuda/running_norm_binding.cpp.
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
  m.def(
      "running_norm(Tensor x, Tensor? mask, Tensor(a!) mean, Tensor(b!) var, Tensor(c!) count, "
      "Tensor(d!)? out, Tensor(e!) diag, float? momentum, float? max_count, float eps, float? min_std, "
      "float? max_std, float? clip) -> ()");
  // y = clamp((x - mean) / clamp(sqrt(var + eps), min_std, max_std), -clip, clip) into out.
  m.def(
      "normalize(Tensor x, Tensor mean, Tensor var, Tensor(a!) out, float eps, float? min_std, "
      "float? max_std, float? clip) -> ()");
  // x (O, G, I) reduced over dims 0 and 2: for each group g, over its selected finite entries
  // (mask[k / (N / mask.numel())] for flat index k, no mask: all), writes stats (4, G) (rows:
  // AdvantageStatRow) and y = (x - mean) / max(std_raw, min_std) into out (0 for an empty group).
  m.def(
      "normalize_advantages(Tensor x, Tensor? mask, Tensor(a!) out, Tensor(b!) stats, float min_std, "
      "bool unbiased) -> ()");
}
