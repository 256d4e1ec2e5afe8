// The per-tile kernels for any x86-64 or other CPU (the compiler's baseline instruction set).
#define FASTNORM_CPU_ISA base
#include "tile_kernels_impl.h"

namespace fastnorm {
namespace cpu {

const TileKernels& tile_kernels_base() { return base::make_tile_kernels(); }

}  // namespace cpu
}  // namespace fastnorm
