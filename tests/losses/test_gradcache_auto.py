"""mini_batch_size="auto": mini-batches sized from a memory budget by measuring the activations autograd saves."""

import pytest
import torch

from fastcache import losses
from fastcache.gradcache import AutoMiniBatch, saved_activation_bytes
from helpers import max_error

ANCHORS = ["the cat at work", "a dog", "sun today", "nice weather today", "car", "the query document", "cat dog",
           "the sun", "a car at work", "weather", "dog", "query"]
POSITIVES = ["cat", "dog work", "the sun", "weather nice", "a car", "document", "dog cat", "sun", "car", "nice",
             "a dog", "the query"]


def _features(model, columns):
    return [model.preprocess(column) for column in columns]


def test_saved_activation_bytes_counts_activations_not_parameters():
    layer = torch.nn.Linear(16, 8)

    class Wrap(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = layer

        def forward(self, features):
            return {"sentence_embedding": self.layer(features["x"]).relu()}

    x = torch.randn(5, 16)
    state = torch.get_rng_state()
    # the linear layer saves its input (5x16 floats), relu its output (5x8 floats); the weight is not counted
    assert saved_activation_bytes(Wrap(), {"x": x}) == (5 * 16 + 5 * 8) * 4
    assert torch.equal(torch.get_rng_state(), state)


def test_size_follows_the_budget_and_remeasures_longer_batches(tiny_model):
    features = tiny_model.preprocess(ANCHORS)
    sizes = []
    for budget in (1, 2**16, 2**18, 2**20, 2**40):
        sizes.append(AutoMiniBatch(budget).size(tiny_model, features))
    assert sizes[0] == 1 and sizes[-1] == len(ANCHORS)
    assert sizes == sorted(sizes) and len(set(sizes)) >= 3, sizes
    auto = AutoMiniBatch(2**20)
    auto.size(tiny_model, tiny_model.preprocess(["cat", "dog"]))
    short = auto.length
    size_long = auto.size(tiny_model, tiny_model.preprocess([" ".join(["cat dog sun"] * 6)] * 12))
    assert auto.length > short  # measured again on the longer batch
    assert size_long <= auto.size(tiny_model, tiny_model.preprocess(["cat", "dog"] * 6))


@pytest.mark.parametrize("cls", [losses.CachedMultipleNegativesRankingLoss, losses.CachedGISTEmbedLoss])
def test_auto_gives_the_fixed_size_results(tiny_model, tiny_guide_model, cls):
    args = (tiny_model, tiny_guide_model) if cls is losses.CachedGISTEmbedLoss else (tiny_model,)
    results = []
    for kwargs in ({"mini_batch_size": 4}, {"mini_batch_size": "auto", "mini_batch_memory_budget": 2**17}):
        tiny_model.zero_grad()
        loss = cls(*args, **kwargs)
        value = loss(_features(tiny_model, [ANCHORS, POSITIVES]), None)
        value.backward()
        results.append((value.detach(), [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None]))
    auto_size = loss.auto_mini_batch.size(tiny_model, tiny_model.preprocess(ANCHORS))
    assert 1 < auto_size < len(ANCHORS)  # the budget really split the batch
    (fixed_loss, fixed_grads), (auto_loss, auto_grads) = results
    torch.testing.assert_close(auto_loss, fixed_loss, rtol=1e-5, atol=1e-6)
    # parameter gradients are sums over the mini-batches: other sizes add them in another order, so the float
    # noise is relative to the gradients' scale (the largest entry of any parameter's: some parameters' gradients
    # are analytically zero, pure noise), not per element (an AMD EPYC failed a per-element atol of 1e-6)
    scale = max(float(g.abs().max()) for g in fixed_grads)
    for a, b in zip(auto_grads, fixed_grads):
        assert max_error(a, b) <= 1e-4 * scale, (max_error(a, b), scale)


def test_validation(tiny_model, monkeypatch):
    with pytest.raises(ValueError, match="mini_batch_size must be a positive int or 'auto'"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=0)
    with pytest.raises(ValueError, match="mini_batch_size must be a positive int or 'auto'"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="big")
    with pytest.raises(ValueError, match="needs the fused loss"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="auto",
                                                  similarity_fct=lambda a, b: a @ b.T)
    with pytest.raises(ValueError, match="mini_batch_memory_budget must be a positive number of bytes"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="auto", mini_batch_memory_budget=0)
    monkeypatch.setenv("FASTCACHE_MINI_BATCH_BUDGET", "64MiB")
    assert losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="auto").auto_mini_batch.budget == \
        64 * 2**20


def test_bad_budget_environment_names_the_variable(tiny_model, monkeypatch):
    monkeypatch.setenv("FASTCACHE_MINI_BATCH_BUDGET", "lots")
    with pytest.raises(ValueError, match="FASTCACHE_MINI_BATCH_BUDGET must be a size"):
        losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="auto")
