"""An attribute that upstream's maths calls (similarity_fct, cross_entropy_loss), replaced or reconfigured on an
instance after construction, gives upstream's result: the loss keeps the upstream maths, as for a constructor
argument without a fused form; an unchanged module stays fused."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_losses import _assert_same, _make, _run, _texts
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from ranking_table import build_tiny_cross_encoder, text_lists  # noqa: E402

from fastcache.cross_encoder import losses as ce_losses  # noqa: E402

st_ce_losses = pytest.importorskip("sentence_transformers.cross_encoder.losses")


class DotSimilarity(nn.Module):
    """A similarity module of the user's own (the dot product along the last dimension)."""

    def forward(self, a, b):
        return (a * b).sum(-1)


def _sum(loss):
    loss.cross_entropy_loss = nn.CrossEntropyLoss(reduction="sum")


def _ignore_first_row_in_place(loss):
    loss.cross_entropy_loss.ignore_index = 0  # label smoothing would be inf upstream: GIST masks with -inf


class MatrixDot(nn.Module):
    """A similarity-matrix module of the user's own (all pairs' dot products, as MNRL's similarity_fct)."""

    def forward(self, a, b):
        return a @ b.T


def _dot(loss):
    loss.similarity_fct = DotSimilarity()


def _matrix_dot(loss):
    loss.similarity_fct = MatrixDot()


def _scaled_matrix_dot(loss):
    loss.similarity_fct = MatrixDot()
    loss.scale = 0.5


GIST_OVERRIDES = {"ce_sum": _sum, "ce_ignore_index_in_place": _ignore_first_row_in_place, "similarity_dot": _dot}


def _both_overridden(name, override, model, guide, **kwargs):
    texts = _texts(3)
    ours, theirs = _make(name, "fc", model, guide, **kwargs), _make(name, "st", model, guide, **kwargs)
    assert ours.fused
    override(ours)
    override(theirs)
    return ours, _run(ours, model, texts), _run(theirs, model, texts)


@pytest.mark.parametrize("override", GIST_OVERRIDES, ids=list(GIST_OVERRIDES))
@pytest.mark.parametrize("name", ["GISTEmbedLoss", "CachedGISTEmbedLoss"])
def test_gist_overridden_after_construction_gives_upstream_result(model, tiny_guide_model, name, override):
    kwargs = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    loss, actual, expected = _both_overridden(name, GIST_OVERRIDES[override], model, tiny_guide_model, **kwargs)
    assert not loss.fused
    assert ("similarity_fct" if "similarity" in override else "cross_entropy_loss") in loss.unfused_reason()
    _assert_same(actual, expected, what=f"{name} {override}")


@pytest.mark.parametrize("name", ["GISTEmbedLoss", "CachedGISTEmbedLoss"])
def test_gist_unchanged_modules_stay_fused(model, tiny_guide_model, name):
    kwargs = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    loss = _make(name, "fc", model, tiny_guide_model, **kwargs)
    loss.cross_entropy_loss = nn.CrossEntropyLoss()
    loss.similarity_fct = nn.CosineSimilarity(dim=-1)
    assert loss.fused


@pytest.mark.parametrize("override", [_matrix_dot, _scaled_matrix_dot], ids=["dot", "dot_scale"])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_mnrl_similarity_overridden_after_construction_gives_upstream_result(model, name, override):
    kwargs = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    loss, actual, expected = _both_overridden(name, override, model, None, **kwargs)
    assert not loss.fused and "similarity_fct" in loss.unfused_reason()
    _assert_same(actual, expected, what=f"{name} {override.__name__}")


# ---------------------------------------------------------------------------------------------------------------
# Cross-encoder losses: cross_entropy_loss
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_cross_encoder"), seed=0)
    model.eval()
    return model


def _loss_and_grads(criterion, model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = criterion(inputs, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_close(ours, theirs):
    (loss, grads), (want_loss, want_grads) = ours, theirs
    torch.testing.assert_close(loss, want_loss.float(), rtol=1e-5, atol=1e-7)
    scale = max(float(g.abs().max()) for g in want_grads)
    for g, want in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-3 * scale)


CE_CASES = {
    "listnet_class_weights": ("ListNetLoss", {}, lambda loss: setattr(
        loss, "cross_entropy_loss", nn.CrossEntropyLoss(weight=torch.tensor([4.0, 1.0, 1.0, 1.0])))),
    "listnet_sum": ("ListNetLoss", {}, _sum),
    "mnrl_sum": ("MultipleNegativesRankingLoss", {"num_negatives": None}, _sum),
    "cached_mnrl_sum_in_place": ("CachedMultipleNegativesRankingLoss", {"num_negatives": None, "mini_batch_size": 3},
                                 lambda loss: setattr(loss.cross_entropy_loss, "reduction", "sum")),
}


@pytest.mark.parametrize("case", CE_CASES)
def test_cross_encoder_cross_entropy_overridden_gives_upstream_result(cross_encoder, case):
    name, kwargs, override = CE_CASES[case]
    if name == "ListNetLoss":
        inputs, labels = text_lists(3, 4, seed=3)  # 4 documents per query: the class weights' length
    else:
        (queries, docs), _ = text_lists(4, 2, seed=10)
        inputs, labels = [queries, [d[0] for d in docs], [d[1] for d in docs]], None
    ours, theirs = getattr(ce_losses, name)(cross_encoder, **kwargs), getattr(st_ce_losses, name)(cross_encoder,
                                                                                                    **kwargs)
    default = _loss_and_grads(ours, cross_encoder, inputs, labels)
    override(ours)
    override(theirs)
    actual, expected = (_loss_and_grads(ours, cross_encoder, inputs, labels),
                        _loss_and_grads(theirs, cross_encoder, inputs, labels))
    assert not torch.allclose(default[0], expected[0])  # the override changes upstream's loss
    _assert_close(actual, expected)
