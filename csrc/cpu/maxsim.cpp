// The MaxSim primitives on CPU: the fused masked max/argmax over document tokens, and its gather/scatter backward.
//
// token max: the valid query tokens (M of them, gathered once, in the compute dtype T: fp32, fp64 for fp64 inputs)
// against the valid tokens of a chunk of documents (gathered per chunk), in tiles of kTileRows query tokens run in
// parallel: per tile one single-threaded BLAS GEMM P = Q·Dᵀ into the thread's cache-sized buffer, then at once per
// (query token, document) the max of P over the document's columns and the first token attaining it (ties to the
// lowest u, as torch.max; NaN wins, the first NaN), from kLanes vectorised running maxima. Masked tokens are never
// gathered, so nothing they hold reaches a result.
// token grad: grad_q[r] = Σ_c w[r,c]·d[c, index[r,c]] parallel over the query tokens r, grad_d[c,u] =
// Σ_{r: index[r,c]=u} w[r,c]·q[r] parallel over the documents c (each thread owns its documents' rows: no races);
// B·Lq·C·D multiply-adds each, 1/Ld of the GEMM, in blocks of rows and documents that stay in cache.
#include "maxsim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "contrastive_row.h"  // FASTCACHE_INLINE, FASTCACHE_SIMD_CLONES

namespace fastcache {
namespace {

// token max tiles: kTileRows query tokens against the valid tokens of at least kTileColumns / Ld documents, one
// thread's GEMM output reduced while it is in cache (1 MiB of fp32 at Ld <= 1024)
constexpr int64_t kTileRows = 256, kTileColumns = 1024;

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work_per_item, 1));
}

constexpr int kLanes = 16;  // running maxima of the fp32 argmax: one AVX-512 vector, two AVX2 ones
constexpr int64_t kRowBlock = 64, kDocBlock = 8;  // token grad: the rows and documents one pass keeps in cache
typedef float LaneValues __attribute__((vector_size(4 * kLanes)));
typedef int32_t LaneIndices __attribute__((vector_size(4 * kLanes)));

// The position of the first maximum of x[0..n) (n >= 1), or of the first NaN if there is one (torch.max's rule).
template <typename T>
FASTCACHE_INLINE int64_t first_argmax_scalar(const T* x, int64_t n) {
  int64_t arg = 0;
  for (int64_t k = 0; k < n; ++k) {
    if (x[k] != x[k]) return k;
    if (x[k] > x[arg]) arg = k;
  }
  return arg;
}

// The same for fp32, in kLanes running maxima with the first position attaining each (strict >; GCC vector
// extensions, compiled for the instruction set of the calling clone), merged to the largest value at the lowest
// position. A NaN or an infinity (v - v is then NaN) sends the row to the scalar loop.
FASTCACHE_INLINE int64_t first_argmax_lanes(const float* x, int64_t n) {
  if (n < 2 * kLanes) return first_argmax_scalar(x, n);
  LaneValues best, finite;
  std::memcpy(&best, x, sizeof best);
  finite = best - best;
  LaneIndices position = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, at = position;
  int64_t k = kLanes;
  for (; k + kLanes <= n; k += kLanes) {
    LaneValues v;
    std::memcpy(&v, x + k, sizeof v);
    position += kLanes;
    const LaneIndices greater = v > best;
    best = greater ? v : best;
    at = greater ? position : at;
    finite += v - v;
  }
  float check = 0;  // 0 when every value is finite, else NaN
  for (int l = 0; l < kLanes; ++l) check += finite[l];
  for (int64_t j = k; j < n; ++j) check += x[j] - x[j];
  if (check != 0) return first_argmax_scalar(x, n);
  float top = best[0];
  for (int l = 1; l < kLanes; ++l) top = best[l] > top ? best[l] : top;
  int32_t first = INT32_MAX;
  for (int l = 0; l < kLanes; ++l) {
    const int32_t candidate = best[l] == top ? at[l] : INT32_MAX;
    first = candidate < first ? candidate : first;
  }
  int64_t arg = first;
  for (; k < n; ++k)
    if (x[k] > x[arg]) arg = k;
  return arg;
}

template <typename T>
FASTCACHE_INLINE int64_t first_argmax(const T* x, int64_t n) {
  if constexpr (std::is_same_v<T, float>)
    return first_argmax_lanes(x, n);
  else
    return first_argmax_scalar(x, n);
}

// Rows [m0, m1) of the chunk's products p [M, T]: documents c0 + c (c < cn) own the columns [start[c], start[c+1]),
// whose tokens are token[k]; results at values / index [row[m] * C + c0 + c].
template <typename T>
FASTCACHE_INLINE void reduce_rows(const T* p, int64_t T_cols, const int64_t* row, const int64_t* start,
                                  const int32_t* token, int64_t cn, int64_t c0, int64_t C, T* values, int32_t* index,
                                  int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* pm = p + m * T_cols;
    T* vm = values + row[m] * C + c0;
    int32_t* im = index + row[m] * C + c0;
    for (int64_t c = 0; c < cn; ++c) {
      if (start[c + 1] == start[c]) continue;  // an empty document: 0 and -1 stay
      const int64_t k = start[c] + first_argmax(pm + start[c], start[c + 1] - start[c]);
      vm[c] = pm[k];
      im[c] = token[k];
    }
  }
}

// Compiled once per instruction set (AVX-512, AVX2, baseline) and picked at load time on x86-64.
template <typename T>
FASTCACHE_SIMD_CLONES void reduce(const T* p, int64_t T_cols, const int64_t* row, const int64_t* start,
                                  const int32_t* token, int64_t cn, int64_t c0, int64_t C, T* values, int32_t* index,
                                  int64_t m0, int64_t m1) {
  reduce_rows(p, T_cols, row, start, token, cn, c0, C, values, index, m0, m1);
}

// g[0..D) += w · x[0..D)
template <typename In, typename T>
FASTCACHE_INLINE void add_scaled(T* g, T w, const In* x, int64_t D) {
  for (int64_t k = 0; k < D; ++k) g[k] += w * static_cast<T>(x[k]);
}

// The weights by strides (the op passes g[b, c] expanded over the query tokens: stride 0, no copy).
template <typename T>
struct Weights {
  const T* w;
  int64_t Lq, sb, st, sc;
  FASTCACHE_INLINE const T* row(int64_t r) const { return w + (r / Lq) * sb + (r % Lq) * st; }
};

// grad_q rows [r0, r1): blocks of kRowBlock rows against blocks of kDocBlock documents, so that the documents'
// rows read by a block stay in cache across its rows.
template <typename In, typename T>
FASTCACHE_SIMD_CLONES void grad_queries(Weights<T> w, const int32_t* index, const In* docs, T* grad_q, int64_t C,
                                        int64_t Ld, int64_t D, int64_t r0, int64_t r1) {
  for (int64_t rb = r0; rb < r1; rb += kRowBlock)
    for (int64_t cb = 0; cb < C; cb += kDocBlock)
      for (int64_t r = rb; r < std::min(rb + kRowBlock, r1); ++r) {
        const T* wr = w.row(r);
        for (int64_t c = cb; c < std::min(cb + kDocBlock, C); ++c) {
          const int32_t u = index[r * C + c];
          if (u >= 0) add_scaled(grad_q + r * D, wr[c * w.sc], docs + (c * Ld + u) * D, D);
        }
      }
}

// grad_d of documents [c0, c1), kDocBlock at a time (their gradient rows stay in cache while every row passes).
template <typename In, typename T>
FASTCACHE_SIMD_CLONES void grad_docs(Weights<T> w, const int32_t* index, const In* queries, T* grad_d, int64_t R,
                                     int64_t C, int64_t Ld, int64_t D, int64_t c0, int64_t c1) {
  for (int64_t cb = c0; cb < c1; cb += kDocBlock)
    for (int64_t r = 0; r < R; ++r) {
      const T* wr = w.row(r);
      for (int64_t c = cb; c < std::min(cb + kDocBlock, c1); ++c) {
        const int32_t u = index[r * C + c];
        if (u >= 0) add_scaled(grad_d + (c * Ld + u) * D, wr[c * w.sc], queries + r * D, D);
      }
    }
}

void check_embeddings(const at::Tensor& queries, const at::Tensor& docs) {
  TORCH_CHECK(queries.device().is_cpu() && docs.device().is_cpu(), "maxsim: queries and docs must be CPU tensors");
  TORCH_CHECK(queries.dim() == 3 && docs.dim() == 3 && queries.size(2) == docs.size(2),
              "maxsim: queries [B, Lq, D] and docs [C, Ld, D] with the same D, got ", queries.sizes(), " and ",
              docs.sizes());
  TORCH_CHECK(queries.scalar_type() == docs.scalar_type(), "maxsim: queries and docs must share a dtype");
  TORCH_CHECK(at::isFloatingType(queries.scalar_type()), "maxsim: queries and docs must be floating point");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> maxsim_token_max_cpu(const at::Tensor& queries, const at::Tensor& query_mask,
                                                        const at::Tensor& docs, const at::Tensor& doc_mask) {
  check_embeddings(queries, docs);
  const int64_t B = queries.size(0), Lq = queries.size(1), D = queries.size(2), C = docs.size(0), Ld = docs.size(1);
  TORCH_CHECK(query_mask.scalar_type() == at::kBool && query_mask.device().is_cpu() && query_mask.dim() == 2 &&
                  query_mask.size(0) == B && query_mask.size(1) == Lq,
              "maxsim: query_mask must be a CPU bool tensor [B, Lq]");
  TORCH_CHECK(doc_mask.scalar_type() == at::kBool && doc_mask.device().is_cpu() && doc_mask.dim() == 2 &&
                  doc_mask.size(0) == C && doc_mask.size(1) == Ld,
              "maxsim: doc_mask must be a CPU bool tensor [C, Ld]");
  const auto compute = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor values = at::zeros({B, Lq, C}, queries.options().dtype(compute));
  at::Tensor index = at::full({B, Lq, C}, -1, queries.options().dtype(at::kInt));
  const at::Tensor rows = query_mask.reshape({B * Lq}).nonzero().squeeze(1).contiguous();
  const int64_t M = rows.size(0);
  if (M == 0 || C == 0 || Ld == 0) return {values, index};
  const at::Tensor q = queries.reshape({B * Lq, D}).index_select(0, rows).to(compute).contiguous();
  const int64_t chunk = std::max<int64_t>(1, kTileColumns / Ld), row_blocks = (M + kTileRows - 1) / kTileRows;
  AT_DISPATCH_FLOATING_TYPES(compute, "maxsim_token_max_cpu", [&] {
    for (int64_t c0 = 0; c0 < C; c0 += chunk) {
      const int64_t cn = std::min(chunk, C - c0);
      const at::Tensor valid = doc_mask.narrow(0, c0, cn).reshape({cn * Ld}).nonzero().squeeze(1).contiguous();
      const int64_t T_cols = valid.size(0);
      if (T_cols == 0) continue;
      std::vector<int64_t> start(cn + 1, 0);
      std::vector<int32_t> token(T_cols);
      const int64_t* flat = valid.data_ptr<int64_t>();
      for (int64_t k = 0; k < T_cols; ++k) {
        ++start[flat[k] / Ld + 1];
        token[k] = static_cast<int32_t>(flat[k] % Ld);
      }
      for (int64_t c = 0; c < cn; ++c) start[c + 1] += start[c];
      const at::Tensor d = docs.narrow(0, c0, cn).reshape({cn * Ld, D}).index_select(0, valid).to(compute);
      const int64_t* row = rows.data_ptr<int64_t>();
      scalar_t* vp = values.data_ptr<scalar_t>();
      int32_t* ip = index.data_ptr<int32_t>();
      // each task: its row blocks' GEMMs (single-threaded inside the parallel region) into one tile it reuses, each
      // reduced at once
      at::parallel_for(0, row_blocks, 1, [&](int64_t b0, int64_t b1) {
        at::Tensor tile = at::empty({std::min(kTileRows, M), T_cols}, q.options());
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t m0 = b * kTileRows, mn = std::min(kTileRows, M - m0);
          at::Tensor p = tile.narrow(0, 0, mn);
          at::mm_out(p, q.narrow(0, m0, mn), d.t());
          reduce<scalar_t>(p.data_ptr<scalar_t>(), T_cols, row + m0, start.data(), token.data(), cn, c0, C, vp, ip,
                           0, mn);
        }
      });
    }
  });
  return {values, index};
}

std::tuple<at::Tensor, at::Tensor> maxsim_token_grad_cpu(const at::Tensor& weights, const at::Tensor& index,
                                                         const at::Tensor& queries, const at::Tensor& docs) {
  check_embeddings(queries, docs);
  const int64_t B = queries.size(0), Lq = queries.size(1), D = queries.size(2), C = docs.size(0), Ld = docs.size(1);
  const auto compute = weights.scalar_type();
  TORCH_CHECK(compute == at::kFloat || compute == at::kDouble, "maxsim: weights must be float32 or float64");
  TORCH_CHECK(weights.device().is_cpu() && weights.dim() == 3 && weights.size(0) == B && weights.size(1) == Lq &&
                  weights.size(2) == C,
              "maxsim: weights must be a CPU tensor [B, Lq, C], got ", weights.sizes());
  TORCH_CHECK(index.scalar_type() == at::kInt && index.device().is_cpu() && index.sizes() == weights.sizes(),
              "maxsim: index must be a CPU int32 tensor shaped like weights");
  if (index.numel() > 0) {
    TORCH_CHECK(index.min().item<int32_t>() >= -1 && index.max().item<int32_t>() < Ld,
                "maxsim: index entries must lie in [-1, Ld)");
  }
  at::Tensor grad_q = at::zeros({B, Lq, D}, queries.options().dtype(compute));
  at::Tensor grad_d = at::zeros({C, Ld, D}, queries.options().dtype(compute));
  if (index.numel() == 0 || D == 0) return {grad_q, grad_d};
  const at::Tensor idx = index.contiguous(), q = queries.contiguous(), d = docs.contiguous();
  const int64_t R = B * Lq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queries.scalar_type(), "maxsim_token_grad_cpu", [&] {
    using In = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(compute, "maxsim_token_grad_cpu_compute", [&] {
      const Weights<scalar_t> w{weights.data_ptr<scalar_t>(), Lq, weights.stride(0), weights.stride(1),
                                weights.stride(2)};
      const int32_t* ip = idx.data_ptr<int32_t>();
      const In* qp = q.data_ptr<In>();
      const In* dp = d.data_ptr<In>();
      scalar_t* gq = grad_q.data_ptr<scalar_t>();
      scalar_t* gd = grad_d.data_ptr<scalar_t>();
      at::parallel_for(0, R, std::max<int64_t>(kRowBlock, grain(C * D)), [&](int64_t r0, int64_t r1) {
        grad_queries<In, scalar_t>(w, ip, dp, gq, C, Ld, D, r0, r1);
      });
      at::parallel_for(0, C, std::max<int64_t>(kDocBlock, grain(R * D)), [&](int64_t c0, int64_t c1) {
        grad_docs<In, scalar_t>(w, ip, qp, gd, R, C, Ld, D, c0, c1);
      });
    });
  });
  return {grad_q, grad_d};
}

}  // namespace fastcache
