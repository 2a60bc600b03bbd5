// Fused softmax-gradient epilogue of the contrastive loss on CPU.
//
// Input: raw similarity blocks s of rows i = row0 .. row0+c-1 (one row per local query), for the enabled
// directions: query_to_doc [c, N], query_to_query [c, Mq], doc_to_query [c, Mq], doc_to_doc [c, N or P].
// Per row, in one pass over the blocks:
//   logit = scale * s (+ hardness_strength * s on the penalised query_to_doc columns), masked columns -inf
//   (self / same-query, guide, and duplicates: candidates whose doc id equals the positive's)
//   joint:         loss_i = logsumexp(all logits) - logit_pos
//   per_direction: loss_i = mean_b logsumexp(block b) - logit_pos
// and then, in place, s <- dL/ds = coef * softmax_b(logits) (- pos_coef at the positive), where coef = scale/B
// (joint) or scale/(B * n_blocks) (per_direction), pos_coef = scale/B (both in ContrastiveParams, computed by
// kernel_params in Python) and L = mean over the B local rows. The hardness penalty is detached, so
// d logit / d s = scale everywhere. The options arrive as one ContrastiveParams (csrc/contrastive_params.h).
//
// contrastive_slab_cpu (at the end): the slab strategy around this epilogue in one call: rows normalised
// (normalize.cpp), per chunk s = X·Yᵀ into the blocks, the epilogue, then dX += (dL/ds)·Y and dY += (dL/ds)ᵀ·X per
// direction, then the normalisation backward.
#include "contrastive.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "contrastive_row.h"
#include "normalize.h"

namespace fastcache {
namespace {

using row::row_gradients;
using row::row_loss;
using row::RowBlock;

template <typename T>
struct Block {
  T* s = nullptr;         // row 0 of the block; row r at s + r * ld
  const T* g = nullptr;   // guide similarities (same shape) or nullptr
  const int64_t* ids = nullptr;  // candidate ids of the block's columns (duplicate masking) or nullptr
  int64_t ld = 0, ldg = 0, n = 0;
  Kind kind = kQueryToDoc;
};

// The epilogue of rows [begin, end): logits, log-partitions, losses and, in place, dL/ds.
template <typename T>
FASTCACHE_INLINE void epilogue_rows(Block<T>* blocks, int nblocks, int64_t begin, int64_t end, const ContrastiveParams& p,
                                    T* loss) {
  std::vector<T> own;  // scratch: a row's own query_to_doc columns
  RowBlock<T> rows[4];
  for (int64_t r = begin; r < end; ++r) {
    for (int k = 0; k < nblocks; ++k) {
      const Block<T>& b = blocks[k];
      rows[k] = RowBlock<T>{b.s + r * b.ld, b.g ? b.g + r * b.ldg : nullptr, b.ids, b.n, b.kind};
    }
    T factor[4];
    loss[r] = row_loss(rows, nblocks, p.row0 + r, p, own, factor);
    if (p.compute_grad) row_gradients(rows, nblocks, p.row0 + r, p, factor);
  }
}

// Compiled once per instruction set (AVX-512, AVX2, baseline) and picked at load time on x86-64.
FASTCACHE_SIMD_CLONES void epilogue_rows_float(Block<float>* blocks, int nblocks, int64_t begin, int64_t end,
                                               const ContrastiveParams& p, float* loss) {
  epilogue_rows(blocks, nblocks, begin, end, p, loss);
}

void epilogue_rows_double(Block<double>* blocks, int nblocks, int64_t begin, int64_t end, const ContrastiveParams& p,
                          double* loss) {
  epilogue_rows(blocks, nblocks, begin, end, p, loss);
}

template <typename T>
void epilogue(Block<T>* blocks, int nblocks, int64_t rows, const ContrastiveParams& p, T* loss) {
  int64_t row_width = 0;
  for (int k = 0; k < nblocks; ++k) row_width += blocks[k].n;
  // rows per task: ATen's grain for elementwise work (32K values), so that a small chunk stays on one thread
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(row_width, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    if constexpr (std::is_same_v<T, float>) {
      epilogue_rows_float(blocks, nblocks, begin, end, p, loss);
    } else {
      epilogue_rows_double(blocks, nblocks, begin, end, p, loss);
    }
  });
}

void check_block(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0), name, " must be 2-D with ", like.size(0), " rows");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have dtype ", like.scalar_type());
  TORCH_CHECK(t.stride(1) == 1, name, " must be contiguous along its last dimension");
}

}  // namespace

at::Tensor contrastive_epilogue_cpu(
    at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query, std::optional<at::Tensor> doc_to_query,
    std::optional<at::Tensor> doc_to_doc, std::optional<at::Tensor> guide_query_to_doc,
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc,
    std::optional<at::Tensor> doc_ids, const ContrastiveParams& p) {
  TORCH_CHECK(query_to_doc.scalar_type() == at::kFloat || query_to_doc.scalar_type() == at::kDouble,
              "query_to_doc must be float32 or float64");
  check_block(query_to_doc, query_to_doc, "query_to_doc");
  const int64_t rows = query_to_doc.size(0);
  TORCH_CHECK(p.num_positives > 0 && p.offset >= 0 && p.offset + p.row0 + rows <= p.num_positives,
              "rows [", p.row0, ", ", p.row0 + rows, ") with offset ", p.offset, " exceed the ", p.num_positives,
              " positives");
  TORCH_CHECK(query_to_doc.size(1) >= p.num_positives, "query_to_doc has fewer columns than positives");
  const bool guided = guide_query_to_doc.has_value();
  if (doc_ids) {
    TORCH_CHECK(doc_ids->device().is_cpu() && doc_ids->scalar_type() == at::kLong && doc_ids->dim() == 1 &&
                    doc_ids->is_contiguous() && doc_ids->size(0) == query_to_doc.size(1),
                "doc_ids must be a contiguous int64 CPU vector with one id per query_to_doc column");
  }
  const int64_t* ids = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
  at::Tensor loss = at::empty({rows}, query_to_doc.options());

  AT_DISPATCH_FLOATING_TYPES(query_to_doc.scalar_type(), "contrastive_epilogue_cpu", [&] {
    Block<scalar_t> blocks[4];
    int nblocks = 0;
    auto add = [&](at::Tensor& s, const std::optional<at::Tensor>& g, Kind kind, const char* name) {
      check_block(s, query_to_doc, name);
      Block<scalar_t>& b = blocks[nblocks++];
      b.s = s.data_ptr<scalar_t>();
      b.ld = s.stride(0);
      b.n = s.size(1);
      b.kind = kind;
      if (g.has_value()) {
        check_block(*g, s, "guide block");
        TORCH_CHECK(g->size(1) == s.size(1), "a guide block must have the shape of its similarity block");
        b.g = g->data_ptr<scalar_t>();
        b.ldg = g->stride(0);
      }
    };
    add(query_to_doc, guide_query_to_doc, kQueryToDoc, "query_to_doc");
    blocks[0].ids = ids;
    if (query_to_query) {
      TORCH_CHECK(guided == guide_query_to_query.has_value(), "guide blocks must match the enabled blocks");
      add(*query_to_query, guide_query_to_query, kQueryToQuery, "query_to_query");
    }
    if (doc_to_query) {
      TORCH_CHECK(!guided, "doc_to_query has no guided form");
      add(*doc_to_query, std::nullopt, kDocToQuery, "doc_to_query");
    }
    if (doc_to_doc) {
      TORCH_CHECK(guided == guide_doc_to_doc.has_value(), "guide blocks must match the enabled blocks");
      add(*doc_to_doc, guide_doc_to_doc, kDocToDoc, "doc_to_doc");
      blocks[nblocks - 1].ids = ids;  // its columns are the first doc_to_doc.size(1) candidates
    }
    epilogue(blocks, nblocks, rows, p, loss.data_ptr<scalar_t>());
  });
  return loss;
}

namespace {

// x in the compute dtype, contiguous, L2-normalised per row when cosine; the divisors (undefined for dot).
std::pair<at::Tensor, at::Tensor> operand(const at::Tensor& x, at::ScalarType dtype, bool cosine, double eps) {
  if (!cosine) return {x.to(dtype).contiguous(), at::Tensor()};
  auto [y, divisor] = l2_normalize_cpu(x, dtype, eps);
  return {y, divisor};
}

std::optional<at::Tensor> operand_backward(at::Tensor& grad, const at::Tensor& x, const at::Tensor& divisor,
                                           double eps) {
  return divisor.defined() ? l2_normalize_backward_cpu_(grad, x, divisor, eps) : grad;
}

// Whether n values are all finite: Σ v·0 stays 0 unless a NaN or ±Inf is among them (then it is NaN); branch-free,
// so it vectorises (v·0 is not folded away without -ffast-math).
template <typename T>
FASTCACHE_INLINE bool finite_values(const T* v, int64_t n) {
  T lane[16] = {};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) lane[l] += v[i + l] * T(0);
  T total = 0;
  for (int l = 0; l < 16; ++l) total += lane[l];
  for (; i < n; ++i) total += v[i] * T(0);
  return total == T(0);
}

FASTCACHE_SIMD_CLONES bool finite_values_float(const float* v, int64_t n) { return finite_values(v, n); }
bool finite_range(const float* v, int64_t n) { return finite_values_float(v, n); }
bool finite_range(const double* v, int64_t n) { return finite_values(v, n); }

// Whether every value of a contiguous float32/float64 tensor is finite (the op's NaN / Inf check of its inputs).
bool all_finite(const at::Tensor& x) {
  return AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "all_finite", [&] {
    const scalar_t* v = x.data_ptr<scalar_t>();
    return at::parallel_reduce(
        0, x.numel(), at::internal::GRAIN_SIZE, true,
        [&](int64_t begin, int64_t end, bool finite) { return finite && finite_range(v + begin, end - begin); },
        [](bool a, bool b) { return a && b; });
  });
}

// The gradient filter's tiles (ContrastiveParams.filter_threshold): kFilterTileRows rows of a chunk by
// kFilterTileColumns columns of a block.
constexpr int64_t kFilterTileRows = 64, kFilterTileColumns = 256;

// Whether a tile of dL/ds (rows × columns from g, rows ld apart) holds an entry with |g| >= threshold.
template <typename T>
bool tile_kept(const T* g, int64_t ld, int64_t rows, int64_t columns, double threshold) {
  const T limit = static_cast<T>(threshold);
  for (int64_t r = 0; r < rows; ++r) {
    bool kept = false;
    const T* v = g + r * ld;
    for (int64_t j = 0; j < columns; ++j) kept |= std::abs(v[j]) >= limit;  // an OR reduction: vectorises
    if (kept) return true;
  }
  return false;
}

// Calls run(first, last) for each run [first, last) of consecutive kept entries among count flags stride apart.
template <typename Run>
void for_each_run(const uint8_t* kept, int64_t count, int64_t stride, const Run& run) {
  for (int64_t first = 0; first < count;) {
    if (!kept[first * stride]) {
      ++first;
      continue;
    }
    int64_t last = first;
    while (last < count && kept[last * stride]) ++last;
    run(first, last);
    first = last;
  }
}

// The gradient products of one block of dL/ds g [c, n] (rows x [c, D], columns y [n, D]) over the tiles that keep
// an entry with |g| >= threshold (all tiles kept: one product each way): dx, per row strip, one product per run of
// kept tiles along it, dx[strip] += g[strip, run]·y[run]; dy, per column tile, one per run of kept tiles down it,
// dy[tile] += g[run, tile]ᵀ·x[run]. Strips (tiles) run in parallel, each writing rows no other touches, so each
// small product runs on one thread. The skipped tiles contribute nothing. Adds the skipped and all tiles to counts.
void filtered_products(const at::Tensor& g, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dx,
                       const at::Tensor& dy, double threshold, std::pair<int64_t, int64_t>& counts) {
  const int64_t c = g.size(0), n = g.size(1);
  const int64_t strips = (c + kFilterTileRows - 1) / kFilterTileRows;
  const int64_t tiles = (n + kFilterTileColumns - 1) / kFilterTileColumns;
  std::vector<uint8_t> kept(strips * tiles);  // [strip][tile]
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "filtered_products", [&] {
    const scalar_t* base = g.data_ptr<scalar_t>();
    const int64_t ld = g.stride(0);
    at::parallel_for(0, strips * tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r0 = (t / tiles) * kFilterTileRows, c0 = (t % tiles) * kFilterTileColumns;
        kept[t] = tile_kept(base + r0 * ld + c0, ld, std::min(kFilterTileRows, c - r0),
                            std::min(kFilterTileColumns, n - c0), threshold);
      }
    });
  });
  const int64_t kept_tiles = std::count(kept.begin(), kept.end(), uint8_t{1});
  counts.first += strips * tiles - kept_tiles;
  counts.second += strips * tiles;
  if (kept_tiles == strips * tiles) {  // nothing to skip: whole GEMMs
    dx.addmm_(g, y);
    dy.addmm_(g.t(), x);
    return;
  }
  const auto rows_of = [c](int64_t first, int64_t last) {  // strips [first, last) -> (row0, rows)
    return std::make_pair(first * kFilterTileRows, std::min(last * kFilterTileRows, c) - first * kFilterTileRows);
  };
  const auto columns_of = [n](int64_t first, int64_t last) {
    return std::make_pair(first * kFilterTileColumns,
                          std::min(last * kFilterTileColumns, n) - first * kFilterTileColumns);
  };
  at::parallel_for(0, strips, 1, [&](int64_t begin, int64_t end) {
    for (int64_t strip = begin; strip < end; ++strip) {
      const int64_t r0 = rows_of(strip, strip + 1).first, rows = rows_of(strip, strip + 1).second;
      for_each_run(&kept[strip * tiles], tiles, 1, [&](int64_t first, int64_t last) {
        const auto [c0, width] = columns_of(first, last);
        dx.narrow(0, r0, rows).addmm_(g.narrow(0, r0, rows).narrow(1, c0, width), y.narrow(0, c0, width));
      });
    }
  });
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t tile = begin; tile < end; ++tile) {
      const int64_t c0 = columns_of(tile, tile + 1).first, width = columns_of(tile, tile + 1).second;
      for_each_run(&kept[tile], strips, tiles, [&](int64_t first, int64_t last) {
        const auto [r0, rows] = rows_of(first, last);
        dy.narrow(0, c0, width).addmm_(g.narrow(0, r0, rows).narrow(1, c0, width).t(), x.narrow(0, r0, rows));
      });
    }
  });
}

// Σ of a contiguous float32/float64 vector (the per-row losses of a chunk), in fp64, without an ATen reduction.
double sum_in_double(const at::Tensor& values) {
  double total = 0.0;
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "sum_in_double", [&] {
    const scalar_t* v = values.data_ptr<scalar_t>();
    for (int64_t i = 0; i < values.numel(); ++i) total += v[i];
  });
  return total;
}

}  // namespace

std::tuple<at::Tensor, std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>,
           std::pair<int64_t, int64_t>>
contrastive_slab_cpu(const at::Tensor& queries, const at::Tensor& docs, const std::optional<at::Tensor>& all_queries,
                     const std::optional<at::Tensor>& guide_queries, const std::optional<at::Tensor>& guide_docs,
                     const std::optional<at::Tensor>& doc_ids, bool query_to_query, bool doc_to_query,
                     bool doc_to_doc, bool cosine, double eps, const ContrastiveParams& params, int64_t chunk) {
  TORCH_CHECK(queries.dim() == 2 && docs.dim() == 2 && docs.size(1) == queries.size(1),
              "queries and docs must be 2-D with the same number of dims");
  TORCH_CHECK(chunk >= 1, "chunk must be positive, got ", chunk);
  // no autograd here (the op hands its gradients over itself): the ATen calls skip its dispatch layers
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const at::ScalarType dtype = queries.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const bool gathered = all_queries.has_value(), guided = guide_queries.has_value();
  TORCH_CHECK(guided == guide_docs.has_value(), "guide_queries and guide_docs must be given together");
  auto [q, q_div] = operand(queries, dtype, cosine, eps);
  auto [d, d_div] = operand(docs, dtype, cosine, eps);
  auto [Q, Q_div] = gathered ? operand(*all_queries, dtype, cosine, eps) : std::make_pair(q, q_div);
  // the inputs' NaN / Inf check (the Python op leaves it to this call): a non-finite input value makes its row of the
  // operand non-finite (normalised: NaN or Inf over a finite or infinite norm)
  TORCH_CHECK_VALUE(all_finite(q), "queries contains NaN or Inf");
  TORCH_CHECK_VALUE(all_finite(d), "docs contains NaN or Inf");
  TORCH_CHECK_VALUE(!gathered || all_finite(Q), "all_queries contains NaN or Inf");
  const int64_t B = q.size(0), P = params.num_positives, offset = params.offset;
  const bool need_grad = params.compute_grad;
  TORCH_CHECK(params.batch_size == B, "params.batch_size ", params.batch_size, " is not the ", B, " queries");
  const auto chunk_params = [&params](int64_t r0) {  // the epilogue of the chunk of rows r0..
    ContrastiveParams p = params;
    p.row0 = r0;
    return p;
  };
  TORCH_CHECK(offset >= 0 && offset + B <= P && P <= d.size(0), "offset ", offset, " with ", B, " rows exceeds the ",
              P, " positives of ", d.size(0), " candidates");
  const at::Tensor dd_cols = guided ? d.narrow(0, 0, P) : d;  // doc_to_doc: every document, or (GIST) positives
  const auto block = [&](int64_t width) { return at::empty({std::min(chunk, B), width}, q.options()); };
  at::Tensor qd = block(d.size(0)), qq, dq, dd, gqd, gqq, gdd;
  if (query_to_query) qq = block(Q.size(0));
  if (doc_to_query) dq = block(Q.size(0));
  if (doc_to_doc) dd = block(dd_cols.size(0));
  if (guided) {
    TORCH_CHECK(!gathered && !doc_to_query, "a guide excludes all_queries and doc_to_query");
    gqd = at::empty_like(qd);
    if (query_to_query) gqq = at::empty_like(qq);
    if (doc_to_doc) gdd = at::empty_like(dd);
  }
  // Gradient accumulators: the first product into each is written (mm), the later ones added (addmm), so no zero
  // fill. The rows of grad_q come first from their own chunk, unless grad_Q is grad_q (not gathered) and a
  // query-column direction adds to the rows of later chunks: then grad_q starts at zero. With the gradient filter
  // (filter_threshold > 0) a product may be skipped, so every accumulator starts at zero.
  at::Tensor grad_q, grad_d, grad_Q;
  const bool filtered = params.filter_threshold > 0;
  const bool q_zeroed = filtered || (!gathered && (query_to_query || doc_to_query));
  bool d_fresh = !filtered, Q_fresh = gathered && !filtered;
  std::pair<int64_t, int64_t> filter_tiles{0, 0};  // (skipped, all) tiles of the gradient filter
  if (need_grad) {
    grad_q = q_zeroed ? at::zeros_like(q) : at::empty_like(q);
    grad_d = filtered ? at::zeros_like(d) : at::empty_like(d);
    grad_Q = gathered ? (filtered ? at::zeros_like(Q) : at::empty_like(Q)) : grad_q;
  }
  const auto product_into = [](at::Tensor out, const at::Tensor& a, const at::Tensor& b, bool& fresh) {
    if (fresh) {
      at::mm_out(out, a, b);
      fresh = false;
    } else {
      out.addmm_(a, b);
    }
  };
  // dx += g·y and dy += gᵀ·x for a block of dL/ds g with rows x and columns y (filtered: over its kept tiles)
  const auto products = [&](const at::Tensor& g, const at::Tensor& x, const at::Tensor& y, const at::Tensor& dx,
                            const at::Tensor& dy, bool& x_fresh, bool& y_fresh) {
    if (filtered) return filtered_products(g, x, y, dx, dy, params.filter_threshold, filter_tiles);
    product_into(dx, g, y, x_fresh);
    product_into(dy, g.t(), x, y_fresh);
  };
  const auto rows_of = [](const at::Tensor& t, int64_t r0, int64_t c) { return t.narrow(0, r0, c); };
  const auto opt = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
  double loss = 0.0;
  for (int64_t r0 = 0; r0 < B; r0 += chunk) {
    const int64_t c = std::min(chunk, B - r0);
    const at::Tensor qc = rows_of(q, r0, c), pc = rows_of(d, offset + r0, c);
    at::Tensor s_qd = rows_of(qd, 0, c), s_qq, s_dq, s_dd, g_qd, g_qq, g_dd;
    at::mm_out(s_qd, qc, d.t());
    if (query_to_query) at::mm_out(s_qq = rows_of(qq, 0, c), qc, Q.t());
    if (doc_to_query) at::mm_out(s_dq = rows_of(dq, 0, c), pc, Q.t());
    if (doc_to_doc) at::mm_out(s_dd = rows_of(dd, 0, c), pc, dd_cols.t());
    if (guided) {
      const at::Tensor gqc = rows_of(*guide_queries, r0, c);
      at::mm_out(g_qd = rows_of(gqd, 0, c), gqc, guide_docs->t());
      if (query_to_query) at::mm_out(g_qq = rows_of(gqq, 0, c), gqc, guide_queries->t());
      if (doc_to_doc) {
        at::mm_out(g_dd = rows_of(gdd, 0, c), rows_of(*guide_docs, offset + r0, c), guide_docs->narrow(0, 0, P).t());
      }
    }
    loss += sum_in_double(contrastive_epilogue_cpu(s_qd, opt(s_qq), opt(s_dq), opt(s_dd), opt(g_qd), opt(g_qq),
                                                   opt(g_dd), doc_ids, chunk_params(r0)));
    if (!need_grad) continue;
    // the blocks now hold dL/ds: the similarity GEMMs' gradients
    bool q_rows_fresh = !q_zeroed, added = false;  // added: an accumulator that already holds a product
    products(s_qd, qc, d, rows_of(grad_q, r0, c), grad_d, q_rows_fresh, d_fresh);
    if (query_to_query) products(s_qq, qc, Q, rows_of(grad_q, r0, c), grad_Q, added, Q_fresh);
    if (doc_to_query) products(s_dq, pc, Q, rows_of(grad_d, offset + r0, c), grad_Q, added, Q_fresh);
    if (doc_to_doc) {
      bool added_too = false;
      products(s_dd, pc, dd_cols, rows_of(grad_d, offset + r0, c), grad_d.narrow(0, 0, dd_cols.size(0)), added,
               added_too);
    }
  }
  at::Tensor total = at::scalar_tensor(loss / static_cast<double>(B), q.options());
  if (!need_grad) return {total, std::nullopt, std::nullopt, std::nullopt, filter_tiles};
  if (Q_fresh) grad_Q.zero_();  // gathered, but no direction has query columns
  return {total, operand_backward(grad_q, q, q_div, eps), operand_backward(grad_d, d, d_div, eps),
          gathered ? operand_backward(grad_Q, Q, Q_div, eps) : std::nullopt, filter_tiles};
}

}  // namespace fastcache
