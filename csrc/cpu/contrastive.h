// Fused softmax-gradient epilogue of the contrastive loss (CPU). See contrastive.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>

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

}  // namespace fastcache
