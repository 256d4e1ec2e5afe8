// The CUDA kernels of fastnorm::normalize_advantages and its split pair ::advantage_moments and
// ::normalize_advantages_from (advantages.cu) bound to the op schemas of csrc/ops.cpp: the argument
// checks shared with the CPU binding, contiguous views, scratch allocation, the current stream.
// Compiled only when torch has CUDA.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../advantages_args.h"
#include "advantages.h"
#include "scalar_kind.h"

namespace fastnorm {
namespace cuda {
namespace {

// x contiguous (outer, groups, inner) and its mask (undefined for none) as the launchers' problem,
// without outputs.
AdvantageProblem problem_of(const at::Tensor& x_c, const at::Tensor& mask_c, const AdvantageGeometry& g) {
  AdvantageProblem p{};
  p.dtype = scalar_kind(x_c.scalar_type());
  p.outer = g.outer;
  p.groups = g.groups;
  p.inner = g.inner;
  p.x = x_c.data_ptr();
  p.mask = mask_c.defined() ? mask_c.data_ptr<bool>() : nullptr;
  p.mask_group = g.mask_group;
  return p;
}

// The plan's scratch on x's device, from the caching allocator.
at::Tensor workspace_for(const AdvantagePlan& plan, const at::Tensor& x) {
  return at::empty({static_cast<int64_t>(plan.workspace_bytes)}, x.options().dtype(at::kByte));
}

void normalize_advantages_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& out,
                               at::Tensor& stats, double min_std, bool unbiased) {
  const AdvantageGeometry g = check_normalize_advantages_args(x, mask, out, stats, min_std);
  if (g.groups == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor mask_c = mask && g.numel > 0 ? mask->contiguous() : at::Tensor();
  at::Tensor out_c = out.is_contiguous() ? out : at::empty_like(x_c);

  AdvantageProblem p = problem_of(x_c, mask_c, g);
  p.out = out_c.data_ptr();
  p.stats = stats.data_ptr<double>();
  p.min_std = min_std;
  p.unbiased = unbiased;
  const AdvantagePlan plan = plan_advantages(p, AdvantagePasses::kBoth);
  const at::Tensor workspace = workspace_for(plan, x);
  launch_normalize_advantages(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!out_c.is_same(out)) out.copy_(out_c);
}

void advantage_moments_cuda(const at::Tensor& x, const std::optional<at::Tensor>& mask, at::Tensor& moments) {
  const AdvantageGeometry g = check_advantage_moments_args(x, mask, moments);
  if (g.groups == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_c = x.contiguous();
  const at::Tensor mask_c = mask && g.numel > 0 ? mask->contiguous() : at::Tensor();

  AdvantageProblem p = problem_of(x_c, mask_c, g);
  p.moments = moments.data_ptr<double>();
  const AdvantagePlan plan = plan_advantages(p, AdvantagePasses::kReduce);
  const at::Tensor workspace = workspace_for(plan, x);
  launch_advantage_moments(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void normalize_advantages_from_cuda(const at::Tensor& x, const at::Tensor& parts, at::Tensor& out,
                                    at::Tensor& stats, double min_std, bool unbiased) {
  const AdvantageGeometry g = check_normalize_advantages_from_args(x, parts, out, stats, min_std);
  if (g.groups == 0) return;
  const c10::cuda::CUDAGuard device_guard(x.device());
  const at::Tensor x_c = x.contiguous();
  at::Tensor out_c = out.is_contiguous() ? out : at::empty_like(x_c);

  AdvantageProblem p = problem_of(x_c, at::Tensor(), g);
  p.out = out_c.data_ptr();
  p.stats = stats.data_ptr<double>();
  p.min_std = min_std;
  p.unbiased = unbiased;
  p.parts = parts.data_ptr<double>();
  p.num_parts = parts.size(0);
  const AdvantagePlan plan = plan_advantages(p, AdvantagePasses::kNormalize);
  const at::Tensor workspace = workspace_for(plan, x);
  launch_normalize_advantages_from(p, plan, workspace.data_ptr(), at::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!out_c.is_same(out)) out.copy_(out_c);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(fastnorm, CUDA, m) {
  m.impl("normalize_advantages", &cuda::normalize_advantages_cuda);
  m.impl("advantage_moments", &cuda::advantage_moments_cuda);
  m.impl("normalize_advantages_from", &cuda::normalize_advantages_from_cuda);
}

}  // namespace fastnorm
