// Fused Matryoshka epilogue of the contrastive loss on CPU: every dimension of a row chunk in one sweep per row.
//
// Dims d_0 > ... > d_{K-1}, segments S_k = [d_{k+1}, d_k) (d_K = 0). Input, per enabled direction (rows X
// against columns Y), the K raw segment products P_k = X[:, S_k]·Y[:, S_k]ᵀ of rows i = row0 .. row0+c-1, the
// prefix-norm reciprocals a_k(i), b_k(j) (none for "dot": a = b = 1) and the dim weights w_k. Per row: first the
// prefix products R_k = Σ_{k' >= k} P_k' of every dim, from the smallest up (the one read of the K segment rows);
// then, from the largest dim down, s_k = a_k·R_k·b_k through the contrastive row epilogue of contrastive_row.h
// (every option), which gives the row's loss L_k and g_k = dL_k/ds_k. Out:
//   loss_i = Σ_k w_k·L_k(i)
//   in place of P_j: A_j = Σ_{k <= j} w_k·a_k·g_k·b_k   (what the backward GEMMs of segment j take: A_j is
//                    A_{j-1}, written just before, plus dim j's term, so each segment row is written once)
//   row radial t_k(i) = w_k·Σ_j g_k·s_k and column radial u_k(j) = w_k·Σ_i g_k·s_k   (cosine only)
// The per-dim work stays in a scratch of K + 1 rows per direction (the R_k, the row being rewritten).
// Rows run in parallel in a fixed number of groups (set by c alone); each group sums its columns' radial terms
// on its own, and the groups' sums are added in group order: the epilogue's results do not depend on the thread
// count.
//
// matryoshka_chunk_cpu (at the end) runs a whole row chunk of the slab around this epilogue in two parallel
// regions: over row groups (each task: its rows' segment GEMMs, epilogue and dX GEMMs, on its own thread), then
// over candidate columns (the dYᵀ GEMMs and the column radial sums). Before, the chunk's ~20 ATen calls each opened
// a parallel region, each waiting for the slowest thread: with another process busy on one of two cores that made
// the loss stage ~3.4x slower than on an idle machine.
#include "matryoshka.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "contrastive_row.h"

namespace fastcache {
namespace {

using row::row_loss;
using row::RowBlock;

constexpr int64_t kRowsPerGroup = 16;  // rows per group (at most kMaxGroups groups per call)
// matryoshka_chunk_cpu's row tasks are whole groups: up to 64 threads share a chunk's GEMMs and epilogue (the
// groups' column sums take kMaxGroups·K·columns values)
constexpr int64_t kMaxGroups = 64;
constexpr int kLanes = 16;             // independent partial sums of a row's radial term (vectorised)

template <typename T>
struct Direction {
  T* p = nullptr;                 // segment k's row r at p + k * ld_segment + r * ld_row
  int64_t ld_segment = 0, ld_row = 0, n = 0;
  T* segment(int64_t k, int64_t r) const { return p + k * ld_segment + r * ld_row; }
  const T* g = nullptr;           // guide row r at g + r * ldg, or nullptr
  int64_t ldg = 0;
  const int64_t* ids = nullptr;   // candidate ids of the columns, or nullptr
  Kind kind = kQueryToDoc;
  const T* a = nullptr;           // a_k(r) at a[k * lda + r]; nullptr for "dot"
  const T* b = nullptr;           // b_k(j) at b[k * ldb + j]
  int64_t lda = 0, ldb = 0;
  T* row_radial = nullptr;        // [K, rows]: t_k(r) is added to row_radial[k * ld_radial + r]
  int64_t ld_radial = 0;          // row_radial's row stride
  int64_t column_offset = 0;      // this direction's columns in a group's partial column sums
};

template <typename T>
struct Job {
  Direction<T> dirs[4];
  int ndirs = 0;
  int64_t K = 0, rows = 0, groups = 0, total_columns = 0;
  const double* weights = nullptr;
  ContrastiveParams p{};
  T* loss = nullptr;      // [rows]
  T* partial = nullptr;   // [groups, K, total_columns] column radial sums per group
};

// dim k's gradient of one direction's row, added to the running total: A_k = A_{k-1} + w·a·g·b, written to the
// segment row k (A_{k-1} is segment row k-1, written just before; "first": k = 0, no A_{k-1}). With cosine
// similarity, also the radial sums of w·g·s (row: returned; columns: added to column[]). e holds exp(logit - max):
// g = factor·e, minus scale/B at the positive column pos (pos < 0: none in this direction).
template <bool first, bool cosine, typename T>
FASTCACHE_INLINE double gradient_row(const T* e, T f, T wa, T positive, const T* R, const T* b, const T* previous,
                                     T* out, T* column, int64_t n, int64_t pos) {
  const T before = first || pos < 0 ? T(0) : previous[pos];
  T lane[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const T gw = e[j + l] * f * wa;
      if constexpr (cosine) {
        const T radial = gw * R[j + l] * b[j + l];  // w·g·s
        out[j + l] = first ? gw * b[j + l] : previous[j + l] + gw * b[j + l];
        column[j + l] += radial;
        lane[l] += radial;
      } else {
        out[j + l] = first ? gw : previous[j + l] + gw;
      }
    }
  }
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += lane[l];
  for (; j < n; ++j) {
    const T gw = e[j] * f * wa;
    if constexpr (cosine) {
      const T radial = gw * R[j] * b[j];
      out[j] = first ? gw * b[j] : previous[j] + gw * b[j];
      column[j] += radial;
      sum += radial;
    } else {
      out[j] = first ? gw : previous[j] + gw;
    }
  }
  if (pos >= 0) {  // the positive's -scale/B: replace its terms
    const T gw = (e[pos] * f - positive) * wa;
    if constexpr (cosine) {
      const T old = e[pos] * f * wa * R[pos] * b[pos], radial = gw * R[pos] * b[pos];
      out[pos] = before + gw * b[pos];
      column[pos] += radial - old;
      sum += static_cast<double>(radial) - old;
    } else {
      out[pos] = before + gw;
    }
  }
  return sum;
}

// Rows of groups [g0, g1). Per row: the prefix products of every dim from one read of the segment rows, then the
// dims from the largest down, each one's gradient added to the running total A and written over its segment row.
template <typename T>
FASTCACHE_INLINE void matryoshka_groups(const Job<T>& job, int64_t g0, int64_t g1) {
  const int64_t K = job.K;
  const bool grad = job.p.compute_grad;
  int64_t scratch_size = 0;
  for (int d = 0; d < job.ndirs; ++d) scratch_size += (1 + K) * job.dirs[d].n;
  std::vector<T> scratch(scratch_size);  // per direction: the K prefix products R_k, then the similarities / exps
  T* prefix[4];
  T* x[4];
  int64_t at = 0;
  for (int d = 0; d < job.ndirs; ++d) {
    prefix[d] = scratch.data() + at;
    x[d] = prefix[d] + K * job.dirs[d].n;
    at += (1 + K) * job.dirs[d].n;
  }
  std::vector<T> own;
  RowBlock<T> rows[4];
  const T positive = row::positive_gradient<T>(job.p);
  for (int64_t group = g0; group < g1; ++group) {
    const int64_t begin = group * job.rows / job.groups, end = (group + 1) * job.rows / job.groups;
    for (int64_t r = begin; r < end; ++r) {
      for (int d = 0; d < job.ndirs; ++d) {  // R_k = R_{k+1} + P_k, from the smallest dim up
        const Direction<T>& D = job.dirs[d];
        const int64_t n = D.n;
        std::copy(D.segment(K - 1, r), D.segment(K - 1, r) + n, prefix[d] + (K - 1) * n);
        for (int64_t k = K - 2; k >= 0; --k) {
          const T* segment = D.segment(k, r);
          const T* smaller = prefix[d] + (k + 1) * n;
          T* R = prefix[d] + k * n;
          for (int64_t j = 0; j < n; ++j) R[j] = smaller[j] + segment[j];
        }
      }
      double loss = 0.0;
      for (int64_t k = 0; k < K; ++k) {
        for (int d = 0; d < job.ndirs; ++d) {  // s_k = a_k·R_k·b_k into the row the contrastive epilogue rewrites
          const Direction<T>& D = job.dirs[d];
          const T* R = prefix[d] + k * D.n;
          T* s = x[d];
          if (D.a) {
            const T a = D.a[k * D.lda + r];
            const T* b = D.b + k * D.ldb;
            for (int64_t j = 0; j < D.n; ++j) s[j] = R[j] * a * b[j];
          } else {
            std::copy(R, R + D.n, s);
          }
          rows[d] = RowBlock<T>{s, D.g ? D.g + r * D.ldg : nullptr, D.ids, D.n, D.kind};
        }
        T factor[4];
        loss += job.weights[k] * static_cast<double>(row_loss(rows, job.ndirs, job.p.row0 + r, job.p, own, factor));
        if (!grad) continue;
        const T w = static_cast<T>(job.weights[k]);
        for (int d = 0; d < job.ndirs; ++d) {
          const Direction<T>& D = job.dirs[d];
          const int64_t pos = d == 0 ? job.p.offset + job.p.row0 + r : -1;  // rows[0] is query_to_doc
          T* out = D.segment(k, r);
          const T* previous = k > 0 ? D.segment(k - 1, r) : nullptr;
          if (!D.a) {  // direct calls: inlined into each instruction set's clone
            if (k == 0) {
              gradient_row<true, false, T>(x[d], factor[d], w, positive, nullptr, nullptr, previous, out, nullptr, D.n,
                                           pos);
            } else {
              gradient_row<false, false, T>(x[d], factor[d], w, positive, nullptr, nullptr, previous, out, nullptr,
                                            D.n, pos);
            }
            continue;
          }
          const T wa = w * D.a[k * D.lda + r];
          const T* R = prefix[d] + k * D.n;
          const T* b = D.b + k * D.ldb;
          T* column = job.partial + (group * K + k) * job.total_columns + D.column_offset;
          const double sum =
              k == 0 ? gradient_row<true, true, T>(x[d], factor[d], wa, positive, R, b, previous, out, column, D.n, pos)
                     : gradient_row<false, true, T>(x[d], factor[d], wa, positive, R, b, previous, out, column, D.n, pos);
          D.row_radial[k * D.ld_radial + r] += static_cast<T>(sum);
        }
      }
      job.loss[r] = static_cast<T>(loss);
    }
  }
}

// Compiled once per instruction set (AVX-512, AVX2, baseline) and picked at load time on x86-64.
FASTCACHE_SIMD_CLONES void matryoshka_groups_float(const Job<float>& job, int64_t g0, int64_t g1) {
  matryoshka_groups(job, g0, g1);
}

void matryoshka_groups_double(const Job<double>& job, int64_t g0, int64_t g1) { matryoshka_groups(job, g0, g1); }

template <typename T>
void run_groups(const Job<T>& job, int64_t g0, int64_t g1) {
  if constexpr (std::is_same_v<T, float>) {
    matryoshka_groups_float(job, g0, g1);
  } else {
    matryoshka_groups_double(job, g0, g1);
  }
}

void check_matrix(const at::Tensor& t, at::ScalarType dtype, int64_t rows, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must have dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape [", rows, ", ", cols,
              "], got ", t.sizes());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous along its last dimension");
}

// Checks the epilogue's arguments and fills job with them; row_radial: per direction the [K, rows] sums the rows'
// radial terms are added to (cosine with compute_grad; else empty). Returns the groups' column radial sums.
template <typename T>
at::Tensor prepare_job(Job<T>& job, const std::vector<at::Tensor>& segments, const std::vector<int64_t>& kinds,
                       const std::vector<at::Tensor>& guides, const std::optional<at::Tensor>& doc_ids,
                       const std::vector<at::Tensor>& row_scales, const std::vector<at::Tensor>& column_scales,
                       const std::vector<double>& weights, const std::vector<at::Tensor>& row_radial,
                       const ContrastiveParams& p) {
  const int ndirs = static_cast<int>(segments.size());
  TORCH_CHECK(ndirs >= 1 && ndirs <= 4, "segments: one tensor per enabled direction (1 to 4), got ", ndirs);
  TORCH_CHECK(kinds.size() == segments.size(), "kinds: one per segments tensor, got ", kinds.size());
  const int64_t K = static_cast<int64_t>(weights.size());
  TORCH_CHECK(K >= 1, "weights: one per dim, at least one");
  const at::Tensor& first = segments[0];
  const auto dtype = first.scalar_type();
  TORCH_CHECK(first.dim() == 3, "segments must be [K, rows, columns] tensors, got ", first.sizes());
  const int64_t rows = first.size(1);
  const bool guided = !guides.empty(), cosine = !row_scales.empty();
  TORCH_CHECK(!guided || guides.size() == segments.size(), "guides: none, or one per direction");
  TORCH_CHECK(row_scales.size() == column_scales.size() && (!cosine || row_scales.size() == segments.size()),
              "row_scales and column_scales: none (dot), or one each per direction");
  TORCH_CHECK(row_radial.size() == (cosine && p.compute_grad ? segments.size() : 0),
              "row radial sums: one per direction for cosine gradients, else none");
  TORCH_CHECK(p.num_positives > 0 && p.offset >= 0 && p.row0 >= 0 && p.offset + p.row0 + rows <= p.num_positives,
              "rows [", p.row0, ", ", p.row0 + rows, ") with offset ", p.offset, " exceed the ", p.num_positives,
              " positives");
  TORCH_CHECK(p.batch_size > 0, "batch_size must be positive");
  TORCH_CHECK(kinds[0] == kQueryToDoc, "the first direction must be query_to_doc");
  if (doc_ids) {
    TORCH_CHECK(doc_ids->device().is_cpu() && doc_ids->scalar_type() == at::kLong && doc_ids->dim() == 1 &&
                    doc_ids->is_contiguous() && doc_ids->size(0) == first.size(2),
                "doc_ids must be a contiguous int64 CPU vector with one id per query_to_doc column");
  }
  job.ndirs = ndirs;
  job.K = K;
  job.rows = rows;
  job.weights = weights.data();
  job.p = p;
  bool seen[4] = {false, false, false, false};
  for (int d = 0; d < ndirs; ++d) {
    const at::Tensor& s = segments[d];
    const int64_t kind = kinds[d];
    TORCH_CHECK(kind >= 0 && kind <= 3 && !seen[kind], "kinds must be distinct direction codes 0..3, got ", kind);
    seen[kind] = true;
    TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == dtype, "segments must be CPU tensors of one dtype");
    TORCH_CHECK(s.dim() == 3 && s.size(0) == K && s.size(1) == rows && s.stride(2) == 1,
                "segments[", d, "] must be [", K, ", ", rows, ", columns] with contiguous rows, got ", s.sizes());
    const int64_t n = s.size(2);
    TORCH_CHECK(n >= 1, "segments[", d, "] has no columns");
    // the columns each kind indexes: the positive (query_to_doc, doc_to_doc), the own query (query_to_query)
    if (kind == kQueryToDoc || kind == kDocToDoc) {
      TORCH_CHECK(n >= p.num_positives, "segments[", d, "] has fewer columns than the ", p.num_positives,
                  " positives");
      TORCH_CHECK(!doc_ids || n <= doc_ids->size(0), "doc_ids: fewer ids than segments[", d, "] has columns");
    }
    if (kind == kQueryToQuery) {
      TORCH_CHECK(p.own_query_offset >= 0 && p.own_query_offset + p.row0 + rows <= n,
                  "segments[", d, "]: own query columns exceed its ", n, " columns");
    }
    Direction<T>& D = job.dirs[d];
    D.p = s.data_ptr<T>();
    D.ld_segment = s.stride(0);
    D.ld_row = s.stride(1);
    D.n = n;
    D.kind = static_cast<Kind>(kind);
    if (doc_ids && (kind == kQueryToDoc || kind == kDocToDoc)) D.ids = doc_ids->data_ptr<int64_t>();
    if (guided) {
      TORCH_CHECK(kind != kDocToQuery, "doc_to_query has no guided form");
      check_matrix(guides[d], dtype, rows, n, "guides");
      D.g = guides[d].data_ptr<T>();
      D.ldg = guides[d].stride(0);
    }
    if (cosine) {
      check_matrix(row_scales[d], dtype, K, rows, "row_scales");
      check_matrix(column_scales[d], dtype, K, n, "column_scales");
      D.a = row_scales[d].data_ptr<T>();
      D.lda = row_scales[d].stride(0);
      D.b = column_scales[d].data_ptr<T>();
      D.ldb = column_scales[d].stride(0);
      if (p.compute_grad) {
        check_matrix(row_radial[d], dtype, K, rows, "row radial sums");
        D.row_radial = row_radial[d].data_ptr<T>();
        D.ld_radial = row_radial[d].stride(0);
      }
    }
    D.column_offset = job.total_columns;
    job.total_columns += n;
  }
  job.groups = std::clamp<int64_t>(rows / kRowsPerGroup, 1, kMaxGroups);
  at::Tensor partial =
      at::zeros({cosine && p.compute_grad ? job.groups * K * job.total_columns : 0}, first.options());
  job.partial = partial.data_ptr<T>();
  return partial;
}

// Adds the groups' column radial sums of direction d, columns [j0, j1), to out[k * ld + j], in group order.
template <typename T>
void add_column_radial(const Job<T>& job, int d, T* out, int64_t ld, int64_t j0, int64_t j1) {
  const int64_t total = job.total_columns, offset = job.dirs[d].column_offset;
  for (int64_t k = 0; k < job.K; ++k) {
    for (int64_t j = j0; j < j1; ++j) {
      T sum = 0;
      for (int64_t group = 0; group < job.groups; ++group) sum += job.partial[(group * job.K + k) * total + offset + j];
      out[k * ld + j] += sum;
    }
  }
}

// The first direction's segments (each entry's dtype and row count come from it), checked.
const at::Tensor& first_segments(const std::vector<at::Tensor>& segments) {
  TORCH_CHECK(!segments.empty(), "segments: one tensor per enabled direction (1 to 4), got 0");
  const at::Tensor& first = segments[0];
  TORCH_CHECK(first.scalar_type() == at::kFloat || first.scalar_type() == at::kDouble,
              "segments must be float32 or float64, got ", first.scalar_type());
  TORCH_CHECK(first.dim() == 3, "segments must be [K, rows, columns] tensors, got ", first.sizes());
  return first;
}

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> matryoshka_epilogue_cpu(
    std::vector<at::Tensor> segments, std::vector<int64_t> kinds, std::vector<at::Tensor> guides,
    std::optional<at::Tensor> doc_ids, std::vector<at::Tensor> row_scales, std::vector<at::Tensor> column_scales,
    std::vector<double> weights, const ContrastiveParams& p) {
  const at::Tensor& first = first_segments(segments);
  const int64_t K = static_cast<int64_t>(weights.size()), rows = first.size(1);
  const bool radial = p.compute_grad && !row_scales.empty();
  std::vector<at::Tensor> row_radial, column_radial;
  for (size_t d = 0; radial && d < segments.size(); ++d) {
    row_radial.push_back(at::zeros({K, rows}, first.options()));
    column_radial.push_back(at::zeros({K, segments[d].size(2)}, first.options()));
  }
  at::Tensor loss = at::empty({rows}, first.options());
  AT_DISPATCH_FLOATING_TYPES(first.scalar_type(), "matryoshka_epilogue_cpu", [&] {
    Job<scalar_t> job;
    const at::Tensor partial =
        prepare_job(job, segments, kinds, guides, doc_ids, row_scales, column_scales, weights, row_radial, p);
    job.loss = loss.data_ptr<scalar_t>();
    at::parallel_for(0, job.groups, 1, [&](int64_t g0, int64_t g1) { run_groups(job, g0, g1); });
    for (int d = 0; d < static_cast<int>(column_radial.size()); ++d) {
      at::parallel_for(0, job.dirs[d].n, 4096, [&](int64_t j0, int64_t j1) {
        add_column_radial(job, d, column_radial[d].data_ptr<scalar_t>(), job.dirs[d].n, j0, j1);
      });
    }
  });
  return {loss, row_radial, column_radial};
}

double matryoshka_chunk_cpu(
    std::vector<at::Tensor> segments, std::vector<int64_t> kinds, std::vector<at::Tensor> guides,
    std::optional<at::Tensor> doc_ids, std::vector<at::Tensor> row_scales, std::vector<at::Tensor> column_scales,
    std::vector<double> weights, std::vector<int64_t> dims, std::vector<at::Tensor> row_operands,
    std::vector<at::Tensor> column_operands, std::vector<at::Tensor> row_grads,
    std::vector<at::Tensor> column_grads_t, std::vector<at::Tensor> row_radial, std::vector<at::Tensor> column_radial,
    const ContrastiveParams& p) {
  const size_t ndirs = segments.size();
  const at::Tensor& first = first_segments(segments);
  const auto dtype = first.scalar_type();
  const int64_t K = static_cast<int64_t>(weights.size()), rows = first.size(1);
  TORCH_CHECK(dims.size() == weights.size(), "dims: one per weight, got ", dims.size(), " and ", weights.size());
  TORCH_CHECK(row_operands.size() == ndirs && column_operands.size() == ndirs,
              "row_operands and column_operands: one per direction");
  const int64_t D = row_operands[0].dim() == 2 ? row_operands[0].size(1) : 0;
  for (int64_t k = 0; k < K; ++k) {
    TORCH_CHECK(dims[k] > (k + 1 < K ? dims[k + 1] : 0) && dims[k] <= D,
                "dims must descend, be positive and at most the operands' ", D, " columns");
  }
  const bool cosine = !row_scales.empty();
  const size_t grads = p.compute_grad ? ndirs : 0, radials = p.compute_grad && cosine ? ndirs : 0;
  TORCH_CHECK(row_grads.size() == grads && column_grads_t.size() == grads,
              "row_grads and column_grads_t: one per direction with compute_grad, else none");
  TORCH_CHECK(column_radial.size() == radials, "column_radial: one per direction for cosine gradients, else none");
  for (size_t d = 0; d < ndirs; ++d) {
    const int64_t n = segments[d].dim() == 3 ? segments[d].size(2) : 0;
    check_matrix(row_operands[d], dtype, rows, D, "row_operands");
    check_matrix(column_operands[d], dtype, n, D, "column_operands");
    if (d < grads) {
      check_matrix(row_grads[d], dtype, rows, D, "row_grads");
      check_matrix(column_grads_t[d], dtype, D, n, "column_grads_t");
    }
    if (d < radials) check_matrix(column_radial[d], dtype, K, n, "column_radial");
  }
  at::Tensor loss = at::empty({rows}, first.options());
  double sum = 0.0;  // of the rows' losses
  AT_DISPATCH_FLOATING_TYPES(dtype, "matryoshka_chunk_cpu", [&] {
    Job<scalar_t> job;
    const at::Tensor partial =
        prepare_job(job, segments, kinds, guides, doc_ids, row_scales, column_scales, weights, row_radial, p);
    job.loss = loss.data_ptr<scalar_t>();
    // segment k = [dims[k + 1], dims[k]) of a tensor's dimension dim
    const auto segment = [&](const at::Tensor& t, int64_t k, int64_t dim = 1) {
      const int64_t lo = k + 1 < K ? dims[k + 1] : 0;
      return t.narrow(dim, lo, dims[k] - lo);
    };
    // Rows: each task takes whole row groups, their segment products, epilogue and dX GEMMs on one thread (a
    // GEMM inside a parallel region runs on the calling thread).
    at::parallel_for(0, job.groups, 1, [&](int64_t g0, int64_t g1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;  // per thread: no autograd graph in the workers either
      const int64_t r0 = g0 * rows / job.groups, r1 = g1 * rows / job.groups;
      for (size_t d = 0; d < ndirs; ++d) {
        const at::Tensor x = row_operands[d].narrow(0, r0, r1 - r0);
        for (int64_t k = 0; k < K; ++k) {
          at::Tensor out = segments[d][k].narrow(0, r0, r1 - r0);
          at::mm_out(out, segment(x, k), segment(column_operands[d], k).t());
        }
      }
      run_groups(job, g0, g1);
      for (size_t d = 0; d < grads; ++d) {
        const at::Tensor grad = row_grads[d].narrow(0, r0, r1 - r0);
        for (int64_t k = 0; k < K; ++k) {
          segment(grad, k).addmm_(segments[d][k].narrow(0, r0, r1 - r0), segment(column_operands[d], k));
        }
      }
    });
    for (int64_t r = 0; r < rows; ++r) sum += job.loss[r];
    if (!p.compute_grad) return;
    // Columns: each task takes a range of candidate columns (the same range of every direction, so that directions
    // with the same column operand never share an element across tasks): the dYᵀ GEMMs and the column radial sums.
    int64_t width = 0;
    for (size_t d = 0; d < ndirs; ++d) width = std::max(width, job.dirs[d].n);
    at::parallel_for(0, width, 256, [&](int64_t j0, int64_t j1) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      for (size_t d = 0; d < ndirs; ++d) {
        const int64_t end = std::min(j1, job.dirs[d].n);
        if (end <= j0) continue;
        const at::Tensor grad = column_grads_t[d].narrow(1, j0, end - j0);
        for (int64_t k = 0; k < K; ++k) {
          segment(grad, k, 0).addmm_(segment(row_operands[d], k).t(), segments[d][k].narrow(1, j0, end - j0));
        }
        if (d < radials) {
          add_column_radial(job, static_cast<int>(d), column_radial[d].data_ptr<scalar_t>(),
                            column_radial[d].stride(0), j0, end);
        }
      }
    });
  });
  return sum;
}

}  // namespace fastcache
