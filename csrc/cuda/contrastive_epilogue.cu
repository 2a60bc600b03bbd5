// Fused softmax-gradient epilogue of the contrastive loss on CUDA (the maths of csrc/cpu/contrastive.cpp).
//
// One thread block per row i = row0 + r. The blocks of the row are never rewritten in between: the logit of a
// column is recomputed from the raw similarity where it is needed,
//   logit = scale·s (+ hardness_strength·s on the penalised query_to_doc columns), -inf where masked,
// so a row is read twice and written once:
//   pass 1, per block b: an online (max, sum of exp) over the block's columns, reduced across the thread block:
//           lse_b = log Σ_j exp(logit_j);
//   loss_i = logsumexp_b lse_b - logit_pos (joint) or mean_b lse_b - logit_pos (per_direction);
//   pass 2 (compute_grad): s <- dL/ds = scale·coef_b·exp(logit - log_partition_b) (- scale/B at the positive),
//           coef_b = 1/B (joint: log_partition = the joint lse) or 1/(B·n_blocks) (per_direction: lse_b).
// A fully masked block has lse -inf and a zero gradient. fp32 (or fp64) throughout; no atomics, so the result
// does not depend on scheduling.
#include "contrastive_epilogue.h"

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

namespace fastcache {
namespace cuda {
namespace {

constexpr int kMaxBlocks = 4;
constexpr int kMaxThreads = 1024;
constexpr int kWarp = 32;

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

// The logit of column j of block b in row `row` (see the file comment; the masks of csrc/cpu/contrastive.cpp).
template <typename T>
__device__ __forceinline__ T logit(const EpilogueBlock<T>& b, int64_t j, const Row<T>& row,
                                   const EpilogueParams& p) {
  const T x = b.s[row.r * b.ld + j];
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
    if (b.guide[row.r * b.guide_ld + j] > row.threshold && !is_positive) v = -INFINITY;
  } else if (b.kind == kQueryToQuery) {
    if (j == row.own_query) v = -INFINITY;
  } else if (b.kind == kDocToDoc) {
    if (own) v = -INFINITY;
  }
  if (b.ids && b.ids[j] == row.pos_id && !is_positive) v = -INFINITY;
  return v;
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
__global__ void contrastive_epilogue_kernel(Blocks<T> blocks, EpilogueParams p, T* loss) {
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
    for (int64_t j = threadIdx.x; j < b.columns; j += blockDim.x) acc.add(logit(b, j, row, p));
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

  const double inv_b = 1.0 / static_cast<double>(p.batch_size);
  for (int k = 0; k < blocks.count; ++k) {
    const EpilogueBlock<T>& b = blocks.b[k];
    const double log_partition = p.joint ? joint_lse : lse[k];
    const T coef = static_cast<T>(p.scale * inv_b / (p.joint ? 1 : blocks.count));
    const T lp = static_cast<T>(log_partition);
    const T pos_grad = static_cast<T>(p.scale * inv_b);
    T* s = b.s + row.r * b.ld;
    for (int64_t j = threadIdx.x; j < b.columns; j += blockDim.x) {
      const T v = logit(b, j, row, p);  // reads s[j] before this thread overwrites it
      T grad = log_partition == -INFINITY ? T(0) : coef * exp_(v - lp);
      if (b.kind == kQueryToDoc && j == row.pos) grad -= pos_grad;
      s[j] = grad;
    }
  }
}

int threads_for(int64_t columns) {
  int threads = 128;
  while (threads < kMaxThreads && columns > 16 * static_cast<int64_t>(threads)) threads *= 2;
  return threads;
}

template <typename T>
const char* launch(const EpilogueBlock<T>* blocks, int num_blocks, const EpilogueParams& params, T* loss, int device,
                   CUstream_st* stream) {
  if (num_blocks < 1 || num_blocks > kMaxBlocks) return "contrastive_epilogue: num_blocks must be 1 to 4";
  if (params.rows == 0) return nullptr;
  Blocks<T> all{};
  all.count = num_blocks;
  int64_t columns = 0;
  for (int k = 0; k < num_blocks; ++k) {
    if (blocks[k].columns < 1 || blocks[k].columns > INT32_MAX) return "contrastive_epilogue: 1 to 2^31-1 columns";
    all.b[k] = blocks[k];
    columns += blocks[k].columns;
  }
  if (params.num_positives < 1 || params.num_positives > INT32_MAX)
    return "contrastive_epilogue: num_positives must be 1 to 2^31-1";
  int previous = -1;
  cudaError_t error = cudaGetDevice(&previous);
  if (error == cudaSuccess && previous != device) error = cudaSetDevice(device);
  if (error == cudaSuccess) {
    contrastive_epilogue_kernel<T><<<static_cast<unsigned>(params.rows), threads_for(columns), 0, stream>>>(
        all, params, loss);
    error = cudaGetLastError();
  }
  if (previous >= 0 && previous != device) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (error == cudaSuccess) error = restore;
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* contrastive_epilogue_f32(const EpilogueBlock<float>* blocks, int num_blocks, const EpilogueParams& params,
                                     float* loss, int device, CUstream_st* stream) {
  return launch(blocks, num_blocks, params, loss, device, stream);
}

const char* contrastive_epilogue_f64(const EpilogueBlock<double>* blocks, int num_blocks,
                                     const EpilogueParams& params, double* loss, int device, CUstream_st* stream) {
  return launch(blocks, num_blocks, params, loss, device, stream);
}

}  // namespace cuda
}  // namespace fastcache
