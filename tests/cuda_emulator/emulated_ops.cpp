// The CUDA launchers of csrc/cuda/running_norm.cu, run by cuda_emulator.h on host memory, as a C
// library for tests/test_cuda_emulated.py (ctypes). Also the runtime calls the launchers make.
#include "cuda_emulator.h"

#include <stdint.h>

#include <vector>

#include "running_norm.h"

extern "C" {

cudaError_t cudaGetDevice(int* device) {
  *device = emu::device;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (attr != cudaDevAttrMultiProcessorCount) return cudaErrorInvalidValue;
  *value = emu::multiprocessors[device];
  return cudaSuccess;
}

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t,
                                                                   unsigned int) {
  *blocks = 2;
  return cudaSuccess;
}

cudaError_t cudaMemsetAsync(void* ptr, int value, size_t bytes, cudaStream_t) {
  std::memset(ptr, value, bytes);
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) { return cudaSuccess; }

// For the test to check that its mirror of Problem has the same layout.
size_t emulated_problem_bytes(void) { return sizeof(fastnorm::cuda::Problem); }

// The plan's choices, returned to the test: vector width, column threads, column tiles, row splits.
struct EmulatedPlan {
  int64_t vector_width, column_threads, column_tiles, row_splits;
};

void emulated_running_norm(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* chosen) {
  using namespace fastnorm::cuda;
  emu::device = device;
  const LaunchPlan plan = plan_running_norm(*problem);
  // Scratch that starts as garbage, as the caching allocator's does.
  std::vector<unsigned char> workspace(plan.workspace_bytes, 0xA5);
  launch_running_norm(*problem, plan, workspace.data(), nullptr);
  *chosen = {plan.vector_width, plan.column_threads, plan.column_tiles, plan.row_splits};
}

void emulated_normalize(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* chosen) {
  using namespace fastnorm::cuda;
  emu::device = device;
  const LaunchPlan plan = plan_normalize(*problem);
  launch_normalize(*problem, plan, nullptr);
  *chosen = {plan.vector_width, plan.column_threads, plan.column_tiles, plan.row_splits};
}

}  // extern "C"
