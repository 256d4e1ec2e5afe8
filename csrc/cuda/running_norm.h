// The CUDA kernels of fastnorm::running_norm, ::normalize and the split pair ::batch_moments and
// ::merge_normalize as launchers on raw pointers, free of torch headers: running_norm_binding.cpp
// adapts tensors to them, and plain nvcc (or the CPU emulation in tests/cuda_emulator) compiles
// running_norm.cu on its own.
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#include "../running_norm_math.h"

namespace fastnorm {
namespace cuda {

enum class ScalarKind : int { kFloat16, kBFloat16, kFloat32, kFloat64 };

// One call: x viewed as `rows` rows of `cols` contiguous columns, on the current device.
struct Problem {
  ScalarKind dtype;
  int64_t rows, cols;
  const void* x;
  int64_t x_row_stride;  // in elements, as out_row_stride
  bool with_output;      // y wanted (running_norm may skip it; its diag then has NaN clip rows)
  void* out;             // y where with_output (null for an empty batch)
  int64_t out_row_stride;
  // Selection, contiguous (rows, mask_cols) bools where column c reads mask column
  // c / (cols / mask_cols); nullptr selects every entry.
  const bool* mask;
  int64_t mask_cols;
  double* mean;  // (cols) float64 running statistics: updated by running_norm, read by normalize
  double* var;
  double* count;
  double* diag;  // (kNumDiagRows, cols), running_norm only
  UpdateParams update;
  double eps, min_std, max_std, clip;  // min_std 0, max_std and clip +inf where unbounded
  bool eps_on_std;                     // the divisor is sqrt(var) + eps, not sqrt(var + eps)
  double* moments;                     // batch_moments: the batch's table (kNumMomentRows, cols)
  const double* parts;                 // merge_normalize: num_parts tables (kNumMomentRows, cols) in a row
  int64_t num_parts;
  double* scale;       // (cols) float64 long-run scale, updated with the statistics; nullptr: not tracked
  double min_std_rel;  // the relative floor min_std_rel * scale (0: none; scale must be set otherwise)
  // normalize_with="previous": y uses the statistics from before the update in every column whose
  // count was > 0 (the others: the updated ones). running_norm then writes y of those columns in
  // its reduce pass, while it reads x, unless out overlaps x (the reduce may read x again).
  bool previous;
  bool out_overlaps_x;
  int64_t* steps;  // 0-dim update counter, incremented once by the launch (nullptr: none)
};

// How the kernels cover a problem: chosen from its sizes, its layout and the device, never from
// tensor values, so the same call always launches the same work (and CUDA graphs replay it).
struct LaunchPlan {
  int vector_width;        // columns per thread: one 16-byte load per row where the layout allows, else 1
  int column_threads;      // threads of a block across columns (the rest of the block spans rows)
  int64_t column_tiles;    // blocks across columns
  int64_t row_splits;      // blocks across rows; 1: a single launch reduces, merges and normalizes
  int64_t rows_per_split;
  size_t workspace_bytes;  // device scratch: partial moments, y's coefficients, clip and arrival counters
};

LaunchPlan plan_running_norm(const Problem& p);

// Reduces x, merges the batch into the running statistics, fills diag (every row: no reset
// needed), increments p.steps and, with p.with_output, writes y: one kernel when
// plan.row_splits == 1, else a memset of the clip and arrival counters, a reduce and a normalize
// kernel (which, with p.previous, skips the columns whose y the reduce wrote). Enqueued on `stream`
// without synchronizing; errors are left for cudaGetLastError (C10_CUDA_KERNEL_LAUNCH_CHECK).
void launch_running_norm(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream);

// The batch-moments table of x (MomentRow rows) into p.moments, with the reduce of
// launch_running_norm: given the plan running_norm would get (plan_running_norm; p.with_output
// false here, so the same bits where out's layout does not narrow running_norm's vectors), the
// table holds exactly the moments that running_norm merges into the statistics.
void launch_batch_moments(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream);

LaunchPlan plan_normalize(const Problem& p);

// plan_normalize's plan with merge_normalize's workspace: y's coefficients per column.
LaunchPlan plan_merge_normalize(const Problem& p);

// y = clamp((x - mean) / bounded std, -clip, clip) into p.out, with the statistics unchanged.
void launch_normalize(const Problem& p, const LaunchPlan& plan, cudaStream_t stream);

// Merges the p.num_parts >= 1 tables p.parts per column in part order (merge_column_parts), updates
// the running statistics with the merged batch, fills diag, increments p.steps and, with
// p.with_output, writes y for x (p.rows may be 0, and p.cols too: then only the step is counted): a
// merge kernel over the columns, then the normalize kernel of plan (plan_merge_normalize), which
// counts the clipped entries of x.
void launch_merge_normalize(const Problem& p, const LaunchPlan& plan, void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastnorm
