"""fastcache.cross_encoder.losses against sentence-transformers' classes of the same names: loss and parameter
gradients on a tiny offline CrossEncoder, the loss maths on precomputed scores (a stand-in model) for every option,
gradient caching (cached == uncached, dropout replayed), the deliberate differences (finite where upstream is
NaN/inf) and the errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

st_losses = pytest.importorskip("sentence_transformers.cross_encoder.losses")

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from ranking_table import FixedScores, build_tiny_cross_encoder, listwise_batch, text_lists  # noqa: E402

from fastcache.cross_encoder import losses  # noqa: E402

LISTWISE = {  # name -> (fastcache class, upstream class, kwargs); scheme objects built per call
    "lambda_ndcg2pp": ("LambdaLoss", {}),
    "lambda_ndcg2pp_upstream_scheme_mu": ("LambdaLoss", {"weighting_scheme": lambda: st_losses.NDCGLoss2PPScheme(3.0)}),
    "lambda_none": ("LambdaLoss", {"weighting_scheme": lambda: None}),
    "lambda_ndcg1_k": ("LambdaLoss", {"weighting_scheme": lambda: losses.NDCGLoss1Scheme(), "k": 3}),
    "lambda_ndcg2_natural": ("LambdaLoss", {"weighting_scheme": lambda: st_losses.NDCGLoss2Scheme(),
                                            "reduction_log": "natural", "sigma": 0.5}),
    "lambda_lambdarank_sigmoid": ("LambdaLoss", {"weighting_scheme": lambda: losses.LambdaRankScheme(),
                                                 "activation_fn": lambda: torch.nn.Sigmoid(), "eps": 1e-4}),
    "ranknet": ("RankNetLoss", {"k": 4}),
    "listmle": ("ListMLELoss", {}),
    "listmle_by_label": ("ListMLELoss", {"respect_input_order": False}),
    "plistmle": ("PListMLELoss", {}),
    "plistmle_discount_fn": ("PListMLELoss", {"lambda_weight": lambda: st_losses.PListMLELambdaWeight(
        rank_discount_fn=lambda mask: 1.0 / torch.log2(torch.arange(mask.size(1)) + 2.0) * mask)}),
    "listnet": ("ListNetLoss", {"activation_fn": lambda: torch.nn.Tanh()}),
}


def build(name: str, impl, model, **extra):
    cls_name, kwargs = LISTWISE[name]
    kwargs = {k: (v() if callable(v) and not isinstance(v, torch.nn.Module) else v) for k, v in kwargs.items()}
    return getattr(impl, cls_name)(model, **kwargs, **extra)


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    model = build_tiny_cross_encoder(tmp_path_factory.mktemp("tiny_cross_encoder"), seed=0)
    model.eval()
    return model


@pytest.fixture(scope="module")
def ragged_batch():
    """Three queries with 2, 5 and 3 documents, graded labels."""
    (queries, docs), labels = text_lists(3, 5, seed=1)
    docs = [docs[0][:2], docs[1], docs[2][:3]]
    labels = [labels[0][:2], labels[1], labels[2][:3]]
    labels[0] = torch.tensor([2.0, 0.0])
    return [queries, docs], labels


def loss_and_grads(criterion, model, inputs, labels):
    model.zero_grad(set_to_none=True)
    loss = criterion(inputs, labels)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same(ours, theirs, rtol=1e-5):
    (loss, grads), (want_loss, want_grads) = ours, theirs
    assert torch.isfinite(want_loss)
    torch.testing.assert_close(loss, want_loss.float(), rtol=rtol, atol=1e-7)
    assert len(grads) == len(want_grads)
    scale = max(float(g.abs().max()) for g in want_grads)
    for g, want in zip(grads, want_grads):
        torch.testing.assert_close(g, want, rtol=rtol, atol=1e-3 * scale)  # float32 noise through the BERT


@pytest.mark.parametrize("name", list(LISTWISE))
def test_listwise_matches_sentence_transformers(name, cross_encoder, ragged_batch):
    inputs, labels = ragged_batch
    ours = build(name, losses, cross_encoder, mini_batch_size=4)
    theirs = build(name, st_losses, cross_encoder, mini_batch_size=4)
    assert isinstance(ours, type(theirs))
    assert ours.get_config_dict().keys() == theirs.get_config_dict().keys()
    assert ours.citation == theirs.citation
    assert_same(loss_and_grads(ours, cross_encoder, inputs, labels),
                loss_and_grads(theirs, cross_encoder, inputs, labels))


@pytest.mark.parametrize("name", list(LISTWISE))
def test_loss_maths_on_fixed_scores(name):
    """Longer ragged lists (up to 40) on precomputed scores: the upstream class's maths, loss and score gradients."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 40, generator=g) * 2
    # graded labels made distinct: upstream sorts by label with an unstable sort, so ties could order differently
    labels = torch.randint(0, 5, (4, 40), generator=g).float() + 0.01 * torch.rand(4, 40, generator=g)
    lengths = [40, 1, 17, 33]
    results = []
    for impl in (losses, st_losses):
        model = FixedScores(scores)
        inputs, label_list = listwise_batch(scores, labels, lengths)
        loss = build(name, impl, model)(inputs, label_list)
        loss.backward()
        results.append((loss.detach(), model.scores.grad))
    (loss, grad), (want_loss, want_grad) = results
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=2e-4, atol=2e-6 * float(want_grad.abs().max()))


def test_custom_scheme_keeps_upstream_maths(cross_encoder, ragged_batch):
    class Halved(st_losses.NDCGLoss2Scheme):
        def forward(self, gain, discount, true_sorted):
            return super().forward(gain, discount, true_sorted) / 2

    inputs, labels = ragged_batch
    ours = losses.LambdaLoss(cross_encoder, weighting_scheme=Halved())
    assert not ours.fused
    assert_same(loss_and_grads(ours, cross_encoder, inputs, labels),
                loss_and_grads(st_losses.LambdaLoss(cross_encoder, weighting_scheme=Halved()), cross_encoder,
                               inputs, labels))
    with pytest.raises(ValueError, match="cache_gradients=True needs the fused loss"):
        losses.LambdaLoss(cross_encoder, weighting_scheme=Halved(), cache_gradients=True)


@pytest.mark.parametrize("name", ["lambda_ndcg2pp", "ranknet", "plistmle", "listmle_by_label", "listnet"])
def test_cached_equals_uncached_with_dropout(name, tmp_path):
    """cache_gradients=True in train mode (dropout on): the replay reproduces every mini-batch's dropout, so loss
    and parameter gradients equal the uncached loss's with the same mini-batches and seed."""
    model = build_tiny_cross_encoder(tmp_path / "model", seed=3)
    model.train()
    (queries, docs), labels = text_lists(3, 7, seed=4)
    docs[1], labels[1] = docs[1][:4], labels[1][:4]
    results = []
    for cached in (False, True):
        torch.manual_seed(5)
        criterion = build(name, losses, model, mini_batch_size=5, cache_gradients=cached)
        results.append(loss_and_grads(criterion, model, [queries, docs], labels))
    assert_same(results[1], results[0], rtol=1e-5)
    with torch.no_grad():  # evaluation: no cache, no hook
        torch.manual_seed(5)
        loss = build(name, losses, model, mini_batch_size=5, cache_gradients=True)([queries, docs], labels)
    torch.testing.assert_close(loss, results[0][0])


def test_upstream_nan_and_overflow_are_finite_here():
    """Deliberate differences: LambdaLoss with all labels equal (upstream NaN) is 0 with zero gradients;
    ListMLE / PListMLE with scores past ~88 (upstream's exp overflows) are finite and shift-invariant."""
    scores = torch.randn(2, 6, generator=torch.Generator().manual_seed(6))
    equal = torch.ones(2, 6)
    model = FixedScores(scores)
    inputs, label_list = listwise_batch(scores, equal, [6, 4])
    assert torch.isnan(st_losses.LambdaLoss(model)(inputs, label_list))
    loss = losses.LambdaLoss(model)(inputs, label_list)
    loss.backward()
    assert loss == 0 and (model.scores.grad == 0).all()

    labels = torch.randint(0, 3, (2, 6), generator=torch.Generator().manual_seed(7)).float()
    for name in ("ListMLELoss", "PListMLELoss"):
        values = []
        for shift in (0.0, 200.0):
            model = FixedScores(scores + shift)
            inputs, label_list = listwise_batch(scores, labels, [6, 4])
            values.append(getattr(losses, name)(model)(inputs, label_list))
            if shift:
                assert not torch.isfinite(getattr(st_losses, name)(model)(inputs, label_list))
        assert math.isfinite(float(values[1]))
        torch.testing.assert_close(values[1], values[0], rtol=1e-4, atol=1e-4)


def test_plistmle_long_lists_are_finite():
    """Upstream's default position weights overflow past ~127 documents (NaN); here they are finite."""
    scores = torch.randn(1, 300, generator=torch.Generator().manual_seed(8))
    labels = torch.rand(1, 300, generator=torch.Generator().manual_seed(9))
    model = FixedScores(scores)
    inputs, label_list = listwise_batch(scores, labels, [300])
    assert torch.isnan(st_losses.PListMLELoss(model)(inputs, label_list))
    loss = losses.PListMLELoss(model)(inputs, label_list)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(model.scores.grad).all()


def test_errors_as_upstream(cross_encoder, ragged_batch):
    inputs, labels = ragged_batch
    for name in ("LambdaLoss", "ListMLELoss", "ListNetLoss", "PListMLELoss", "RankNetLoss"):
        criterion = getattr(losses, name)(cross_encoder)
        with pytest.raises(ValueError, match="expects a list of labels for each sample"):
            criterion(inputs, torch.ones(3))
        with pytest.raises(ValueError, match="expects two inputs"):
            criterion(inputs + [inputs[0]], labels)
        with pytest.raises(ValueError, match="does not match number of labels per query"):
            criterion(inputs, [labels[0], labels[1], labels[2][:2]])
    bad = [labels[0], labels[1].clone(), labels[2]]
    bad[1][2] = float("nan")
    with pytest.raises(ValueError, match="labels must not be NaN"):
        losses.LambdaLoss(cross_encoder)(inputs, bad)
    with pytest.raises(ValueError, match="cache_gradients must be a bool"):
        losses.ListNetLoss(cross_encoder, cache_gradients="yes")


@pytest.mark.parametrize("cached", [False, True])
def test_multiple_negatives_ranking_matches(cached, cross_encoder):
    """Cross-encoder (Cached)MultipleNegativesRankingLoss: the same loss and gradients (num_negatives=None, so
    no random negative sampling), with a hard-negative column and the default sigmoid activation and scale."""
    (queries, docs), _ = text_lists(4, 2, seed=10)
    inputs = [queries, [d[0] for d in docs], [d[1] for d in docs]]
    name = "CachedMultipleNegativesRankingLoss" if cached else "MultipleNegativesRankingLoss"
    kwargs = {"num_negatives": None, **({"mini_batch_size": 3} if cached else {})}
    ours = getattr(losses, name)(cross_encoder, **kwargs)
    theirs = getattr(st_losses, name)(cross_encoder, **kwargs)
    assert isinstance(ours, type(theirs))
    assert_same(loss_and_grads(ours, cross_encoder, inputs, None), loss_and_grads(theirs, cross_encoder, inputs, None))
