// Argument checks and tensor views shared by the CPU and CUDA bindings of the fastnorm ops.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastnorm {

// x viewed as `rows` samples of `cols` = prod(statistics shape) columns; the mask, when given, as
// (rows, mask_cols) where column c reads mask column c / (cols / mask_cols).
struct RowsGeometry {
  int64_t rows;
  int64_t cols;
  int64_t mask_cols;
};

// Checks the arguments of fastnorm::running_norm (every message names the argument).
RowsGeometry check_running_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                     const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                     const std::optional<at::Tensor>& out, const at::Tensor& diag,
                                     std::optional<double> momentum, std::optional<double> max_count, double eps,
                                     std::optional<double> min_std, std::optional<double> max_std,
                                     std::optional<double> clip);

// Checks the long-run scale and the relative floor of running_norm, merge_normalize and normalize:
// scale, when given, float64 contiguous of mean's shape on x's device; min_std_rel finite >= 0 and
// only with a scale. Returns scale's data (nullptr without one).
double* check_scale_args(const at::Tensor& x, const at::Tensor& mean, const std::optional<at::Tensor>& scale,
                         std::optional<double> min_std_rel);

// Checks the update counter of running_norm and merge_normalize: when given, a 0-dim int64 tensor
// on x's device. Returns its data (nullptr without one).
int64_t* check_steps_arg(const at::Tensor& x, const std::optional<at::Tensor>& steps);

// Checks the arguments of fastnorm::batch_moments; moments is (kNumMomentRows, *shape), shift
// (when given) float64 contiguous of shape `shape`.
RowsGeometry check_batch_moments_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                      const at::Tensor& moments, const std::optional<at::Tensor>& shift);

// Checks the arguments of fastnorm::merge_normalize: those of running_norm, and parts of shape
// (num_parts >= 1, kNumMomentRows, *mean.shape).
RowsGeometry check_merge_normalize_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                        const at::Tensor& parts, const at::Tensor& mean, const at::Tensor& var,
                                        const at::Tensor& count, const std::optional<at::Tensor>& out,
                                        const at::Tensor& diag, std::optional<double> momentum,
                                        std::optional<double> max_count, double eps, std::optional<double> min_std,
                                        std::optional<double> max_std, std::optional<double> clip);

// Checks the arguments of fastnorm::normalize.
RowsGeometry check_normalize_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& out, double eps, std::optional<double> min_std,
                                  std::optional<double> max_std, std::optional<double> clip);

// x as (rows, cols) with unit column stride: a view where the layout allows, else a contiguous copy.
at::Tensor readable_rows(const at::Tensor& x, const RowsGeometry& g);

// The mask as contiguous (rows, mask_cols) bools.
at::Tensor mask_rows(const at::Tensor& mask, const RowsGeometry& g);

// out as (rows, cols) with unit column stride to write into: a view of out where the layout
// allows, else a scratch tensor that finish_writable_rows copies back into out.
at::Tensor writable_rows(const at::Tensor& out, const RowsGeometry& g);
void finish_writable_rows(const at::Tensor& out, const at::Tensor& rows);

}  // namespace fastnorm
