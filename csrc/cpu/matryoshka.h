// Fused Matryoshka epilogue of the contrastive loss (CPU): every dimension of a row chunk at once. See matryoshka.cpp.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <tuple>
#include <vector>

#include "../contrastive_params.h"

namespace fastcache {

// Turns the segment products of rows [row0, row0 + c) into the backward GEMMs' per-segment gradients in place;
// returns (the rows' weighted losses [c], per direction the row radial sums [K, c] and column radial sums [K, n]).
std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> matryoshka_epilogue_cpu(
    std::vector<at::Tensor> segments, std::vector<int64_t> kinds, std::vector<at::Tensor> guides,
    std::optional<at::Tensor> doc_ids, std::vector<at::Tensor> row_scales, std::vector<at::Tensor> column_scales,
    std::vector<double> weights, const ContrastiveParams& params);

// One row chunk of the fused Matryoshka slab (fastcache/ops/matryoshka.py on the cpu backend), per direction with
// row operand X [c, D] and column operand Y [n, D]: the segment products X[:, S_k]·Y[:, S_k]ᵀ into segments (S_k =
// [dims[k + 1], dims[k]), dims descending), this epilogue, and with compute_grad the backward GEMMs added into
// row_grads (dX [c, D]) and column_grads_t (dYᵀ [D, n]) and the radial sums into row_radial [K, c] and
// column_radial [K, n] (cosine). One parallel region over row groups (GEMMs on one thread each), one over columns.
// Returns the sum of the rows' weighted losses.
double matryoshka_chunk_cpu(
    std::vector<at::Tensor> segments, std::vector<int64_t> kinds, std::vector<at::Tensor> guides,
    std::optional<at::Tensor> doc_ids, std::vector<at::Tensor> row_scales, std::vector<at::Tensor> column_scales,
    std::vector<double> weights, std::vector<int64_t> dims, std::vector<at::Tensor> row_operands,
    std::vector<at::Tensor> column_operands, std::vector<at::Tensor> row_grads,
    std::vector<at::Tensor> column_grads_t, std::vector<at::Tensor> row_radial, std::vector<at::Tensor> column_radial,
    const ContrastiveParams& params);

}  // namespace fastcache
