"""Drop-in cross-encoder losses for sentence-transformers 6 (``from fastcache.cross_encoder import losses``).

Same names, signatures and results as ``sentence_transformers.cross_encoder.losses``; the loss maths runs in
fastcache's fused ranking ops (:mod:`fastcache.ops.ranking`). The listwise losses take the keyword
``cache_gradients=True`` for gradient caching over ``mini_batch_size`` pairs.
"""

from fastcache.model_card import install as _install_model_card
from fastcache.cross_encoder.losses.lambda_loss import (
    LambdaLoss,
    LambdaRankScheme,
    NDCGLoss1Scheme,
    NDCGLoss2PPScheme,
    NDCGLoss2Scheme,
    NoWeightingScheme,
    RankNetLoss,
)
from fastcache.cross_encoder.losses.list_mle import ListMLELoss, PListMLELambdaWeight, PListMLELoss
from fastcache.cross_encoder.losses.list_net import ListNetLoss
from fastcache.cross_encoder.losses.multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)

__all__ = [
    "CachedMultipleNegativesRankingLoss",
    "LambdaLoss",
    "LambdaRankScheme",
    "ListMLELoss",
    "ListNetLoss",
    "MultipleNegativesRankingLoss",
    "NDCGLoss1Scheme",
    "NDCGLoss2PPScheme",
    "NDCGLoss2Scheme",
    "NoWeightingScheme",
    "PListMLELambdaWeight",
    "PListMLELoss",
    "RankNetLoss",
]

_install_model_card()  # model cards name the upstream class with its link (fastcache.model_card)
