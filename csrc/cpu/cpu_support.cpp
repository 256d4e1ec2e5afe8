#include "cpu_support.h"

#include <cstdlib>
#include <cstring>

namespace fastnorm {
namespace cpu {

bool use_avx2_kernels() {
  static const bool use = [] {
    const char* forced = std::getenv("FASTNORM_CPU_ISA");
    if (forced != nullptr && std::strcmp(forced, "base") == 0) return false;
#if defined(__x86_64__) && defined(__GNUC__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return use;
}

}  // namespace cpu
}  // namespace fastnorm
