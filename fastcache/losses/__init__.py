"""sentence-transformers drop-in losses: same names, signatures and results, with fastcache's fused loss stage.

Swap ``from sentence_transformers.sentence_transformer import losses`` for ``from fastcache import losses``.
"""

from fastcache.losses.gist_embed import CachedGISTEmbedLoss, GISTEmbedLoss
from fastcache.losses.matryoshka import Matryoshka2dLoss, MatryoshkaLoss
from fastcache.losses.multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss,
    CachedMultipleNegativesSymmetricRankingLoss,
    MultipleNegativesRankingLoss,
    MultipleNegativesSymmetricRankingLoss,
)

__all__ = [
    "CachedGISTEmbedLoss",
    "CachedMultipleNegativesRankingLoss",
    "CachedMultipleNegativesSymmetricRankingLoss",
    "GISTEmbedLoss",
    "Matryoshka2dLoss",
    "MatryoshkaLoss",
    "MultipleNegativesRankingLoss",
    "MultipleNegativesSymmetricRankingLoss",
]
