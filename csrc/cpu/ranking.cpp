// Fused learning-to-rank losses on CPU: forward and backward in one pass per query, parallel over queries,
// memory O(n) per query (no [n, n] pair tensor).
//
// Inputs are padded logits s [Q, n], labels y [Q, n] and a validity mask [Q, n]; padding is never read into
// the maths (it may hold NaN). The maths of each loss is in fastcache/ops/ranking.py; here:
//
// LambdaLoss (sentence-transformers' formulation). Per query, the valid documents sorted by logit (descending,
// ties by position): s_p, y_p at rank p. G_p = (2^max(y_p,0) - 1) / max(maxDCG@k, eps), 1/D_p = 1/log2(p + 2),
// computed in float64 relative to the row's largest label t = max(y, 0) (numerator and denominator times 2^-t):
// 2^(y-t)·(1 - 2^-y) / max(sum_r 2^(y_(r)-t)·(1 - 2^-y_(r)) / D_r, eps·2^-t), so no label overflows 2^y.
// A weighting's terms are computed only when it uses them (0·inf is NaN).
// A pair (p, q), both ranks < k and both labels finite, counts when y_p > y_q (NDCGLoss1: every pair, p = q too):
//     loss_pq = -c · max(w_pq · max(log sigmoid(sigma · clamp(s_p - s_q, ±1e8)), log eps), log eps)
// (eps = 0: no clamp; log eps is then the lowest finite value, so that a zero weight keeps the term 0, and a
// maxDCG of 0 gives gains 0)
// c = 1 (natural) or 1/ln 2 (binary). Each unordered pair p < q is visited once and both of its directions
// share one exp and one log1p: log sigmoid(-x) = log sigmoid(x) - x. Returned: the per-query sum of the pair
// losses, the number of pairs and d(sum)/ds (the op divides by the batch's pair count).
//
// PListMLE: per query, the valid documents in input order or sorted by label (descending, ties by position):
//     loss = -sum_r w_r (s_r - Lhat_r),  Lhat_r = log(sum_{t >= r} exp(s_t) + eps)  (a running log-sum-exp)
//     dloss/ds_t = -w_t + exp(s_t - Lhat_t) · A_t,  A_t = sum_{r <= t} w_r exp(Lhat_t - Lhat_r)
// with A_t = A_{t-1} · exp(Lhat_t - Lhat_{t-1}) + w_t: every exponent <= 0, nothing overflows.
//
// ListNet: per query, p = softmax(y), loss = logsumexp(s) - sum_j p_j s_j, dloss/ds = softmax(s) - p.
#include "ranking.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace fastcache {
namespace {

#define FASTCACHE_RANKING_INLINE inline __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTCACHE_RANKING_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FASTCACHE_RANKING_CLONES
#endif

enum Weighting { kNone = 0, kNDCGLoss1 = 1, kNDCGLoss2 = 2, kLambdaRank = 3, kNDCGLoss2PP = 4 };
constexpr double kLn2 = 0.693147180559945309417232121458;

// The pair loop works on explicit vectors (GCC vector extensions): the compiler does not vectorise its selects
// on its own. 8 floats or 4 doubles a step; each clone (AVX-512 / AVX2 / baseline) lowers them to its registers.
typedef float Float8 __attribute__((vector_size(32)));
typedef int32_t Int8 __attribute__((vector_size(32)));
typedef double Double4 __attribute__((vector_size(32)));

template <typename V>
struct Lanes;
template <>
struct Lanes<Float8> {
  using Scalar = float;
  static constexpr int count = 8;
};
template <>
struct Lanes<Double4> {
  using Scalar = double;
  static constexpr int count = 4;
};
constexpr int64_t kMaxLanes = 8;  // scratch arrays are padded by this many zeros for the last vector

template <typename V>
FASTCACHE_RANKING_INLINE V load(const typename Lanes<V>::Scalar* x) {
  V v;
  __builtin_memcpy(&v, x, sizeof(V));
  return v;
}
template <typename V>
FASTCACHE_RANKING_INLINE void store(typename Lanes<V>::Scalar* x, V v) { __builtin_memcpy(x, &v, sizeof(V)); }
template <typename V>
FASTCACHE_RANKING_INLINE V splat(typename Lanes<V>::Scalar x) { return V{} + x; }
template <typename V>
FASTCACHE_RANKING_INLINE V vmin(V a, V b) { return a < b ? a : b; }
template <typename V>
FASTCACHE_RANKING_INLINE V vmax(V a, V b) { return a > b ? a : b; }
template <typename V>
FASTCACHE_RANKING_INLINE V vabs(V a) { return a < V{} ? -a : a; }

// e^x for x <= 0: x = k·ln2 + r with |r| <= ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 3e-8
// there), 2^k from the exponent bits (k by the round-to-nearest trick: + 1.5·2^23); 0 below -87.
FASTCACHE_RANKING_INLINE Float8 exp_nonpositive(Float8 x) {
  const Float8 floor_x = splat<Float8>(-87.0f);
  const Float8 xc = vmax(x, floor_x);
  const Float8 shifted = xc * 1.4426950408889634f + 12582912.0f;
  const Float8 k = shifted - 12582912.0f;
  const Float8 r = (xc - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
  const Float8 p = 1.0f + r * (1.0f + r * (0.5f + r * (1.6666667e-1f + r * (4.1666668e-2f +
                   r * (8.3333338e-3f + r * 1.3888889e-3f)))));
  const Int8 bits = (((Int8)shifted - 0x4B400000) + 127) << 23;
  return x > floor_x ? p * (Float8)bits : Float8{};
}
FASTCACHE_RANKING_INLINE Double4 exp_nonpositive(Double4 x) {
  for (int l = 0; l < 4; ++l) x[l] = std::exp(x[l]);
  return x;
}

// log(1 + e) for e in [0, 1]: 2·atanh(z) with z = e / (2 + e) <= 1/3, odd series to z^13 (relative error < 2e-8).
FASTCACHE_RANKING_INLINE Float8 log1p_unit(Float8 e) {
  const Float8 z = e / (2.0f + e), z2 = z * z;
  const Float8 series = 1.0f + z2 * (1.0f / 3 + z2 * (1.0f / 5 + z2 * (1.0f / 7 + z2 * (1.0f / 9 +
                        z2 * (1.0f / 11 + z2 * (1.0f / 13))))));
  return 2.0f * z * series;
}
FASTCACHE_RANKING_INLINE Double4 log1p_unit(Double4 e) {
  for (int l = 0; l < 4; ++l) e[l] = std::log1p(e[l]);
  return e;
}

template <typename T>
struct LambdaParams {
  int weighting;
  T mu, sigma, log_eps, c;  // c: 1 (natural log) or 1 / ln 2 (binary)
  int64_t k;                // <= 0: every document
  double eps;
  bool compute_grad;
};

// The pairs (p, q) of one query for q in (p, kk): adds the pair losses and the number of valid directions to
// *loss and *count, their d/ds_p to grad[p] and d/ds_q to grad[q]. Arrays are indexed by rank and zero-padded
// past kk by kMaxLanes: a padded lane has a zero "finite" flag, so it adds nothing anywhere.
template <typename V>
FASTCACHE_RANKING_INLINE void pair_row(const typename Lanes<V>::Scalar* s, const typename Lanes<V>::Scalar* y,
                                       const typename Lanes<V>::Scalar* gain, const typename Lanes<V>::Scalar* inv_d,
                                       const typename Lanes<V>::Scalar* finite, const typename Lanes<V>::Scalar* delta,
                                       int64_t p, int64_t kk, const LambdaParams<typename Lanes<V>::Scalar>& prm,
                                       typename Lanes<V>::Scalar* grad, double* loss, double* count) {
  using T = typename Lanes<V>::Scalar;
  const int weighting = prm.weighting;
  const bool ndcg1 = weighting == kNDCGLoss1;
  const V mu = splat<V>(prm.mu);
  const V zero{}, one = splat<V>(1), limit = splat<V>(T(1e8)), log_eps = splat<V>(prm.log_eps);
  const V sp = splat<V>(s[p]), yp = splat<V>(y[p]), gp = splat<V>(gain[p]), dp = splat<V>(inv_d[p]);
  const V fp = splat<V>(finite[p]), wa_ndcg1 = gp * dp;
  const T sigma = prm.sigma, c = prm.c;
  V grad_p = zero, loss_sum = zero, count_sum = zero;
  for (int64_t q = p + 1; q < kk; q += Lanes<V>::count) {
    const V sq = load<V>(s + q), yq = load<V>(y + q), gq = load<V>(gain + q), dq = load<V>(inv_d + q);
    const V raw = sp - sq;
    const V in_range = vabs(raw) <= limit ? one : zero;
    const V x = sigma * vmin(vmax(raw, -limit), limit);
    const V e = exp_nonpositive(-vabs(x));
    const V l1p = log1p_unit(e);
    const V inv = one / (one + e);
    const V ls_pos = vmin(x, zero) - l1p;   // log sigmoid(x): p above q
    const V ls_neg = vmin(-x, zero) - l1p;  // log sigmoid(-x): q above p
    const V sig_pos = x >= zero ? inv : e * inv;
    const V sig_neg = x >= zero ? e * inv : inv;
    V wa, wb;  // the weights of (p, q) and (q, p): only the weighting's own terms are computed
    if (ndcg1) {
      wa = wa_ndcg1;
      wb = gq * dq;
    } else if (weighting == kNone) {
      wa = wb = one;
    } else {
      const V gain_diff = vabs(gp - gq);
      if (weighting == kNDCGLoss2)
        wa = load<V>(delta + (q - p)) * gain_diff;
      else if (weighting == kLambdaRank)
        wa = vabs(dp - dq) * gain_diff;
      else  // NDCGLoss2++
        wa = mu * load<V>(delta + (q - p)) * gain_diff + vabs(dp - dq) * gain_diff;
      wb = wa;
    }
    const V both = fp * load<V>(finite + q);
    const V valid_a = ndcg1 ? both : (yp > yq ? both : zero);
    const V valid_b = ndcg1 ? both : (yq > yp ? both : zero);
    const V ta = wa * vmax(ls_pos, log_eps), tb = wb * vmax(ls_neg, log_eps);
    const V ga = (ls_pos > log_eps) & (ta > log_eps) ? wa * sig_neg : zero;
    const V gb = (ls_neg > log_eps) & (tb > log_eps) ? wb * sig_pos : zero;
    const V g = -c * sigma * in_range * (valid_a * ga - valid_b * gb);
    grad_p += g;
    if (prm.compute_grad) store(grad + q, load<V>(grad + q) - g);
    loss_sum += -c * (valid_a * vmax(ta, log_eps) + valid_b * vmax(tb, log_eps));
    count_sum += valid_a + valid_b;
  }
  for (int l = 0; l < Lanes<V>::count; ++l) {
    grad[p] += grad_p[l];
    *loss += loss_sum[l];
    *count += count_sum[l];
  }
}

FASTCACHE_RANKING_CLONES void pair_row_any(const float* s, const float* y, const float* gain, const float* inv_d,
                                           const float* finite, const float* delta, int64_t p, int64_t kk,
                                           const LambdaParams<float>& prm, float* grad, double* loss,
                                           double* count) {
  pair_row<Float8>(s, y, gain, inv_d, finite, delta, p, kk, prm, grad, loss, count);
}
void pair_row_any(const double* s, const double* y, const double* gain, const double* inv_d, const double* finite,
                  const double* delta, int64_t p, int64_t kk, const LambdaParams<double>& prm, double* grad,
                  double* loss, double* count) {
  pair_row<Double4>(s, y, gain, inv_d, finite, delta, p, kk, prm, grad, loss, count);
}

// The valid positions of one row: in input order, or stably sorted descending by key (padding excluded).
template <typename T>
void valid_positions(const bool* mask, int64_t n, const T* key, std::vector<int64_t>& idx) {
  idx.clear();
  for (int64_t j = 0; j < n; ++j)
    if (mask[j]) idx.push_back(j);
  if (key) std::stable_sort(idx.begin(), idx.end(), [key](int64_t a, int64_t b) { return key[a] > key[b]; });
}

template <typename T>
struct LambdaScratch {
  std::vector<int64_t> idx;
  std::vector<T> s, y, gain, inv_d, finite, delta, grad;
  std::vector<double> ideal;
};

template <typename T>
void lambda_query(const T* logits, const T* labels, const bool* mask, int64_t n, const LambdaParams<T>& prm,
                  T* grad, double* loss_sum, double* pair_count, LambdaScratch<T>& w) {
  valid_positions(mask, n, logits, w.idx);
  const int64_t m = static_cast<int64_t>(w.idx.size());
  const int64_t kk = prm.k > 0 ? std::min(prm.k, m) : m;
  *loss_sum = 0.0;
  *pair_count = 0.0;
  if (m == 0) return;
  for (auto* v : {&w.s, &w.y, &w.gain, &w.inv_d, &w.finite, &w.grad}) v->assign(m + kMaxLanes, T(0));
  w.delta.assign(m + 1 + kMaxLanes, T(0));
  w.ideal.resize(m);
  for (int64_t p = 0; p < m; ++p) {
    const int64_t j = w.idx[p];
    w.s[p] = logits[j];
    w.y[p] = labels[j];
    w.finite[p] = p < kk && std::isfinite(labels[j]) ? T(1) : T(0);  // past k: in no pair (whole vectors)
    w.inv_d[p] = static_cast<T>(1.0 / std::log2(p + 2.0));
    w.ideal[p] = std::max(static_cast<double>(labels[j]), 0.0);  // -inf (irrelevant) counts as 0
  }
  for (int64_t r = 1; r <= m; ++r) w.delta[r] = static_cast<T>(std::abs(1.0 / std::log2(r + 1.0) - 1.0 / std::log2(r + 2.0)));
  if (prm.weighting != kNone) {  // RankNet uses no gain
    std::partial_sort(w.ideal.begin(), w.ideal.begin() + kk, w.ideal.end(), std::greater<double>());
    const double top = w.ideal[0];  // the largest max(y, 0): gains are scaled by 2^-top, so 2^y never overflows
    const auto scaled_gain = [top](double label) {  // (2^label - 1) · 2^-top for label >= 0, exact near 0
      return label > 0.0 ? std::exp2(label - top) * -std::expm1(-label * kLn2) : 0.0;
    };
    double max_dcg = 0.0;
    for (int64_t r = 0; r < kk; ++r) max_dcg += scaled_gain(w.ideal[r]) / std::log2(r + 2.0);
    max_dcg = std::max(max_dcg, prm.eps * std::exp2(-top));
    for (int64_t p = 0; p < m; ++p)  // maxDCG 0 (eps = 0, no positive label): every gain is 0, not 0/0
      w.gain[p] = max_dcg > 0.0 ? static_cast<T>(scaled_gain(std::max(static_cast<double>(w.y[p]), 0.0)) / max_dcg)
                                : T(0);
  }
  double total = 0.0, count = 0.0;
  for (int64_t p = 0; p + 1 < kk; ++p)
    pair_row_any(w.s.data(), w.y.data(), w.gain.data(), w.inv_d.data(), w.finite.data(), w.delta.data(), p, kk,
                 prm, w.grad.data(), &total, &count);
  if (prm.weighting == kNDCGLoss1) {  // the pairs (p, p): sigmoid(0) = 1/2, no gradient
    for (int64_t p = 0; p < kk; ++p) {
      if (w.finite[p] == T(0)) continue;
      const double weight = static_cast<double>(w.gain[p]) * static_cast<double>(w.inv_d[p]);
      const double log_eps = static_cast<double>(prm.log_eps);
      total -= static_cast<double>(prm.c) * std::max(weight * std::max(std::log(0.5), log_eps), log_eps);
      count += 1.0;
    }
  }
  *loss_sum = total;
  *pair_count = count;
  if (prm.compute_grad)
    for (int64_t p = 0; p < m; ++p) grad[w.idx[p]] = w.grad[p];
}

void check_inputs(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& mask) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous(), "logits must be a contiguous [Q, n] tensor");
  TORCH_CHECK(labels.sizes() == logits.sizes() && labels.is_contiguous() && labels.scalar_type() == logits.scalar_type(),
              "labels must be contiguous, of the logits' shape and dtype");
  TORCH_CHECK(mask.sizes() == logits.sizes() && mask.is_contiguous() && mask.scalar_type() == at::kBool,
              "mask must be a contiguous bool tensor of the logits' shape");
  TORCH_CHECK(logits.device().is_cpu() && labels.device().is_cpu() && mask.device().is_cpu(),
              "the CPU ranking kernels take CPU tensors");
}

template <typename T>
void plistmle_query(const T* logits, const T* labels, const bool* mask, const T* weights, int64_t n,
                    bool respect_input_order, double log_eps, bool compute_grad, T* grad, T* loss,
                    std::vector<int64_t>& idx, std::vector<double>& lhat) {
  valid_positions(mask, n, respect_input_order ? static_cast<const T*>(nullptr) : labels, idx);
  const int64_t m = static_cast<int64_t>(idx.size());
  lhat.resize(m);
  double running = -std::numeric_limits<double>::infinity();  // log sum_{t >= r} exp(s_t)
  for (int64_t r = m - 1; r >= 0; --r) {
    const double s = logits[idx[r]];
    const double hi = std::max(running, s), lo = std::min(running, s);
    running = hi + std::log1p(std::exp(lo - hi));
    const double hi_eps = std::max(running, log_eps), lo_eps = std::min(running, log_eps);
    lhat[r] = hi_eps + std::log1p(std::exp(lo_eps - hi_eps));
  }
  double total = 0.0, acc = 0.0;
  for (int64_t r = 0; r < m; ++r) {
    const double s = logits[idx[r]];
    const double w = weights ? static_cast<double>(weights[r]) : 1.0;
    total -= w * (s - lhat[r]);
    if (compute_grad) {
      acc = (r == 0 ? 0.0 : acc * std::exp(lhat[r] - lhat[r - 1])) + w;
      grad[idx[r]] = static_cast<T>(-w + std::exp(s - lhat[r]) * acc);
    }
  }
  *loss = static_cast<T>(total);
}

template <typename T>
void listnet_query(const T* logits, const T* labels, const bool* mask, int64_t n, bool compute_grad, T* grad,
                   T* loss) {
  double s_max = -std::numeric_limits<double>::infinity(), y_max = s_max;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    s_max = std::max(s_max, static_cast<double>(logits[j]));
    y_max = std::max(y_max, static_cast<double>(labels[j]));
  }
  *loss = T(0);
  if (y_max == -std::numeric_limits<double>::infinity()) return;  // no valid document (or no finite label)
  double s_sum = 0.0, y_sum = 0.0, dot = 0.0;
  for (int64_t j = 0; j < n; ++j) {
    if (!mask[j]) continue;
    s_sum += std::exp(logits[j] - s_max);
    const double p = std::exp(labels[j] - y_max);
    y_sum += p;
    dot += p * logits[j];
  }
  const double lse = s_max + std::log(s_sum);
  *loss = static_cast<T>(lse - dot / y_sum);
  if (!compute_grad) return;
  for (int64_t j = 0; j < n; ++j)
    if (mask[j]) grad[j] = static_cast<T>(std::exp(logits[j] - lse) - std::exp(labels[j] - y_max) / y_sum);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> lambda_loss_cpu(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, int64_t weighting, double mu, int64_t k, double sigma,
    double eps, bool binary_log, bool compute_grad) {
  check_inputs(logits, labels, mask);
  TORCH_CHECK(weighting >= kNone && weighting <= kNDCGLoss2PP, "weighting code must be 0..4");
  TORCH_CHECK(eps >= 0, "eps must be non-negative");
  const int64_t Q = logits.size(0), n = logits.size(1);
  auto opts = logits.options().dtype(at::kDouble);
  at::Tensor loss_sum = at::zeros({Q}, opts), pair_count = at::zeros({Q}, opts);
  at::Tensor grad = at::zeros_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "lambda_loss_cpu", [&] {
    LambdaParams<scalar_t> prm{static_cast<int>(weighting), static_cast<scalar_t>(mu), static_cast<scalar_t>(sigma),
                               eps > 0 ? static_cast<scalar_t>(std::log(eps)) : std::numeric_limits<scalar_t>::lowest(),
                               static_cast<scalar_t>(binary_log ? 1.0 / std::log(2.0) : 1.0), k, eps, compute_grad};
    const scalar_t* s = logits.data_ptr<scalar_t>();
    const scalar_t* y = labels.data_ptr<scalar_t>();
    const bool* valid = mask.data_ptr<bool>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    double* ls = loss_sum.data_ptr<double>();
    double* pc = pair_count.data_ptr<double>();
    at::parallel_for(0, Q, 1, [&](int64_t begin, int64_t end) {
      LambdaScratch<scalar_t> scratch;
      for (int64_t q = begin; q < end; ++q)
        lambda_query(s + q * n, y + q * n, valid + q * n, n, prm, g + q * n, ls + q, pc + q, scratch);
    });
  });
  return {loss_sum, pair_count, grad};
}

std::tuple<at::Tensor, at::Tensor> plistmle_cpu(
    at::Tensor logits, at::Tensor labels, at::Tensor mask, std::optional<at::Tensor> position_weights,
    bool respect_input_order, double eps, bool compute_grad) {
  check_inputs(logits, labels, mask);
  TORCH_CHECK(eps > 0, "eps must be positive");
  if (position_weights) {
    TORCH_CHECK(position_weights->sizes() == logits.sizes() && position_weights->is_contiguous() &&
                    position_weights->scalar_type() == logits.scalar_type(),
                "position_weights must be contiguous, of the logits' shape and dtype");
  }
  const int64_t Q = logits.size(0), n = logits.size(1);
  at::Tensor loss = at::zeros({Q}, logits.options());
  at::Tensor grad = at::zeros_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "plistmle_cpu", [&] {
    const scalar_t* s = logits.data_ptr<scalar_t>();
    const scalar_t* y = labels.data_ptr<scalar_t>();
    const bool* valid = mask.data_ptr<bool>();
    const scalar_t* w = position_weights ? position_weights->data_ptr<scalar_t>() : nullptr;
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* l = loss.data_ptr<scalar_t>();
    at::parallel_for(0, Q, 1, [&](int64_t begin, int64_t end) {
      std::vector<int64_t> idx;
      std::vector<double> lhat;
      for (int64_t q = begin; q < end; ++q)
        plistmle_query(s + q * n, y + q * n, valid + q * n, w ? w + q * n : nullptr, n, respect_input_order,
                       std::log(eps), compute_grad, g + q * n, l + q, idx, lhat);
    });
  });
  return {loss, grad};
}

std::tuple<at::Tensor, at::Tensor> listnet_cpu(at::Tensor logits, at::Tensor labels, at::Tensor mask,
                                               bool compute_grad) {
  check_inputs(logits, labels, mask);
  const int64_t Q = logits.size(0), n = logits.size(1);
  at::Tensor loss = at::zeros({Q}, logits.options());
  at::Tensor grad = at::zeros_like(logits);
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "listnet_cpu", [&] {
    const scalar_t* s = logits.data_ptr<scalar_t>();
    const scalar_t* y = labels.data_ptr<scalar_t>();
    const bool* valid = mask.data_ptr<bool>();
    scalar_t* g = grad.data_ptr<scalar_t>();
    scalar_t* l = loss.data_ptr<scalar_t>();
    at::parallel_for(0, Q, 1, [&](int64_t begin, int64_t end) {
      for (int64_t q = begin; q < end; ++q)
        listnet_query(s + q * n, y + q * n, valid + q * n, n, compute_grad, g + q * n, l + q);
    });
  });
  return {loss, grad};
}

}  // namespace fastcache
