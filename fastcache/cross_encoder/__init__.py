"""Cross-encoder (reranker) drop-ins for sentence-transformers: :mod:`fastcache.cross_encoder.losses`."""

from fastcache.cross_encoder import losses

__all__ = ["losses"]
