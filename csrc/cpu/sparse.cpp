// Products with sparse operands on CPU: SPLADE embeddings hold a few hundred non-zero entries in ~30k columns, so
// the contrastive op's similarity and gradient products cost nnz-sized work instead of dense GEMMs.
//
// Operands are compressed rows (starts, int32 columns, values): of the embeddings for the similarity's rows, of
// their transposes (vocabulary-major) for its columns and for the gradient products, so every output row is
// written in order by one thread:
//   scores:   out[i, :] = Σ_{(v, a) in row i of a} a · (row v of bᵀ)     (scatter into one cache-resident row)
//   products: out[i, v] += Σ_{(j, b) in row v of bᵀ} g[i, j] · b        (kRowBlock rows of out per pass over bᵀ,
//             their g rows column-major so that an entry (j, b) is one vector multiply-add)
// Sums run in a fixed order (deterministic, any thread count), accumulated in the values' dtype.
#include "sparse.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <vector>

#include "contrastive_row.h"  // FASTCACHE_INLINE, FASTCACHE_SIMD_CLONES

namespace fastcache {
namespace {

// products: rows of out sharing one pass over bᵀ; their g rows, stored column-major (16 KB per 256 columns of g in
// fp32), stay in L1, and one entry of bᵀ updates all of the rows' sums with one vector load
constexpr int64_t kRowBlock = 16;

void check_compressed(const at::Tensor& starts, const at::Tensor& columns, const at::Tensor& values,
                      const char* name) {
  TORCH_CHECK(starts.device().is_cpu() && columns.device().is_cpu() && values.device().is_cpu(), name,
              ": compressed rows must be CPU tensors");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.is_contiguous() && starts.numel() >= 1,
              name, ": starts must be a contiguous int64 vector of rows + 1 entries");
  TORCH_CHECK(columns.scalar_type() == at::kInt && columns.dim() == 1 && columns.is_contiguous(), name,
              ": columns must be a contiguous int32 vector");
  TORCH_CHECK((values.scalar_type() == at::kFloat || values.scalar_type() == at::kDouble) && values.dim() == 1 &&
                  values.is_contiguous() && values.numel() == columns.numel(),
              name, ": values must be a contiguous fp32/fp64 vector as long as columns");
}

// out[r, v] += Σ_{l in row v of bᵀ} wt[column[l]·kRowBlock + r]·value[l] for r < rows (wt: a block of g's rows,
// column-major, padded with zero rows to kRowBlock). Compiled once per instruction set, picked at load time.
template <typename T>
FASTCACHE_SIMD_CLONES void add_block_products(const T* wt, int64_t rows, T* out, int64_t ld, int64_t width,
                                              const int64_t* bt_start, const int32_t* bt_column,
                                              const T* bt_value) {
  for (int64_t v = 0; v < width; ++v) {
    const int64_t l0 = bt_start[v], l1 = bt_start[v + 1];
    if (l0 == l1) continue;
    T acc[kRowBlock] = {};
    for (int64_t l = l0; l < l1; ++l) {
      const T* w = wt + static_cast<int64_t>(bt_column[l]) * kRowBlock;
      const T b = bt_value[l];
      for (int64_t r = 0; r < kRowBlock; ++r) acc[r] += w[r] * b;
    }
    for (int64_t r = 0; r < rows; ++r) out[r * ld + v] += acc[r];
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_rows_cpu(const at::Tensor& x, at::ScalarType dtype) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2, "sparse_rows_cpu: x must be a 2-d CPU tensor");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "sparse_rows_cpu: dtype must be float32 or float64");
  TORCH_CHECK(x.size(1) <= INT_MAX, "sparse_rows_cpu: at most 2^31 - 1 columns, got ", x.size(1));
  const at::Tensor input = x.contiguous();
  const int64_t n = input.size(0), width = input.size(1);
  at::Tensor starts = at::empty({n + 1}, x.options().dtype(at::kLong));
  int64_t* start = starts.data_ptr<int64_t>();
  at::Tensor columns, values;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(), "sparse_rows_cpu", [&] {
    const scalar_t* data = input.data_ptr<scalar_t>();
    start[0] = 0;
    at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = data + r * width;
        int64_t count = 0;
        for (int64_t v = 0; v < width; ++v) count += row[v] != scalar_t(0);
        start[r + 1] = count;
      }
    });
    for (int64_t r = 0; r < n; ++r) start[r + 1] += start[r];
    columns = at::empty({start[n]}, x.options().dtype(at::kInt));
    values = at::empty({start[n]}, x.options().dtype(dtype));
    int32_t* column = columns.data_ptr<int32_t>();
    AT_DISPATCH_FLOATING_TYPES(dtype, "sparse_rows_cpu_values", [&] {
      using value_t = scalar_t;
      value_t* value = values.data_ptr<value_t>();
      at::parallel_for(0, n, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const auto* row = data + r * width;
          int64_t k = start[r];
          for (int64_t v = 0; v < width; ++v) {
            if (row[v] != scalar_t(0)) {
              column[k] = static_cast<int32_t>(v);
              value[k++] = static_cast<value_t>(row[v]);
            }
          }
        }
      });
    });
  });
  return {starts, columns, values};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_transpose_cpu(const at::Tensor& starts,
                                                                    const at::Tensor& columns,
                                                                    const at::Tensor& values, int64_t row0,
                                                                    int64_t row1, int64_t width) {
  check_compressed(starts, columns, values, "sparse_transpose_cpu");
  TORCH_CHECK(0 <= row0 && row0 <= row1 && row1 < starts.numel(), "sparse_transpose_cpu: rows ", row0, " .. ", row1,
              " out of range");
  TORCH_CHECK(0 <= width && row1 - row0 <= INT_MAX, "sparse_transpose_cpu: bad width or row count");
  const int64_t* start = starts.data_ptr<int64_t>();
  const int32_t* column = columns.data_ptr<int32_t>();
  const int64_t first = start[row0], last = start[row1];
  at::Tensor t_starts = at::zeros({width + 1}, starts.options());
  at::Tensor t_columns = at::empty({last - first}, columns.options());
  at::Tensor t_values = at::empty({last - first}, values.options());
  int64_t* t_start = t_starts.data_ptr<int64_t>();
  int32_t* t_column = t_columns.data_ptr<int32_t>();
  for (int64_t k = first; k < last; ++k) {  // counting sort by column: rows stay in order within each
    TORCH_CHECK(column[k] >= 0 && column[k] < width, "sparse_transpose_cpu: column ", column[k], " out of range");
    ++t_start[column[k] + 1];
  }
  for (int64_t v = 0; v < width; ++v) t_start[v + 1] += t_start[v];
  std::vector<int64_t> next(t_start, t_start + width);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sparse_transpose_cpu", [&] {
    const scalar_t* value = values.data_ptr<scalar_t>();
    scalar_t* t_value = t_values.data_ptr<scalar_t>();
    for (int64_t r = row0; r < row1; ++r) {
      for (int64_t k = start[r]; k < start[r + 1]; ++k) {
        const int64_t slot = next[column[k]]++;
        t_column[slot] = static_cast<int32_t>(r - row0);
        t_value[slot] = value[k];
      }
    }
  });
  return {t_starts, t_columns, t_values};
}

void sparse_scores_cpu(at::Tensor& out, const at::Tensor& a_starts, const at::Tensor& a_columns,
                       const at::Tensor& a_values, int64_t a_row0, const at::Tensor& bt_starts,
                       const at::Tensor& bt_columns, const at::Tensor& bt_values) {
  check_compressed(a_starts, a_columns, a_values, "sparse_scores_cpu (a)");
  check_compressed(bt_starts, bt_columns, bt_values, "sparse_scores_cpu (bt)");
  TORCH_CHECK(out.device().is_cpu() && out.dim() == 2 && out.stride(1) == 1 && out.scalar_type() ==
                  a_values.scalar_type() && bt_values.scalar_type() == a_values.scalar_type(),
              "sparse_scores_cpu: out must be a 2-d CPU matrix with unit column stride in the values' dtype");
  const int64_t m = out.size(0), n = out.size(1), ld = out.stride(0);
  TORCH_CHECK(0 <= a_row0 && a_row0 + m < a_starts.numel(), "sparse_scores_cpu: a has too few rows");
  const int64_t* a_start = a_starts.data_ptr<int64_t>() + a_row0;
  const int32_t* a_column = a_columns.data_ptr<int32_t>();
  const int64_t* bt_start = bt_starts.data_ptr<int64_t>();
  const int32_t* bt_column = bt_columns.data_ptr<int32_t>();
  const int64_t width = bt_starts.numel() - 1;
  for (int64_t k = a_start[0]; k < a_start[m]; ++k)
    TORCH_CHECK(a_column[k] >= 0 && a_column[k] < width, "sparse_scores_cpu: a has a column past bᵀ's rows");
  for (int64_t k = 0; k < bt_columns.numel(); ++k)
    TORCH_CHECK(bt_column[k] >= 0 && bt_column[k] < n, "sparse_scores_cpu: bᵀ has a column past out's width");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparse_scores_cpu", [&] {
    const scalar_t* a_value = a_values.data_ptr<scalar_t>();
    const scalar_t* bt_value = bt_values.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    at::parallel_for(0, m, 1, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        scalar_t* row = result + i * ld;
        std::fill(row, row + n, scalar_t(0));
        for (int64_t k = a_start[i]; k < a_start[i + 1]; ++k) {
          const scalar_t a = a_value[k];
          const int32_t v = a_column[k];
          for (int64_t l = bt_start[v]; l < bt_start[v + 1]; ++l) row[bt_column[l]] += a * bt_value[l];
        }
      }
    });
  });
}

void sparse_add_products_cpu(at::Tensor& out, const at::Tensor& g, const at::Tensor& bt_starts,
                             const at::Tensor& bt_columns, const at::Tensor& bt_values) {
  check_compressed(bt_starts, bt_columns, bt_values, "sparse_add_products_cpu (bt)");
  TORCH_CHECK(out.device().is_cpu() && g.device().is_cpu() && out.dim() == 2 && g.dim() == 2 &&
                  out.stride(1) == 1 && out.scalar_type() == bt_values.scalar_type() &&
                  g.scalar_type() == out.scalar_type(),
              "sparse_add_products_cpu: out and g must be 2-d CPU matrices in the values' dtype, out with unit "
              "column stride");
  const int64_t m = out.size(0), width = out.size(1), ld = out.stride(0);
  TORCH_CHECK(g.size(0) == m && bt_starts.numel() == width + 1,
              "sparse_add_products_cpu: g must have out's rows and bᵀ out's columns");
  const int64_t n = g.size(1), g_row = g.stride(0), g_col = g.stride(1);  // g read by its strides (gᵀ: a view)
  const int64_t* bt_start = bt_starts.data_ptr<int64_t>();
  const int32_t* bt_column = bt_columns.data_ptr<int32_t>();
  for (int64_t k = 0; k < bt_columns.numel(); ++k)
    TORCH_CHECK(bt_column[k] >= 0 && bt_column[k] < n, "sparse_add_products_cpu: bᵀ has a column past g's width");
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "sparse_add_products_cpu", [&] {
    const scalar_t* bt_value = bt_values.data_ptr<scalar_t>();
    const scalar_t* w = g.data_ptr<scalar_t>();
    scalar_t* result = out.data_ptr<scalar_t>();
    const int64_t blocks = (m + kRowBlock - 1) / kRowBlock;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::vector<scalar_t> wt(n * kRowBlock);
      for (int64_t block = b0; block < b1; ++block) {
        const int64_t i0 = block * kRowBlock, rows = std::min(kRowBlock, m - i0);
        for (int64_t j = 0; j < n; ++j)
          for (int64_t r = 0; r < kRowBlock; ++r) wt[j * kRowBlock + r] = r < rows ? w[(i0 + r) * g_row + j * g_col] : 0;
        add_block_products(wt.data(), rows, result + i0 * ld, ld, width, bt_start, bt_column, bt_value);
      }
    });
  });
}

}  // namespace fastcache
