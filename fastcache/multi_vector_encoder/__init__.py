"""Multi-vector (ColBERT-style late interaction) drop-ins for sentence-transformers' MultiVectorEncoder:
:mod:`fastcache.multi_vector_encoder.losses`."""

from fastcache.multi_vector_encoder import losses

__all__ = ["losses"]
