"""The two MaxSim primitives, the backend interface of the op (every backend implements this contract):

``token_max(queries [B, Lq, D], query_mask [B, Lq] bool, docs [C, Ld, D], doc_mask [C, Ld] bool)``
    -> (values [B, Lq, C], index int32 [B, Lq, C]): values[b,t,c] = max over the valid tokens u of document c of
    dot(q[b,t], d[c,u]), accumulated in the compute dtype (float32; float64 for float64 inputs), index the u attaining
    it, ties to the lowest u (torch.max's rule, so the gradient routes as sentence-transformers' does); 0 and -1
    where query token (b,t) is masked or document c has no valid token. Masked tokens are never read into a result.
``token_grad(weights [B, Lq, C], index int32 [B, Lq, C], queries, docs)``
    -> (grad_queries [B, Lq, D], grad_docs [C, Ld, D]) in the weights' dtype: grad_q[b,t] = Σ_{c: index≥0}
    w[b,t,c]·d[c, index[b,t,c]], grad_d[c,u] = Σ_{(b,t): index[b,t,c]=u} w[b,t,c]·q[b,t]; entries with index -1
    read nothing.

Backends: ``cpu`` (csrc/cpu/maxsim.cpp: per document chunk one BLAS GEMM of the valid query tokens against the
chunk's valid tokens, a fused max/argmax; the gather/scatter parallel over query tokens and over documents),
``torch`` (below: the same in PyTorch, in tiles of at most TORCH_TILE_BYTES) and ``triton``
(fastcache/triton/maxsim.py, when present). Imports only the options below it.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import Tensor

from fastcache import _backend
from fastcache.ops.maxsim.options import compute_dtype

TORCH_TILE_BYTES = 32 * 2**20  # the torch backend's largest temporary: a [B·Lq, docs, Ld] product tile


def _tile_docs(per_doc_bytes: int) -> int:
    return max(1, TORCH_TILE_BYTES // max(per_doc_bytes, 1))


def token_max_torch(queries: Tensor, query_mask: Tensor, docs: Tensor, doc_mask: Tensor) -> tuple[Tensor, Tensor]:
    """token_max in PyTorch: masked tokens replaced by 0 before the product (a NaN they hold is never read), masked
    document tokens at -inf for the max, documents in tiles of TORCH_TILE_BYTES."""
    dtype = compute_dtype(queries.dtype)
    B, Lq, D = queries.shape
    C, Ld = docs.shape[:2]
    values = torch.zeros(B, Lq, C, dtype=dtype, device=queries.device)
    index = torch.full((B, Lq, C), -1, dtype=torch.int32, device=queries.device)
    if C == 0 or Ld == 0:
        return values, index
    q = torch.where(query_mask.unsqueeze(-1), queries, 0).to(dtype).reshape(B * Lq, D)
    tile = _tile_docs(B * Lq * Ld * q.element_size())
    for c0 in range(0, C, tile):
        c1 = min(c0 + tile, C)
        mask = doc_mask[c0:c1]
        d = torch.where(mask.unsqueeze(-1), docs[c0:c1], 0).to(dtype).reshape(-1, D)
        products = (q @ d.T).view(B * Lq, c1 - c0, Ld).masked_fill_(~mask, float("-inf"))
        best, arg = products.max(dim=-1)
        found = query_mask.reshape(B * Lq, 1) & mask.any(dim=-1)
        values[..., c0:c1] = torch.where(found, best, 0).view(B, Lq, c1 - c0)
        index[..., c0:c1] = torch.where(found, arg, -1).view(B, Lq, c1 - c0).to(torch.int32)
    return values, index


def token_grad_torch(weights: Tensor, index: Tensor, queries: Tensor, docs: Tensor) -> tuple[Tensor, Tensor]:
    """token_grad in PyTorch: the (b, t, c) with index ≥ 0 gathered, their rows accumulated with index_put_, in
    tiles of documents of at most TORCH_TILE_BYTES of gathered rows."""
    dtype = weights.dtype
    B, Lq, D = queries.shape
    C, Ld = docs.shape[:2]
    grad_q = torch.zeros(B, Lq, D, dtype=dtype, device=queries.device)
    grad_d = torch.zeros(C, Ld, D, dtype=dtype, device=queries.device)
    tile = _tile_docs(2 * B * Lq * D * weights.element_size())
    for c0 in range(0, C, tile):
        b, t, c = (index[..., c0:c0 + tile] >= 0).nonzero(as_tuple=True)
        c = c + c0
        u = index[b, t, c].long()
        w = weights[b, t, c].unsqueeze(-1)
        grad_q.index_put_((b, t), w * docs[c, u].to(dtype), accumulate=True)
        grad_d.index_put_((c, u), w * queries[b, t].to(dtype), accumulate=True)
    return grad_q, grad_d


def _triton_module():
    """fastcache.triton.maxsim (the Triton kernels of this contract), or None while it does not exist."""
    if importlib.util.find_spec("fastcache.triton.maxsim") is None:
        return None
    from fastcache.triton import maxsim

    return maxsim


def available(device: torch.device) -> dict[str, str | None]:
    """Each backend of the primitives: None when it can run tensors on ``device``, else why not."""
    triton = _backend.triton_kernel_status(device)
    if triton is None and _triton_module() is None:
        triton = "fastcache.triton.maxsim is not available"
    cpu = _backend.cpu_kernel_status(device)
    if cpu is None and not hasattr(_backend.EXTENSION, "maxsim_token_max_cpu"):
        cpu = "fastcache._C was built before the MaxSim kernels (rebuild the extension)"
    return {"cpu": cpu, "torch": None, "triton": triton}


def primitives(name: str):
    """(token_max, token_grad) of backend ``name`` (one :func:`available` says can run)."""
    if name == "cpu":
        return _backend.EXTENSION.maxsim_token_max_cpu, _backend.EXTENSION.maxsim_token_grad_cpu
    if name == "triton":
        module = _triton_module()
        return module.token_max, module.token_grad
    return token_max_torch, token_grad_torch
