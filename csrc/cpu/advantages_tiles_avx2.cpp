// The per-tile kernels of normalize_advantages compiled for AVX2 + FMA + F16C, picked at run time
// on CPUs that have them. Headers shared with other translation units are included before the
// target pragma so that their inline functions keep the baseline instruction set.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math.h>
#include <stdint.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../running_norm_math.h"
#include "advantages_tiles.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTNORM_CPU_ISA avx2
#define FASTNORM_CPU_F16C
#include "advantages_tiles_impl.h"
#pragma GCC pop_options

namespace fastnorm {
namespace cpu {
namespace adv {
const Kernels& kernels_avx2() { return avx2::make_kernels(); }
}  // namespace adv
}  // namespace cpu
}  // namespace fastnorm

#else  // not x86-64 with GCC/Clang: no AVX2 build, the binding never asks for it

namespace fastnorm {
namespace cpu {
namespace adv {
const Kernels& kernels_avx2() { return kernels_base(); }
}  // namespace adv
}  // namespace cpu
}  // namespace fastnorm

#endif
