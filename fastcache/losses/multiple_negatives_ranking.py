"""Drop-ins for sentence-transformers' MultipleNegativesRankingLoss family, computed by fastcache's fused op.

Each class subclasses the sentence-transformers class of the same name (same constructor, validation, config,
citation, and ``isinstance`` for the trainer and MatryoshkaLoss) and replaces only the loss maths: the embeddings
go through :func:`fastcache.contrastive_loss`, with no B×N matrix built in Python (the adapter from the loss's
options and embeddings to the op's arguments is ``op_arguments``; see fastcache.losses.fused_contrastive). A
``similarity_fct`` other than ``cos_sim`` / ``dot_score`` has no fused form and keeps the upstream maths.

Arguments: every value sentence-transformers accepts is accepted. Numbers of any kind (NumPy scalars, one-element
tensors) are converted to Python floats for the op (fastcache.losses.arguments). A value outside the op's range
keeps the upstream maths for that instance, with upstream's result: ``scale=inf`` (NaN, as upstream: the loss has
no finite limit), a non-finite ``hardness_strength``, a ``scale`` tensor that requires grad (upstream trains it).
``mask_duplicates=True`` needs the fused op and raises a ValueError naming the argument otherwise.

Autocast: under ``torch.autocast`` (bf16 or fp16) the loss is float32, where upstream's MultipleNegatives(Symmetric)
RankingLoss returns the autocast dtype (its similarity matmul runs in bf16; upstream's GIST losses return float32,
as these do). The fused op accumulates in float32 and rounds nothing to bf16: under CPU bf16 autocast on the tests'
tiny BERT (5 batches), upstream's loss is up to 7.3e-3 (symmetric: 1.3e-2) relative from the loss without autocast,
fastcache's up to 1.6e-5 (tests/losses/test_drop_in_arguments.py pins both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import all_gather_with_grad, cos_sim, dot_score, get_rank
from torch import Tensor

from fastcache.losses.arguments import as_float, describe, finite_float, positive_float
from fastcache.losses.fused_contrastive import (CONTRASTIVE, FusedCachedContrastiveLoss, FusedContrastiveLoss, LossOp,
                                                check_columns, check_same_layout_on_every_rank, gathering)

_FUSED_SIMILARITIES = {cos_sim: "cos", dot_score: "dot"}


def fused_similarity(similarity_fct: Callable) -> str | None:
    """The op's name for a sentence-transformers similarity function ("cos" / "dot"), None if it has no fused form."""
    return _FUSED_SIMILARITIES.get(similarity_fct)


class _MNRLOptions(FusedContrastiveLoss):
    """The options of the MultipleNegativesRankingLoss family that the fused op takes, and their adapter."""

    def unfused_reason(self) -> str | None:
        if fused_similarity(self.similarity_fct) is None:
            name = getattr(self.similarity_fct, "__name__", repr(self.similarity_fct))
            return f"similarity_fct={name} has no fused form (cos_sim and dot_score have)"
        if positive_float(self.scale) is None:
            return f"{describe('scale', self.scale)} is not a finite positive number without gradient"
        if finite_float(self.hardness_strength) is None:
            return f"{describe('hardness_strength', self.hardness_strength)} is not a finite number"
        return None

    def op_arguments(self, embeddings: list[Tensor], guide_embeddings: list[Tensor] | None = None,
                     doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """MultipleNegativesRankingLoss.compute_loss_from_embeddings as op arguments: the anchors are the queries,
        the other columns the docs (gathered across devices with gather_across_devices), with scale, similarity,
        directions, partition_mode and hardness; ``doc_ids`` [C, P] masks duplicates. No guide."""
        check_columns(embeddings)
        queries, docs = embeddings[0], embeddings[1:]
        all_queries = None
        if gathering(self.gather_across_devices):
            check_same_layout_on_every_rank(queries.device, columns=len(embeddings), rows=queries.size(0),
                                            dim=queries.size(1))
            all_queries = all_gather_with_grad(queries)
            docs = [all_gather_with_grad(doc) for doc in docs]
        return queries, torch.cat(docs) if len(docs) > 1 else docs[0], dict(
            all_queries=all_queries,
            offset=0 if all_queries is None else get_rank() * queries.size(0),
            scale=as_float(self.scale),
            similarity=fused_similarity(self.similarity_fct),
            directions=self.directions,
            partition_mode=self.partition_mode,
            hardness_mode=self.hardness_mode,
            hardness_strength=as_float(self.hardness_strength),
            doc_ids=None if doc_ids is None else doc_ids.reshape(-1).to(queries.device),
        )


class _FusedMNRL(_MNRLOptions):
    """compute_loss_from_embeddings of the MultipleNegativesRankingLoss family through the fused op."""

    def forward(self, sentence_features, labels: Tensor | None) -> Tensor:
        if not self.mask_duplicates:
            return super().forward(sentence_features, labels)
        self.check_duplicate_masking()
        return self.fused_forward(sentence_features, labels)

    def fused_forward(self, sentence_features, labels: Tensor | None, op: LossOp = CONTRASTIVE) -> Tensor:
        sentence_features = list(sentence_features)
        doc_ids = self.duplicate_ids(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        return self.fused_loss(embeddings, doc_ids=doc_ids, op=op)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if not self.fused:
            return super().compute_loss_from_embeddings(embeddings, labels)
        return self.fused_loss(embeddings)


class _FusedCachedMNRL(_MNRLOptions, FusedCachedContrastiveLoss):
    """calculate_loss of the cached (GradCache) MultipleNegativesRankingLoss family through the fused op: one
    pass gives the loss and every embedding's gradient, which the gradient cache (fastcache.gradcache) replays."""

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        if not self.fused:
            self.check_duplicate_masking()
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        return self.cached_loss(reps, labels, with_backward=with_backward, doc_ids=doc_ids)

    def cached_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *, op: LossOp = CONTRASTIVE,
                    with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        return self.minibatch_loss(reps, None, op, with_backward, doc_ids)  # the labels are unused, as upstream

    def fused_forward(self, sentence_features, labels: Tensor | None, op: LossOp = CONTRASTIVE) -> Tensor:
        sentence_features = list(sentence_features)
        if len(sentence_features) < 2:  # upstream's forward's check
            raise ValueError(f"Expected at least 2 inputs, got {len(sentence_features)}")
        return super().fused_forward(sentence_features, labels, op)


class MultipleNegativesRankingLoss(_FusedMNRL, st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss, loss stage fused by fastcache."""


class CachedMultipleNegativesRankingLoss(_FusedCachedMNRL, st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss, loss stage fused by fastcache."""


with warnings.catch_warnings():  # upstream deprecates these two; using them still warns, as upstream does
    warnings.simplefilter("ignore", DeprecationWarning)

    class MultipleNegativesSymmetricRankingLoss(_FusedMNRL, st_losses.MultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' MultipleNegativesSymmetricRankingLoss, loss stage fused by fastcache."""

    class CachedMultipleNegativesSymmetricRankingLoss(_FusedCachedMNRL,
                                                      st_losses.CachedMultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss, loss stage fused by fastcache."""
