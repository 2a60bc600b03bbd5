// One row of the contrastive epilogue (CPU): logits, log-partitions, loss and dL/ds of one similarity row per
// enabled direction. Internal to the CPU kernels: contrastive.cpp runs it on the rows of its blocks,
// matryoshka.cpp on each dimension's similarity row. The maths is in contrastive.cpp's header comment.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "../contrastive_params.h"

namespace fastcache {
namespace row {

#define FASTCACHE_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCACHE_SIMD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTCACHE_SIMD_CLONES
#endif

// One direction's row: similarities x[0..n) (rewritten in place), the guide's row or nullptr, candidate ids of
// the columns (duplicate masking) or nullptr.
template <typename T>
struct RowBlock {
  T* x = nullptr;
  const T* g = nullptr;
  const int64_t* ids = nullptr;
  int64_t n = 0;
  Kind kind = kQueryToDoc;
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

// Maximum of x[0..n) in one vector register of lanes (GCC vector extensions: vmaxps/vmaxpd on AVX-512, two or
// four registers on narrower instruction sets). SCALED: x is multiplied by scale in place on the way, one pass.
template <bool SCALED, typename T>
FASTCACHE_INLINE T max_lanes(T* x, int64_t n, T scale = T(1)) {
  typedef T Lanes __attribute__((vector_size(64)));
  constexpr int L = 64 / sizeof(T);
  const T ninf = -std::numeric_limits<T>::infinity();
  Lanes acc;
  for (int l = 0; l < L; ++l) acc[l] = ninf;
  int64_t j = 0;
  for (; j + L <= n; j += L) {
    Lanes v;
    __builtin_memcpy(&v, x + j, sizeof(Lanes));
    if constexpr (SCALED) {
      v *= scale;
      __builtin_memcpy(x + j, &v, sizeof(Lanes));
    }
    acc = v > acc ? v : acc;
  }
  T m = ninf;
  for (int l = 0; l < L; ++l) m = acc[l] > m ? acc[l] : m;
  for (; j < n; ++j) {
    if constexpr (SCALED) x[j] *= scale;
    m = x[j] > m ? x[j] : m;
  }
  return m;
}

// Rewrites one row from similarities into logits (scaled, penalised, masked) and returns its maximum.
template <typename T>
FASTCACHE_INLINE T row_logits(const RowBlock<T>& b, int64_t pos, int64_t own_query, T threshold,
                              const ContrastiveParams& p, std::vector<T>& own) {
  T* x = b.x;
  const T* g = b.g;
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
  } else if (!g && !b.ids && (b.kind == kQueryToDoc || b.kind == kDocToQuery)) {
    return max_lanes<true>(x, n, scale);  // nothing to mask: scale and maximum in one pass
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
  return max_lanes<false>(x, n);
}

// Replaces one row of logits with max m by exp(x - m) and returns log(sum_j exp(x_j)) (-inf if all masked).
template <typename T>
FASTCACHE_INLINE double row_logsumexp(const RowBlock<T>& b, T m) {
  T* x = b.x;
  if (m == -std::numeric_limits<T>::infinity()) {  // every column masked: exp(-inf) = 0, no NaN from 0 * inf later
    std::fill(x, x + b.n, T(0));
    return -std::numeric_limits<double>::infinity();
  }
  T lane[16] = {};  // exp and its sum in one pass, 16 independent lanes (vectorised without reassociation)
  int64_t j = 0;
  for (; j + 16 <= b.n; j += 16)
    for (int l = 0; l < 16; ++l) lane[l] += (x[j + l] = exp_le0(x[j + l] - m));
  double sum = 0.0;
  for (int l = 0; l < 16; ++l) sum += lane[l];
  for (; j < b.n; ++j) sum += (x[j] = exp_le0(x[j] - m));
  return static_cast<double>(m) + std::log(sum);
}

// What the positive's logit adds to dL/ds (joint and per_direction alike): -scale/B, returned as p.pos_coef = scale/B
// (which row_gradients subtracts; negative for a negative scale).
template <typename T>
FASTCACHE_INLINE T positive_gradient(const ContrastiveParams& p) {
  return static_cast<T>(p.pos_coef);
}

// The loss of global row i (rows[0] is its query_to_doc row): turns every direction's similarities into logits,
// then into exp(logit - row max of its block), and returns the loss. With p.compute_grad, factor[k] is what
// block k's row must be multiplied by to hold dL/ds, up to the positive's -scale/B (see row_gradients).
template <typename T>
FASTCACHE_INLINE T row_loss(const RowBlock<T>* rows, int nblocks, int64_t i, const ContrastiveParams& p,
                            std::vector<T>& own, T* factor) {
  const int64_t pos = p.offset + i;
  const int64_t own_query = p.own_query_offset + i;
  T threshold = T(0);
  if (rows[0].g) {
    const T guide_pos = rows[0].g[pos];
    threshold = p.margin_strategy == kAbsoluteMargin ? guide_pos - static_cast<T>(p.margin)
                                       : guide_pos - std::abs(guide_pos) * static_cast<T>(p.margin);
  }
  double lse[4], block_max[4];
  double pos_logit = 0.0;
  double joint_max = -std::numeric_limits<double>::infinity();
  for (int k = 0; k < nblocks; ++k) {
    const T m = row_logits(rows[k], pos, own_query, threshold, p, own);
    block_max[k] = m;
    if (k == 0) pos_logit = rows[0].x[pos];
    lse[k] = row_logsumexp(rows[k], m);
    joint_max = lse[k] > joint_max ? lse[k] : joint_max;
  }
  double joint_lse = 0.0, mean_lse = 0.0;
  for (int k = 0; k < nblocks; ++k) {
    joint_lse += std::exp(lse[k] - joint_max);
    mean_lse += lse[k];
  }
  joint_lse = joint_max + std::log(joint_lse);
  mean_lse /= nblocks;
  if (p.compute_grad) {  // the rows hold exp(logit - block max): dL/ds = p.coef · exp(max - log partition) · row
    for (int k = 0; k < nblocks; ++k) {  // p.coef = scale/B/(joint ? 1 : nblocks)
      const double log_partition = p.joint ? joint_lse : lse[k];
      factor[k] = static_cast<T>(block_max[k] == -std::numeric_limits<double>::infinity()
                                     ? 0.0 : p.coef * std::exp(block_max[k] - log_partition));
    }
  }
  return static_cast<T>((p.joint ? joint_lse : mean_lse) - pos_logit);
}

// dL/ds of global row i in place, from row_loss's rows and factors: row · factor, minus scale/B at the positive.
template <typename T>
FASTCACHE_INLINE void row_gradients(const RowBlock<T>* rows, int nblocks, int64_t i, const ContrastiveParams& p,
                                    const T* factor) {
  for (int k = 0; k < nblocks; ++k) {
    T* x = rows[k].x;
    for (int64_t j = 0; j < rows[k].n; ++j) x[j] *= factor[k];
  }
  rows[0].x[p.offset + i] -= positive_gradient<T>(p);
}

}  // namespace row
}  // namespace fastcache
