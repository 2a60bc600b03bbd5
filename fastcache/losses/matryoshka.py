"""Drop-ins for sentence-transformers' MatryoshkaLoss and Matryoshka2dLoss: every dimension in one fused op call.

sentence-transformers runs the inner loss once per Matryoshka dimension (truncating and re-normalising the
embeddings each time; with a cached inner loss, its whole loss stage once per dimension). When the inner loss is
one of fastcache's contrastive losses (MultipleNegativesRankingLoss, the symmetric and cached forms,
GISTEmbedLoss, CachedGISTEmbedLoss), fastcache's MatryoshkaLoss calls
:func:`fastcache.ops.matryoshka.matryoshka_contrastive_loss` itself, with the arguments the inner loss's adapter
gives (``op_arguments``, fastcache.losses.fused_contrastive), by handing the op to the inner loss's
``fused_forward``: the model runs once, the loss of every dimension comes from one sweep over the embedding
dimension, and under gradient caching the mini-batches are replayed once for all dimensions. Whether to fuse is
decided at every forward, from the inner loss as it is then. Any other inner loss (or one changed since to a
configuration without a fused form) gets sentence-transformers' own MatryoshkaLoss behaviour, and so do dims that
are not integers (NumPy and tensor integers are taken as ints) and weights that are not finite numbers (upstream's
loss, NaN or inf).
"""

from __future__ import annotations

import operator
import random
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

from sentence_transformers.sentence_transformer import losses as st_losses
from torch import Tensor, nn

from fastcache.losses.arguments import finite_float
from fastcache.losses.fused_contrastive import FusedContrastiveLoss, LossOp
from fastcache.ops.contrastive import ContrastiveLossAndGrad
from fastcache.ops.matryoshka import matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad


def matryoshka_op(dims: Sequence[int], weights: Sequence[float]) -> LossOp:
    """The op that takes a fastcache contrastive loss's op arguments (its adapter's) and gives the weighted sum of
    its loss at every dim (a dim given twice counts with its summed weight). Truncations are always L2-normalised
    (sentence-transformers' ``shrink``), so the similarity is cosine whatever the inner loss's similarity_fct."""
    merged: dict[int, float] = {}
    for dim, weight in zip(dims, weights):
        dim = operator.index(dim)  # NumPy / tensor integers, as upstream's slicing takes them
        merged[dim] = merged.get(dim, 0.0) + finite_float(weight)

    def bind(fused: Callable[..., Tensor | ContrastiveLossAndGrad]) -> Callable[..., Tensor | ContrastiveLossAndGrad]:
        def op(queries: Tensor, docs: Tensor, **kwargs) -> Tensor | ContrastiveLossAndGrad:
            width = queries.size(-1)
            for dim in merged:  # sentence-transformers' shrink's error
                if dim > width:
                    raise ValueError(f"Dimension {dim} in matryoshka_dims cannot be greater than the model's "
                                     f"embedding dimension: {width}")
            kwargs["similarity"] = "cos"
            return fused(queries, docs, dims=list(merged), weights=list(merged.values()), **kwargs)
        return op

    return LossOp(bind(matryoshka_contrastive_loss), bind(matryoshka_contrastive_loss_and_grad))


def fuses(loss: nn.Module) -> bool:
    """Whether ``loss`` is a fastcache contrastive loss whose loss stage runs through the fused op (a GIST loss
    whose guide is the model itself is not: sentence-transformers truncates the guide's embeddings too)."""
    if not isinstance(loss, FusedContrastiveLoss) or not loss.fused:
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
    fastcache contrastive inner loss, all dimensions go through one fused op call and one gradient-cache replay.

    The constructor is upstream's, which wraps a cached inner loss's ``calculate_loss`` in its per-dimension
    decorator: that is what runs whenever this loss does not fuse (:attr:`fused`, read at every forward).
    """

    @property
    def fused(self) -> bool:
        """Whether a forward now runs every dim in one fused op call: the inner loss is a fastcache contrastive loss
        in a fused configuration (as it is now, not as it was when wrapped), and the dims and weights have an op
        form."""
        return fuses(self.loss) and fusable_dims_and_weights(self.matryoshka_dims, self.matryoshka_weights)

    def step_dims(self) -> tuple[list[int], list[float]]:
        """This step's dims and weights: all of them, or n_dims_per_step drawn with Python's ``random`` as
        sentence-transformers draws them."""
        indices = range(len(self.matryoshka_dims))
        if 0 < self.n_dims_per_step < len(indices):
            indices = sorted(random.sample(indices, self.n_dims_per_step))
        return [self.matryoshka_dims[i] for i in indices], [self.matryoshka_weights[i] for i in indices]

    def step_op(self) -> LossOp:
        """This step's op (its dims drawn by :meth:`step_dims`): what forward hands to the inner loss; also the
        way to run the inner loss stage alone, e.g. ``loss.loss.cached_loss(reps, op=loss.step_op())``."""
        return matryoshka_op(*self.step_dims())

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(sentence_features, labels)
        return self.loss.fused_forward(sentence_features, labels, op=self.step_op())


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
