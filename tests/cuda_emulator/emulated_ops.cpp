// The CUDA launchers of csrc/cuda/running_norm.cu and csrc/cuda/advantages.cu, run by
// cuda_emulator.h on host memory, as a C library for the emulated tests (tests/emulated_cuda.py
// loads it with ctypes). Also the runtime calls the launchers make. Each op returns the error its
// launches left (0: none), what the binding's launch check would raise on.
#include "cuda_emulator.h"

#include <stdint.h>

#include <vector>

#include "advantages.h"
#include "running_norm.h"

namespace {

// The plan's choices, returned to the test: vector width, column threads, column tiles, row splits.
struct EmulatedPlan {
  int64_t vector_width, column_threads, column_tiles, row_splits;
};

EmulatedPlan chosen(const fastnorm::cuda::LaunchPlan& plan) {
  return {plan.vector_width, plan.column_threads, plan.column_tiles, plan.row_splits};
}

// Scratch that starts as garbage, as the caching allocator's does.
std::vector<unsigned char> garbage(size_t bytes) { return std::vector<unsigned char>(bytes, 0xA5); }

// The advantage plan's choices: the layout (1: columns), the runs' vector width (reduce) and
// pieces, the group merge's threads, the columns' mask form (ColumnMask) and reduce row splits, the
// runs' vector width in the normalize.
struct EmulatedAdvantagePlan {
  int64_t columns, vector_width, pieces, group_threads, column_mask, reduce_row_splits, normalize_vector_width;
};

EmulatedAdvantagePlan chosen(const fastnorm::cuda::AdvantagePlan& plan) {
  return {plan.columns,
          plan.vector_width,
          plan.runs * plan.pieces_per_run,
          plan.group_threads,
          static_cast<int64_t>(plan.column_mask),
          plan.reduce.row_splits,
          plan.normalize_vector_width};
}

// Plans as running_norm (batch_moments gets the same plan, as in the binding), runs `launch` with
// a workspace full of garbage and reports the plan.
template <typename Launch>
void emulate_reduce(int device, const fastnorm::cuda::Problem* problem, Launch launch, EmulatedPlan* plan_out) {
  emu::device = device;
  const fastnorm::cuda::LaunchPlan plan = fastnorm::cuda::plan_running_norm(*problem);
  std::vector<unsigned char> workspace = garbage(plan.workspace_bytes);
  launch(*problem, plan, workspace.data(), nullptr);
  *plan_out = chosen(plan);
}

// Plans a normalize pass (fastnorm::normalize), runs `launch` and reports the plan.
template <typename Launch>
void emulate_normalize(int device, const fastnorm::cuda::Problem* problem, Launch launch, EmulatedPlan* plan_out) {
  emu::device = device;
  const fastnorm::cuda::LaunchPlan plan = fastnorm::cuda::plan_normalize(*problem);
  launch(*problem, plan, nullptr);
  *plan_out = chosen(plan);
}

// Plans `passes` of the advantages op, runs `launch` with a workspace full of garbage and reports
// the plan.
template <typename Launch>
void emulate_advantages(int device, const fastnorm::cuda::AdvantageProblem* problem,
                        fastnorm::cuda::AdvantagePasses passes, Launch launch, EmulatedAdvantagePlan* plan_out) {
  emu::device = device;
  const fastnorm::cuda::AdvantagePlan plan = fastnorm::cuda::plan_advantages(*problem, passes);
  std::vector<unsigned char> workspace = garbage(plan.workspace_bytes);
  launch(*problem, plan, workspace.data(), nullptr);
  *plan_out = chosen(plan);
}

}  // namespace

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

cudaError_t cudaGetLastError(void) { return emu::take_last_error(); }

// The error that launching an empty kernel with this configuration leaves (0: none): the
// emulator's launch checks, for tests/test_cuda_emulated.py.
int emulated_launch_status(unsigned long long grid, long long block, size_t shared_bytes) {
  ::emu::launch(grid, block, shared_bytes, nullptr, [&] {});
  return emu::take_last_error();
}

// For the tests to check that their mirrors of the problems have the same layout.
size_t emulated_problem_bytes(void) { return sizeof(fastnorm::cuda::Problem); }
size_t emulated_advantage_problem_bytes(void) { return sizeof(fastnorm::cuda::AdvantageProblem); }

int emulated_running_norm(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* plan_out) {
  emulate_reduce(device, problem, fastnorm::cuda::launch_running_norm, plan_out);
  return emu::take_last_error();
}

int emulated_normalize(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* plan_out) {
  emulate_normalize(device, problem, fastnorm::cuda::launch_normalize, plan_out);
  return emu::take_last_error();
}

int emulated_batch_moments(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* plan_out) {
  emulate_reduce(device, problem, fastnorm::cuda::launch_batch_moments, plan_out);
  return emu::take_last_error();
}

int emulated_merge_normalize(int device, const fastnorm::cuda::Problem* problem, EmulatedPlan* plan_out) {
  emu::device = device;
  const fastnorm::cuda::LaunchPlan plan = fastnorm::cuda::plan_merge_normalize(*problem);
  std::vector<unsigned char> workspace = garbage(plan.workspace_bytes);
  fastnorm::cuda::launch_merge_normalize(*problem, plan, workspace.data(), nullptr);
  *plan_out = chosen(plan);
  return emu::take_last_error();
}

int emulated_normalize_advantages(int device, const fastnorm::cuda::AdvantageProblem* problem,
                                   EmulatedAdvantagePlan* plan_out) {
  emulate_advantages(device, problem, fastnorm::cuda::AdvantagePasses::kBoth,
                     fastnorm::cuda::launch_normalize_advantages, plan_out);
  return emu::take_last_error();
}

int emulated_advantage_moments(int device, const fastnorm::cuda::AdvantageProblem* problem,
                                EmulatedAdvantagePlan* plan_out) {
  emulate_advantages(device, problem, fastnorm::cuda::AdvantagePasses::kReduce,
                     fastnorm::cuda::launch_advantage_moments, plan_out);
  return emu::take_last_error();
}

int emulated_normalize_advantages_from(int device, const fastnorm::cuda::AdvantageProblem* problem,
                                        EmulatedAdvantagePlan* plan_out) {
  emulate_advantages(device, problem, fastnorm::cuda::AdvantagePasses::kNormalize,
                     fastnorm::cuda::launch_normalize_advantages_from, plan_out);
  return emu::take_last_error();
}

}  // extern "C"
