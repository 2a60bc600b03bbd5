"""The slab strategy of the Matryoshka op (the maths: fastcache/ops/matryoshka/__init__.py), and the prefix norms
both strategies use: per row chunk, the segment GEMMs, every dim's epilogue (fused in one C++ call on the cpu
backend, else the contrastive epilogue dim by dim) and the segment GEMMs of the backward; the prefix norms and their
backward; the power of two that scales the segment gradient totals as 16-bit operands (:func:`segment_grad_scale`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from tqdm.auto import trange

from fastcache import _backend
from fastcache.ops.contrastive.epilogue import WORKSPACE_BLOCKS
from fastcache.ops.contrastive.normalize import NORMALIZE_EPS, NORMALIZE_ROWS, guide_and_id_operands
from fastcache.ops.contrastive.options import DIRECTIONS, KIND_CODES, ContrastiveOptions, kernel_params
from fastcache.ops.contrastive.slab import (
    _addmm_into,
    _mm_into,
    block_columns,
    chunk_rows,
    guide_blocks,
    low_precision_gemms,
    operand_grad_scale,
    unscale_,
)


# The fused CPU path's K segment blocks per chunk, per thread: GEMM outputs the epilogue reads back and the backward
# GEMMs read twice, kept within a core's share of the last-level cache. Measured at B=4096, N=8192, D=384, 5 dims
# (bench/matryoshka_table.py's shape, interleaved runs): 96-128 rows (15-20 MiB) on 1 thread and 256 on 2 take
# 1.57-1.69x the single-dim loss stage, against 1.9x at the budget's ~1300 rows (200 MiB, out of cache).
FUSED_BLOCK_BYTES = 20 * 2**20
MIN_FUSED_ROWS = 16  # the slab's own floor for speed (chunk_rows warns below it)


def _prefix_reciprocal_norms(x: Tensor, dims: tuple[int, ...], cosine: bool) -> tuple[Tensor, Tensor] | None:
    """[K, rows] the prefix norms ‖x[:, :d_k]‖ and their reciprocals 1/max(norm, eps); None for "dot"."""
    if not cosine:
        return None
    bounds = dims[::-1]  # ascending: squared norms of the segments, summed from the first dims up
    # of x / the row's largest magnitude, then times it: no overflow (as row_norms)
    largest = x.abs().amax(dim=1).clamp_min_(torch.finfo(x.dtype).tiny)
    scaled = x / largest[:, None]
    squares = torch.stack([scaled[:, lo:hi].square().sum(dim=1) for lo, hi in zip((0,) + bounds, bounds)])
    norms = squares.cumsum(0).flip(0).sqrt().mul_(largest)
    return norms, norms.clamp_min(NORMALIZE_EPS).reciprocal()


def _prefix_norm_backward_(grad: Tensor, x: Tensor, dims: tuple[int, ...], norms: tuple[Tensor, Tensor] | None,
                           radial: Tensor) -> Tensor:
    """Add to ``grad`` the gradient through the prefix norms: -Σ_{k: segment in d_k} t_k/‖x[:d_k]‖² · x[segment]
    (nothing below eps, where F.normalize divides by the constant eps)."""
    if norms is None:
        return grad
    norm, reciprocal = norms
    coefficient = (radial * reciprocal.square() * (norm > NORMALIZE_EPS)).cumsum(0)  # [k] = Σ over dims ≥ d_k
    for k, (hi, lo) in enumerate(zip(dims, dims[1:] + (0,))):
        grad[:, lo:hi].addcmul_(x[:, lo:hi], coefficient[k][:, None], value=-1)
    return grad


def _prefix_norms(x: Tensor, dims: tuple[int, ...], acc: torch.dtype) -> tuple[Tensor, Tensor]:
    """[K, n] prefix norms and their reciprocals (dims descending, as the slab's), in ``acc``, NORMALIZE_ROWS rows
    at a time so that the ``acc`` copy stays small."""
    norms = torch.empty(len(dims), x.size(0), dtype=acc, device=x.device)
    reciprocals = torch.empty_like(norms)
    for r0 in range(0, x.size(0), NORMALIZE_ROWS):
        rows = slice(r0, r0 + NORMALIZE_ROWS)
        norms[:, rows], reciprocals[:, rows] = _prefix_reciprocal_norms(x[rows].to(acc), dims, True)
    return norms, reciprocals


def _prefix_norm_backward_in_chunks_(grad: Tensor, x: Tensor, dims: tuple[int, ...], norms: tuple[Tensor, Tensor],
                                     radial: Tensor) -> Tensor:
    """``_prefix_norm_backward_`` (dims descending) NORMALIZE_ROWS rows at a time, x widened one chunk at a time."""
    for r0 in range(0, grad.size(0), NORMALIZE_ROWS):
        rows = slice(r0, r0 + NORMALIZE_ROWS)
        _prefix_norm_backward_(grad[rows], x[rows].to(grad.dtype), dims, (norms[0][:, rows], norms[1][:, rows]),
                               radial[:, rows])
    return grad


def segment_grad_scale(norms: dict, weights: tuple[float, ...], scale: float, rows: int) -> float:
    """operand_grad_scale for the segment gradient totals A_k = Σ_{k' ≤ k} w_k'·a_k' ⊙ G_k' ⊙ b_k' as 16-bit
    operands: |A| ≤ Σ_k |w_k|·(|scale|/B)·â_k², â_k the largest prefix-norm reciprocal of any operand at dim k
    (``norms``: name -> (norms, reciprocals) [K, n], or None for "dot", where â = 1)."""
    reciprocals = [n[1] for n in norms.values() if n is not None]
    largest = torch.stack([r.amax(1) for r in reciprocals]).amax(0).tolist() if reciprocals else [1.0] * len(weights)
    return operand_grad_scale(sum(abs(w) * abs(scale) / rows * a * a for w, a in zip(weights, largest)))


def _segment_gemms_(grad, grad_t, tensors, operand, rows, total: Tensor, lo: int, hi: int, grad_scale: float) -> None:
    """The backward GEMMs of segment [lo, hi) of one direction: dX[rows, seg] += A·Y[:, seg] and, into the
    transposed column-operand gradient, dYᵀ[seg] += X[rows, seg]ᵀ·A (a narrow segment's GEMM writes a few long rows
    there rather than many short ones: measured ~25% faster than dY[:, seg] += Aᵀ·X[rows, seg] on CPU). For
    low-precision GEMMs A becomes a bf16/fp16 copy of grad_scale·A (:func:`segment_grad_scale`; the caller
    divides the sums by it)."""
    x, _, y, width = operand
    if total.dtype != tensors[y].dtype:  # roofline: matryoshka_slab.grad_cast
        total = total.mul(grad_scale).to(tensors[y].dtype)
    # roofline: gemm.product, slab.grad_operand_read, slab.grad_rows_rmw, slab.grad_cols_rmw (per segment)
    _addmm_into(grad[x][rows, lo:hi], total, tensors[y][:width, lo:hi])
    _addmm_into(grad_t[y][lo:hi, :width], tensors[x][rows, lo:hi].T, total)


def _fused_cpu_chunk(segs, gout, ids, r0, c, layout, options, dims, weights, tensors, norms, operands, rows, grad,
                     grad_t, radial, need_grad: bool) -> float:
    """One chunk in one C++ call (csrc/cpu/matryoshka.cpp ``matryoshka_chunk_cpu``): per direction K segment GEMMs
    into K blocks, the epilogue of every dim (the blocks come back as the per-segment gradient totals A_k), the
    segment GEMMs of the backward and the radial sums, added into ``grad``, ``grad_t`` and ``radial``. Returns the
    chunk's weighted loss sum."""
    dirs = list(segs)
    cosine = norms["q"] is not None
    rows_of = [operands[n][0] for n in dirs]
    columns_of = [(operands[n][2], operands[n][3]) for n in dirs]
    radial_sums = need_grad and cosine
    return _backend.EXTENSION.matryoshka_chunk_cpu(
        [segs[n][:, :c] for n in dirs], [KIND_CODES[n] for n in dirs], [gout[n] for n in dirs] if gout else [],
        ids, [norms[x][1][:, rows[n]] for x, n in zip(rows_of, dirs)] if cosine else [],
        [norms[y][1][:, :width] for y, width in columns_of] if cosine else [], list(weights), list(dims),
        [tensors[x][rows[n]] for x, n in zip(rows_of, dirs)], [tensors[y][:width] for y, width in columns_of],
        [grad[x][rows[n]] for x, n in zip(rows_of, dirs)] if need_grad else [],
        [grad_t[y][:, :width] for y, width in columns_of] if need_grad else [],
        [radial[x][:, rows[n]] for x, n in zip(rows_of, dirs)] if radial_sums else [],
        [radial[y][:, :width] for y, width in columns_of] if radial_sums else [],
        kernel_params(options, layout, len(dirs), r0, need_grad))


def _per_dim_chunk(raw, grads, product, gout, ids, r0, c, layout, options, dims, weights, tensors, norms, operands,
                   rows, grad, grad_t, radial, epilogue, need_grad: bool, grad_scale: float) -> Tensor:
    """One chunk through a contrastive epilogue (any backend) dim by dim: segment GEMMs accumulated into the
    running prefix product, each dim's s_k into the epilogue, gradients summed per segment before the backward
    GEMMs. Returns the chunk's weighted loss sum."""
    dirs, K, cosine = list(raw), len(dims), norms["q"] is not None
    segments = list(zip(dims[1:] + (0,), dims))
    loss = 0
    for k in reversed(range(K)):  # the smallest dim first: its prefix is part of every larger one
        lo, hi = segments[k]
        out = {}
        for name in dirs:
            x, _, y, width = operands[name]
            xc, yc, block = tensors[x][rows[name]], tensors[y][:width], raw[name][:c]
            if k == K - 1:  # roofline: gemm.product, gemm.operand_read, slab.gemm_out_fp32
                _mm_into(block, xc[:, :hi], yc[:, :hi].T)
            else:  # roofline: matryoshka_slab.segment_accumulate (the fp32 prefix product read and written)
                _addmm_into(block, xc[:, lo:hi], yc[:, lo:hi].T)
            out[name] = grads[k][name][:c]
            if cosine:  # s_k = a_k ⊙ R_k ⊙ b_k; roofline: matryoshka_slab.cos_scale
                torch.mul(block, norms[x][1][k, rows[name], None], out=out[name])
                out[name].mul_(norms[y][1][k, None, :width])
            else:
                out[name].copy_(block)
        loss = loss + weights[k] * epilogue(out, gout, ids, r0, layout, options, need_grad).sum()
        if not need_grad:
            continue
        for name in dirs:  # g' = w·a ⊙ g, and the radial sums of g ⊙ s = g' ⊙ R ⊙ b
            x, _, y, width = operands[name]
            if cosine:  # roofline: matryoshka_slab.grad_weight, then matryoshka_slab.radial_sums
                out[name].mul_(norms[x][1][k, rows[name], None] * weights[k])
                t = torch.mul(out[name], raw[name][:c], out=product[:c, :width])
                b = norms[y][1][k, :width]
                radial[x][k, rows[name]] += t @ b
                radial[y][k, :width] += t.sum(0).mul_(b)
            elif weights[k] != 1.0:
                out[name].mul_(weights[k])
    if not need_grad:
        return loss
    for k, (lo, hi) in enumerate(segments):  # from the largest dim: A_k = Σ_{k' ≤ k} dL/dR_k' in grads[0]
        for name in dirs:
            y, width = operands[name][2:]
            total = grads[0][name][:c]
            scale_columns = norms[y][1][k, None, :width] if cosine else None  # roofline: matryoshka_slab.segment_total
            if k == 0:
                if cosine:
                    total.mul_(scale_columns)
            elif cosine:
                total.addcmul_(grads[k][name][:c], scale_columns)
            else:
                total.add_(grads[k][name][:c])
            _segment_gemms_(grad, grad_t, tensors, operands[name], rows[name], total, lo, hi, grad_scale)
    return loss


def _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options: ContrastiveOptions, layout,
          dims: tuple[int, ...], weights: tuple[float, ...], epilogue, need_grad: bool, chunk: int, progress: bool):
    """Weighted loss over the dims (compute dtype, 0-d) and, when ``need_grad``, fp32/fp64 gradients w.r.t.
    queries, docs and all_queries (see the module docstring). ``epilogue`` None: the fused C++ Matryoshka
    epilogue (every dim in one call per chunk); else a contrastive epilogue called dim by dim."""
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    cosine = options.similarity == "cos"
    B, P, off, K = layout.rows, layout.positives, options.offset, len(dims)
    # GEMM operands: the embeddings in the compute dtype, or in their own (low_precision_gemms: bf16/fp16 on CUDA)
    operand_dtype = queries.dtype if low_precision_gemms(queries) else dtype
    q = queries.to(operand_dtype).contiguous()
    d = docs.reshape(-1, layout.dim).to(operand_dtype).contiguous()
    gathered = all_queries is not None
    Q = all_queries.to(operand_dtype).contiguous() if gathered else q
    norms = {name: _prefix_norms(x, dims, dtype) if cosine else None for name, x in (("q", q), ("d", d))}
    norms["Q"] = (_prefix_norms(Q, dims, dtype) if cosine else None) if gathered else norms["q"]
    guided = guide_queries is not None
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, dtype)
    dirs = sorted(options.directions, key=DIRECTIONS.index)
    tensors = {"q": q, "d": d, "Q": Q}
    # each direction: (row operand, row start relative to the chunk's first row, column operand, column count)
    width = block_columns(layout, guided)
    operands = {"query_to_doc": ("q", 0, "d", width["query_to_doc"]),
                "query_to_query": ("q", 0, "Q", width["query_to_query"]),
                "doc_to_query": ("d", off, "Q", width["doc_to_query"]),
                "doc_to_doc": ("d", off, "d", width["doc_to_doc"])}
    fused = epilogue is None
    if fused:  # K segment products per direction, overwritten with the per-segment gradient totals
        segs = {k: torch.empty(K, chunk, operands[k][3], dtype=dtype, device=q.device) for k in dirs}
    else:  # the running prefix product, each dim's gradient block, the radial product temporary
        raw = {k: torch.empty(chunk, operands[k][3], dtype=dtype, device=q.device) for k in dirs}
        grads = [{k: torch.empty_like(raw[k]) for k in dirs} for _ in range(K)]
        product = torch.empty(chunk, max(operands[k][3] for k in dirs), dtype=dtype, device=q.device) \
            if need_grad and cosine else None
    guides = {k: torch.empty(chunk, operands[k][3], dtype=dtype, device=q.device) for k in dirs} if guided else {}
    grad = grad_t = radial = None
    names = ("q", "d", "Q") if gathered else ("q", "d")
    if need_grad:  # row operands' gradients, column operands' transposed ([D, rows]); "Q" is "q" unless gathered
        grad, grad_t = {}, {}
        for name in dirs:
            x, _, y, _ = operands[name]
            x, y = (x, y) if gathered else (x.replace("Q", "q"), y.replace("Q", "q"))
            grad.setdefault(x, torch.zeros(tensors[x].shape, dtype=dtype, device=q.device))
            grad_t.setdefault(y, torch.zeros(layout.dim, tensors[y].size(0), dtype=dtype, device=q.device))
        for store in (grad, grad_t) if not gathered else ():
            if "q" in store:
                store["Q"] = store["q"]
        radial = {name: torch.zeros(K, x.size(0), dtype=dtype, device=q.device) for name, x in (("q", q), ("d", d))}
        radial["Q"] = torch.zeros(K, Q.size(0), dtype=dtype, device=q.device) if gathered else radial["q"]
    loss = torch.zeros((), dtype=dtype, device=q.device)
    low = operand_dtype != dtype
    grad_scale = segment_grad_scale(norms, weights, options.scale, B) if low and need_grad else 1.0
    # a tqdm bar costs ~0.2 ms per call even when disabled
    starts = trange(0, B, chunk, desc="matryoshka loss", leave=False) if progress else range(0, B, chunk)
    for r0 in starts:
        r1 = min(r0 + chunk, B)
        c = r1 - r0
        rows = {k: slice(operands[k][1] + r0, operands[k][1] + r1) for k in dirs}
        gout = guide_blocks(guides, gq, gd, r0, r1, off, P)
        common = (gout, ids, r0, c, layout, options, dims, weights, tensors, norms, operands, rows, grad, grad_t,
                  radial)
        if fused:
            loss += _fused_cpu_chunk(segs, *common, need_grad)
        else:
            loss += _per_dim_chunk(raw, grads, product, *common, epilogue, need_grad, grad_scale)
    loss = loss / B
    # free the slab before the normalisation backward
    del guides
    if fused:
        del segs
    else:
        del raw, grads, product
    if not need_grad:
        return loss, None, None, None
    if low:
        unscale_(grad_scale, *grad.values(), *grad_t.values())
    total = {}
    for name in names:
        rows_part, columns_part = grad.get(name), grad_t.get(name)
        if columns_part is not None:
            rows_part = columns_part.T.contiguous() if rows_part is None else rows_part.add_(columns_part.T)
        total[name] = torch.zeros(tensors[name].shape, dtype=dtype, device=q.device) if rows_part is None \
            else rows_part
        if cosine:
            _prefix_norm_backward_in_chunks_(total[name], tensors[name], dims, norms[name], radial[name])
    return loss, total["q"], total["d"].view(docs.shape), total["Q"] if gathered else None


def slab_rows(layout, options, gathered: bool, guide_dim: int, num_dims: int, backend: str, queries: Tensor,
              memory_budget=None) -> int:
    """Rows per chunk of the slab strategy with ``backend``'s epilogue (``queries`` gives the dtype and device):
    what the memory budget allows (blocks kept in cache on CPU; a GPU gets the tallest chunk the budget allows), and
    on CPU with the fused epilogue at most FUSED_BLOCK_BYTES of segment blocks per thread (at least MIN_FUSED_ROWS)."""
    fused = backend == "cpu"
    itemsize = 8 if queries.dtype == torch.float64 else 4
    # per direction: fused, one segment block per dim; else the running prefix product, one gradient block
    # per dim, the radial product temporary and the epilogue's workspace
    # (+ half a block: a segment's gradient total in bf16/fp16 for low-precision GEMMs)
    blocks = num_dims if fused else num_dims + 1 + WORKSPACE_BLOCKS[backend] + (
        0.5 if low_precision_gemms(queries) else 0)
    chunk = chunk_rows(layout, options, gathered, guide_dim, _backend.memory_budget(memory_budget), itemsize, blocks,
                       cache_cap=queries.device.type == "cpu")
    if fused and queries.device.type == "cpu":
        row_bytes = blocks * itemsize * sum(block_columns(layout, guide_dim > 0)[k] for k in options.directions)
        chunk = min(chunk, max(MIN_FUSED_ROWS, FUSED_BLOCK_BYTES * torch.get_num_threads() // row_bytes))
    return chunk
