// Element types of the CUDA kernels and their vector access: half precision and float32
// accumulate in float, float64 in double; V consecutive elements move as one access of up to 16
// bytes. The host side picks the element type and vector width of a launch here too.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

#include "running_norm.h"

namespace fastnorm {
namespace cuda {

template <typename scalar_t>
struct Acc {
  using type = float;
};
template <>
struct Acc<double> {
  using type = double;
};

__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }

__device__ __forceinline__ void from_acc(float v, __half& out) { out = __float2half_rn(v); }
__device__ __forceinline__ void from_acc(float v, __nv_bfloat16& out) { out = __float2bfloat16_rn(v); }
__device__ __forceinline__ void from_acc(float v, float& out) { out = v; }
__device__ __forceinline__ void from_acc(double v, double& out) { out = v; }

// V consecutive elements, loaded and stored as one access (16 bytes at the widest).
template <typename scalar_t, int V>
struct alignas(sizeof(scalar_t) * V) Vec {
  scalar_t v[V];
};

template <typename scalar_t, int V>
__device__ __forceinline__ Vec<scalar_t, V> load(const scalar_t* p) {
  return *reinterpret_cast<const Vec<scalar_t, V>*>(p);
}

template <typename scalar_t, int V>
__device__ __forceinline__ void store(scalar_t* p, const Vec<scalar_t, V>& v) {
  *reinterpret_cast<Vec<scalar_t, V>*>(p) = v;
}

// mean as mean_hi + mean_lo in acc_t: (x - mean_hi) is exact for x near the mean (Sterbenz), so
// ((x - mean_hi) - mean_lo) keeps acc_t precision even where |mean| >> std.
template <typename acc_t>
struct SplitMean {
  acc_t hi, lo;
};

template <typename acc_t>
__device__ __forceinline__ SplitMean<acc_t> split_mean(double mean) {
  const acc_t hi = static_cast<acc_t>(mean);
  return {hi, static_cast<acc_t>(mean - static_cast<double>(hi))};
}

// ---- Host: the element type and vector width of a launch.

// The widest vector: 16 bytes of scalar_t.
template <typename scalar_t>
constexpr int kVectorWidth = 16 / sizeof(scalar_t);

// Calls fn with a value of the element type `kind`.
template <typename Fn>
auto with_scalar_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat16: return fn(__half());
    case ScalarKind::kBFloat16: return fn(__nv_bfloat16());
    case ScalarKind::kFloat32: return fn(0.0f);
    default: return fn(0.0);
  }
}

// Calls fn with std::integral_constant<int, V> for the vector width V (16 bytes, or 1).
template <typename scalar_t, typename Fn>
auto with_vector_width(int width, Fn&& fn) {
  if (width == kVectorWidth<scalar_t>) return fn(std::integral_constant<int, kVectorWidth<scalar_t>>());
  return fn(std::integral_constant<int, 1>());
}

// Whether ptr is aligned for 16-byte vector accesses.
inline bool is_vector_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

}  // namespace cuda
}  // namespace fastnorm
