"""Drop-ins for sentence-transformers' MultipleNegativesRankingLoss family, computed by fastcache's fused op.

Each class subclasses the sentence-transformers class of the same name (same constructor, validation, config,
citation, and ``isinstance`` for the trainer and MatryoshkaLoss) and replaces only the loss maths: the embeddings
go through :func:`fastcache.contrastive_loss`, with no B×N matrix built in Python. A ``similarity_fct`` other
than ``cos_sim`` / ``dot_score`` has no fused form and keeps the upstream maths.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import all_gather_with_grad, cos_sim, dot_score, get_rank, get_world_size
from torch import Tensor

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.ops.contrastive import contrastive_loss

_FUSED_SIMILARITIES = {cos_sim: "cos", dot_score: "dot"}


def fused_similarity(similarity_fct: Callable) -> str | None:
    """The op's name for a sentence-transformers similarity function ("cos" / "dot"), None if it has no fused form."""
    return _FUSED_SIMILARITIES.get(similarity_fct)


def check_columns(embeddings: list[Tensor], minimum: int = 2) -> None:
    """The loss needs ``minimum`` columns or more, all with the same number of rows."""
    if len(embeddings) < minimum:
        raise ValueError(f"Expected at least {minimum} input columns (anchor, positive, ...), got {len(embeddings)}")
    rows = embeddings[0].size(0)
    for index, column in enumerate(embeddings[1:], start=1):
        if column.size(0) != rows:
            raise ValueError(f"Input column {index} has {column.size(0)} rows, the anchor column has {rows}: every "
                             "column must have one row per anchor")


def gathering(enabled: bool) -> bool:
    """Whether gather_across_devices has other ranks to gather from."""
    return enabled and get_world_size() > 1


def fused_mnrl_loss(loss: st_losses.MultipleNegativesRankingLoss, embeddings: list[Tensor],
                    similarity: str) -> Tensor:
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings through the fused op (``loss`` holds the options:
    scale, directions, partition_mode, hardness, gather_across_devices)."""
    check_columns(embeddings)
    queries, docs = embeddings[0], embeddings[1:]
    all_queries = None
    if gathering(loss.gather_across_devices):
        all_queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(doc) for doc in docs]
    return contrastive_loss(
        queries,
        torch.cat(docs) if len(docs) > 1 else docs[0],
        all_queries=all_queries,
        offset=0 if all_queries is None else get_rank() * queries.size(0),
        scale=loss.scale,
        similarity=similarity,
        directions=loss.directions,
        partition_mode=loss.partition_mode,
        hardness_mode=loss.hardness_mode,
        hardness_strength=loss.hardness_strength,
    )


class _FusedMNRL:
    """compute_loss_from_embeddings of the MultipleNegativesRankingLoss family through the fused op."""

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        similarity = fused_similarity(self.similarity_fct)
        if similarity is None:
            return super().compute_loss_from_embeddings(embeddings, labels)
        return fused_mnrl_loss(self, embeddings, similarity)


class _FusedCachedMNRL:
    """calculate_loss of the cached (GradCache) MultipleNegativesRankingLoss family through the fused op: one
    pass gives the loss and every embedding's gradient, which the gradient cache (fastcache.gradcache) replays."""

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        similarity = fused_similarity(self.similarity_fct)
        if similarity is None:
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        loss = fused_mnrl_loss(self, [torch.cat(column) for column in reps], similarity)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


class MultipleNegativesRankingLoss(_FusedMNRL, st_losses.MultipleNegativesRankingLoss):
    """sentence-transformers' MultipleNegativesRankingLoss, loss stage fused by fastcache."""


class CachedMultipleNegativesRankingLoss(_FusedCachedMNRL, FusedGradCacheMixin,
                                         st_losses.CachedMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultipleNegativesRankingLoss, loss stage fused by fastcache."""


with warnings.catch_warnings():  # upstream deprecates these two; using them still warns, as upstream does
    warnings.simplefilter("ignore", DeprecationWarning)

    class MultipleNegativesSymmetricRankingLoss(_FusedMNRL, st_losses.MultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' MultipleNegativesSymmetricRankingLoss, loss stage fused by fastcache."""

    class CachedMultipleNegativesSymmetricRankingLoss(_FusedCachedMNRL, FusedGradCacheMixin,
                                                      st_losses.CachedMultipleNegativesSymmetricRankingLoss):
        """sentence-transformers' CachedMultipleNegativesSymmetricRankingLoss, loss stage fused by fastcache."""
