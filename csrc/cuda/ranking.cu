// Learning-to-rank losses on CUDA (torch-free kernels and their C++ launchers; API in ranking.h).
//
// LambdaLoss: one block per query, warps take ranks p = warp, warp + warps, ...; a warp's lanes take q > p. Each
// unordered pair is visited once and both of its directions share one exp and one log1p (as on the CPU):
// dL/ds_p is reduced in the warp, dL/ds_q is added to a shared-memory gradient row with shared atomics. Memory:
// O(n) shared per block, never an [n, n] tensor. PListMLE and ListNet are O(n) per query: one thread per query.
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "ranking.h"

namespace fastcache {
namespace cuda {
namespace {

constexpr int kLambdaThreads = 256;
constexpr int kRowThreads = 128;
constexpr double kDiffLimit = 1e8;  // sentence-transformers clamps score differences (no gradient beyond)

template <typename T>
__device__ __forceinline__ T exp_(T x) { return exp(x); }
template <>
__device__ __forceinline__ float exp_(float x) { return __expf(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

template <typename T>
__device__ __forceinline__ T gain_of(T label, T max_dcg) {
  return label > T(0) ? (exp2(label) - T(1)) / max_dcg : T(0);  // -inf and negative labels: no gain
}

template <typename T>
__global__ void lambda_loss_kernel(const T* sorted_logits, const T* sorted_labels, const int64_t* order,
                                   const int64_t* lengths, const T* max_dcgs, int64_t n, LambdaLossParams prm,
                                   T* grad, double* loss_sum, double* pair_count) {
  extern __shared__ unsigned char shared_bytes[];
  T* grad_row = reinterpret_cast<T*>(shared_bytes);  // [n] by rank
  T* gain = grad_row + n;                              // [n] by rank
  __shared__ double warp_loss[kLambdaThreads / 32], warp_count[kLambdaThreads / 32];
  const int64_t q_row = blockIdx.x;
  const T* s = sorted_logits + q_row * n;
  const T* y = sorted_labels + q_row * n;
  const int64_t m = lengths[q_row];
  const int64_t kk = prm.k > 0 && prm.k < m ? prm.k : m;
  const T max_dcg = max_dcgs[q_row];
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    grad_row[r] = T(0);
    gain[r] = r < m ? gain_of(y[r], max_dcg) : T(0);
  }
  __syncthreads();
  const bool ndcg1 = prm.weighting == kWeightNDCGLoss1;
  const T w_one = prm.weighting == kWeightNone ? T(1) : T(0);
  const T w_ndcg2 = prm.weighting == kWeightNDCGLoss2 ? T(1) : prm.weighting == kWeightNDCGLoss2PP ? T(prm.mu) : T(0);
  const T w_rank = (prm.weighting == kWeightLambdaRank || prm.weighting == kWeightNDCGLoss2PP) ? T(1) : T(0);
  const T sigma = T(prm.sigma), log_eps = T(log(prm.eps)), c = T(prm.binary_log ? 1.0 / log(2.0) : 1.0);
  const T limit = T(kDiffLimit);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  double loss = 0.0, count = 0.0;
  for (int64_t p = warp; p < kk; p += warps) {
    const T sp = s[p], yp = y[p], gp = gain[p], dp = T(1) / log2(T(p) + T(2));
    const bool fp = isfinite(yp);
    T grad_p = T(0);
    for (int64_t q = p + 1 + lane; q < kk; q += 32) {
      const T yq = y[q];
      const bool both = fp && isfinite(yq);
      const bool valid_a = both && (ndcg1 || yp > yq), valid_b = both && (ndcg1 || yq > yp);
      if (!(valid_a || valid_b)) continue;
      const T raw = sp - s[q];
      const T x = sigma * fmin(fmax(raw, -limit), limit);
      const T e = exp_(-fabs(x));
      const T l1p = log1p(e);
      const T ls_pos = fmin(x, T(0)) - l1p, ls_neg = fmin(-x, T(0)) - l1p;
      const T inv = T(1) / (T(1) + e);
      const T sig_pos = x >= T(0) ? inv : e * inv, sig_neg = x >= T(0) ? e * inv : inv;
      const T gq = gain[q], dq = T(1) / log2(T(q) + T(2));
      const T r = T(q - p);
      const T delta = fabs(T(1) / log2(r + T(1)) - T(1) / log2(r + T(2)));
      const T gain_diff = fabs(gp - gq);
      const T w_sym = w_one + w_ndcg2 * delta * gain_diff + w_rank * fabs(dp - dq) * gain_diff;
      const T wa = ndcg1 ? gp * dp : w_sym, wb = ndcg1 ? gq * dq : w_sym;
      const T ta = wa * fmax(ls_pos, log_eps), tb = wb * fmax(ls_neg, log_eps);
      T g = T(0);
      if (valid_a) {
        loss -= double(c * fmax(ta, log_eps));
        count += 1.0;
        if (ls_pos > log_eps && ta > log_eps) g += wa * sig_neg;
      }
      if (valid_b) {
        loss -= double(c * fmax(tb, log_eps));
        count += 1.0;
        if (ls_neg > log_eps && tb > log_eps) g -= wb * sig_pos;
      }
      if (prm.compute_grad && fabs(raw) <= limit) {
        g *= -c * sigma;
        grad_p += g;
        atomicAdd(grad_row + q, -g);
      }
    }
    grad_p = warp_sum(grad_p);
    if (lane == 0) {
      if (prm.compute_grad) atomicAdd(grad_row + p, grad_p);
      if (ndcg1 && fp) {  // the pair (p, p): sigmoid(0) = 1/2, no gradient
        loss -= double(c * fmax(gp * dp * fmax(T(log(0.5)), log_eps), log_eps));
        count += 1.0;
      }
    }
  }
  loss = warp_sum(loss);
  count = warp_sum(count);
  if (lane == 0) {
    warp_loss[warp] = loss;
    warp_count[warp] = count;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0, pairs = 0.0;
    for (int w = 0; w < warps; ++w) {
      total += warp_loss[w];
      pairs += warp_count[w];
    }
    loss_sum[q_row] = total;
    pair_count[q_row] = pairs;
  }
  if (prm.compute_grad)
    for (int64_t r = threadIdx.x; r < kk; r += blockDim.x) grad[q_row * n + order[q_row * n + r]] = grad_row[r];
}

template <typename T>
__global__ void plistmle_kernel(const T* logits, const int64_t* order, const int64_t* lengths, const T* weights,
                                int64_t Q, int64_t n, double log_eps, bool compute_grad, T* loss, T* grad) {
  const int64_t q_row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q_row >= Q) return;
  const T* s = logits + q_row * n;
  const int64_t* col = order + q_row * n;
  const T* w = weights ? weights + q_row * n : nullptr;
  T* g = grad + q_row * n;
  const int64_t m = lengths[q_row];
  // pass 1 (ranks m-1 .. 0): Lhat_r = log(sum_{t >= r} exp(s_t) + eps), kept in grad[col[r]] until pass 2
  double running = -INFINITY;
  for (int64_t r = m - 1; r >= 0; --r) {
    const double x = s[col[r]];
    const double hi = fmax(running, x), lo = fmin(running, x);
    running = hi + log1p(exp(lo - hi));
    const double hi_eps = fmax(running, log_eps), lo_eps = fmin(running, log_eps);
    g[col[r]] = T(hi_eps + log1p(exp(lo_eps - hi_eps)));
  }
  // pass 2 (ranks 0 .. m-1): loss and dloss/ds_t = -w_t + exp(s_t - Lhat_t) · A_t
  double total = 0.0, acc = 0.0, previous = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    const double x = s[col[r]], lhat = g[col[r]], wr = w ? double(w[r]) : 1.0;
    total -= wr * (x - lhat);
    acc = (r == 0 ? 0.0 : acc * exp(lhat - previous)) + wr;
    previous = lhat;
    g[col[r]] = compute_grad ? T(-wr + exp(x - lhat) * acc) : T(0);
  }
  loss[q_row] = T(total);
}

template <typename T>
__global__ void listnet_kernel(const T* logits, const T* labels, const bool* mask, int64_t Q, int64_t n,
                               bool compute_grad, T* loss, T* grad) {
  const int64_t q_row = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (q_row >= Q) return;
  const T* s = logits + q_row * n;
  const T* y = labels + q_row * n;
  const bool* real = mask + q_row * n;
  double s_max = -INFINITY, y_max = -INFINITY;
  for (int64_t j = 0; j < n; ++j)
    if (real[j]) {
      s_max = fmax(s_max, double(s[j]));
      y_max = fmax(y_max, double(y[j]));
    }
  loss[q_row] = T(0);
  if (isinf(y_max)) return;  // no real document (or no finite label): the binding rejects the latter
  double s_sum = 0.0, y_sum = 0.0, dot = 0.0;
  for (int64_t j = 0; j < n; ++j)
    if (real[j]) {
      s_sum += exp(double(s[j]) - s_max);
      const double p = exp(double(y[j]) - y_max);
      y_sum += p;
      dot += p * double(s[j]);
    }
  const double lse = s_max + log(s_sum);
  loss[q_row] = T(lse - dot / y_sum);
  if (compute_grad)
    for (int64_t j = 0; j < n; ++j)
      if (real[j]) grad[q_row * n + j] = T(exp(double(s[j]) - lse) - exp(double(y[j]) - y_max) / y_sum);
}

// Runs `launch` on `device` (restoring the current device) and returns CUDA's error text or nullptr.
template <typename Launch>
const char* on_device(int device, Launch launch) {
  int previous = 0;
  cudaError_t status = cudaGetDevice(&previous);
  if (status == cudaSuccess) status = cudaSetDevice(device);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  launch();
  status = cudaGetLastError();
  cudaSetDevice(previous);
  return status == cudaSuccess ? nullptr : cudaGetErrorString(status);
}

template <typename T>
const char* lambda_loss(const T* sorted_logits, const T* sorted_labels, const int64_t* order, const int64_t* lengths,
                        const T* max_dcg, int64_t Q, int64_t n, const LambdaLossParams& params, T* grad,
                        double* loss_sum, double* pair_count, int device, CUstream_st* stream) {
  if (n > 4096) return "lambda_loss: lists longer than 4096 documents are not supported by the CUDA kernel";
  if (Q == 0) return nullptr;
  const size_t shared = 2 * size_t(n) * sizeof(T);
  return on_device(device, [&] {
    if (shared > 48 * 1024)
      cudaFuncSetAttribute(lambda_loss_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared));
    lambda_loss_kernel<T><<<unsigned(Q), kLambdaThreads, shared, stream>>>(
        sorted_logits, sorted_labels, order, lengths, max_dcg, n, params, grad, loss_sum, pair_count);
  });
}

template <typename T>
const char* plistmle(const T* logits, const int64_t* order, const int64_t* lengths, const T* weights, int64_t Q,
                     int64_t n, double eps, bool compute_grad, T* loss, T* grad, int device, CUstream_st* stream) {
  if (Q == 0) return nullptr;
  return on_device(device, [&] {
    plistmle_kernel<T><<<unsigned((Q + kRowThreads - 1) / kRowThreads), kRowThreads, 0, stream>>>(
        logits, order, lengths, weights, Q, n, log(eps), compute_grad, loss, grad);
  });
}

template <typename T>
const char* listnet(const T* logits, const T* labels, const bool* mask, int64_t Q, int64_t n, bool compute_grad,
                    T* loss, T* grad, int device, CUstream_st* stream) {
  if (Q == 0) return nullptr;
  return on_device(device, [&] {
    listnet_kernel<T><<<unsigned((Q + kRowThreads - 1) / kRowThreads), kRowThreads, 0, stream>>>(
        logits, labels, mask, Q, n, compute_grad, loss, grad);
  });
}

}  // namespace

const char* lambda_loss_f32(const float* sorted_logits, const float* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const float* max_dcg, int64_t Q, int64_t n,
                            const LambdaLossParams& params, float* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream) {
  return lambda_loss(sorted_logits, sorted_labels, order, lengths, max_dcg, Q, n, params, grad, loss_sum, pair_count,
                     device, stream);
}
const char* lambda_loss_f64(const double* sorted_logits, const double* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const double* max_dcg, int64_t Q, int64_t n,
                            const LambdaLossParams& params, double* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream) {
  return lambda_loss(sorted_logits, sorted_labels, order, lengths, max_dcg, Q, n, params, grad, loss_sum, pair_count,
                     device, stream);
}
const char* plistmle_f32(const float* logits, const int64_t* order, const int64_t* lengths, const float* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, float* loss, float* grad, int device,
                         CUstream_st* stream) {
  return plistmle(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, device, stream);
}
const char* plistmle_f64(const double* logits, const int64_t* order, const int64_t* lengths, const double* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, double* loss, double* grad,
                         int device, CUstream_st* stream) {
  return plistmle(logits, order, lengths, weights, Q, n, eps, compute_grad, loss, grad, device, stream);
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
