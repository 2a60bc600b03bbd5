// The MaxSim (late-interaction) primitives on CPU. See maxsim.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastcache {

// (values [B, Lq, C], index int32 [B, Lq, C]): values[b,t,c] = max over the valid tokens u of document c of
// dot(q[b,t], d[c,u]) in the compute dtype (fp32; fp64 for fp64 inputs), index the first u attaining it; 0 and -1
// where query token (b,t) is masked or document c has no valid token.
std::tuple<at::Tensor, at::Tensor> maxsim_token_max_cpu(const at::Tensor& queries, const at::Tensor& query_mask,
                                                        const at::Tensor& docs, const at::Tensor& doc_mask);

// (grad_queries [B, Lq, D], grad_docs [C, Ld, D]) in the weights' dtype: grad_q[b,t] = Σ_c w[b,t,c]·d[c, index],
// grad_d[c,u] = Σ_{(b,t): index[b,t,c] = u} w[b,t,c]·q[b,t]; entries with index -1 read nothing. The weights are
// read by their strides (an expanded view costs no copy).
std::tuple<at::Tensor, at::Tensor> maxsim_token_grad_cpu(const at::Tensor& weights, const at::Tensor& index,
                                                         const at::Tensor& queries, const at::Tensor& docs);

}  // namespace fastcache
