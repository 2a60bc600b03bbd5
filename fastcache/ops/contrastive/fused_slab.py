"""The fused_slab strategy of the contrastive op (slab v2), the host side of fastcache/triton/contrastive_fused_slab.py
(algorithm, bytes per logit, precision: that module's docstring). NOT YET RUN ON A GPU; ``auto`` never picks it.

Rows in chunks (from the memory budget: one stored value per logit in the embeddings' dtype); per chunk and
direction the forward kernel, the partials merged here (O(rows·column tiles) values), the partition kernel of the
tiled strategy, then per direction the two backward kernels. The operands, the gradient accumulators and the
normalisation backward are the tiled strategy's (fastcache/ops/contrastive/tiled.py).

Kernels are decorated when fastcache.triton.contrastive is first imported: set TRITON_INTERPRET=1 before importing
this module to run them on CPU tensors.
"""

from __future__ import annotations

import torch
import triton

from fastcache import _backend
from fastcache.ops.contrastive.options import KIND_CODES
from fastcache.ops.contrastive.slab import chunk_rows
from fastcache.ops.contrastive.tiled import (
    block_arguments,
    input_gradients,
    tiled_operands,
)
from fastcache.triton import contrastive as kernels
from fastcache.triton import contrastive_fused_slab as fused_kernels
from fastcache.triton.contrastive import PARTITION_BLOCK

# by the embeddings' element size and guide: forward (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), backward (BLOCK_M
# own rows/columns, BLOCK_N dims, BLOCK_K reduction step, warps, stages); the backward's BLOCK_M and BLOCK_K divide
# the forward's BLOCK_N (one partial per row and forward column tile). sm_90a at the headline shape
# (bench/triton_compile.py; registers, shared memory): 16-bit forward 111-186, 96 KiB (guided, 64 rows: 164),
# backward 182-197, 97 KiB; fp32/fp64 64-194, at most 49 KiB; no spills (4 warps spilled 4 bytes at fp32)
FORWARD_TILES = {(2, False): (128, 128, 64, 8, 3), (2, True): (64, 128, 64, 8, 3),
                 **{(size, guided): (64, 64, 32, 8, 2) for size in (4, 8) for guided in (False, True)}}
BACKWARD_TILES = {2: (128, 128, 64, 8, 3), 4: (64, 64, 32, 8, 2), 8: (64, 64, 32, 8, 2)}
E_SCALE = {torch.float16: 2.0 ** 15}  # e·E_SCALE is stored (fp16: above its normal minimum down to 2^-29); else 1
ROW_ALIGN = 64  # the stored e's row stride, in elements
FORWARD_GROUP = 8  # row tiles a wave of forward programs takes across each column tile (L2 reuse)


def _merged(part_max, part_total):
    """Row statistics of a block from its [column tiles, rows] partials: the maximum m, the sum t of exp(logit - m)
    and each tile's exp(m_t - m) (0 for a fully masked tile)."""
    top = part_max.amax(0)
    weight = torch.exp(part_max - torch.where(top == float("-inf"), 0.0, top))
    return top, (part_total * weight).sum(0), weight


def _stored_logits(rows: int, columns: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The buffer of one block's stored e: rows × columns, the row stride rounded up to ROW_ALIGN elements."""
    return torch.empty(rows, triton.cdiv(columns, ROW_ALIGN) * ROW_ALIGN, dtype=dtype, device=device)


def contrastive_fused_slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                           need_grad: bool, chunk: int | None = None, memory_budget=None):
    """The fused_slab strategy; returns what the slab (``fastcache.ops.contrastive.slab._slab``) returns: the loss
    (0-d, fp32 or fp64) and, when ``need_grad``, the gradients w.r.t. queries, docs and all_queries (fp32 or fp64;
    None where not needed). ``chunk``: rows per chunk (default: what ``memory_budget`` allows)."""
    ops = tiled_operands(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, need_grad)
    q, B, device = ops.q, layout.rows, ops.q.device
    size = q.element_size()
    guide_dim = 0 if guide_queries is None else guide_queries.size(1)
    if chunk is None:
        chunk = chunk_rows(layout, options, ops.gathered, guide_dim, _backend.memory_budget(memory_budget), size,
                           cache_cap=False)
    fm, fn, fk, f_warps, f_stages = FORWARD_TILES[size, ops.guided]
    bm, bn, bk, b_warps, b_stages = BACKWARD_TILES[size]
    bn = min(bn, max(16, triton.next_power_of_2(layout.dim)))
    e_scale = E_SCALE.get(q.dtype, 1.0)
    stored = {block.kind: _stored_logits(chunk if need_grad else 0, block.cols.size(0), q.dtype, device)
              for block in ops.blocks}
    loss = torch.zeros((), dtype=ops.acc, device=device)
    for r0 in range(0, B, chunk):
        r1 = min(r0 + chunk, B)
        rows = r1 - r0
        # per block (KIND_CODES order) and row: maximum logit and sum of exp(logit - maximum); absent: -inf, 0
        maxima = torch.full((4, rows), float("-inf"), dtype=ops.acc, device=device)
        totals = torch.zeros((4, rows), dtype=ops.acc, device=device)
        pos_logit = torch.empty(rows, dtype=ops.acc, device=device)
        weights = {}
        for block in ops.blocks:
            kind = KIND_CODES[block.kind]
            tiles = triton.cdiv(block.cols.size(0), fn)
            part_max = torch.empty((tiles, rows), dtype=ops.acc, device=device)
            part_total = torch.empty_like(part_max)
            args = list(block_arguments(ops, block, layout, options))
            args[11] = r1  # n_rows: the chunk's end
            e = stored[block.kind]
            fused_kernels._fused_logits_kernel[(tiles * triton.cdiv(rows, fm),)](
                *args, r0, e, e.stride(0), part_max, part_total, part_max.stride(0), pos_logit, KIND=kind,
                **ops.constants, BLOCK_M=fm, BLOCK_N=fn, BLOCK_K=fk, GROUP_M=FORWARD_GROUP, STORE=need_grad,
                E_SCALE=e_scale,
                num_warps=f_warps, num_stages=f_stages)
            maxima[kind], totals[kind], weights[block.kind] = _merged(part_max, part_total)
        loss_rows, factors = torch.empty(rows, dtype=ops.acc, device=device), torch.empty_like(totals)
        kernels._tiled_partition_kernel[(triton.cdiv(rows, PARTITION_BLOCK),)](
            maxima, totals, pos_logit, ops.params, loss_rows, factors, rows, JOINT=ops.kp.joint,
            NUM_BLOCKS=len(ops.blocks), BLOCK=PARTITION_BLOCK)
        loss += loss_rows.sum()
        if not need_grad:
            continue
        for block in ops.blocks:
            kind = KIND_CODES[block.kind]
            w = weights[block.kind] * (factors[kind] / e_scale)  # [forward column tiles, rows]
            e = stored[block.kind]
            n_cols = block.cols.size(0)
            for by_columns, out, owned in ((False, block.grad_rows, rows), (True, block.grad_cols, n_cols)):
                fused_kernels._fused_grad_kernel[(triton.cdiv(layout.dim, bn), triton.cdiv(owned, bm))](
                    e, e.stride(0), w, w.stride(0), block.rows, block.cols, block.rows.stride(0),
                    block.cols.stride(0), out, out.stride(0), ops.params, r1, n_cols, layout.dim, r0, options.offset,
                    KIND=kind, BY_COLUMNS=by_columns, FORWARD_N=fn, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                    ACC=ops.constants["ACC"], WIDEN=ops.constants["WIDEN"], num_warps=b_warps, num_stages=b_stages)
    loss = loss / B
    if not need_grad:
        return loss, None, None, None
    return (loss, *input_gradients(ops, docs))
