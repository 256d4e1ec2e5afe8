#include "running_norm_args.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <cmath>

#include "running_norm_math.h"

namespace fastnorm {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

void check_statistic(const at::Tensor& x, const at::Tensor& stat, const at::Tensor& mean, const char* name) {
  TORCH_CHECK(stat.scalar_type() == at::kDouble, "fastnorm: ", name, " must be float64, got ", stat.scalar_type());
  TORCH_CHECK(stat.is_contiguous(), "fastnorm: ", name, " must be contiguous");
  TORCH_CHECK(stat.device() == x.device(), "fastnorm: ", name, " is on ", stat.device(), " but x is on ", x.device());
  TORCH_CHECK(stat.sizes() == mean.sizes(), "fastnorm: ", name, " has shape ", stat.sizes(),
              " but mean has shape ", mean.sizes());
}

void check_bounds(double eps, std::optional<double> min_std, std::optional<double> max_std,
                  std::optional<double> clip) {
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "fastnorm: eps must be finite and >= 0, got ", eps);
  TORCH_CHECK(!min_std || (std::isfinite(*min_std) && *min_std >= 0), "fastnorm: min_std must be >= 0, got ",
              *min_std);
  TORCH_CHECK(!max_std || *max_std > 0, "fastnorm: max_std must be > 0, got ", *max_std);
  TORCH_CHECK(!min_std || !max_std || *min_std <= *max_std, "fastnorm: min_std (", *min_std,
              ") must not exceed max_std (", *max_std, ")");
  TORCH_CHECK(!clip || *clip > 0, "fastnorm: clip must be > 0, got ", *clip);
}

// x: (*batch, *shape) of a supported float dtype.
RowsGeometry check_x_shape(const at::Tensor& x, at::IntArrayRef shape) {
  TORCH_CHECK(is_supported_float(x.scalar_type()),
              "fastnorm: x must be float16, bfloat16, float32 or float64, got ", x.scalar_type());
  const int64_t stat_dims = static_cast<int64_t>(shape.size());
  TORCH_CHECK(x.dim() >= stat_dims && x.sizes().slice(x.dim() - stat_dims) == shape,
              "fastnorm: x must have shape (*batch, ", shape, "), got ", x.sizes());
  const int64_t cols = c10::multiply_integers(shape);
  const int64_t rows = cols == 0 ? 0 : x.numel() / cols;
  return {rows, cols, 1};
}

// x: (*batch, *mean.shape) of a supported float dtype on mean's device.
RowsGeometry check_x(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var) {
  check_statistic(x, mean, mean, "mean");
  check_statistic(x, var, mean, "var");
  return check_x_shape(x, mean.sizes());
}

// mask: bool, a prefix of x's shape covering its batch_dims; sets g.mask_cols.
void check_mask(const at::Tensor& x, const std::optional<at::Tensor>& mask, int64_t batch_dims, RowsGeometry& g) {
  if (!mask) return;
  TORCH_CHECK(mask->scalar_type() == at::kBool, "fastnorm: mask must be bool, got ", mask->scalar_type());
  TORCH_CHECK(mask->device() == x.device(), "fastnorm: mask is on ", mask->device(), " but x is on ", x.device());
  TORCH_CHECK(mask->dim() >= batch_dims && mask->dim() <= x.dim() && mask->sizes() == x.sizes().slice(0, mask->dim()),
              "fastnorm: mask must have a prefix of x's shape ", x.sizes(), " covering the ", batch_dims,
              " batch dims, got ", mask->sizes());
  g.mask_cols = g.rows == 0 ? 1 : mask->numel() / g.rows;
}

void check_out(const at::Tensor& x, const at::Tensor& out) {
  TORCH_CHECK(out.sizes() == x.sizes(), "fastnorm: out must have x's shape ", x.sizes(), ", got ", out.sizes());
  TORCH_CHECK(out.scalar_type() == x.scalar_type(), "fastnorm: out must have x's dtype ", x.scalar_type(),
              ", got ", out.scalar_type());
  TORCH_CHECK(out.device() == x.device(), "fastnorm: out is on ", out.device(), " but x is on ", x.device());
  at::assert_no_internal_overlap(out);
  at::assert_no_partial_overlap(out, x);
}

}  // namespace

RowsGeometry check_running_norm_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                     const at::Tensor& mean, const at::Tensor& var, const at::Tensor& count,
                                     const std::optional<at::Tensor>& out, const at::Tensor& diag,
                                     std::optional<double> momentum, std::optional<double> max_count, double eps,
                                     std::optional<double> min_std, std::optional<double> max_std,
                                     std::optional<double> clip) {
  RowsGeometry g = check_x(x, mean, var);
  check_statistic(x, count, mean, "count");
  TORCH_CHECK(diag.scalar_type() == at::kDouble && diag.is_contiguous() && diag.dim() == 2 &&
                  diag.size(0) == 6 && diag.size(1) == g.cols,
              "fastnorm: diag must be a contiguous float64 tensor of shape (6, ", g.cols, "), got ", diag.sizes(), " ",
              diag.scalar_type());
  TORCH_CHECK(diag.device() == x.device(), "fastnorm: diag is on ", diag.device(), " but x is on ", x.device());
  TORCH_CHECK(!momentum || (*momentum >= 0 && *momentum <= 1), "fastnorm: momentum must be in [0, 1], got ",
              *momentum);
  TORCH_CHECK(!max_count || *max_count > 0, "fastnorm: max_count must be > 0, got ", *max_count);
  check_bounds(eps, min_std, max_std, clip);
  if (out) check_out(x, *out);
  check_mask(x, mask, x.dim() - mean.dim(), g);
  return g;
}

double* check_scale_args(const at::Tensor& x, const at::Tensor& mean, const std::optional<at::Tensor>& scale,
                         std::optional<double> min_std_rel) {
  TORCH_CHECK(!min_std_rel || (std::isfinite(*min_std_rel) && *min_std_rel >= 0),
              "fastnorm: min_std_rel must be finite and >= 0, got ", *min_std_rel);
  TORCH_CHECK(!min_std_rel || scale, "fastnorm: min_std_rel needs the long-run scale, got scale=None");
  if (!scale) return nullptr;
  check_statistic(x, *scale, mean, "scale");
  return scale->data_ptr<double>();
}

int64_t* check_steps_arg(const at::Tensor& x, const std::optional<at::Tensor>& steps) {
  if (!steps) return nullptr;
  TORCH_CHECK(steps->scalar_type() == at::kLong && steps->dim() == 0,
              "fastnorm: steps must be a 0-dim int64 tensor, got ", steps->sizes(), " ", steps->scalar_type());
  TORCH_CHECK(steps->device() == x.device(), "fastnorm: steps is on ", steps->device(), " but x is on ", x.device());
  return steps->data_ptr<int64_t>();
}

RowsGeometry check_batch_moments_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                      const at::Tensor& moments, const std::optional<at::Tensor>& shift) {
  TORCH_CHECK(moments.scalar_type() == at::kDouble && moments.is_contiguous() && moments.dim() >= 1 &&
                  moments.size(0) == kNumMomentRows,
              "fastnorm: moments must be a contiguous float64 tensor of shape (", int(kNumMomentRows),
              ", *shape), got ", moments.sizes(), " ", moments.scalar_type());
  TORCH_CHECK(moments.device() == x.device(), "fastnorm: moments is on ", moments.device(), " but x is on ",
              x.device());
  RowsGeometry g = check_x_shape(x, moments.sizes().slice(1));
  check_mask(x, mask, x.dim() - (moments.dim() - 1), g);
  if (shift) {
    TORCH_CHECK(shift->scalar_type() == at::kDouble && shift->is_contiguous() &&
                    shift->sizes() == moments.sizes().slice(1),
                "fastnorm: shift must be a contiguous float64 tensor of shape ", moments.sizes().slice(1), ", got ",
                shift->sizes(), " ", shift->scalar_type());
    TORCH_CHECK(shift->device() == x.device(), "fastnorm: shift is on ", shift->device(), " but x is on ", x.device());
  }
  return g;
}

RowsGeometry check_merge_normalize_args(const at::Tensor& x, const std::optional<at::Tensor>& mask,
                                        const at::Tensor& parts, const at::Tensor& mean, const at::Tensor& var,
                                        const at::Tensor& count, const std::optional<at::Tensor>& out,
                                        const at::Tensor& diag, std::optional<double> momentum,
                                        std::optional<double> max_count, double eps, std::optional<double> min_std,
                                        std::optional<double> max_std, std::optional<double> clip) {
  const RowsGeometry g =
      check_running_norm_args(x, mask, mean, var, count, out, diag, momentum, max_count, eps, min_std, max_std, clip);
  TORCH_CHECK(parts.scalar_type() == at::kDouble && parts.is_contiguous() && parts.dim() == mean.dim() + 2 &&
                  parts.size(0) >= 1 && parts.size(1) == kNumMomentRows && parts.sizes().slice(2) == mean.sizes(),
              "fastnorm: parts must be a contiguous float64 tensor of shape (num_parts >= 1, ", int(kNumMomentRows),
              ", ", mean.sizes(), "), got ", parts.sizes(), " ", parts.scalar_type());
  TORCH_CHECK(parts.device() == x.device(), "fastnorm: parts is on ", parts.device(), " but x is on ", x.device());
  return g;
}

RowsGeometry check_normalize_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                  const at::Tensor& out, double eps, std::optional<double> min_std,
                                  std::optional<double> max_std, std::optional<double> clip) {
  RowsGeometry g = check_x(x, mean, var);
  check_bounds(eps, min_std, max_std, clip);
  check_out(x, out);
  return g;
}

at::Tensor readable_rows(const at::Tensor& x, const RowsGeometry& g) {
  at::Tensor rows = x.reshape({g.rows, g.cols});
  if (g.cols > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  return rows;
}

at::Tensor mask_rows(const at::Tensor& mask, const RowsGeometry& g) {
  return mask.reshape({g.rows, g.mask_cols}).contiguous();
}

at::Tensor writable_rows(const at::Tensor& out, const RowsGeometry& g) {
  at::Tensor rows = out.reshape({g.rows, g.cols});
  const bool is_view = rows.is_alias_of(out) || out.numel() == 0;
  if (is_view && (g.cols <= 1 || rows.stride(1) == 1)) return rows;
  return at::empty({g.rows, g.cols}, out.options());
}

void finish_writable_rows(const at::Tensor& out, const at::Tensor& rows) {
  if (!rows.is_alias_of(out) && out.numel() > 0) out.copy_(rows.view(out.sizes()));
}

}  // namespace fastnorm
