"""Triton kernels of the fused_slab strategy (slab v2; host code: fastcache/ops/contrastive/fused_slab.py; the
maths: fastcache/ops/contrastive/__init__.py's docstring). NOT YET RUN ON A GPU: tested under the Triton
interpreter and compiled for sm_90a (bench/triton_compile.py), never timed.

The slab's row chunks without a float32 similarity block: for each enabled direction b (rows R_b, columns C_b as
in fastcache/triton/contrastive.py) and each chunk of rows,

    forward   ``_fused_logits_kernel``, one program per (row tile, column tile): the similarity tile over the full D
              (tl.dot, fp32 accumulation, the tiled strategy's ``_tile_logits``: every option's masks, hardness
              and guide), then per row of the tile its maximum m_t and sum t_t of exp(logit - m_t) (fp32
              partials, [column tiles, rows]), the positive's logit (query_to_doc, fp32), and
              e = E_SCALE·exp(logit - m_t), stored once in the embeddings' dtype (fp32 embeddings: fp32). The
              host merges the partials into the rows' block statistics (O(rows·tiles) values) and the partition
              (fastcache/triton/contrastive.py's ``_tiled_partition_kernel``: the loss and the factors f_b), then
              w[t, i] = f_b[i]·exp(m_t[i] - m_b[i]) / E_SCALE.
    backward  ``_fused_grad_kernel``, two GEMMs whose A operand is dL/ds made on load from the stored e:
              G[i, j] = w[j // FORWARD_N, i]·e[i, j] (- scale/B at the positive of query_to_doc), never written.
              Row-parallel (a program owns a [rows × dims] tile of dL/dR and reduces over the columns) and
              column-parallel (a [columns × dims] tile of dL/dC, reducing over the chunk's rows); the product
              takes grad_scale·G in the embeddings' dtype (the slab's operand_grad_scale) and accumulates in fp32;
              each program adds its tile to the fp32 gradient once per chunk (no atomics: deterministic).

Storing e = exp(logit - tile maximum) instead of the logit makes the backward exp-free (a multiply per entry) and
gives every stored entry the same relative precision (a bf16 logit of magnitude 50 would be off by up to 0.1 in
the exponent). fp16 keeps e·2^15 (E_SCALE) so that entries down to 2^-24·2^-15 of the tile maximum stay
representable (subnormal) and those above 2^-14·2^-15 keep full precision. Bytes per logit beyond the GEMMs'
operand reads: the store and two loads of e (2 + 2 + 2 = 6 at 16 bits, 12 at fp32; the D/BLOCK_N programs of a
strip read it at once, so the repeat reads are L2 hits), plus the fp32 partials and w, 12 bytes per row and
column tile (0.1 byte per logit at 128-wide tiles). FLOPs: the slab's 6·B·N·D (a guide adds 2·B·N·D_guide).

Compiled for sm_90a at the headline shape (B = 65536, N = 131072, D = 768; bench/triton_compile.py, checked by
tests/native/test_triton_compile.py): bf16 forward 128×128×64 tiles (guided 64×128×64), 8 warps, 3 stages, one
wgmma dot (the guide's fp32 dot by FMA), 111-186 registers, 96 KiB shared memory; bf16 backward 128×128×64, 8
warps, 3 stages, 182-197 registers, 97 KiB, its dot split by Triton into 4 wgmma along K (dL/ds comes from
registers); fp32 and fp64 64×64×32, 8 warps, 2 stages, FMA dots, 64-194 registers; no spills, no atomics, no
32-bit product of the sizes in an address.

Exactness, measured on CPU through the interpreter with the GPU's rounding (``python bench/fused_slab_precision.py``:
B = 24, N = 48, D = 64, cosine, joint; mean over 4 seeds of the largest error over the truth's largest magnitude,
truth = the float64 reference on the same 16-bit inputs; gradients: the larger of dL/dqueries and dL/ddocs; noise 2:
positive cosine ~0.45, noise 1: ~0.7, a sharp softmax whose small gradients magnify every rounding):

    directions  dtype  noise  scale   loss: fused_slab / reference   gradients: fused_slab / tiled / reference
    qd          bf16   2      20      1.6e-03 / 1.6e-02              5.3e-03 / 6.3e-03 / 4.1e-02
    qd          bf16   2      50      7.0e-03 / 4.1e-02              1.2e-02 / 1.1e-02 / 1.2e-01
    qd          bf16   1      20      2.1e-03 / 7.8e-01              8.8e-03 / 8.8e-03 / 8.6e-01
    qd          bf16   1      50      2.0e-01 / 1.0e+00              1.7e-01 / 1.7e-01 / 8.3e-01
    qd          fp16   2      20      2.3e-04 / 1.4e-03              1.1e-03 / 8.8e-04 / 5.2e-03
    qd          fp16   2      50      1.4e-03 / 1.8e-02              1.7e-03 / 1.6e-03 / 1.2e-02
    qd          fp16   1      20      5.1e-04 / 7.1e-01              1.3e-03 / 1.3e-03 / 5.4e-01
    qd          fp16   1      50      2.2e-01 / 1.0e+00              5.8e-01 / 5.8e-01 / 1.1e+00
    qd+dq       bf16   2      20      5.9e-04 / 2.6e-03              6.9e-03 / 5.4e-03 / 4.3e-02
    qd+dq       bf16   2      50      1.0e-03 / 5.3e-02              1.1e-02 / 1.0e-02 / 1.5e-01
    qd+dq       bf16   1      20      6.3e-06 / 4.4e-03              1.9e-01 / 8.3e-03 / 4.8e+00
    qd+dq       bf16   1      50      6.0e-08 / 8.1e-02              8.9e-01 / 3.0e-01 / 9.3e+04
    qd+dq       fp16   2      20      3.5e-05 / 5.3e-04              7.4e-04 / 6.5e-04 / 5.2e-03
    qd+dq       fp16   2      50      6.4e-05 / 4.6e-03              1.4e-03 / 1.3e-03 / 1.8e-02
    qd+dq       fp16   1      20      7.4e-07 / 9.2e-04              2.1e-02 / 1.0e-03 / 5.2e-01
    qd+dq       fp16   1      50      6.7e-08 / 8.0e-03              9.2e-01 / 4.0e-01 / 1.2e+04

The loss is the tiled strategy's (fp32 partials; the stored e never enters it). With query_to_doc alone the
16-bit e leaves the gradients within 1.3x of the tiled strategy's, which stores nothing, and 3-10x (up to 400x in a
sharp softmax) below the reference's in the same dtype. With doc_to_query too, a sharp softmax shows the one
weakness: the positive's similarity appears in both blocks with dL/ds ~ ∓scale/(2B), whose sum is tiny; tiled
adds doc_to_query's dL/ds into query_to_doc's tile in fp32 before the 16-bit GEMM operand, fused_slab (like
today's slab) rounds each block's operand alone, so their rounding errors do not cancel: 0.19 against tiled's
0.008 (bf16, scale 20), still 25x below the reference's 4.8. Everywhere within the same-dtype reference's error
(the tests: tests/contrastive/test_contrastive_fused_slab.py, where the interpreter's truncating bf16 casts make
the check stricter than the GPU).

This module imports only fastcache.triton.contrastive (its per-tile helpers) from fastcache.
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
    _dot,
    _tile_logits,
    _tile_rows,
)


@triton.jit
def _fused_logits_kernel(r_ptr, c_ptr, gr_ptr, gc_ptr, ids_ptr, gpos_ptr, params_ptr, stride_r, stride_c, stride_gr,
                         stride_gc, n_rows, n_cols, dim, guide_dim, num_positives, offset, own_query_offset, row0,
                         e_ptr, stride_e, part_max_ptr, part_total_ptr, stride_part, pos_logit_ptr,
                         KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                         RELATIVE_MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr,
                         STORE: tl.constexpr, E_SCALE: tl.constexpr):
    """Forward, one [BLOCK_M, BLOCK_N] tile of the chunk's rows row0 .. n_rows-1 (global indices) × column tile t:
    the rows' partials m_t, t_t at [t, row - row0], the positive's logit (query_to_doc, from the tile that holds it)
    at [row - row0] and, with STORE, e at [row - row0, column]. Programs run GROUP_M row tiles across each column
    tile before the next (the GEMM's grouped order: a wave of programs reads each column strip for GROUP_M row
    tiles, from L2)."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    # the grouped order's index maths in 64 bits (its products of the sizes reach the addresses), the first row
    # and column back in 32
    pid = tl.program_id(0).to(tl.int64)
    in_group = GROUP_M * tl.cdiv(n_cols, BLOCK_N).to(tl.int64)
    first = pid // in_group * GROUP_M
    group_rows = tl.minimum(tl.cdiv(n_rows - row0, BLOCK_M) - first, GROUP_M)
    rows, ok, pos, own_query, pos_ids, threshold = _tile_rows(
        (row0 + (first + pid % in_group % group_rows) * BLOCK_M).to(tl.int32), n_rows, offset, own_query_offset,
        ids_ptr, gpos_ptr, tl.load(params_ptr + MARGIN), HAS_IDS, GUIDED, RELATIVE_MARGIN, BLOCK_M, ACC)
    tile = pid % in_group // group_rows
    c0 = (tile * BLOCK_N).to(tl.int32)
    cols = c0 + tl.arange(0, BLOCK_N)
    _, x = _tile_logits(r_ptr, c_ptr, gr_ptr, gc_ptr, stride_r, stride_c, stride_gr, stride_gc, rows, cols, n_rows,
                        n_cols, dim, guide_dim, pos, own_query, threshold, ids_ptr, pos_ids, num_positives, scale,
                        alpha, KIND, HARDNESS, GUIDED, HAS_IDS, BLOCK_M, BLOCK_N, BLOCK_K, ACC, WIDEN)
    top = tl.max(x, 1)
    e = tl.exp(x - tl.where(top == float("-inf"), 0.0, top)[:, None])  # 0 where masked
    local = rows - row0
    partial = tile * stride_part + local
    tl.store(part_max_ptr + partial, top, mask=ok)
    tl.store(part_total_ptr + partial, tl.sum(e, 1), mask=ok)
    if STORE:
        tl.store(e_ptr + local[:, None].to(tl.int64) * stride_e + cols[None, :],
                 (e * E_SCALE).to(e_ptr.dtype.element_ty), mask=ok[:, None] & (cols[None, :] < n_cols))
    if KIND == QUERY_TO_DOC:
        here = ok & (pos >= c0) & (pos < c0 + BLOCK_N)
        tl.store(pos_logit_ptr + local, tl.sum(tl.where(cols[None, :] == pos[:, None], x, 0.0), 1), mask=here)


@triton.jit
def _grad_on_load(e_ptr, stride_e, w_ptr, rows, row0, ok, cols, col_ok, offset, pos_coef, KIND: tl.constexpr,
                  ACC: tl.constexpr, TRANSPOSED: tl.constexpr):
    """dL/ds of rows (global indices, ok: inside the chunk) × cols from the stored e and the rows' weights w
    (one column tile's): [rows, cols], or [cols, rows] when TRANSPOSED."""
    local = rows - row0
    w = tl.load(w_ptr + local, mask=ok, other=0.0)
    if TRANSPOSED:
        e = tl.load(e_ptr + local[None, :].to(tl.int64) * stride_e + cols[:, None],
                    mask=ok[None, :] & col_ok[:, None], other=0.0)
        grad = w[None, :] * e.to(ACC)
        if KIND == QUERY_TO_DOC:
            grad = tl.where(ok[None, :] & (cols[:, None] == offset + rows[None, :]), grad - pos_coef, grad)
    else:
        e = tl.load(e_ptr + local[:, None].to(tl.int64) * stride_e + cols[None, :],
                    mask=ok[:, None] & col_ok[None, :], other=0.0)
        grad = w[:, None] * e.to(ACC)
        if KIND == QUERY_TO_DOC:
            grad = tl.where(ok[:, None] & (cols[None, :] == offset + rows[:, None]), grad - pos_coef, grad)
    return grad


@triton.jit
def _fused_grad_kernel(e_ptr, stride_e, w_ptr, stride_w, r_ptr, c_ptr, stride_r, stride_c, out_ptr, stride_out,
                       params_ptr, n_rows, n_cols, dim, row0, offset,
                       KIND: tl.constexpr, BY_COLUMNS: tl.constexpr, FORWARD_N: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """Backward of one block for the chunk's rows row0 .. n_rows-1: a [BLOCK_M, BLOCK_N] tile of the gradient
    (program axis 0: BLOCK_N dims, axis 1: BLOCK_M own rows, or own columns BY_COLUMNS), reduced over BLOCK_K
    columns (rows BY_COLUMNS) at a time with dL/ds made on load; out[own, dims] += the tile. BLOCK_K (and, BY_COLUMNS,
    BLOCK_M) divides FORWARD_N, the forward's column tile: one w row per step."""
    pos_coef = tl.load(params_ptr + POS_COEF)
    grad_scale = tl.load(params_ptr + GRAD_SCALE)
    dims = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dim_ok = dims < dim
    own0 = tl.program_id(1) * BLOCK_M
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    if BY_COLUMNS:
        own = own0 + tl.arange(0, BLOCK_M)
        own_ok = own < n_cols
        w_tile = w_ptr + tl.cast(own0 // FORWARD_N, tl.int64) * stride_w
        for k0 in range(row0, n_rows, BLOCK_K):
            rows = k0 + tl.arange(0, BLOCK_K)
            ok = rows < n_rows
            grad = _grad_on_load(e_ptr, stride_e, w_tile, rows, row0, ok, own, own_ok, offset, pos_coef, KIND, ACC,
                                 True)
            r = tl.load(r_ptr + rows[:, None].to(tl.int64) * stride_r + dims[None, :],
                        mask=ok[:, None] & dim_ok[None, :], other=0.0)
            acc = _dot((grad * grad_scale).to(r_ptr.dtype.element_ty), r, acc, WIDEN, ACC)
    else:
        own = row0 + own0 + tl.arange(0, BLOCK_M)
        own_ok = own < n_rows
        for k0 in range(0, n_cols, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < n_cols
            grad = _grad_on_load(e_ptr, stride_e, w_ptr + tl.cast(k0 // FORWARD_N, tl.int64) * stride_w, own, row0,
                                 own_ok, cols, col_ok, offset, pos_coef, KIND, ACC, False)
            c = tl.load(c_ptr + cols[:, None].to(tl.int64) * stride_c + dims[None, :],
                        mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
            acc = _dot((grad * grad_scale).to(c_ptr.dtype.element_ty), c, acc, WIDEN, ACC)
    out = out_ptr + own[:, None].to(tl.int64) * stride_out + dims[None, :]
    held = own_ok[:, None] & dim_ok[None, :]
    tl.store(out, tl.load(out, mask=held, other=0.0) + acc, mask=held)
