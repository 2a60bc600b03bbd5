"""The contrastive loss at several embedding dimensions at once (Matryoshka), in one sweep over D.

For dims d_1 > d_2 > ... > d_K (each at most D) and weights w_k:

    loss = Σ_k w_k · L(every embedding truncated to its first d_k dims)

with L the contrastive loss of :mod:`fastcache.ops.contrastive` (same options, same settings). With
similarity="cos" every truncated embedding is L2-normalised on its own prefix, as sentence-transformers'
MatryoshkaLoss does (``shrink``); the guide embeddings (GIST) are never truncated.

Algorithm, per row chunk and enabled direction (rows X against columns Y, e.g. queries against docs): D is cut
into segments S_k = [d_{k+1}, d_k) (d_{K+1} = 0). The raw prefix products R_k = X[:, :d_k]·Y[:, :d_k]ᵀ are
accumulated from the smallest dim up, one GEMM per segment (together the flops of one full-D GEMM), and
s_k = a_k ⊙ R_k ⊙ b_kᵀ with the prefix-norm reciprocals a_k(i) = 1/max(‖X_i[:d_k]‖, eps), b_k(j) likewise for Y
(a = b = 1 for "dot"). The chosen backend's epilogue turns s_k into g_k = w_k·∂L_k/∂s_k. Backward: segment j lies
in every dim k ≤ j, so its GEMMs take the sum of those dims' gradients, A_j = Σ_{k≤j} a_k ⊙ g_k ⊙ b_kᵀ (a running
sum from the largest dim): dX[:, S_j] += A_j·Y[:, S_j] and dY[:, S_j] += A_jᵀ·X[:, S_j]; the normalisation adds,
with t_k(i) = Σ_j g_k s_k (and the column sums for Y), dX_i[:d_k] -= t_k(i)·X_i[:d_k] / ‖X_i[:d_k]‖².
Exact: the loss and gradients of summing :func:`fastcache.contrastive_loss` over the dims, up to rounding.

Backend "cpu" runs it fused, one C++ call per chunk (csrc/cpu/matryoshka.cpp ``matryoshka_chunk_cpu``): per
direction K segment GEMMs into K blocks P_k, an epilogue that walks each row once (prefix sums, every dim's
epilogue, radial sums) and leaves A_k in place of P_k, then the backward GEMMs; K blocks per direction, chunks of at
most FUSED_BLOCK_BYTES of them per thread (blocks that stay in cache: the GEMMs write them, the epilogue reads and
rewrites them, the backward reads them twice). The other slab backends run their contrastive epilogue dim by dim on
the running prefix: K + 2 blocks per direction (the running R, each dim's gradient block, one product temporary)
plus the epilogue's workspace.
The tiled strategy (Triton, ``strategy="tiled"``): fastcache/triton/matryoshka.py's kernels, launched by
fastcache/ops/matryoshka/tiled.py, the same maths on tiles.

The package, each module importing only the ones listed before it (and the contrastive op's modules below its
``op``, fastcache.triton):

    slab    prefix norms and their backward, segment_grad_scale, the slab strategy and its chunk size
    tiled   the tiled strategy's host code: operands, prefix norms, launches of the kernels
    op      matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad: checks, strategy and backend choice
"""

from fastcache.ops.matryoshka.op import (
    check_dims,
    matryoshka_contrastive_loss,
    matryoshka_contrastive_loss_and_grad,
)

__all__ = ["check_dims", "matryoshka_contrastive_loss", "matryoshka_contrastive_loss_and_grad"]
