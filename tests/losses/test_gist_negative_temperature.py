"""GISTEmbedLoss / CachedGISTEmbedLoss with a negative temperature (scale < 0; the op itself:
tests/contrastive/test_negative_scale.py).

sentence-transformers masks the similarities before dividing by the temperature: -inf / (negative temperature) =
+inf, so its loss is NaN as soon as one candidate is masked (with GIST's default contrast_anchors=True the
anchor-anchor diagonal always is). fastcache masks after scaling (a masked candidate's logit is -inf): the fused
losses match upstream where upstream is finite (a margin that masks nothing) and are finite where upstream is NaN,
equal to the dense reference (fastcache/reference.py).
"""

from __future__ import annotations

import pytest
import torch

from fastcache.reference import contrastive_loss_reference
from test_losses import _assert_same, _features, _make, _run, _texts

QD, QQ, DD = "query_to_doc", "query_to_query", "doc_to_doc"

GIST = [("GISTEmbedLoss", {}), ("CachedGISTEmbedLoss", {"mini_batch_size": 3})]


@pytest.mark.parametrize(("name", "kwargs"), GIST, ids=[n for n, _ in GIST])
def test_gist_negative_temperature_as_upstream_where_nothing_is_masked(model, tiny_guide_model, name, kwargs):
    """margin=-10: the guide masks nothing (cosines are at most 1 < g_pos + 10), so upstream is finite."""
    kwargs = dict(kwargs, temperature=-0.05, margin=-10.0)
    ours = _make(name, "fc", model, tiny_guide_model, **kwargs)
    assert ours.fused
    texts = _texts(3)
    expected = _run(_make(name, "st", model, tiny_guide_model, **kwargs), model, texts)
    _assert_same(_run(ours, model, texts), expected, what=f"{name}{kwargs}")


@pytest.mark.parametrize(("name", "kwargs"), GIST, ids=[n for n, _ in GIST])
@pytest.mark.parametrize("temperature", [-0.01, -1.0])
def test_gist_negative_temperature_finite_where_upstream_is_nan(model, tiny_guide_model, name, kwargs, temperature):
    """With masking (default margin 0; contrast_anchors masks the anchor-anchor diagonal), upstream's loss is NaN;
    fastcache's is finite, with finite gradients, and equals the op's reference (masked candidates left out)."""
    kwargs = dict(kwargs, temperature=temperature)
    ours = _make(name, "fc", model, tiny_guide_model, **kwargs)
    assert ours.fused
    texts = _texts(3)
    with torch.no_grad():
        upstream = _make(name, "st", model, tiny_guide_model, **kwargs)(_features(model, texts), None)
    assert not torch.isfinite(upstream)
    value, grads = _run(ours, model, texts)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads.values())
    with torch.no_grad():  # the reference on the same embeddings
        embeddings = [model(f)["sentence_embedding"] for f in _features(model, texts)]
        guides = [tiny_guide_model(f)["sentence_embedding"] for f in _features(tiny_guide_model, texts)]
    expected = contrastive_loss_reference(embeddings[0], torch.stack(embeddings[1:]), guide_queries=guides[0],
                                          guide_docs=torch.stack(guides[1:]), scale=1 / temperature,
                                          directions=(QD, QQ, DD))
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
