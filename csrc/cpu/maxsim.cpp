// The MaxSim primitives on CPU: the fused masked max/argmax over document tokens, and its gather/scatter backward.
//
// token max: the valid query tokens (M of them, gathered once, in the compute dtype T: fp32, fp64 for fp64 inputs)
// against the valid tokens of a chunk of documents (gathered per chunk): one BLAS GEMM P = Q·Dᵀ per chunk (the chunk
// sized so that P stays within kTileBytes), then per (query token, document) the max of P over the document's
// columns and the first token attaining it (ties to the lowest u, as torch.max; NaN wins, the first NaN). Masked
// tokens are never gathered, so nothing they hold reaches a result.
// token grad: grad_q[r] = Σ_c w[r,c]·d[c, index[r,c]] parallel over the query tokens r, grad_d[c,u] =
// Σ_{r: index[r,c]=u} w[r,c]·q[r] parallel over the documents c (each thread owns its documents' rows: no races);
// B·Lq·C·D multiply-adds each, 1/Ld of the GEMM.
#include "maxsim.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace fastcache {
namespace {

constexpr int64_t kTileBytes = int64_t(8) << 20;  // one chunk's GEMM output: cache-sized, and a bounded workspace

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work_per_item, 1));
}

// Rows [m0, m1) of the chunk's products p [M, T]: documents c0 + c (c < cn) own the columns [start[c], start[c+1]),
// whose tokens are token[k]; results at values / index [row[m] * C + c0 + c].
template <typename T>
void reduce_rows(const T* p, int64_t T_cols, const int64_t* row, const std::vector<int64_t>& start,
                 const std::vector<int32_t>& token, int64_t c0, int64_t C, T* values, int32_t* index, int64_t m0,
                 int64_t m1) {
  const int64_t cn = static_cast<int64_t>(start.size()) - 1;
  for (int64_t m = m0; m < m1; ++m) {
    const T* pm = p + m * T_cols;
    T* vm = values + row[m] * C + c0;
    int32_t* im = index + row[m] * C + c0;
    for (int64_t c = 0; c < cn; ++c) {
      T best = T(0);
      int32_t arg = -1;
      for (int64_t k = start[c]; k < start[c + 1]; ++k) {
        const T v = pm[k];
        if (arg < 0 || v > best || (v != v && best == best)) {
          best = v;
          arg = token[k];
        }
      }
      vm[c] = best;
      im[c] = arg;
    }
  }
}

template <typename In, typename T>
void grad_queries(const T* w, const int32_t* index, const In* docs, T* grad_q, int64_t C, int64_t Ld, int64_t D,
                  int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* g = grad_q + r * D;
    for (int64_t c = 0; c < C; ++c) {
      const int32_t u = index[r * C + c];
      if (u < 0) continue;
      const T wv = w[r * C + c];
      const In* d = docs + (c * Ld + u) * D;
      for (int64_t k = 0; k < D; ++k) g[k] += wv * static_cast<T>(d[k]);
    }
  }
}

template <typename In, typename T>
void grad_docs(const T* w, const int32_t* index, const In* queries, T* grad_d, int64_t R, int64_t C, int64_t Ld,
               int64_t D, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < R; ++r) {
    const In* q = queries + r * D;
    for (int64_t c = c0; c < c1; ++c) {
      const int32_t u = index[r * C + c];
      if (u < 0) continue;
      const T wv = w[r * C + c];
      T* g = grad_d + (c * Ld + u) * D;
      for (int64_t k = 0; k < D; ++k) g[k] += wv * static_cast<T>(q[k]);
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
  const int64_t chunk = std::max<int64_t>(1, kTileBytes / (M * Ld * static_cast<int64_t>(at::elementSize(compute))));
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
      const at::Tensor p = at::mm(q, d.t()).contiguous();
      const scalar_t* pp = p.data_ptr<scalar_t>();
      const int64_t* row = rows.data_ptr<int64_t>();
      scalar_t* vp = values.data_ptr<scalar_t>();
      int32_t* ip = index.data_ptr<int32_t>();
      at::parallel_for(0, M, grain(T_cols), [&](int64_t m0, int64_t m1) {
        reduce_rows<scalar_t>(pp, T_cols, row, start, token, c0, C, vp, ip, m0, m1);
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
  const at::Tensor w = weights.contiguous(), idx = index.contiguous(), q = queries.contiguous(), d = docs.contiguous();
  const int64_t R = B * Lq;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, queries.scalar_type(), "maxsim_token_grad_cpu", [&] {
    using In = scalar_t;
    AT_DISPATCH_FLOATING_TYPES(compute, "maxsim_token_grad_cpu_compute", [&] {
      const scalar_t* wp = w.data_ptr<scalar_t>();
      const int32_t* ip = idx.data_ptr<int32_t>();
      const In* qp = q.data_ptr<In>();
      const In* dp = d.data_ptr<In>();
      scalar_t* gq = grad_q.data_ptr<scalar_t>();
      scalar_t* gd = grad_d.data_ptr<scalar_t>();
      at::parallel_for(0, R, grain(C * D), [&](int64_t r0, int64_t r1) {
        grad_queries<In, scalar_t>(wp, ip, dp, gq, C, Ld, D, r0, r1);
      });
      at::parallel_for(0, C, grain(R * D), [&](int64_t c0, int64_t c1) {
        grad_docs<In, scalar_t>(wp, ip, qp, gd, R, C, Ld, D, c0, c1);
      });
    });
  });
  return {grad_q, grad_d};
}

}  // namespace fastcache
