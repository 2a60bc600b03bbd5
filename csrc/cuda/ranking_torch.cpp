// Torch binding of the CUDA learning-to-rank kernels: checks the tensors, prepares what the kernels read (with ATen
// ops on the tensors' device, on the current stream: each LambdaLoss row sorted by logit, its gains and length;
// each PListMLE row's rank order) and hands raw pointers to the torch-free launchers of ranking.cu. It includes no
// c10/cuda or ATen/cuda header (the stream comes in as an integer), so it also compiles against a CPU build of
// torch.
#include "ranking_torch.h"

#include <algorithm>
#include <cstdint>
#include <limits>

#include "kernel_device.h"
#include "ranking.h"

namespace fastcache {
namespace {

namespace kernel = fastcache::cuda;

// logits [Q, n] float32/float64 on a CUDA device, labels of its shape and dtype, mask bool of its shape; all
// contiguous and on one device.
void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mask, const char* op) {
  TORCH_CHECK(on_kernel_device(logits), op, ": logits must be a CUDA tensor, got ", logits.device());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits.scalar_type());
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), op, ": logits must be a contiguous [Q, n] tensor, got "
              "shape ", logits.sizes());
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": at most 2^31-1 queries, got ",
              logits.size(0));
  TORCH_CHECK(labels.sizes() == logits.sizes() && labels.is_contiguous() &&
                  labels.scalar_type() == logits.scalar_type(),
              op, ": labels must be contiguous, of the logits' shape ", logits.sizes(), " and dtype ",
              logits.scalar_type(), "; got ", labels.sizes(), " ", labels.scalar_type());
  TORCH_CHECK(mask.sizes() == logits.sizes() && mask.is_contiguous() && mask.scalar_type() == at::kBool, op,
              ": mask must be a contiguous bool tensor of the logits' shape ", logits.sizes());
  TORCH_CHECK(labels.device() == logits.device() && mask.device() == logits.device(), op,
              ": logits, labels and mask must be on one device, got ", logits.device(), ", ", labels.device(), ", ",
              mask.device());
}

CUstream_st* raw_stream(int64_t stream) { return reinterpret_cast<CUstream_st*>(static_cast<intptr_t>(stream)); }

// The launchers by element type.
const char* launch_lambda(const float* s, const float* y, const int64_t* order, const int64_t* lengths,
                          const float* gains, int64_t Q, int64_t n, const kernel::LambdaLossParams& prm,
                          float* grad, double* loss_sum, double* pair_count, int device, CUstream_st* stream) {
  return kernel::lambda_loss_f32(s, y, order, lengths, gains, Q, n, prm, grad, loss_sum, pair_count, device, stream);
}
const char* launch_lambda(const double* s, const double* y, const int64_t* order, const int64_t* lengths,
                          const double* gains, int64_t Q, int64_t n, const kernel::LambdaLossParams& prm,
                          double* grad, double* loss_sum, double* pair_count, int device, CUstream_st* stream) {
  return kernel::lambda_loss_f64(s, y, order, lengths, gains, Q, n, prm, grad, loss_sum, pair_count, device, stream);
}
const char* launch_plistmle(const float* s, const int64_t* order, const int64_t* lengths, const float* w, int64_t Q,
                            int64_t n, double eps, bool compute_grad, float* loss, float* grad, double* lhat,
                            int device, CUstream_st* stream) {
  return kernel::plistmle_f32(s, order, lengths, w, Q, n, eps, compute_grad, loss, grad, lhat, device, stream);
}
const char* launch_plistmle(const double* s, const int64_t* order, const int64_t* lengths, const double* w, int64_t Q,
                            int64_t n, double eps, bool compute_grad, double* loss, double* grad, double* lhat,
                            int device, CUstream_st* stream) {
  return kernel::plistmle_f64(s, order, lengths, w, Q, n, eps, compute_grad, loss, grad, lhat, device, stream);
}
const char* launch_listnet(const float* s, const float* y, const bool* mask, int64_t Q, int64_t n, bool compute_grad,
                           float* loss, float* grad, int device, CUstream_st* stream) {
  return kernel::listnet_f32(s, y, mask, Q, n, compute_grad, loss, grad, device, stream);
}
const char* launch_listnet(const double* s, const double* y, const bool* mask, int64_t Q, int64_t n,
                           bool compute_grad, double* loss, double* grad, int device, CUstream_st* stream) {
  return kernel::listnet_f64(s, y, mask, Q, n, compute_grad, loss, grad, device, stream);
}

// Calls f(T{}) with T the logits' element type (float or double).
template <typename F>
void with_element_type(const at::Tensor& logits, F f) {
  if (logits.scalar_type() == at::kFloat) {
    f(0.0f);
  } else {
    f(0.0);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lambda_loss_cuda(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, int64_t weighting, double mu, int64_t k, double sigma,
    double eps, bool binary_log, bool compute_grad, int64_t stream) {
  check_inputs(logits, labels, mask, "lambda_loss_cuda");
  TORCH_CHECK(weighting >= kernel::kWeightNone && weighting <= kernel::kWeightNDCGLoss2PP,
              "lambda_loss_cuda: weighting must be 0 (none), 1 (ndcg_loss1), 2 (ndcg_loss2), 3 (lambdarank) or 4 "
              "(ndcg_loss2pp), got ", weighting);
  TORCH_CHECK(eps >= 0, "lambda_loss_cuda: eps must be non-negative, got ", eps);
  const int64_t Q = logits.size(0), n = logits.size(1);
  TORCH_CHECK(n >= 1 && n <= kernel::kMaxLambdaList, "lambda_loss_cuda: lists of 1 to ", kernel::kMaxLambdaList,
              " documents, got n = ", n);
  // rows sorted by logit, descending, ties by position; padding (-inf here: real logits are finite) last
  auto sorted = logits.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity())
                    .sort(/*stable=*/true, /*dim=*/1, /*descending=*/true);
  const at::Tensor sorted_logits = std::get<0>(sorted).contiguous(), order = std::get<1>(sorted).contiguous();
  const at::Tensor sorted_labels = labels.gather(1, order).contiguous();
  const at::Tensor lengths = mask.sum({1}, /*keepdim=*/false, at::kLong).contiguous();
  // the gains by rank, G_r = (2^y+_r - 1) / max(maxDCG@k, eps) with y+ = max(y, 0) (-inf, negative labels and
  // padding: 0) and maxDCG@k = sum_{r < k} (2^y+_(r) - 1) / log2(r + 2) over the labels sorted descending; in
  // float64, numerator and denominator scaled by 2^-top (top: the row's largest y+), so no label overflows 2^y:
  // (2^y+ - 1)·2^-top = 2^(y+ - top)·(1 - 2^-y+). RankNet uses no gain: zeros.
  at::Tensor gains = at::zeros_like(sorted_logits);
  if (weighting != kernel::kWeightNone) {
    const int64_t kk = k > 0 ? std::min(k, n) : n;
    const at::Tensor positive = sorted_labels.to(at::kDouble).masked_fill(mask.gather(1, order).logical_not(), 0.0)
                                    .clamp_min(0.0);
    const at::Tensor top = positive.amax({1}, /*keepdim=*/true);
    const at::Tensor scaled = at::exp2(positive - top) * -at::expm1(positive * -0.693147180559945309417232121458);
    const at::Tensor ideal =
        std::get<0>(scaled.sort(/*stable=*/false, /*dim=*/1, /*descending=*/true)).narrow(1, 0, kk);
    const at::Tensor discount = at::arange(2, kk + 2, logits.options().dtype(at::kDouble)).log2();
    const at::Tensor max_dcg = at::maximum((ideal / discount).sum({1}, /*keepdim=*/true), eps * at::exp2(-top));
    // maxDCG 0 (eps = 0, no positive label): every gain is 0, not 0/0
    gains = at::where(max_dcg > 0, scaled / max_dcg, at::zeros_like(scaled)).to(logits.scalar_type()).contiguous();
  }

  const auto double_options = logits.options().dtype(at::kDouble);
  at::Tensor loss_sum = at::zeros({Q}, double_options), pair_count = at::zeros({Q}, double_options);
  at::Tensor grad = at::zeros_like(logits);
  const kernel::LambdaLossParams params{static_cast<int>(weighting), mu, sigma, eps, k, binary_log, compute_grad};
  const char* error = nullptr;
  with_element_type(logits, [&](auto zero) {
    using T = decltype(zero);
    error = launch_lambda(sorted_logits.data_ptr<T>(), sorted_labels.data_ptr<T>(), order.data_ptr<int64_t>(),
                          lengths.data_ptr<int64_t>(), gains.data_ptr<T>(), Q, n, params, grad.data_ptr<T>(),
                          loss_sum.data_ptr<double>(), pair_count.data_ptr<double>(), logits.device().index(),
                          raw_stream(stream));
  });
  TORCH_CHECK(error == nullptr, "lambda_loss_cuda: kernel launch failed: ", error);
  return {loss_sum, pair_count, grad};
}

std::tuple<at::Tensor, at::Tensor> plistmle_cuda(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, std::optional<at::Tensor> position_weights,
    bool respect_input_order, double eps, bool compute_grad, int64_t stream) {
  check_inputs(logits, labels, mask, "plistmle_cuda");
  TORCH_CHECK(eps > 0, "plistmle_cuda: eps must be positive, got ", eps);
  if (position_weights) {
    TORCH_CHECK(position_weights->sizes() == logits.sizes() && position_weights->is_contiguous() &&
                    position_weights->scalar_type() == logits.scalar_type() &&
                    position_weights->device() == logits.device(),
                "plistmle_cuda: position_weights must be contiguous, of the logits' shape ", logits.sizes(),
                ", dtype ", logits.scalar_type(), " and device ", logits.device());
  }
  const int64_t Q = logits.size(0), n = logits.size(1);
  // the rank order of each row: its real documents in input order or by label (descending, ties by position),
  // padding last (a real label may be -inf, so padding is moved back by a second stable sort on the mask)
  at::Tensor first = respect_input_order
                         ? at::arange(n, logits.options().dtype(at::kLong)).expand({Q, n}).contiguous()
                         : std::get<1>(labels.masked_fill(mask.logical_not(), -std::numeric_limits<double>::infinity())
                                           .sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor real_first = std::get<1>(mask.gather(1, first).to(at::kChar)
                                                .sort(/*stable=*/true, /*dim=*/1, /*descending=*/true));
  const at::Tensor order = first.gather(1, real_first).contiguous();
  const at::Tensor lengths = mask.sum({1}, /*keepdim=*/false, at::kLong).contiguous();

  at::Tensor loss = at::zeros({Q}, logits.options());
  at::Tensor grad = at::zeros_like(logits);
  at::Tensor lhat = at::empty({Q, n}, logits.options().dtype(at::kDouble));  // the kernel's scratch
  const char* error = nullptr;
  with_element_type(logits, [&](auto zero) {
    using T = decltype(zero);
    error = launch_plistmle(logits.data_ptr<T>(), order.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
                            position_weights ? position_weights->data_ptr<T>() : nullptr, Q, n, eps, compute_grad,
                            loss.data_ptr<T>(), grad.data_ptr<T>(), lhat.data_ptr<double>(), logits.device().index(),
                            raw_stream(stream));
  });
  TORCH_CHECK(error == nullptr, "plistmle_cuda: kernel launch failed: ", error);
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> listnet_cuda(at::Tensor logits, at::Tensor labels, at::Tensor mask,
                                                bool compute_grad, int64_t stream) {
  check_inputs(logits, labels, mask, "listnet_cuda");
  const int64_t Q = logits.size(0), n = logits.size(1);
  at::Tensor loss = at::zeros({Q}, logits.options());
  at::Tensor grad = at::zeros_like(logits);
  const char* error = nullptr;
  with_element_type(logits, [&](auto zero) {
    using T = decltype(zero);
    error = launch_listnet(logits.data_ptr<T>(), labels.data_ptr<T>(), mask.data_ptr<bool>(), Q, n, compute_grad,
                           loss.data_ptr<T>(), grad.data_ptr<T>(), logits.device().index(), raw_stream(stream));
  });
  TORCH_CHECK(error == nullptr, "listnet_cuda: kernel launch failed: ", error);
  return {loss, grad};
}

}  // namespace fastcache
