"""Give an unmodified sentence-transformers training script fastcache's losses.

    import fastcache
    fastcache.patch_sentence_transformers()   # before the script builds its loss
    from sentence_transformers.sentence_transformer import losses
    loss = losses.CachedMultipleNegativesRankingLoss(model)   # fastcache's class

The names of :mod:`fastcache.losses` are swapped in sentence-transformers' public losses module (which
``sentence_transformers.losses`` also points to); a name bound by ``from ... import`` before the patch keeps the
upstream class. :func:`unpatch_sentence_transformers` restores the originals.
"""

from __future__ import annotations

_ORIGINALS: dict[str, type] = {}


def patch_sentence_transformers() -> list[str]:
    """Swap in fastcache's loss classes; returns the patched names. Calling it twice is harmless."""
    import sentence_transformers.sentence_transformer.losses as st_losses

    from fastcache import losses

    for name in losses.__all__:
        _ORIGINALS.setdefault(name, getattr(st_losses, name))
        setattr(st_losses, name, getattr(losses, name))
    return list(losses.__all__)


def unpatch_sentence_transformers() -> None:
    """Restore sentence-transformers' own loss classes."""
    import sentence_transformers.sentence_transformer.losses as st_losses

    for name, original in _ORIGINALS.items():
        setattr(st_losses, name, original)
    _ORIGINALS.clear()
