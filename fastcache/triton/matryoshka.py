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
    backward  a program owns a strip of rows (columns) and sweeps the other side in passes, tile by tile (the
              passes of fastcache/triton/contrastive.py's tiled backward); per tile, the same sweep over D
              recomputes every R_k once; G_k → H_k = G_k ⊙ a_k ⊙ b_kᵀ = dL/dR_k, and, for "cos", the radial sums
              t_k = Σ G_k ⊙ s_k per own row (column). Output dim c gets Σ_{k: d_k > c} H_k: M_K = H_K, M_k =
              M_{k+1} + H_k (the H_k but the last wait in a per-program fp32 tile scratch), each M_k stored to the
              program's pass scratch in the embeddings' dtype; then per dim segment [d_{k-1}, d_k) a GEMM of M_k
              against the pass's swept embeddings, BLOCK_DO dims at a time, accumulates in registers and adds to
              the program's own fp32 gradient rows once per pass (rows no other program touches, a fixed order:
              deterministic).
    norms     a pre-pass gives the K prefix norms of every row (torch, O((B + N + Mq)·D)); after the kernels,
              dX_i[:d_k] -= t_k(i)·a_k(i)²·X_i[:d_k] (fastcache/ops/matryoshka/slab.py's _prefix_norm_backward_).

The embeddings stay raw (not normalised) in their dtype; tl.dot accumulates in fp32 (fp64 for float64 inputs) and
the per-dim scaling happens on the fp32 tile. Every option of the single-dim tiled kernels: directions (the
doc_to_query gradient fused into query_to_doc's when the query columns are the queries), partition modes,
hardness, guides (never truncated: one guide tile per column tile serves every dim), doc_ids, offset.
Memory: the fp32 gradient accumulators, O(K·(B + N + Mq)) statistics, the backward's scratch of
(K - 1)·OWN·SWEPT fp32 values and K·OWN·PASS values in the embeddings' dtype per program (at the headline's five
dims, 16 bits, N = 131072: 256 + 320 MiB) and the norm pre-pass's temporaries of NORMALIZE_ROWS rows, i.e.
O((B + N + Mq)·D).
FLOPs per direction, like the single-dim tiled kernels at D = d_1: forward 2·B·N·d_1, each backward kernel
2·B·N·d_1 (recompute) + 2·B·N·d_1 (product): 10·B·N·d_1, plus 2·B·N·BLOCK_DO per backward kernel for each dim
that ends strictly inside a BLOCK_DO chunk (none of 768/512/256/128/64 with 16-bit inputs' 64-dim chunks), and
up to K exponentials per similarity per sweep instead of one. Scratch traffic per similarity per backward
kernel: 8·(K - 1) bytes of H_k (a store and a load of each but the last) and e·(K + d_1/BLOCK_DO) of M_k (each
stored once, loaded once per output chunk of its segment); the fp32 gradient rows 8·d_1/PASS.
Launch configurations: FORWARD_CONFIGS and BACKWARD_CONFIGS below, autotuned on a GPU as contrastive.py's.
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
    _backward,
    _tile_rows,
    _Tuned,
    _tiled_partition_kernel,  # noqa: F401 (each dim's partition: launched from here by ops/matryoshka/tiled.py)
)


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
                                 n_cols, dim, num_dims, guide_dim, num_positives, offset, own_query_offset, max_ptr,
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
                            n_cols, dim, num_dims, guide_dim, num_positives, offset, own_query_offset, max_ptr,
                            factor_ptr, stride_stats, out_ptr, stride_out, radial_ptr, stride_radial, dq_max_ptr,
                            dq_factor_ptr, tile_scratch_ptr, scratch_ptr,
                            KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                            RELATIVE_MARGIN: tl.constexpr, COSINE: tl.constexpr, DIMS: tl.constexpr,
                            ACC: tl.constexpr, WIDEN: tl.constexpr, BY_COLUMNS: tl.constexpr,
                            WITH_DOC_TO_QUERY: tl.constexpr, OWN: tl.constexpr, SWEPT: tl.constexpr,
                            PASS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Backward of one block over every dim (dim = d_1, the widest), H_k = dL/dR_k recomputed once per tile, in
    the passes of contrastive.py's _tiled_grad_kernel: program i owns OWN rows (columns, BY_COLUMNS) and sweeps the
    other side PASS at a time, SWEPT per tile.

    1. per swept tile, one sweep over D (dims ascending) gives every H_k: each but the last into the program's
       fp32 tile scratch (tile_scratch_ptr + i·(K - 1)·OWN·SWEPT), the last kept; COSINE: the radial sums
       Σ G_k ⊙ s_k of the own rows (columns), in registers over the whole sweep, added to radial_ptr +
       k·stride_radial at the end. Then M_K = H_K, M_k = M_{k+1} + H_k (sums, never differences, so a huge H_k of
       a near-zero prefix norm cancels nothing), each M'_k = grad_scale·M_k stored in the embeddings' dtype to the
       program's pass scratch (scratch_ptr + i·K·OWN·PASS, [K, OWN, PASS], transposed BY_COLUMNS: own side
       first).
    2. per dim segment [d_{k-1}, d_k), BLOCK_DO-aligned chunks of its output dims (those straddling its ends
       masked): an fp32 accumulator in registers over the pass's swept rows, acc = M'_k·E[pass, dims], added to
       out[own, dims] once per pass (a fixed order: no atomics, deterministic).
    WITH_DOC_TO_QUERY: doc_to_query's gradient added to query_to_doc's, per dim (as in contrastive.py)."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    margin = tl.load(params_ptr + MARGIN)
    grad_scale = tl.load(params_ptr + GRAD_SCALE)
    if BY_COLUMNS:
        BLOCK_M: tl.constexpr = SWEPT
        BLOCK_N: tl.constexpr = OWN
        n_swept, n_own, e_ptr, stride_e = n_rows, n_cols, r_ptr, stride_r
    else:
        BLOCK_M: tl.constexpr = OWN
        BLOCK_N: tl.constexpr = SWEPT
        n_swept, n_own, e_ptr, stride_e = n_cols, n_rows, c_ptr, stride_c
    slot = tl.arange(0, DIMS)[None, :]
    program = tl.program_id(0)
    own0 = program * OWN
    own = own0 + tl.arange(0, OWN)
    swept_in_tile = tl.arange(0, SWEPT)
    tile = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    tile_scratch = tile_scratch_ptr + program.to(tl.int64) * ((num_dims - 1) * BLOCK_M * BLOCK_N) + tile
    scratch = scratch_ptr + program.to(tl.int64) * (num_dims * OWN * PASS) + tl.arange(0, OWN)[:, None] * PASS
    radial = tl.zeros([OWN, DIMS], ACC)
    for p0 in range(0, n_swept, PASS):
        width = tl.minimum(PASS, n_swept - p0)
        for t0 in range(0, width, SWEPT):  # 1. the pass's M'_k into the scratch
            rows, ok, pos, own_query, pos_ids, threshold, cols = _sweep_tile(
                own0, p0 + t0, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr, margin, HAS_IDS, GUIDED,
                RELATIVE_MARGIN, BLOCK_M, BLOCK_N, ACC, BY_COLUMNS)
            g = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            if GUIDED:
                g = _similarity_tile(gr_ptr, gc_ptr, stride_gr, stride_gc, rows, cols, n_rows, n_cols, guide_dim,
                                     BLOCK_M, BLOCK_N, BLOCK_K, ACC, False)
            raw = tl.zeros([BLOCK_M, BLOCK_N], ACC)
            suffix = tl.zeros([BLOCK_M, BLOCK_N], ACC)  # H_K after the sweep, then M_k
            for k in range(0, num_dims):
                raw, s, hi, a, b = _next_dim(raw, k, dims_ptr, r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows,
                                             n_cols, ra_ptr, cb_ptr, stride_ra, stride_cb, COSINE, BLOCK_K, ACC,
                                             WIDEN)
                x = _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives,
                                   scale, alpha, KIND, HARDNESS, GUIDED, HAS_IDS)
                m = tl.load(max_ptr + k * stride_stats + rows, mask=ok, other=0.0)
                factor = tl.load(factor_ptr + k * stride_stats + rows, mask=ok, other=0.0)
                grad = _softmax_grad(x, m, factor, tl.load(params_ptr + k * stride_params + POS_COEF), cols, pos,
                                     KIND)
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
                    tl.store(tile_scratch + k * (BLOCK_M * BLOCK_N), grad)  # roofline: matryoshka_tiled.scratch_l2
            tl.debug_barrier()  # the tile scratch stores land before the loads below
            for j in range(0, num_dims):  # M_k from the last dim down
                k = num_dims - 1 - j
                if k + 1 < num_dims:
                    suffix += tl.load(tile_scratch + k * (BLOCK_M * BLOCK_N))
                operand = (suffix * grad_scale).to(e_ptr.dtype.element_ty)
                if BY_COLUMNS:
                    operand = tl.trans(operand)
                # roofline: tiled.grad_scratch_l2 (each M'_k stored once, loaded once per output chunk below)
                tl.store(scratch + k * (OWN * PASS) + t0 + swept_in_tile[None, :], operand)
            tl.debug_barrier()  # the tile scratch loads are done before the next tile's stores
        tl.debug_barrier()  # the pass scratch stores land before the loads below
        for k in range(0, num_dims):  # 2. segment k of out[own, :] += M'_k·E[pass, segment k]
            lo = tl.load(dims_ptr + k - 1, mask=k > 0, other=0)
            hi = tl.load(dims_ptr + k)
            for o in range(lo // BLOCK_DO * BLOCK_DO, hi, BLOCK_DO):
                dims = o + tl.arange(0, BLOCK_DO)
                inside = (dims >= lo) & (dims < hi)
                acc = tl.zeros([OWN, BLOCK_DO], ACC)
                for t0 in range(0, width, SWEPT):
                    swept = p0 + t0 + swept_in_tile
                    # roofline: gemm.product, tiled.product_operand_l2 (the swept embeddings again, once per pass)
                    e = tl.load(e_ptr + swept[:, None].to(tl.int64) * stride_e + dims[None, :],
                                mask=(swept < n_swept)[:, None] & inside[None, :], other=0.0)
                    acc = _dot(tl.load(scratch + k * (OWN * PASS) + t0 + swept_in_tile[None, :]), e, acc, WIDEN,
                               ACC)
                out = out_ptr + own[:, None].to(tl.int64) * stride_out + dims[None, :]
                held = (own < n_own)[:, None] & inside[None, :]
                # roofline: tiled.grad_rmw_per_pass (the own fp32 gradient rows read and written once per pass)
                tl.store(out, tl.load(out, mask=held, other=0.0) + acc, mask=held)
        tl.debug_barrier()  # this pass's scratch loads are done before the next pass's stores
    if COSINE:
        sums = radial_ptr + slot * stride_radial + own[:, None]
        held = (own < n_own)[:, None] & (slot < num_dims)
        tl.store(sums, tl.load(sums, mask=held, other=0.0) + radial, mask=held)


# The backward's and the forward's configurations (as contrastive.py's BACKWARD_CONFIGS and FORWARD_CONFIGS, by the
# embeddings' element size and the guide), each compiled for sm_90a without a register spill at the headline's five
# dims (bench/triton_compile.py).
BACKWARD_CONFIGS = {
    (2, False): [_backward(64, 128, 256, 32, 64, 8, 3), _backward(64, 64, 256, 32, 64, 8, 3)],
    (2, True): [_backward(64, 64, 256, 32, 64, 8, 3)],
    **{(size, False): [_backward(16, 32, 128, 16, 32, 4, 3)] for size in (4, 8)},
    **{(size, True): [_backward(16, 32, 128, 32, 32, 4, 3)] for size in (4, 8)},
}
FORWARD_CONFIGS = {
    (2, False): [triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), num_warps=8, num_stages=3),
                 triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_warps=8, num_stages=3)],
    (2, True): [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_warps=8, num_stages=3)],
    **{(size, guided): [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16), num_warps=8, num_stages=3)]
       for size in (4, 8) for guided in (False, True)},
}
_matryoshka_logsumexp_kernel = _Tuned(_matryoshka_logsumexp_kernel, FORWARD_CONFIGS)
_matryoshka_grad_kernel = _Tuned(_matryoshka_grad_kernel, BACKWARD_CONFIGS, restore=("out_ptr", "radial_ptr"))
