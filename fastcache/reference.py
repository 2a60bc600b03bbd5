"""Plain-PyTorch dense references (the test oracles): every op written as the maths, through autograd.

They build the full similarity matrices, so they are for tests and small batches only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastcache.ops.contrastive import ContrastiveOptions, check_inputs


def _similarity(a: Tensor, b: Tensor, kind: str) -> Tensor:
    if kind == "cos":
        a, b = F.normalize(a, p=2, dim=1), F.normalize(b, p=2, dim=1)
    return a @ b.T


def contrastive_loss_reference(
    queries: Tensor,
    docs: Tensor,
    *,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> Tensor:
    """Dense :func:`fastcache.contrastive_loss`, computed in the inputs' dtype as sentence-transformers does."""
    opts = ContrastiveOptions(**options)
    layout = check_inputs(queries, docs, all_queries, guide_queries, guide_docs, opts, doc_ids)
    B, P = layout.rows, layout.positives
    docs = docs.reshape(-1, layout.dim)
    rows = torch.arange(B, device=queries.device)
    pos = opts.offset + rows  # each row's positive column
    query_columns = all_queries if all_queries is not None else queries
    own_query = layout.own_query_offset + rows
    positive_docs = docs[pos]
    guided = guide_queries is not None
    doc_doc_columns = docs[:P] if guided else docs
    sim = {"query_to_doc": _similarity(queries, docs, opts.similarity)}
    if "query_to_query" in opts.directions:
        sim["query_to_query"] = _similarity(queries, query_columns, opts.similarity)
    if "doc_to_query" in opts.directions:
        sim["doc_to_query"] = _similarity(query_columns, positive_docs, opts.similarity).T
    if "doc_to_doc" in opts.directions:
        sim["doc_to_doc"] = _similarity(positive_docs, doc_doc_columns, opts.similarity)

    masks = {k: torch.zeros_like(s, dtype=torch.bool) for k, s in sim.items()}
    if guided:
        guide_docs = guide_docs.reshape(-1, guide_docs.size(-1))
        guide_sim = {
            "query_to_doc": _similarity(guide_queries, guide_docs, "cos"),
            "query_to_query": _similarity(guide_queries, guide_queries, "cos"),
            "doc_to_doc": _similarity(guide_docs[pos], guide_docs[:P], "cos"),
        }
        guide_pos = guide_sim["query_to_doc"][rows, pos][:, None]
        if opts.margin_strategy == "absolute":
            threshold = guide_pos - opts.margin
        else:
            threshold = guide_pos - guide_pos.abs() * opts.margin
        for k in sim:
            masks[k] = guide_sim[k] > threshold
        masks["query_to_doc"][rows, pos] = False  # the positive is never masked
    else:
        if "query_to_query" in sim:
            masks["query_to_query"][rows, own_query] = True
        if "doc_to_doc" in sim:
            column_query = torch.arange(docs.size(0), device=docs.device) % P
            masks["doc_to_doc"] = column_query[None, :] == pos[:, None]

    if doc_ids is not None:  # duplicates of the row's positive are no negatives (the positive itself stays)
        doc_ids = doc_ids.reshape(-1)
        duplicate = doc_ids[None, :] == doc_ids[pos][:, None]
        masks["query_to_doc"] = masks["query_to_doc"] | duplicate
        masks["query_to_doc"][rows, pos] = False
        if "doc_to_doc" in sim:
            masks["doc_to_doc"] = masks["doc_to_doc"] | duplicate[:, :sim["doc_to_doc"].size(1)]

    logits = {k: (s * opts.scale).masked_fill(masks[k], float("-inf")) for k, s in sim.items()}
    if opts.hardness:
        column = torch.arange(docs.size(0), device=docs.device)[None, :]
        own = (column % P) == pos[:, None]
        penalised = {
            "in_batch_negatives": ~own,
            "hard_negatives": own & (column >= P),
            "all_negatives": column != pos[:, None],
        }[opts.hardness_mode]
        penalty = opts.hardness_strength * sim["query_to_doc"].detach() * penalised
        logits["query_to_doc"] = logits["query_to_doc"] + penalty

    positive = logits["query_to_doc"][rows, pos]
    if opts.partition_mode == "joint":
        log_partition = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
    else:
        log_partition = torch.stack([torch.logsumexp(x, dim=1) for x in logits.values()]).mean(dim=0)
    return (log_partition - positive).mean()


def matryoshka_contrastive_loss_reference(queries: Tensor, docs: Tensor, *, dims, weights=None,
                                          all_queries: Tensor | None = None, **kwargs) -> Tensor:
    """Dense :func:`fastcache.ops.matryoshka.matryoshka_contrastive_loss`: the weighted sum over the dims of
    :func:`contrastive_loss_reference` on the embeddings truncated to each dim (guides untouched)."""
    weights = [1.0] * len(dims) if weights is None else weights
    return sum(w * contrastive_loss_reference(
        queries[:, :d], docs[..., :d], all_queries=None if all_queries is None else all_queries[:, :d], **kwargs)
        for d, w in zip(dims, weights))
