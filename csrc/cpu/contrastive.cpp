// Fused softmax-gradient epilogue of the contrastive loss on CPU.
//
// Input: raw similarity blocks s of rows i = row0 .. row0+c-1 (one row per local query), for the enabled
// directions: query_to_doc [c, N], query_to_query [c, Mq], doc_to_query [c, Mq], doc_to_doc [c, N or P].
// Per row, in one pass over the blocks:
//   logit = scale * s (+ hardness_strength * s on the penalised query_to_doc columns), masked columns -inf
//   joint:         loss_i = logsumexp(all logits) - logit_pos
//   per_direction: loss_i = mean_b logsumexp(block b) - logit_pos
// and then, in place, s <- dL/ds = scale * coef_b * softmax_b(logits) (- scale / B at the positive), where
// coef_b = 1/B (joint) or 1/(B * n_blocks) (per_direction) and L = mean over the B local rows. The hardness
// penalty is detached, so d logit / d s = scale everywhere.
#include "contrastive.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

namespace fastcache {
namespace {

enum Kind { kQueryToDoc = 0, kQueryToQuery = 1, kDocToQuery = 2, kDocToDoc = 3 };
enum Hardness { kNoHardness = 0, kInBatchNegatives = 1, kHardNegatives = 2, kAllNegatives = 3 };

template <typename T>
struct Block {
  T* s = nullptr;         // row 0 of the block; row r at s + r * ld
  const T* g = nullptr;   // guide similarities (same shape) or nullptr
  int64_t ld = 0, ldg = 0, n = 0;
  Kind kind = kQueryToDoc;
};

struct Params {
  int64_t row0, batch_size, num_positives, offset, own_query_offset;
  double scale, hardness_strength, margin;
  int64_t hardness_mode, margin_strategy;
  bool joint, compute_grad;
};

// Whether the hardness penalty applies to query_to_doc column j of a row whose positive is column pos.
inline bool penalised(int64_t j, int64_t pos, int64_t P, int64_t mode) {
  const bool own = (j % P) == pos;  // the row's own positive or one of its own hard negatives
  switch (mode) {
    case kInBatchNegatives: return !own;
    case kHardNegatives: return own && j >= P;
    case kAllNegatives: return j != pos;
    default: return false;
  }
}

// Rewrites one block row into logits (scaled, penalised, masked) and returns its maximum.
template <typename T>
T block_logits(const Block<T>& b, int64_t r, int64_t pos, int64_t own_query, T threshold, const Params& p) {
  T* x = b.s + r * b.ld;
  const T* g = b.g ? b.g + r * b.ldg : nullptr;
  const T scale = static_cast<T>(p.scale), alpha = static_cast<T>(p.hardness_strength);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t P = p.num_positives;
  for (int64_t j = 0; j < b.n; ++j) {
    const T s = x[j];
    T l = s * scale;
    switch (b.kind) {
      case kQueryToDoc:
        if (p.hardness_mode != kNoHardness && penalised(j, pos, P, p.hardness_mode)) l += alpha * s;
        if (g && j != pos && g[j] > threshold) l = ninf;
        break;
      case kQueryToQuery:
        if (g ? g[j] > threshold : j == own_query) l = ninf;
        break;
      case kDocToDoc:
        if (g ? g[j] > threshold : (j % P) == pos) l = ninf;
        break;
      case kDocToQuery:
        break;
    }
    x[j] = l;
  }
  T m = ninf;
  for (int64_t j = 0; j < b.n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// log(sum_j exp(x_j)) of one block row of logits with maximum m (-inf when every column is masked).
template <typename T>
double block_logsumexp(const Block<T>& b, int64_t r, T m) {
  if (m == -std::numeric_limits<T>::infinity()) return -std::numeric_limits<double>::infinity();
  const T* x = b.s + r * b.ld;
  double sum = 0.0;
  for (int64_t j = 0; j < b.n; ++j) sum += std::exp(x[j] - m);
  return static_cast<double>(m) + std::log(sum);
}

template <typename T>
void epilogue(Block<T>* blocks, int nblocks, int64_t rows, const Params& p, T* loss) {
  const double inv_b = 1.0 / static_cast<double>(p.batch_size);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    double lse[4];
    for (int64_t r = begin; r < end; ++r) {
      const int64_t i = p.row0 + r;
      const int64_t pos = p.offset + i;
      const int64_t own_query = p.own_query_offset + i;
      T threshold = T(0);
      if (blocks[0].g) {
        const T guide_pos = blocks[0].g[r * blocks[0].ldg + pos];
        threshold = p.margin_strategy == 0 ? guide_pos - static_cast<T>(p.margin)
                                           : guide_pos - std::abs(guide_pos) * static_cast<T>(p.margin);
      }
      double joint_max = -std::numeric_limits<double>::infinity();
      for (int k = 0; k < nblocks; ++k) {
        const T m = block_logits(blocks[k], r, pos, own_query, threshold, p);
        lse[k] = block_logsumexp(blocks[k], r, m);
        joint_max = lse[k] > joint_max ? lse[k] : joint_max;
      }
      const double pos_logit = blocks[0].s[r * blocks[0].ld + pos];
      double joint_lse = 0.0, mean_lse = 0.0;
      for (int k = 0; k < nblocks; ++k) {
        joint_lse += std::exp(lse[k] - joint_max);
        mean_lse += lse[k];
      }
      joint_lse = joint_max + std::log(joint_lse);
      mean_lse /= nblocks;
      loss[r] = static_cast<T>((p.joint ? joint_lse : mean_lse) - pos_logit);
      if (!p.compute_grad) continue;
      for (int k = 0; k < nblocks; ++k) {
        const Block<T>& b = blocks[k];
        const T base = static_cast<T>(p.joint ? joint_lse : lse[k]);
        const T coef = static_cast<T>(p.scale * inv_b / (p.joint ? 1 : nblocks));
        T* x = b.s + r * b.ld;
        for (int64_t j = 0; j < b.n; ++j) x[j] = coef * std::exp(x[j] - base);
      }
      blocks[0].s[r * blocks[0].ld + pos] -= static_cast<T>(p.scale * inv_b);
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
    std::optional<at::Tensor> guide_query_to_query, std::optional<at::Tensor> guide_doc_to_doc, int64_t row0,
    int64_t batch_size, int64_t num_positives, int64_t offset, int64_t own_query_offset, double scale,
    int64_t hardness_mode, double hardness_strength, bool joint, int64_t margin_strategy, double margin,
    bool compute_grad) {
  TORCH_CHECK(query_to_doc.scalar_type() == at::kFloat || query_to_doc.scalar_type() == at::kDouble,
              "query_to_doc must be float32 or float64");
  check_block(query_to_doc, query_to_doc, "query_to_doc");
  const int64_t rows = query_to_doc.size(0);
  TORCH_CHECK(num_positives > 0 && offset >= 0 && offset + row0 + rows <= num_positives,
              "rows [", row0, ", ", row0 + rows, ") with offset ", offset, " exceed the ", num_positives,
              " positives");
  TORCH_CHECK(query_to_doc.size(1) >= num_positives, "query_to_doc has fewer columns than positives");
  const bool guided = guide_query_to_doc.has_value();
  Params p{row0, batch_size, num_positives, offset, own_query_offset, scale, hardness_strength, margin,
           hardness_mode, margin_strategy, joint, compute_grad};
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
    }
    epilogue(blocks, nblocks, rows, p, loss.data_ptr<scalar_t>());
  });
  return loss;
}

}  // namespace fastcache
