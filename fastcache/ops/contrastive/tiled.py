"""The tiled strategy of the contrastive op: the host side of fastcache/triton/contrastive.py's tiled kernels (their
algorithm, FLOPs and memory are in that module's docstring): the operands normalised in their own dtype, the guide's
positive similarities, the gradient accumulators, the launches, then the normalisation backward.

Kernels are decorated when fastcache.triton.contrastive is first imported: set TRITON_INTERPRET=1 before importing
this module to run them on CPU tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastcache.ops.contrastive.normalize import (
    _normalized_backward_in_chunks_,
    _normalized_in_own_dtype,
    guide_and_id_operands,
)
from fastcache.ops.contrastive.filtering import counting, record_filtered_tiles
from fastcache.ops.contrastive.options import KIND_CODES, kernel_params
from fastcache.ops.contrastive.slab import operand_grad_scale, unscale_
from fastcache.triton import contrastive as kernels
from fastcache.triton.contrastive import BACKWARD_CONFIGS, PARTITION_BLOCK, _acc_type, _scalars


class _Block(NamedTuple):
    """One direction of the tiled computation: its rows and columns (and the guide's), where their gradients go."""

    kind: str
    rows: Tensor
    cols: Tensor
    guide_rows: Tensor | None
    guide_cols: Tensor | None
    grad_rows: Tensor | None
    grad_cols: Tensor | None


class TiledOperands(NamedTuple):
    """What the kernels of the Triton strategies (tiled, fused_slab) read and write: the normalised operands (their
    dtype) with their norms, the guide and id operands, the guide's positive similarities, the fp32/fp64 gradient
    accumulators (None without need_grad), one _Block per enabled direction, the kernel params, the power-of-two
    gradient operand scale, the scalars tensor and the constexprs every kernel takes."""

    acc: torch.dtype
    q: Tensor
    q_norm: Tensor | None
    d: Tensor
    d_norm: Tensor | None
    Q: Tensor
    Q_norm: Tensor | None
    gathered: bool
    guided: bool
    ids: Tensor | None
    gpos: Tensor | None
    grad_q: Tensor | None
    grad_d: Tensor | None
    grad_Q: Tensor | None
    blocks: list
    kp: object
    grad_scale: float
    params: Tensor
    constants: dict


def tiled_operands(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                   need_grad: bool) -> TiledOperands:
    """The operands of the Triton strategies' kernels (see TiledOperands)."""
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    cosine = options.similarity == "cos"
    B, P, off = layout.rows, layout.positives, options.offset
    q, q_norm = _normalized_in_own_dtype(queries, acc, cosine)
    d, d_norm = _normalized_in_own_dtype(docs.reshape(-1, layout.dim), acc, cosine)
    gathered = all_queries is not None
    Q, Q_norm = _normalized_in_own_dtype(all_queries, acc, cosine) if gathered else (q, q_norm)
    p = d[off:off + B]
    guided = guide_queries is not None
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, acc)
    gpos = torch.linalg.vecdot(gq, gd[off:off + B]) if guided else None
    grad_q = grad_d = grad_Q = None
    if need_grad:
        grad_q = torch.zeros(q.shape, dtype=acc, device=q.device)
        grad_d = torch.zeros(d.shape, dtype=acc, device=q.device)
        grad_Q = torch.zeros(Q.shape, dtype=acc, device=q.device) if gathered else grad_q
    grad_p = None if grad_d is None else grad_d[off:off + B]
    make = {
        "query_to_doc": lambda: _Block("query_to_doc", q, d, gq, gd, grad_q, grad_d),
        "query_to_query": lambda: _Block("query_to_query", q, q if guided else Q, gq, gq, grad_q,
                                         grad_q if guided else grad_Q),
        "doc_to_query": lambda: _Block("doc_to_query", p, Q, None, None, grad_p, grad_Q),
        "doc_to_doc": lambda: _Block("doc_to_doc", p, d[:P] if guided else d, gd[off:off + B] if guided else None,
                                     gd[:P] if guided else None, grad_p,
                                     None if grad_d is None else grad_d[:P] if guided else grad_d),
    }
    blocks = [make[k]() for k in options.directions]
    kp = kernel_params(options, layout, len(blocks))
    grad_scale = operand_grad_scale(abs(options.scale) / B)
    params = _scalars(acc, q.device, kp, grad_scale)
    constants = dict(HARDNESS=int(kp.hardness_mode), GUIDED=guided, HAS_IDS=ids is not None,
                     RELATIVE_MARGIN=bool(kp.margin_strategy), ACC=_acc_type(acc),
                     WIDEN=q.device.type == "cpu" and q.dtype == torch.bfloat16)
    return TiledOperands(acc, q, q_norm, d, d_norm, Q, Q_norm, gathered, guided, ids, gpos, grad_q, grad_d, grad_Q,
                         blocks, kp, grad_scale, params, constants)


def block_arguments(ops: TiledOperands, block: _Block, layout, options) -> tuple:
    """The arguments every tiled and fused-slab kernel of ``block`` starts with: operands (the guide's, ids and the
    guide's positive similarities: stand-ins when absent), scalars, strides, sizes, positions."""
    guide_rows = block.guide_rows if ops.guided else block.rows
    guide_cols = block.guide_cols if ops.guided else block.cols
    return (block.rows, block.cols, guide_rows, guide_cols, block.rows if ops.ids is None else ops.ids,
            guide_rows if ops.gpos is None else ops.gpos, ops.params, block.rows.stride(0), block.cols.stride(0),
            guide_rows.stride(0), guide_cols.stride(0), layout.rows, block.cols.size(0), layout.dim,
            guide_rows.size(1), layout.positives, options.offset, layout.own_query_offset)


def input_gradients(ops: TiledOperands, docs: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """The accumulated similarity gradients unscaled and taken through the normalisation: dL/d(queries, docs,
    all_queries), fp32/fp64 (None where not needed)."""
    unscale_(ops.grad_scale, ops.grad_q, ops.grad_d, ops.grad_Q)
    grad_queries = _normalized_backward_in_chunks_(ops.grad_q, ops.q, ops.q_norm)
    grad_docs = _normalized_backward_in_chunks_(ops.grad_d, ops.d, ops.d_norm).view(docs.shape)
    grad_all = _normalized_backward_in_chunks_(ops.grad_Q, ops.Q, ops.Q_norm) if ops.gathered else None
    return grad_queries, grad_docs, grad_all


def contrastive_tiled(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                      need_grad: bool):
    """The tiled strategy; returns what the slab (``fastcache.ops.contrastive.slab._slab``) returns: the loss (0-d, fp32 or fp64) and, when ``need_grad``,
    the gradients w.r.t. queries, docs and all_queries (fp32 or fp64; None where not needed)."""
    ops = tiled_operands(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, need_grad)
    acc, q, blocks, B = ops.acc, ops.q, ops.blocks, layout.rows

    def arguments(block: _Block) -> tuple:
        return block_arguments(ops, block, layout, options)

    # per block (KIND_CODES order) and row: maximum logit and sum of exp(logit - maximum); absent blocks -inf, 0
    maxima = torch.full((4, B), float("-inf"), dtype=acc, device=q.device)
    totals = torch.zeros((4, B), dtype=acc, device=q.device)
    pos_logit = torch.empty(B, dtype=acc, device=q.device)
    for block in blocks:
        kind = KIND_CODES[block.kind]
        kernels._tiled_logsumexp_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)](
            *arguments(block), maxima[kind], totals[kind], pos_logit, KIND=kind, **ops.constants)
    loss_rows, factors = torch.empty(B, dtype=acc, device=q.device), torch.empty_like(totals)
    kernels._tiled_partition_kernel[(triton.cdiv(B, PARTITION_BLOCK),)](
        maxima, totals, pos_logit, ops.params, loss_rows, factors, B, JOINT=ops.kp.joint, NUM_BLOCKS=len(blocks),
        BLOCK=PARTITION_BLOCK)
    loss = loss_rows.sum() / B
    if not need_grad:
        return loss, None, None, None
    fused_dq = "doc_to_query" in options.directions and not ops.gathered  # its gradient comes with query_to_doc's
    dq = KIND_CODES["doc_to_query"]
    filtered = ops.kp.filter_threshold > 0
    # each program's scratch (G' of a pass, the filter's tile flags) for any candidate configuration and launch
    candidates = [c.kwargs for c in BACKWARD_CONFIGS[q.element_size(), ops.guided]]
    programs = [triton.cdiv(max(B, *(block.cols.size(0) for block in blocks)), c["OWN"]) for c in candidates]
    scratch = torch.empty(max(n * c["OWN"] * c["PASS"] for n, c in zip(programs, candidates)), dtype=q.dtype,
                          device=q.device)
    flags = torch.empty(max(n * c["PASS"] // c["SWEPT"] for n, c in zip(programs, candidates)) if filtered else 1,
                        dtype=torch.int32, device=q.device)
    counts = []  # the gradient filter's [skipped, swept] tiles per program of each backward launch
    for block in blocks:
        kind = KIND_CODES[block.kind]
        if fused_dq and block.kind == "doc_to_query":
            continue
        for by_columns, out, owned in ((False, block.grad_rows, B), (True, block.grad_cols, block.cols.size(0))):
            count = torch.zeros((2, max(programs) if filtered else 1), dtype=torch.int32, device=q.device)
            counts.append(count)
            kernels._tiled_grad_kernel[lambda meta, owned=owned: (triton.cdiv(owned, meta["OWN"]),)](
                *arguments(block), maxima[kind], factors[kind], out, out.stride(0), maxima[dq], factors[dq],
                scratch, flags, count, count.stride(0), KIND=kind, **ops.constants, BY_COLUMNS=by_columns,
                WITH_DOC_TO_QUERY=fused_dq and block.kind == "query_to_doc", FILTER=filtered)
    if filtered and counting():  # (reads the counts back: a device sync)
        skipped, total = torch.stack([c.sum(1) for c in counts]).sum(0).tolist()
        record_filtered_tiles(skipped, total)
    return (loss, *input_gradients(ops, docs))
