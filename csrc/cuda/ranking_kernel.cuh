// The kernels of the learning-to-rank losses on CUDA (the maths of csrc/cpu/ranking.cpp); launched by ranking.cu.
//
// LambdaLoss: one thread block per query. The block first fills four shared-memory rows indexed by rank: the
// gradient (zero), the gains G_r = (2^max(y_r,0) - 1) / maxDCG (computed by the binding in float64, scaled by the
// row's largest label so that 2^y never overflows), 1/D_r = 1/log2(r + 2) and the NDCGLoss2 deltas
// delta_r = |1/log2(1 + r) - 1/log2(2 + r)|. Warps then take ranks p = warp, warp + warps, ... and a warp's lanes
// the ranks q > p; a pair computes only the terms its weighting uses. Each unordered pair is visited once and both
// of its directions share one exp and one log1p (as on the CPU): dL/ds_p is reduced in the warp, dL/ds_q is added
// to the shared gradient row with shared atomics.
// With few queries a query's ranks are shared by several blocks (splits), which add their parts with atomics.
// Memory: 4n values of shared memory per block, never an [n, n] tensor. PListMLE and ListNet: one thread block per
// query too, O(n) work (reductions and log-sum-exp scans across the block).
//
// This header needs only CUDA's built-in names (threadIdx, __syncthreads, __shfl_down_sync, __shfl_up_sync,
// atomicAdd, ...) and
// lambda_shared_memory() (the block's dynamic shared memory, defined by the includer), so a test can also compile
// it for the host with those names emulated (tests/ranking/ranking_host_emulation.cpp).
#pragma once
#include <cmath>
#include <cstdint>

#include "ranking.h"

namespace fastcache {
namespace cuda {
namespace {

constexpr int kLambdaThreads = 512;
constexpr int kRowThreads = 256;  // PListMLE and ListNet: threads per query
constexpr int kRankingWarp = 32;
constexpr double kDiffLimit = 1e8;  // sentence-transformers clamps score differences (no gradient beyond)
constexpr int kLambdaSharedRows = 4;  // gradient, gain, 1/D, delta: [n] each

// The block's dynamic shared memory: lambda_loss_kernel's kLambdaSharedRows rows of n values.
__device__ unsigned char* lambda_shared_memory();

__device__ __forceinline__ float ranking_exp(float x) { return __expf(x); }
__device__ __forceinline__ double ranking_exp(double x) { return exp(x); }

// The lower clamp of LambdaLoss's log-probabilities: log eps, and for eps = 0 (no clamp) the lowest finite value
// rather than log 0 = -inf, so that a zero weight times a log-probability stays 0.
__device__ __forceinline__ float ranking_log_clamp(double eps, float) {
  return eps > 0 ? float(log(eps)) : -3.40282346638528859811704183484516925e+38f;
}
__device__ __forceinline__ double ranking_log_clamp(double eps, double) {
  return eps > 0 ? log(eps) : -1.79769313486231570814527423731704357e+308;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int offset = kRankingWarp / 2; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// Block b of the grid takes query b / splits and, of its ranks p, those of warps (b % splits)·warps + warp + k·stride:
// the splits blocks of a query (more than one where there are few queries for the GPU) add their parts of the loss,
// the pair count and the gradient to the zero-filled outputs with atomics.
template <typename T>
__global__ void __launch_bounds__(kLambdaThreads) lambda_loss_kernel(
    const T* sorted_logits, const T* sorted_labels, const int64_t* order, const int64_t* lengths, const T* gains,
    int64_t n, int splits, LambdaLossParams prm, T* grad, double* loss_sum, double* pair_count) {
  T* grad_row = reinterpret_cast<T*>(lambda_shared_memory());  // [n] by rank
  T* gain = grad_row + n;                                       // [n] by rank
  T* inv_d = gain + n;                                          // [n] by rank: 1 / log2(r + 2)
  T* delta = inv_d + n;                                         // [n] by rank distance r >= 1 (delta[0] unused)
  __shared__ double warp_loss[kLambdaThreads / kRankingWarp], warp_count[kLambdaThreads / kRankingWarp];
  const int64_t q_row = blockIdx.x / splits;
  const T* s = sorted_logits + q_row * n;
  const T* y = sorted_labels + q_row * n;
  const int64_t m = lengths[q_row];
  const int64_t kk = prm.k > 0 && prm.k < m ? prm.k : m;
  for (int64_t r = threadIdx.x; r < n; r += blockDim.x) {
    grad_row[r] = T(0);
    gain[r] = r < m ? gains[q_row * n + r] : T(0);
    inv_d[r] = T(1.0 / log2(double(r) + 2.0));
    delta[r] = r == 0 ? T(0) : T(fabs(1.0 / log2(double(r) + 1.0) - 1.0 / log2(double(r) + 2.0)));
  }
  __syncthreads();
  const int weighting = prm.weighting;
  const bool ndcg1 = weighting == kWeightNDCGLoss1;
  const T mu = T(prm.mu);
  const T sigma = T(prm.sigma), log_eps = ranking_log_clamp(prm.eps, T(0));
  const T c = T(prm.binary_log ? 1.0 / log(2.0) : 1.0);
  const T limit = T(kDiffLimit);
  const int warp = threadIdx.x / kRankingWarp, lane = threadIdx.x % kRankingWarp;
  const int warps = blockDim.x / kRankingWarp;
  const int64_t stride = int64_t(warps) * splits;
  double loss = 0.0, count = 0.0;
  for (int64_t p = int64_t(blockIdx.x % splits) * warps + warp; p < kk; p += stride) {
    const T sp = s[p], yp = y[p], gp = gain[p], dp = inv_d[p];
    const bool fp = isfinite(yp);
    T grad_p = T(0);
    for (int64_t q = p + 1 + lane; q < kk; q += kRankingWarp) {
      const T yq = y[q];
      const bool both = fp && isfinite(yq);
      const bool valid_a = both && (ndcg1 || yp > yq), valid_b = both && (ndcg1 || yq > yp);
      if (!(valid_a || valid_b)) continue;
      const T raw = sp - s[q];
      const T x = sigma * fmin(fmax(raw, -limit), limit);
      const T e = ranking_exp(-fabs(x));
      const T l1p = log1p(e);
      const T ls_pos = fmin(x, T(0)) - l1p, ls_neg = fmin(-x, T(0)) - l1p;  // log sigmoid(±x)
      const T inv = T(1) / (T(1) + e);
      const T sig_pos = x >= T(0) ? inv : e * inv, sig_neg = x >= T(0) ? e * inv : inv;
      const T gq = gain[q], dq = inv_d[q];
      T wa, wb;  // the weights of (p, q) and (q, p): only the weighting's own terms are computed
      if (ndcg1) {
        wa = gp * dp;
        wb = gq * dq;
      } else if (weighting == kWeightNone) {
        wa = wb = T(1);
      } else {
        const T gain_diff = fabs(gp - gq);
        if (weighting == kWeightNDCGLoss2)
          wa = delta[q - p] * gain_diff;
        else if (weighting == kWeightLambdaRank)
          wa = fabs(dp - dq) * gain_diff;
        else  // NDCGLoss2++
          wa = mu * delta[q - p] * gain_diff + fabs(dp - dq) * gain_diff;
        wb = wa;
      }
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
    atomicAdd(loss_sum + q_row, total);
    atomicAdd(pair_count + q_row, pairs);
  }
  if (prm.compute_grad)
    for (int64_t r = threadIdx.x; r < kk; r += blockDim.x)
      atomicAdd(grad + q_row * n + order[q_row * n + r], grad_row[r]);
}

// log(e^a + e^b), -inf when both are -inf.
__device__ __forceinline__ double log_add(double a, double b) {
  const double hi = fmax(a, b), lo = fmin(a, b);
  return hi == -INFINITY ? hi : hi + log1p(exp(lo - hi));
}

// Reduces v over the thread block with op (associative, commutative; identity its neutral value): every thread
// returns the result. shared: blockDim.x / 32 slots.
template <typename T, typename Op>
__device__ T block_reduce(T v, T* shared, Op op, T identity) {
  for (int offset = kRankingWarp / 2; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / kRankingWarp, warps = blockDim.x / kRankingWarp;
  if (threadIdx.x % kRankingWarp == 0) shared[warp] = v;
  __syncthreads();
  T total = identity;
  for (int w = 0; w < warps; ++w) total = op(total, shared[w]);
  __syncthreads();  // the slots are reused by the next reduction
  return total;
}

// Replaces part[0 .. count) by its exclusive log-sum-exp scan: part[i] <- log sum_{j < i} e^part[j] (kSuffix:
// sum over j > i), -inf where empty. Warp 0 scans (each lane a run of count/32 entries, then the lanes with
// shuffles); every thread of the block must call it.
template <bool kSuffix>
__device__ void exclusive_log_scan(double* part, int count) {
  if (threadIdx.x < kRankingWarp) {
    const int lane = threadIdx.x, per = (count + kRankingWarp - 1) / kRankingWarp;
    const int begin = min(count, lane * per), end = min(count, begin + per);
    double scan = -INFINITY;  // this lane's run, then the inclusive scan over the lanes
    for (int j = begin; j < end; ++j) scan = log_add(scan, part[j]);
    for (int d = 1; d < kRankingWarp; d <<= 1) {
      const double other = kSuffix ? __shfl_down_sync(0xffffffffu, scan, d) : __shfl_up_sync(0xffffffffu, scan, d);
      if (kSuffix ? lane + d < kRankingWarp : lane >= d) scan = log_add(scan, other);
    }
    double before = kSuffix ? __shfl_down_sync(0xffffffffu, scan, 1) : __shfl_up_sync(0xffffffffu, scan, 1);
    if (kSuffix ? lane == kRankingWarp - 1 : lane == 0) before = -INFINITY;
    for (int k = 0; k < end - begin; ++k) {
      const int j = kSuffix ? end - 1 - k : begin + k;
      const double v = part[j];
      part[j] = before;
      before = log_add(before, v);
    }
  }
  __syncthreads();
}

// Position-aware ListMLE, one thread block per query. Thread i owns a run of consecutive ranks; the suffix sums
// Lhat_r = log(sum_{t >= r} exp(s_t) + eps) and the prefix sums log B_t = log sum_{r <= t} w_r exp(-Lhat_r) are
// scans in log-sum-exp form (run totals, an exclusive scan over the runs, then each run): nothing overflows, and
// dloss/ds_t = -w_t + exp(s_t + log B_t) (every exponent <= log sum w). lhat_rows: [Q, n] float64 scratch.
template <typename T>
__global__ void plistmle_kernel(const T* logits, const int64_t* order, const int64_t* lengths, const T* weights,
                                int64_t n, double log_eps, bool compute_grad, T* loss, T* grad, double* lhat_rows) {
  __shared__ double part[kRowThreads];
  __shared__ double sums[kRowThreads / kRankingWarp];
  const int64_t q_row = blockIdx.x;
  const T* s = logits + q_row * n;
  const int64_t* col = order + q_row * n;
  const T* w = weights ? weights + q_row * n : nullptr;
  double* lhat = lhat_rows + q_row * n;
  const int64_t m = lengths[q_row];
  const int64_t per = (m + blockDim.x - 1) / blockDim.x;
  const int64_t begin = min(m, int64_t(threadIdx.x) * per), end = min(m, begin + per);
  double run = -INFINITY;
  for (int64_t r = begin; r < end; ++r) run = log_add(run, double(s[col[r]]));
  part[threadIdx.x] = run;
  __syncthreads();
  exclusive_log_scan<true>(part, blockDim.x);
  double suffix = part[threadIdx.x], total = 0.0;
  for (int64_t r = end - 1; r >= begin; --r) {
    const double x = s[col[r]], wr = w ? double(w[r]) : 1.0;
    suffix = log_add(suffix, x);
    lhat[r] = log_add(suffix, log_eps);
    total -= wr * (x - lhat[r]);
  }
  total = block_reduce(total, sums, [](double a, double b) { return a + b; }, 0.0);
  if (threadIdx.x == 0) loss[q_row] = T(total);
  if (!compute_grad) return;  // uniform across the block
  run = -INFINITY;
  for (int64_t r = begin; r < end; ++r) run = log_add(run, log(w ? double(w[r]) : 1.0) - lhat[r]);
  part[threadIdx.x] = run;
  __syncthreads();
  exclusive_log_scan<false>(part, blockDim.x);
  double prefix = part[threadIdx.x];
  for (int64_t r = begin; r < end; ++r) {
    const double wr = w ? double(w[r]) : 1.0;
    prefix = log_add(prefix, log(wr) - lhat[r]);
    grad[q_row * n + col[r]] = T(-wr + exp(double(s[col[r]]) + prefix));
  }
}

// ListNet, one thread block per query: block reductions of max(s), max(y), then of sum exp(s - max),
// sum exp(y - max) and sum exp(y - max)·s; loss = logsumexp(s) - sum_j softmax(y)_j s_j,
// grad = softmax(s) - softmax(y).
template <typename T>
__global__ void listnet_kernel(const T* logits, const T* labels, const bool* mask, int64_t n, bool compute_grad,
                               T* loss, T* grad) {
  __shared__ double slots[kRowThreads / kRankingWarp];
  const int64_t q_row = blockIdx.x;
  const T* s = logits + q_row * n;
  const T* y = labels + q_row * n;
  const bool* real = mask + q_row * n;
  const auto max_op = [](double a, double b) { return fmax(a, b); };
  const auto sum_op = [](double a, double b) { return a + b; };
  double s_max = -INFINITY, y_max = -INFINITY;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (real[j]) {
      s_max = fmax(s_max, double(s[j]));
      y_max = fmax(y_max, double(y[j]));
    }
  s_max = block_reduce(s_max, slots, max_op, double(-INFINITY));
  y_max = block_reduce(y_max, slots, max_op, double(-INFINITY));
  if (isinf(y_max)) {  // no real document (or no finite label: the op rejects that): loss 0, gradient 0
    if (threadIdx.x == 0) loss[q_row] = T(0);
    return;
  }
  double s_sum = 0.0, y_sum = 0.0, dot = 0.0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (real[j]) {
      s_sum += exp(double(s[j]) - s_max);
      const double p = exp(double(y[j]) - y_max);
      y_sum += p;
      dot += p * double(s[j]);
    }
  s_sum = block_reduce(s_sum, slots, sum_op, 0.0);
  y_sum = block_reduce(y_sum, slots, sum_op, 0.0);
  dot = block_reduce(dot, slots, sum_op, 0.0);
  const double lse = s_max + log(s_sum);
  if (threadIdx.x == 0) loss[q_row] = T(lse - dot / y_sum);
  if (compute_grad)
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      if (real[j]) grad[q_row * n + j] = T(exp(double(s[j]) - lse) - exp(double(y[j]) - y_max) / y_sum);
}

}  // namespace
}  // namespace cuda
}  // namespace fastcache
