// Fused softmax-gradient epilogue of the contrastive loss (CPU). See contrastive.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

#include "../contrastive_params.h"

namespace fastcache {

// Turns similarity blocks of rows [params.row0, params.row0 + c) into dL/dsimilarity in place (with
// params.compute_grad) and returns the per-row losses.
at::Tensor contrastive_epilogue_cpu(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, const ContrastiveParams& params);

// The slab strategy with this epilogue in one call (fastcache/ops/contrastive.py's _slab on the cpu backend): rows
// normalised (cosine), per chunk of rows the similarity GEMMs, the epilogue and the gradient GEMMs, then the
// normalisation backward. Guides come normalised in the compute dtype. params: row0 0, batch_size the queries' rows
// (each chunk's epilogue gets its own row0). Returns the mean loss and, with params.compute_grad,
// the fp32/fp64 gradients w.r.t. queries, docs (2-D) and all_queries (when given), and the gradient filter's
// (skipped, all) tile counts (params.filter_threshold > 0; else 0, 0).
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::pair<int64_t, int64_t>>
contrastive_slab_cpu(const at::Tensor& queries, const at::Tensor& docs, const std::optional<at::Tensor>& all_queries,
                     const std::optional<at::Tensor>& guide_queries, const std::optional<at::Tensor>& guide_docs,
                     const std::optional<at::Tensor>& doc_ids, bool query_to_query, bool doc_to_query,
                     bool doc_to_doc, bool cosine, double eps, const ContrastiveParams& params, int64_t chunk);

}  // namespace fastcache
