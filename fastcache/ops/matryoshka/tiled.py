"""The tiled strategy of the Matryoshka op: the host side of fastcache/triton/matryoshka.py's kernels (their algorithm,
FLOPs and memory are in that module's docstring): the raw operands with their prefix-norm reciprocals, the per-dim
parameters, the launches, then the prefix-norm backward (fastcache/ops/matryoshka/slab.py's helpers).

Kernels are decorated when fastcache.triton is first imported: set TRITON_INTERPRET=1 before importing this module
to run them on CPU tensors.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
from torch import Tensor

from fastcache.ops.contrastive.normalize import guide_and_id_operands
from fastcache.ops.contrastive.options import KIND_CODES, kernel_params
from fastcache.ops.matryoshka.slab import _prefix_norm_backward_in_chunks_, _prefix_norms, segment_grad_scale
from fastcache.triton import matryoshka as kernels
from fastcache.triton.contrastive import PARTITION_BLOCK, _acc_type, _scalars
from fastcache.triton.matryoshka import BACKWARD_CONFIGS


class _Operand(NamedTuple):
    """One embedding tensor as the kernels see it: raw values (unit stride along D, input dtype), [K, n]
    prefix-norm reciprocals (dims ascending; None for "dot"), the gradient accumulator and the [K, n] radial
    sums."""

    x: Tensor
    reciprocal: Tensor | None
    grad: Tensor | None
    radial: Tensor | None

    def rows(self, start: int, stop: int | None = None) -> _Operand:
        return _Operand(*(None if t is None else t[start:stop] if i in (0, 2) else t[:, start:stop]
                          for i, t in enumerate(self)))


class _Block(NamedTuple):
    """One direction: its row and column operands and the guide's rows and columns."""

    kind: str
    rows: _Operand
    cols: _Operand
    guide_rows: Tensor | None
    guide_cols: Tensor | None


def _unit_stride(x: Tensor) -> Tensor:
    """x itself where its values are adjacent along D (the kernels take its row stride), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def matryoshka_tiled(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                     dims: tuple[int, ...], weights: tuple[float, ...], need_grad: bool):
    """The tiled strategy of the Matryoshka op (dims descending, as check_dims returns them); returns what the
    slab returns: the weighted loss (0-d, fp32 or fp64) and, when ``need_grad``, the gradients w.r.t. queries,
    docs and all_queries (fp32 or fp64; None where not needed)."""
    acc = torch.float64 if queries.dtype == torch.float64 else torch.float32
    cosine = options.similarity == "cos"
    B, P, off, K = layout.rows, layout.positives, options.offset, len(dims)
    device = queries.device
    gathered = all_queries is not None
    tensors = {"q": _unit_stride(queries), "d": _unit_stride(docs.reshape(-1, layout.dim))}
    if gathered:
        tensors["Q"] = _unit_stride(all_queries)
    norms = {name: _prefix_norms(x, dims, acc) for name, x in tensors.items()} if cosine else {}
    operands = {name: _Operand(x, norms[name][1].flip(0).contiguous() if cosine else None,
                               torch.zeros(x.shape, dtype=acc, device=device) if need_grad else None,
                               torch.zeros(K, x.size(0), dtype=acc, device=device) if need_grad and cosine else None)
                for name, x in tensors.items()}
    q, d = operands["q"], operands["d"]
    Q = operands.get("Q", q)
    p = d.rows(off, off + B)
    guided = guide_queries is not None
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, acc)
    gpos = torch.linalg.vecdot(gq, gd[off:off + B]) if guided else None
    make = {
        "query_to_doc": lambda: _Block("query_to_doc", q, d, gq, gd),
        "query_to_query": lambda: _Block("query_to_query", q, q if guided else Q, gq, gq),
        "doc_to_query": lambda: _Block("doc_to_query", p, Q, None, None),
        "doc_to_doc": lambda: _Block("doc_to_doc", p, d.rows(0, P) if guided else d,
                                     gd[off:off + B] if guided else None, gd[:P] if guided else None),
    }
    blocks = [make[k]() for k in options.directions]
    kp = kernel_params(options, layout, len(blocks))
    joint = kp.joint
    ascending = torch.tensor(dims[::-1], dtype=torch.int32).to(device)
    weights_ascending = weights[::-1]
    grad_scale = segment_grad_scale(norms, weights, options.scale, B)  # M_k is bounded like the slab's A_k
    params = torch.stack([_scalars(acc, device, kp, grad_scale, w) for w in weights_ascending])
    constants = dict(HARDNESS=int(kp.hardness_mode), GUIDED=guided,
                     HAS_IDS=ids is not None, RELATIVE_MARGIN=bool(kp.margin_strategy), COSINE=cosine,
                     DIMS=max(2, triton.next_power_of_2(K)),
                     ACC=_acc_type(acc), WIDEN=device.type == "cpu" and queries.dtype == torch.bfloat16)

    def arguments(block: _Block) -> tuple:
        rows, cols = block.rows, block.cols
        guide_rows = block.guide_rows if guided else rows.x
        guide_cols = block.guide_cols if guided else cols.x
        row_norms = rows.reciprocal if cosine else rows.x
        col_norms = cols.reciprocal if cosine else cols.x
        return (rows.x, cols.x, guide_rows, guide_cols, rows.x if ids is None else ids,
                guide_rows if gpos is None else gpos, params, ascending, row_norms, col_norms, rows.x.stride(0),
                cols.x.stride(0), guide_rows.stride(0), guide_cols.stride(0), row_norms.stride(0),
                col_norms.stride(0))

    def sizes(block: _Block) -> tuple:
        return B, block.cols.x.size(0), dims[0]

    common = (guide_queries.size(1) if guided else 0, P, off, layout.own_query_offset)
    # per dim (ascending), block (KIND_CODES order) and row: maximum logit, sum of exp(logit - maximum), the
    # positive's logit (kind 0 only); absent blocks -inf, 0
    maxima = torch.full((K, 4, B), float("-inf"), dtype=acc, device=device)
    totals = torch.zeros((K, 4, B), dtype=acc, device=device)
    pos_logits = torch.empty((K, 4, B), dtype=acc, device=device)
    for block in blocks:
        kind = KIND_CODES[block.kind]
        kernels._matryoshka_logsumexp_kernel[lambda meta: (triton.cdiv(B, meta["BLOCK_M"]),)](
            *arguments(block), *sizes(block), K, *common, maxima[0, kind], totals[0, kind], pos_logits[0, 0],
            maxima.stride(0), KIND=kind, **constants)
    loss_rows, factors = torch.empty((K, B), dtype=acc, device=device), torch.empty_like(totals)
    for k in range(K):
        kernels._tiled_partition_kernel[(triton.cdiv(B, PARTITION_BLOCK),)](
            maxima[k], totals[k], pos_logits[k, 0], params[k], loss_rows[k], factors[k], B, JOINT=joint,
            NUM_BLOCKS=len(blocks), BLOCK=PARTITION_BLOCK)
    loss = (loss_rows.sum(1) * torch.tensor(weights_ascending, dtype=acc, device=device)).sum() / B
    if not need_grad:
        return loss, None, None, None
    # each program's scratch, for any candidate configuration: the K - 1 fp32 H_k of a tile and the K M'_k of a
    # pass (the embeddings' dtype)
    candidates = [c.kwargs for c in BACKWARD_CONFIGS[queries.element_size(), guided]]
    owned = max(x.size(0) for x in tensors.values())
    tile_scratch = torch.empty(max(1, max(-(-owned // c["OWN"]) * (K - 1) * c["OWN"] * c["SWEPT"]
                                          for c in candidates)), dtype=acc, device=device)
    scratch = torch.empty(max(-(-owned // c["OWN"]) * K * c["OWN"] * c["PASS"] for c in candidates),
                          dtype=queries.dtype, device=device)
    fused_dq = "doc_to_query" in options.directions and not gathered  # its gradient comes with query_to_doc's
    dq = KIND_CODES["doc_to_query"]
    for block in blocks:
        kind = KIND_CODES[block.kind]
        if fused_dq and block.kind == "doc_to_query":
            continue
        for by_columns, side in ((False, block.rows), (True, block.cols)):
            radial = side.radial if cosine else side.grad
            kernels._matryoshka_grad_kernel[lambda meta, n=side.x.size(0): (triton.cdiv(n, meta["OWN"]),)](
                *arguments(block), params.stride(0), *sizes(block), K, *common, maxima[0, kind], factors[0, kind],
                maxima.stride(0), side.grad, side.grad.stride(0), radial, radial.stride(0), maxima[0, dq],
                factors[0, dq], tile_scratch, scratch, KIND=kind, **constants, BY_COLUMNS=by_columns,
                WITH_DOC_TO_QUERY=fused_dq and block.kind == "query_to_doc")
    grads = {}
    for name, operand in operands.items():
        grads[name] = operand.grad.div_(grad_scale)
        if cosine:
            _prefix_norm_backward_in_chunks_(operand.grad, operand.x, dims, norms[name], operand.radial.flip(0))
    return loss, grads["q"], grads["d"].view(docs.shape), grads["Q"] if gathered else None
