"""The in-batch contrastive loss (InfoNCE / MultipleNegativesRankingLoss / GISTEmbedLoss) from embeddings, fused.

Notation: B local queries q_i, candidates d_j (N = C·P of them, column-major: the P positives, then each
hard-negative column), query columns Q_k (Mq of them: ``all_queries``, else the queries themselves), the positive
of row i is candidate ``offset + i`` and p_i = d_{offset+i}. With s(a, b) the cosine (or dot) similarity:

    query_to_doc    s(q_i, d_j)   j < N    (the positive is here)
    query_to_query  s(q_i, Q_k)   k < Mq,  k = own query masked
    doc_to_query    s(Q_k, p_i)   k < Mq
    doc_to_doc      s(p_i, d_j)   j < N,   j ≡ offset+i (mod P) masked

    logit = scale·s  (+ hardness_strength·stopgrad(s) on the penalised query_to_doc columns)
    joint:          loss = mean_i [ logsumexp_{all blocks} logit_i - logit_i,pos ]
    per_direction:  loss = mean_i [ mean_b logsumexp_b logit_i - logit_i,pos ]

With a ``guide`` (GISTEmbedLoss), column j of a block is masked when the guide's similarity exceeds the guide's
positive similarity g_i,pos minus the margin (``absolute``: g - margin, ``relative``: g - |g|·margin), the
positive never; query_to_query is then the anchor-anchor block (q_i against the B local queries) and doc_to_doc
the positive-positive block (p_i against the P positives), both masked by the guide only.

With ``doc_ids`` (an integer per candidate, e.g. a hash of its token ids), a candidate with the id of row i's
positive is a duplicate of it: masked in query_to_doc (never the positive itself) and in doc_to_doc.

Gradient filter (``filter_eps``, off by default: exact). With G = dL/ds = (|scale|/B)·(dloss_i/dlogit_ij) per
entry (dloss_i/dlogit = softmax minus one-hot, over the number of blocks per_direction: at most 1 in magnitude),
a backward tile (a block of rows × columns of one direction) whose largest |G| is below
threshold = filter_eps·|scale|/B adds nothing to the gradients: its two products (G·columns, Gᵀ·rows) are
skipped. ``"auto"`` is Cut Cross-Entropy's value for the inputs' dtype, finfo(dtype).eps/32 (bf16: 2^-12;
apple/ml-cross-entropy, cut_cross_entropy/utils.py, _handle_eps; its backward compares softmax minus one-hot, the
same units). The loss is unchanged. Bound: each skipped entry moves dL/dx_i by G_ij·y_j and dL/dy_j by G_ij·x_i,
with |G_ij| < threshold, so for every embedding row v (normalised when cosine)

    |dL/dv (filtered) - dL/dv| ≤ Σ_{skipped entries e of v} |G_e|·|partner_e|
                              < filter_eps·|scale|/B · n_v · max |partner|

n_v the number of v's skipped entries (its columns in its rows' skipped tiles, its rows in its columns');
partners have norm 1 for cosine, where the normalisation's backward then divides by max(|x|, 1e-12) (it is a
projection over |x|). Tiles: the slab (cpu and torch) 64 chunk rows × 256 columns (the C++ and torch loops run
the GEMMs over the kept tiles only); the Triton tiled kernels their backward tiles (a program's own rows or
columns × the swept tile). :func:`fastcache.ops.contrastive.filtering.count_filtered_tiles` counts the skipped and
all tiles (the benchmarks report the hit rate). Not in the Matryoshka op (its backward products take each
segment's sum over the dims) nor the fused_slab strategy.

Four strategies (``strategy=`` / ``FASTCACHE_STRATEGY``):

- slab (fastcache/ops/contrastive/slab.py): rows in chunks; per chunk, GEMMs into chunk×columns blocks, one fused
  epilogue (C++, CUDA, Triton or PyTorch: fastcache/ops/contrastive/epilogue.py) that turns the blocks into dL/ds
  in place (and gives the per-row losses), then GEMMs that accumulate dL/dq, dL/dd, dL/dQ. Memory
  O(chunk·(N + Mq)) on top of O((B + N + Mq)·D), the chunk chosen from a memory budget. On the cpu backend the
  whole loop is one C++ call (``_slab_cpu``).
- tiled (fastcache/ops/contrastive/tiled.py, launching the Triton kernels of fastcache/triton/contrastive.py): no
  block is ever held beyond one tile; a forward pass keeps per-row statistics, the backward recomputes the tiles.
  Memory O((B + N + Mq)·D).
- fused_slab (slab v2: fastcache/ops/contrastive/fused_slab.py, kernels in fastcache/triton/contrastive_fused_slab.py;
  backend triton, not yet run on a GPU, never chosen by ``auto``): the slab's row chunks, but the GEMMs are Triton
  kernels whose epilogue applies every option tile by tile, reduces each tile's rows to (max, sum-exp) partials and
  stores e = exp(logit - tile max) once in the embeddings' dtype; the backward GEMMs make dL/ds on load from e and
  the row partition, so no fp32 block and no dL/ds is ever written: ~6 bytes per logit beyond the GEMM operands at
  16 bits (12 at fp32), the slab's 6·B·N·D FLOPs. Memory O(chunk·(N + Mq)) values of the embeddings' dtype.
- sparse (fastcache/ops/contrastive/sparse.py, C++ csrc/cpu/sparse.cpp; CPU, backend cpu): the slab with products
  over the non-zero entries only (SPLADE's vocabulary-sized embeddings, a few hundred non-zeros in ~30k), chosen
  by ``auto`` on CPU when the inputs are sparse enough. Work O(nnz) instead of O(B·N·D); gradients dense.

The package, each module importing only the ones listed before it (and fastcache.triton, _backend, _autograd_guard):

    options     ContrastiveOptions, ContrastiveLayout, ContrastiveLossAndGrad, check_inputs, argument parsing;
                the kernels' codes (Kind, Hardness, MarginStrategy of fastcache/kernel_codes.py) and
                kernel_params, the one encoding of the options (with every derived coefficient) that the C++,
                CUDA, torch and Triton epilogues read
    filtering   the gradient filter's tile counts (count_filtered_tiles)
    normalize   row normalisation and its backward; the guide and id operands
    epilogue    the slab epilogue of every backend (contract in its docstring), backend availability
    sparse      the sparse strategy's operands (SparseRows) and products, auto's density rule
    slab        the slab strategy: chunk sizes, GEMMs (their precision: low_precision_gemms, operand_grad_scale),
                or another products implementation (sparse's)
    tiled       the tiled strategy's host code: operands, launches of fastcache/triton/contrastive.py's kernels
    fused_slab  the fused_slab strategy's host code (tiled's operands; fastcache/triton/contrastive_fused_slab.py)
    autograd    PrecomputedGradLoss (shared with the Matryoshka op) and one_pass
    op          contrastive_loss, contrastive_loss_and_grad: checks, strategy and backend choice
"""

from fastcache.ops.contrastive.op import contrastive_loss, contrastive_loss_and_grad
from fastcache.ops.contrastive.options import (
    ContrastiveLayout,
    ContrastiveLossAndGrad,
    ContrastiveOptions,
    check_inputs,
)

__all__ = ["ContrastiveLayout", "ContrastiveLossAndGrad", "ContrastiveOptions", "check_inputs", "contrastive_loss",
           "contrastive_loss_and_grad"]
