// Fused learning-to-rank losses on CPU (forward and backward in one pass per query). See ranking.cpp.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace fastcache {

// LambdaLoss on padded logits [Q, n] (labels [Q, n], mask [Q, n] bool): per query the sum of the pair losses,
// the number of pairs and d(sum)/dlogits. weighting: 0 none, 1 NDCGLoss1, 2 NDCGLoss2, 3 LambdaRank, 4 NDCGLoss2++.
// k <= 0 means every document.
std::tuple<at::Tensor, at::Tensor, at::Tensor> lambda_loss_cpu(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, int64_t weighting, double mu, int64_t k, double sigma,
    double eps, bool binary_log, bool compute_grad);

// Position-aware ListMLE: per-query losses [Q] and d(loss_q)/dlogits. position_weights [Q, n] by rank, or none (1).
std::tuple<at::Tensor, at::Tensor> plistmle_cpu(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, std::optional<at::Tensor> position_weights,
    bool respect_input_order, double eps, bool compute_grad);

// ListNet: per-query cross-entropy between softmax(labels) and softmax(logits) [Q] and d(loss_q)/dlogits.
std::tuple<at::Tensor, at::Tensor> listnet_cpu(at::Tensor logits, at::Tensor labels, at::Tensor mask,
                                               bool compute_grad);

}  // namespace fastcache
