"""Drop-in for sentence-transformers' CachedSpladeLoss: upstream's class on fastcache's gradient cache.

Upstream's ``calculate_loss`` (the loss stage of the gradient cache) concatenates the mini-batch embeddings and
adds the inner loss's ``compute_loss_from_embeddings`` to the FLOPS regularisers. With fastcache's
SparseMultipleNegativesRankingLoss (or another fused MultipleNegativesRankingLoss-family drop-in) inside, the
contrastive term runs through fastcache's fused op, the regularisers stay upstream's maths, and this class adds
fastcache's engine (fastcache.gradcache.FusedGradCacheMixin): one gradient all-reduce per step under DDP and
``mini_batch_size="auto"`` (which needs the fused inner loss).
"""

from __future__ import annotations

from sentence_transformers.sparse_encoder import losses as st_sparse_losses

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.losses.fused_contrastive import FusedContrastiveLoss


class CachedSpladeLoss(FusedGradCacheMixin, st_sparse_losses.CachedSpladeLoss):
    """sentence-transformers' CachedSpladeLoss on fastcache's gradient cache; its contrastive term is fused when
    the inner loss is fastcache's."""

    def unfused_reason(self) -> str | None:
        if not isinstance(self.loss, FusedContrastiveLoss):
            return (f"loss={type(self.loss).__name__} has no fused form (fastcache.sparse_encoder.losses."
                    "SparseMultipleNegativesRankingLoss has)")
        return self.loss.unfused_reason()
