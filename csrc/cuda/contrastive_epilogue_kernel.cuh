// The kernel of the fused softmax-gradient epilogue of the contrastive loss on CUDA (the maths of
// csrc/cpu/contrastive.cpp); launched by contrastive_epilogue.cu.
//
// One thread block per row i = row0 + r. The blocks of the row are never rewritten in between: the logit of a
// column is recomputed from the raw similarity where it is needed,
//   logit = scale·s (+ hardness_strength·s on the penalised query_to_doc columns), -inf where masked,
// so a row is read twice and written once:
//   pass 1, per block b: an online (max, sum of exp) over the block's columns, reduced across the thread block:
//           lse_b = log Σ_j exp(logit_j);
//   loss_i = logsumexp_b lse_b - logit_pos (joint) or mean_b lse_b - logit_pos (per_direction);
//   pass 2 (compute_grad): s <- dL/ds = p.coef·exp(logit - log_partition_b) (- p.pos_coef at the positive),
//           p.coef = scale/B (joint: log_partition = the joint lse) or scale/(B·n_blocks) (per_direction: lse_b),
//           p.pos_coef = scale/B, both computed once by Python's kernel_params (csrc/contrastive_params.h).
// A fully masked block has lse -inf and a zero gradient. fp32 (or fp64) throughout; no atomics, so the result
// does not depend on scheduling. Memory-bound: each thread loads kUnroll columns before using any, so that enough
// bytes are in flight with one thread block of up to 512 threads per row (rows per chunk >= the SM count fill the
// GPU).
//
// This header needs only CUDA's built-in names (threadIdx, __syncthreads, __shfl_xor_sync, ...), so a test can
// also compile it for the host with those names emulated (tests/contrastive/cuda_host_emulation.cpp).
#pragma once
#include <cmath>
#include <cstdint>

#include "contrastive_epilogue.h"

namespace fastcache {
namespace cuda {
namespace {

constexpr int kMaxBlocks = 4;
constexpr int kMaxThreads = 512;
constexpr int kWarp = 32;
constexpr int kUnroll = 8;  // columns per thread whose loads are in flight together (the kernel is memory-bound)

__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <typename T>
struct Blocks {
  EpilogueBlock<T> b[kMaxBlocks];
  int count;
};

// What every column of a row needs: the positive's column, the own query's column, the guide threshold and the
// positive's id.
template <typename T>
struct Row {
  int64_t r, pos, own_query, pos_id;
  T threshold;
};

// A running log-sum-exp: sum of exp(x - max) and the max (-inf and 0 while empty).
template <typename T>
struct OnlineLse {
  T max, sum;
  __device__ __forceinline__ void add(T x) {
    if (x == -INFINITY) return;
    if (x > max) {
      sum = sum * exp_(max - x) + T(1);
      max = x;
    } else {
      sum += exp_(x - max);
    }
  }
  __device__ __forceinline__ void merge(T other_max, T other_sum) {
    const T m = other_max > max ? other_max : max;
    if (m == -INFINITY) return;
    sum = sum * exp_(max - m) + other_sum * exp_(other_max - m);
    max = m;
  }
  __device__ __forceinline__ T value() const { return max == -INFINITY ? T(-INFINITY) : max + log_(sum); }
};

// The logit of column j of block b in row `row`, from its similarity x, guide similarity g and candidate id (see
// the file comment; the masks of csrc/cpu/contrastive.cpp).
template <typename T>
__device__ __forceinline__ T logit(const EpilogueBlock<T>& b, int64_t j, T x, T g, int64_t id, const Row<T>& row,
                                   const ContrastiveParams& p) {
  const T scale = static_cast<T>(p.scale);
  const bool is_positive = b.kind == kQueryToDoc && j == row.pos;
  // the row's own columns pos + c·P: its positive (c = 0) and its own hard negatives (c >= 1); columns < 2^31
  const bool needs_own = b.kind == kQueryToDoc ? p.hardness_mode != kNoHardness : b.kind == kDocToDoc && !b.guide;
  const bool own = needs_own && j >= row.pos &&
                   static_cast<uint32_t>(j - row.pos) % static_cast<uint32_t>(p.num_positives) == 0;
  bool penalised = false;
  if (b.kind == kQueryToDoc) {
    switch (p.hardness_mode) {
      case kInBatchNegatives: penalised = !own; break;
      case kHardNegatives: penalised = own && !is_positive; break;
      case kAllNegatives: penalised = !is_positive; break;
      default: break;
    }
  }
  T v = penalised ? x * scale + static_cast<T>(p.hardness_strength) * x : x * scale;
  if (b.guide) {
    if (g > row.threshold && !is_positive) v = -INFINITY;
  } else if (b.kind == kQueryToQuery) {
    if (j == row.own_query) v = -INFINITY;
  } else if (b.kind == kDocToDoc) {
    if (own) v = -INFINITY;
  }
  if (b.ids && id == row.pos_id && !is_positive) v = -INFINITY;
  return v;
}

// Calls f(j, logit_j) for the columns j = threadIdx.x + m·blockDim.x of block b's row, loading kUnroll columns (their
// similarity, guide similarity and id) before using any. f may overwrite s[j]: each column is this thread's alone.
template <typename T, typename F>
__device__ __forceinline__ void for_each_logit(const EpilogueBlock<T>& b, const Row<T>& row, const ContrastiveParams& p,
                                               F f) {
  const T* s = b.s + row.r * b.ld;
  const T* g = b.guide ? b.guide + row.r * b.guide_ld : nullptr;
  const int64_t stride = blockDim.x;
  for (int64_t first = threadIdx.x; first < b.columns; first += stride * kUnroll) {
    T x[kUnroll], gx[kUnroll];
    int64_t id[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = first + u * stride;
      const bool in = j < b.columns;
      x[u] = in ? s[j] : T(0);
      gx[u] = in && g ? g[j] : T(0);
      id[u] = in && b.ids ? b.ids[j] : 0;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = first + u * stride;
      if (j < b.columns) f(j, logit(b, j, x[u], gx[u], id[u], row, p));
    }
  }
}

// Reduces every thread's (max, sum) to one OnlineLse that all threads of the block return.
template <typename T>
__device__ OnlineLse<T> block_reduce(OnlineLse<T> acc, T* shared_max, T* shared_sum) {
  for (int delta = kWarp / 2; delta > 0; delta /= 2)
    acc.merge(__shfl_xor_sync(0xffffffffu, acc.max, delta), __shfl_xor_sync(0xffffffffu, acc.sum, delta));
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp, warps = blockDim.x / kWarp;
  if (lane == 0) {
    shared_max[warp] = acc.max;
    shared_sum[warp] = acc.sum;
  }
  __syncthreads();
  OnlineLse<T> total{T(-INFINITY), T(0)};
  for (int w = 0; w < warps; ++w) total.merge(shared_max[w], shared_sum[w]);
  __syncthreads();  // the shared slots are reused by the next reduction
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) contrastive_epilogue_kernel(Blocks<T> blocks, ContrastiveParams p,
                                                                          T* loss) {
  __shared__ T shared_max[kMaxThreads / kWarp], shared_sum[kMaxThreads / kWarp];
  const EpilogueBlock<T>& qd = blocks.b[0];
  Row<T> row;
  row.r = blockIdx.x;
  row.pos = p.offset + p.row0 + row.r;
  row.own_query = p.own_query_offset + p.row0 + row.r;
  row.pos_id = qd.ids ? qd.ids[row.pos] : 0;
  row.threshold = T(0);
  if (qd.guide) {
    const T guide_pos = qd.guide[row.r * qd.guide_ld + row.pos];
    const T margin = static_cast<T>(p.margin);
    row.threshold = p.margin_strategy == kAbsoluteMargin ? guide_pos - margin : guide_pos - fabs(guide_pos) * margin;
  }
  const T pos_logit = qd.s[row.r * qd.ld + row.pos] * static_cast<T>(p.scale);  // never penalised nor masked

  double lse[kMaxBlocks];
  for (int k = 0; k < blocks.count; ++k) {
    const EpilogueBlock<T>& b = blocks.b[k];
    OnlineLse<T> acc{T(-INFINITY), T(0)};
    // roofline: slab.epilogue_lse_read (first pass: the block read once, 4 B/logit)
    for_each_logit(b, row, p, [&](int64_t, T v) { acc.add(v); });
    lse[k] = static_cast<double>(block_reduce(acc, shared_max, shared_sum).value());
  }
  double joint_max = -INFINITY, mean_lse = 0.0;
  for (int k = 0; k < blocks.count; ++k) {
    joint_max = lse[k] > joint_max ? lse[k] : joint_max;
    mean_lse += lse[k];
  }
  double joint_sum = 0.0;
  for (int k = 0; k < blocks.count; ++k) joint_sum += exp(lse[k] - joint_max);
  const double joint_lse = joint_max + log(joint_sum);  // finite: the positive is never masked
  mean_lse /= blocks.count;
  if (threadIdx.x == 0) loss[row.r] = static_cast<T>((p.joint ? joint_lse : mean_lse) - static_cast<double>(pos_logit));
  if (!p.compute_grad) return;

  const T coef = static_cast<T>(p.coef), pos_grad = static_cast<T>(p.pos_coef);
  for (int k = 0; k < blocks.count; ++k) {
    const EpilogueBlock<T>& b = blocks.b[k];
    const double log_partition = p.joint ? joint_lse : lse[k];
    const T lp = static_cast<T>(log_partition);
    T* s = b.s + row.r * b.ld;
    // roofline: slab.epilogue_grad_rmw (second pass: read again, dL/ds written over it, 8 B/logit)
    for_each_logit(b, row, p, [&](int64_t j, T v) {
      T grad = log_partition == -INFINITY ? T(0) : coef * exp_(v - lp);
      if (b.kind == kQueryToDoc && j == row.pos) grad -= pos_grad;
      s[j] = grad;
    });
  }
}

}  // namespace
}  // namespace cuda
}  // namespace fastcache
