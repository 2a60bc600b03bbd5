"""Sparse-encoder (SPLADE) drop-ins for sentence-transformers: :mod:`fastcache.sparse_encoder.losses`."""

from fastcache.sparse_encoder import losses

__all__ = ["losses"]
