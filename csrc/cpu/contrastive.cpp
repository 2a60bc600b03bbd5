// Fused softmax-gradient epilogue of the contrastive loss on CPU.
//
// Input: raw similarity blocks s of rows i = row0 .. row0+c-1 (one row per local query), for the enabled
// directions: query_to_doc [c, N], query_to_query [c, Mq], doc_to_query [c, Mq], doc_to_doc [c, N or P].
// Per row, in one pass over the blocks:
//   logit = scale * s (+ hardness_strength * s on the penalised query_to_doc columns), masked columns -inf
//   (self / same-query, guide, and duplicates: candidates whose doc id equals the positive's)
//   joint:         loss_i = logsumexp(all logits) - logit_pos
//   per_direction: loss_i = mean_b logsumexp(block b) - logit_pos
// and then, in place, s <- dL/ds = scale * coef_b * softmax_b(logits) (- scale / B at the positive), where
// coef_b = 1/B (joint) or 1/(B * n_blocks) (per_direction) and L = mean over the B local rows. The hardness
// penalty is detached, so d logit / d s = scale everywhere.
#include "contrastive.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastcache {
namespace {

#define FASTCACHE_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCACHE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTCACHE_SIMD_CLONES
#endif

enum Kind { kQueryToDoc = 0, kQueryToQuery = 1, kDocToQuery = 2, kDocToDoc = 3 };
enum Hardness { kNoHardness = 0, kInBatchNegatives = 1, kHardNegatives = 2, kAllNegatives = 3 };

template <typename T>
struct Block {
  T* s = nullptr;         // row 0 of the block; row r at s + r * ld
  const T* g = nullptr;   // guide similarities (same shape) or nullptr
  const int64_t* ids = nullptr;  // candidate ids of the block's columns (duplicate masking) or nullptr
  int64_t ld = 0, ldg = 0, n = 0;
  Kind kind = kQueryToDoc;
};

struct Params {
  int64_t row0, batch_size, num_positives, offset, own_query_offset;
  double scale, hardness_strength, margin;
  int64_t hardness_mode, margin_strategy;
  bool joint, compute_grad;
};

// exp for a vectorised loop: exp(x) = 2^k · e^r, r = x - k·ln2 in [-ln2/2, ln2/2], e^r by the Cephes
// degree-5 polynomial (about 1 ulp); 0 below -87 (x <= 0 here: logits minus their maximum). The polynomial runs
// on max(x, -87), so that 2^k stays a normal float: k + 127 >= 1 (no left shift of a negative number, no
// conversion of -inf to int, both undefined behaviour).
FASTCACHE_INLINE float exp_le0(float x) {
  const float xc = x < -87.0f ? -87.0f : x;
  const float k = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest (1.5·2^23 trick)
  const float r = xc - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_k = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
  return x < -87.0f ? 0.0f : p * two_k;
}
FASTCACHE_INLINE double exp_le0(double x) { return std::exp(x); }

// Sum and maximum of x[0..n) in 8 independent lanes, so that the compiler vectorises them without reassociating.
template <typename T>
FASTCACHE_INLINE double sum_lanes(const T* x, int64_t n) {
  T lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] += x[j + l];
  double sum = 0.0;
  for (int l = 0; l < 8; ++l) sum += lane[l];
  for (; j < n; ++j) sum += x[j];
  return sum;
}

template <typename T>
FASTCACHE_INLINE T max_lanes(const T* x, int64_t n) {
  const T ninf = -std::numeric_limits<T>::infinity();
  T lane[8] = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf};
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    for (int l = 0; l < 8; ++l) lane[l] = x[j + l] > lane[l] ? x[j + l] : lane[l];
  T m = ninf;
  for (int l = 0; l < 8; ++l) m = lane[l] > m ? lane[l] : m;
  for (; j < n; ++j) m = x[j] > m ? x[j] : m;
  return m;
}

// Rewrites one block row from similarities into logits (scaled, penalised, masked) and returns its maximum.
template <typename T>
FASTCACHE_INLINE T block_logits(const Block<T>& b, int64_t r, int64_t pos, int64_t own_query, T threshold, const Params& p,
               std::vector<T>& own) {
  T* x = b.s + r * b.ld;
  const T* g = b.g ? b.g + r * b.ldg : nullptr;
  const T scale = static_cast<T>(p.scale), alpha = static_cast<T>(p.hardness_strength);
  const T ninf = -std::numeric_limits<T>::infinity();
  const int64_t n = b.n, P = p.num_positives;
  if (b.kind == kQueryToDoc && p.hardness_mode != kNoHardness) {
    // own columns pos + c·P hold the positive (c = 0) and the row's own hard negatives (c >= 1)
    own.clear();
    for (int64_t j = pos; j < n; j += P) own.push_back(x[j]);
    if (p.hardness_mode == kHardNegatives) {
      for (int64_t j = 0; j < n; ++j) x[j] *= scale;
    } else {
      for (int64_t j = 0; j < n; ++j) x[j] = x[j] * scale + alpha * x[j];
    }
    for (int64_t c = 0, j = pos; j < n; ++c, j += P) {
      const bool penalised = p.hardness_mode != kInBatchNegatives && c > 0;
      x[j] = penalised ? own[c] * scale + alpha * own[c] : own[c] * scale;
    }
  } else {
    for (int64_t j = 0; j < n; ++j) x[j] *= scale;
  }
  if (g) {
    const T keep = b.kind == kQueryToDoc ? x[pos] : T(0);  // the positive is never masked
    for (int64_t j = 0; j < n; ++j) x[j] = g[j] > threshold ? ninf : x[j];
    if (b.kind == kQueryToDoc) x[pos] = keep;
  } else if (b.kind == kQueryToQuery) {
    x[own_query] = ninf;
  } else if (b.kind == kDocToDoc) {
    for (int64_t j = pos; j < n; j += P) x[j] = ninf;
  }
  if (b.ids) {  // duplicates of the row's positive (same id) are no negatives; the positive itself stays
    const int64_t id = b.ids[pos];
    const T keep = x[pos];
    for (int64_t j = 0; j < n; ++j) x[j] = b.ids[j] == id ? ninf : x[j];
    if (b.kind == kQueryToDoc) x[pos] = keep;
  }
  const T m = max_lanes(x, n);
  return m;
}

// Replaces one block row of logits with max m by exp(x - m) and returns log(sum_j exp(x_j)) (-inf if all masked).
template <typename T>
FASTCACHE_INLINE double block_logsumexp(const Block<T>& b, int64_t r, T m) {
  T* x = b.s + r * b.ld;
  if (m == -std::numeric_limits<T>::infinity()) {  // every column masked: exp(-inf) = 0, no NaN from 0 * inf later
    std::fill(x, x + b.n, T(0));
    return -std::numeric_limits<double>::infinity();
  }
  for (int64_t j = 0; j < b.n; ++j) x[j] = exp_le0(x[j] - m);
  const double sum = sum_lanes(x, b.n);
  return static_cast<double>(m) + std::log(sum);
}

// The epilogue of rows [begin, end): logits, log-partitions, losses and, in place, dL/ds.
template <typename T>
FASTCACHE_INLINE void epilogue_rows(Block<T>* blocks, int nblocks, int64_t begin, int64_t end, const Params& p,
                                    T* loss) {
  const double inv_b = 1.0 / static_cast<double>(p.batch_size);
  double lse[4];
  double pos_logit = 0.0;
  std::vector<T> own;  // scratch: a row's own query_to_doc columns
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
    double block_max[4];
    for (int k = 0; k < nblocks; ++k) {
      const T m = block_logits(blocks[k], r, pos, own_query, threshold, p, own);
      block_max[k] = m;
      if (k == 0) pos_logit = blocks[0].s[r * blocks[0].ld + pos];
      lse[k] = block_logsumexp(blocks[k], r, m);
      joint_max = lse[k] > joint_max ? lse[k] : joint_max;
    }
    double joint_lse = 0.0, mean_lse = 0.0;
    for (int k = 0; k < nblocks; ++k) {
      joint_lse += std::exp(lse[k] - joint_max);
      mean_lse += lse[k];
    }
    joint_lse = joint_max + std::log(joint_lse);
    mean_lse /= nblocks;
    loss[r] = static_cast<T>((p.joint ? joint_lse : mean_lse) - pos_logit);
    if (!p.compute_grad) continue;
    // the rows hold exp(logit - block max): dL/ds = scale · coef · exp(block max - log partition) · row
    for (int k = 0; k < nblocks; ++k) {
      const Block<T>& b = blocks[k];
      const double coef = p.scale * inv_b / (p.joint ? 1 : nblocks);
      const double log_partition = p.joint ? joint_lse : lse[k];
      const T factor = static_cast<T>(block_max[k] == -std::numeric_limits<double>::infinity()
                                          ? 0.0 : coef * std::exp(block_max[k] - log_partition));
      T* x = b.s + r * b.ld;
      for (int64_t j = 0; j < b.n; ++j) x[j] *= factor;
    }
    blocks[0].s[r * blocks[0].ld + pos] -= static_cast<T>(p.scale * inv_b);
  }
}

// Compiled once per instruction set (AVX-512, AVX2, baseline) and picked at load time on x86-64.
FASTCACHE_SIMD_CLONES void epilogue_rows_float(Block<float>* blocks, int nblocks, int64_t begin, int64_t end,
                                               const Params& p, float* loss) {
  epilogue_rows(blocks, nblocks, begin, end, p, loss);
}

void epilogue_rows_double(Block<double>* blocks, int nblocks, int64_t begin, int64_t end, const Params& p,
                          double* loss) {
  epilogue_rows(blocks, nblocks, begin, end, p, loss);
}

template <typename T>
void epilogue(Block<T>* blocks, int nblocks, int64_t rows, const Params& p, T* loss) {
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
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
    std::optional<at::Tensor> doc_ids, int64_t row0, int64_t batch_size, int64_t num_positives, int64_t offset,
    int64_t own_query_offset, double scale,
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
  if (doc_ids) {
    TORCH_CHECK(doc_ids->device().is_cpu() && doc_ids->scalar_type() == at::kLong && doc_ids->dim() == 1 &&
                    doc_ids->is_contiguous() && doc_ids->size(0) == query_to_doc.size(1),
                "doc_ids must be a contiguous int64 CPU vector with one id per query_to_doc column");
  }
  const int64_t* ids = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
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

}  // namespace fastcache
