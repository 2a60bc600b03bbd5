// Torch binding of the CUDA contrastive epilogue (built only with the CUDA extension). See
// contrastive_epilogue_torch.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>

namespace fastcache {

// contrastive_epilogue_cpu's arguments on CUDA tensors, plus the raw cudaStream_t to launch on (as an integer:
// torch.cuda.current_stream(device).cuda_stream).
at::Tensor contrastive_epilogue_cuda(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, int64_t row0, int64_t batch_size, int64_t num_positives, int64_t offset,
    int64_t own_query_offset, double scale,
    int64_t hardness_mode, double hardness_strength, bool joint, int64_t margin_strategy, double margin,
    bool compute_grad, int64_t stream);

}  // namespace fastcache
