// Products with sparse operands on CPU (the contrastive op's strategy "sparse"). See sparse.cpp.
#pragma once
#include <ATen/ATen.h>

#include <tuple>

namespace fastcache {

// The entries != 0 (NaN included) of each row of a dense [n, width] matrix, in column order, as compressed rows:
// (starts int64 [n+1], columns int32 [nnz], values [nnz] in `dtype`, fp32 or fp64); row r holds entries
// starts[r] .. starts[r+1]-1.
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_rows_cpu(const at::Tensor& x, at::ScalarType dtype);

// Compressed rows of the [width, row1-row0] transpose of rows row0 .. row1-1 of compressed rows (their column
// indices counted from row0).
std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_transpose_cpu(const at::Tensor& starts,
                                                                    const at::Tensor& columns,
                                                                    const at::Tensor& values, int64_t row0,
                                                                    int64_t row1, int64_t width);

// out[i, j] = Σ_v a[a_row0 + i, v]·b[j, v] for every row i of out [m, n] (rows may be strided): a as compressed
// rows, b as compressed rows of its transpose bᵀ [width, n].
void sparse_scores_cpu(at::Tensor& out, const at::Tensor& a_starts, const at::Tensor& a_columns,
                       const at::Tensor& a_values, int64_t a_row0, const at::Tensor& bt_starts,
                       const at::Tensor& bt_columns, const at::Tensor& bt_values);

// out[i, v] += Σ_j g[i, j]·b[j, v] for out [m, width] and a dense g [m, n] (any strides): b as compressed rows of
// its transpose bᵀ [width, n].
void sparse_add_products_cpu(at::Tensor& out, const at::Tensor& g, const at::Tensor& bt_starts,
                             const at::Tensor& bt_columns, const at::Tensor& bt_values);

}  // namespace fastcache
