// The CUDA kernels of fastnorm::normalize_advantages as a launcher on raw pointers, free of torch
// headers: advantages_binding.cpp adapts tensors to it, and plain nvcc (or the CPU emulation in
// tests/cuda_emulator) compiles advantages.cu on its own.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "../advantages_math.h"
#include "running_norm.h"

namespace fastnorm {
namespace cuda {

// One call: x (outer, groups, inner), contiguous, reduced over dims 0 and 2, on the current device.
struct AdvantageProblem {
  ScalarKind dtype;
  int64_t outer, groups, inner;
  const void* x;
  void* out;          // contiguous, x's shape (x itself for in place)
  const bool* mask;   // flat: entry k reads mask[k / mask_group]; nullptr selects every entry
  int64_t mask_group;
  double* stats;      // (kNumAdvantageStatRows, groups)
  double min_std;
  bool unbiased;
};

// Where the columns layout finds its mask: x's mask as (outer, mask_cols) where column c reads
// c / (groups * inner / mask_cols), or a copy expanded in the workspace, per row or per entry.
enum class ColumnMask : int { kNone, kDirect, kExpandedRows, kExpandedEntries };

// How the kernels cover a problem, from its sizes, its layout and the device, never from values.
//  - runs: the runs of entries that share a group (all of x when groups == 1, else each
//    x[o, g, :]) are cut into pieces, a warp reduces each piece; the pieces' moments merge per
//    group in order, then the warps normalize their pieces;
//  - columns (groups > 1 with short inner runs): x as (outer, groups * inner) rows goes through
//    batch_moments' reduce (running_norm.cu), the columns' moments merge per group in order, then
//    column tiles normalize.
struct AdvantagePlan {
  bool columns;
  // Runs layout.
  int vector_width;  // entries per lane access: 16 bytes where the layout allows, else 1
  int64_t runs, run_length, pieces_per_run, piece_length;
  // Columns layout.
  ColumnMask column_mask;
  int64_t mask_cols;
  LaunchPlan reduce, normalize;
  // Both: threads that merge one group's pieces or columns (a warp, or a block when they are many).
  int group_threads;
  size_t workspace_bytes;  // device scratch: partial moments, per-group coefficients, an expanded mask
};

AdvantagePlan plan_normalize_advantages(const AdvantageProblem& p);

// Writes stats and y = (x - mean) / max(std_raw, min_std) per group (0 for a group without a
// selected finite entry) into p.out: 3 or 4 kernels (and a memset), enqueued on `stream` without
// synchronizing; errors are left for cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
void launch_normalize_advantages(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace fastnorm
