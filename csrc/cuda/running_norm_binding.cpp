// The CUDA kernels of fastnorm::running_norm and fastnorm::normalize (running_norm.cu) bound to
// the op schemas of csrc/ops.cpp: argument checks, views, scratch allocation, the current stream.
// Compiled only when torch has CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../running_norm_args.h"
#include "running_norm.h"

namespace fastnorm {
namespace cuda {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    default: return ScalarKind::kFloat64;
  }
}

// The problem with x as rows (x_rows), the statistics and the output bounds; no mask, no output.
Problem problem_of(const at::Tensor& x_rows, const at::Tensor& mean, const at::Tensor& var, double eps,
                   std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip) {
  Problem p{};
  p.dtype = scalar_kind(x_rows.scalar_type());
  p.rows = x_rows.size(0);
  p.cols = x_rows.size(1);
  p.x = x_rows.data_ptr();
  p.x_row_stride = x_rows.stride(0);
  p.mean = mean.data_ptr<double>();
  p.var = var.data_ptr<double>();
  p.eps = eps;
  p.min_std = min_std.value_or(0.0);
  p.max_std = max_std.value_or(kInf);
  p.clip = clip.value_or(kInf);
  return p;
}

void set_output(Problem& p, const at::Tensor& out_rows) {
  p.with_output = true;
  p.out = out_rows.data_ptr();
  p.out_row_stride = out_rows.stride(0);
}

void running_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& mean, at::Tensor& var,
                       at::Tensor& count, const std::optional<at::Tensor>& out, at::Tensor& diag,
                       std::optional<double> momentum, std::optional<double> max_count, double eps,
                       std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  if (g.cols == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor mask_2d = mask ? mask_rows(*mask, g) : at::Tensor();
  const at::Tensor out_rows = out ? writable_rows(*out, g) : at::Tensor();

  Problem p = problem_of(x_rows, mean, var, eps, min_std, max_std, clip);
  if (out) set_output(p, out_rows);
  if (mask) {
    p.mask = mask_2d.data_ptr<bool>();
    p.mask_cols = g.mask_cols;
  }
  p.count = count.data_ptr<double>();
  p.diag = diag.data_ptr<double>();
  p.update = {momentum ? 1.0 - *momentum : 0.0, max_count.value_or(kInf)};

  const LaunchPlan plan = plan_running_norm(p);
  const at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
  launch_running_norm(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out) finish_writable_rows(*out, out_rows);
}

void normalize_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, at::Tensor& out, double eps,
                    std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip) {
  const RowsGeometry g = check_normalize_args(x, mean, var, out, eps, min_std, max_std, clip);
  if (g.rows == 0 || g.cols == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor out_rows = writable_rows(out, g);
  Problem p = problem_of(x_rows, mean, var, eps, min_std, max_std, clip);
  set_output(p, out_rows);
  launch_normalize(p, plan_normalize(p), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_writable_rows(out, out_rows);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("running_norm", &cuda::running_norm_cuda);
  m.impl("normalize", &cuda::normalize_cuda);
}

}  // namespace fastnorm
