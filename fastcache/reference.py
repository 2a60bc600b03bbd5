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


# ---- learning-to-rank (fastcache.ops.ranking): dense, may build [Q, n, n]; padding (mask False) ignored ----

def _ranking_inputs(logits: Tensor, labels: Tensor, mask: Tensor | None):
    """Float copies of the inputs with padding neutralised (NaN-filled padding must not reach the maths)."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    mask = torch.ones_like(logits, dtype=torch.bool) if mask is None else mask
    logits = logits.to(dtype).masked_fill(~mask, 0.0)
    labels = labels.to(dtype).masked_fill(~mask, float("-inf"))
    return logits, labels, mask


def _sorted_by(key: Tensor, mask: Tensor) -> Tensor:
    """Per row, the indices that sort valid entries by ``key`` descending (ties by position), padding last."""
    order = key.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    return order.gather(1, mask.gather(1, order).to(torch.int8).sort(dim=1, descending=True, stable=True).indices)


def lambda_loss_reference(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, weighting="ndcg_loss2pp",
                          mu: float = 10.0, k: int | None = None, sigma: float = 1.0, eps: float = 1e-10,
                          reduction_log: str = "binary") -> Tensor:
    """LambdaLoss as sentence-transformers writes it (pair tensors [Q, n, n]); no valid pair gives 0. Its gains
    take 2^y as written: finite for labels below 128 (float32 logits) or 1024 (float64); the op's are exact past
    that too (tests/test_ranking_edge_cases.py)."""
    logits, labels, mask = _ranking_inputs(logits, labels, mask)
    Q, n = logits.shape
    order = _sorted_by(logits.detach(), mask)
    s = logits.gather(1, order)
    y = labels.gather(1, order)
    valid_sorted = mask.gather(1, order)
    kk = n if k is None else min(k, n)
    position = torch.arange(n, device=logits.device)
    discount = torch.log2(position.to(s.dtype) + 2.0)
    ideal = labels.sort(dim=1, descending=True).values.clamp(min=0.0)
    max_dcg = ((2.0 ** ideal - 1.0) / discount)[:, :kk].sum(dim=1).clamp(min=eps)
    gain = (2.0 ** y.clamp(min=0.0) - 1.0) / max_dcg[:, None]
    gain_diff = (gain[:, :, None] - gain[:, None, :]).abs()
    rank_diff = (position[:, None] - position[None, :]).abs()
    delta = (1.0 / torch.log2(rank_diff.to(s.dtype) + 1.0) - 1.0 / torch.log2(rank_diff.to(s.dtype) + 2.0)).abs()
    delta = delta.masked_fill(rank_diff == 0, 0.0)
    lambdarank = (1.0 / discount[:, None] - 1.0 / discount[None, :]).abs() * gain_diff
    weights = {
        "none": torch.ones_like(gain_diff),
        "ndcg_loss1": (gain / discount)[:, :, None].expand(Q, n, n),
        "ndcg_loss2": delta * gain_diff,
        "lambdarank": lambdarank,
        "ndcg_loss2pp": mu * delta * gain_diff + lambdarank,
    }[weighting or "none"]
    finite = torch.isfinite(y) & valid_sorted
    pairs = finite[:, :, None] & finite[:, None, :]
    if weighting != "ndcg_loss1":
        pairs = pairs & (y[:, :, None] > y[:, None, :])
    pairs = pairs & (position[:, None] < kk) & (position[None, :] < kk)
    diffs = (s[:, :, None] - s[:, None, :]).clamp(min=-1e8, max=1e8)
    probas = (torch.sigmoid(sigma * diffs).clamp(min=eps) ** weights).clamp(min=eps)
    losses = torch.log(probas) if reduction_log == "natural" else torch.log2(probas)
    if not pairs.any():
        return (logits * 0.0).sum()
    return -losses[pairs].mean()


def plistmle_reference(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *,
                       position_weights: Tensor | None = None, respect_input_order: bool = True,
                       eps: float = 1e-10) -> Tensor:
    """Position-aware ListMLE: mean over rows of -sum_r w_r (s_r - log(sum_{t>=r} exp(s_t) + eps)), documents in
    input order or sorted by label (descending, ties by position); w_r weighs rank r among the row's valid ones."""
    logits, labels, mask = _ranking_inputs(logits, labels, mask)
    Q, n = logits.shape
    if respect_input_order:  # valid documents first, in input order
        order = mask.to(torch.int8).sort(dim=1, descending=True, stable=True).indices
    else:
        order = _sorted_by(labels, mask)
    s = logits.gather(1, order)
    valid = mask.gather(1, order)
    scores = torch.where(valid, s.exp(), torch.zeros_like(s))
    suffix = scores.flip(1).cumsum(1).flip(1)
    log_probs = s - torch.log(suffix + eps)
    if position_weights is not None:
        w = position_weights.to(s.dtype).expand(Q, n)
        log_probs = log_probs * w
    log_probs = torch.where(valid, log_probs, torch.zeros_like(log_probs))
    return -log_probs.sum(dim=1).mean()


def listnet_reference(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """ListNet: mean over rows of the cross-entropy between softmax(labels) and softmax(logits) over valid
    documents (a -inf label has probability 0; an all-padding row contributes 0)."""
    logits, labels, mask = _ranking_inputs(logits, labels, mask)
    s = logits.masked_fill(~mask, float("-inf"))
    s = torch.where(mask.any(dim=1, keepdim=True), s, torch.zeros_like(s))  # all-padding rows: no NaN softmax
    target = torch.softmax(labels, dim=1).nan_to_num(nan=0.0)
    log_p = torch.log_softmax(s, dim=1)
    return -torch.where(target > 0, target * log_p, torch.zeros_like(log_p)).sum(dim=1).mean()
