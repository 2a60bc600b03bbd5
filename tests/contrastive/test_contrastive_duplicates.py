"""Duplicate masking (``doc_ids``): a candidate with the id of a row's positive is not its negative, in
query_to_doc (the positive itself always stays) and doc_to_doc. Both backends against the dense reference, plus
an independent check of the meaning on the default loss."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_matches, make_batch, op_autograd, op_loss_and_grad, reference_loss_and_grads

from fastcache import contrastive_loss

BACKENDS = ["cpu", "torch"]
DIRECTIONS = [
    ("query_to_doc",),
    ("query_to_doc", "doc_to_doc"),
    ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
]


def _ids(shape, distinct: int, seed: int) -> torch.Tensor:
    """Random ids from a small range, so that many candidates duplicate some row's positive."""
    return torch.randint(0, distinct, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions", DIRECTIONS)
@pytest.mark.parametrize("columns", [1, 3])
@pytest.mark.parametrize("path", [op_autograd, op_loss_and_grad])
def test_matches_reference(backend, directions, columns, path):
    batch = make_batch(9, 7, columns=columns, seed=columns)
    batch["doc_ids"] = _ids(batch["docs"].shape[:-1], 4, seed=len(directions))
    options = dict(directions=directions, backend=backend, chunk_size=4)
    assert_matches(path(batch, **options), reference_loss_and_grads(batch, **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hardness_mode", ["in_batch_negatives", "hard_negatives", "all_negatives"])
def test_with_hardness_and_gathered_layout(backend, hardness_mode):
    batch = make_batch(5, 6, columns=2, positives=12, offset=4, gathered=True, docs_3d=True, seed=3)
    batch["doc_ids"] = _ids(batch["docs"].shape[:-1], 5, seed=4)
    options = dict(backend=backend, offset=4, hardness_mode=hardness_mode, hardness_strength=3.0,
                   directions=("query_to_doc", "doc_to_query", "doc_to_doc"))
    assert_matches(op_autograd(batch, **options), reference_loss_and_grads(batch, **options))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("strategy", ["absolute", "relative"])
def test_with_guide(backend, strategy):
    batch = make_batch(8, 6, columns=2, guide_dim=5, seed=5)
    batch["doc_ids"] = _ids(batch["docs"].shape[:-1], 6, seed=6)
    options = dict(backend=backend, directions=("query_to_doc", "query_to_query", "doc_to_doc"), margin=0.1,
                   margin_strategy=strategy)
    assert_matches(op_autograd(batch, **options), reference_loss_and_grads(batch, **options))


@pytest.mark.parametrize("backend", BACKENDS)
def test_meaning_on_the_default_loss(backend):
    """Independently of the reference: cross-entropy over the candidates that are not duplicates of the row's
    positive (the positive kept)."""
    torch.manual_seed(7)
    q, d = torch.randn(6, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 0, 0, 7, 3, 8, 1])  # rows 0, 1, 3 have duplicates among the negatives
    logits = 20.0 * F.normalize(q, dim=1) @ F.normalize(d, dim=1).T
    for i in range(6):
        for j in range(12):
            if j != i and ids[j] == ids[i]:
                logits[i, j] = float("-inf")
    expected = F.cross_entropy(logits, torch.arange(6))
    loss = contrastive_loss(q, d, doc_ids=ids, backend=backend)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(contrastive_loss(q, d, backend=backend), expected)  # the masking changed it


def test_all_distinct_ids_change_nothing():
    batch = make_batch(7, 5, columns=2, seed=8)
    plain = op_autograd(batch, backend="cpu")
    batch["doc_ids"] = torch.arange(14)
    assert_matches(op_autograd(batch, backend="cpu"), plain, rtol=0, atol=0)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(13, dtype=torch.long), "doc_ids must have one id per candidate"),
    (torch.zeros(2, 7, dtype=torch.long), "doc_ids must have one id per candidate"),
    (torch.zeros(14), "doc_ids must be an integer tensor"),
    (torch.zeros(14, dtype=torch.bool), "doc_ids must be an integer tensor"),
    ([0] * 14, "doc_ids must be an integer tensor"),
])
def test_bad_doc_ids(bad, match):
    with pytest.raises(ValueError, match=match):
        contrastive_loss(torch.randn(7, 4), torch.randn(14, 4), doc_ids=bad)
