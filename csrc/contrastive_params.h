// The contrastive epilogue's options as every compiled kernel takes them: the codes of the directions, hardness
// modes and margin strategies, and one plain parameter struct (flash-attention's Flash_fwd_params).
// Torch-free and CUDA-free: included by the CPU kernels (csrc/cpu), the CUDA kernel and launcher (csrc/cuda) and
// the bindings. The struct is filled in one place in Python, fastcache/ops/contrastive/options.py's
// kernel_params (which also computes the derived coefficients), and unpacked in one place in C++,
// csrc/params_binding.h. The codes' Python twin is fastcache/kernel_codes.py (Triton reads it too).
#pragma once
#include <cstdint>

namespace fastcache {

// A similarity block's direction (its rows -> its columns).
enum Kind : int { kQueryToDoc = 0, kQueryToQuery = 1, kDocToQuery = 2, kDocToDoc = 3 };
// Which query_to_doc negatives the hardness penalty (hardness_strength·s, detached) applies to; kNoHardness also
// when the strength is 0.
enum Hardness : int { kNoHardness = 0, kInBatchNegatives = 1, kHardNegatives = 2, kAllNegatives = 3 };
// The guide's threshold: its positive similarity minus the margin (absolute) or minus |positive|·margin (relative).
enum MarginStrategy : int { kAbsoluteMargin = 0, kRelativeMargin = 1 };

// The options of one epilogue call over rows row0 .. row0 + c - 1 of a batch of batch_size rows. The field order
// is that of Python's KernelParams.
struct ContrastiveParams {
  int64_t row0, batch_size, num_positives, offset, own_query_offset;
  double scale, hardness_strength, margin;
  int64_t hardness_mode, margin_strategy;  // Hardness, MarginStrategy
  bool joint, compute_grad;                // one log-partition over every block (else each block's, averaged);
                                           // whether dL/ds replaces the similarities
  // derived (kernel_params): dL/ds = coef·exp(logit - log_partition) - pos_coef at the positive;
  // coef = scale/B/(joint ? 1 : number of blocks), pos_coef = scale/B
  double coef, pos_coef;
  // the gradient filter (ContrastiveOptions.filter_eps): the slab skips the gradient products of a tile whose
  // largest |dL/ds| is below filter_threshold = filter_eps·|scale|/B; 0: exact (every product)
  double filter_threshold;
};

}  // namespace fastcache
