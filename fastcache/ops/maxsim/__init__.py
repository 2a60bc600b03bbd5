"""The ColBERT (MaxSim) in-batch contrastive loss from token embeddings, fused: sentence-transformers'
MultiVectorMultipleNegativesRankingLoss with ``colbert_scores`` (multi_vector_encoder/scoring/colbert.py,
util/similarity.py ``maxsim``) and cross-entropy.

Notation: B queries q_b with Lq tokens q_bt (valid where query_mask), documents d_c, c = j·N + n (group j < G,
n < N; query-major, as upstream's score columns) with Ld tokens d_cu (valid where doc_mask), n_b the valid token
count of query b (upstream's _query_token_counts: the mask's sum, or without a mask the non-zero token rows;
at least 1). In the compute dtype (float32; float64 for float64 inputs):

    m_btc  = max_{u valid} q_bt·d_cu,   u*_btc = the first u attaining it (torch.max's tie rule)
    S_bc   = Σ_{t valid} m_btc                                   (-1e9 if document c has no valid token)
    S_bc  /= n_b                                                 (length_normalize: MeanMaxSim)
    loss   = mean_b [ logsumexp_c (scale·S_bc) - scale·S_b,(offset+b)·N ]

Backward: g_bc = dL/dS_bc = scale/B · (softmax_c(scale·S_b) - [c = (offset+b)·N]), w_btc = g_bc (/ n_b) for
valid t and non-empty c, and the max routes it to its argmax only:

    dL/dq_bt       = Σ_c w_btc · d_c,u*_btc
    dL/dd_cu       = Σ_{(b,t): u*_btc = u} w_btc · q_bt

Upstream materialises the (B, documents, Lq, Ld) products of each document group and backpropagates through them.
Here the products are needed only for the max (one GEMM's flops: token_max), the per-(query token, document) max
and argmax are kept, and the backward is a gather/scatter along the argmax (token_grad, 1/Ld of the GEMM's flops):
no 4-D intermediate. The argmax index is kept (int32 [B, Lq, G·N], 1/Ld of the products) rather than recomputed,
which would cost a second GEMM; documents are processed in chunks whose token maxima fit the memory budget, so the
memory beyond the inputs and gradients is the index, the scores [B, G·N], one chunk and the backend's workspace
(cpu: one GEMM tile of at most 32 MiB; torch: tiles of at most TORCH_TILE_BYTES).

The package, each module importing only the ones listed before it (and _backend, _autograd_guard, the contrastive
op's autograd Function, fastcache.triton.maxsim):

    options     MaxSimOptions, MaxSimLayout, check_inputs, compute_dtype, EMPTY_DOCUMENT_SCORE
    primitives  the backend contract (token_max, token_grad), its torch implementation, backend availability
    op          maxsim_contrastive_loss, maxsim_contrastive_loss_and_grad: checks, backend choice, chunks
"""

from fastcache.ops.maxsim.op import (
           MaxSimLossAndGrad,
           maxsim_contrastive_loss,
           maxsim_contrastive_loss_and_grad,
)
from fastcache.ops.maxsim.options import MaxSimOptions, check_inputs
from fastcache.ops.maxsim.primitives import token_grad_torch, token_max_torch

__all__ = ["MaxSimLossAndGrad", "MaxSimOptions", "check_inputs", "maxsim_contrastive_loss",
           "maxsim_contrastive_loss_and_grad", "token_grad_torch", "token_max_torch"]
