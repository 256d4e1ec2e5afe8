#include "advantages_args.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "advantages_math.h"

namespace fastnorm {

AdvantageGeometry check_normalize_advantages_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                  const at::Tensor& out, const at::Tensor& stats, double min_std) {
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "fastnorm: x must be float16, bfloat16, float32 or float64, got ", t);
  TORCH_CHECK(x.dim() == 3, "fastnorm: x must be 3-D (outer, groups, inner), got shape ", x.sizes());
  AdvantageGeometry g{x.size(0), x.size(1), x.size(2), x.numel(), 0};

  TORCH_CHECK(out.sizes() == x.sizes(), "fastnorm: out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == t, "fastnorm: out must have x's dtype ", t, ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), "fastnorm: out is on ", out.device(), " but x is on ", x.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);

  TORCH_CHECK(stats.scalar_type() == at::kDouble && stats.is_contiguous() && stats.dim() == 2 &&
                  stats.size(0) == kNumAdvantageStatRows && stats.size(1) == g.groups,
              "fastnorm: stats must be a contiguous float64 tensor of shape (", int(kNumAdvantageStatRows), ", ",
              g.groups, "), got ", stats.sizes(), " ", stats.scalar_type());
  TORCH_CHECK(stats.device() == x.device(), "fastnorm: stats is on ", stats.device(), " but x is on ", x.device());
  TORCH_CHECK(std::isfinite(min_std) && min_std > 0, "fastnorm: min_std must be finite and > 0, got ", min_std);

  if (mask) {
    TORCH_CHECK(mask->scalar_type() == at::kBool, "fastnorm: mask must be bool, got ", mask->scalar_type());
    TORCH_CHECK(mask->device() == x.device(), "fastnorm: mask is on ", mask->device(), " but x is on ", x.device());
    TORCH_CHECK(mask->dim() == 1, "fastnorm: mask must be 1-D (flattened), got shape ", mask->sizes());
    const int64_t m = mask->numel();
    TORCH_CHECK(g.numel == 0 || (m > 0 && g.numel % m == 0), "fastnorm: mask must have a number of elements that "
                "divides x's ", g.numel, ", got ", m);
    g.mask_group = g.numel == 0 ? 0 : g.numel / m;
  }
  return g;
}

}  // namespace fastnorm
