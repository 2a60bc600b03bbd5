"""MultipleNegativesRankingLoss and CachedMultipleNegativesRankingLoss (cross-encoder) through the fused ListNet
op: cross-entropy with the positive (column 0) as target is ListNet with target labels (0, -inf, ..., -inf).
A ``scale`` that is not a finite number without gradient (inf, NaN, a tensor that requires grad), or a
``cross_entropy_loss`` replaced or reconfigured after construction, keeps the upstream maths, with upstream's
result."""

from __future__ import annotations

import torch
from sentence_transformers.cross_encoder.losses import cached_multiple_negatives_ranking as st_cached
from sentence_transformers.cross_encoder.losses import multiple_negatives_ranking as st_mnrl
from torch import Tensor

from fastcache.losses.arguments import changed_modules, finite_float
from fastcache.ops.ranking import listnet


class PositiveFirstCrossEntropyMixin:
    def calculate_loss(self, logits: list[Tensor], batch_size: int) -> Tensor:
        """Scores per column (positives, then negatives) -> [B, columns] -> activation, scale -> CE at column 0."""
        if self.scale and finite_float(self.scale) is None or changed_modules(self, "cross_entropy_loss"):
            return super().calculate_loss(logits, batch_size)
        logits = torch.cat(logits, dim=0).reshape(-1, batch_size).T
        if self.activation_fn:
            logits = self.activation_fn(logits)
        if self.scale:
            logits = logits * self.scale
        target = torch.full(logits.shape, float("-inf"), device=logits.device)
        target[:, 0] = 0.0
        return listnet(logits, target)


class MultipleNegativesRankingLoss(PositiveFirstCrossEntropyMixin, st_mnrl.MultipleNegativesRankingLoss):
    """sentence-transformers' cross-encoder MultipleNegativesRankingLoss (same arguments and results), fused."""


class CachedMultipleNegativesRankingLoss(PositiveFirstCrossEntropyMixin,
                                         st_cached.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' cross-encoder CachedMultipleNegativesRankingLoss (same arguments and results), its
    loss stage fused."""
