#include "advantages_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "advantages_math.h"

namespace fastnorm {
namespace {

AdvantageGeometry check_x(const at::Tensor& x) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "fastnorm: x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(x.dim() == 3, "fastnorm: x must be 3-D (outer, groups, inner), got shape ", x.sizes());
  return {x.size(0), x.size(1), x.size(2), x.numel(), 0};
}

// out (x's shape and dtype), stats (kNumAdvantageStatRows, G) and min_std.
void check_outputs(const at::Tensor& x, const AdvantageGeometry& g, const at::Tensor& out, const at::Tensor& stats,
                   double min_std) {
  TORCH_CHECK(out.sizes() == x.sizes(), "fastnorm: out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fastnorm: out must have x's dtype ", x.scalar_type(), ", got ",
              out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), "fastnorm: out is on ", out.device(), " but x is on ", x.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);

  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == kNumAdvantageStatRows && stats.size(1) == g.groups,
              "fastnorm: stats must be a contiguous float64 tensor of shape (", int(kNumAdvantageStatRows), ", ",
              g.groups, "), got ", stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK(stats.device() == x.device(), "fastnorm: stats is on ", stats.device(), " but x is on ", x.device());
  TORCH_CHECK(std::isfinite(min_std) && min_std > 0, "fastnorm: min_std must be finite and > 0, got ", min_std);
}

void check_mask(const at::Tensor& x, const std::optional<at::Tensor>& mask, AdvantageGeometry& g) {
  if (!mask) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "fastnorm: mask must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->device() == x.device(), "fastnorm: mask is on ", mask->device(), " but x is on ", x.device());
  TORCH_CHECK(mask->dim() == 1, "fastnorm: mask must be 1-D (flattened), got shape ", mask->sizes());
  const int64_t m = mask->numel();
  TORCH_CHECK(g.numel == 0 || (m > 0 && g.numel % m == 0), "fastnorm: mask must have a number of elements that "
              "divides x's ", g.numel, ", got ", m);
  g.mask_group = g.numel == 0 ? 0 : g.numel / m;
}

}  // namespace

AdvantageGeometry check_normalize_advantages_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                  const at::Tensor& out, const at::Tensor& stats, double min_std) {
  AdvantageGeometry g = check_x(x);
  check_outputs(x, g, out, stats, min_std);
  check_mask(x, mask, g);
  return g;
}

AdvantageGeometry check_advantage_moments_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                               const at::Tensor& moments) {
  AdvantageGeometry g = check_x(x);
  TORCH_CHECK(moments.scalar_type() == at::kDouble && moments.is_contiguous() && moments.dim() == 2 &&
                  moments.size(0) == kNumAdvantageMomentRows && moments.size(1) == g.groups,
              "fastnorm: moments must be a contiguous float64 tensor of shape (", int(kNumAdvantageMomentRows), ", ",
              g.groups, "), got ", moments.sizes(), " ", moments.scalar_type());
  TORCH_CHECK(moments.device() == x.device(), "fastnorm: moments is on ", moments.device(), " but x is on ",
              x.device());
  check_mask(x, mask, g);
  return g;
}

AdvantageGeometry check_normalize_advantages_from_args(const at::Tensor& x, const at::Tensor& parts,
                                                       const at::Tensor& out, const at::Tensor& stats,
                                                       double min_std) {
  AdvantageGeometry g = check_x(x);
  check_outputs(x, g, out, stats, min_std);
  TORCH_CHECK(parts.scalar_type() == at::kDouble && parts.is_contiguous() && parts.dim() == 3 && parts.size(0) >= 1 &&
                  parts.size(1) == kNumAdvantageMomentRows && parts.size(2) == g.groups,
              "fastnorm: parts must be a contiguous float64 tensor of shape (num_parts >= 1, ",
              int(kNumAdvantageMomentRows), ", ", g.groups, "), got ", parts.sizes(), " ", parts.scalar_type());
  TORCH_CHECK(parts.device() == x.device(), "fastnorm: parts is on ", parts.device(), " but x is on ", x.device());
  return g;
}

}  // namespace fastnorm
