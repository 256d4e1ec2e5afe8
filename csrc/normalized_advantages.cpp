// fastnorm::normalized_advantages: fastnorm::normalize_advantages with its outputs allocated and
// its input reshaped here, for any device, so that the common call of
// fastnorm.normalize_advantages dispatches one op from Python instead of nine (each ~1.5-3 us on
// a small CPU call; bench/NOTES.md, issue 17).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/lt.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "advantages_math.h"

namespace fastnorm {
namespace {

using NormalizeAdvantagesFn = void(const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor&, at::Tensor&,
                                   double, bool);

using Outputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Outputs normalized_advantages(const at::Tensor& adv,
                              const std::optional<at::Tensor>& mask, int64_t outer, int64_t groups,
                              int64_t inner, at::IntArrayRef group_shape, double min_std, bool unbiased) {
  TORCH_CHECK(outer >= 0 && groups >= 0 && inner >= 0 && outer * groups * inner == adv.numel(),
              "fastnorm: outer * groups * inner must be adv's size ", adv.numel(), ", got ", outer, " * ", groups,
              " * ", inner);
  TORCH_CHECK(c10::multiply_integers(group_shape) == groups, "fastnorm: group_shape ", group_shape,
              " must hold ", groups, " groups");
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastnorm::normalize_advantages", "")
                             .typed<NormalizeAdvantagesFn>();
  at::Tensor y = at::empty(adv.sizes(), adv.options());
  std::vector<int64_t> stats_shape{kNumAdvantageStatRows};
  stats_shape.insert(stats_shape.end(), group_shape.begin(), group_shape.end());
  at::Tensor stats = at::empty(stats_shape, adv.options().dtype(at::kDouble));
  at::Tensor y_op = y.view({outer, groups, inner});
  at::Tensor stats_op = stats.view({kNumAdvantageStatRows, groups});
  const std::optional<at::Tensor> flat_mask = mask ? std::optional<at::Tensor>(mask->reshape({-1})) : std::nullopt;
  op.call(adv.reshape({outer, groups, inner}), flat_mask, y_op, stats_op, min_std, unbiased);
  const at::Tensor std_raw = stats.select(0, kAdvStdRaw);
  return {y, stats.select(0, kAdvCount), stats.select(0, kAdvMean), std_raw, stats.select(0, kAdvNormMaxAbs),
          at::lt(std_raw, min_std)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastnorm, CompositeExplicitAutograd, m) {
  m.impl("normalized_advantages", &normalized_advantages);
}

}  // namespace fastnorm
