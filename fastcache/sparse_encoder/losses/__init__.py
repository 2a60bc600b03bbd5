"""Drop-in SPLADE losses for sentence-transformers 6 (``from fastcache.sparse_encoder import losses``).

Same names, signatures and results as ``sentence_transformers.sparse_encoder.losses``. SPLADE trains a
SparseEncoder with a contrastive loss on vocabulary-sized embeddings (D ≈ 30522) inside ``SpladeLoss`` or
``CachedSpladeLoss``, which add FLOPS regularisers (the squared mean activation, summed over the vocabulary):

    loss = contrastive(q, d) + λ_d · Σ_v mean_j(d_jv)² + λ_q · Σ_v mean_i(q_iv)²

- :class:`SparseMultipleNegativesRankingLoss`: the contrastive term through fastcache's fused op (dot similarity,
  scale 1 by default), exactly as fastcache's MultipleNegativesRankingLoss. sentence-transformers' ``SpladeLoss``
  and ``CachedSpladeLoss`` hand their inner loss the embeddings (``compute_loss_from_embeddings``), so the fused
  inner loss fuses both; upstream's ``SpladeLoss`` needs no counterpart (re-exported here as it is, with
  ``FlopsLoss``, so that the import swap keeps working).
- :class:`CachedSpladeLoss`: upstream's class on fastcache's gradient cache (fastcache.gradcache: one all-reduce
  per step under DDP, ``mini_batch_size="auto"``); with the class above inside, its loss stage takes the
  contrastive term and its embedding gradients from one pass of the op (no autograd graph through it) and the FLOPS
  regularisers by upstream's maths; otherwise it is upstream's ``calculate_loss``.

The model card names upstream's classes with their links (fastcache.model_card).
"""

from sentence_transformers.sparse_encoder.losses import FlopsLoss as FlopsLoss  # upstream's, re-exported
from sentence_transformers.sparse_encoder.losses import SpladeLoss as SpladeLoss  # upstream's, re-exported

from fastcache.model_card import install as _install_model_card
from fastcache.sparse_encoder.losses.cached_splade import CachedSpladeLoss
from fastcache.sparse_encoder.losses.sparse_multiple_negatives_ranking import SparseMultipleNegativesRankingLoss

__all__ = ["CachedSpladeLoss", "SparseMultipleNegativesRankingLoss"]  # the classes patch_sentence_transformers swaps

_install_model_card()  # model cards name the upstream class with its link (fastcache.model_card)
