"""mask_duplicates (beyond upstream): a candidate whose text equals a row's positive is not that row's negative.
Checked against the dense reference with duplicate ids taken from the texts themselves (string equality), so the
token hashing is checked too."""

import functools
import warnings

import pytest
import torch
from sentence_transformers.util import cos_sim

from fastcache import losses
from fastcache.reference import contrastive_loss_reference

ANCHORS = ["the cat", "a dog", "sun today", "nice weather", "car at work", "the query"]
POSITIVES = ["cat", "dog", "sun", "weather", "car", "query"]
NEGATIVES = ["dog", "the sun", "cat", "weather", "a car", "cat"]  # "dog", "cat", "weather" repeat positives


def _text_ids(columns):
    """[C, P] ids from the texts: equal text, equal id."""
    vocabulary = {}
    return torch.tensor([[vocabulary.setdefault(t, len(vocabulary)) for t in column] for column in columns])


def _embed(model, texts):
    with torch.no_grad():
        return model(model.preprocess(texts))["sentence_embedding"]


def _loss(cls, model, columns, guide=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        loss_fn = cls(model, guide, **kwargs) if guide is not None else cls(model, **kwargs)
    return loss_fn([model.preprocess(c) for c in columns], None)


@pytest.mark.parametrize("cls, extra", [
    (losses.MultipleNegativesRankingLoss, {}),
    (losses.CachedMultipleNegativesRankingLoss, {"mini_batch_size": 4}),
    (losses.MultipleNegativesRankingLoss, {"directions": ("query_to_doc", "doc_to_doc")}),
    (losses.CachedMultipleNegativesRankingLoss, {"mini_batch_size": 5, "directions": ("query_to_doc", "doc_to_doc")}),
])
def test_mnrl_masks_duplicates_like_the_reference(tiny_model, cls, extra):
    columns = [ANCHORS, POSITIVES, NEGATIVES]
    loss = _loss(cls, tiny_model, columns, mask_duplicates=True, **extra)
    q, p, n = (_embed(tiny_model, c) for c in columns)
    directions = extra.get("directions", ("query_to_doc",))
    expected = contrastive_loss_reference(q, torch.cat([p, n]), doc_ids=_text_ids(columns[1:]).reshape(-1),
                                          directions=directions)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    plain = _loss(cls, tiny_model, columns, **extra)
    assert abs(float(plain) - float(loss)) > 1e-4  # the batch's duplicates really changed the loss


@pytest.mark.parametrize("cls, extra", [(losses.GISTEmbedLoss, {}),
                                        (losses.CachedGISTEmbedLoss, {"mini_batch_size": 4})])
def test_gist_masks_duplicates_like_the_reference(tiny_model, tiny_guide_model, cls, extra):
    columns = [ANCHORS, POSITIVES, NEGATIVES]
    loss = _loss(cls, tiny_model, columns, guide=tiny_guide_model, mask_duplicates=True, margin=0.05, **extra)
    q, p, n = (_embed(tiny_model, c) for c in columns)
    gq, gp, gn = (_embed(tiny_guide_model, c) for c in columns)
    expected = contrastive_loss_reference(
        q, torch.stack([p, n]), guide_queries=gq, guide_docs=torch.stack([gp, gn]), doc_ids=_text_ids(columns[1:]),
        scale=1 / 0.01, directions=("query_to_doc", "query_to_query", "doc_to_doc"), margin=0.05)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_no_duplicates_changes_nothing_and_gradients_flow(tiny_model):
    columns = [ANCHORS, POSITIVES]  # the positives are all distinct
    tiny_model.zero_grad()
    masked = _loss(losses.CachedMultipleNegativesRankingLoss, tiny_model, columns, mask_duplicates=True,
                   mini_batch_size=4)
    masked.backward()
    grads = [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]
    tiny_model.zero_grad()
    plain = _loss(losses.CachedMultipleNegativesRankingLoss, tiny_model, columns, mini_batch_size=4)
    plain.backward()
    torch.testing.assert_close(masked, plain, rtol=0, atol=0)
    for a, b in zip(grads, [p.grad for p in tiny_model.parameters() if p.grad is not None]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_config_and_validation(tiny_model):
    assert losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates=True).get_config_dict()[
        "mask_duplicates"] is True
    assert "mask_duplicates" not in losses.MultipleNegativesRankingLoss(tiny_model).get_config_dict()
    with pytest.raises(ValueError, match="mask_duplicates must be True or False"):
        losses.MultipleNegativesRankingLoss(tiny_model, mask_duplicates="yes")
    with pytest.raises(ValueError, match="mask_duplicates=True needs the fused loss, and similarity_fct"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, similarity_fct=functools.partial(cos_sim),
                                                  mask_duplicates=True)
