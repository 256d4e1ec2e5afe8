// What the CPU kernels of every op share: storage types, per-thread scratch buffers, and the
// choice between the baseline and the AVX2 builds of the kernels.
#pragma once

#include <c10/core/ScalarType.h>

#include <stddef.h>

#include <vector>

namespace fastnorm {
namespace cpu {

enum class ScalarKind : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2, kFloat64 = 3, kCount = 4 };

inline ScalarKind scalar_kind(c10::ScalarType t) {
  switch (t) {
    case c10::kHalf: return ScalarKind::kFloat16;
    case c10::kBFloat16: return ScalarKind::kBFloat16;
    case c10::kFloat: return ScalarKind::kFloat32;
    default: return ScalarKind::kFloat64;
  }
}

// Per-thread scratch reused across calls (allocating it per tile costs page faults). Slot is a
// value of the calling module's own enum: one slot per buffer that can be live at the same time
// as another on one thread.
template <typename T, auto Slot>
T* thread_scratch(size_t n) {
  static thread_local std::vector<T> buffer;
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Whether to run the AVX2 + FMA + F16C builds of the kernels: the CPU has those instructions and
// the environment variable FASTNORM_CPU_ISA is not "base" (which tests use to run the baseline).
bool use_avx2_kernels();

}  // namespace cpu
}  // namespace fastnorm
