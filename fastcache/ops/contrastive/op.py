"""The contrastive op: :func:`contrastive_loss` and :func:`contrastive_loss_and_grad` (the maths:
fastcache/ops/contrastive/__init__.py), and :func:`loss_and_grads`, which checks the inputs, chooses the strategy
(slab or tiled) and the backend, and runs them. The top of the package: nothing below imports it.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from fastcache import _backend
from fastcache.ops._autograd_guard import refuse_functorch
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.contrastive.autograd import PrecomputedGradLoss, one_pass
from fastcache.ops.contrastive.options import ContrastiveLossAndGrad, check_finite, check_inputs, parse_arguments
from fastcache.ops.contrastive.slab import DENSE_PRODUCTS, _slab, _slab_cpu, chunk_rows, slab_rows
from fastcache.ops.contrastive.sparse import SPARSE_PRODUCTS, sparse_enough

MIN_SLAB_ROWS = 256  # strategy auto on CUDA: a budget that holds fewer rows per chunk selects the tiled strategy


def _strategy(layout, options, gathered: bool, guide_dim: int, device: torch.device, available: Mapping, backend,
              strategy, memory_budget, chunk_size, sparse_inputs=None) -> tuple[str, str]:
    """(strategy, backend) for this call.

    ``tiled`` and ``fused_slab`` run Triton kernels: backend ``triton`` (``auto`` means triton here; anything
    else is an error); ``auto`` never picks fused_slab (not yet run on a GPU). ``sparse`` runs the compiled CPU
    products: CPU tensors, backend ``cpu`` (or auto). ``auto``: on CPU ``sparse`` when the cpu backend can run
    and ``sparse_inputs()`` (a callable, given by the single-dim op only) says the embeddings are sparse enough,
    else ``slab``; on CUDA, ``tiled`` when Triton can run, the backend allows it (auto or triton), no
    ``chunk_size`` is given and the memory budget holds fewer than MIN_SLAB_ROWS rows per chunk (nor the whole
    batch), else ``slab``."""
    requested = _backend.requested_strategy(strategy)
    asked = _backend.requested_backend(backend)
    if requested in _backend.STRATEGY_BACKENDS:
        needed, kernels = _backend.STRATEGY_BACKENDS[requested]
        if requested == "sparse" and device.type != "cpu":
            raise RuntimeError(f"strategy 'sparse' runs {kernels}: it needs CPU tensors, got tensors on "
                               f"{device.type} (use strategy 'slab' or 'auto' there)")
        if asked not in ("auto", needed):
            raise RuntimeError(f"strategy {requested!r} runs {kernels}: it needs backend {needed!r}, got {asked!r}")
        return requested, _backend.resolve_backend(device, available, needed)
    name = _backend.resolve_backend(device, available, asked)
    if requested == "auto" and name == "cpu" and sparse_inputs is not None and sparse_inputs():
        return "sparse", name
    if requested == "slab" or device.type == "cpu" or chunk_size is not None or asked not in ("auto", "triton") \
            or available["triton"] is not None:
        return "slab", name
    with warnings.catch_warnings():  # a short chunk is no warning here: it selects the tiled strategy
        warnings.simplefilter("ignore", RuntimeWarning)
        chunk = chunk_rows(layout, options, gathered, guide_dim, _backend.memory_budget(memory_budget), 4, 1,
                           cache_cap=False)
    if chunk < min(layout.rows, MIN_SLAB_ROWS):
        return "tiled", "triton"
    return "slab", name


def loss_and_grads(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, need_grad, *, backend,
                   strategy, memory_budget, chunk_size, show_progress_bar):
    """The loss (0-d, fp32 or fp64) and, when ``need_grad``, fp32/fp64 gradients w.r.t. queries, docs and
    all_queries (None where not needed): the inputs checked, a strategy and backend chosen, the strategy run."""
    layout = check_inputs(queries, docs, all_queries, guide_queries, guide_docs, options, doc_ids, finite=False)
    options = options.for_dtype(queries.dtype)  # filter_eps="auto": its value for the inputs' dtype
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    available = contrastive_epilogue.available(queries.device)
    guide_dim = 0 if guide_queries is None else guide_queries.size(1)
    # sparse embeddings (SPLADE's): auto's choice of the sparse products (not with the filter, which they lack)
    embeddings = [x for x in (queries, docs, all_queries) if x is not None]
    strategy, name = _strategy(layout, options, all_queries is not None, guide_dim, queries.device, available,
                               backend, strategy, memory_budget, chunk_size,
                               None if options.filter_eps is not None else lambda: sparse_enough(*embeddings))
    native = strategy == "slab" and name == "cpu" and not show_progress_bar  # one C++ call: _slab_cpu
    if not native:  # (the C++ call checks the embeddings it reads for NaN / Inf itself)
        check_finite(queries=queries, docs=docs, all_queries=all_queries)
    if strategy == "tiled":
        from fastcache.ops.contrastive.tiled import contrastive_tiled

        return contrastive_tiled(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                                 need_grad)
    if strategy == "fused_slab":
        if options.filter_eps is not None:
            raise ValueError(f"filter_eps={options.filter_eps!r}: strategy 'fused_slab' has no gradient filter; use "
                             "strategy 'slab' or 'tiled', or filter_eps=None")
        from fastcache.ops.contrastive.fused_slab import contrastive_fused_slab

        return contrastive_fused_slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                                      need_grad, None if chunk_size is None else min(chunk_size, layout.rows),
                                      memory_budget)
    if strategy == "sparse" and options.filter_eps is not None:
        raise ValueError(f"filter_eps={options.filter_eps!r}: strategy 'sparse' has no gradient filter; use strategy "
                         "'slab', or filter_eps=None")
    epilogue = contrastive_epilogue.EPILOGUES[name]
    if queries.device.type == "cuda" and _backend.requested_backend(backend) == "auto" and all(
            available[k] is None for k in contrastive_epilogue.GPU_EPILOGUES):
        epilogue = contrastive_epilogue.epilogue_fastest_gpu
    if chunk_size is None:
        chunk = slab_rows(layout, options, all_queries is not None, guide_dim, name, queries, memory_budget,
                          sparse=strategy == "sparse")
    else:
        chunk = min(chunk_size, layout.rows)
    if native:
        return _slab_cpu(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, need_grad,
                         chunk)
    return _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, epilogue,
                 need_grad, chunk, show_progress_bar, native=name == "cpu",
                 products=SPARSE_PRODUCTS if strategy == "sparse" else DENSE_PRODUCTS)


def contrastive_loss(
    queries: Tensor,
    docs: Tensor,
    *,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> Tensor:
    """The in-batch contrastive loss of sentence-transformers' MultipleNegativesRankingLoss (and GISTEmbedLoss
    with ``guide_*``), differentiable w.r.t. ``queries``, ``docs`` and ``all_queries``.

    Args:
        queries: [B, D] the loss rows (this process's anchors).
        docs: [N, D] candidates laid out column-major, N = C·P (all P positives, then each hard-negative
            column), or [C, P, D]. The positive of row i is docs[offset + i].
        all_queries: [P, D] every query of the gathered batch (``all_queries[offset + i]`` is ``queries[i]``);
            the columns of query_to_query and doc_to_query. Default: the queries themselves (P = B). Not checked
            against ``queries``: the two are separate inputs with separate gradients (in DDP the gathered copy
            and the local rows are different tensors; gradcheck and finite differences perturb them one at a
            time), so an equality check would refuse legitimate calls. With gather_across_devices the drop-in
            losses compute the offset from the rank themselves.
        guide_queries, guide_docs: guide-model embeddings laid out like ``queries`` and ``docs``: GIST
            false-negative masking (see the module docstring). Never differentiated.
        doc_ids: an integer per candidate, laid out like ``docs`` without the last dimension; candidates that
            share the id of a row's positive (duplicates, e.g. the same text) are not its negatives.

    Options (keywords, see :class:`ContrastiveOptions`):
        scale=20.0: logit = scale · similarity (1 / temperature); any finite non-zero number. A negative scale
            ranks the least similar candidates first; masked candidates are left out of the softmax either way
            (their logit is -inf after scaling).
        similarity="cos": "cos" (cosine, as sentence-transformers' cos_sim) or "dot".
        directions=("query_to_doc",): subset of query_to_doc (required), query_to_query, doc_to_query,
            doc_to_doc.
        partition_mode="joint": "joint" (one softmax over every direction) or "per_direction" (mean of the
            per-direction log-partitions).
        hardness_mode=None, hardness_strength=0.0: add hardness_strength · stopgrad(s) to the query_to_doc logits
            of in-batch negatives ("in_batch_negatives"), own hard negatives ("hard_negatives") or every negative
            ("all_negatives").
        offset=0: column of row 0's positive among the positives (rank · B when gathered across devices).
        margin=0.0, margin_strategy="absolute": the guide's false-negative margin, "absolute" or "relative".

    Settings (keywords):
        backend=None: "auto", "cpu", "torch", "cuda" or "triton"; None reads ``FASTCACHE_BACKEND`` (default auto).
            On CUDA, auto with the slab strategy times the cuda and triton epilogues once per shape bucket, dtype
            and options, and keeps the faster. "triton" runs CPU tensors too under ``TRITON_INTERPRET=1``.
        strategy=None: "auto", "slab", "tiled", "fused_slab" or "sparse"; None reads ``FASTCACHE_STRATEGY``
            (default auto). slab: row chunks of materialised similarity blocks (torch GEMMs + a fused epilogue);
            tiled: Triton kernels that never hold more than a tile (needs backend triton); fused_slab: row chunks
            whose logits are stored once in the embeddings' dtype by Triton GEMMs (needs backend triton; not yet
            run on a GPU, never chosen by auto); sparse: the slab with products over the non-zero entries only
            (CPU, backend cpu; SPLADE embeddings). auto: on CPU sparse when few enough entries of the queries and
            documents are non-zero (fastcache/ops/contrastive/sparse.py: SPARSE_MAX_DENSITY) and filter_eps is
            None, else slab; on CUDA tiled when the memory budget holds fewer than MIN_SLAB_ROWS (256) rows per slab
            chunk (and fewer than B), else slab.
        memory_budget=None: workspace bytes (None reads ``FASTCACHE_MEMORY_BUDGET``, default 256 MiB); it sets
            the rows per chunk.
        chunk_size=None: rows per chunk, overriding the budget.
        show_progress_bar=False: a tqdm bar over the chunks.

    Returns: the mean loss, a 0-d float32 tensor (float64 for float64 inputs).
    """
    refuse_functorch("fastcache.contrastive_loss")
    options, settings = parse_arguments(options)
    guides = [t.detach() if isinstance(t, Tensor) else t for t in (guide_queries, guide_docs)]
    return PrecomputedGradLoss.apply(loss_and_grads, options, settings, queries, docs, all_queries, *guides, doc_ids)


def contrastive_loss_and_grad(
    queries: Tensor,
    docs: Tensor,
    *,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> ContrastiveLossAndGrad:
    """:func:`contrastive_loss` and its gradients w.r.t. the embeddings in one pass, without an autograd graph
    (what gradient caching consumes). Same arguments; gradients come in the inputs' dtypes and shapes."""
    options, settings = parse_arguments(options)
    return one_pass(loss_and_grads, options, settings, queries, docs, all_queries, guide_queries, guide_docs, doc_ids)
