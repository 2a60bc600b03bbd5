"""Triton tiled kernels of the Matryoshka contrastive loss: every dim's similarity from one sweep over D.

The maths: fastcache/ops/matryoshka/__init__.py's docstring (dims d_1 > ... > d_K, weights w_k, raw prefix products
R_k = X[:, :d_k]·Y[:, :d_k]ᵀ, prefix-norm reciprocals a_k, b_k, s_k = a_k ⊙ R_k ⊙ b_kᵀ for "cos", s_k = R_k for
"dot"). The tiled strategy of fastcache/triton/contrastive.py, with several accumulators per tile (the host
code: fastcache/ops/matryoshka/tiled.py ``matryoshka_tiled``):

    forward   row-parallel, per block: each [M, N] tile sweeps D once from the first dim up, in BLOCK_K steps;
              at each dim boundary (anywhere inside a BLOCK_K block: the block straddling it is loaded masked
              to each side) the running product is R_k, whose logits update dim k's online log-sum-exp (per row:
              maximum and sum, kept as [M, K] register tensors; and the positive's logit). The partition (joint
              or per_direction) of each dim follows on O(K·B) vectors, with coef and the positive's coefficient
              scaled by w_k, so G_k = w_k·dL_k/ds_k.
    backward  a program owns a strip of rows (columns) and sweeps the other side tile by tile; per tile, the
              same sweep over D recomputes every R_k once; G_k → H_k = G_k ⊙ a_k ⊙ b_kᵀ = dL/dR_k, and, for
              "cos", the radial sums t_k = Σ G_k ⊙ s_k per own row (column). Output dim c gets
              Σ_{k: d_k > c} H_k: from the last segment [d_{K-1}, d_K) down, M_K = H_K, M_k = M_{k+1} + H_k
              (the H_k but the last wait in a per-program fp32 scratch), and segment k of the program's own
              fp32 gradient rows gets M_k times the swept tile's embeddings, BLOCK_DO dims at a time (a
              read-modify-write of rows no other program touches, in a fixed order: deterministic).
    norms     a pre-pass gives the K prefix norms of every row (torch, O((B + N + Mq)·D)); after the kernels,
              dX_i[:d_k] -= t_k(i)·a_k(i)²·X_i[:d_k] (fastcache/ops/matryoshka/slab.py's _prefix_norm_backward_).

The embeddings stay raw (not normalised) in their dtype; tl.dot accumulates in fp32 (fp64 for float64 inputs) and
the per-dim scaling happens on the fp32 tile. Every option of the single-dim tiled kernels: directions (the
doc_to_query gradient fused into query_to_doc's when the query columns are the queries), partition modes,
hardness, guides (never truncated: one guide tile per column tile serves every dim), doc_ids, offset.
Memory: the fp32 gradient accumulators, O(K·(B + N + Mq)) statistics, the backward's scratch of
(K - 1)·BLOCK_M·BLOCK_N values per program (4·(K - 1)·64·max(B, N, Mq) bytes with 16-bit GRAD_TILES) and
the norm pre-pass's temporaries of NORMALIZE_ROWS rows, i.e. O((B + N + Mq)·D).
FLOPs per direction, like the single-dim tiled kernels at D = d_1: forward 2·B·N·d_1, each backward kernel
2·B·N·d_1 (recompute) + 2·B·N·d_1 (product): 10·B·N·d_1, plus 2·B·N·BLOCK_DO per backward kernel for each dim
that ends strictly inside a BLOCK_DO chunk (none of 768/512/256/128/64 with 16-bit inputs' 32-dim chunks), and
up to K exponentials per similarity per sweep instead of one. Scratch traffic: 8·(K - 1) bytes per similarity per
backward kernel (a store and a load of each H_k but the last).
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastcache.triton.contrastive import (
    ALPHA,
    GRAD_SCALE,
    MARGIN,
    POS_COEF,
    QUERY_TO_DOC,
    SCALE,
    _doc_to_query_grad,
    _dot,
    _masked_logits,
    _online_logsumexp,
    _similarity_tile,
    _softmax_grad,
    _sweep_tile,
    _tile_rows,
    _tiled_partition_kernel,  # noqa: F401 (each dim's partition: launched from here by ops/matryoshka/tiled.py)
)


@triton.jit
def _add_product_to_own_rows(grad, grad_scale, r_ptr, c_ptr, stride_r, stride_c, rows, ok, cols, n_cols, out_ptr,
                             stride_out, lo, hi, BY_COLUMNS: tl.constexpr, BLOCK_DO: tl.constexpr, ACC: tl.constexpr,
                             WIDEN: tl.constexpr):
    """A [BLOCK_M, BLOCK_N] tile's G into the program's own output rows, dims lo..hi-1: out[rows, lo:hi] +=
    G'·C[cols, lo:hi] (row-parallel), out[cols, lo:hi] += G'ᵀ·R[rows, lo:hi] (BY_COLUMNS), with G' = grad_scale·G
    in the embeddings' dtype (a power of two that keeps 16-bit entries above fp16's smallest subnormal; the host
    divides the sums by it); BLOCK_DO-aligned chunks of the output dims (those straddling lo or hi masked), each a
    read-modify-write of fp32 rows that no other program touches."""
    if BY_COLUMNS:
        g = tl.trans((grad * grad_scale).to(r_ptr.dtype.element_ty))
        e_ptr, stride_e, e_rows, e_ok, own, own_ok = r_ptr, stride_r, rows, ok, cols, cols < n_cols
    else:
        g = (grad * grad_scale).to(c_ptr.dtype.element_ty)
        e_ptr, stride_e, e_rows, e_ok, own, own_ok = c_ptr, stride_c, cols, cols < n_cols, rows, ok
    for o in range(lo // BLOCK_DO * BLOCK_DO, hi, BLOCK_DO):
        dims = o + tl.arange(0, BLOCK_DO)
        inside = (dims >= lo) & (dims < hi)
        # roofline: tiled.product_operand_l2 (the swept tile's embeddings again)
        e = tl.load(e_ptr + e_rows[:, None].to(tl.int64) * stride_e + dims[None, :],
                    mask=e_ok[:, None] & inside[None, :], other=0.0)
        out = out_ptr + own[:, None].to(tl.int64) * stride_out + dims[None, :]
        held = own_ok[:, None] & inside[None, :]
        # roofline: tiled.grad_rmw_l2 (the own fp32 gradient rows read and written once per swept tile)
        tl.store(out, _dot(g, e, tl.load(out, mask=held, other=0.0), WIDEN, ACC), mask=held)


@triton.jit
def _segment_product(a_ptr, b_ptr, stride_a, stride_b, rows, cols, n_rows, n_cols, lo, hi, acc,
                     BLOCK_K: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """acc + a[rows, lo:hi]·b[cols, lo:hi]ᵀ, in BLOCK_K-aligned blocks (those straddling lo or hi masked)."""
    for k0 in range(lo // BLOCK_K * BLOCK_K, hi, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        inside = (k >= lo) & (k < hi)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + k[None, :],
                    mask=(rows[:, None] < n_rows) & inside[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + k[:, None],
                    mask=(cols[None, :] < n_cols) & inside[:, None], other=0.0)
        acc = _dot(a, b, acc, WIDEN, ACC)
    return acc


@triton.jit
def _next_dim(raw, k, dims_ptr, r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows, n_cols, ra_ptr, cb_ptr,
              stride_ra, stride_cb, COSINE: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
              WIDEN: tl.constexpr):
    """Extend the running prefix product raw = R_{k-1} by the segment [d_{k-1}, d_k) (dims ascending, d_{-1} = 0):
    returns R_k, s_k, d_k and the prefix-norm reciprocals a_k [M], b_k [N] (ones for "dot")."""
    lo = tl.load(dims_ptr + k - 1, mask=k > 0, other=0)
    hi = tl.load(dims_ptr + k)
    raw = _segment_product(r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows, n_cols, lo, hi, raw, BLOCK_K, ACC,
                           WIDEN)
    if COSINE:
        a = tl.load(ra_ptr + k * stride_ra + rows, mask=rows < n_rows, other=0.0)
        b = tl.load(cb_ptr + k * stride_cb + cols, mask=cols < n_cols, other=0.0)
    else:
        a = tl.full(rows.shape, 1.0, ACC)
        b = tl.full(cols.shape, 1.0, ACC)
    return raw, raw * a[:, None] * b[None, :], hi, a, b


@triton.jit
def _matryoshka_logsumexp_kernel(r_ptr, c_ptr, gr_ptr, gc_ptr, ids_ptr, gpos_ptr, params_ptr, dims_ptr, ra_ptr,
                                 cb_ptr, stride_r, stride_c, stride_gr, stride_gc, stride_ra, stride_cb, n_rows,
                                 n_cols, num_dims, guide_dim, num_positives, offset, own_query_offset, max_ptr,
                                 total_ptr, pos_logit_ptr, stride_stats,
                                 KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr,
                                 HAS_IDS: tl.constexpr, RELATIVE_MARGIN: tl.constexpr, COSINE: tl.constexpr,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                 DIMS: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """Forward, row-parallel: per row and dim k (ascending), the maximum and the sum of exp(logit - maximum) of
    one block's logits at dim k, and (query_to_doc) the positive's logit; stats of dim k at ptr + k·stride_stats."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    rows, ok, pos, own_query, pos_ids, threshold = _tile_rows(
        tl.program_id(0) * BLOCK_M, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr,
        tl.load(params_ptr + MARGIN), HAS_IDS, GUIDED, RELATIVE_MARGIN, BLOCK_M, ACC)
    slot = tl.arange(0, DIMS)[None, :]
    m = tl.full([BLOCK_M, DIMS], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M, DIMS], ACC)
    pos_logit = tl.zeros([BLOCK_M, DIMS], ACC)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if GUIDED:
            g = _similarity_tile(gr_ptr, gc_ptr, stride_gr, stride_gc, rows, cols, n_rows, n_cols, guide_dim,
                                 BLOCK_M, BLOCK_N, BLOCK_K, ACC, False)
        raw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for k in range(0, num_dims):
            raw, s, hi, a, b = _next_dim(raw, k, dims_ptr, r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows,
                                         n_cols, ra_ptr, cb_ptr, stride_ra, stride_cb, COSINE, BLOCK_K, ACC, WIDEN)
            x = _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives,
                               scale, alpha, KIND, HARDNESS, GUIDED, HAS_IDS)
            here = slot == k
            m_k, t_k = _online_logsumexp(tl.max(tl.where(here, m, float("-inf")), 1),
                                         tl.sum(tl.where(here, total, 0.0), 1), x)
            m = tl.where(here, m_k[:, None], m)
            total = tl.where(here, t_k[:, None], total)
            if KIND == QUERY_TO_DOC:
                pos_logit += tl.where(here, tl.sum(tl.where(cols[None, :] == pos[:, None], x, 0.0), 1)[:, None], 0.0)
    stats = slot * stride_stats + rows[:, None]
    inside = ok[:, None] & (slot < num_dims)
    tl.store(max_ptr + stats, m, mask=inside)
    tl.store(total_ptr + stats, total, mask=inside)
    if KIND == QUERY_TO_DOC:
        tl.store(pos_logit_ptr + stats, pos_logit, mask=inside)


@triton.jit
def _matryoshka_grad_kernel(r_ptr, c_ptr, gr_ptr, gc_ptr, ids_ptr, gpos_ptr, params_ptr, dims_ptr, ra_ptr, cb_ptr,
                            stride_r, stride_c, stride_gr, stride_gc, stride_ra, stride_cb, stride_params, n_rows,
                            n_cols, num_dims, guide_dim, num_positives, offset, own_query_offset, max_ptr,
                            factor_ptr, stride_stats, out_ptr, stride_out, radial_ptr, stride_radial, dq_max_ptr,
                            dq_factor_ptr, scratch_ptr,
                            KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                            RELATIVE_MARGIN: tl.constexpr, COSINE: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DIMS: tl.constexpr, ACC: tl.constexpr,
                            WIDEN: tl.constexpr, BY_COLUMNS: tl.constexpr, WITH_DOC_TO_QUERY: tl.constexpr,
                            BLOCK_DO: tl.constexpr):
    """Backward of one block over every dim, H_k = dL/dR_k recomputed once per tile. A program owns BLOCK_M rows
    (row-parallel) or BLOCK_N columns (BY_COLUMNS) and sweeps the other side; per tile:
    1. one sweep over D (dims ascending) gives every H_k: each but the last into the program's scratch
       (scratch_ptr + program·(K - 1)·BLOCK_M·BLOCK_N, fp32), the last kept; COSINE: the radial sums
       Σ G_k ⊙ s_k of the own rows (columns), added to radial_ptr + k·stride_radial after the last tile.
    2. segment [d_{k-1}, d_k) of the output dims gets M_k = Σ_{j ≥ k} H_j, from the last segment down
       (M_K = H_K, M_k = M_{k+1} + H_k: sums, never differences, so a huge H_k of a near-zero prefix norm
       cancels nothing): out[own, seg] += M_k·C[swept, seg] (row-parallel) or M_kᵀ·R[swept, seg] (BY_COLUMNS).
    WITH_DOC_TO_QUERY: doc_to_query's gradient added to query_to_doc's, per dim (as in contrastive.py)."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    margin = tl.load(params_ptr + MARGIN)
    slot = tl.arange(0, DIMS)[None, :]
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    scratch = scratch_ptr + tl.program_id(0).to(tl.int64) * ((num_dims - 1) * BLOCK_M * BLOCK_N) + tile
    if BY_COLUMNS:
        own0 = tl.program_id(0) * BLOCK_N
        n_swept = n_rows
        STEP: tl.constexpr = BLOCK_M
        radial = tl.zeros([BLOCK_N, DIMS], ACC)
    else:
        own0 = tl.program_id(0) * BLOCK_M
        n_swept = n_cols
        STEP: tl.constexpr = BLOCK_N
        radial = tl.zeros([BLOCK_M, DIMS], ACC)
    for start in range(0, n_swept, STEP):
        rows, ok, pos, own_query, pos_ids, threshold, cols = _sweep_tile(
            own0, start, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr, margin, HAS_IDS, GUIDED,
            RELATIVE_MARGIN, BLOCK_M, BLOCK_N, ACC, BY_COLUMNS)
        g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        if GUIDED:
            g = _similarity_tile(gr_ptr, gc_ptr, stride_gr, stride_gc, rows, cols, n_rows, n_cols, guide_dim,
                                 BLOCK_M, BLOCK_N, BLOCK_K, ACC, False)
        raw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        suffix = tl.zeros([BLOCK_M, BLOCK_N], ACC)  # H_K after the sweep, then M_k
        for k in range(0, num_dims):
            raw, s, hi, a, b = _next_dim(raw, k, dims_ptr, r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows,
                                         n_cols, ra_ptr, cb_ptr, stride_ra, stride_cb, COSINE, BLOCK_K, ACC, WIDEN)
            x = _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives,
                               scale, alpha, KIND, HARDNESS, GUIDED, HAS_IDS)
            m = tl.load(max_ptr + k * stride_stats + rows, mask=ok, other=0.0)
            factor = tl.load(factor_ptr + k * stride_stats + rows, mask=ok, other=0.0)
            grad = _softmax_grad(x, m, factor, tl.load(params_ptr + k * stride_params + POS_COEF), cols, pos, KIND)
            if WITH_DOC_TO_QUERY:
                grad += _doc_to_query_grad(s, ok, cols, offset, n_rows, scale, dq_max_ptr + k * stride_stats,
                                           dq_factor_ptr + k * stride_stats)
            if COSINE:
                if BY_COLUMNS:
                    radial += tl.where(slot == k, tl.sum(grad * s, 0)[:, None], 0.0)
                else:
                    radial += tl.where(slot == k, tl.sum(grad * s, 1)[:, None], 0.0)
                grad = grad * a[:, None] * b[None, :]
            suffix = grad
            if k + 1 < num_dims:  # the last one stays in registers
                tl.store(scratch + k * (BLOCK_M * BLOCK_N), grad)  # roofline: matryoshka_tiled.scratch_l2
        tl.debug_barrier()  # the scratch stores land before the loads below
        for j in range(0, num_dims):  # segments from the last: M_k = M_{k+1} + H_k
            k = num_dims - 1 - j
            lo = tl.load(dims_ptr + k - 1, mask=k > 0, other=0)
            hi = tl.load(dims_ptr + k)
            _add_product_to_own_rows(suffix, tl.load(params_ptr + GRAD_SCALE), r_ptr, c_ptr, stride_r, stride_c, rows,
                                     ok, cols, n_cols, out_ptr, stride_out, lo, hi, BY_COLUMNS, BLOCK_DO, ACC, WIDEN)
            if k > 0:
                suffix += tl.load(scratch + (k - 1) * (BLOCK_M * BLOCK_N))
        tl.debug_barrier()  # this tile's output stores and scratch loads before the next tile's
    if COSINE:
        if BY_COLUMNS:
            own = own0 + tl.arange(0, BLOCK_N)
            own_ok = own < n_cols
        else:
            own = own0 + tl.arange(0, BLOCK_M)
            own_ok = own < n_rows
        sums = radial_ptr + slot * stride_radial + own[:, None]
        held = own_ok[:, None] & (slot < num_dims)
        tl.store(sums, tl.load(sums, mask=held, other=0.0) + radial, mask=held)


# Backward tiles by the embeddings' element size: rows (columns) a program owns, columns (rows) it sweeps, output
# dims per product chunk, pipeline stages. sm_90 (ptxas, 8 warps): no spills, guided or not (16 bits: 16-170
# bytes at 64 output dims or 2 stages; fp32, full-precision FMA dots: 250-450 bytes at 64 owned or swept).
GRAD_TILES = {2: (64, 64, 32, 1), 4: (32, 32, 32, 1), 8: (32, 32, 32, 1)}
BACKWARD_WARPS = 8
TILE_M, TILE_N, TILE_K, TILE_WARPS, TILE_STAGES = 64, 64, 32, 8, 2  # the forward's
