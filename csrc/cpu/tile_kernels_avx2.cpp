// The per-tile kernels compiled for AVX2 + FMA + F16C, picked at run time on CPUs that have them.
// Headers shared with other translation units are included before the target pragma so that
// their inline functions keep the baseline instruction set (no AVX2 code leaks into them).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <math.h>
#include <stdint.h>

#include <cstring>
#include <limits>
#include <vector>

#include "../running_norm_math.h"
#include "tile_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define FASTNORM_CPU_ISA avx2
#define FASTNORM_CPU_F16C
#include "tile_kernels_impl.h"
#pragma GCC pop_options

namespace fastnorm {
namespace cpu {
const TileKernels& tile_kernels_avx2() { return avx2::make_tile_kernels(); }
}  // namespace cpu
}  // namespace fastnorm

#else  // not x86-64 with GCC/Clang: no AVX2 build, the binding never asks for it

namespace fastnorm {
namespace cpu {
const TileKernels& tile_kernels_avx2() { return tile_kernels_base(); }
}  // namespace cpu
}  // namespace fastnorm

#endif
