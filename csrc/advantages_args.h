// Argument checks of fastnorm::normalize_advantages and its split ops (advantage_moments,
// normalize_advantages_from), shared by their CPU and CUDA bindings.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace fastnorm {

// x is (outer, groups, inner), reduced over dims 0 and 2; numel = outer * groups * inner. The
// entry at row-major flat index k reads mask[k / mask_group] (mask_group = numel / mask.numel()).
struct AdvantageGeometry {
  int64_t outer;
  int64_t groups;
  int64_t inner;
  int64_t numel;
  int64_t mask_group;  // 0 without a mask or without entries
};

// Checks the arguments of fastnorm::normalize_advantages (every message names the argument).
AdvantageGeometry check_normalize_advantages_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                                  const at::Tensor& out, const at::Tensor& stats, double min_std);

// Checks the arguments of fastnorm::advantage_moments; moments is (kNumAdvantageMomentRows, G).
AdvantageGeometry check_advantage_moments_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                               const at::Tensor& moments);

// Checks the arguments of fastnorm::normalize_advantages_from: those of normalize_advantages
// without a mask, and parts of shape (num_parts >= 1, kNumAdvantageMomentRows, G).
AdvantageGeometry check_normalize_advantages_from_args(const at::Tensor& x, const at::Tensor& parts,
                                                       const at::Tensor& out, const at::Tensor& stats,
                                                       double min_std);

}  // namespace fastnorm
