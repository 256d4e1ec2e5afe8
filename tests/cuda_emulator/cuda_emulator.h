// Runs CUDA kernels on the CPU, for tests on machines without a GPU (tests/test_cuda_emulated.py).
//
// Force-included (g++ -include) before csrc/cuda/running_norm.cu, whose `kernel<<<grid, block,
// smem, stream>>>(args)` launches the test rewrites into emu::launch(grid, block, smem, stream,
// [&] { kernel(args); }). Each block runs its threads as fibers on one OS thread (started with
// ucontext, switched with _setjmp/_longjmp, which save no signal mask: build with
// -U_FORTIFY_SOURCE), switched only at __syncthreads and warp collectives, so a block runs
// deterministically; blocks run one after another in blockIdx order. Emulated: 1-D launches, __syncthreads, static
// __shared__ arrays, __shfl_down_sync, __any_sync, atomicAdd, __threadfence, __ldcg, and the few
// runtime calls the launchers make. A collective that not every lane reaches, or a __syncthreads
// that not every live thread reaches, aborts (on a GPU it would hang or be undefined). A launch
// configuration that CUDA refuses is refused too, its error kept for cudaGetLastError.
//
// What it cannot show: races between blocks running at the same time, the memory model, speed.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <setjmp.h>
#include <ucontext.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __shared__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __shared__ static

namespace emu {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };

struct Fiber {
  ucontext_t start;  // where the fiber begins
  jmp_buf resume;    // where it waits
  bool started;
  State state;
  unsigned char slot[8];  // this lane's value in a warp collective
};

inline dim3 grid_dim, block_dim;
inline uint3 block_idx;
inline std::vector<Fiber> fibers;
inline std::vector<std::vector<char>> stacks;
inline int current = -1;
inline jmp_buf scheduler;
inline const std::function<void()>* body = nullptr;

// The device the launchers see (cudaGetDevice) and the multiprocessors of each: tests pick the
// device to steer the plans (row splits) without touching the code under test.
inline int device = 0;
inline int multiprocessors[] = {1, 4, 132};

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emulator: %s (block %u, thread %d)\n", what, block_idx.x, current);
  std::abort();
}

inline void wait(State at) {
  fibers[current].state = at;
  if (_setjmp(fibers[current].resume) == 0) _longjmp(scheduler, 1);
}

inline void fiber_entry() {
  (*body)();
  fibers[current].state = State::kDone;
  _longjmp(scheduler, 1);
}

// Releases the threads waiting at a barrier that every thread it concerns has reached.
inline bool release_barriers() {
  const int n = static_cast<int>(fibers.size());
  bool all_at_block_barrier = true, any_waiting = false;
  for (const Fiber& f : fibers) {
    all_at_block_barrier &= f.state == State::kAtBlockBarrier || f.state == State::kDone;
    any_waiting |= f.state != State::kDone;
  }
  if (!any_waiting) return false;
  if (all_at_block_barrier) {
    for (Fiber& f : fibers) {
      if (f.state == State::kAtBlockBarrier) f.state = State::kReady;
    }
    return true;
  }
  bool released = false;
  for (int w = 0; w < n; w += kWarp) {
    const int end = w + kWarp < n ? w + kWarp : n;
    bool all_at_warp_barrier = true, any_done = false;
    for (int i = w; i < end; ++i) {
      all_at_warp_barrier &= fibers[i].state == State::kAtWarpBarrier || fibers[i].state == State::kDone;
      any_done |= fibers[i].state == State::kDone;
    }
    bool any_at_warp_barrier = false;
    for (int i = w; i < end; ++i) any_at_warp_barrier |= fibers[i].state == State::kAtWarpBarrier;
    if (!all_at_warp_barrier || !any_at_warp_barrier) continue;
    if (any_done) fail("a warp collective that an exited lane did not reach");
    for (int i = w; i < end; ++i) fibers[i].state = State::kReady;
    released = true;
  }
  if (!released) fail("deadlock: threads wait at different barriers");
  return true;
}

inline void run_block(const std::function<void()>& kernel_body) {
  const int n = static_cast<int>(block_dim.x);
  fibers.assign(n, Fiber{});
  if (stacks.size() < fibers.size()) stacks.resize(fibers.size(), std::vector<char>(kStackBytes));
  body = &kernel_body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    getcontext(&f.start);
    f.start.uc_stack.ss_sp = stacks[i].data();
    f.start.uc_stack.ss_size = kStackBytes;
    f.start.uc_link = nullptr;  // fiber_entry never returns
    makecontext(&f.start, fiber_entry, 0);
    f.started = false;
    f.state = State::kReady;
  }
  do {
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state != State::kReady) continue;
      current = i;
      if (_setjmp(scheduler) != 0) continue;  // back from the fiber
      if (fibers[i].started) _longjmp(fibers[i].resume, 1);
      fibers[i].started = true;
      setcontext(&fibers[i].start);
    }
  } while (release_barriers());
  current = -1;
}

// What a CUDA device refuses to launch (sm_90: at most 1024 threads, 2^31 - 1 blocks of a 1-D
// grid, 48 KB of dynamic shared memory without an opt-in attribute, which the kernels never set).
// A launch is then skipped and its error left for cudaGetLastError, as CUDA does.
constexpr int kMaxBlockThreads = 1024;
constexpr unsigned long long kMaxGridBlocks = 2147483647ull;
constexpr size_t kMaxDynamicSharedBytes = 48 * 1024;
inline cudaError_t last_error = cudaSuccess;

inline cudaError_t launch_error(unsigned long long grid, long long block, size_t shared_bytes) {
  const bool valid = grid > 0 && grid <= kMaxGridBlocks && block > 0 && block <= kMaxBlockThreads &&
                     shared_bytes <= kMaxDynamicSharedBytes;
  return valid ? cudaSuccess : cudaErrorInvalidConfiguration;
}

// The error of the last call that failed since the previous query, cleared (cudaGetLastError).
inline cudaError_t take_last_error() {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}

// The rewritten form of kernel<<<grid, block, shared_bytes, stream>>>(args). The launch's
// arguments are taken as wide integers, so that a grid or block computed out of range reaches
// the check instead of wrapping around.
template <typename Body>
void launch(unsigned long long grid, long long block, size_t shared_bytes, cudaStream_t stream, Body&& kernel_call) {
  (void)stream;
  if (const cudaError_t e = launch_error(grid, block, shared_bytes); e != cudaSuccess) {
    last_error = e;
    return;
  }
  if (block % kWarp != 0) fail("block size is not a multiple of the warp size");
  grid_dim = dim3(grid, 1, 1);
  block_dim = dim3(static_cast<unsigned>(block), 1, 1);
  const std::function<void()> call = kernel_call;
  for (unsigned b = 0; b < static_cast<unsigned>(grid); ++b) {
    block_idx = make_uint3(b, 0, 0);
    run_block(call);
  }
}

inline uint3 thread_index() {
  if (current < 0) fail("threadIdx outside a kernel");
  return make_uint3(static_cast<unsigned>(current), 0, 0);
}

// The value that lane `lane` of the current warp published for a collective.
template <typename T>
inline T lane_value(int lane) {
  T v;
  std::memcpy(&v, fibers[current - current % kWarp + lane].slot, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::wait(emu::State::kAtBlockBarrier); }
inline void __threadfence() {}

template <typename T>
inline T __ldcg(const T* p) {
  return *p;
}

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = emu::kWarp) {
  static_assert(sizeof(T) <= sizeof(emu::Fiber::slot), "shuffled type too large");
  if (mask != 0xffffffffu || width != emu::kWarp) emu::fail("only full-warp shuffles are emulated");
  std::memcpy(emu::fibers[emu::current].slot, &value, sizeof(T));
  emu::wait(emu::State::kAtWarpBarrier);
  const int lane = emu::current % emu::kWarp;
  const int source = lane + static_cast<int>(delta);
  const bool inside = source < emu::kWarp && emu::current - lane + source < static_cast<int>(emu::fibers.size());
  const T result = inside ? emu::lane_value<T>(source) : value;
  emu::wait(emu::State::kAtWarpBarrier);
  return result;
}

inline int __any_sync(unsigned mask, int predicate) {
  if (mask != 0xffffffffu) emu::fail("only full-warp votes are emulated");
  const int own = predicate != 0;
  std::memcpy(emu::fibers[emu::current].slot, &own, sizeof(int));
  emu::wait(emu::State::kAtWarpBarrier);
  const int first = emu::current - emu::current % emu::kWarp;
  int any = 0;
  for (int i = first; i < first + emu::kWarp && i < static_cast<int>(emu::fibers.size()); ++i) {
    any |= emu::lane_value<int>(i - first);
  }
  emu::wait(emu::State::kAtWarpBarrier);
  return any;
}

inline int atomicAdd(int* address, int value) {
  const int old = *address;
  *address = old + value;
  return old;
}

inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}

inline double atomicAdd(double* address, double value) {
  const double old = *address;
  *address = old + value;
  return old;
}
