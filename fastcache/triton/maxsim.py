"""Triton kernels of the MaxSim (ColBERT late-interaction) op's two primitives, with their host launchers.

Query tokens q[b, t] (valid where query_mask[b, t]), document tokens d[c, u] (valid where doc_mask[c, u]), D dims:

    token_max   values[b, t, c] = max_{u: doc_mask[c, u]} q[b, t]·d[c, u]   (fp32-accumulated dot products)
                index[b, t, c]  = the first (lowest) u attaining it, as torch.max gives it;
                index = -1 and values = 0 where query_mask[b, t] is False or document c has no valid token.
    token_grad  grad_q[b, t] = Σ_{c: index[b,t,c] ≥ 0} w[b, t, c]·d[c, index[b, t, c]]
                grad_d[c, u] = Σ_{(b, t): index[b,t,c] = u} w[b, t, c]·q[b, t]
                (w = dL/dvalues; an entry with index -1 reads nothing, its weight included).

The MaxSim score of query b and document c is Σ_t values[b, t, c]; its gradient w.r.t. the tokens is token_grad
with w[b, t, c] = dL/dscore[b, c] (times the query-token weights if any).

Kernels (the B·Lq query tokens are flattened into rows r = b·Lq + t; every row·stride product in int64):

    _token_max_kernel           a tiled GEMM: a program owns BLOCK_M query tokens and DOCS documents; per document,
                                the [BLOCK_M, BLOCK_N] tiles of q·dᵀ over its Ld tokens (tl.dot, fp32 accumulator,
                                the inputs' dtype: bf16/fp16 on tensor cores, fp32 as full-precision FMA products,
                                no TF32) are reduced in registers to a running maximum and its first argmax (strict
                                > across tiles, tl.max's tie_break_left within one); the token-level products are
                                never written. FLOPs 2·B·Lq·C·Ld·D; writes 8·B·Lq·C bytes ([BLOCK_M, DOCS] tiles).
    _token_grad_queries_kernel  a gather: a program owns BLOCK_M rows and BLOCK_D dims and loops over the C
                                documents, adding w·d[c, index] (fp32) to registers: no atomics, deterministic.
                                Reads 8 bytes (w, index) and the e·D bytes of a document token (e bytes per
                                embedding value; mostly L2 hits) per (query token, document) entry; 2·B·Lq·C·D
                                FLOPs.
    _token_grad_docs_kernel     a scatter written as a one-hot GEMM, deterministic (no atomics: the sum over
                                (b, t) runs in a fixed order): a program owns one document c, BLOCK_U of its tokens
                                and BLOCK_D dims, and loops over the rows BLOCK_M at a time, accumulating
                                onehot[u, r]·(w[r, c]·q[r]) in an fp32 [BLOCK_U, BLOCK_D] tile (rows whose index
                                falls outside the program's tokens are not read). The scaled rows w·q are fp32; for
                                16-bit inputs they enter two bf16 tensor-core dots as hi = bf16(w·q) and
                                lo = bf16(w·q - hi) (the one-hot is exact in bf16; hi + lo keeps 16 significant bits,
                                and bf16's exponent range, so fp16 inputs neither underflow nor overflow); fp32
                                inputs use one full-precision FMA dot. FLOPs 4·B·Lq·C·Ld·D (16-bit), 2·B·Lq·C·Ld·D
                                (fp32). Deterministic rather than atomics: the op's gradients are reproducible run
                                to run, as the project's other backward kernels are.

Non-finite values: masked tokens, entries with index -1 and everything past D are never loaded (masked loads,
other=0; token_max replaces the masked tokens' products by tl.where selects, never by multiplying by 0), so NaN
there cannot reach a result; valid tokens are assumed finite (a NaN among them gives an unspecified maximum
and argmax, as torch.max's NaN propagation is not reproduced).

Kernels are decorated at import: set TRITON_INTERPRET=1 before importing this module to run them on CPU tensors.
This module imports nothing of fastcache.ops: the op (fastcache/ops/maxsim/) calls ``token_max`` and ``token_grad``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastcache.triton.contrastive import _dot


class MaxTiles(NamedTuple):
    """token_max's tiles: query tokens, document tokens and dims per tile, documents per program; warps, stages."""
    block_m: int
    block_n: int
    block_k: int
    docs: int
    warps: int
    stages: int


class GradTiles(NamedTuple):
    """token_grad's tiles: dims per program (both kernels); grad_docs: rows per step, document tokens per program,
    warps, stages; grad_queries: rows per program, warps."""
    block_d: int
    block_m: int
    block_u: int
    warps: int
    stages: int
    gather_m: int
    gather_warps: int


# By the embeddings' element size (sm_90, no spills: bench/maxsim_compile.py at B·Lq = 16384, C = 1024, Ld = 128,
# D = 128). Not yet timed on a GPU (bench/maxsim_kernels.py). The gather (grad_queries) is latency-bound (the index,
# then the rows it points to): small programs, many resident per SM (1024 of 16 rows at that shape).
TOKEN_MAX_TILES = {2: MaxTiles(128, 128, 64, 8, 8, 3), 4: MaxTiles(64, 64, 32, 8, 8, 2)}
TOKEN_GRAD_TILES = {2: GradTiles(128, 64, 128, 8, 2, 16, 4), 4: GradTiles(64, 32, 64, 8, 1, 16, 4)}
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _token_offsets(r, length, stride_outer, stride_inner):
    """Flat token indices r = outer·length + inner -> int64 offsets outer·stride_outer + inner·stride_inner."""
    return (r // length).to(tl.int64) * stride_outer + (r % length).to(tl.int64) * stride_inner


@triton.jit
def _doc_token_max(q_ptr, q_off, q_ok, doc_ptr, doc_mask_ptr, stride_du, stride_dmu, n_doc_tokens, dim,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WIDEN: tl.constexpr):
    """Per query token (offsets q_off, valid q_ok: [BLOCK_M]): the maximum over one document's valid tokens of the
    fp32 dot product, and the first token attaining it (-inf and -1 where the document has no valid token)."""
    best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    arg = tl.full([BLOCK_M], -1, tl.int32)
    for u0 in range(0, n_doc_tokens, BLOCK_N):
        u = u0 + tl.arange(0, BLOCK_N)
        inside = u < n_doc_tokens
        u_ok = inside & (tl.load(doc_mask_ptr + u.to(tl.int64) * stride_dmu, mask=inside, other=0) != 0)
        s = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, dim, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            q = tl.load(q_ptr + q_off[:, None] + k[None, :], mask=q_ok[:, None] & (k[None, :] < dim), other=0.0)
            d = tl.load(doc_ptr + u[None, :].to(tl.int64) * stride_du + k[:, None],
                        mask=u_ok[None, :] & (k[:, None] < dim), other=0.0)
            s = _dot(q, d, s, WIDEN, tl.float32)
        top, first = tl.max(tl.where(u_ok[None, :], s, float("-inf")), 1, return_indices=True,
                            return_indices_tie_break_left=True)
        better = (tl.max(u_ok.to(tl.int32), 0) > 0) & ((top > best) | (arg < 0))  # strict: earlier tiles win ties
        best = tl.where(better, top, best)
        arg = tl.where(better, u0 + first, arg)
    return best, arg


@triton.jit
def _token_max_kernel(q_ptr, qm_ptr, d_ptr, dm_ptr, values_ptr, index_ptr, n_rows, n_query_tokens, n_docs,
                      n_doc_tokens, dim, stride_qb, stride_qt, stride_qmb, stride_qmt, stride_dc, stride_du,
                      stride_dmc, stride_dmu,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOCS: tl.constexpr,
                      WIDEN: tl.constexpr):
    """Rows r = b·Lq + t of one BLOCK_M block × documents c0 .. c0+DOCS-1: values and index ([B·Lq, C], row-major).
    A 1-D grid (neither count is bounded by a grid dim's 65535): consecutive programs take the row blocks of one
    document group, whose tokens they share in L2."""
    row_blocks = tl.cdiv(n_rows, BLOCK_M)
    rows = (tl.program_id(0) % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    q_ok = row_ok & (tl.load(qm_ptr + _token_offsets(rows, n_query_tokens, stride_qmb, stride_qmt), mask=row_ok,
                             other=0) != 0)
    q_off = _token_offsets(rows, n_query_tokens, stride_qb, stride_qt)
    c0 = (tl.program_id(0) // row_blocks) * DOCS
    slot = tl.arange(0, DOCS)[None, :]
    values = tl.zeros([BLOCK_M, DOCS], tl.float32)
    index = tl.full([BLOCK_M, DOCS], -1, tl.int32)
    for j in range(tl.minimum(DOCS, n_docs - c0)):
        c = (c0 + j).to(tl.int64)
        best, arg = _doc_token_max(q_ptr, q_off, q_ok, d_ptr + c * stride_dc, dm_ptr + c * stride_dmc, stride_du,
                                   stride_dmu, n_doc_tokens, dim, BLOCK_M, BLOCK_N, BLOCK_K, WIDEN)
        values = tl.where(slot == j, best[:, None], values)
        index = tl.where(slot == j, arg[:, None], index)
    found = q_ok[:, None] & (index >= 0)
    out = rows[:, None].to(tl.int64) * n_docs + (c0 + slot)
    held = row_ok[:, None] & (c0 + slot < n_docs)
    tl.store(values_ptr + out, tl.where(found, values, 0.0), mask=held)
    tl.store(index_ptr + out, tl.where(found, index, -1), mask=held)


@triton.jit
def _token_grad_queries_kernel(w_ptr, index_ptr, d_ptr, out_ptr, n_rows, n_query_tokens, n_docs, dim, stride_wb,
                               stride_wt, stride_wc, stride_ib, stride_it, stride_ic, stride_dc, stride_du,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """grad_q[r, dims] = Σ_c w[r, c]·d[c, index[r, c], dims] over the entries with index ≥ 0 (a gather)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    w_row = w_ptr + _token_offsets(rows, n_query_tokens, stride_wb, stride_wt)
    index_row = index_ptr + _token_offsets(rows, n_query_tokens, stride_ib, stride_it)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for c in range(n_docs):
        c64 = tl.cast(c, tl.int64)
        u = tl.load(index_row + c64 * stride_ic, mask=row_ok, other=-1)
        hit = u >= 0
        w = tl.load(w_row + c64 * stride_wc, mask=hit, other=0.0)
        d = tl.load(d_ptr + c64 * stride_dc + u[:, None].to(tl.int64) * stride_du + dims[None, :],
                    mask=hit[:, None] & dim_ok[None, :], other=0.0)
        acc += w[:, None] * d.to(tl.float32)  # 0·0 where index is -1: neither w nor d read there
    tl.store(out_ptr + rows[:, None].to(tl.int64) * dim + dims[None, :], acc,
             mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _token_grad_docs_kernel(w_ptr, index_ptr, q_ptr, out_ptr, n_rows, n_query_tokens, n_doc_tokens, dim,
                            stride_wb, stride_wt, stride_wc, stride_ib, stride_it, stride_ic, stride_qb, stride_qt,
                            BLOCK_M: tl.constexpr, BLOCK_U: tl.constexpr, BLOCK_D: tl.constexpr,
                            SPLIT: tl.constexpr, WIDEN: tl.constexpr):
    """grad_d[c, u, dims] = Σ_{r: index[r, c] = u} w[r, c]·q[r, dims] for one document c and BLOCK_U of its tokens:
    a one-hot GEMM over the rows in a fixed order (SPLIT: the fp32 products w·q as bf16 hi + lo operands)."""
    c = tl.program_id(0).to(tl.int64)
    u = tl.program_id(1) * BLOCK_U + tl.arange(0, BLOCK_U)
    u_lo = tl.program_id(1) * BLOCK_U
    dims = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    acc = tl.zeros([BLOCK_U, BLOCK_D], tl.float32)
    for r0 in range(0, n_rows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        index = tl.load(index_ptr + _token_offsets(rows, n_query_tokens, stride_ib, stride_it) + c * stride_ic,
                        mask=row_ok, other=-1)
        hit = (index >= u_lo) & (index < u_lo + BLOCK_U)  # -1 never
        w = tl.load(w_ptr + _token_offsets(rows, n_query_tokens, stride_wb, stride_wt) + c * stride_wc, mask=hit,
                    other=0.0)
        q = tl.load(q_ptr + _token_offsets(rows, n_query_tokens, stride_qb, stride_qt)[:, None] + dims[None, :],
                    mask=hit[:, None] & dim_ok[None, :], other=0.0)
        scaled = w[:, None] * q.to(tl.float32)  # 0·0 on rows that are not hits: neither w nor q read there
        onehot = tl.where(u[:, None] == index[None, :], 1.0, 0.0)  # via fp32: the interpreter's bool -> bf16 is wrong
        if SPLIT:
            hi = scaled.to(tl.bfloat16)
            lo = (scaled - hi.to(tl.float32)).to(tl.bfloat16)  # exact in fp32 whatever rounding gave hi
            acc = _dot(onehot.to(tl.bfloat16), hi, acc, WIDEN, tl.float32)
            acc = _dot(onehot.to(tl.bfloat16), lo, acc, WIDEN, tl.float32)
        else:
            acc = _dot(onehot, scaled, acc, False, tl.float32)
    out = out_ptr + (c * n_doc_tokens + u[:, None]).to(tl.int64) * dim + dims[None, :]
    tl.store(out, acc, mask=(u[:, None] < n_doc_tokens) & dim_ok[None, :])


# ---------------------------------------------------------------------------------------------------------------
# host launchers
# ---------------------------------------------------------------------------------------------------------------

def _check_embeddings(queries: Tensor, docs: Tensor) -> None:
    for name, t in (("queries", queries), ("docs", docs)):
        if not isinstance(t, Tensor) or t.dim() != 3 or t.dtype not in DTYPES:
            raise ValueError(f"{name} must be a 3-D tensor of float32, bfloat16 or float16, got "
                             f"{_describe(t)}")
        if t.size(2) > 1 and t.stride(2) != 1:
            raise ValueError(f"{name} must be contiguous along its last dim (stride 1), got strides {t.stride()}")
    if docs.dtype != queries.dtype or docs.size(2) != queries.size(2) or docs.device != queries.device:
        raise ValueError(f"docs must have the queries' dtype, dim and device: queries {_describe(queries)}, docs "
                         f"{_describe(docs)}")


def _check_mask(name: str, mask: Tensor, shape: tuple[int, int], device: torch.device) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
        raise ValueError(f"{name} must be a bool tensor of shape {list(shape)}, got {_describe(mask)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {mask.device}")


def _describe(t) -> str:
    return f"{t.dtype} tensor of shape {list(t.shape)} on {t.device}" if isinstance(t, Tensor) else repr(type(t))


def _check_index_range(index: Tensor, n_doc_tokens: int) -> None:
    """Every index in [-1, Ld) (a gather past a document would read out of bounds): one reduction, a device sync."""
    low, high = (int(v) for v in torch.aminmax(index))
    if low < -1 or high >= n_doc_tokens:
        raise ValueError(f"index must hold document token positions in [-1, {n_doc_tokens}) (-1: none), got values "
                         f"in [{low}, {high}]")


def _widen(t: Tensor) -> bool:
    """bf16 dot operands go through fp32 under the Triton interpreter (see contrastive._dot)."""
    return t.device.type == "cpu" and t.dtype == torch.bfloat16


def token_max(queries: Tensor, query_mask: Tensor, docs: Tensor, doc_mask: Tensor, *,
              tiles: MaxTiles | None = None) -> tuple[Tensor, Tensor]:
    """(values float32 [B, Lq, C], index int32 [B, Lq, C]) of queries [B, Lq, D] and docs [C, Ld, D] (float32,
    bfloat16 or float16, one dtype, any strides with the last dim contiguous) under the bool masks
    query_mask [B, Lq] and doc_mask [C, Ld]: the module docstring's token_max. ``tiles``: the default
    TOKEN_MAX_TILES[element size]."""
    _check_embeddings(queries, docs)
    (B, Lq, D), (C, Ld) = queries.shape, docs.shape[:2]
    _check_mask("query_mask", query_mask, (B, Lq), queries.device)
    _check_mask("doc_mask", doc_mask, (C, Ld), queries.device)
    values = torch.zeros((B, Lq, C), dtype=torch.float32, device=queries.device)
    index = torch.full((B, Lq, C), -1, dtype=torch.int32, device=queries.device)
    rows = B * Lq
    if rows == 0 or C == 0 or Ld == 0:
        return values, index
    t = tiles or TOKEN_MAX_TILES[queries.element_size()]
    qm, dm = query_mask.view(torch.uint8), doc_mask.view(torch.uint8)
    _token_max_kernel[(triton.cdiv(rows, t.block_m) * triton.cdiv(C, t.docs),)](
        queries, qm, docs, dm, values, index, rows, Lq, C, Ld, D, queries.stride(0), queries.stride(1),
        qm.stride(0), qm.stride(1), docs.stride(0), docs.stride(1), dm.stride(0), dm.stride(1),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, DOCS=t.docs, WIDEN=_widen(queries),
        num_warps=t.warps, num_stages=t.stages)
    return values, index


def token_grad(weights: Tensor, index: Tensor, queries: Tensor, docs: Tensor, *,
               tiles: GradTiles | None = None) -> tuple[Tensor, Tensor]:
    """(grad_queries float32 [B, Lq, D], grad_docs float32 [C, Ld, D]) from weights float32 [B, Lq, C] (dL/dvalues)
    and token_max's index int32 [B, Lq, C] (values in [-1, Ld); any strides): the module docstring's token_grad.
    Checks the index range on the host (one reduction and a device sync). ``tiles``: the default
    TOKEN_GRAD_TILES[element size]."""
    _check_embeddings(queries, docs)
    (B, Lq, D), (C, Ld) = queries.shape, docs.shape[:2]
    for name, t, dtype in (("weights", weights, torch.float32), ("index", index, torch.int32)):
        if not isinstance(t, Tensor) or t.dtype != dtype or tuple(t.shape) != (B, Lq, C):
            raise ValueError(f"{name} must be a {dtype} tensor of shape {[B, Lq, C]}, got {_describe(t)}")
        if t.device != queries.device:
            raise ValueError(f"{name} must be on the embeddings' device {queries.device}, got {t.device}")
    grad_queries = torch.zeros((B, Lq, D), dtype=torch.float32, device=queries.device)
    grad_docs = torch.zeros((C, Ld, D), dtype=torch.float32, device=queries.device)
    rows = B * Lq
    if rows and C:
        _check_index_range(index, Ld)
    if rows == 0 or C == 0 or Ld == 0 or D == 0:
        return grad_queries, grad_docs
    t = tiles or TOKEN_GRAD_TILES[queries.element_size()]
    block_d = min(t.block_d, triton.next_power_of_2(D))
    strides = (*weights.stride(), *index.stride())
    _token_grad_queries_kernel[(triton.cdiv(rows, t.gather_m), triton.cdiv(D, block_d))](
        weights, index, docs, grad_queries, rows, Lq, C, D, *strides, docs.stride(0), docs.stride(1),
        BLOCK_M=t.gather_m, BLOCK_D=block_d, num_warps=t.gather_warps)
    _token_grad_docs_kernel[(C, triton.cdiv(Ld, t.block_u), triton.cdiv(D, block_d))](
        weights, index, queries, grad_docs, rows, Lq, Ld, D, *strides, queries.stride(0), queries.stride(1),
        BLOCK_M=t.block_m, BLOCK_U=t.block_u, BLOCK_D=block_d, SPLIT=queries.element_size() == 2,
        WIDEN=queries.device.type == "cpu", num_warps=t.warps, num_stages=t.stages)
    return grad_queries, grad_docs
