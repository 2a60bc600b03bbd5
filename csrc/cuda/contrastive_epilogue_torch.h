// Torch binding of the CUDA contrastive epilogue (built only with the CUDA extension). See
// contrastive_epilogue_torch.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>

#include "../contrastive_params.h"

namespace fastcache {

// contrastive_epilogue_cpu's arguments on CUDA tensors, plus the raw cudaStream_t to launch on (as an integer:
// torch.cuda.current_stream(device).cuda_stream).
at::Tensor contrastive_epilogue_cuda(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, const ContrastiveParams& params, int64_t stream);

}  // namespace fastcache
