"""sentence-transformers drop-in losses: same names, signatures and results, with fastcache's fused loss stage.

Swap ``from sentence_transformers.sentence_transformer import losses`` for ``from fastcache import losses``.
"""

from fastcache.model_card import install as _install_model_card
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

_install_model_card()  # model cards name the upstream class with its link (fastcache.model_card)
