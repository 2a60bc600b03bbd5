// L2 row normalisation and its backward (CPU). See normalize.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastcache {

// (x / max(‖x‖, eps) in dtype, the divisors max(‖x‖, eps) [rows, 1] in dtype) for a 2-D CPU tensor x.
std::tuple<at::Tensor, at::Tensor> l2_normalize_cpu(const at::Tensor& x, at::ScalarType dtype, double eps);

// In place: grad <- (grad - x̂·(x̂ᵀgrad)) / divisor, or grad / eps on rows whose norm was below eps; returns grad.
at::Tensor l2_normalize_backward_cpu_(at::Tensor grad, const at::Tensor& normalized, const at::Tensor& divisor,
                                      double eps);

}  // namespace fastcache
