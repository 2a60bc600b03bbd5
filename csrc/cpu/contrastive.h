// Fused softmax-gradient epilogue of the contrastive loss (CPU). See contrastive.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>

namespace fastcache {

// Turns similarity blocks of rows [row0, row0 + c) into dL/dsimilarity in place and returns the per-row losses.
at::Tensor contrastive_epilogue_cpu(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, int64_t row0, int64_t batch_size, int64_t num_positives, int64_t offset,
    int64_t own_query_offset, double scale,
    int64_t hardness_mode, double hardness_strength, bool joint, int64_t margin_strategy, double margin,
    bool compute_grad);

// The slab strategy with this epilogue in one call (fastcache/ops/contrastive.py's _slab on the cpu backend): rows
// normalised (cosine), per chunk of rows the similarity GEMMs, the epilogue and the gradient GEMMs, then the
// normalisation backward. Guides come normalised in the compute dtype. Returns the mean loss and, with need_grad,
// the fp32/fp64 gradients w.r.t. queries, docs (2-D) and all_queries (when given).
std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>>
contrastive_slab_cpu(const at::Tensor& queries, const at::Tensor& docs, const std::optional<at::Tensor>& all_queries,
                     const std::optional<at::Tensor>& guide_queries, const std::optional<at::Tensor>& guide_docs,
                     const std::optional<at::Tensor>& doc_ids, bool query_to_query, bool doc_to_query,
                     bool doc_to_doc, bool cosine, double eps, int64_t num_positives, int64_t offset,
                     int64_t own_query_offset, double scale, int64_t hardness_mode, double hardness_strength,
                     bool joint, int64_t margin_strategy, double margin, int64_t chunk, bool need_grad);

}  // namespace fastcache
