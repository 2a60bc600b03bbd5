// Learning-to-rank losses on CUDA: the launchers (ranking.h's API). The kernels and their maths (those of
// csrc/cpu/ranking.cpp) are in ranking_kernel.cuh; the torch binding is ranking_torch.cpp.
#include "ranking.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ranking_kernel.cuh"

namespace fastcache {
namespace cuda {
namespace {

__device__ unsigned char* lambda_shared_memory() {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return shared_bytes;
}

// Runs `launch` (which returns a cudaError_t) on `device`, restoring the current device, and returns CUDA's error
// text or nullptr.
template <typename Launch>
const char* on_device(int device, Launch launch) {
  int previous = -1;
  cudaError_t status = cudaGetDevice(&previous);
  if (status == cudaSuccess && previous != device) status = cudaSetDevice(device);
  if (status == cudaSuccess) status = launch();
  if (status == cudaSuccess) status = cudaGetLastError();
  if (previous >= 0 && previous != device) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (status == cudaSuccess) status = restore;
  }
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

template <typename T>
const char* lambda_loss(const T* sorted_logits, const T* sorted_labels, const int64_t* order, const int64_t* lengths,
                        const T* gains, int64_t Q, int64_t n, const LambdaLossParams& params, T* grad,
                        double* loss_sum, double* pair_count, int device, CUstream_st* stream) {
  if (n < 1 || n > kMaxLambdaList) return "lambda_loss: the CUDA kernel takes lists of 1 to 4096 documents";
  if (Q < 0 || Q > INT32_MAX) return "lambda_loss: the CUDA kernel takes 0 to 2^31-1 queries";
  if (Q == 0) return nullptr;
  const size_t shared = kLambdaSharedRows * size_t(n) * sizeof(T);
  int shared_limit = 0;
  const cudaError_t status = cudaDeviceGetAttribute(&shared_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  if (shared + sizeof(double) * 2 * (kLambdaThreads / kRankingWarp) > size_t(shared_limit))
    return "lambda_loss: the list is too long for this GPU's shared memory (4 rows of n values per query)";
  // blocks per query: about two blocks per SM in all when there are few queries, each with at least 2 ranks a warp
  int sms = 1;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) sms = 1;
  const int64_t warps = kLambdaThreads / kRankingWarp;
  const int64_t splits = std::max<int64_t>(1, std::min((2 * sms + Q - 1) / Q, n / (2 * warps)));
  if (Q * splits > INT32_MAX) return "lambda_loss: too many queries for one grid";
  return on_device(device, [&] {
    cudaError_t error = cudaSuccess;
    if (shared > 48 * 1024)
      error = cudaFuncSetAttribute(lambda_loss_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    if (error != cudaSuccess) return error;
    lambda_loss_kernel<T><<<unsigned(Q * splits), kLambdaThreads, shared, stream>>>(
        sorted_logits, sorted_labels, order, lengths, gains, n, int(splits), params, grad, loss_sum, pair_count);
    return cudaSuccess;
  });
}

template <typename T>
const char* plistmle(const T* logits, const int64_t* order, const int64_t* lengths, const T* weights, int64_t Q,
                     int64_t n, double eps, bool compute_grad, T* loss, T* grad, double* lhat, int device,
                     CUstream_st* stream) {
  if (Q < 0 || Q > INT32_MAX) return "plistmle: the CUDA kernel takes 0 to 2^31-1 queries";
  if (Q == 0) return nullptr;
  return on_device(device, [&] {
    plistmle_kernel<T><<<unsigned(Q), kRowThreads, 0, stream>>>(logits, order, lengths, weights, n, log(eps),
                                                                 compute_grad, loss, grad, lhat);
    return cudaSuccess;
  });
}

template <typename T>
const char* listnet(const T* logits, const T* labels, const bool* mask, int64_t Q, int64_t n, bool compute_grad,
                    T* loss, T* grad, int device, CUstream_st* stream) {
  if (Q < 0 || Q > INT32_MAX) return "listnet: the CUDA kernel takes 0 to 2^31-1 queries";
  if (Q == 0) return nullptr;
  return on_device(device, [&] {
    listnet_kernel<T><<<unsigned(Q), kRowThreads, 0, stream>>>(logits, labels, mask, n, compute_grad, loss, grad);
    return cudaSuccess;
  });
}

}  // namespace

const char* lambda_loss_f32(const float* sorted_logits, const float* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const float* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, float* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream) {
  return lambda_loss(sorted_logits, sorted_labels, order, lengths, gains, Q, n, params, grad, loss_sum, pair_count,
                     device, stream);
}
const char* lambda_loss_f64(const double* sorted_logits, const double* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const double* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, double* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream) {
  return lambda_loss(sorted_logits, sorted_labels, order, lengths, gains, Q, n, params, grad, loss_sum, pair_count,
                     device, stream);
}
const char* plistmle_f32(const float* logits, const int64_t* order, const int64_t* lengths, const float* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, float* loss, float* grad, double* lhat,
                         int device, CUstream_st* stream) {
  return plistmle(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, lhat, device, stream);
}
const char* plistmle_f64(const double* logits, const int64_t* order, const int64_t* lengths, const double* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, double* loss, double* grad,
                         double* lhat, int device, CUstream_st* stream) {
  return plistmle(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, lhat, device, stream);
}
const char* listnet_f32(const float* logits, const float* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, float* loss, float* grad, int device, CUstream_st* stream) {
  return listnet(logits, labels, mask, Q, n, compute_grad, loss, grad, device, stream);
}
const char* listnet_f64(const double* logits, const double* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, double* loss, double* grad, int device, CUstream_st* stream) {
  return listnet(logits, labels, mask, Q, n, compute_grad, loss, grad, device, stream);
}

}  // namespace cuda
}  // namespace fastcache
