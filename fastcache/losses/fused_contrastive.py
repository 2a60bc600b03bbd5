"""The base of fastcache's contrastive drop-ins: one adapter from (loss, embeddings) to the op's arguments.

Data flows one way. A loss class holds sentence-transformers' configuration; its adapter,
:meth:`FusedContrastiveLoss.op_arguments`, turns a batch's embeddings into the arguments of fastcache's contrastive
op (queries, docs and keywords); whoever owns the computation calls an op with them:

- the loss itself calls :func:`fastcache.ops.contrastive.contrastive_loss` (:data:`CONTRASTIVE`);
- fastcache's MatryoshkaLoss asks its inner loss for the same arguments and calls
  :func:`fastcache.ops.matryoshka.matryoshka_contrastive_loss` (every dimension in one call), handing the op down
  as an argument of :meth:`FusedContrastiveLoss.fused_forward`, through the gradient cache of the cached losses
  (:meth:`FusedCachedContrastiveLoss.cached_loss`) when they have one. Nothing is set on the loss.

Each op comes as a :class:`LossOp`: its plain form (the loss, differentiable by autograd) and its loss-and-gradient
form (the loss and every embedding's gradient in one pass, which the gradient cache replays).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
from sentence_transformers.util import get_world_size
from torch import Tensor

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.losses.duplicates import candidate_ids
from fastcache.ops.contrastive import ContrastiveLossAndGrad, contrastive_loss, contrastive_loss_and_grad


class LossOp(NamedTuple):
    """An op of the loss stage, called as ``op(queries, docs, **keywords)`` with the arguments of an adapter
    (:meth:`FusedContrastiveLoss.op_arguments`): ``loss`` returns the loss (autograd differentiates it),
    ``loss_and_grad`` the loss and its embedding gradients without a graph."""

    loss: Callable[..., Tensor]
    loss_and_grad: Callable[..., ContrastiveLossAndGrad]

    def __call__(self, queries: Tensor, docs: Tensor, keywords: dict, with_grad: bool = False
                 ) -> Tensor | ContrastiveLossAndGrad:
        return (self.loss_and_grad if with_grad else self.loss)(queries, docs, **keywords)


CONTRASTIVE = LossOp(contrastive_loss, contrastive_loss_and_grad)  # a loss's own op


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


def check_same_layout_on_every_rank(device: torch.device, **sizes: int) -> None:
    """Before gathering: every rank must bring the same sizes (all_gather needs equal shapes; unequal ones crash a
    rank, hang the others or gather garbage). The sizes are exchanged first, so every rank raises the same error."""
    local = torch.tensor(list(sizes.values()), dtype=torch.int64, device=device)
    table = [torch.empty_like(local) for _ in range(get_world_size())]
    dist.all_gather(table, local)
    table = torch.stack(table).cpu()
    if bool((table != table[0]).any()):
        per_rank = "; ".join(f"rank {rank}: " + ", ".join(f"{name}={value}" for name, value in zip(sizes, row))
                             for rank, row in enumerate(table.tolist()))
        raise ValueError(f"gather_across_devices=True needs the same batch layout on every rank, got {per_rank}. "
                         "Give every rank batches of the same size (e.g. drop_last=True) with the same columns.")


def backward_without_graph(reps: list[list[Tensor]], gather_across_devices: bool) -> bool:
    """Whether a cached loss stage may hand the op's gradients to the mini-batch embeddings ``reps`` directly
    (:func:`add_grads`) instead of running loss.backward(): every one is a leaf that requires grad (as
    forward_cached makes them) and nothing is gathered across devices (all_gather's backward needs the graph)."""
    return not gathering(gather_across_devices) and all(
        r.is_leaf and r.requires_grad for column in reps for r in column)


class FusedContrastiveLoss:
    """Mixin base of every fused contrastive drop-in (before the sentence-transformers class in the bases).

    A subclass implements :meth:`unfused_reason` (the configurations without a fused form keep upstream's maths),
    :meth:`op_arguments` (its adapter) and :meth:`fused_forward` (embedding a batch as the upstream class does). It
    adds the keyword ``mask_duplicates`` (beyond upstream, default off): a candidate whose text is identical to a
    row's positive (same non-padding token ids, see fastcache.losses.duplicates) is not that row's negative.
    """

    def __init__(self, *args, mask_duplicates: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(mask_duplicates, bool):
            raise ValueError(f"mask_duplicates must be True or False, got {mask_duplicates!r}")
        self.mask_duplicates = mask_duplicates
        self.check_duplicate_masking()

    def unfused_reason(self) -> str | None:
        """Why this configuration has no fused form (the loss then runs sentence-transformers' maths), naming the
        argument; None when the loss stage runs through the fused op. Read at every call: a setting changed on the
        instance counts."""
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        """Whether the loss stage runs through the fused op (:meth:`unfused_reason` is None)."""
        return self.unfused_reason() is None

    def op_arguments(self, embeddings: list[Tensor], guide_embeddings: list[Tensor] | None = None,
                     doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """The adapter: the op's ``(queries, docs, keywords)`` for the embedding columns of a batch (anchors first;
        the guide's columns for the GIST losses; ``doc_ids`` [C, P] masks duplicates). Gathers across devices
        when the loss does. Any :class:`LossOp` takes them."""
        raise NotImplementedError

    def fused_loss(self, embeddings: list[Tensor], guide_embeddings: list[Tensor] | None = None, *,
                   doc_ids: Tensor | None = None, op: LossOp = CONTRASTIVE,
                   with_grad: bool = False) -> Tensor | ContrastiveLossAndGrad:
        """The loss of the embedding columns through ``op`` (``with_grad``: with its embedding gradients, without a
        graph; not when gathering)."""
        queries, docs, keywords = self.op_arguments(embeddings, guide_embeddings, doc_ids)
        return op(queries, docs, keywords, with_grad)

    def fused_forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None,
                      op: LossOp = CONTRASTIVE) -> Tensor:
        """The loss of a batch of inputs through ``op``: the inputs embedded as the upstream class embeds them
        (model, guide, gradient cache), then :meth:`fused_loss`. For a fused configuration only."""
        raise NotImplementedError

    def check_duplicate_masking(self) -> None:
        """mask_duplicates needs the fused op: a ValueError naming the argument that rules it out."""
        reason = None if not self.mask_duplicates else self.unfused_reason()
        if reason is not None:
            raise ValueError(f"mask_duplicates=True needs the fused loss, and {reason}")

    def duplicate_ids(self, sentence_features: list[dict[str, Tensor]]) -> Tensor | None:
        """[C, P] ids of the candidate columns (every rank's rows when gathering), None when not masking."""
        if not self.mask_duplicates:
            return None
        device = sentence_features[0]["input_ids"].device if "input_ids" in sentence_features[0] else None
        gathered = gathering(self.gather_across_devices)
        if gathered and device is not None:
            check_same_layout_on_every_rank(device, columns=len(sentence_features),
                                            rows=sentence_features[0]["input_ids"].size(0))
        return candidate_ids(sentence_features[1:], gathered, device)

    def get_config_dict(self) -> dict:
        config = super().get_config_dict()
        if self.mask_duplicates:
            config["mask_duplicates"] = True
        return config


class FusedCachedContrastiveLoss(FusedContrastiveLoss, FusedGradCacheMixin):
    """The base of the cached (GradCache) fused contrastive drop-ins: the loss stage on mini-batch embeddings
    (:meth:`cached_loss`) through an op, one pass giving the loss and every embedding's gradient, which the gradient
    cache (fastcache.gradcache) replays. A subclass implements :meth:`cached_loss` with upstream's
    ``calculate_loss`` arguments; its ``calculate_loss`` is :meth:`cached_loss` through :data:`CONTRASTIVE`."""

    def cached_loss(self, reps: list[list[Tensor]], second=None, *, op: LossOp = CONTRASTIVE,
                    with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        """The loss stage through ``op`` on mini-batch embeddings; ``second`` is what upstream's calculate_loss
        takes second (the labels, or the guide's mini-batch embeddings)."""
        raise NotImplementedError

    def minibatch_loss(self, reps: list[list[Tensor]], guide_reps: list[list[Tensor]] | None, op: LossOp,
                       with_backward: bool, doc_ids: Tensor | None) -> Tensor:
        """:meth:`fused_loss` of the concatenated mini-batches ``reps`` (and ``guide_reps``); with_backward leaves
        the gradients on ``reps`` (straight from the op where :func:`backward_without_graph` allows, else through
        loss.backward()) and returns the detached loss."""
        embeddings = [torch.cat(column) for column in reps]
        guide = None if guide_reps is None else [torch.cat(column) for column in guide_reps]
        if with_backward and backward_without_graph(reps, self.gather_across_devices):
            return accumulate_into(reps, self.fused_loss(embeddings, guide, doc_ids=doc_ids, op=op, with_grad=True))
        value = self.fused_loss(embeddings, guide, doc_ids=doc_ids, op=op)
        if with_backward:
            value.backward()
            value = value.detach()
        return value

    def fused_forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None,
                      op: LossOp = CONTRASTIVE) -> Tensor:
        return self.forward_cached(sentence_features, labels, loss_stage=partial(self.cached_loss, op=op))

    def loss_stage_keywords(self, sentence_features: list[dict[str, Tensor]]) -> dict:
        doc_ids = self.duplicate_ids(sentence_features)
        return {} if doc_ids is None else {"doc_ids": doc_ids}


def accumulate_into(reps: list[list[Tensor]], result: ContrastiveLossAndGrad) -> Tensor:
    """What loss.backward() does to the leaves ``reps`` (per column, the mini-batches concatenated into the op's
    queries and docs), from the op's precomputed gradients; returns the detached loss."""
    docs = [r for column in reps[1:] for r in column]
    grads = (*result.grad_queries.split_with_sizes([r.size(0) for r in reps[0]]),
             *result.grad_docs.reshape(-1, result.grad_docs.size(-1)).split_with_sizes([r.size(0) for r in docs]))
    add_grads((*reps[0], *docs), grads)
    return result.loss.detach()


def add_grads(leaves: Iterable[Tensor], grads: Iterable[Tensor]) -> None:
    """What loss.backward() does to ``leaves`` given their gradients ``grads``: set, or added to, each ``.grad``."""
    for leaf, grad in zip(leaves, grads, strict=True):
        if leaf.grad is None:
            leaf.grad = grad
        else:
            leaf.grad += grad
