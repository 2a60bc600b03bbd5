// Fused Matryoshka epilogue of the contrastive loss (CPU): every dimension of a row chunk at once. See matryoshka.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>
#include <vector>

namespace fastcache {

// Turns the segment products of rows [row0, row0 + c) into the backward GEMMs' per-segment gradients in place;
// returns (the rows' weighted losses [c], per direction the row radial sums [K, c] and column radial sums [K, n]).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> matryoshka_epilogue_cpu(
    std::vector<at::Tensor> segments, std::vector<int64_t> kinds, std::vector<at::Tensor> guides,
    std::optional<at::Tensor> doc_ids, std::vector<at::Tensor> row_scales, std::vector<at::Tensor> column_scales,
    std::vector<double> weights, int64_t row0, int64_t batch_size, int64_t num_positives, int64_t offset,
    int64_t own_query_offset, double scale, int64_t hardness_mode, double hardness_strength, bool joint,
    int64_t margin_strategy, double margin, bool compute_grad);

}  // namespace fastcache
