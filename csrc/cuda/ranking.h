// Learning-to-rank losses on CUDA: the torch-free launcher API (the maths is that of csrc/cpu/ranking.cpp).
//
// Plain data only (raw device pointers, sizes, a stream), so this header compiles without CUDA or torch headers.
// Every [Q, n] array is row-major with row stride n. The torch binding (not part of this file) prepares the
// sorted views with torch.sort, zero-fills the outputs, and reduces the per-query sums as the CPU op does.
#pragma once
#include <cstdint>

struct CUstream_st;  // cudaStream_t is CUstream_st*

namespace fastcache {
namespace cuda {

// The longest list lambda_loss takes: its kernel keeps 4 rows of n values per query in shared memory.
constexpr int64_t kMaxLambdaList = 4096;

enum RankingWeighting { kWeightNone = 0, kWeightNDCGLoss1 = 1, kWeightNDCGLoss2 = 2, kWeightLambdaRank = 3,
                        kWeightNDCGLoss2PP = 4 };

struct LambdaLossParams {
  int weighting;       // a RankingWeighting
  double mu, sigma, eps;  // eps = 0: no clamp
  int64_t k;           // <= 0: every document
  bool binary_log, compute_grad;
};

// LambdaLoss, one thread block per query (several where there are few queries). Row q holds its lengths[q] real
// documents sorted by logit (descending, ties by position): sorted_logits, sorted_labels (-inf = irrelevant) and
// their original columns `order`; gains [Q, n] by rank holds G_r = (2^max(y_r,0) - 1) / max(maxDCG@k, eps) (finite,
// 0 past lengths[q]; the binding computes it in float64 without overflow). Adds loss_sum[q] (sum of the pair losses),
// pair_count[q] and, when compute_grad, d(loss_sum)/dlogits into grad (original columns) to the outputs, which the
// caller zero-fills. 1 <= n <= kMaxLambdaList.
// Returns nullptr on success, else CUDA's description of the error.
const char* lambda_loss_f32(const float* sorted_logits, const float* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const float* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, float* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream);
const char* lambda_loss_f64(const double* sorted_logits, const double* sorted_labels, const int64_t* order,
                            const int64_t* lengths, const double* gains, int64_t Q, int64_t n,
                            const LambdaLossParams& params, double* grad, double* loss_sum, double* pair_count,
                            int device, CUstream_st* stream);

// Position-aware ListMLE, one thread block per query. order[q, r] is the column of rank r (input order or by label),
// r < lengths[q]; weights [Q, n] by rank or nullptr (all 1); lhat: [Q, n] float64 scratch. Writes loss[q] and
// d(loss_q)/dlogits into grad (zero-filled by the caller).
const char* plistmle_f32(const float* logits, const int64_t* order, const int64_t* lengths, const float* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, float* loss, float* grad, double* lhat,
                         int device, CUstream_st* stream);
const char* plistmle_f64(const double* logits, const int64_t* order, const int64_t* lengths, const double* weights,
                         int64_t Q, int64_t n, double eps, bool compute_grad, double* loss, double* grad,
                         double* lhat, int device, CUstream_st* stream);

// ListNet, one thread block per query: loss[q] = logsumexp(s) - sum_j softmax(y)_j s_j over the real documents (mask
// [Q, n], 1 = real), grad = softmax(s) - softmax(y) there.
const char* listnet_f32(const float* logits, const float* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, float* loss, float* grad, int device, CUstream_st* stream);
const char* listnet_f64(const double* logits, const double* labels, const bool* mask, int64_t Q, int64_t n,
                        bool compute_grad, double* loss, double* grad, int device, CUstream_st* stream);

}  // namespace cuda
}  // namespace fastcache
