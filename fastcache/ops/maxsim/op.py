"""The MaxSim contrastive op: :func:`maxsim_contrastive_loss` and :func:`maxsim_contrastive_loss_and_grad` (the
maths: fastcache/ops/maxsim/__init__.py), and :func:`loss_and_grads`, which checks the inputs, chooses the backend
and runs the primitives over document chunks. The top of the package: nothing below imports it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fastcache import _backend
from fastcache.ops._autograd_guard import refuse_functorch
from fastcache.ops.contrastive.autograd import PrecomputedGradLoss, one_pass
from fastcache.ops.maxsim.options import (
    EMPTY_DOCUMENT_SCORE,
    MaxSimOptions,
    check_inputs,
    compute_dtype,
)
from fastcache.ops.maxsim.primitives import available, primitives


class MaxSimLossAndGrad(NamedTuple):
    """What :func:`maxsim_contrastive_loss_and_grad` returns."""

    loss: Tensor
    grad_queries: Tensor
    grad_docs: Tensor


MAX_CHUNK_BYTES = 32 * 2**20  # larger chunks buy no speed: a chunk is already many GEMM tiles of every backend


def chunk_documents(B: int, Lq: int, columns: int, dtype: torch.dtype, memory_budget) -> int:
    """Documents per chunk: one chunk's token_max output (B·Lq maxima and int32 indices per document) within the
    budget and MAX_CHUNK_BYTES. (The weights are g expanded over the query tokens: a view; the cpu kernels read it
    by its strides.)"""
    per_document = B * Lq * (torch.finfo(compute_dtype(dtype)).bits // 8 + 4)
    workspace = min(_backend.memory_budget(memory_budget), MAX_CHUNK_BYTES)
    return max(1, min(columns, workspace // per_document))


def query_token_counts(queries: Tensor, query_mask: Tensor | None) -> Tensor:
    """n_b as sentence-transformers counts it (util/similarity.py _query_token_counts): the valid tokens, or without
    a mask the tokens with a non-zero embedding; at least 1."""
    valid = query_mask if query_mask is not None else (queries != 0).any(dim=-1)
    return valid.sum(dim=-1).clamp(min=1)


def loss_and_grads(queries, docs, _all_queries, _guide_queries, _guide_docs, _doc_ids, options: MaxSimOptions,
                   need_grad: bool, *, query_mask, doc_mask, backend, memory_budget, show_progress_bar):
    """(loss, dL/dqueries, dL/ddocs, None) in the compute dtype (the gradients None without ``need_grad``), in the
    calling convention of :class:`~fastcache.ops.contrastive.autograd.PrecomputedGradLoss` (the three unused
    slots are the contrastive op's all_queries, guides and ids; the masks come as settings: no gradient)."""
    layout = check_inputs(queries, docs, query_mask, doc_mask, options)
    token_max, token_grad = primitives(_backend.resolve_backend(queries.device, available(queries.device), backend))
    B, Lq, D, C, Ld = layout.B, layout.Lq, layout.D, layout.columns, layout.Ld
    dtype = compute_dtype(queries.dtype)
    q_mask = layout.query_mask
    if q_mask is None:
        q_mask = torch.ones(B, Lq, dtype=torch.bool, device=queries.device)
    d_mask = layout.doc_mask
    if d_mask is None:
        d_mask = torch.ones(C, Ld, dtype=torch.bool, device=queries.device)
    flat_docs = docs.reshape(C, Ld, D)
    chunk = chunk_documents(B, Lq, C, queries.dtype, memory_budget)
    starts = range(0, C, chunk)

    scores = torch.empty(B, C, dtype=dtype, device=queries.device)
    indices = []  # int32 [B, Lq, chunk] per chunk: kept for the backward rather than recomputed (a second GEMM)
    for c0 in tqdm(starts, desc="maxsim scores", leave=False, disable=not show_progress_bar):
        values, index = token_max(queries, q_mask, flat_docs[c0:c0 + chunk], d_mask[c0:c0 + chunk])
        scores[:, c0:c0 + chunk] = values.sum(dim=1)
        indices.append(index)
    scores.masked_fill_(~d_mask.any(dim=-1), EMPTY_DOCUMENT_SCORE)
    inverse_count = 1.0 / query_token_counts(queries, layout.query_mask).to(dtype).unsqueeze(1)
    if options.length_normalize:
        scores *= inverse_count
    logits = scores * options.scale
    rows = torch.arange(B, device=queries.device)
    labels = (options.offset + rows) * layout.N
    log_probabilities = torch.log_softmax(logits, dim=1)  # logits - max first: exact, as F.cross_entropy's
    loss = -log_probabilities[rows, labels].mean()
    if not need_grad:
        return loss, None, None, None

    grad_scores = log_probabilities.exp_()
    grad_scores[rows, labels] -= 1
    grad_scores *= options.scale / B
    if options.length_normalize:
        grad_scores *= inverse_count
    grad_queries = torch.zeros(B, Lq, D, dtype=dtype, device=queries.device)
    grad_docs = torch.empty(C, Ld, D, dtype=dtype, device=queries.device)
    for c0, index in tqdm(list(zip(starts, indices)), desc="maxsim gradients", leave=False,
                          disable=not show_progress_bar):
        n = index.size(2)
        weights = grad_scores[:, c0:c0 + n].unsqueeze(1).expand(B, Lq, n)
        chunk_grad_q, grad_docs[c0:c0 + n] = token_grad(weights, index, queries, flat_docs[c0:c0 + n])
        grad_queries += chunk_grad_q
    return loss, grad_queries, grad_docs.view(docs.shape), None


def _settings(query_mask, doc_mask, backend, memory_budget, show_progress_bar) -> dict:
    return {"query_mask": query_mask, "doc_mask": doc_mask, "backend": backend, "memory_budget": memory_budget,
            "show_progress_bar": bool(show_progress_bar)}


def maxsim_contrastive_loss(
    queries: Tensor,
    docs: Tensor,
    *,
    query_mask: Tensor | None = None,
    doc_mask: Tensor | None = None,
    scale: float = 1.0,
    length_normalize: bool = False,
    offset: int = 0,
    backend: str | None = None,
    memory_budget: int | str | None = None,
    show_progress_bar: bool = False,
) -> Tensor:
    """sentence-transformers' MultiVectorMultipleNegativesRankingLoss from token embeddings (ColBERT MaxSim scores,
    ``colbert_scores``, then cross-entropy), fused; differentiable w.r.t. ``queries`` and ``docs``.

    Args:
        queries: [B, Lq, D] the query token embeddings (this process's queries).
        docs: [G, N, Ld, D] document token embeddings in groups of N (query-major: document n of group j is score
            column j·N + n); the positive of query i is docs[offset + i, 0].
        query_mask, doc_mask: [B, Lq] and [G, N, Ld], bool or 0/1: the valid tokens (None: all valid). A query
            token outside its mask adds nothing; a document token outside it never wins a max; a document without
            a valid token scores EMPTY_DOCUMENT_SCORE (-1e9, before the normalisation) and gets no gradient.
        scale: logit = scale · score (1 / temperature); finite and non-zero.
        length_normalize: divide each score by the query's valid token count (MeanMaxSim).
        offset: group of query 0's positive (rank · B when the documents are gathered across devices).
        backend: "auto", "cpu", "torch" or "triton" (None reads FASTCACHE_BACKEND); an explicit choice that cannot
            run is an error.
        memory_budget: workspace bytes for one chunk of documents' token maxima and argmax indices, at most
            MAX_CHUNK_BYTES (32 MiB) used (None reads FASTCACHE_MEMORY_BUDGET, default 256 MiB); the indices of
            every chunk are kept for the backward (4·B·Lq·G·N bytes).
        show_progress_bar: tqdm bars over the document chunks.

    Returns: the mean loss over the B queries, a 0-d float32 tensor (float64 for float64 inputs).
    """
    refuse_functorch("fastcache.maxsim_contrastive_loss")
    options = MaxSimOptions(scale, length_normalize, offset)
    settings = _settings(query_mask, doc_mask, backend, memory_budget, show_progress_bar)
    return PrecomputedGradLoss.apply(loss_and_grads, options, settings, queries, docs, None, None, None, None)


def maxsim_contrastive_loss_and_grad(
    queries: Tensor,
    docs: Tensor,
    *,
    query_mask: Tensor | None = None,
    doc_mask: Tensor | None = None,
    scale: float = 1.0,
    length_normalize: bool = False,
    offset: int = 0,
    backend: str | None = None,
    memory_budget: int | str | None = None,
    show_progress_bar: bool = False,
) -> MaxSimLossAndGrad:
    """:func:`maxsim_contrastive_loss` and its gradients w.r.t. queries and docs in one pass, without an autograd
    graph (what gradient caching consumes). Same arguments; the gradients in the inputs' dtypes and shapes."""
    options = MaxSimOptions(scale, length_normalize, offset)
    settings = _settings(query_mask, doc_mask, backend, memory_budget, show_progress_bar)
    loss, grad_queries, grad_docs, _ = one_pass(loss_and_grads, options, settings, queries, docs, None, None, None,
                                                None)
    return MaxSimLossAndGrad(loss, grad_queries, grad_docs)
