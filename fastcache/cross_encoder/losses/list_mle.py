"""ListMLELoss and PListMLELoss (cross-encoder) through :func:`fastcache.ops.ranking.plistmle`.

Deliberate differences: the log-sum-exp is max-shifted (sentence-transformers' exp overflows once a score passes
~88), and the default position weights are computed so that no list length overflows (upstream's 2^n is NaN
past ~127 documents in float32).
"""

from __future__ import annotations

from sentence_transformers.cross_encoder.losses import list_mle as st_list_mle
from sentence_transformers.cross_encoder.losses import plist_mle as st_plist_mle
from torch import Tensor

from fastcache.cross_encoder.losses.listwise import ListwiseLossMixin
from fastcache.ops.ranking import plistmle, plistmle_default_weights


class PListMLELambdaWeight(st_plist_mle.PListMLELambdaWeight):
    """Position weights 2^(n - r) - 1 of rank r (or ``rank_discount_fn(mask)``), as sentence-transformers'."""


class PListMLELossMixin(ListwiseLossMixin):
    def position_weights(self, mask: Tensor) -> Tensor | None:
        """Per-rank weights normalised per row as upstream does (its default in an overflow-free form)."""
        weight = self.lambda_weight
        if weight is None:
            return None
        if isinstance(weight, st_plist_mle.PListMLELambdaWeight) and weight.rank_discount_fn is None and \
                type(weight).forward is st_plist_mle.PListMLELambdaWeight.forward:
            return plistmle_default_weights(mask)
        w = weight(mask)
        return w / (w.sum(dim=1, keepdim=True) + self.eps)

    def ranking_loss(self, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        return plistmle(logits, labels, mask, position_weights=self.position_weights(mask),
                        respect_input_order=self.respect_input_order, eps=self.eps)


class PListMLELoss(PListMLELossMixin, st_plist_mle.PListMLELoss):
    """sentence-transformers' PListMLELoss (same arguments and results where upstream is finite), fused;
    keyword ``cache_gradients=True`` adds gradient caching."""

    def __init__(self, model, lambda_weight: st_plist_mle.PListMLELambdaWeight | None = PListMLELambdaWeight(),
                 activation_fn=st_plist_mle.nn.Identity(), mini_batch_size: int | None = None,
                 respect_input_order: bool = True, *, cache_gradients: bool = False) -> None:
        super().__init__(model, lambda_weight=lambda_weight, activation_fn=activation_fn,
                         mini_batch_size=mini_batch_size, respect_input_order=respect_input_order,
                         cache_gradients=cache_gradients)


class ListMLELoss(PListMLELossMixin, st_list_mle.ListMLELoss):
    """sentence-transformers' ListMLELoss (PListMLE without position weights), fused; ``cache_gradients`` too."""
