// The per-tile kernels of normalize_advantages for any CPU (the compiler's baseline instruction set).
#define FASTNORM_CPU_ISA base
#include "advantages_tiles_impl.h"

namespace fastnorm {
namespace cpu {
namespace adv {

const Kernels& kernels_base() { return base::make_kernels(); }

}  // namespace adv
}  // namespace cpu
}  // namespace fastnorm
