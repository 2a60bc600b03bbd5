"""The slab strategy of the contrastive op (the maths: fastcache/ops/contrastive/__init__.py): rows in chunks, per
chunk GEMMs into chunk×columns similarity blocks, one fused epilogue (fastcache/ops/contrastive/epilogue.py) that
turns them into dL/ds in place, then the gradient GEMMs; on the cpu backend the whole loop is one C++ call
(:func:`_slab_cpu`). Also the chunk size from the memory budget and the GEMMs' precision: bf16/fp16 operands with
fp32 results on CUDA (:func:`low_precision_gemms`), dL/ds scaled by a power of two as a 16-bit operand
(:func:`operand_grad_scale`, which the tiled strategy, the autograd Function and the Matryoshka op use too).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import trange

from fastcache import _backend
from fastcache.ops.contrastive.epilogue import WORKSPACE_BLOCKS
from fastcache.ops.contrastive.filtering import record_filtered_tiles
from fastcache.ops.contrastive.normalize import (
    NORMALIZE_EPS,
    _normalized,
    _normalized_backward_,
    _normalized_backward_in_chunks_,
    _normalized_in_own_dtype,
    guide_and_id_operands,
)
from fastcache.ops.contrastive.options import ContrastiveLayout, ContrastiveOptions, kernel_params

MAX_SLAB_BYTES = 64 * 2**20  # similarity blocks per chunk at most (speed: larger chunks fall out of cache)
GEMM_WORKSPACE_BYTES = 16 * 2**20  # what the BLAS keeps for packing (measured: ~14 MiB for CPU torch.mm)


def block_columns(layout: ContrastiveLayout, guided: bool) -> dict[str, int]:
    """Columns of each direction's similarity block: the candidates, or the query columns; doc_to_doc against the
    positives only when guided (GISTEmbedLoss)."""
    return {"query_to_doc": layout.candidates, "query_to_query": layout.query_columns,
            "doc_to_query": layout.query_columns,
            "doc_to_doc": layout.positives if guided else layout.candidates}


def guide_blocks(guides: dict[str, Tensor], gq: Tensor | None, gd: Tensor | None, r0: int, r1: int, offset: int,
                 positives: int) -> dict[str, Tensor]:
    """The guide's similarity blocks of rows r0 .. r1-1 (GISTEmbedLoss), written into the first rows of ``guides``
    (one buffer per guided direction; empty without a guide): query_to_doc gq·gdᵀ, query_to_query gq·gqᵀ
    (anchor-anchor), doc_to_doc p·gd[:P]ᵀ (positive-positive)."""
    out = {k: v[:r1 - r0] for k, v in guides.items()}
    if "query_to_doc" in out:
        torch.mm(gq[r0:r1], gd.T, out=out["query_to_doc"])
    if "query_to_query" in out:
        torch.mm(gq[r0:r1], gq.T, out=out["query_to_query"])
    if "doc_to_doc" in out:
        torch.mm(gd[offset + r0:offset + r1], gd[:positives].T, out=out["doc_to_doc"])
    return out


def chunk_rows(layout: ContrastiveLayout, options: ContrastiveOptions, gathered: bool, guide_dim: int, budget: int,
               itemsize: int, workspace_blocks: float = 1, cache_cap: bool = True) -> int:
    """Rows per chunk so that the slab workspace stays within ``budget`` bytes.

    The fixed part holds the normalised copies and the gradient accumulators of queries, docs and (when
    gathered) all_queries, the guide copies (O((B + N + Mq)·D)) and the GEMM library's own buffers. Each chunk row costs one value per block
    column (``workspace_blocks`` times for an epilogue that needs temporaries), plus the guide's blocks. With
    ``cache_cap`` (CPU) blocks are also kept under MAX_SLAB_BYTES, past which bigger chunks only fall out of
    cache; a GPU wants the tallest chunk the budget allows. At least one row; a
    budget that leaves fewer than 16 rows warns (slow).
    """
    n = layout.candidates
    mq = layout.query_columns
    width = block_columns(layout, guide_dim > 0)
    block_row = sum(width[d] for d in options.directions) * itemsize
    per_row = block_row * (workspace_blocks + (1 if guide_dim else 0))
    fixed = (2 * (layout.rows + n + (mq if gathered else 0)) * layout.dim + (layout.rows + n) * guide_dim) * itemsize
    fixed += GEMM_WORKSPACE_BYTES
    rows = min(layout.rows, max(1, int((budget - fixed) // per_row)))
    if cache_cap:
        rows = min(rows, max(16, MAX_SLAB_BYTES // block_row))
    if rows < min(16, layout.rows):
        warnings.warn(
            f"fastcache: memory_budget={budget} bytes leaves {rows} row(s) per chunk (fixed workspace {fixed} bytes, "
            f"{per_row} bytes per row); raise it (FASTCACHE_MEMORY_BUDGET) for speed", RuntimeWarning, stacklevel=4)
    return rows


def low_precision_gemms(x: Tensor) -> bool:
    """Whether the slab's GEMMs take ``x``'s own dtype: bf16/fp16 CUDA tensors, with a torch whose mm/addmm write
    fp32 results from bf16/fp16 operands (the ``out_dtype`` overloads: checked by a real call,
    :func:`out_dtype_gemm_failure`). Else they run in fp32."""
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and \
        out_dtype_gemm_failure(x.device, x.dtype) is None


@functools.cache
def out_dtype_gemm_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``torch.mm(a, b, float32)`` and ``torch.addmm(acc, a, b, float32, out=acc)`` work for ``dtype``
    operands on ``device`` and give the right product (a 2×2 call, once per device and dtype), else why not; the
    reason is also given once as a warning (the slab then runs its GEMMs in fp32: slower, same results). Only
    recent PyTorch builds accept the overloads, and an overload can exist and still reject the call."""
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device)
        product = torch.mm(a, a, torch.float32)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, torch.float32, out=acc)
        expected = torch.tensor([[7.0, 10.0], [15.0, 22.0]], device=device)
        if product.dtype != torch.float32 or not torch.equal(product, expected) or not torch.equal(acc, expected + 1):
            raise RuntimeError(f"wrong result {product.tolist()}, {acc.tolist()}")
    except (RuntimeError, NotImplementedError, TypeError) as error:
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        warnings.warn(f"fastcache: the slab's GEMMs run in float32 for {dtype} inputs on {device}: this torch cannot "
                      f"write float32 products of {dtype} operands ({reason})", RuntimeWarning, stacklevel=2)
        return reason
    return None


LOW_PRECISION_GRAD_MAX = 2.0**14  # the largest |dL/ds| a 16-bit GEMM operand gets (fp16's largest value: 65504)


def operand_grad_scale(bound: float) -> float:
    """A power of two p with p·bound ≤ LOW_PRECISION_GRAD_MAX, for gradient entries bounded by ``bound``
    (|dL/ds| ≤ |scale|/B for the contrastive loss: |coef·p_ij| ≤ |scale|/B, and at the positive
    |coef·p - scale/B|).
    dL/ds becomes a bf16/fp16 GEMM operand as p·dL/ds and the fp32 products are divided by p (exact: a power of
    two). Unscaled, the negatives' entries, ~scale/(B·N) (2e-9 at B=65536, N=131072, scale 20), fall below fp16's
    smallest subnormal (6e-8) and their gradients vanish."""
    return 2.0 ** min(126, max(-126, math.floor(math.log2(LOW_PRECISION_GRAD_MAX / bound))))


def unscale_(grad_scale: float, *grads: Tensor) -> None:
    """Divide each distinct gradient accumulator (several names may hold one tensor) by ``grad_scale``, the
    operand_grad_scale its sums were taken with."""
    for grad in {id(t): t for t in grads}.values():
        grad.div_(grad_scale)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a·b, out in its own dtype (fp32 from bf16/fp16 operands: cuBLAS accumulates in fp32)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out.dtype, out=out)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a·b, acc in its own dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, acc.dtype, out=acc)


class DenseProducts:
    """The slab's products on dense operands: torch GEMMs (results in the out / accumulator dtype)."""

    @staticmethod
    def operand(x: Tensor) -> Tensor:
        return x

    @staticmethod
    def scores(out: Tensor, x: Tensor, y: Tensor) -> None:
        """out = x·yᵀ."""
        _mm_into(out, x, y.T)

    @staticmethod
    def add(dx: Tensor, dy: Tensor, g: Tensor, x: Tensor, y: Tensor) -> None:
        """dx += g·y, dy += gᵀ·x."""
        _addmm_into(dx, g, y)
        _addmm_into(dy, g.T, x)


DENSE_PRODUCTS = DenseProducts()


# The gradient filter's tiles (ContrastiveOptions.filter_eps): FILTER_TILE_ROWS rows of a chunk by
# FILTER_TILE_COLUMNS columns of a block; the C++ slab's (csrc/cpu/contrastive.cpp: kFilterTileRows, ...) are the same.
FILTER_TILE_ROWS, FILTER_TILE_COLUMNS = 64, 256


def _filtered_products(grad: Tensor, g: Tensor, x: Tensor, y: Tensor, dx: Tensor, dy: Tensor,
                       threshold: float) -> tuple[int, int]:
    """dx += g·y and dy += gᵀ·x over the tiles of dL/ds ``grad`` [c, n] (``g``: the GEMM operand, grad itself or
    its scaled 16-bit copy) that keep an entry with |dL/ds| >= ``threshold``: per row strip of FILTER_TILE_ROWS
    rows, the columns of its kept tiles gathered into one product each way (all tiles kept: one product each way;
    one host sync per block for the tiles' maxima). The skipped tiles contribute nothing. Returns the (skipped,
    all) tile counts."""
    n = grad.size(1)
    maxima = F.max_pool2d(grad.abs()[None], (FILTER_TILE_ROWS, FILTER_TILE_COLUMNS), ceil_mode=True)[0]
    kept = (maxima >= threshold).cpu()
    if kept.all():  # nothing to skip: one product each way
        _addmm_into(dx, g, y)
        _addmm_into(dy, g.T, x)
        return 0, kept.numel()
    for strip, tiles in enumerate(kept):
        if not tiles.any():
            continue
        rows = slice(strip * FILTER_TILE_ROWS, (strip + 1) * FILTER_TILE_ROWS)
        g_strip, x_strip, dx_strip = g[rows], x[rows], dx[rows]
        if tiles.all():
            _addmm_into(dx_strip, g_strip, y)
            _addmm_into(dy, g_strip.T, x_strip)
            continue
        columns = (tiles.nonzero() * FILTER_TILE_COLUMNS + torch.arange(FILTER_TILE_COLUMNS)).flatten()
        columns = columns[columns < n].to(g.device)
        g_kept = g_strip.index_select(1, columns)
        _addmm_into(dx_strip, g_kept, y.index_select(0, columns))
        product = torch.empty(columns.numel(), dy.size(1), dtype=dy.dtype, device=dy.device)
        _mm_into(product, g_kept.T, x_strip)
        dy.index_add_(0, columns, product)
    return int((~kept).sum()), kept.numel()


def _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options: ContrastiveOptions,
          layout: ContrastiveLayout, epilogue, need_grad: bool, chunk: int, progress: bool, native: bool,
          products=DENSE_PRODUCTS):
    """Loss (compute dtype, 0-d) and, when ``need_grad``, fp32/fp64 gradients w.r.t. queries, docs, all_queries.
    ``native``: the normalisation and its backward in C++ (the cpu backend). With :func:`low_precision_gemms` the
    normalised embeddings and, for the gradient GEMMs, dL/ds keep the inputs' dtype (fp32 results: the blocks,
    the epilogue and the gradients stay fp32); otherwise everything is in the compute dtype. ``products``: the
    GEMMs (:data:`DENSE_PRODUCTS`) or another implementation of their interface on operands it makes from the
    normalised embeddings (strategy sparse: fastcache/ops/contrastive/sparse.py)."""
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    cosine = options.similarity == "cos"
    B, P, off = layout.rows, layout.positives, options.offset
    low = low_precision_gemms(queries)

    def operand(x: Tensor) -> tuple[Tensor, Tensor | None]:
        return _normalized_in_own_dtype(x, dtype, cosine) if low else _normalized(x, dtype, cosine, native)

    def operand_backward_(grad: Tensor, x: Tensor, divisor: Tensor | None) -> Tensor:
        return _normalized_backward_in_chunks_(grad, x, divisor) if low else \
            _normalized_backward_(grad, x, divisor, native)

    q, q_norm = operand(queries)
    d, d_norm = operand(docs.reshape(-1, layout.dim))
    gathered = all_queries is not None
    Q, Q_norm = operand(all_queries) if gathered else (q, q_norm)
    guided = guide_queries is not None
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, dtype)
    dirs = options.directions
    q_op, d_op = products.operand(q), products.operand(d)  # the products' operands (dense: the same tensors)
    Q_op = products.operand(Q) if gathered else q_op
    # doc_to_doc candidates: every document, or (guided, GISTEmbedLoss) the positives only
    dd_cols = d_op[:P] if guided else d_op
    widths = block_columns(layout, guided)
    blocks = {k: torch.empty(chunk, widths[k], dtype=dtype, device=q.device) for k in dirs}
    guide_dirs = [k for k in dirs if guided]
    guides = {k: torch.empty(chunk, widths[k], dtype=dtype, device=q.device) for k in guide_dirs}
    # dL/ds as the gradient GEMMs' operand: the blocks themselves, or their copies in the embeddings' dtype
    operands = {k: torch.empty(chunk, widths[k], dtype=q.dtype, device=q.device) for k in dirs} if low and need_grad \
        else blocks
    if need_grad:
        grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
        grad_d = torch.zeros(d.shape, dtype=dtype, device=q.device)
        grad_Q = torch.zeros(Q.shape, dtype=dtype, device=q.device) if gathered else grad_q
    loss = torch.zeros((), dtype=dtype, device=q.device)
    grad_scale = operand_grad_scale(abs(options.scale) / B)
    threshold = kernel_params(options, layout, len(dirs)).filter_threshold if need_grad else 0.0
    tiles = [0, 0]  # the gradient filter's skipped and all tiles
    # a tqdm bar costs ~0.2 ms per call even when disabled
    starts = trange(0, B, chunk, desc="contrastive loss", leave=False) if progress else range(0, B, chunk)
    for r0 in starts:
        r1 = min(r0 + chunk, B)
        qc, pc = q_op[r0:r1], d_op[off + r0:off + r1]
        out = {k: v[:r1 - r0] for k, v in blocks.items()}
        # roofline: gemm.product, gemm.operand_read, slab.gemm_out_fp32 (the fp32 chunk×N block, 4 B/logit)
        products.scores(out["query_to_doc"], qc, d_op)
        if "query_to_query" in dirs:
            products.scores(out["query_to_query"], qc, Q_op)
        if "doc_to_query" in dirs:
            products.scores(out["doc_to_query"], pc, Q_op)
        if "doc_to_doc" in dirs:
            products.scores(out["doc_to_doc"], pc, dd_cols)
        gout = guide_blocks(guides, gq, gd, r0, r1, off, P)
        loss += epilogue(out, gout, ids, r0, layout, options, need_grad).sum()
        if not need_grad:
            continue
        # out now holds dL/ds for each block; accumulate the similarity GEMMs' gradients (low: of grad_scale·dL/ds)
        # roofline: slab.grad_cast (fp32 dL/ds read, 16-bit copy written: 4 + e B/logit)
        g = {k: torch.mul(out[k], grad_scale, out=v[:r1 - r0]) if low else out[k] for k, v in operands.items()}
        # roofline: slab.grad_operand_read (each GEMM reads dL/ds), slab.grad_rows_rmw (the chunk's fp32 rows)
        # roofline: slab.grad_cols_rmw (all N fp32 gradient rows read and written once per chunk: 8·D/chunk B/logit)
        # per block: dx += G·y, dy += Gᵀ·x (rows x, columns y; with the filter over its kept tiles)
        pairs = [("query_to_doc", qc, d_op, grad_q[r0:r1], grad_d)]
        if "query_to_query" in dirs:
            pairs.append(("query_to_query", qc, Q_op, grad_q[r0:r1], grad_Q))
        if "doc_to_query" in dirs:
            pairs.append(("doc_to_query", pc, Q_op, grad_d[off + r0:off + r1], grad_Q))
        if "doc_to_doc" in dirs:
            pairs.append(("doc_to_doc", pc, dd_cols, grad_d[off + r0:off + r1], grad_d[:dd_cols.size(0)]))
        for kind, x, y, dx, dy in pairs:
            if threshold:
                for i, count in enumerate(_filtered_products(out[kind], g[kind], x, y, dx, dy, threshold)):
                    tiles[i] += count
            else:
                products.add(dx, dy, g[kind], x, y)
    if threshold:
        record_filtered_tiles(*tiles)
    loss = loss / B
    del blocks, guides, operands, out, gout  # free the slab before the normalisation backward
    if not need_grad:
        return loss, None, None, None
    if low:
        unscale_(grad_scale, grad_q, grad_d, grad_Q)  # roofline: grad.zero_unscale
    grad_queries = operand_backward_(grad_q, q, q_norm)
    grad_docs = operand_backward_(grad_d, d, d_norm).view(docs.shape)
    grad_all = operand_backward_(grad_Q, Q, Q_norm) if gathered else None
    return loss, grad_queries, grad_docs, grad_all


def _slab_cpu(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options: ContrastiveOptions,
              layout: ContrastiveLayout, need_grad: bool, chunk: int):
    """:func:`_slab` with the cpu epilogue in one C++ call (csrc/cpu/contrastive.cpp: contrastive_slab_cpu), which
    saves the Python round trip of its ~20 tensor operations: most of a small batch's time."""
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, dtype)
    dirs = options.directions
    flat_docs = docs if docs.dim() == 2 else docs.reshape(-1, layout.dim)
    params = kernel_params(options, layout, len(dirs), compute_grad=need_grad)
    loss, grad_queries, grad_docs, grad_all, tiles = _backend.EXTENSION.contrastive_slab_cpu(
        queries, flat_docs, all_queries, gq, gd, ids, "query_to_query" in dirs, "doc_to_query" in dirs,
        "doc_to_doc" in dirs, options.similarity == "cos", NORMALIZE_EPS, params, chunk)
    if params.filter_threshold and need_grad:
        record_filtered_tiles(*tiles)
    if grad_docs is not None and flat_docs is not docs:
        grad_docs = grad_docs.view(docs.shape)
    return loss, grad_queries, grad_docs, grad_all




def slab_rows(layout: ContrastiveLayout, options: ContrastiveOptions, gathered: bool, guide_dim: int, backend: str,
              queries: Tensor, memory_budget=None, sparse: bool = False) -> int:
    """Rows per chunk of the slab strategy with ``backend``'s epilogue (``queries`` gives the dtype and device):
    what the memory budget allows, blocks kept in cache on CPU. ``sparse`` (the sparse products): no dense
    operand copies or accumulators in the fixed part (the compressed operands are nnz-sized, and the dense
    gradients are the op's outputs, which at SPLADE's D alone can exceed the budget)."""
    itemsize = 8 if queries.dtype == torch.float64 else 4
    budget = _backend.memory_budget(memory_budget)
    # + half a block for dL/ds in bf16/fp16, the low-precision gradient GEMMs' operand
    workspace = WORKSPACE_BLOCKS[backend] + (0.5 if low_precision_gemms(queries) else 0)
    return chunk_rows(layout._replace(dim=0) if sparse else layout, options, gathered, guide_dim, budget, itemsize,
                      workspace, cache_cap=queries.device.type == "cpu")
