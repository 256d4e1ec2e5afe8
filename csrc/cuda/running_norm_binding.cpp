// The CUDA kernels of fastnorm::running_norm, ::normalize, ::batch_moments and ::merge_normalize
// (running_norm.cu) bound to the op schemas of csrc/ops.cpp: argument checks, views, scratch
// allocation, the current stream. Compiled only when torch has CUDA.
#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "../running_norm_args.h"
#include "running_norm.h"
#include "scalar_kind.h"

namespace fastnorm {
namespace cuda {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The problem with x as rows (x_rows) alone.
Problem rows_problem(const at::Tensor& x_rows) {
  Problem p{};
  p.dtype = scalar_kind(x_rows.scalar_type());
  p.rows = x_rows.size(0);
  p.cols = x_rows.size(1);
  p.x = x_rows.data_ptr();
  p.x_row_stride = x_rows.stride(0);
  return p;
}

// The problem with x as rows (x_rows), the statistics and the output bounds; no mask, no output.
Problem problem_of(const at::Tensor& x_rows, const at::Tensor& mean, const at::Tensor& var, double eps,
                   std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                   bool eps_on_std) {
  Problem p = rows_problem(x_rows);
  p.mean = mean.data_ptr<double>();
  p.var = var.data_ptr<double>();
  p.eps = eps;
  p.min_std = min_std.value_or(0.0);
  p.max_std = max_std.value_or(kInf);
  p.clip = clip.value_or(kInf);
  p.eps_on_std = eps_on_std;
  return p;
}

// The long-run scale (checked: check_scale_args) and the relative floor.
void set_scale(Problem& p, double* scale, std::optional<double> min_std_rel) {
  p.scale = scale;
  p.min_std_rel = min_std_rel.value_or(0.0);
}

void set_output(Problem& p, const at::Tensor& out_rows) {
  p.with_output = true;
  p.out = out_rows.data_ptr();
  p.out_row_stride = out_rows.stride(0);
}

// normalize_with="previous" where y is written (the kernels then need to know whether writing y
// can change x), and the update counter.
void set_previous_and_steps(Problem& p, bool previous, const at::Tensor& x_rows, const at::Tensor& out_rows,
                            int64_t* steps) {
  p.previous = previous && p.with_output;
  p.out_overlaps_x = p.with_output && at::get_overlap_status(out_rows, x_rows) != at::MemOverlapStatus::No;
  p.steps = steps;
}

void set_mask(Problem& p, const at::Tensor& mask_2d, const RowsGeometry& g) {
  p.mask = mask_2d.data_ptr<bool>();
  p.mask_cols = g.mask_cols;
}

// The running update's statistics, diagnostics and hyper-parameters.
void set_update(Problem& p, at::Tensor& count, at::Tensor& diag, std::optional<double> momentum,
                std::optional<double> max_count, bool unbiased) {
  p.count = count.data_ptr<double>();
  p.diag = diag.data_ptr<double>();
  p.update = {momentum ? 1.0 - *momentum : 0.0, max_count.value_or(kInf), unbiased};
}

// Device scratch of `bytes` on x's device (the caching allocator: no sync, graph-capture safe).
at::Tensor workspace_for(const at::Tensor& x, size_t bytes) {
  return at::empty({static_cast<int64_t>(bytes)}, x.options().dtype(at::kByte));
}

void running_norm_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& mean, at::Tensor& var,
                       at::Tensor& count, const std::optional<at::Tensor>& out, at::Tensor& diag,
                       std::optional<double> momentum, std::optional<double> max_count, double eps,
                       std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                       bool eps_on_std, bool unbiased, const std::optional<at::Tensor>& scale,
                       std::optional<double> min_std_rel, bool previous, const std::optional<at::Tensor>& steps) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  int64_t* steps_ptr = check_steps_arg(x, steps);
  if (g.cols == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor mask_2d = mask ? mask_rows(*mask, g) : at::Tensor();
  const at::Tensor out_rows = out ? writable_rows(*out, g) : at::Tensor();

  Problem p = problem_of(x_rows, mean, var, eps, min_std, max_std, clip, eps_on_std);
  if (out) set_output(p, out_rows);
  if (mask) set_mask(p, mask_2d, g);
  set_update(p, count, diag, momentum, max_count, unbiased);
  set_scale(p, scale_ptr, min_std_rel);
  set_previous_and_steps(p, previous, x_rows, out_rows, steps_ptr);

  // One kernel when the batch fits one launch: it also resets diag and counts the step.
  const LaunchPlan plan = plan_running_norm(p);
  const at::Tensor workspace = workspace_for(x, plan.workspace_bytes);
  launch_running_norm(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out) finish_writable_rows(*out, out_rows);
}

// shift is checked and not needed: the CUDA blocks sum about their own mean (two passes), as
// running_norm's do, so the split halves keep its bits without it.
void batch_moments_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& moments,
                        const std::optional<at::Tensor>& shift) {
  const RowsGeometry g = check_batch_moments_args(x, mask, moments, shift);
  if (g.cols == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor mask_2d = mask ? mask_rows(*mask, g) : at::Tensor();
  Problem p = rows_problem(x_rows);
  if (mask) set_mask(p, mask_2d, g);
  p.moments = moments.data_ptr<double>();

  const LaunchPlan plan = plan_running_norm(p);
  const at::Tensor workspace = workspace_for(x, plan.workspace_bytes);
  launch_batch_moments(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void merge_normalize_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, const at::Tensor& parts,
                          at::Tensor& mean, at::Tensor& var, at::Tensor& count, const std::optional<at::Tensor>& out,
                          at::Tensor& diag, std::optional<double> momentum, std::optional<double> max_count,
                          double eps, std::optional<double> min_std, std::optional<double> max_std,
                          std::optional<double> clip, bool eps_on_std, bool unbiased,
                          const std::optional<at::Tensor>& scale, std::optional<double> min_std_rel, bool previous,
                          const std::optional<at::Tensor>& steps) {
  const RowsGeometry g = check_merge_normalize_args(x, mask, parts, mean, var, count, out, diag, momentum, max_count,
                                                    eps, min_std, max_std, clip);
  double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  int64_t* steps_ptr = check_steps_arg(x, steps);
  const c10::cuda::CUDAGuard device_guard(x.device());
  if (g.cols == 0) {  // no column to update, but a step of the group all the same
    Problem step{};
    step.steps = steps_ptr;
    if (steps_ptr) launch_merge_normalize(step, LaunchPlan{}, nullptr, at::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor mask_2d = mask ? mask_rows(*mask, g) : at::Tensor();
  const at::Tensor out_rows = out ? writable_rows(*out, g) : at::Tensor();

  Problem p = problem_of(x_rows, mean, var, eps, min_std, max_std, clip, eps_on_std);
  if (out) set_output(p, out_rows);
  if (mask) set_mask(p, mask_2d, g);
  set_update(p, count, diag, momentum, max_count, unbiased);
  set_scale(p, scale_ptr, min_std_rel);
  set_previous_and_steps(p, previous, x_rows, out_rows, steps_ptr);
  p.parts = parts.data_ptr<double>();
  p.num_parts = parts.size(0);

  const LaunchPlan plan = plan_merge_normalize(p);
  const at::Tensor workspace = workspace_for(x, plan.workspace_bytes);
  launch_merge_normalize(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (out) finish_writable_rows(*out, out_rows);
}

void normalize_cuda(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var, at::Tensor& out, double eps,
                    std::optional<double> min_std, std::optional<double> max_std, std::optional<double> clip,
                    bool eps_on_std, const std::optional<at::Tensor>& scale, std::optional<double> min_std_rel) {
  const RowsGeometry g = check_normalize_args(x, mean, var, out, eps, min_std, max_std, clip);
  double* scale_ptr = check_scale_args(x, mean, scale, min_std_rel);
  if (g.rows == 0 || g.cols == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_rows = readable_rows(x, g);
  const at::Tensor out_rows = writable_rows(out, g);
  Problem p = problem_of(x_rows, mean, var, eps, min_std, max_std, clip, eps_on_std);
  set_output(p, out_rows);
  set_scale(p, scale_ptr, min_std_rel);
  launch_normalize(p, plan_normalize(p), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  finish_writable_rows(out, out_rows);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("running_norm", &cuda::running_norm_cuda);
  m.impl("normalize", &cuda::normalize_cuda);
  m.impl("batch_moments", &cuda::batch_moments_cuda);
  m.impl("merge_normalize", &cuda::merge_normalize_cuda);
}

}  // namespace fastnorm
