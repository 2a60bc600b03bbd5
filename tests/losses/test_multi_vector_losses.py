"""fastcache.multi_vector_encoder.losses against sentence-transformers' classes of the same names, through a tiny
offline MultiVectorEncoder (tests/conftest.py build_tiny_multi_vector): the loss and every parameter gradient for
every option (scale, the ColBERT scorers and their partials, mini-batch sizes, hard-negative columns, queries and
documents of different lengths with padding), the fused path asserted where it applies and upstream's maths kept
where it does not (XTR scoring, instance overrides); config, citation, isinstance, the patch, the model card, and
gather_across_devices in a 2-process gloo world.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_multi_vector
from sentence_transformers.multi_vector_encoder import losses as st_mv_losses
from sentence_transformers.multi_vector_encoder.scoring import (
    XTRScores,
    colbert_scores,
    mean_colbert_scores,
    xtr_scores,
)

import fastcache
from fastcache.multi_vector_encoder import losses as mv_losses
from fastcache.multi_vector_encoder.losses.multiple_negatives_ranking import (
    maxsim_length_normalize,
)

NAMES = ("MultiVectorMultipleNegativesRankingLoss", "CachedMultiVectorMultipleNegativesRankingLoss")
# columns of different lengths (in words and in tokens), so every column pads to its own width
TEXTS = [["the cat sat", "a dog at work today", "sun over the car", "nice weather", "car work query document"],
         ["cat", "dog work", "the sun car nice weather today", "weather nice", "a car query"],
         ["the dog", "a sun and a car and the weather", "work today", "query", "nice cat"],
         ["dog", "car", "a query about the weather today", "the cat", "sun"]]
SCORERS = {
    "colbert": colbert_scores,
    "mean_colbert": mean_colbert_scores,
    "colbert_normalized": partial(colbert_scores, length_normalize=True),
    "mean_colbert_unnormalized": partial(mean_colbert_scores, length_normalize=False),
    "colbert_chunked": partial(colbert_scores, chunk_elements=500),
    "mean_colbert_chunked": partial(partial(mean_colbert_scores, chunk_elements=64), length_normalize=True),
}


@pytest.fixture(scope="module")
def mv_model(tmp_path_factory):
    model = build_tiny_multi_vector(tmp_path_factory.mktemp("tiny_multi_vector"), seed=0)
    yield model
    model.zero_grad(set_to_none=True)


def _make(name: str, which: str, model, **kwargs):
    return getattr(mv_losses if which == "fc" else st_mv_losses, name)(model, **kwargs)


def _run(loss, model, texts, grad: bool = True):
    """The loss of ``texts`` (one list a column) and every parameter gradient (a fresh tokenization each call)."""
    model.zero_grad(set_to_none=True)
    features = [model.preprocess(column) for column in texts]
    if not grad:
        with torch.no_grad():
            return loss(features, None).detach(), []
    value = loss(features, None)
    value.backward()
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return value.detach(), grads


def _assert_same(actual, expected, what=""):
    (loss, grads), (want_loss, want_grads) = actual, expected
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what} loss: {m}")
    assert len(grads) == len(want_grads), what
    scale = max((float(g.abs().max()) for g in want_grads), default=1.0)
    for index, (g, want) in enumerate(zip(grads, want_grads)):
        torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, index=index: f"{what} parameter {index}: {m}")


def _compare(name, model, texts, fused=True, **kwargs):
    ours, theirs = _make(name, "fc", model, **kwargs), _make(name, "st", model, **kwargs)
    assert ours.fused is fused, ours.unfused_reason()
    actual, expected = _run(ours, model, texts), _run(theirs, model, texts)
    assert expected[0] > 0 and any(float(g.abs().max()) > 0 for g in expected[1])
    _assert_same(actual, expected, f"{name} {kwargs}")
    return actual


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize("name", NAMES)
def test_columns_and_padding(mv_model, name, columns):
    _compare(name, mv_model, TEXTS[:columns])


@pytest.mark.parametrize("scorer", SCORERS)
@pytest.mark.parametrize("name", NAMES)
def test_colbert_scorers(mv_model, name, scorer):
    _compare(name, mv_model, TEXTS[:3], similarity_fct=SCORERS[scorer], scale=4.0)


@pytest.mark.parametrize("scale", [0.3, 1.0, 25.0])
@pytest.mark.parametrize("name", NAMES)
def test_scale(mv_model, name, scale):
    _compare(name, mv_model, TEXTS[:3], scale=scale)


@pytest.mark.parametrize("kwargs", [dict(mini_batch_size=1), dict(mini_batch_size=2, score_mini_batch_size=3),
                                    dict(mini_batch_size=3, score_mini_batch_size=1)],
                         ids=["mbs1", "mbs2_score3", "mbs3_score1"])
@pytest.mark.parametrize("name", NAMES)
def test_mini_batch_sizes(mv_model, name, kwargs):
    _compare(name, mv_model, TEXTS[:3], **kwargs)


def test_cached_token_budget(mv_model):
    """mini_batch_num_tokens packs each column's mini-batches by tokens (upstream's ranges, replayed as cut)."""
    _compare(NAMES[1], mv_model, TEXTS[:3], mini_batch_num_tokens=12)


def test_cached_equals_in_batch_loss(mv_model):
    """The gradient cache replays the mini-batches: the same loss and gradients as the in-batch loss."""
    cached = _run(_make(NAMES[1], "fc", mv_model, mini_batch_size=2), mv_model, TEXTS[:3])
    plain = _run(_make(NAMES[0], "fc", mv_model), mv_model, TEXTS[:3])
    _assert_same(cached, plain, "cached vs in-batch")


def test_cached_auto_mini_batch_size(mv_model):
    loss = _make(NAMES[1], "fc", mv_model, mini_batch_size="auto", mini_batch_memory_budget="1MiB")
    _assert_same(_run(loss, mv_model, TEXTS[:3]), _run(_make(NAMES[0], "st", mv_model), mv_model, TEXTS[:3]), "auto")


@pytest.mark.parametrize("name", NAMES)
def test_without_grad(mv_model, name):
    ours = _run(_make(name, "fc", mv_model, mini_batch_size=2), mv_model, TEXTS[:3], grad=False)
    theirs = _run(_make(name, "st", mv_model, mini_batch_size=2), mv_model, TEXTS[:3], grad=False)
    _assert_same(ours, theirs, f"{name} no_grad")


@pytest.mark.parametrize("similarity_fct", [xtr_scores, XTRScores(top_k=8), partial(colbert_scores, length_normalize=1),
                                            lambda *args, **kwargs: colbert_scores(*args, **kwargs)],
                         ids=["xtr_scores", "XTRScores", "colbert_int_normalize", "lambda"])
@pytest.mark.parametrize("name", NAMES)
def test_other_scorers_keep_upstream_maths(mv_model, name, similarity_fct):
    """A scorer that is not recognisably ColBERT MaxSim (even one that computes it) keeps upstream's maths."""
    _compare(name, mv_model, TEXTS[:3], fused=False, similarity_fct=similarity_fct)


def test_which_scorers_are_fused():
    assert maxsim_length_normalize(colbert_scores) is False
    assert maxsim_length_normalize(mean_colbert_scores) is True
    assert maxsim_length_normalize(partial(mean_colbert_scores, length_normalize=False)) is False
    assert maxsim_length_normalize(partial(colbert_scores, chunk_elements=10, length_normalize=True)) is True
    for other in (xtr_scores, XTRScores(), partial(colbert_scores, None), partial(colbert_scores, top_k=3),
                  partial(xtr_scores, chunk_elements=3), partial(colbert_scores, length_normalize=None), None, 3):
        assert maxsim_length_normalize(other) is None, other


def _xtr(loss):
    loss.similarity_fct = xtr_scores


def _trained_scale(loss):
    loss.scale = torch.tensor(2.0, requires_grad=True)


def _mean(loss):
    loss.similarity_fct = mean_colbert_scores
    loss.scale = 6.0


@pytest.mark.parametrize("override", [_xtr, _trained_scale, _mean], ids=["xtr", "trained_scale", "mean_colbert"])
@pytest.mark.parametrize("name", NAMES)
def test_instance_override_after_construction(mv_model, name, override):
    """Settings changed on the instance count at the next call: XTR scoring or a scale that requires grad keeps
    upstream's maths, a ColBERT scorer stays fused; the result is upstream's with the same change."""
    kwargs = {"mini_batch_size": 2} if name.startswith("Cached") else {}
    ours, theirs = _make(name, "fc", mv_model, **kwargs), _make(name, "st", mv_model, **kwargs)
    assert ours.fused
    override(ours)
    override(theirs)
    assert ours.fused is (override is _mean)
    if override is not _mean:
        assert ("similarity_fct" if override is _xtr else "scale") in ours.unfused_reason()
    _assert_same(_run(ours, mv_model, TEXTS[:3]), _run(theirs, mv_model, TEXTS[:3]), override.__name__)


def test_auto_mini_batch_size_needs_the_fused_loss(mv_model):
    with pytest.raises(ValueError, match="mini_batch_size='auto' needs the fused loss, and similarity_fct"):
        _make(NAMES[1], "fc", mv_model, mini_batch_size="auto", similarity_fct=xtr_scores)
    loss = _make(NAMES[1], "fc", mv_model, mini_batch_size="auto")
    _xtr(loss)
    with pytest.raises(ValueError, match="mini_batch_size='auto' needs the fused loss, and similarity_fct"):
        _run(loss, mv_model, TEXTS[:2])


@pytest.mark.parametrize("kwargs", [dict(scale=0.0), dict(scale=-1.0), dict(mini_batch_num_tokens=0)],
                         ids=["zero_scale", "negative_scale", "zero_tokens"])
def test_constructor_validation_is_upstreams(mv_model, kwargs):
    with pytest.raises(ValueError) as theirs:
        _make(NAMES[1], "st", mv_model, **kwargs)
    with pytest.raises(ValueError) as ours:
        _make(NAMES[1], "fc", mv_model, **kwargs)
    assert str(ours.value) == str(theirs.value)


@pytest.mark.parametrize("name", NAMES)
def test_class_config_and_citation(mv_model, name):
    kwargs = dict(scale=3.0, similarity_fct=mean_colbert_scores, mini_batch_size=4, gather_across_devices=True)
    ours, theirs = _make(name, "fc", mv_model, **kwargs), _make(name, "st", mv_model, **kwargs)
    assert isinstance(ours, getattr(st_mv_losses, name))
    assert ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation
    assert type(ours).requires_media_counts and getattr(type(ours), "uses_gradient_cache", False) == getattr(
        type(theirs), "uses_gradient_cache", False)


def test_patch_covers_the_multi_vector_losses(mv_model):
    originals = {name: getattr(st_mv_losses, name) for name in NAMES}
    try:
        patched = fastcache.patch_sentence_transformers()
        for name in NAMES:
            assert f"sentence_transformers.multi_vector_encoder.losses.{name}" in patched
            from sentence_transformers.multi_vector_encoder import (
                losses as script_losses,  # an unchanged script
            )

            assert type(getattr(script_losses, name)(mv_model)) is getattr(mv_losses, name)
    finally:
        fastcache.unpatch_sentence_transformers()
    for name in NAMES:
        assert getattr(st_mv_losses, name) is originals[name]


@pytest.mark.parametrize("name", NAMES)
def test_model_card_names_upstream_class(tmp_path, name):
    from datasets import Dataset
    from sentence_transformers import (
        MultiVectorEncoderTrainer,
        MultiVectorEncoderTrainingArguments,
    )
    from sentence_transformers.base.model_card import generate_model_card

    model = build_tiny_multi_vector(tmp_path / "model", seed=0)
    dataset = Dataset.from_dict({"query": TEXTS[0][:4], "positive": TEXTS[1][:4]})
    loss = getattr(mv_losses, name)(model, **({"mini_batch_size": 2} if "Cached" in name else {}))
    args = MultiVectorEncoderTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1,
                                               per_device_train_batch_size=4, report_to=[], save_strategy="no",
                                               logging_strategy="no", use_cpu=True, disable_tqdm=True)
    MultiVectorEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    card = generate_model_card(model)
    line = next(line for line in card.splitlines() if line.startswith("* Loss:"))
    assert line.startswith(f"* Loss: [<code>{name}</code>](https://sbert.net/docs/package_reference/"), line
    assert f"#{name.lower()})" in line
    note = next(line for line in card.splitlines() if line.startswith("* Computed by:"))
    assert note == (f"* Computed by: fastcache {fastcache.__version__} "
                    f"(<code>fastcache.multi_vector_encoder.losses.multiple_negatives_ranking.{name}</code>)")


# ---------------------------------------------------------------------------------------------------------------
# gather_across_devices in a 2-process gloo world
# ---------------------------------------------------------------------------------------------------------------

WORLD = 2
DIST_CONFIGS = {
    "in_batch_3col": (NAMES[0], dict(scale=2.0), 3),
    "in_batch_mean_2col": (NAMES[0], dict(similarity_fct=mean_colbert_scores, scale=5.0), 2),
    "cached_3col": (NAMES[1], dict(mini_batch_size=1), 3),
    "cached_xtr_2col": (NAMES[1], dict(mini_batch_size=2, similarity_fct=xtr_scores), 2),
}


def _rank_main(rank: int, folder: str) -> None:
    from helpers import start_gloo_rank

    (model,) = start_gloo_rank(rank, folder, WORLD, timeout_s=120, build=lambda path: (
        build_tiny_multi_vector(path / f"multi_vector{rank}", seed=0),))
    rows = len(TEXTS[0]) // WORLD  # each rank its own rows: different lengths, so the ranks pad differently
    results = {}
    for key, (name, kwargs, columns) in DIST_CONFIGS.items():
        texts = [column[rank * rows:(rank + 1) * rows] for column in TEXTS[:columns]]
        for which in ("fc", "st"):
            loss = _make(name, which, model, gather_across_devices=True, **kwargs)
            results[key, which] = _run(loss, model, texts)
        results[key, "fused"] = _make(name, "fc", model, gather_across_devices=True, **kwargs).fused
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    from helpers import spawn_world

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return spawn_world(_rank_main, tmp_path_factory.mktemp("mv_world"), WORLD, deadline_s=240)


@pytest.mark.parametrize("key", DIST_CONFIGS)
def test_gather_across_devices(gathered, key):
    """On each rank, fastcache's loss and parameter gradients equal sentence-transformers' gathered computation in
    the same world (documents gathered with gradients, padded to the ranks' longest; positives at rank·B)."""
    for rank, results in enumerate(gathered):
        assert results[key, "fused"] is ("xtr" not in key)
        _assert_same(results[key, "fc"], results[key, "st"], f"{key} rank {rank}")
        assert results[key, "st"][0] > 0
