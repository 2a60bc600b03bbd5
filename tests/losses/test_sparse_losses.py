"""fastcache.sparse_encoder.losses against sentence-transformers' SPLADE losses on a tiny offline SparseEncoder
(conftest.build_tiny_splade: BertForMaskedLM + SPLADE max pooling over a 69-token vocabulary).

The pairs compared: sentence-transformers' SpladeLoss / CachedSpladeLoss around its SparseMultipleNegativesRankingLoss,
and the same wrappers (upstream's SpladeLoss, fastcache's CachedSpladeLoss) around fastcache's: every loss component
and every parameter gradient, for every constructor option of the three classes.
"""

from __future__ import annotations


import pytest
import torch
from conftest import build_tiny_splade
from sentence_transformers.sparse_encoder.losses import cached_splade as st_cached_splade
from sentence_transformers.sparse_encoder.losses import sparse_multiple_negatives_ranking as st_sparse_mnrl
from sentence_transformers.sparse_encoder.losses.splade import SpladeLoss
from sentence_transformers.util import cos_sim, dot_score
from test_losses import _texts
from torch import nn

import fastcache
from fastcache.model_card import upstream_class
from fastcache.sparse_encoder import losses as fc_sparse

ST_MNRL = st_sparse_mnrl.SparseMultipleNegativesRankingLoss
ST_CACHED = st_cached_splade.CachedSpladeLoss
ROWS = 6


def trainable(model):
    """``model`` in training mode without dropout: SpladePooling's eval mode works in place (no gradients), and
    repeated encodings must be identical."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


@pytest.fixture(scope="module")
def splade(tmp_path_factory):
    model = trainable(build_tiny_splade(tmp_path_factory.mktemp("tiny_splade"), seed=0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only spins
    yield model
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean(splade):
    splade.train()
    splade.zero_grad(set_to_none=True)
    yield
    splade.zero_grad(set_to_none=True)


def _losses(impl: str, model, wrapper: str, inner: dict, outer: dict):
    """(outer loss, inner loss): sentence-transformers' pair (impl "st") or the drop-ins (impl "fc"); ``wrapper``
    "SpladeLoss" (upstream's class for both: it has no counterpart) or "CachedSpladeLoss"."""
    inner_loss = (ST_MNRL if impl == "st" else fc_sparse.SparseMultipleNegativesRankingLoss)(model, **inner)
    cls = SpladeLoss if wrapper == "SpladeLoss" else ST_CACHED if impl == "st" else fc_sparse.CachedSpladeLoss
    return cls(model, loss=inner_loss, **{"document_regularizer_weight": 0.3, **outer}), inner_loss


def _run(loss, model, texts, grad: bool = True):
    """The loss components (a dict, as the trainer gets them) and the parameter gradients of their sum."""
    model.zero_grad(set_to_none=True)
    features = [model.preprocess(list(column)) for column in texts]
    with torch.set_grad_enabled(grad):
        components = loss(features, None)
    if grad:
        sum(components.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return {k: v.detach().clone() for k, v in components.items()}, grads


def _assert_same(actual, expected, what: str) -> None:
    (components, grads), (want_components, want_grads) = actual, expected
    assert components.keys() == want_components.keys(), what
    assert float(want_components["base_loss"]) > 1e-3, f"{what}: trivial contrastive loss"
    for key in want_components:
        torch.testing.assert_close(components[key], want_components[key], rtol=1e-5, atol=1e-7,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")
    assert grads.keys() == want_grads.keys(), f"{what}: gradients of different parameters"
    scale = max(float(g.abs().max()) for g in want_grads.values())
    assert scale > 1e-4, f"{what}: vanishing reference gradients"
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], rtol=1e-4, atol=1e-5 * scale,
                                   msg=lambda m, name=name: f"{what} grad of {name}: {m}")


def _compare(model, wrapper, columns, inner=None, outer=None, grad=True, what=""):
    texts = _texts(columns, rows=ROWS)
    inner, outer = inner or {}, outer or {}
    expected = _run(_losses("st", model, wrapper, inner, outer)[0], model, texts, grad)
    loss, inner_loss = _losses("fc", model, wrapper, inner, outer)
    assert inner_loss.fused
    actual = _run(loss, model, texts, grad)
    _assert_same(actual, expected, what or f"{wrapper} {inner} {outer}")
    return loss


INNER = {
    "default": {},
    "scale": {"scale": 3.0},
    "cos": {"similarity_fct": cos_sim, "scale": 20.0},
    "all_directions": {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")},
    "per_direction": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
    "hardness": {"hardness_mode": "all_negatives", "hardness_strength": 2.0},
    "gather_one_process": {"gather_across_devices": True},
}
OUTER = {
    "weights": {"document_regularizer_weight": 0.5, "query_regularizer_weight": 0.7},
    "no_query_regularizer": {},
    "thresholds": {"query_regularizer_weight": 0.4, "document_regularizer_threshold": 40,
                   "query_regularizer_threshold": 40},
    "document_only": {"use_document_regularizer_only": True},
}
CACHED = {"mbs1": {"mini_batch_size": 1}, "mbs4": {"mini_batch_size": 4}, "default_mbs": {},
          "tokens": {"mini_batch_size": 4, "mini_batch_num_tokens": 20}}


def test_embeddings_are_sparse_and_distinct(splade):
    """The tiny model's SPLADE embeddings are non-negative, partly zero and differ between texts (so the tests
    compare a non-trivial loss)."""
    embeddings = splade.encode(list(_texts(2, rows=ROWS)[0]), convert_to_tensor=True).to_dense()
    assert embeddings.shape == (ROWS, 69) and bool((embeddings >= 0).all())
    assert 0 < int((embeddings == 0).sum()) < embeddings.numel()
    assert float(torch.cdist(embeddings, embeddings).topk(2, largest=False).values[:, 1].min()) > 1e-3


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize("inner", INNER)
@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_inner_options(splade, wrapper, inner, columns):
    outer = {"query_regularizer_weight": 0.5, **({"mini_batch_size": 4} if wrapper.startswith("Cached") else {})}
    _compare(splade, wrapper, columns, INNER[inner], outer)


@pytest.mark.parametrize("inner", ["default", "cos", "all_directions", "hardness", "gather_one_process"])
@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_sparse_strategy_gives_upstream_results(splade, monkeypatch, wrapper, inner):
    """The contrastive term through the op's strategy "sparse" (auto's choice for SPLADE's sparse embeddings; forced
    here, as the tiny model's 69-token vocabulary is half non-zero): upstream's components and gradients."""
    from fastcache.ops.contrastive import sparse

    compressed = []
    monkeypatch.setattr(sparse.SparseRows, "of", classmethod(
        lambda cls, x, dtype, of=sparse.SparseRows.of.__func__: compressed.append(x.shape) or of(cls, x, dtype)))
    monkeypatch.setenv("FASTCACHE_STRATEGY", "sparse")
    outer = {"query_regularizer_weight": 0.5, **({"mini_batch_size": 4} if wrapper.startswith("Cached") else {})}
    _compare(splade, wrapper, 3, INNER[inner], outer)
    assert compressed


@pytest.mark.parametrize("outer", OUTER)
@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_regularizer_options(splade, wrapper, outer):
    extra = {"mini_batch_size": 3} if wrapper.startswith("Cached") else {}
    _compare(splade, wrapper, 3, outer={**OUTER[outer], **extra})


@pytest.mark.parametrize("cached", CACHED)
def test_cached_mini_batches(splade, cached):
    _compare(splade, "CachedSpladeLoss", 3, outer={"query_regularizer_weight": 0.5, **CACHED[cached]})


@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_evaluation_without_gradients(splade, wrapper):
    """Under no_grad (the trainer's evaluation) the loss components are upstream's."""
    texts = _texts(3, rows=ROWS)
    outer = {"query_regularizer_weight": 0.5, **({"mini_batch_size": 2} if wrapper.startswith("Cached") else {})}
    expected, _ = _run(_losses("st", splade, wrapper, {}, outer)[0], splade, texts, grad=False)
    actual, _ = _run(_losses("fc", splade, wrapper, {}, outer)[0], splade, texts, grad=False)
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-7)


def test_auto_mini_batch_size(splade):
    """mini_batch_size="auto" (fastcache's engine) gives upstream's result at any fixed size; it needs the fused
    inner loss."""
    texts = _texts(3, rows=ROWS)
    outer = {"query_regularizer_weight": 0.5}
    expected = _run(_losses("st", splade, "CachedSpladeLoss", {}, {**outer, "mini_batch_size": 2})[0], splade,
                    texts)
    auto = fc_sparse.CachedSpladeLoss(splade, fc_sparse.SparseMultipleNegativesRankingLoss(splade),
                                      document_regularizer_weight=0.3, mini_batch_size="auto", **outer)
    _assert_same(_run(auto, splade, texts), expected, "auto")
    with pytest.raises(ValueError, match="mini_batch_size='auto' needs the fused loss, and loss="):
        fc_sparse.CachedSpladeLoss(splade, ST_MNRL(splade), document_regularizer_weight=0.3, mini_batch_size="auto")


class MatrixDot(nn.Module):
    """A similarity-matrix module of the user's own (all pairs' dot products)."""

    def forward(self, a, b):
        return a @ b.T


def _custom_dot(a, b):
    return dot_score(a, b)


@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_unfused_similarity_gives_upstream_result(splade, wrapper):
    """A similarity_fct without a fused form, given or set on the instance, keeps upstream's maths."""
    texts = _texts(3, rows=ROWS)
    extra = {"mini_batch_size": 3} if wrapper.startswith("Cached") else {}
    for how in ("constructor", "instance"):
        inner = {"similarity_fct": _custom_dot} if how == "constructor" else {}
        expected_loss, expected_inner = _losses("st", splade, wrapper, inner, extra)
        loss, inner_loss = _losses("fc", splade, wrapper, inner, extra)
        if how == "instance":
            assert inner_loss.fused
            inner_loss.similarity_fct = expected_inner.similarity_fct = MatrixDot()
        assert not inner_loss.fused and "similarity_fct" in inner_loss.unfused_reason()
        if wrapper.startswith("Cached"):
            assert "similarity_fct" in loss.unfused_reason()
        _assert_same(_run(loss, splade, texts), _run(expected_loss, splade, texts), f"{wrapper} {how}")


def test_cached_with_upstream_inner_loss(splade):
    """fastcache's CachedSpladeLoss around upstream's inner loss: upstream's maths (not fused), same result."""
    texts = _texts(2, rows=ROWS)
    loss = fc_sparse.CachedSpladeLoss(splade, ST_MNRL(splade), document_regularizer_weight=0.3, mini_batch_size=2)
    assert "loss=SparseMultipleNegativesRankingLoss has no fused form" in loss.unfused_reason()
    expected = ST_CACHED(splade, ST_MNRL(splade), document_regularizer_weight=0.3, mini_batch_size=2)
    _assert_same(_run(loss, splade, texts), _run(expected, splade, texts), "upstream inner")


def test_inner_loss_alone_refuses_as_upstream(splade):
    features = [splade.preprocess(list(column)) for column in _texts(2, rows=ROWS)]
    for cls in (ST_MNRL, fc_sparse.SparseMultipleNegativesRankingLoss):
        with pytest.raises(AttributeError, match="should not be used alone"):
            cls(splade)(features, None)


def test_mask_duplicates_refused(splade):
    with pytest.raises(ValueError, match="mask_duplicates=True is not available"):
        fc_sparse.SparseMultipleNegativesRankingLoss(splade, mask_duplicates=True)
    assert not fc_sparse.SparseMultipleNegativesRankingLoss(splade, mask_duplicates=False).mask_duplicates


def test_classes_configs_and_citations(splade):
    """isinstance of upstream's classes, the same configs and citations; the model card names upstream's class."""
    kwargs = {"scale": 2.0, "directions": ("query_to_doc", "doc_to_query"), "hardness_mode": "in_batch_negatives",
              "hardness_strength": 1.5}
    ours, theirs = fc_sparse.SparseMultipleNegativesRankingLoss(splade, **kwargs), ST_MNRL(splade, **kwargs)
    assert isinstance(ours, ST_MNRL) and ours.get_config_dict() == theirs.get_config_dict()
    assert ours.citation == theirs.citation and upstream_class(ours) is ST_MNRL
    outer = dict(document_regularizer_weight=0.1, query_regularizer_weight=0.2, document_regularizer_threshold=5,
                 mini_batch_size=7, mini_batch_num_tokens=100)
    ours_cached, theirs_cached = fc_sparse.CachedSpladeLoss(splade, ours, **outer), ST_CACHED(splade, theirs, **outer)
    assert isinstance(ours_cached, ST_CACHED) and isinstance(ours_cached, SpladeLoss)
    config, want = ours_cached.get_config_dict(), theirs_cached.get_config_dict()
    assert config.pop("loss") is ours and want.pop("loss") is theirs and config == want
    assert ours_cached.citation == theirs_cached.citation and upstream_class(ours_cached) is ST_CACHED
    assert fc_sparse.SpladeLoss is SpladeLoss  # re-exported: the import swap keeps the wrapper


def test_patch_covers_sparse_losses(splade):
    import sentence_transformers.sparse_encoder.losses as st_sparse

    originals = {name: getattr(st_sparse, name) for name in fc_sparse.__all__}
    try:
        patched = fastcache.patch_sentence_transformers()
        assert {f"sentence_transformers.sparse_encoder.losses.{name}" for name in fc_sparse.__all__} <= set(patched)
        from sentence_transformers.sparse_encoder import losses as script_losses  # as an unchanged script does

        inner = script_losses.SparseMultipleNegativesRankingLoss(splade)
        loss = script_losses.CachedSpladeLoss(splade, inner, document_regularizer_weight=0.3, mini_batch_size=2)
        assert type(inner) is fc_sparse.SparseMultipleNegativesRankingLoss
        assert type(loss) is fc_sparse.CachedSpladeLoss and loss.unfused_reason() is None
        assert script_losses.SpladeLoss is SpladeLoss
    finally:
        fastcache.unpatch_sentence_transformers()
    for name, original in originals.items():
        assert getattr(st_sparse, name) is original


@pytest.mark.parametrize("outer", ["weights", "no_query_regularizer", "document_only"])
def test_cached_contrastive_term_without_graph(splade, monkeypatch, outer):
    """The fused cached loss stage takes the contrastive term and its gradients from the op's one pass (no autograd
    graph through it), the regularisers through autograd: still upstream's components and gradients."""
    from fastcache.sparse_encoder.losses import cached_splade

    one_pass = []
    original = cached_splade.accumulate_into
    monkeypatch.setattr(cached_splade, "accumulate_into", lambda *a: one_pass.append(1) or original(*a))
    _compare(splade, "CachedSpladeLoss", 3, outer={**OUTER[outer], "mini_batch_size": 4})
    assert one_pass == [1]


@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_model_card_names_upstream_classes(tmp_path, wrapper):
    """A SparseEncoder trained with the drop-ins: its card's loss line links upstream's class (sbert.net's sparse
    encoder losses) and the next line names the fastcache classes that computed it."""
    from datasets import Dataset
    from sentence_transformers.base.model_card import generate_model_card
    from sentence_transformers.sparse_encoder import SparseEncoderTrainer, SparseEncoderTrainingArguments

    model = trainable(build_tiny_splade(tmp_path / "model", seed=0))
    loss = _losses("fc", model, wrapper, {}, {"query_regularizer_weight": 0.5,
                                               **({"mini_batch_size": 2} if wrapper.startswith("Cached") else {})})[0]
    dataset = Dataset.from_dict({"anchor": ["the cat", "a dog", "sun car"], "positive": ["cat", "dog", "car"]})
    args = SparseEncoderTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=3,
                                          report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                                          disable_tqdm=True)
    SparseEncoderTrainer(model=model, args=args, train_dataset=dataset, loss=loss).train()
    lines = generate_model_card(model).splitlines()
    index = next(i for i, line in enumerate(lines) if line.startswith("* Loss:"))
    link = "https://sbert.net/docs/package_reference/sparse_encoder/losses.html#"
    assert lines[index] == f"* Loss: [<code>{wrapper}</code>]({link}{wrapper.lower()}) with these parameters:"
    note = next(line for line in lines[index:] if line.startswith("* Computed by:"))
    inner = "fastcache.sparse_encoder.losses.sparse_multiple_negatives_ranking.SparseMultipleNegativesRankingLoss"
    assert inner in note
    assert ("fastcache.sparse_encoder.losses.cached_splade.CachedSpladeLoss" in note) == wrapper.startswith("Cached")


class L1Regularizer(nn.Module):
    """A regulariser of the user's own (SpladeLoss's document_regularizer / query_regularizer): the mean L1 norm."""

    def compute_loss_from_embeddings(self, embeddings):
        return embeddings.abs().sum(dim=1).mean()


@pytest.mark.parametrize("wrapper", ["SpladeLoss", "CachedSpladeLoss"])
def test_custom_regularizer_modules(splade, wrapper):
    outer = {"document_regularizer": L1Regularizer(), "query_regularizer": L1Regularizer(),
             "query_regularizer_weight": 0.05, "document_regularizer_weight": 0.02,
             **({"mini_batch_size": 4} if wrapper.startswith("Cached") else {})}
    _compare(splade, wrapper, 3, outer=outer)


@pytest.mark.parametrize("size", [0, -2, 1.5, True, "32"])
def test_bad_mini_batch_size_names_the_argument(splade, size):
    with pytest.raises(ValueError, match="mini_batch_size must be a positive int or 'auto', got"):
        fc_sparse.CachedSpladeLoss(splade, fc_sparse.SparseMultipleNegativesRankingLoss(splade),
                                   document_regularizer_weight=0.3, mini_batch_size=size)
