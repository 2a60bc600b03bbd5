"""Drop-ins for sentence-transformers' MatryoshkaLoss and Matryoshka2dLoss: every dimension in one fused op call.

sentence-transformers runs the inner loss once per Matryoshka dimension (truncating and re-normalising the
embeddings each time; with a cached inner loss, its whole loss stage once per dimension). When the inner loss is
one of fastcache's contrastive losses (MultipleNegativesRankingLoss, the symmetric and cached forms,
GISTEmbedLoss, CachedGISTEmbedLoss), fastcache's MatryoshkaLoss hands it
:func:`fastcache.ops.matryoshka.matryoshka_contrastive_loss` instead of the single-dimension op: the model runs
once, the loss of every dimension comes from one sweep over the embedding dimension, and under gradient caching
the mini-batches are replayed once for all dimensions. Any other inner loss gets sentence-transformers' own
MatryoshkaLoss behaviour, and so do dims that are not integers (NumPy and tensor integers are taken as ints) and
weights that are not finite numbers (upstream's loss, NaN or inf).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Literal

from sentence_transformers.sentence_transformer import losses as st_losses
from torch import Tensor, nn

from fastcache.losses.arguments import finite_float
from fastcache.losses.multiple_negatives_ranking import DuplicateMasking
from fastcache.ops.contrastive import ContrastiveLossAndGrad
from fastcache.ops.matryoshka import matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad


def matryoshka_op(dims: Sequence[int], weights: Sequence[float],
                  with_grad: bool = False) -> Callable[..., Tensor | ContrastiveLossAndGrad]:
    """The op a fastcache contrastive loss calls in place of contrastive_loss (contrastive_loss_and_grad
    ``with_grad``): the weighted sum of its loss at every dim (a dim given twice counts with its summed weight).
    Truncations are always L2-normalised (sentence-transformers' ``shrink``), so the similarity is cosine whatever
    the inner loss's similarity_fct."""
    merged: dict[int, float] = {}
    for dim, weight in zip(dims, weights):
        dim = operator.index(dim)  # NumPy / tensor integers, as upstream's slicing takes them
        merged[dim] = merged.get(dim, 0.0) + finite_float(weight)

    fused = matryoshka_contrastive_loss_and_grad if with_grad else matryoshka_contrastive_loss

    def op(queries: Tensor, docs: Tensor, **kwargs) -> Tensor | ContrastiveLossAndGrad:
        width = queries.size(-1)
        for dim in merged:  # sentence-transformers' shrink's error
            if dim > width:
                raise ValueError(f"Dimension {dim} in matryoshka_dims cannot be greater than the model's embedding "
                                 f"dimension: {width}")
        kwargs["similarity"] = "cos"
        return fused(queries, docs, dims=list(merged), weights=list(merged.values()), **kwargs)

    return op


def fuses(loss: nn.Module) -> bool:
    """Whether ``loss`` is a fastcache contrastive loss whose loss stage runs through the fused op (a GIST loss
    whose guide is the model itself is not: sentence-transformers truncates the guide's embeddings too)."""
    if not isinstance(loss, DuplicateMasking) or not loss.fused:
        return False
    return getattr(loss, "guide", None) is not getattr(loss, "model", None)


def fusable_dims_and_weights(dims: Sequence, weights: Sequence) -> bool:
    """Whether the fused op takes these dims (integers of any kind) and weights (finite numbers of any kind)."""
    try:
        [operator.index(dim) for dim in dims]
    except TypeError:
        return False
    return all(finite_float(weight) is not None for weight in weights)


class MatryoshkaLoss(st_losses.MatryoshkaLoss):
    """sentence-transformers' MatryoshkaLoss (same signature, validation, warnings, config and results); with a
    fastcache contrastive inner loss, all dimensions go through one fused op call and one gradient-cache replay."""

    def __init__(self, model, loss: nn.Module, matryoshka_dims: Sequence[int],
                 matryoshka_weights: Sequence[float] | Sequence[int] | None = None, n_dims_per_step: int = -1) -> None:
        own_calculate_loss = loss.__dict__.get("calculate_loss")
        super().__init__(model, loss, matryoshka_dims, matryoshka_weights, n_dims_per_step)
        self.fused = fuses(loss) and fusable_dims_and_weights(self.matryoshka_dims, self.matryoshka_weights)
        if self.fused and self.uses_gradient_cache:  # one fused call for every dim replaces upstream's per-dim loop
            if own_calculate_loss is None:
                del loss.calculate_loss
            else:
                loss.calculate_loss = own_calculate_loss

    def step_dims(self) -> tuple[list[int], list[float]]:
        """This step's dims and weights: all of them, or n_dims_per_step drawn with Python's ``random`` as
        sentence-transformers draws them."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = sorted(random.sample(indices, self.n_dims_per_step))
        return [self.matryoshka_dims[i] for i in indices], [self.matryoshka_weights[i] for i in indices]

    @contextmanager
    def fused_step(self):
        """Inside, the inner loss computes every dim of this step (step_dims) in one op call: what forward does
        around the inner loss; exposed to run the loss stage alone (e.g. ``loss.loss.calculate_loss(reps)``)."""
        dims, weights = self.step_dims()
        self.loss.fused_op = matryoshka_op(dims, weights)
        self.loss.fused_op_and_grad = matryoshka_op(dims, weights, with_grad=True)
        try:
            yield
        finally:
            del self.loss.fused_op, self.loss.fused_op_and_grad

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(sentence_features, labels)
        with self.fused_step():
            return self.loss(sentence_features, labels)


class Matryoshka2dLoss(st_losses.Matryoshka2dLoss):
    """sentence-transformers' Matryoshka2dLoss (AdaptiveLayerLoss over MatryoshkaLoss), with fastcache's
    MatryoshkaLoss inside: a fastcache contrastive inner loss computes every dimension in one fused call."""

    def __init__(self, model, loss: nn.Module, matryoshka_dims: list[int],
                 matryoshka_weights: list[float | int] | None = None, n_layers_per_step: int = 1,
                 n_dims_per_step: int = 1, last_layer_weight: float = 1.0, prior_layers_weight: float = 1.0,
                 kl_div_weight: float = 1.0, kl_temperature: float = 0.3,
                 layer_weighting: Literal["uniform", "log", "linear"] | Callable[[int], float] = "uniform") -> None:
        matryoshka_loss = MatryoshkaLoss(model, loss, matryoshka_dims, matryoshka_weights=matryoshka_weights,
                                         n_dims_per_step=n_dims_per_step)
        st_losses.AdaptiveLayerLoss.__init__(
            self, model, matryoshka_loss, n_layers_per_step=n_layers_per_step, last_layer_weight=last_layer_weight,
            prior_layers_weight=prior_layers_weight, kl_div_weight=kl_div_weight, kl_temperature=kl_temperature,
            layer_weighting=layer_weighting)
