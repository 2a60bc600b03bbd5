// L2 row normalisation as torch.nn.functional.normalize computes it, and its backward, one pass per row each.
//
// Forward, per row x (any floating dtype, read once; the output in the compute dtype T, fp32 or fp64):
//   divisor = max(‖x‖, eps) (the sum of squares accumulated in fp64),  x̂ = x · (1 / divisor)
// Backward of x̂ = x / max(‖x‖, eps), in place on g = dL/dx̂ (T):
//   dL/dx = (g - x̂·(x̂ᵀg)) · (1 / divisor)     where ‖x‖ > eps (the radial part of g removed)
//   dL/dx = g · (1 / eps)                      where ‖x‖ <= eps (the divisor is the constant eps there)
// The reciprocal is rounded once per row (from fp64) and multiplied: within an ulp of F.normalize's division,
// and several times faster (a vector division costs ~10 cycles; 64 rows of 384 were division-bound).
// The contrastive op's slab strategy normalises its queries and documents with these on the cpu backend: the same
// maths as its PyTorch form (four and six ATen ops per tensor), without the intermediate passes and dispatches
// that dominate small batches.
#include "normalize.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>

#include "contrastive_row.h"  // FASTCACHE_INLINE, FASTCACHE_SIMD_CLONES

namespace fastcache {
namespace {

// Rows per parallel task: ATen's grain for elementwise work (32K elements), so that small batches stay on one
// thread (a parallel region costs more than normalising 64 rows of 384).
int64_t grain(int64_t dim) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(dim, 1)); }

// Σ_j a_j·b_j in fp64, in 8 independent lanes so that the loop vectorises without reassociation.
template <typename A, typename B>
FASTCACHE_INLINE double dot_lanes(const A* a, const B* b, int64_t n) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] += static_cast<double>(a[j + l]) * static_cast<double>(b[j + l]);
  double sum = 0.0;
  for (int l = 0; l < 8; ++l) sum += lane[l];
  for (; j < n; ++j) sum += static_cast<double>(a[j]) * static_cast<double>(b[j]);
  return sum;
}

template <typename In, typename T>
FASTCACHE_INLINE void normalize_rows(const In* x, int64_t ldx, T* y, T* divisor, int64_t dim, double eps,
                                     int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    const In* xr = x + r * ldx;
    T* yr = y + r * dim;
    const double d = std::max(std::sqrt(dot_lanes(xr, xr, dim)), eps);
    const T inverse = static_cast<T>(1.0 / d);
    for (int64_t j = 0; j < dim; ++j) yr[j] = static_cast<T>(xr[j]) * inverse;
    divisor[r] = static_cast<T>(d);
  }
}

template <typename T>
FASTCACHE_INLINE void normalize_backward_rows(T* g, const T* y, const T* divisor, int64_t dim, double eps,
                                              int64_t begin, int64_t end) {
  for (int64_t r = begin; r < end; ++r) {
    T* gr = g + r * dim;
    const T* yr = y + r * dim;
    const double d = divisor[r];
    const T radial = d > eps ? static_cast<T>(dot_lanes(yr, gr, dim)) : T(0);
    const T inverse = static_cast<T>(1.0 / d);
    for (int64_t j = 0; j < dim; ++j) gr[j] = (gr[j] - yr[j] * radial) * inverse;
  }
}

// The fp32 loops compiled once per instruction set (AVX-512, AVX2, baseline) and picked at load time on x86-64.
template <typename In>
FASTCACHE_SIMD_CLONES void normalize_rows_float(const In* x, int64_t ldx, float* y, float* divisor, int64_t dim,
                                                double eps, int64_t begin, int64_t end) {
  normalize_rows(x, ldx, y, divisor, dim, eps, begin, end);
}

FASTCACHE_SIMD_CLONES void normalize_backward_rows_float(float* g, const float* y, const float* divisor,
                                                         int64_t dim, double eps, int64_t begin, int64_t end) {
  normalize_backward_rows(g, y, divisor, dim, eps, begin, end);
}

void backward_rows(float* g, const float* y, const float* divisor, int64_t dim, double eps, int64_t begin,
                   int64_t end) {
  normalize_backward_rows_float(g, y, divisor, dim, eps, begin, end);
}

void backward_rows(double* g, const double* y, const double* divisor, int64_t dim, double eps, int64_t begin,
                   int64_t end) {
  normalize_backward_rows(g, y, divisor, dim, eps, begin, end);
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D [rows, dim], got ", t.sizes());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> l2_normalize_cpu(const at::Tensor& x, at::ScalarType dtype, double eps) {
  check_rows(x, "x");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "dtype must be float32 or float64, got ", dtype);
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "x must be a floating-point tensor, got ", x.scalar_type());
  TORCH_CHECK(eps > 0, "eps must be positive, got ", eps);
  const at::Tensor src = x.stride(1) == 1 ? x : x.contiguous();
  const int64_t rows = src.size(0), dim = src.size(1);
  at::Tensor y = at::empty({rows, dim}, src.options().dtype(dtype));
  at::Tensor divisor = at::empty({rows, 1}, y.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, src.scalar_type(), "l2_normalize_cpu", [&] {
    using In = scalar_t;
    const In* xp = src.data_ptr<In>();
    const int64_t ldx = src.stride(0);
    if (dtype == at::kFloat) {
      float* yp = y.data_ptr<float>();
      float* dp = divisor.data_ptr<float>();
      at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
        normalize_rows_float(xp, ldx, yp, dp, dim, eps, begin, end);
      });
    } else {
      double* yp = y.data_ptr<double>();
      double* dp = divisor.data_ptr<double>();
      at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
        normalize_rows(xp, ldx, yp, dp, dim, eps, begin, end);
      });
    }
  });
  return {y, divisor};
}

at::Tensor l2_normalize_backward_cpu_(at::Tensor grad, const at::Tensor& normalized, const at::Tensor& divisor,
                                      double eps) {
  check_rows(grad, "grad");
  check_rows(normalized, "normalized");
  const int64_t rows = grad.size(0), dim = grad.size(1);
  TORCH_CHECK(grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble,
              "grad must be float32 or float64, got ", grad.scalar_type());
  TORCH_CHECK(grad.is_contiguous(), "grad must be contiguous");
  TORCH_CHECK(normalized.sizes() == grad.sizes() && normalized.scalar_type() == grad.scalar_type() &&
                  normalized.is_contiguous(),
              "normalized must be a contiguous ", grad.scalar_type(), " tensor of grad's shape ", grad.sizes());
  TORCH_CHECK(divisor.device().is_cpu() && divisor.scalar_type() == grad.scalar_type() && divisor.is_contiguous() &&
                  divisor.numel() == rows,
              "divisor must be a contiguous ", grad.scalar_type(), " CPU tensor with one value per row (", rows, ")");
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "l2_normalize_backward_cpu_", [&] {
    scalar_t* g = grad.data_ptr<scalar_t>();
    const scalar_t* y = normalized.data_ptr<scalar_t>();
    const scalar_t* d = divisor.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain(dim), [&](int64_t begin, int64_t end) {
      backward_rows(g, y, d, dim, eps, begin, end);
    });
  });
  return grad;
}

}  // namespace fastcache
