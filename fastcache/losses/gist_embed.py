"""Drop-ins for sentence-transformers' GISTEmbedLoss and CachedGISTEmbedLoss, computed by fastcache's fused op.

GIST (guided in-sample selection of negatives) is the contrastive op with guide embeddings: a candidate is
masked when the guide finds it more similar to the anchor than the anchor's positive, minus a margin. The
anchor-anchor and positive-positive blocks are the op's query_to_query and doc_to_doc directions in guided form.

Arguments: every value sentence-transformers accepts is accepted, numbers of any kind converted to Python floats.
The op takes scale = 1 / temperature finite and non-zero and a finite margin; any other value keeps the upstream
maths for that instance, with upstream's result: ``temperature=0``, ``inf`` or NaN gives NaN (as upstream: the
loss has no finite limit), a margin of +-inf or NaN upstream's finite loss (NaN or -inf: no candidate is masked;
+inf: every candidate but the positive). ``mask_duplicates=True`` needs the fused op and raises a ValueError naming
the argument otherwise. Autocast: float32 loss, see :mod:`fastcache.losses.multiple_negatives_ranking`.

Deliberate difference: a negative temperature runs fused and gives a finite loss where upstream's is NaN.
Upstream masks a candidate by setting its similarity to -inf and then divides by the temperature: a negative one
turns the mask into +inf, and the cross-entropy into NaN as soon as one candidate is masked (always with the
default ``contrast_anchors=True``, whose anchor-anchor diagonal the guide masks: e.g. NaN at
``temperature=-0.01`` on 8 anchor-positive-negative triplets, where fastcache gives 10.25). fastcache masks after
scaling, so masked candidates are left out of the softmax, as at any positive temperature. Where the guide masks
nothing (e.g. ``margin=-10``) upstream is finite and both agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from sentence_transformers.base.losses.gradcache import RandContext, _create_minibatch
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.util import all_gather_with_grad, get_rank
from torch import Tensor

from fastcache.losses.arguments import as_float, changed_modules, describe, finite_float
from fastcache.losses.fused_contrastive import (CONTRASTIVE, FusedCachedContrastiveLoss, FusedContrastiveLoss, LossOp,
                                                check_columns, check_same_layout_on_every_rank, gathering)


def retokenized_for_guide(loss, features: dict[str, Tensor]) -> dict:
    """The guide's own inputs for the texts of ``features`` (the guide has another vocabulary or a shorter
    maximum length): decoded with the model's tokenizer, preprocessed by the guide, tensors on its device."""
    texts = loss.tokenizer.batch_decode(features["input_ids"], skip_special_tokens=True)
    return {k: v.to(loss.guide.device) if isinstance(v, Tensor) else v for k, v in loss.guide.preprocess(texts).items()}


class _GISTOptions(FusedContrastiveLoss):
    """The options of the GIST losses that the fused op takes, and their adapter."""

    def unfused_reason(self) -> str | None:
        temperature = as_float(self.temperature)
        scale = 1.0 / temperature if temperature and math.isfinite(temperature) else None  # the op's: finite, != 0
        if scale is None or not math.isfinite(scale):
            return f"{describe('temperature', self.temperature)} is not a non-zero number with a finite inverse"
        if finite_float(self.margin) is None:
            return f"{describe('margin', self.margin)} is not a finite number"
        return changed_modules(self, "similarity_fct", "cross_entropy_loss")  # replaced after construction

    def op_arguments(self, embeddings: list[Tensor], guide_embeddings: list[Tensor] | None = None,
                     doc_ids: Tensor | None = None) -> tuple[Tensor, Tensor, dict]:
        """The GISTEmbedLoss of anchors, positives and any negative columns as op arguments: the anchors are the
        queries, the candidates the docs [C, P, D], the guide's columns the guide queries and docs, with
        scale = 1 / temperature, margin, margin_strategy and the directions of contrast_anchors and
        contrast_positives; anchors stay local and candidates are gathered with gather_across_devices."""
        check_columns(embeddings)
        if guide_embeddings is None or len(guide_embeddings) != len(embeddings):
            raise ValueError(f"The guide gave {0 if guide_embeddings is None else len(guide_embeddings)} columns of "
                             f"embeddings, the model {len(embeddings)}")
        anchors, candidates = embeddings[0], embeddings[1:]
        guide_anchors, guide_candidates = guide_embeddings[0], guide_embeddings[1:]
        offset = 0
        if gathering(self.gather_across_devices):  # anchors stay local; candidates are gathered
            check_same_layout_on_every_rank(anchors.device, columns=len(embeddings), rows=anchors.size(0),
                                            dim=anchors.size(1), guide_dim=guide_anchors.size(1))
            candidates = [all_gather_with_grad(c) for c in candidates]
            guide_candidates = [all_gather_with_grad(c) for c in guide_candidates]
            offset = get_rank() * anchors.size(0)
        directions = ("query_to_doc",) + ("query_to_query",) * self.contrast_anchors + (
            "doc_to_doc",) * self.contrast_positives
        return anchors, torch.stack(candidates), dict(
            guide_queries=guide_anchors,
            guide_docs=torch.stack(guide_candidates),
            scale=1.0 / as_float(self.temperature),
            similarity="cos",
            directions=directions,
            offset=offset,
            margin=as_float(self.margin),
            margin_strategy=self.margin_strategy,
            doc_ids=None if doc_ids is None else doc_ids.to(anchors.device),
        )


class GISTEmbedLoss(_GISTOptions, st_losses.GISTEmbedLoss):
    """sentence-transformers' GISTEmbedLoss, loss stage fused by fastcache."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        if not self.fused:
            self.check_duplicate_masking()
            return super().forward(sentence_features, labels)
        return self.fused_forward(sentence_features, labels)

    def fused_forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None,
                      op: LossOp = CONTRASTIVE) -> Tensor:
        sentence_features = list(sentence_features)
        doc_ids = self.duplicate_ids(sentence_features)
        # the guide embeds shallow copies: it writes its outputs into the features it is given
        guide_features = [dict(features) for features in sentence_features]
        embeddings = embed_columns(self.model, sentence_features)
        with torch.no_grad():
            if self.must_retokenize:
                guide_features = [retokenized_for_guide(self, features) for features in sentence_features]
            guide_embeddings = embed_columns(self.guide, guide_features)
        if len(embeddings) not in (2, 3):
            raise ValueError(f"Expected 2 or 3 embeddings, got {len(embeddings)}")
        return self.fused_loss(embeddings, guide_embeddings, doc_ids=doc_ids, op=op)


class CachedGISTEmbedLoss(_GISTOptions, FusedCachedContrastiveLoss, st_losses.CachedGISTEmbedLoss):
    """sentence-transformers' CachedGISTEmbedLoss, loss stage fused by fastcache, with fastcache's gradient cache."""

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        return self.forward_cached(sentence_features, labels)

    def embed_minibatch(self, sentence_feature: dict[str, Tensor], begin: int, end: int, with_grad: bool,
                        copy_random_state: bool, random_state: RandContext | None = None):
        """Upstream's, except that a retokenizing guide gets only its tensors moved to its device (upstream
        calls .to() on every preprocess output, and sentence-transformers 6 adds the string 'modality')."""
        if with_grad or not self.must_retokenize:
            return super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)
        minibatch = _create_minibatch(sentence_feature, begin, end)
        with random_state or nullcontext(), torch.no_grad():
            state = RandContext(*minibatch.values()) if copy_random_state else None
            reps = self.model(minibatch)["sentence_embedding"]
            guide_reps = self.guide(retokenized_for_guide(self, minibatch))["sentence_embedding"]
        return reps, guide_reps, state

    def calculate_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *,
                       with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        if not self.fused:
            self.check_duplicate_masking()
            return super().calculate_loss(reps, reps_guided, with_backward=with_backward)
        return self.cached_loss(reps, reps_guided, with_backward=with_backward, doc_ids=doc_ids)

    def cached_loss(self, reps: list[list[Tensor]], reps_guided: list[list[Tensor]], *, op: LossOp = CONTRASTIVE,
                    with_backward: bool = False, doc_ids: Tensor | None = None) -> Tensor:
        if len(reps) != len(reps_guided):
            raise ValueError("reps and reps_guided must have the same length")
        return self.minibatch_loss(reps, reps_guided, op, with_backward, doc_ids)
