"""The Matryoshka op: :func:`matryoshka_contrastive_loss` and :func:`matryoshka_contrastive_loss_and_grad` (the
maths: fastcache/ops/matryoshka/__init__.py), and :func:`loss_and_grads`, which checks the inputs and dims, chooses
the strategy and backend as the single-dim op does, and runs them. The top of the package: nothing below imports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from fastcache.ops._autograd_guard import refuse_functorch
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.contrastive.autograd import PrecomputedGradLoss, one_pass
from fastcache.ops.contrastive.normalize import NORMALIZE_EPS
from fastcache.ops.contrastive.op import _strategy
from fastcache.ops.contrastive.options import ContrastiveLossAndGrad, check_inputs, parse_arguments
from fastcache.ops.matryoshka.slab import _slab, slab_rows


def check_dims(dims, weights, dim: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Validate the Matryoshka dims (distinct positive ints, at most ``dim``) and weights (one finite number per
    dim, default 1); return both sorted by dim, descending."""
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise ValueError(f"dims must be a non-empty sequence of ints, got {dims!r}")
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int) or d <= 0:
            raise ValueError(f"dims must be positive ints, got {list(dims)}")
        if d > dim:
            raise ValueError(f"dims: {d} exceeds the embeddings' {dim} dimensions")
    if len(set(dims)) != len(dims):
        raise ValueError(f"dims must not repeat a dimension, got {list(dims)}")
    if weights is None:
        weights = [1.0] * len(dims)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != len(dims):
        raise ValueError(f"weights must be a sequence of {len(dims)} numbers (one per dim), got {weights!r}")
    if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not float(w) == float(w) or abs(w) == float("inf")
           for w in weights):
        raise ValueError(f"weights must be finite numbers, got {list(weights)}")
    ordered = sorted(zip(dims, weights), key=lambda dw: dw[0], reverse=True)
    return tuple(d for d, _ in ordered), tuple(float(w) for _, w in ordered)



HUGE_ROW = 2.0**32  # rows with a larger entry: their raw prefix products (up to D·max², fp32) could overflow


def _near_zero_first_dim(*tensors: Tensor | None) -> bool:
    """Whether a row of any tensor has |x_0| < NORMALIZE_EPS (its one-dim cosine is not piecewise constant there)."""
    return any(x is not None and bool((x[..., 0].abs() < NORMALIZE_EPS).any()) for x in tensors)


def _row_scale(x: Tensor | None) -> Tensor | None:
    """None when every entry of x is at most HUGE_ROW in magnitude; else per row a power of two (exact) that
    brings its largest entry to [1, 2): the raw segment products of huge rows (1e19² = 1e38 per term) overflow
    fp32, the normalised similarities do not."""
    if x is None:
        return None
    largest = x.detach().abs().amax(dim=-1).double()
    if float(largest.max()) <= HUGE_ROW:
        return None
    return torch.where(largest > 0, torch.exp2(-torch.floor(torch.log2(largest.clamp_min(1e-300)))), 1.0)


def loss_and_grads(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, need_grad, *, dims,
                   weights, backend, memory_budget, chunk_size, show_progress_bar, strategy=None):
    """The weighted loss over the dims (0-d, fp32 or fp64) and, when ``need_grad``, fp32/fp64 gradients w.r.t.
    queries, docs and all_queries (None where not needed): the inputs checked, a strategy and backend chosen, the
    strategy run."""
    layout = check_inputs(queries, docs, all_queries, guide_queries, guide_docs, options, doc_ids)
    dims, weights = check_dims(dims, weights, layout.dim)
    if options.filter_eps is not None:
        raise ValueError(f"filter_eps={options.filter_eps!r}: the Matryoshka op has no gradient filter (its "
                         "backward products take each segment's sum of every dim's dL/ds); use filter_eps=None")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    guide_dim = 0 if guide_queries is None else guide_queries.size(1)
    strategy, name = _strategy(layout, options, all_queries is not None, guide_dim, queries.device,
                               contrastive_epilogue.available(queries.device), backend, strategy, memory_budget,
                               chunk_size)
    if strategy in ("fused_slab", "sparse"):
        raise RuntimeError(f"strategy {strategy!r} is the single-dim contrastive op's only (no Matryoshka form yet): "
                           "use 'auto', 'slab' or 'tiled'")
    if need_grad and options.similarity == "cos" and dims[-1] == 1 and not _near_zero_first_dim(
            queries, docs, all_queries):  # dims descending: the last is the smallest
        # at one dim, cos = sign(x_0)·sign(y_0) is piecewise constant: its gradient is exactly 0 (the kernels'
        # radial subtraction would leave rounding, ~1e-6 of the gradient's scale): its loss alone, no gradient.
        # Not where some |x_0| < NORMALIZE_EPS: there F.normalize (the reference) is x_0 / eps, whose gradient is
        # g / eps, and the general path below gives that.
        settings = dict(backend=backend, memory_budget=memory_budget, chunk_size=chunk_size,
                        show_progress_bar=show_progress_bar, strategy=strategy)
        one_dim = loss_and_grads(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, False,
                                 dims=(1,), weights=(weights[-1],), **settings)[0]
        if len(dims) > 1:
            loss, *grads = loss_and_grads(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options,
                                          need_grad, dims=dims[:-1], weights=weights[:-1], **settings)
            return loss + one_dim, *grads
        acc = one_dim.dtype
        return one_dim, *(None if x is None else torch.zeros(x.shape, dtype=acc, device=x.device)
                          for x in (queries, docs, all_queries))
    if options.similarity == "cos":  # huge rows scaled down (cosine is scale-invariant); the chain rule after
        scales = [_row_scale(x) for x in (queries, docs, all_queries)]
        if any(c is not None for c in scales):
            queries, docs, all_queries = (x if c is None else x * c.view(*x.shape[:-1], 1).to(x.dtype)
                                          for x, c in zip((queries, docs, all_queries), scales))
            loss, *grads = loss_and_grads(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options,
                                          need_grad, dims=dims, weights=weights, backend=backend,
                                          memory_budget=memory_budget, chunk_size=chunk_size,
                                          show_progress_bar=show_progress_bar, strategy=strategy)
            return loss, *(g if g is None or c is None else g * c.view(*g.shape[:-1], 1).to(g.dtype)
                           for g, c in zip(grads, scales))
    if strategy == "tiled":
        from fastcache.ops.matryoshka.tiled import matryoshka_tiled

        return matryoshka_tiled(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                                dims, weights, need_grad)
    fused = name == "cpu"  # the C++ Matryoshka epilogue; other backends run their contrastive epilogue per dim
    if chunk_size is None:
        chunk = slab_rows(layout, options, all_queries is not None, guide_dim, len(dims), name, queries,
                          memory_budget)
    else:
        chunk = min(chunk_size, layout.rows)
    return _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, dims, weights,
                 None if fused else contrastive_epilogue.EPILOGUES[name], need_grad, chunk, show_progress_bar)


def matryoshka_contrastive_loss(
    queries: Tensor,
    docs: Tensor,
    *,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> Tensor:
    """Σ_k weights[k] · :func:`fastcache.contrastive_loss` of the embeddings truncated to their first dims[k]
    dimensions (each truncation normalised on its own for similarity="cos"), computed in one sweep over D;
    differentiable w.r.t. ``queries``, ``docs`` and ``all_queries``.

    Args:
        dims: distinct positive ints, each at most D, in any order (e.g. [384, 256, 128, 64, 32]).
        weights: one finite number per dim (default 1 each).
        queries, docs, all_queries, guide_queries, guide_docs, doc_ids, and every option and setting: as
            :func:`fastcache.contrastive_loss` (the guide embeddings are never truncated), strategy included:
            "tiled" runs the Triton multi-dim tiled kernels (fastcache/triton/matryoshka.py), "auto" chooses as
            the single-dim op does.

    Returns: the weighted sum of the per-dim mean losses, a 0-d float32 tensor (float64 for float64 inputs).
    """
    refuse_functorch("fastcache.ops.matryoshka.matryoshka_contrastive_loss")
    options, settings = parse_arguments(options)
    guides = [t.detach() if isinstance(t, Tensor) else t for t in (guide_queries, guide_docs)]
    return PrecomputedGradLoss.apply(loss_and_grads, options, dict(settings, dims=dims, weights=weights), queries,
                                     docs, all_queries, *guides, doc_ids)


def matryoshka_contrastive_loss_and_grad(
    queries: Tensor,
    docs: Tensor,
    *,
    dims: Sequence[int],
    weights: Sequence[float] | None = None,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> ContrastiveLossAndGrad:
    """:func:`matryoshka_contrastive_loss` and its gradients w.r.t. the embeddings in one pass, without an autograd
    graph (what gradient caching consumes). Same arguments; gradients come in the inputs' dtypes and shapes."""
    options, settings = parse_arguments(options)
    return one_pass(loss_and_grads, options, dict(settings, dims=dims, weights=weights), queries, docs, all_queries,
                    guide_queries, guide_docs, doc_ids)
