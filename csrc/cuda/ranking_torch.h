// Torch binding of the CUDA learning-to-rank kernels (built only with the CUDA extension). See ranking_torch.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastcache {

// The arguments and results of lambda_loss_cpu, plistmle_cpu and listnet_cpu (csrc/cpu/ranking.h) on CUDA tensors,
// plus the raw cudaStream_t to launch on (as an integer: torch.cuda.current_stream(device).cuda_stream).
std::tuple<at::Tensor, at::Tensor, at::Tensor> lambda_loss_cuda(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, int64_t weighting, double mu, int64_t k, double sigma,
    double eps, bool binary_log, bool compute_grad, int64_t stream);

std::tuple<at::Tensor, at::Tensor> plistmle_cuda(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, std::optional<at::Tensor> position_weights,
    bool respect_input_order, double eps, bool compute_grad, int64_t stream);

std::tuple<at::Tensor, at::Tensor> listnet_cuda(at::Tensor logits, at::Tensor labels, at::Tensor mask,
                                                bool compute_grad, int64_t stream);

}  // namespace fastcache
