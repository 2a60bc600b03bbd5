"""LambdaLoss and RankNetLoss (cross-encoder) through :func:`fastcache.ops.ranking.lambda_loss`.

The classes subclass sentence-transformers' (constructor, validation, config, citation, ``isinstance`` unchanged);
the weighting-scheme classes are sentence-transformers' own, subclassed, and sentence-transformers' scheme
objects are accepted as they are. A scheme with its own ``forward`` has no fused form: the upstream maths runs.
Deliberate difference: a batch without any pair (e.g. all labels equal) gives 0 with zero gradients where
sentence-transformers gives NaN.

Arguments: every value sentence-transformers accepts is accepted, NumPy / tensor numbers converted to Python ones.
``k=0`` (or None) means every document, as upstream's ``self.k or n``; ``reduction_log`` other than "natural"
means binary, as upstream. Values the op does not take keep the upstream maths for that instance, with upstream's
result: ``k < 0`` (upstream drops the last |k| ranks), ``sigma <= 0`` or non-finite, ``eps < 0`` or non-finite,
a NDCGLoss2PPScheme ``mu`` that is negative or not finite.

Deliberate difference, ``eps=0`` (no clamp; fused): the pair loss -w·log_b sigmoid(sigma·diff) is computed in log
space, finite where upstream's float32 sigmoid(sigma·diff)^w underflows to 0 (e.g. a pair misordered by more than
~89/sigma) and its log(0) makes the loss inf; and a list without a positive label (maxDCG@k = 0) has gains 0 where
upstream's 0/0 makes the loss NaN. Both are upstream's own values in the limit eps -> 0; where upstream is finite
the results agree.
"""

from __future__ import annotations

import math
import operator

from sentence_transformers.cross_encoder.losses import lambda_loss as st_lambda
from sentence_transformers.cross_encoder.losses import rank_net as st_rank_net
from torch import Tensor

from fastcache.cross_encoder.losses.listwise import ListwiseLossMixin
from fastcache.losses.arguments import as_float, finite_float, positive_float
from fastcache.ops.ranking import lambda_loss


class NoWeightingScheme(st_lambda.NoWeightingScheme):
    """Every pair weighs 1 (RankNet)."""


class NDCGLoss1Scheme(st_lambda.NDCGLoss1Scheme):
    """w_pq = G_p / D_p over every pair (p, q) (see :mod:`fastcache.ops.ranking`)."""


class NDCGLoss2Scheme(st_lambda.NDCGLoss2Scheme):
    """w_pq = |1/log2(1+|p-q|) - 1/log2(2+|p-q|)| · |G_p - G_q|."""


class LambdaRankScheme(st_lambda.LambdaRankScheme):
    """w_pq = |1/D_p - 1/D_q| · |G_p - G_q|."""


class NDCGLoss2PPScheme(st_lambda.NDCGLoss2PPScheme):
    """w_pq = mu · (NDCGLoss2 weight) + (LambdaRank weight)."""


_SCHEMES = (  # sentence-transformers' class -> the op's weighting name
    (st_lambda.NDCGLoss2PPScheme, "ndcg_loss2pp"),
    (st_lambda.NoWeightingScheme, "none"),
    (st_lambda.NDCGLoss1Scheme, "ndcg_loss1"),
    (st_lambda.NDCGLoss2Scheme, "ndcg_loss2"),
    (st_lambda.LambdaRankScheme, "lambdarank"),
)


def scheme_weighting(scheme) -> dict | None:
    """The op's ``weighting`` (and ``mu``) for a sentence-transformers scheme object (or one of fastcache's), None
    for a scheme whose ``forward`` is not upstream's own (no fused form)."""
    for cls, name in _SCHEMES:
        if isinstance(scheme, cls) and type(scheme).forward is cls.forward:
            if name == "ndcg_loss2pp":
                if type(scheme.ndcg_loss2).forward is not st_lambda.NDCGLoss2Scheme.forward or \
                        type(scheme.lambda_rank).forward is not st_lambda.LambdaRankScheme.forward:
                    return None
                mu = as_float(scheme.mu)
                if mu is None or not math.isfinite(mu) or mu < 0:
                    return None
                return {"weighting": name, "mu": mu}
            return {"weighting": name}
    return None


def _non_negative(value) -> float | None:
    """``value`` as a finite non-negative Python float, else None."""
    number = finite_float(value)
    return number if number is not None and number >= 0 else None


def truncation(k) -> int | None | bool:
    """The op's ``k``: None for every document (upstream's ``self.k or n``: None or 0), a positive int; False when
    the op has no form for it (a negative k, or not an integer)."""
    if k is None:
        return None
    try:
        k = operator.index(k)
    except TypeError:
        return False
    return None if k == 0 else k if k > 0 else False


class LambdaLossMixin(ListwiseLossMixin):
    """The LambdaLoss maths of sentence-transformers' LambdaLoss and RankNetLoss, fused."""

    def unfused_reason(self) -> str | None:
        if scheme_weighting(self.weighting_scheme) is None:
            return (f"weighting_scheme {type(self.weighting_scheme).__name__} has its own forward or a mu that is "
                    "not a finite non-negative number")
        if truncation(self.k) is False:
            return f"k={self.k!r} is not None, 0 or a positive integer"
        if positive_float(self.sigma) is None:
            return f"sigma={self.sigma!r} is not a finite positive number"
        if _non_negative(self.eps) is None:
            return f"eps={self.eps!r} is not a finite non-negative number"
        return None

    def ranking_loss(self, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        return lambda_loss(logits, labels, mask, k=truncation(self.k), sigma=positive_float(self.sigma),
                           eps=_non_negative(self.eps),
                           reduction_log="natural" if self.reduction_log == "natural" else "binary",
                           **scheme_weighting(self.weighting_scheme))


class LambdaLoss(LambdaLossMixin, st_lambda.LambdaLoss):
    """sentence-transformers' LambdaLoss (same arguments and results), computed by fastcache's fused LambdaLoss:
    O(Q·n) memory instead of about ten [Q, n, n] tensors. Keyword ``cache_gradients=True`` adds gradient caching
    (see :mod:`fastcache.cross_encoder.losses.listwise`)."""

    def __init__(self, model, weighting_scheme: st_lambda.BaseWeightingScheme | None = NDCGLoss2PPScheme(),
                 k: int | None = None, sigma: float = 1.0, eps: float = 1e-10, reduction_log: str = "binary",
                 activation_fn=st_lambda.nn.Identity(), mini_batch_size: int | None = None, *,
                 cache_gradients: bool = False) -> None:
        super().__init__(model, weighting_scheme=weighting_scheme, k=k, sigma=sigma, eps=eps,
                         reduction_log=reduction_log, activation_fn=activation_fn, mini_batch_size=mini_batch_size,
                         cache_gradients=cache_gradients)


class RankNetLoss(LambdaLossMixin, st_rank_net.RankNetLoss):
    """sentence-transformers' RankNetLoss (LambdaLoss without weights), fused; ``cache_gradients`` as LambdaLoss."""
