"""Drop-in multi-vector losses for sentence-transformers 6 (``from fastcache.multi_vector_encoder import losses``).

Same names, signatures and results as ``sentence_transformers.multi_vector_encoder.losses``; with ColBERT MaxSim
scoring the loss runs in fastcache's fused MaxSim op (:mod:`fastcache.ops.maxsim`), other scorers keep upstream's
maths (see :mod:`fastcache.multi_vector_encoder.losses.multiple_negatives_ranking`).
"""

from fastcache.model_card import install as _install_model_card
from fastcache.multi_vector_encoder.losses.multiple_negatives_ranking import (
    CachedMultiVectorMultipleNegativesRankingLoss,
    MultiVectorMultipleNegativesRankingLoss,
)

__all__ = ["CachedMultiVectorMultipleNegativesRankingLoss", "MultiVectorMultipleNegativesRankingLoss"]

_install_model_card()  # model cards name the upstream class with its link (fastcache.model_card)
