"""The SPLADE drop-ins with gather_across_devices=True in a real world of 2 processes (gloo, CPU): on each rank,
fastcache's SpladeLoss / CachedSpladeLoss around its SparseMultipleNegativesRankingLoss give sentence-transformers'
loss components and parameter gradients, computed in the same world on that rank's half of the texts; and the
gathered loss differs from the rank-local one (the other rank's documents are negatives).

Every rank's results are computed in one spawned world (bounded by a deadline) and written to files the tests read.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from helpers import spawn_world, start_gloo_rank

TESTS = Path(__file__).resolve().parents[1]
WORLD = 2
DEADLINE_S = 150
TEXTS = [
    ["the cat sat", "a dog at work", "sun over the car", "nice weather today", "car work query", "query document",
     "the sun today", "a cat and a dog"],
    ["cat sat", "dog work", "the sun car", "weather nice", "a car query", "document query", "today sun", "dog cat"],
    ["a query", "the document", "nice cat", "dog today", "sun sun", "work car", "weather query", "the a"],
]
CASES = {  # name: (wrapper, columns, inner keywords, outer keywords)
    "splade-2col": ("SpladeLoss", 2, {}, {"query_regularizer_weight": 0.5}),
    "splade-3col-directions": ("SpladeLoss", 3, {"directions": ("query_to_doc", "doc_to_query", "doc_to_doc")},
                               {"query_regularizer_weight": 0.5}),
    "cached-2col": ("CachedSpladeLoss", 2, {}, {"query_regularizer_weight": 0.5, "mini_batch_size": 3}),
    "cached-3col-scale": ("CachedSpladeLoss", 3, {"scale": 2.0}, {"mini_batch_size": 2}),
}


def _rank_main(rank: int, folder: str) -> None:
    """One rank: each case with fastcache and with sentence-transformers (gathered), and fastcache's without
    gathering; results to ``folder/rank{rank}.pt``."""
    sys.path.insert(0, str(TESTS))
    sys.path.insert(0, str(TESTS / "losses"))
    import torch.distributed as dist
    from conftest import build_tiny_splade
    from test_sparse_losses import _losses, _run, trainable

    splade = start_gloo_rank(rank, folder, WORLD, 60,
                             build=lambda root: trainable(build_tiny_splade(root / f"splade{rank}", seed=0)))
    try:
        half = slice(rank * 4, (rank + 1) * 4)
        results = {}
        for name, (wrapper, columns, inner, outer) in CASES.items():
            texts = [column[half] for column in TEXTS[:columns]]
            for impl, gather in (("st", True), ("fc", True), ("fc", False)):
                loss = _losses(impl, splade, wrapper, {**inner, "gather_across_devices": gather}, outer)[0]
                results[name, impl, gather] = _run(loss, splade, texts)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return spawn_world(_rank_main, tmp_path_factory.mktemp("gloo_sparse_world"), WORLD, DEADLINE_S)


@pytest.mark.parametrize("case", CASES)
def test_gathered_matches_upstream(world, case):
    from test_sparse_losses import _assert_same

    for rank, results in enumerate(world):
        ours, theirs, local = results[case, "fc", True], results[case, "st", True], results[case, "fc", False]
        _assert_same(ours, theirs, f"rank {rank} {case}")
        assert abs(float(ours[0]["base_loss"]) - float(local[0]["base_loss"])) > 1e-4, \
            f"rank {rank} {case}: gathering changed nothing"
