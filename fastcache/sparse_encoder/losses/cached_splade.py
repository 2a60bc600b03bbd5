"""Drop-in for sentence-transformers' CachedSpladeLoss: upstream's class on fastcache's gradient cache.

Upstream's ``calculate_loss`` (the loss stage of the gradient cache) concatenates the mini-batch embeddings and
adds the inner loss's ``compute_loss_from_embeddings`` to the FLOPS regularisers, then back-propagates the sum to
the mini-batches. With fastcache's SparseMultipleNegativesRankingLoss (or another fused MultipleNegativesRankingLoss-
family drop-in) inside, this class computes the contrastive term and its embedding gradients in one pass of
fastcache's op (no autograd graph through it, as fastcache's cached losses do), the regularisers by upstream's maths
(their modules, weights and thresholds, through autograd), and hands the summed gradients to the mini-batches.
Otherwise (another inner loss, a configuration without a fused form, gathering across devices, whose all_gather
needs the graph) it runs upstream's ``calculate_loss``. Either way the mini-batches are embedded and replayed by
fastcache's engine (fastcache.gradcache.FusedGradCacheMixin: one gradient all-reduce per step under DDP,
``mini_batch_size="auto"``, which needs the fused inner loss).
"""

from __future__ import annotations

import torch
from sentence_transformers.sparse_encoder import losses as st_sparse_losses
from torch import Tensor

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.losses.fused_contrastive import FusedContrastiveLoss, accumulate_into, gathering


class CachedSpladeLoss(FusedGradCacheMixin, st_sparse_losses.CachedSpladeLoss):
    """sentence-transformers' CachedSpladeLoss on fastcache's gradient cache; its contrastive term is fused when
    the inner loss is fastcache's."""

    def unfused_reason(self) -> str | None:
        if not isinstance(self.loss, FusedContrastiveLoss):
            return (f"loss={type(self.loss).__name__} has no fused form (fastcache.sparse_encoder.losses."
                    "SparseMultipleNegativesRankingLoss has)")
        return self.loss.unfused_reason()

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False) -> Tensor:
        if not (with_backward and self.unfused_reason() is None and not gathering(self.loss.gather_across_devices)
                and all(r.is_leaf and r.requires_grad for column in reps for r in column)):
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        with torch.no_grad():
            embeddings = [torch.cat(column) for column in reps]
        contrastive = self.loss.fused_loss(embeddings, with_grad=True)
        leaves = [e.requires_grad_() for e in embeddings]  # the regularisers' autograd starts here
        documents = leaves if self.use_document_regularizer_only else leaves[1:]
        terms = {"document_regularizer_loss": self.document_regularizer.compute_loss_from_embeddings(
            documents[0] if len(documents) == 1 else torch.cat(documents)) * self.document_regularizer_weight}
        if self.query_regularizer_weight is not None:
            terms["query_regularizer_loss"] = (self.query_regularizer.compute_loss_from_embeddings(leaves[0])
                                               * self.query_regularizer_weight)
        total = contrastive.loss
        for term in terms.values():  # upstream's order of the sum
            total = total + term
        total.backward()
        self._component_values = {"base_loss": contrastive.loss.item(),
                                  **{key: term.detach().item() for key, term in terms.items()}}
        grad_docs = contrastive.grad_docs.view(-1, contrastive.grad_docs.size(-1))
        for leaf, grad in zip(leaves, (contrastive.grad_queries, *grad_docs.split(leaves[0].size(0)))):
            if leaf.grad is not None:  # a column no regulariser reads has none
                grad.add_(leaf.grad)
        accumulate_into(reps, contrastive)
        return total.detach()
