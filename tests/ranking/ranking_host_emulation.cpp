// Test support: the CUDA ranking kernels (csrc/cuda/ranking_kernel.cuh) and their torch binding
// (csrc/cuda/ranking_torch.cpp, accepting CPU tensors here) compiled for the host, with CUDA's built-in names
// emulated by std::threads (cuda_host_emulation.h), so that the maths is checked on machines without a GPU
// (tests/ranking/test_ranking_host_emulation.py). The launchers below replace ranking.cu's: the same grids, run on the host.
#include <torch/extension.h>

#include "cuda_host_emulation.h"

#include "cuda/ranking_kernel.cuh"
// the binding itself, its device check turned to CPU tensors: it calls the launchers defined below
#define FASTCACHE_CUDA_HOST_EMULATION
#include "cuda/ranking_torch.cpp"

namespace fastcache {
namespace cuda {
namespace {

// The dynamic shared memory of the running thread block (blocks run one after another): the largest the
// lambda_loss launcher allows.
unsigned char* lambda_shared_memory() {
  alignas(16) static unsigned char bytes[kLambdaSharedRows * kMaxLambdaList * sizeof(double)];
  return bytes;
}

int emulated_threads = 256;  // CUDA threads per thread block of the following launches
int emulated_splits = 1;     // lambda_loss: thread blocks per query

template <typename T>
const char* lambda_on_host(const T* sorted_logits, const T* sorted_labels, const int64_t* order,
                           const int64_t* lengths, const T* gains, int64_t Q, int64_t n,
                           const LambdaLossParams& params, T* grad, double* loss_sum, double* pair_count) {
  if (n < 1 || n > kMaxLambdaList) return "lambda_loss: the CUDA kernel takes lists of 1 to 4096 documents";
  emulation::run_grid(Q * emulated_splits, emulated_threads, [&] {
    lambda_loss_kernel<T>(sorted_logits, sorted_labels, order, lengths, gains, n, emulated_splits, params, grad,
                          loss_sum, pair_count);
  });
  return nullptr;
}

template <typename T>
const char* plistmle_on_host(const T* logits, const int64_t* order, const int64_t* lengths, const T* weights,
                             int64_t Q, int64_t n, double eps, bool compute_grad, T* loss, T* grad, double* lhat) {
  emulation::run_grid(Q, emulated_threads, [&] {
    plistmle_kernel<T>(logits, order, lengths, weights, n, std::log(eps), compute_grad, loss, grad, lhat);
  });
  return nullptr;
}

template <typename T>
const char* listnet_on_host(const T* logits, const T* labels, const bool* mask, int64_t Q, int64_t n,
                            bool compute_grad, T* loss, T* grad) {
  emulation::run_grid(Q, emulated_threads,
                      [&] { listnet_kernel<T>(logits, labels, mask, n, compute_grad, loss, grad); });
  return nullptr;
}

}  // namespace

const char* lambda_loss_f32(const float* sorted_logits, const float* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const float* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, float* grad, double* loss_sum, double* pair_count, int,
                            CUstream_st*) {
  return lambda_on_host(sorted_logits, sorted_labels, order, lengths, gains, Q, n, params, grad, loss_sum,
                        pair_count);
}
const char* lambda_loss_f64(const double* sorted_logits, const double* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const double* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, double* grad, double* loss_sum, double* pair_count, int,
                            CUstream_st*) {
  return lambda_on_host(sorted_logits, sorted_labels, order, lengths, gains, Q, n, params, grad, loss_sum,
                        pair_count);
}
const char* plistmle_f32(const float* logits, const int64_t* order, const int64_t* lengths, const float* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, float* loss, float* grad, double* lhat,
                         int, CUstream_st*) {
  return plistmle_on_host(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, lhat);
}
const char* plistmle_f64(const double* logits, const int64_t* order, const int64_t* lengths, const double* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, double* loss, double* grad,
                         double* lhat, int, CUstream_st*) {
  return plistmle_on_host(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, lhat);
}
const char* listnet_f32(const float* logits, const float* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, float* loss, float* grad, int, CUstream_st*) {
  return listnet_on_host(logits, labels, mask, Q, n, compute_grad, loss, grad);
}
const char* listnet_f64(const double* logits, const double* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, double* loss, double* grad, int, CUstream_st*) {
  return listnet_on_host(logits, labels, mask, Q, n, compute_grad, loss, grad);
}

}  // namespace cuda
}  // namespace fastcache

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lambda_loss_cuda", &fastcache::lambda_loss_cuda,
        "the binding of csrc/cuda on CPU tensors, its kernel run on emulated CUDA threads (test support)");
  m.def("plistmle_cuda", &fastcache::plistmle_cuda,
        "the binding of csrc/cuda on CPU tensors, its kernel run on emulated CUDA threads (test support)");
  m.def("listnet_cuda", &fastcache::listnet_cuda,
        "the binding of csrc/cuda on CPU tensors, its kernel run on emulated CUDA threads (test support)");
  m.def("set_threads", [](int threads, int splits) {
    const int most = std::min(fastcache::cuda::kLambdaThreads, fastcache::cuda::kRowThreads);
    TORCH_CHECK(threads >= 32 && threads % 32 == 0 && threads <= most, "threads must be a multiple of 32 up to ", most);
    TORCH_CHECK(splits >= 1, "splits must be positive");
    fastcache::cuda::emulated_threads = threads;
    fastcache::cuda::emulated_splits = splits;
  }, "CUDA threads per thread block, and thread blocks per LambdaLoss query, of the following calls");
}
