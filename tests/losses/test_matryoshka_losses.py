"""fastcache.losses.MatryoshkaLoss / Matryoshka2dLoss against sentence-transformers' on the tiny offline BERT.

fastcache's MatryoshkaLoss around a fastcache contrastive loss (MNRL, the symmetric and cached forms, GIST,
cached GIST) must give the loss and parameter gradients of sentence-transformers' MatryoshkaLoss around
sentence-transformers' loss of the same name (tolerances of tests/losses/test_losses.py), while computing every dim in
one fused op call (and, cached, replaying the mini-batches once). Dims are those of a 384-dim model scaled to the
tiny model's 32 (e.g. 32/17/5: no block size divides them); n_dims_per_step draws from Python's seeded
``random`` exactly as upstream. Any other inner loss runs upstream's own code path; bad arguments give upstream's
errors and warnings.
"""

from __future__ import annotations

import logging
import random

import pytest
import test_losses as tl
import torch
from sentence_transformers.sentence_transformer.losses.cosent import CoSENTLoss
from sentence_transformers.sentence_transformer.losses.matryoshka import MatryoshkaLoss as STMatryoshkaLoss
from sentence_transformers.sentence_transformer.losses.matryoshka_2d import (
    Matryoshka2dLoss as STMatryoshka2dLoss,
)
from sentence_transformers.util import euclidean_sim

from fastcache import losses as fc_losses
from fastcache.losses import matryoshka as fc_matryoshka
from helpers import run_bench_script

WRAPPERS = {"st": (STMatryoshkaLoss, STMatryoshka2dLoss),
            "fc": (fc_losses.MatryoshkaLoss, fc_losses.Matryoshka2dLoss)}


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model


@pytest.fixture(scope="module")
def guide(tiny_guide_model):
    return tiny_guide_model


@pytest.fixture(autouse=True)
def _one_thread_and_clean(model, guide):
    """One intra-op thread (tiny tensors, busy 2-core machine); shared models in eval mode, no gradients."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for m in (model, guide):
        m.eval()
        m.zero_grad(set_to_none=True)
    yield
    torch.set_num_threads(threads)
    for m in (model, guide):
        m.eval()
        m.zero_grad(set_to_none=True)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the calls of the fused Matryoshka op (with or without its gradients, as the cached losses call it)
    made through fastcache's MatryoshkaLoss."""
    calls = []

    def counting(original):
        def counted(*args, **kwargs):
            calls.append(kwargs["dims"])
            return original(*args, **kwargs)
        return counted

    for name in ("matryoshka_contrastive_loss", "matryoshka_contrastive_loss_and_grad"):
        monkeypatch.setattr(fc_matryoshka, name, counting(getattr(fc_matryoshka, name)))
    return calls


def _wrapped(impl, name, model, guide, dims, two_d=False, inner_kwargs=None, **kwargs):
    inner = tl._make(name, impl, model, guide, **(tl.MAIN_KWARGS[name] if inner_kwargs is None else inner_kwargs))
    return WRAPPERS[impl][two_d](model, inner, dims, **kwargs)


def _compare(name, model, guide, dims, *, seed=None, columns=3, two_d=False, inner_kwargs=None, **kwargs):
    """Both implementations on the same texts (Python's random seeded alike before each): same loss, gradients."""
    runs = {}
    for impl in ("st", "fc"):
        loss = _wrapped(impl, name, model, guide, dims, two_d, inner_kwargs, **kwargs)
        if seed is not None:
            random.seed(seed)
        runs[impl] = tl._run(loss, model, tl._texts(columns))
    tl._assert_same(runs["fc"], runs["st"], what=f"Matryoshka({name}, {dims}, {kwargs})")
    return runs["fc"]


DIM_SETS = [([32, 17, 5], None), ([32, 16, 8, 4], [1.0, 0.5, 0.25, 0.125]), ([5, 32, 29, 11], [2, 1, 1, 3])]


@pytest.mark.parametrize(("dims", "weights"), DIM_SETS, ids=[str(d) for d, _ in DIM_SETS])
@pytest.mark.parametrize("name", tl.NAMES)
def test_same_as_upstream_in_one_fused_call(model, guide, op_calls, name, dims, weights):
    _compare(name, model, guide, dims, matryoshka_weights=weights)
    assert op_calls == [sorted(dims, reverse=True)], "every dim must go through one fused op call"


@pytest.mark.parametrize("name", ["CachedMultipleNegativesRankingLoss", "CachedGISTEmbedLoss"])
def test_cached_replays_once_for_all_dims(model, guide, name):
    """Under gradient caching the model runs once per mini-batch to embed and once to replay, whatever the number
    of dims."""
    loss = _wrapped("fc", name, model, guide, [32, 17, 5, 2])
    forwards = []
    hook = model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        tl._run(loss, model, tl._texts(3))
    finally:
        hook.remove()
    mini_batches = 3 * -(-tl.ROWS // tl.MAIN_KWARGS[name]["mini_batch_size"])  # 3 columns of ceil(8/3)
    assert len(forwards) == 2 * mini_batches


@pytest.mark.parametrize("n_dims_per_step", [1, 2, 4])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
                                  "CachedGISTEmbedLoss"])
def test_n_dims_per_step_draws_as_upstream(model, guide, op_calls, name, n_dims_per_step):
    dims = [32, 24, 12, 6]
    for seed in (0, 1):
        _compare(name, model, guide, dims, seed=seed, n_dims_per_step=n_dims_per_step)
    assert len(op_calls) == 2 and all(len(c) == min(n_dims_per_step, 4) for c in op_calls)
    if n_dims_per_step == 1:
        assert op_calls[0] != op_calls[1], "two seeds drew the same dim: the draw is not exercised"


def test_duplicate_dims_count_twice_as_upstream(model, guide, op_calls):
    _compare("MultipleNegativesRankingLoss", model, guide, [32, 16, 16], matryoshka_weights=[1.0, 0.5, 2.0])
    assert op_calls == [[32, 16]]


def test_inner_dot_score_is_cosine_after_truncation(model, guide):
    """shrink normalises every truncation, so an inner dot_score loss sees cosines."""
    _compare("MultipleNegativesRankingLoss", model, guide, [32, 9], inner_kwargs={"similarity_fct": tl.dot_score})


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "GISTEmbedLoss"])
def test_matryoshka_2d_same_as_upstream(model, guide, name):
    """AdaptiveLayerLoss over MatryoshkaLoss: layers and dims drawn from the seeded random as upstream."""
    for seed in (0, 3):
        _compare(name, model, guide, [32, 16, 8], seed=seed, two_d=True)
    _compare(name, model, guide, [32, 16, 8], seed=1, two_d=True, n_layers_per_step=-1, n_dims_per_step=-1,
             kl_temperature=0.0)


@pytest.mark.parametrize("inner", ["upstream_mnrl", "custom_similarity", "cached_custom_similarity", "cosent"])
def test_other_inner_losses_run_upstream_code(model, guide, op_calls, inner):
    """An inner loss without the fused op (not fastcache's, or a similarity_fct without a fused form) gives
    upstream's results and never calls the fused op."""
    if inner == "cosent":
        texts = tl._texts(2)
        labels = torch.linspace(0.0, 1.0, tl.ROWS)
        runs = {}
        for impl in ("st", "fc"):
            loss = WRAPPERS[impl][0](model, CoSENTLoss(model), [32, 12])
            model.zero_grad(set_to_none=True)
            value = loss(tl._features(model, texts), labels)
            value.backward()
            runs[impl] = value.detach(), tl._grads(model)
        tl._assert_same(runs["fc"], runs["st"], what="cosent")
    else:
        name = "CachedMultipleNegativesRankingLoss" if inner.startswith("cached") else "MultipleNegativesRankingLoss"
        kwargs = {} if inner == "upstream_mnrl" else {"similarity_fct": euclidean_sim}
        runs = {}
        for impl in ("st", "fc"):
            inner_impl = "st" if inner == "upstream_mnrl" else impl
            inner_loss = tl._make(name, inner_impl, model, guide, **kwargs)
            loss = WRAPPERS[impl][0](model, inner_loss, [32, 12])
            assert not getattr(loss, "fused", False) or impl == "st"
            runs[impl] = tl._run(loss, model, tl._texts(3))
        tl._assert_same(runs["fc"], runs["st"], what=inner)
    assert op_calls == []


def test_no_grad_evaluation(model, guide):
    for name in ("MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"):
        values = {}
        for impl in ("st", "fc"):
            loss = _wrapped(impl, name, model, guide, [32, 17, 5])
            with torch.no_grad():
                values[impl] = loss(tl._features(model, tl._texts(3)), None)
        torch.testing.assert_close(values["fc"], values["st"], rtol=1e-5, atol=1e-7)


def test_config_citation_and_isinstance(model, guide):
    for two_d in (False, True):
        pair = {impl: _wrapped(impl, "CachedMultipleNegativesRankingLoss", model, guide, [32, 16], two_d,
                               matryoshka_weights=[1, 2]) for impl in ("st", "fc")}
        assert pair["fc"].get_config_dict() == pair["st"].get_config_dict()
        assert pair["fc"].citation == pair["st"].citation
        assert isinstance(pair["fc"], WRAPPERS["st"][two_d])
    assert "MatryoshkaLoss" in fc_losses.__all__ and "Matryoshka2dLoss" in fc_losses.__all__


BAD_DIMS = [
    (dict(matryoshka_dims=[]), "at least one dimension"),
    (dict(matryoshka_dims=[32, 0]), "must be > 0"),
    (dict(matryoshka_dims=[32, -4]), "must be > 0"),
    (dict(matryoshka_dims=[64, 32]), "cannot exceed the model's embedding dimension of 32"),
    (dict(matryoshka_dims=[32, 16], matryoshka_weights=[1.0]), "same length"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD_DIMS, ids=[m for _, m in BAD_DIMS])
@pytest.mark.parametrize("two_d", [False, True], ids=["1d", "2d"])
def test_bad_arguments_as_upstream(model, guide, kwargs, match, two_d):
    for impl in ("st", "fc"):
        inner = tl._make("CachedMultipleNegativesRankingLoss", impl, model, guide)
        with pytest.raises(ValueError, match=match):
            WRAPPERS[impl][two_d](model, inner, **kwargs)


def test_missing_full_dim_warns_as_upstream(model, guide, caplog):
    messages = {}
    for impl in ("st", "fc"):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _wrapped(impl, "MultipleNegativesRankingLoss", model, guide, [16, 8])
        messages[impl] = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages["fc"] == messages["st"] and "not included in matryoshka_dims" in messages["fc"][0]


def test_dim_beyond_an_unknown_model_width_is_upstreams_error(model, guide, monkeypatch):
    """A model that does not report its width: the dim is checked against the embeddings, as shrink does."""
    monkeypatch.setattr(type(model), "get_embedding_dimension", lambda self: None)
    for impl in ("st", "fc"):
        loss = _wrapped(impl, "MultipleNegativesRankingLoss", model, guide, [40, 16])
        with pytest.raises(ValueError, match="Dimension 40 in matryoshka_dims cannot be greater"):
            loss(tl._features(model, tl._texts(2)), None)


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
                                  "CachedGISTEmbedLoss"])
def test_fused_equals_dim_by_dim_with_duplicate_masking(model, guide, name):
    """fastcache's extras hold across the dims: mask_duplicates (texts that repeat a positive), fused in one call,
    equals upstream's MatryoshkaLoss looping over the dims around the same fastcache loss."""
    anchors = ["the cat", "a dog", "sun today", "nice weather", "car at work", "the query"]
    positives = ["cat", "dog", "sun", "weather", "car", "query"]
    negatives = ["dog", "the sun", "cat", "weather", "a car", "cat"]
    kwargs = dict(tl.MAIN_KWARGS[name], mask_duplicates=True)
    runs = {}
    for wrapper in (STMatryoshkaLoss, fc_losses.MatryoshkaLoss):
        inner = tl._make(name, "fc", model, guide, **kwargs)
        loss = wrapper(model, inner, [32, 20, 7], matryoshka_weights=[1.0, 0.5, 0.5])
        runs[wrapper] = tl._run(loss, model, (anchors, positives, negatives))
    tl._assert_same(runs[fc_losses.MatryoshkaLoss], runs[STMatryoshkaLoss], what=f"{name} mask_duplicates")


def test_bench_table_quick(tmp_path):
    """bench/matryoshka_table.py runs end to end at its smoke shape (no timing claims): the three Matryoshka cases
    give one loss, and the table and JSON come out."""
    stdout, report = run_bench_script("matryoshka_table.py", tmp_path / "matryoshka.json", "--warmup", "0")
    assert "| fastcache MatryoshkaLoss(fastcache CachedMNRL)" in stdout
    cases = report["cases"]
    multi = [case["loss"] for case in cases.values() if len(case["dims"]) > 1]
    assert len(multi) == 3 and max(multi) - min(multi) <= 1e-5 * abs(multi[0])
    assert all(case["min_s"] > 0 for case in cases.values())


def _unfusable_similarity(loss):
    loss.similarity_fct = euclidean_sim  # no fused form


def _summed_cross_entropy(loss):
    loss.cross_entropy_loss = torch.nn.CrossEntropyLoss(reduction="sum")  # GIST: not the module the op computes


CHANGES_AFTER_WRAPPING = {"MultipleNegativesRankingLoss": _unfusable_similarity,
                          "CachedMultipleNegativesRankingLoss": _unfusable_similarity,
                          "GISTEmbedLoss": _summed_cross_entropy, "CachedGISTEmbedLoss": _summed_cross_entropy}


@pytest.mark.parametrize("name", list(CHANGES_AFTER_WRAPPING))
def test_inner_loss_changed_after_wrapping_gives_upstream_result(model, guide, op_calls, name):
    """MatryoshkaLoss decides at every forward whether to fuse: an inner loss changed after wrapping to a
    configuration without a fused form (here on the instance) runs upstream's Matryoshka code, with its result."""
    runs = {}
    for impl in ("st", "fc"):
        loss = _wrapped(impl, name, model, guide, [32, 12])
        assert impl == "st" or loss.fused
        CHANGES_AFTER_WRAPPING[name](loss.loss)
        assert impl == "st" or not loss.fused
        runs[impl] = tl._run(loss, model, tl._texts(3))
    tl._assert_same(runs["fc"], runs["st"], what=f"Matryoshka({name}) changed after wrapping")
    assert op_calls == []


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_inner_loss_made_fusable_after_wrapping_fuses(model, guide, op_calls, name):
    """An inner loss wrapped without a fused form and changed to one afterwards runs every dim in one fused call,
    with upstream's result."""
    runs = {}
    for impl in ("st", "fc"):
        loss = _wrapped(impl, name, model, guide, [32, 12],
                        inner_kwargs={**tl.MAIN_KWARGS[name], "similarity_fct": euclidean_sim})
        assert impl == "st" or not loss.fused
        loss.loss.similarity_fct = tl.cos_sim
        runs[impl] = tl._run(loss, model, tl._texts(3))
    tl._assert_same(runs["fc"], runs["st"], what=f"Matryoshka({name}) made fusable after wrapping")
    assert op_calls == [[32, 12]]


@pytest.mark.parametrize("name", tl.NAMES)
def test_inner_loss_left_as_upstream_wrapping_leaves_it(model, guide, name):
    """fastcache's MatryoshkaLoss sets, replaces and deletes nothing on the inner loss, at construction or in a
    fused step: its attributes are those upstream's MatryoshkaLoss leaves (a cached loss's calculate_loss wrapped
    in upstream's per-dim decorator, which runs when the loss does not fuse)."""
    inner = tl._make(name, "fc", model, guide, **tl.MAIN_KWARGS[name])
    before = dict(vars(inner))
    loss = fc_losses.MatryoshkaLoss(model, inner, [32, 12])
    added = {"calculate_loss"} if name.startswith("Cached") else set()
    for _ in range(2):
        assert set(vars(inner)) == set(before) | added
        assert all(vars(inner)[key] is value for key, value in before.items())
        tl._run(loss, model, tl._texts(3))
