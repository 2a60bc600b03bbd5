"""Drop-ins for sentence-transformers' MultiVector(Cached)MultipleNegativesRankingLoss, computed by fastcache's fused
MaxSim op.

Each class subclasses the sentence-transformers class of the same name (same constructor, validation, config,
citation, and ``isinstance`` for the trainer) and replaces only the loss maths: the token embeddings go through
:func:`fastcache.ops.maxsim.maxsim_contrastive_loss`, which computes

    S[i, j·N + n] = Σ_t max_u ⟨q_i,t, d_j,n,u⟩   (masked tokens excluded; MeanMaxSim: ÷ real query tokens)
    loss = mean_i CE(scale · S[i], (offset + i)·N)

without building the B×(G·N)×Lq×Ld intermediate that upstream's ``colbert_scores`` materialises per group.

Which ``similarity_fct`` is fused (:func:`maxsim_length_normalize`): ``colbert_scores`` and ``mean_colbert_scores``
(sentence_transformers.multi_vector_encoder.scoring), and a ``functools.partial`` of either that binds nothing but
``length_normalize`` (a bool) and ``chunk_elements`` (upstream's memory budget for its scoring intermediate: it
changes upstream's memory, not the scores, and the fused op keeps its own budget). Anything else, e.g. XTR's
``xtr_scores`` / ``XTRScores``, a lambda or a partial binding other arguments, keeps upstream's maths, and so does a
``scale`` that is not a finite positive number without gradient; both are read at every call, so an instance
override after construction counts. ``score_mini_batch_size`` only bounds upstream's scoring memory: the fused op
ignores it (same loss).

gather_across_devices: as upstream, every rank's documents are gathered with gradients (token axis padded to the
ranks' longest) and the local queries' positives sit at ``offset = rank·B``; every rank must bring the same number
of rows and columns (checked before gathering, one error on every rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

from sentence_transformers.base.losses.merged_forward import embed_columns_padded
from sentence_transformers.multi_vector_encoder import losses as mve_losses
from sentence_transformers.multi_vector_encoder.scoring import (
    colbert_scores,
    mean_colbert_scores,
)
from sentence_transformers.util import (
    all_gather_padded,
    cat_padded_token_embeddings,
    get_rank,
    stack_padded_token_embeddings,
)
from torch import Tensor

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.losses.arguments import as_float, describe, positive_float
from fastcache.losses.fused_contrastive import (
    add_grads,
    backward_without_graph,
    check_same_layout_on_every_rank,
    gathering,
)
from fastcache.ops.maxsim import (
    maxsim_contrastive_loss,
    maxsim_contrastive_loss_and_grad,
)

# the ColBERT MaxSim scorers and their length_normalize default
_MAXSIM_SCORERS = {colbert_scores: False, mean_colbert_scores: True}
_SCORE_NEUTRAL_KEYWORDS = {"length_normalize", "chunk_elements"}


def maxsim_length_normalize(similarity_fct: Callable) -> bool | None:
    """``length_normalize`` of a ColBERT MaxSim scorer that the fused op computes: ``colbert_scores`` (False),
    ``mean_colbert_scores`` (True), or a ``functools.partial`` of either binding only ``length_normalize`` (a bool)
    and ``chunk_elements``; None for any other callable (it keeps upstream's maths)."""
    keywords = {}
    if isinstance(similarity_fct, partial):  # partial(partial(f, ...), ...) is flattened by functools
        if similarity_fct.args or not set(similarity_fct.keywords) <= _SCORE_NEUTRAL_KEYWORDS:
            return None
        keywords, similarity_fct = similarity_fct.keywords, similarity_fct.func
    default = _MAXSIM_SCORERS.get(similarity_fct) if callable(similarity_fct) else None
    if default is None:
        return None
    length_normalize = keywords.get("length_normalize", default)
    return length_normalize if isinstance(length_normalize, bool) else None


class _MaxSimOptions:
    """The options of the multi-vector MultipleNegativesRankingLoss family that the fused op takes, and their
    adapter from token embeddings to the op's arguments."""

    def unfused_reason(self) -> str | None:
        """Why this configuration has no fused form (the loss then runs sentence-transformers' maths), naming the
        argument; None when the loss runs through the fused op. Read at every call."""
        if maxsim_length_normalize(self.similarity_fct) is None:
            name = getattr(self.similarity_fct, "__name__", repr(self.similarity_fct))
            return (f"similarity_fct={name} has no fused form (colbert_scores, mean_colbert_scores and their "
                    "functools.partial binding only length_normalize / chunk_elements have)")
        if positive_float(self.scale) is None:
            return f"{describe('scale', self.scale)} is not a finite positive number without gradient"
        return None

    @property
    def fused(self) -> bool:
        """Whether the loss runs through the fused op (:meth:`unfused_reason` is None)."""
        return self.unfused_reason() is None

    def op_arguments(self, queries: Tensor, query_mask: Tensor, docs: list[Tensor], doc_masks: list[Tensor]
                     ) -> tuple[Tensor, Tensor, dict]:
        """The op's ``(queries, docs, keywords)`` from the query tokens [B, Lq, D] and each document column's
        tokens [B, Ld_c, D] with their masks: the columns stacked into upstream's [G, N, Ld, D] layout (gathered
        across devices with gather_across_devices, offset = rank·B)."""
        offset = 0
        if gathering(self.gather_across_devices):
            check_same_layout_on_every_rank(queries.device, columns=len(docs) + 1, rows=queries.size(0),
                                            dim=queries.size(-1))
            gathered = [all_gather_padded(e, m, with_grad=True) for e, m in zip(docs, doc_masks)]
            docs, doc_masks = [e for e, _ in gathered], [m for _, m in gathered]
            offset = get_rank() * queries.size(0)
        stacked, stacked_mask = stack_padded_token_embeddings(docs, doc_masks)
        return queries, stacked, dict(query_mask=query_mask, doc_mask=stacked_mask, scale=as_float(self.scale),
                                      length_normalize=maxsim_length_normalize(self.similarity_fct), offset=offset)


class MultiVectorMultipleNegativesRankingLoss(_MaxSimOptions, mve_losses.MultiVectorMultipleNegativesRankingLoss):
    """sentence-transformers' MultiVectorMultipleNegativesRankingLoss, loss stage fused by fastcache."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        if not self.fused:
            return super().forward(sentence_features, labels)
        sentence_features = list(sentence_features)
        query_features = sentence_features[0]  # embedded as upstream's forward embeds them
        query_outputs = self.model(query_features, task=query_features.get("task", "query"))
        docs, doc_masks = embed_columns_padded(self.model, sentence_features[1:], self.mini_batch_size,
                                               task_default="document")
        queries, stacked, keywords = self.op_arguments(query_outputs["token_embeddings"],
                                                       query_outputs["attention_mask"].bool(), docs, doc_masks)
        return maxsim_contrastive_loss(queries, stacked, **keywords)


class CachedMultiVectorMultipleNegativesRankingLoss(_MaxSimOptions, FusedGradCacheMixin,
                                                    mve_losses.CachedMultiVectorMultipleNegativesRankingLoss):
    """sentence-transformers' CachedMultiVectorMultipleNegativesRankingLoss, with fastcache's gradient cache
    (fastcache.gradcache) and its loss stage fused: one pass of the op gives the loss and the gradient of every
    cached token embedding, which the replay back-propagates mini-batch by mini-batch."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        # the task of each column as upstream stamps it, so that the replay embeds for the same task
        sentence_features = [{**features, "task": features.get("task", "query" if index == 0 else "document")}
                             for index, features in enumerate(sentence_features)]
        return self.forward_cached(sentence_features, labels)

    def calculate_loss(self, reps: list[list[Tensor]], masks_chunks: list[list[Tensor]], *,
                       with_backward: bool = False) -> Tensor:
        """The loss of the mini-batch token embeddings ``reps`` (per column) with their scoring masks; with_backward
        leaves the gradients on ``reps`` and returns the detached loss."""
        reason = self.unfused_reason()
        if reason is not None:
            if self.score_mini_batch_size == "auto":  # upstream's default: mini_batch_size, here "auto"
                raise ValueError(f"mini_batch_size='auto' needs the fused loss, and {reason}")
            return super().calculate_loss(reps, masks_chunks, with_backward=with_backward)
        catted = [cat_padded_token_embeddings(r, m) for r, m in zip(reps, masks_chunks)]
        (queries, query_mask), docs = catted[0], catted[1:]
        arguments = self.op_arguments(queries, query_mask, [e for e, _ in docs], [m for _, m in docs])
        keywords = {**arguments[2], "show_progress_bar": self.show_progress_bar}
        if with_backward and backward_without_graph(reps, self.gather_across_devices):
            loss, grad_queries, grad_docs = maxsim_contrastive_loss_and_grad(*arguments[:2], **keywords)
            add_grads((r for column in reps for r in column), _minibatch_grads(reps, [grad_queries,
                                                                                       *grad_docs.unbind(1)]))
            return loss.detach()
        loss = maxsim_contrastive_loss(*arguments[:2], **keywords)
        if with_backward:
            loss.backward()
            loss = loss.detach()
        return loss


def _minibatch_grads(reps: list[list[Tensor]], column_grads: list[Tensor]) -> Iterable[Tensor]:
    """Each mini-batch's slice of its column's gradient (rows, and the tokens of its own width: the concatenation
    and the stacking padded the narrower ones), in the order of ``reps`` flattened."""
    for column, grad in zip(reps, column_grads, strict=True):
        for r, rows in zip(column, grad.split([r.size(0) for r in column]), strict=True):
            yield rows[:, :r.size(1)].to(r.dtype).contiguous()
