// Device time of fastnorm::cuda::launch_normalize_advantages (fp32) beside a device copy, with no torch:
// loops of calls over inputs rotated through >= 256 MB, and CUDA-graph replay of 20 captured calls
// (medians of 7). Built and run by bench/cuda_advantages_device_time.sh on a GPU machine.
#include <cuda_runtime.h>
#include <algorithm>
#include <cstdio>
#include <vector>
#include "advantages.h"
using namespace fastnorm::cuda;

#define CK(x)                                                                      \
  do {                                                                             \
    cudaError_t ck_ = (x);                                                         \
    if (ck_ != cudaSuccess) {                                                      \
      printf("CUDA %s at line %d\n", cudaGetErrorString(ck_), __LINE__);           \
      exit(1);                                                                     \
    }                                                                              \
  } while (0)

__global__ void fill(float* x, bool* m, int64_t n, int64_t nm, unsigned seed) {
  for (int64_t i = blockIdx.x * 256ll + threadIdx.x; i < n; i += gridDim.x * 256ll) {
    unsigned h = (unsigned)i * 2654435761u ^ seed; h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    x[i] = 0.5f + 2.0f * ((h & 0xffffff) / 16777216.0f - 0.5f);
    if (m && i < nm) m[i] = (h >> 24) < 205;
  }
}

struct Case { const char* name; int64_t outer, groups, inner, mask_group; };

template <typename F>
float median_us(F&& call, int calls, cudaStream_t s) {
  cudaEvent_t a, b; CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int r = 0; r < 7; ++r) {
    CK(cudaEventRecord(a, s)); for (int i = 0; i < calls; ++i) call(i); CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b)); float ms; CK(cudaEventElapsedTime(&ms, a, b)); t.push_back(ms * 1000 / calls);
  }
  std::sort(t.begin(), t.end()); return t[3];
}

int main() {
  const Case cases[] = {{"global 1M", 1, 1, 1 << 20, 0}, {"masked rows 1M", 1, 1, 1 << 20, 16},
                        {"per agent 1M", 1 << 16, 16, 1, 0}, {"global 16M", 1, 1, 1 << 24, 0},
                        {"masked rows 16M", 1, 1, 1 << 24, 16}, {"per agent 16M", 1 << 20, 16, 1, 0},
                        {"global 4K", 1, 1, 4096, 0}};
  cudaStream_t s; CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  printf("%-16s %8s %8s %8s %8s %7s %7s %6s %6s\n", "case", "op_loop", "cp_loop", "op_graph", "cp_graph",
         "f_loop", "f_graph", "pieces", "ws_KB");
  for (const Case& c : cases) {
    const int64_t n = c.outer * c.groups * c.inner, nm = c.mask_group ? n / c.mask_group : 0;
    const int R = (int)std::max<int64_t>(4, (256ll << 20) / (8 * n));
    std::vector<float*> x(R), y(R); std::vector<bool*> m(R, nullptr);
    for (int i = 0; i < R; ++i) {
      CK(cudaMalloc(&x[i], 4 * n)); CK(cudaMalloc(&y[i], 4 * n));
      if (nm) CK(cudaMalloc(&m[i], nm));
      fill<<<1024, 256, 0, s>>>(x[i], m[i], n, nm, 17 + i);
    }
    double* stats; CK(cudaMalloc(&stats, 8 * 4 * c.groups));
    std::vector<AdvantageProblem> ps(R);
    for (int i = 0; i < R; ++i) {
      AdvantageProblem& p = ps[i]; p = AdvantageProblem{};
      p.dtype = ScalarKind::kFloat32; p.outer = c.outer; p.groups = c.groups; p.inner = c.inner;
      p.x = x[i]; p.out = y[i]; p.mask = m[i]; p.mask_group = c.mask_group; p.stats = stats;
      p.min_std = 1e-4; p.unbiased = true;
    }
    const AdvantagePlan plan = plan_advantages(ps[0], AdvantagePasses::kBoth);
    void* ws; CK(cudaMalloc(&ws, std::max<size_t>(plan.workspace_bytes, 256)));
    auto op = [&](int i) { launch_normalize_advantages(ps[i % R], plan, ws, s); };
    auto cp = [&](int i) { CK(cudaMemcpyAsync(y[i % R], x[i % R], 4 * n, cudaMemcpyDeviceToDevice, s)); };
    for (int i = 0; i < R; ++i) { op(i); cp(i); }
    CK(cudaStreamSynchronize(s)); CK(cudaGetLastError());
    const int calls = std::max(R, 64);
    const float op_loop = median_us(op, calls, s), cp_loop = median_us(cp, calls, s);
    auto graph_of = [&](auto&& f) {
      cudaGraph_t g; cudaGraphExec_t e;
      CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
      for (int i = 0; i < 20; ++i) f(i);
      CK(cudaStreamEndCapture(s, &g)); CK(cudaGraphInstantiate(&e, g, 0)); return e;
    };
    cudaGraphExec_t gop = graph_of(op), gcp = graph_of(cp);
    auto replay = [&](cudaGraphExec_t e) { return [&, e](int) { CK(cudaGraphLaunch(e, s)); }; };
    CK(cudaGraphLaunch(gop, s)); CK(cudaGraphLaunch(gcp, s)); CK(cudaStreamSynchronize(s));
    const float op_graph = median_us(replay(gop), 10, s) / 20, cp_graph = median_us(replay(gcp), 10, s) / 20;
    double h[4]; CK(cudaMemcpy(h, stats, sizeof h, cudaMemcpyDeviceToHost));
    printf("%-16s %8.2f %8.2f %8.2f %8.2f %7.3f %7.3f %6lld %6zu  count=%.0f mean=%.6f std=%.6f max|y|=%.4f\n",
           c.name, op_loop, cp_loop, op_graph, cp_graph, cp_loop / op_loop, cp_graph / op_graph,
           (long long)(plan.runs * plan.pieces_per_run), plan.workspace_bytes / 1024, h[0], h[1], h[2], h[3]);
    for (int i = 0; i < R; ++i) { cudaFree(x[i]); cudaFree(y[i]); if (m[i]) cudaFree(m[i]); }
    cudaFree(stats); cudaFree(ws);
  }
  return 0;
}
