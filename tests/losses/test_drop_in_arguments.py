"""Drop-in means: every argument value sentence-transformers accepts, fastcache accepts, with upstream's result.

NumPy scalars and one-element tensors are converted to Python numbers at the loss layer; values the fused ops do
not take (scale=inf, temperature=0 or inf, non-finite margins, LambdaLoss sigma=0 / eps<0 / k<0, ...) keep the
upstream maths for that instance, so the result is upstream's (NaN included); errors name the argument. Where
upstream's result is NaN or inf and a finite answer exists, the fused op gives the finite one (LambdaLoss eps=0;
a negative GIST temperature: tests/contrastive/test_negative_scale.py). mini_batch_size="auto"'s error names the argument
that keeps the loss unfused. Also the autocast dtype: fastcache's loss is float32 where upstream's
MultipleNegativesRankingLoss returns bf16.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss as STMatryoshka
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss as STMNRL
from test_losses import MAIN_KWARGS, _assert_same, _features, _make, _run, _texts

from fastcache import losses as fc_losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from ranking_table import FixedScores, listwise_batch  # noqa: E402

from fastcache.cross_encoder import losses as ce_losses  # noqa: E402

st_ce_losses = pytest.importorskip("sentence_transformers.cross_encoder.losses")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def guide(tiny_guide_model):
    return tiny_guide_model


def _both(name, model, guide, **kwargs):
    """(fastcache's, upstream's) ``name`` with ``kwargs``: loss and parameter gradients on the same texts."""
    texts = _texts(3)
    return _run(_make(name, "fc", model, guide, **kwargs), model, texts), \
        _run(_make(name, "st", model, guide, **kwargs), model, texts)


# ---------------------------------------------------------------------------------------------------------------
# Numbers of any kind: the fused op, upstream's result
# ---------------------------------------------------------------------------------------------------------------

NUMBERS = [
    ("MultipleNegativesRankingLoss", {"scale": np.float32(20)}),
    ("MultipleNegativesRankingLoss", {"scale": torch.tensor(20.0)}),
    ("MultipleNegativesRankingLoss", {"scale": np.int64(20)}),
    ("MultipleNegativesRankingLoss", {"hardness_mode": "all_negatives", "hardness_strength": np.float32(2)}),
    ("CachedMultipleNegativesRankingLoss", {"scale": np.float32(20), "mini_batch_size": 3}),
    ("MultipleNegativesSymmetricRankingLoss", {"scale": torch.tensor(10.0)}),
    ("GISTEmbedLoss", {"temperature": np.float32(0.05), "margin": np.float64(0.02)}),
    ("CachedGISTEmbedLoss", {"temperature": torch.tensor(0.05), "mini_batch_size": 3}),
]


@pytest.mark.parametrize(("name", "kwargs"), NUMBERS, ids=[f"{n}-{k}" for n, k in NUMBERS])
def test_numpy_and_tensor_numbers_are_fused_with_upstream_results(model, guide, name, kwargs):
    loss = _make(name, "fc", model, guide, **kwargs)
    assert loss.fused
    actual, expected = _both(name, model, guide, **kwargs)
    _assert_same(actual, expected, what=f"{name}{kwargs}")


def test_matryoshka_numpy_dims_and_weights(model):
    dims, weights = [np.int64(32), np.int64(16)], [np.float32(1.0), np.float64(0.5)]
    ours = fc_losses.MatryoshkaLoss(model, fc_losses.MultipleNegativesRankingLoss(model), dims, weights)
    assert ours.fused
    theirs = STMatryoshka(model, STMNRL(model), dims, weights)
    texts = _texts(3)
    _assert_same(_run(ours, model, texts), _run(theirs, model, texts), what="Matryoshka numpy dims")


# ---------------------------------------------------------------------------------------------------------------
# Values the op does not take: upstream's maths for that instance
# ---------------------------------------------------------------------------------------------------------------

INF, NAN = float("inf"), float("nan")
OUTSIDE = [  # (name, kwargs, upstream's loss is finite)
    ("MultipleNegativesRankingLoss", {"scale": INF}, False),
    ("MultipleNegativesRankingLoss", {"hardness_mode": "all_negatives", "hardness_strength": INF}, False),
    ("CachedMultipleNegativesRankingLoss", {"scale": INF, "mini_batch_size": 3}, False),
    ("GISTEmbedLoss", {"temperature": 0}, False),
    ("GISTEmbedLoss", {"temperature": NAN}, False),
    ("GISTEmbedLoss", {"temperature": INF}, False),
    ("CachedGISTEmbedLoss", {"temperature": 0.0, "mini_batch_size": 3}, False),
    ("CachedGISTEmbedLoss", {"temperature": -INF, "mini_batch_size": 3}, False),
    ("GISTEmbedLoss", {"margin": NAN}, True),
    ("GISTEmbedLoss", {"margin": -INF, "margin_strategy": "relative"}, True),
    ("CachedGISTEmbedLoss", {"margin": NAN, "mini_batch_size": 3}, True),
    ("GISTEmbedLoss", {"margin": INF}, False),  # upstream: 0 (every candidate but the positive masked)
]


@pytest.mark.parametrize(("name", "kwargs", "finite"), OUTSIDE, ids=[f"{n}-{k}" for n, k, _ in OUTSIDE])
def test_values_outside_the_op_give_upstream_results(model, guide, name, kwargs, finite):
    loss = _make(name, "fc", model, guide, **kwargs)
    assert not loss.fused
    texts = _texts(3)
    if finite:
        actual, expected = _both(name, model, guide, **kwargs)
        _assert_same(actual, expected, what=f"{name}{kwargs}")
        return
    with torch.no_grad():
        value = loss(_features(model, texts), None)
        want = _make(name, "st", model, guide, **kwargs)(_features(model, texts), None)
    torch.testing.assert_close(value, want, equal_nan=True, rtol=1e-5, atol=1e-6)


def test_scale_tensor_that_requires_grad_is_trained_as_upstream(model):
    grads = []
    for impl in ("fc", "st"):
        scale = torch.tensor(20.0, requires_grad=True)
        loss = _make("MultipleNegativesRankingLoss", impl, model, scale=scale)
        loss(_features(model, _texts(3)), None).backward()
        grads.append(scale.grad)
    assert grads[0] is not None and float(grads[0].abs()) > 0
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize(("name", "kwargs", "argument"), [
    ("GISTEmbedLoss", {"temperature": INF}, "temperature=inf"),
    ("GISTEmbedLoss", {"margin": NAN}, "margin=nan"),
    ("CachedGISTEmbedLoss", {"temperature": 0}, "temperature=0"),
    ("MultipleNegativesRankingLoss", {"scale": INF}, "scale=inf"),
])
def test_errors_name_the_argument(model, guide, name, kwargs, argument):
    """mask_duplicates needs the fused op: the error names the argument that rules it out."""
    with pytest.raises(ValueError, match=argument):
        _make(name, "fc", model, guide, mask_duplicates=True, **kwargs)
    loss = _make(name, "fc", model, guide, mask_duplicates=True)
    for key, value in kwargs.items():  # set after construction: the forward says so
        setattr(loss, key, value)
    with pytest.raises(ValueError, match=argument):
        loss(_features(model, _texts(3)), None)


# ---------------------------------------------------------------------------------------------------------------
# Autocast: float32 loss where upstream's MNRL is bf16 (documented in the module docstrings)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss",
                                  "GISTEmbedLoss"])
def test_autocast_loss_is_float32_and_closer_than_upstream(model, guide, name):
    texts = _texts(3)
    out = {}
    for impl in ("fc", "st"):
        loss = _make(name, impl, model, guide, **MAIN_KWARGS[name])
        with torch.no_grad():
            full = loss(_features(model, texts), None)
            with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
                out[impl] = (full, loss(_features(model, texts), None))
    assert out["fc"][1].dtype == torch.float32
    truth = out["st"][0].double()
    error = {impl: abs(float(out[impl][1].double() - truth)) / abs(float(truth)) for impl in out}
    assert error["fc"] < 1e-4, error
    if "GIST" not in name:  # upstream: bf16, ~1e-2 relative off (module docstring of multiple_negatives_ranking)
        assert out["st"][1].dtype == torch.bfloat16
        assert error["fc"] < error["st"], error


# ---------------------------------------------------------------------------------------------------------------
# Cross-encoder LambdaLoss / MultipleNegativesRankingLoss
# ---------------------------------------------------------------------------------------------------------------

LAMBDA = [
    ({"k": 0}, True), ({"k": np.int64(3)}, True), ({"sigma": np.float32(0.5)}, True),
    ({"eps": np.float64(1e-6)}, True), ({"reduction_log": "log2"}, True),
    ({"weighting_scheme": lambda: st_ce_losses.NDCGLoss2PPScheme(mu=np.float32(3))}, True),
    ({"eps": 0}, True), ({"eps": np.float32(0)}, True),
    ({"k": -2}, False), ({"sigma": 0}, False), ({"sigma": -1.0}, False),
    ({"weighting_scheme": lambda: st_ce_losses.NDCGLoss2PPScheme(mu=-1.0)}, False),
]


@pytest.mark.parametrize(("kwargs", "fused"), LAMBDA, ids=[str(k) for k, _ in LAMBDA])
def test_lambda_loss_arguments_give_upstream_results(kwargs, fused):
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(3, 7, generator=g) * 3
    labels = torch.randint(0, 4, (3, 7), generator=g).float() + 0.01 * torch.rand(3, 7, generator=g)
    results = []
    for impl in (ce_losses, st_ce_losses):
        model = FixedScores(scores)
        inputs, label_list = listwise_batch(scores, labels, [7, 4, 6])
        built = {k: v() if callable(v) else v for k, v in kwargs.items()}
        loss = impl.LambdaLoss(model, **built)
        if impl is ce_losses:
            assert loss.fused == fused
        value = loss(inputs, label_list)
        value.backward()
        results.append((value.detach(), model.scores.grad))
    (loss, grad), (want_loss, want_grad) = results
    assert torch.isfinite(want_loss)
    torch.testing.assert_close(loss, want_loss, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=2e-4, atol=2e-6 * max(float(want_grad.abs().max()), 1e-6))


def test_lambda_loss_cache_gradients_error_names_the_argument():
    with pytest.raises(ValueError, match="sigma=0"):
        ce_losses.LambdaLoss(FixedScores(torch.zeros(1, 2)), sigma=0, cache_gradients=True)


def test_cross_encoder_mnrl_infinite_scale_as_upstream():
    scores = torch.randn(6, generator=torch.Generator().manual_seed(3))
    values = []
    for impl in (ce_losses, st_ce_losses):
        loss = impl.MultipleNegativesRankingLoss.__new__(impl.MultipleNegativesRankingLoss)
        torch.nn.Module.__init__(loss)
        loss.activation_fn, loss.scale = torch.nn.Identity(), math.inf
        loss.cross_entropy_loss = torch.nn.CrossEntropyLoss()
        values.append(loss.calculate_loss([scores[:3], scores[3:]], 3))
    torch.testing.assert_close(values[0], values[1], equal_nan=True)


# ---------------------------------------------------------------------------------------------------------------
# Where upstream gives NaN or inf and a finite answer exists: the finite one
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("weighting_scheme", [None, st_ce_losses.NDCGLoss2PPScheme, st_ce_losses.NDCGLoss1Scheme],
                         ids=["RankNet", "NDCGLoss2++", "NDCGLoss1"])
def test_lambda_loss_eps_zero_is_finite_where_upstream_is_not(weighting_scheme):
    """eps=0 runs fused: upstream's sigmoid of a pair misordered by 100 underflows to 0 (log 0: loss inf), and a
    list without a positive label has maxDCG 0 (gains 0/0: NaN); fastcache gives -w·log_b sigmoid in log space
    and gains 0, the limit eps -> 0 of upstream's own values."""
    scores = torch.tensor([[0.0, 100.0, 1.0, 0.5, -1.0], [0.3, -0.2, 0.1, 0.0, 2.0]])
    labels = torch.tensor([[3.0, 0.0, 1.0, 2.0, 0.0], [0.0, -1.0, 0.0, -2.0, 0.0]])
    scheme = {"weighting_scheme": None if weighting_scheme is None else weighting_scheme()}
    results = {}
    for impl in (ce_losses, st_ce_losses):
        model = FixedScores(scores)
        inputs, label_list = listwise_batch(scores, labels, [5, 5])
        loss = impl.LambdaLoss(model, eps=0, **scheme)
        if impl is ce_losses:
            assert loss.fused
        value = loss(inputs, label_list)
        value.backward()
        results[impl] = value.detach(), model.scores.grad
    assert not torch.isfinite(results[st_ce_losses][0])
    value, grad = results[ce_losses]
    assert torch.isfinite(value) and float(value) > 1 and torch.isfinite(grad).all()
    # the same loss as with a tiny eps that clamps nothing here (upstream's float64 maths as the reference)
    from fastcache.reference import lambda_loss_reference

    weighting = {None: "none", st_ce_losses.NDCGLoss2PPScheme: "ndcg_loss2pp",
                 st_ce_losses.NDCGLoss1Scheme: "ndcg_loss1"}[weighting_scheme]
    want = lambda_loss_reference(scores.double(), labels.double(), weighting=weighting, eps=1e-300)
    torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=1e-6)


class _NotFusedSimilarity:
    """A similarity_fct with no fused form."""

    __name__ = "my_similarity"

    def __call__(self, a, b):
        return a @ b.T


@pytest.mark.parametrize(("name", "kwargs", "argument"), [
    ("CachedGISTEmbedLoss", {"temperature": 0.0}, "temperature=0.0"),
    ("CachedGISTEmbedLoss", {"margin": NAN}, "margin=nan"),
    ("CachedMultipleNegativesRankingLoss", {"scale": INF}, "scale=inf"),
    ("CachedMultipleNegativesRankingLoss", {"similarity_fct": _NotFusedSimilarity()}, "similarity_fct=my_similarity"),
])
def test_auto_mini_batch_error_names_the_argument(model, guide, name, kwargs, argument):
    """mini_batch_size='auto' needs the fused loss: the error names the argument that rules it out (it blamed
    similarity_fct whatever the reason)."""
    with pytest.raises(ValueError, match="mini_batch_size='auto' needs the fused loss") as error:
        _make(name, "fc", model, guide, mini_batch_size="auto", **kwargs)
    assert argument in str(error.value)
    assert "similarity_fct" not in str(error.value) or "similarity_fct" in kwargs
