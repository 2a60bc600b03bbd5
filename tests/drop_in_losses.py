"""Shared by the reliability tests (compile, determinism, leaks, gradcheck): every drop-in loss of
fastcache.losses by name, a small configuration of each, fastcache's MatryoshkaLoss around the fused ones, and a
tiny three-column text batch."""

from __future__ import annotations

import warnings

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
TEXTS = [["the cat sat", "a dog at work", "sun over the car", "nice weather today", "car work query"],
         ["cat sat", "dog work", "the sun car", "weather nice", "a car query"],
         ["the dog", "a sun", "work today", "query", "nice cat"]]
LOSSES = {
    "MultipleNegativesRankingLoss": dict(directions=(QD, QQ, DQ, DD)),
    "CachedMultipleNegativesRankingLoss": dict(mini_batch_size=2),
    "MultipleNegativesSymmetricRankingLoss": {},
    "CachedMultipleNegativesSymmetricRankingLoss": dict(mini_batch_size=2),
    "GISTEmbedLoss": dict(margin=0.05),
    "CachedGISTEmbedLoss": dict(mini_batch_size=2, margin=0.05),
}


def make_loss(name: str, model, guide, **kwargs):
    """fastcache.losses.<name> on ``model`` (and ``guide`` for the GIST losses)."""
    from fastcache import losses

    with warnings.catch_warnings():  # the symmetric losses are deprecated upstream
        warnings.simplefilter("ignore", DeprecationWarning)
        cls = getattr(losses, name)
        return cls(model, guide, **kwargs) if "GIST" in name else cls(model, **kwargs)


# MatryoshkaLoss around each kind of inner loss it fuses (in-batch, cached, cached with a guide); dims of the tiny
# model's 32 that divide nothing
MATRYOSHKA_INNER = ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss")
MATRYOSHKA_DIMS = [32, 20, 7]
MATRYOSHKA_WEIGHTS = [1.0, 0.5, 0.25]


def make_matryoshka_loss(inner: str, model, guide, dims=MATRYOSHKA_DIMS, **kwargs):
    """fastcache.losses.MatryoshkaLoss(model, <inner> in its LOSSES configuration (and ``kwargs``), dims)."""
    from fastcache.losses import MatryoshkaLoss

    return MatryoshkaLoss(model, make_loss(inner, model, guide, **{**LOSSES[inner], **kwargs}), dims,
                          matryoshka_weights=MATRYOSHKA_WEIGHTS[:len(dims)])
