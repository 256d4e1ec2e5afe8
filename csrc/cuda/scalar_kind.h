// The element type of a tensor as the torch-free CUDA launchers name it (running_norm.h).
#pragma once

#include <c10/core/ScalarType.h>

#include "running_norm.h"

namespace fastnorm {
namespace cuda {

inline ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return ScalarKind::kFloat16;
    case at::kBFloat16: return ScalarKind::kBFloat16;
    case at::kFloat: return ScalarKind::kFloat32;
    default: return ScalarKind::kFloat64;
  }
}

}  // namespace cuda
}  // namespace fastnorm
