"""Plain-PyTorch dense references (the test oracles): every op written as the maths, through autograd.

They build the full similarity matrices, so they are for tests and small batches only. Self-contained: nothing of
fastcache.ops is imported, the input checks included (they refuse what the ops refuse, with the same messages, but
are written out here on their own).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
_HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _is_finite_number(x) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _contrastive_options(scale=20.0, similarity="cos", directions=("query_to_doc",), partition_mode="joint",
                         hardness_mode=None, hardness_strength=0.0, offset=0, margin=0.0,
                         margin_strategy="absolute") -> SimpleNamespace:
    """The options of :func:`contrastive_loss_reference` (the defaults and rules of fastcache.contrastive_loss)."""
    if isinstance(directions, str):
        raise ValueError(f"directions must be a tuple of direction names, got the string {directions!r}")
    directions = tuple(directions)
    if not _is_finite_number(scale) or scale == 0:
        raise ValueError(f"scale must be a finite non-zero number, got {scale!r}")
    if similarity not in ("cos", "dot"):
        raise ValueError(f"similarity must be one of ('cos', 'dot'), got {similarity!r}")
    unknown = [d for d in directions if d not in _DIRECTIONS]
    if unknown:
        raise ValueError(f"directions: unknown {unknown}; valid directions are {_DIRECTIONS}")
    if len(set(directions)) != len(directions):
        raise ValueError(f"directions must not repeat a direction, got {directions}")
    if "query_to_doc" not in directions:
        raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
    if partition_mode not in ("joint", "per_direction"):
        raise ValueError(f"partition_mode must be one of ('joint', 'per_direction'), got {partition_mode!r}")
    if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
        raise ValueError("partition_mode='per_direction' needs every direction to contain the positive pair")
    if hardness_mode not in _HARDNESS_MODES:
        raise ValueError(f"hardness_mode must be one of {_HARDNESS_MODES}, got {hardness_mode!r}")
    if not _is_finite_number(hardness_strength) or hardness_strength < 0:
        raise ValueError(f"hardness_strength must be a finite non-negative number, got {hardness_strength!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"offset must be a non-negative int, got {offset!r}")
    if not _is_finite_number(margin):
        raise ValueError(f"margin must be a finite number, got {margin!r}")
    if margin_strategy not in ("absolute", "relative"):
        raise ValueError(f"margin_strategy must be one of ('absolute', 'relative'), got {margin_strategy!r}")
    return SimpleNamespace(scale=scale, similarity=similarity, directions=directions, partition_mode=partition_mode,
                           hardness_mode=hardness_mode, hardness_strength=hardness_strength, offset=offset,
                           margin=margin, margin_strategy=margin_strategy,
                           hardness=hardness_mode is not None and hardness_strength > 0)


def _check_tensor(name: str, t, ndims: tuple[int, ...]) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device.type == "meta":
        raise ValueError(f"{name} must be on a real device (cpu or cuda), got meta: the reference reads its values")
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def _layout(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, opts) -> SimpleNamespace:
    """The inputs checked against each other and the options: rows B, positives P, dim D, own query offset."""
    _check_tensor("queries", queries, (2,))
    _check_tensor("docs", docs, (2, 3))
    rows, dim = queries.shape
    if all_queries is not None:
        _check_tensor("all_queries", all_queries, (2,))
        if all_queries.size(1) != dim:
            raise ValueError(f"all_queries has {all_queries.size(1)} dims, queries have {dim}")
    if docs.size(-1) != dim:
        raise ValueError(f"docs have {docs.size(-1)} dims, queries have {dim}")
    if docs.dim() == 3:
        positives = docs.size(1)
        if all_queries is not None and all_queries.size(0) != positives:
            raise ValueError(f"all_queries has {all_queries.size(0)} rows, docs have {positives} positives")
    else:
        positives = all_queries.size(0) if all_queries is not None else rows
        if docs.size(0) % positives:
            raise ValueError(f"docs has {docs.size(0)} rows, which is not a multiple of the {positives} positives "
                             f"({'rows of all_queries' if all_queries is not None else 'queries'})")
    if opts.offset + rows > positives:
        raise ValueError(f"offset={opts.offset} with {rows} queries needs {opts.offset + rows} positives, docs have "
                         f"{positives}")
    tensors = [queries, docs, all_queries, doc_ids]
    if guide_queries is not None or guide_docs is not None:
        if guide_queries is None or guide_docs is None:
            raise ValueError("guide_queries and guide_docs must be given together")
        _check_tensor("guide_queries", guide_queries, (2,))
        _check_tensor("guide_docs", guide_docs, (2, 3))
        if guide_queries.size(0) != rows:
            raise ValueError(f"guide_queries has {guide_queries.size(0)} rows, queries have {rows}")
        if guide_docs.shape[:-1] != docs.shape[:-1]:
            raise ValueError(f"guide_docs must be laid out like docs: {tuple(docs.shape[:-1])}, got "
                             f"{tuple(guide_docs.shape[:-1])}")
        if guide_docs.size(-1) != guide_queries.size(1):
            raise ValueError(f"guide_docs have {guide_docs.size(-1)} dims, guide_queries {guide_queries.size(1)}")
        if "doc_to_query" in opts.directions:
            raise ValueError("directions: 'doc_to_query' has no guided (GIST) form; drop it or the guide")
        if all_queries is not None:
            raise ValueError("all_queries cannot be combined with a guide (the guided query_to_query block is "
                             "anchor-anchor over the local queries)")
        tensors += [guide_queries, guide_docs]
    if doc_ids is not None:
        if not isinstance(doc_ids, Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex \
                or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor, got {getattr(doc_ids, 'dtype', type(doc_ids))}")
        if doc_ids.shape != docs.shape[:-1]:
            raise ValueError(f"doc_ids must have one id per candidate, shape {tuple(docs.shape[:-1])}; got "
                             f"{tuple(doc_ids.shape)}")
    if len({t.device for t in tensors if t is not None}) > 1:
        raise ValueError("all tensors must be on one device")
    if len({t.dtype for t in (queries, docs, all_queries) if t is not None}) > 1:
        raise ValueError("queries, docs and all_queries must share a dtype")
    return SimpleNamespace(rows=rows, positives=positives, dim=dim,
                           own_query_offset=opts.offset if all_queries is not None else 0)


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
    opts = _contrastive_options(**options)
    layout = _layout(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, opts)
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

def maxsim_contrastive_loss_reference(queries: Tensor, docs: Tensor, *, query_mask: Tensor | None = None,
                                      doc_mask: Tensor | None = None, scale: float = 1.0,
                                      length_normalize: bool = False, offset: int = 0) -> Tensor:
    """fastcache.maxsim_contrastive_loss written out: the (B, G·N, Lq, Ld) token products in one einsum (float64
    for float64 inputs, else float32), the max over the valid document tokens, the sum over the valid query tokens,
    -1e9 for documents without a valid token, the optional division by the query's token count (the mask's sum, or
    the non-zero token rows; at least 1), then cross-entropy of scale · scores against column (offset + i) · N.
    Masked tokens are zeroed before the product, so that a NaN they hold reaches neither the loss nor a gradient."""
    B, Lq, D = queries.shape
    G, N, Ld, _ = docs.shape
    if offset + B > G:
        raise ValueError(f"offset + B must be at most G (the positive of query i is group offset + i): offset="
                         f"{offset}, B={B}, G={G}")
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    q_valid = torch.ones(B, Lq, dtype=torch.bool, device=queries.device) if query_mask is None else query_mask.bool()
    d_valid = (torch.ones(G, N, Ld, dtype=torch.bool, device=docs.device) if doc_mask is None else doc_mask.bool()).reshape(G * N, Ld)
    q = torch.where(q_valid.unsqueeze(-1), queries, 0).to(dtype)
    d = torch.where(d_valid.unsqueeze(-1), docs.reshape(G * N, Ld, D), 0).to(dtype)
    products = torch.einsum("btd,cud->bctu", q, d).masked_fill(~d_valid[None, :, None, :], float("-inf"))
    token_max = products.max(dim=-1).values if Ld > 0 else products.sum(dim=-1)  # Ld = 0: every document empty
    scores = torch.where(q_valid.unsqueeze(1), token_max, 0).sum(dim=-1)
    scores = scores.masked_fill(~d_valid.any(dim=-1), -1e9)
    if length_normalize:
        valid = q_valid if query_mask is not None else (queries != 0).any(dim=-1)
        scores = scores / valid.sum(dim=-1).clamp(min=1).unsqueeze(1)
    labels = (offset + torch.arange(B, device=queries.device)) * N
    return F.cross_entropy(scale * scores, labels)


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
    that too (tests/ranking/test_ranking_edge_cases.py)."""
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
