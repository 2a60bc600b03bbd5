"""Drop-ins for sentence-transformers' MultipleNegativesRankingLoss family, computed by fastcache's fused op.

Each class subclasses the sentence-transformers class of the same name (same constructor, validation, config,
citation, and ``isinstance`` for the trainer and MatryoshkaLoss) and replaces only the loss maths: the embeddings
go through :func:`fastcache.contrastive_loss`, with no B×N matrix built in Python. A ``similarity_fct`` other
than ``cos_sim`` / ``dot_score`` has no fused form and keeps the upstream maths.

Arguments: every value sentence-transformers accepts is accepted. Numbers of any kind (NumPy scalars, one-element
tensors) are converted to Python floats for the op (fastcache.losses.arguments). A value outside the op's range
keeps the upstream maths for that instance, with upstream's result: ``scale=inf`` (NaN, as upstream: the loss has
no finite limit), a non-finite ``hardness_strength``, a ``scale`` tensor that requires grad (upstream trains it).
``mask_duplicates=True`` needs the fused op and raises a ValueError naming the argument otherwise.

Autocast: under ``torch.autocast`` (bf16 or fp16) the loss is float32, where upstream's MultipleNegatives(Symmetric)
RankingLoss returns the autocast dtype (its similarity matmul runs in bf16; upstream's GIST losses return float32,
as these do). The fused op accumulates in float32 and rounds nothing to bf16: under CPU bf16 autocast on the tests'
tiny BERT (5 batches), upstream's loss is up to 7.3e-3 (symmetric: 1.3e-2) relative from the loss without autocast,
fastcache's up to 1.6e-5 (tests/test_drop_in_arguments.py pins both).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.distributed as dist
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import all_gather_with_grad, cos_sim, dot_score, get_rank, get_world_size
from torch import Tensor

from fastcache.gradcache import FusedGradCacheMixin
from fastcache.losses.arguments import as_float, describe, finite_float, positive_float
from fastcache.losses.duplicates import candidate_ids
from fastcache.ops.contrastive import ContrastiveLossAndGrad, contrastive_loss, contrastive_loss_and_grad

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


def loss_op(loss, with_grad: bool = False) -> Callable[..., Tensor | ContrastiveLossAndGrad]:
    """The op that computes ``loss``'s loss stage: contrastive_loss (contrastive_loss_and_grad ``with_grad``), or
    the pair that a wrapper installed as ``loss.fused_op`` / ``loss.fused_op_and_grad`` with the same arguments
    (fastcache's MatryoshkaLoss: every dimension in one call)."""
    if with_grad:
        return getattr(loss, "fused_op_and_grad", None) or contrastive_loss_and_grad
    return getattr(loss, "fused_op", None) or contrastive_loss


def backward_without_graph(loss, reps: list[list[Tensor]]) -> bool:
    """Whether a cached loss stage may hand its gradients to ``reps`` directly (:func:`accumulate_into`) instead of
    running loss.backward(): every mini-batch embedding is a leaf that requires grad (as forward_cached makes them)
    and nothing is gathered across devices (all_gather_with_grad's backward needs the graph)."""
    return not gathering(loss.gather_across_devices) and all(
        r.is_leaf and r.requires_grad for column in reps for r in column)


def cached_loss_stage(loss, reps: list[list[Tensor]], with_backward: bool,
                      compute: Callable[[bool], Tensor | ContrastiveLossAndGrad]) -> Tensor:
    """The end of a cached loss's calculate_loss: ``compute(with_grad)`` runs the fused op on the concatenated
    ``reps``; with_backward leaves the gradients on ``reps`` (straight from the op where
    :func:`backward_without_graph` allows, else through loss.backward()) and returns the detached loss."""
    if with_backward and backward_without_graph(loss, reps):
        return accumulate_into(reps, compute(True))
    value = compute(False)
    if with_backward:
        value.backward()
        value = value.detach()
    return value


def accumulate_into(reps: list[list[Tensor]], result: ContrastiveLossAndGrad) -> Tensor:
    """What loss.backward() does to the leaves ``reps`` (per column, the mini-batches concatenated into the op's
    queries and docs), from the op's precomputed gradients; returns the detached loss."""
    docs = [r for column in reps[1:] for r in column]
    grads = (*result.grad_queries.split_with_sizes([r.size(0) for r in reps[0]]),
             *result.grad_docs.reshape(-1, result.grad_docs.size(-1)).split_with_sizes([r.size(0) for r in docs]))
    for r, g in zip((*reps[0], *docs), grads):
        if r.grad is None:
            r.grad = g
        else:
            r.grad += g
    return result.loss.detach()


def fused_mnrl_loss(loss: st_losses.MultipleNegativesRankingLoss, embeddings: list[Tensor], similarity: str,
                    doc_ids: Tensor | None = None, with_grad: bool = False) -> Tensor | ContrastiveLossAndGrad:
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings through the fused op (``loss`` holds the options:
    scale, directions, partition_mode, hardness, gather_across_devices; ``doc_ids`` [C, P] masks duplicates);
    ``with_grad``: the loss and its embedding gradients without a graph (not when gathering)."""
    check_columns(embeddings)
    queries, docs = embeddings[0], embeddings[1:]
    all_queries = None
    if gathering(loss.gather_across_devices):
        check_same_layout_on_every_rank(queries.device, columns=len(embeddings), rows=queries.size(0),
                                        dim=queries.size(1))
        all_queries = all_gather_with_grad(queries)
        docs = [all_gather_with_grad(doc) for doc in docs]
    return loss_op(loss, with_grad)(
        queries,
        torch.cat(docs) if len(docs) > 1 else docs[0],
        all_queries=all_queries,
        offset=0 if all_queries is None else get_rank() * queries.size(0),
        scale=as_float(loss.scale),
        similarity=similarity,
        directions=loss.directions,
        partition_mode=loss.partition_mode,
        hardness_mode=loss.hardness_mode,
        hardness_strength=as_float(loss.hardness_strength),
        doc_ids=None if doc_ids is None else doc_ids.reshape(-1).to(queries.device),
    )


class DuplicateMasking:
    """The keyword ``mask_duplicates`` (beyond upstream, default off): a candidate whose text is identical to a
    row's positive (same non-padding token ids, see fastcache.losses.duplicates) is not that row's negative."""

    # the ops of the loss stage (loss_op): fastcache's MatryoshkaLoss sets them on its inner loss; None: the
    # contrastive op (class attributes, so that the lookup at every step does not fail through Module.__getattr__)
    fused_op: Callable | None = None
    fused_op_and_grad: Callable | None = None

    def __init__(self, *args, mask_duplicates: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(mask_duplicates, bool):
            raise ValueError(f"mask_duplicates must be True or False, got {mask_duplicates!r}")
        self.mask_duplicates = mask_duplicates
        self.check_duplicate_masking()

    def unfused_reason(self) -> str | None:
        """Why this configuration has no fused form (the loss then runs sentence-transformers' maths), naming the
        argument; None when the loss stage runs through the fused op."""
        raise NotImplementedError

    @property
    def fused(self) -> bool:
        """Whether the loss stage runs through the fused op (:meth:`unfused_reason` is None)."""
        return self.unfused_reason() is None

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


class _MNRLOptions(DuplicateMasking):
    """The options of the MultipleNegativesRankingLoss family that the fused op takes."""

    def unfused_reason(self) -> str | None:
        if fused_similarity(self.similarity_fct) is None:
            name = getattr(self.similarity_fct, "__name__", repr(self.similarity_fct))
            return f"similarity_fct={name} has no fused form (cos_sim and dot_score have)"
        if positive_float(self.scale) is None:
            return f"{describe('scale', self.scale)} is not a finite positive number without gradient"
        if finite_float(self.hardness_strength) is None:
            return f"{describe('hardness_strength', self.hardness_strength)} is not a finite number"
        return None


class _FusedMNRL(_MNRLOptions):
    """compute_loss_from_embeddings of the MultipleNegativesRankingLoss family through the fused op."""

    def forward(self, sentence_features, labels: Tensor | None) -> Tensor:
        if not self.mask_duplicates:
            return super().forward(sentence_features, labels)
        self.check_duplicate_masking()
        sentence_features = list(sentence_features)
        doc_ids = self.duplicate_ids(sentence_features)
        embeddings = embed_columns(self.model, sentence_features)
        return fused_mnrl_loss(self, embeddings, fused_similarity(self.similarity_fct), doc_ids)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], labels: Tensor | None) -> Tensor:
        if not self.fused:
            return super().compute_loss_from_embeddings(embeddings, labels)
        return fused_mnrl_loss(self, embeddings, fused_similarity(self.similarity_fct))


class _FusedCachedMNRL(_MNRLOptions):
    """calculate_loss of the cached (GradCache) MultipleNegativesRankingLoss family through the fused op: one
    pass gives the loss and every embedding's gradient, which the gradient cache (fastcache.gradcache) replays."""

    def calculate_loss(self, reps: list[list[Tensor]], labels: Tensor | None = None, *,
                       with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        if not self.fused:
            self.check_duplicate_masking()
            return super().calculate_loss(reps, labels, with_backward=with_backward)
        similarity = fused_similarity(self.similarity_fct)
        embeddings = [torch.cat(column) for column in reps]
        return cached_loss_stage(self, reps, with_backward,
                                 lambda with_grad: fused_mnrl_loss(self, embeddings, similarity, doc_ids, with_grad))


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
