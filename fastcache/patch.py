"""Give an unmodified sentence-transformers training script fastcache's losses.

    import fastcache
    fastcache.patch_sentence_transformers()   # before the script builds its loss
    from sentence_transformers.sentence_transformer import losses
    loss = losses.CachedMultipleNegativesRankingLoss(model)   # fastcache's class
    from sentence_transformers.cross_encoder import losses as ce_losses
    loss = ce_losses.LambdaLoss(cross_encoder)                 # fastcache's class

The names of :mod:`fastcache.losses` are swapped in sentence-transformers' public bi-encoder losses module (which
``sentence_transformers.losses`` also points to), those of :mod:`fastcache.cross_encoder.losses` in
``sentence_transformers.cross_encoder.losses``, those of :mod:`fastcache.multi_vector_encoder.losses` in
``sentence_transformers.multi_vector_encoder.losses``, those of :mod:`fastcache.sparse_encoder.losses`
(SparseMultipleNegativesRankingLoss, CachedSpladeLoss) in ``sentence_transformers.sparse_encoder.losses``. A name bound by ``from ... import`` before the patch keeps the
upstream class, and so do the defining submodules (e.g. ``sentence_transformers.cross_encoder.losses.lambda_loss``,
which upstream's deprecated per-class paths such as ``...losses.LambdaLoss`` alias): upstream's own code imports
from them. :func:`unpatch_sentence_transformers` restores the originals.
"""

from __future__ import annotations

import importlib

# (sentence-transformers' public module, fastcache's module with the same names)
_MODULES = (
    ("sentence_transformers.sentence_transformer.losses", "fastcache.losses"),
    ("sentence_transformers.cross_encoder.losses", "fastcache.cross_encoder.losses"),
    ("sentence_transformers.multi_vector_encoder.losses", "fastcache.multi_vector_encoder.losses"),
    ("sentence_transformers.sparse_encoder.losses", "fastcache.sparse_encoder.losses"),
)

_ORIGINALS: dict[tuple[str, str], type] = {}  # (upstream module, name) -> upstream's class


def patch_sentence_transformers() -> list[str]:
    """Swap in fastcache's loss classes; returns the patched names as ``module.name`` (the bi-encoder names first).
    Calling it twice is harmless."""
    patched = []
    for upstream_name, ours_name in _MODULES:
        upstream, ours = importlib.import_module(upstream_name), importlib.import_module(ours_name)
        for name in ours.__all__:
            _ORIGINALS.setdefault((upstream_name, name), getattr(upstream, name))
            setattr(upstream, name, getattr(ours, name))
            patched.append(f"{upstream_name}.{name}")
    return patched


def unpatch_sentence_transformers() -> None:
    """Restore sentence-transformers' own loss classes."""
    for (upstream_name, name), original in _ORIGINALS.items():
        setattr(importlib.import_module(upstream_name), name, original)
    _ORIGINALS.clear()
