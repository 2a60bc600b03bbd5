"""Asymmetric Router models (separate query and document routes) under the cached losses, as upstream handles
them: the same loss and parameter gradients, and a frozen route skipped in the replay."""

import pytest
import torch
from conftest import build_tiny_bert
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer import losses as st_losses
from sentence_transformers.sentence_transformer.modules import Pooling, Router, Transformer

from fastcache import losses

QUERIES = ["the cat", "a dog at work", "sun today", "nice weather", "car", "the query document"]
DOCS = ["cat", "dog work", "the sun", "weather nice", "a car", "document"]


@pytest.fixture(scope="module")
def router_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("router")
    build_tiny_bert(folder / "query", seed=3)
    build_tiny_bert(folder / "document", seed=4)
    routes = {}
    for name in ("query", "document"):
        transformer = Transformer(str(folder / name))
        routes[name] = [transformer, Pooling(transformer.get_embedding_dimension(), "mean")]
    model = SentenceTransformer(modules=[Router.for_query_document(routes["query"], routes["document"])],
                                device="cpu")
    model.eval()
    return model


def _run(loss_cls, model):
    model.zero_grad(set_to_none=True)
    features = [model.preprocess(QUERIES, task="query"), model.preprocess(DOCS, task="document")]
    loss = loss_cls(model, mini_batch_size=4)(features, None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("frozen_query_route", [False, True])
def test_router_model_matches_upstream(router_model, frozen_query_route):
    query_params = [p for n, p in router_model.named_parameters() if n.startswith("0.sub_modules.query.")]
    assert query_params
    for p in query_params:
        p.requires_grad_(not frozen_query_route)
    try:
        theirs = _run(st_losses.CachedMultipleNegativesRankingLoss, router_model)
        ours = _run(losses.CachedMultipleNegativesRankingLoss, router_model)
    finally:
        for p in query_params:
            p.requires_grad_(True)
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    assert ours[1].keys() == theirs[1].keys()
    assert any(n.startswith("0.sub_modules.document.") for n in ours[1])
    assert frozen_query_route != any(p.grad is not None for p in query_params)
    scale = max(float(g.abs().max()) for g in theirs[1].values())
    assert scale > 1e-4  # gradients that say something
    for name in theirs[1]:
        torch.testing.assert_close(ours[1][name], theirs[1][name], rtol=1e-4, atol=1e-5 * scale)
