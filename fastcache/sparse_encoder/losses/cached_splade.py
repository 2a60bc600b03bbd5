"""Drop-in for sentence-transformers' CachedSpladeLoss: upstream's class on fastcache's gradient cache.

Upstream's ``calculate_loss`` (the loss stage of the gradient cache) concatenates the mini-batch embeddings and
adds the inner loss's ``compute_loss_from_embeddings`` to the FLOPS regularisers, then back-propagates the sum to
the mini-batches. With fastcache's SparseMultipleNegativesRankingLoss (or another fused MultipleNegativesRankingLoss-
family drop-in) inside, this class computes the contrastive term and its embedding gradients in one pass of
fastcache's op (no autograd graph through it, as fastcache's cached losses do; on CPU its sparse products for
SPLADE's sparse embeddings), the regularisers by upstream's maths (its FlopsLoss with weights and thresholds in
closed form, added into those gradients in place; any other module through autograd: :func:`regularize`), and
hands the summed gradients to the mini-batches.
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


def regularize(regularizer, weight: float, columns: list[Tensor], grads: list[Tensor]) -> Tensor:
    """weight · ``regularizer`` on the rows of ``columns`` concatenated (upstream's document or query term), its
    gradient added into ``grads`` (one per column, in place); returns the term, detached.

    sentence-transformers' FlopsLoss (that class exactly) in closed form: with m_i = 1 (or, given a threshold,
    whether row i has more non-zero entries than it) and μ = Σ_i m_i·x_i / n over the n rows,
    term = weight·Σ_v μ_v², d term / dx_i = weight·2·m_i·μ / n: one pass over the rows for μ and one that adds
    the gradient, where autograd would write the n×V gradient of the mean out first. Any other regulariser
    (its own compute_loss_from_embeddings) runs through autograd."""
    if type(regularizer) is not st_sparse_losses.FlopsLoss:
        leaves = [x.detach().requires_grad_() for x in columns]
        term = regularizer.compute_loss_from_embeddings(leaves[0] if len(leaves) == 1 else torch.cat(leaves)) * weight
        term.backward()
        for leaf, grad in zip(leaves, grads):
            if leaf.grad is not None:  # a regulariser may leave a column out
                grad.add_(leaf.grad)
        return term.detach()
    rows = sum(x.size(0) for x in columns)
    with torch.no_grad():
        masks = [None if regularizer.threshold is None else
                 ((x != 0).sum(dim=1) > regularizer.threshold).to(x.dtype) for x in columns]
        mean = sum(x.sum(dim=0) if m is None else m @ x for x, m in zip(columns, masks)) / rows
        step = mean * (2 * weight / rows)
        for grad, m in zip(grads, masks):
            if m is None:
                grad.add_(step)
            else:
                grad.addcmul_(m[:, None], step)
        return (mean ** 2).sum() * weight


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
        grad_docs = contrastive.grad_docs.view(-1, contrastive.grad_docs.size(-1))
        grads = [contrastive.grad_queries, *grad_docs.split(embeddings[0].size(0))]  # views, one per column
        documents = slice(None) if self.use_document_regularizer_only else slice(1, None)
        terms = {"document_regularizer_loss": regularize(self.document_regularizer, self.document_regularizer_weight,
                                                         embeddings[documents], grads[documents])}
        if self.query_regularizer_weight is not None:
            terms["query_regularizer_loss"] = regularize(self.query_regularizer, self.query_regularizer_weight,
                                                         embeddings[:1], grads[:1])
        total = contrastive.loss
        for term in terms.values():  # upstream's order of the sum
            total = total + term
        self._component_values = {"base_loss": contrastive.loss.item(),
                                  **{key: term.item() for key, term in terms.items()}}
        accumulate_into(reps, contrastive)
        return total.detach()
