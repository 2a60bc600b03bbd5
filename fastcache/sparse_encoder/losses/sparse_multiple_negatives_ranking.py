"""Drop-in for sentence-transformers' SparseMultipleNegativesRankingLoss (SPLADE's contrastive term), computed by
fastcache's fused op.

Upstream's class is MultipleNegativesRankingLoss with dot_score and scale 1 that refuses to run alone (SpladeLoss
and CSRLoss call its ``compute_loss_from_embeddings``). This class is fastcache's MultipleNegativesRankingLoss
on top of it: the same adapter to :func:`fastcache.contrastive_loss`, the same fallback to upstream's maths for a
similarity_fct without a fused form or an attribute changed on the instance. ``mask_duplicates=True`` is refused:
SpladeLoss hands its inner loss the embeddings only, never the texts that the duplicate ids come from.
"""

from __future__ import annotations

from sentence_transformers.sparse_encoder import losses as st_sparse_losses

from fastcache.losses.multiple_negatives_ranking import _FusedMNRL


class SparseMultipleNegativesRankingLoss(_FusedMNRL, st_sparse_losses.SparseMultipleNegativesRankingLoss):
    """sentence-transformers' SparseMultipleNegativesRankingLoss, loss stage fused by fastcache."""

    def check_duplicate_masking(self) -> None:
        if self.mask_duplicates:
            raise ValueError("mask_duplicates=True is not available for SparseMultipleNegativesRankingLoss: "
                             "SpladeLoss and CSRLoss give their inner loss embeddings, not the texts that "
                             "duplicates are found from")
