// The CUDA kernels of fastnorm::normalize_advantages and its split pair ::advantage_moments and
// ::normalize_advantages_from as launchers on raw pointers, free of torch headers:
// advantages_binding.cpp adapts tensors to them, and plain nvcc (or the CPU emulation in
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
  double* stats;      // (kNumAdvantageStatRows, groups); unused by advantage_moments
  double min_std;
  bool unbiased;
  double* moments;      // advantage_moments: x's table (kNumAdvantageMomentRows, groups); else nullptr
  const double* parts;  // normalize_advantages_from: num_parts tables (kNumAdvantageMomentRows, groups) in a row
  int64_t num_parts;
};

// The passes a call runs: normalize_advantages both; advantage_moments the reduce, its merge per
// group stored as a moments table; normalize_advantages_from the normalize, after merging parts.
enum class AdvantagePasses : int { kBoth, kReduce, kNormalize };

// Where the columns layout finds its mask: x's mask as (outer, mask_cols) where column c reads
// c / (groups * inner / mask_cols), or a copy expanded in the workspace, per row or per entry.
enum class ColumnMask : int { kNone, kDirect, kExpandedRows, kExpandedEntries };

// How the kernels cover a problem, from its sizes, its layout and the device, never from values.
//  - runs: the runs of entries that share a group (all of x when groups == 1, else each
//    x[o, g, :]) are cut into pieces, a warp reduces each piece; the pieces' moments merge per
//    group in order, then the warps normalize their pieces (one run: a partial per reduce block,
//    merged by each normalize block, no merge kernel);
//  - columns (groups > 1 with short inner runs): x as (outer, groups * inner) rows goes through
//    batch_moments' reduce (running_norm.cu), the columns' moments merge per group in order, then
//    column tiles normalize (inner == 1: straight from the columns' moments, no merge kernel).
struct AdvantagePlan {
  AdvantagePasses passes;
  bool columns;
  // Runs layout. The reduce's vectors do not depend on out, so advantage_moments reduces as
  // normalize_advantages does (the same bits) whatever out's alignment.
  int vector_width;            // entries per lane access in the reduce: 16 bytes where x and the mask allow, else 1
  int normalize_vector_width;  // the same in the normalize, where x and out allow
  int64_t runs, run_length, pieces_per_run, piece_length;
  // Columns layout.
  ColumnMask column_mask;
  int64_t mask_cols;
  LaunchPlan reduce, normalize;
  // Both: threads that merge one group's pieces or columns (a warp, or a block when they are many).
  int group_threads;
  size_t workspace_bytes;  // device scratch of the passes: partial moments, an expanded mask, per-group coefficients
};

AdvantagePlan plan_advantages(const AdvantageProblem& p, AdvantagePasses passes);

// The launchers enqueue their kernels on `stream` without synchronizing; errors are left for
// cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK). Each takes the plan of its passes.
//
// normalize_advantages (kBoth): writes stats and y = (x - mean) / max(std_raw, min_std) per group
// (0 for a group without a selected finite entry) into p.out: 2 kernels for one run (groups ==
// 1), memset + 2 for columns of a group each (inner == 1), else 3 or 4 (and a memset).
void launch_normalize_advantages(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                 cudaStream_t stream);

// advantage_moments (kReduce): the reduce and merge of normalize_advantages, each group's merged
// moments, min and max stored into p.moments (store_group_moments), so that
// normalize_advantages_from on parts = that table alone gives normalize_advantages' bits.
void launch_advantage_moments(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                              cudaStream_t stream);

// normalize_advantages_from (kNormalize): a kernel merges each group of the p.num_parts >= 1
// tables p.parts in part order (merge_group_parts) and writes its stats; then, where x has
// entries (p.mask is nullptr), the normalize kernel of normalize_advantages writes y.
void launch_normalize_advantages_from(const AdvantageProblem& p, const AdvantagePlan& plan, void* workspace,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace fastnorm
