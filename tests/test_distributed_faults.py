"""Distributed faults under gather_across_devices=True, in a real world of 2 gloo processes with a deadline.

all_gather needs the same shape on every rank. Without a check, ranks with different batch sizes do not fail
cleanly: on gloo the rank with the smaller batch aborts the whole process (``gloo::EnforceNotMet ... Received
data size doesn't match expected size``) while the other one gathers padded garbage and carries on; different
numbers of columns leave a rank waiting for a collective that never comes (a hang until the process group's
timeout). fastcache's losses exchange each rank's layout first (``check_same_layout_on_every_rank``) so that
every rank raises the same ValueError naming every rank's sizes, and the ranks stay in step afterwards.

Different numbers of mini-batches (the cached losses with another mini_batch_size, or token budgets / "auto"
sizing that split each rank differently) are no fault for fastcache: its gradient cache runs no collective per
mini-batch (one gather in the fused loss, one gradient all-reduce per step under DDP), so the step completes,
with the same loss and gradients as equal splits. The tests below show both: every faulty layout gives a clear
error on every rank, never a hang or a crash, and uneven mini-batch counts give the right result, with and
without DistributedDataParallel.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from helpers import spawn_world, start_gloo_rank

WORLD = 2
DIM = 8
DEADLINE_S = 150  # both ranks: Python start-up, a tiny model, every scenario (about 15 s on 2 idle cores)
PG_TIMEOUT_S = 30  # a collective that waits longer than this is a hang: the process group raises
ROWS = {0: 4, 1: 3}  # the faulty batch sizes per rank
TEXTS = [
    ["the cat sat", "a dog at work", "sun over the car", "nice weather today", "car work query", "query document",
     "the sun today", "a cat and a dog"],
    ["cat sat", "dog work", "the sun car", "weather nice", "a car query", "document query", "today sun", "dog cat"],
]


def _embeddings(rank: int, rows: int, columns: int, dim: int = DIM) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(rows, dim, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(columns)]


def _mini_batches(embeddings: list[torch.Tensor], size: int) -> list[list[torch.Tensor]]:
    return [[t.detach().clone().requires_grad_() for t in e.split(size)] for e in embeddings]


def _fault_scenarios(rank: int, model, guide):
    """name -> a callable that runs one loss on this rank's (faulty) layout."""
    from fastcache import losses

    rows, other_columns = ROWS[rank], 3 if rank == 0 else 2

    def mnrl_rows():
        loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)
        loss.compute_loss_from_embeddings(_embeddings(rank, rows, 2), None).backward()

    def mnrl_columns():
        loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)
        loss.compute_loss_from_embeddings(_embeddings(rank, 4, other_columns), None).backward()

    def mnrl_dim():
        loss = losses.MultipleNegativesRankingLoss(model, gather_across_devices=True)
        loss.compute_loss_from_embeddings(_embeddings(rank, 4, 2, dim=DIM + rank), None).backward()

    def cached_mnrl_rows():
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True)
        loss.calculate_loss(_mini_batches(_embeddings(rank, rows, 3), 2), with_backward=True)

    def cached_gist_rows():
        loss = losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=2, gather_across_devices=True)
        emb = _embeddings(rank, rows, 2)
        loss.calculate_loss(_mini_batches(emb, 2), _mini_batches([e.detach() for e in emb], 2), with_backward=True)

    def cached_mnrl_texts_rows():  # through the model, with duplicate masking (its ids are gathered first)
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2, gather_across_devices=True,
                                                         mask_duplicates=True)
        loss([model.preprocess(column[:rows]) for column in TEXTS], None).backward()

    def gist_texts_rows():
        loss = losses.GISTEmbedLoss(model, guide, gather_across_devices=True)
        loss([model.preprocess(column[:rows]) for column in TEXTS], None).backward()

    return {f.__name__: f for f in (mnrl_rows, mnrl_columns, mnrl_dim, cached_mnrl_rows, cached_gist_rows,
                                    cached_mnrl_texts_rows, gist_texts_rows)}


def _uneven_mini_batches(rank: int, model) -> dict:
    """The cached loss through the model on this rank's half of TEXTS: rank 0 in 4 mini-batches of 1, rank 1 in
    2 of 2, then both in one mini-batch of 4; without and with DDP."""
    from torch.nn.parallel import DistributedDataParallel

    from fastcache import losses

    half = len(TEXTS[0]) // WORLD
    features = [model.preprocess(column[rank * half:(rank + 1) * half]) for column in TEXTS]
    results = {}
    for ddp in (False, True):
        for split, size in (("uneven", 1 if rank == 0 else 2), ("even", 4)):
            model.zero_grad(set_to_none=True)
            loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=size, gather_across_devices=True)
            if ddp:
                loss.model = DistributedDataParallel(model, find_unused_parameters=True)
            value = loss([dict(f) for f in features], None)
            value.backward()
            results[(ddp, split)] = (value.detach(), torch.cat([p.grad.flatten() for p in model.parameters()
                                                                if p.grad is not None]))
    return results


def _rank_main(rank: int, folder: str) -> None:
    import torch.distributed as dist

    model, guide = start_gloo_rank(rank, folder, WORLD, PG_TIMEOUT_S)
    try:
        results = {"faults": {}}
        for name, scenario in _fault_scenarios(rank, model, guide).items():
            start = time.monotonic()
            try:
                scenario()
                outcome = None
            except Exception as error:  # noqa: BLE001 - the outcome is what the test checks
                outcome = (type(error).__name__, str(error))
            results["faults"][name] = (outcome, time.monotonic() - start)
        # still in step after the errors: a collective completes with every rank's contribution
        token = torch.tensor([rank + 1.0])
        dist.all_reduce(token)
        results["in_step"] = float(token)
        results["uneven"] = _uneven_mini_batches(rank, model)
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Both ranks, spawned once, killed at the deadline; their results (a rank that crashed or hung fails here)."""
    return spawn_world(_rank_main, tmp_path_factory.mktemp("faults_world"), WORLD, DEADLINE_S)


FAULTS = {  # scenario -> what each rank's message must say about every rank
    "mnrl_rows": ["rank 0: columns=2, rows=4, dim=8", "rank 1: columns=2, rows=3, dim=8"],
    "mnrl_columns": ["rank 0: columns=3, rows=4", "rank 1: columns=2, rows=4"],
    "mnrl_dim": ["rank 0: columns=2, rows=4, dim=8", "rank 1: columns=2, rows=4, dim=9"],
    "cached_mnrl_rows": ["rank 0: columns=3, rows=4", "rank 1: columns=3, rows=3"],
    "cached_gist_rows": ["rank 0: columns=2, rows=4", "rank 1: columns=2, rows=3"],
    "cached_mnrl_texts_rows": ["rank 0: columns=2, rows=4", "rank 1: columns=2, rows=3"],
    "gist_texts_rows": ["rank 0: columns=2, rows=4", "rank 1: columns=2, rows=3"],
}


@pytest.mark.parametrize("scenario", list(FAULTS))
def test_faulty_layout_is_a_clear_error_on_every_rank(world, scenario):
    for rank, results in enumerate(world):
        outcome, seconds = results["faults"][scenario]
        assert outcome is not None, f"rank {rank}: {scenario} ran without an error"
        kind, message = outcome
        assert kind == "ValueError", f"rank {rank}: {kind}: {message}"
        assert "gather_across_devices=True needs the same batch layout on every rank" in message
        for expected in FAULTS[scenario]:
            assert expected in message, f"rank {rank}: {expected!r} not in {message!r}"
        assert seconds < PG_TIMEOUT_S, f"rank {rank}: {scenario} took {seconds:.1f} s: it waited for a timeout"


def test_every_fault_scenario_is_checked(world):
    assert set(world[0]["faults"]) == set(FAULTS)


def test_ranks_stay_in_step_after_the_errors(world):
    assert [results["in_step"] for results in world] == [float(sum(range(1, WORLD + 1)))] * WORLD


@pytest.mark.parametrize("ddp", [False, True], ids=["plain", "ddp"])
def test_uneven_mini_batch_counts_give_the_even_result(world, ddp):
    """Rank 0 in 4 mini-batches, rank 1 in 2: no collective per mini-batch, so no fault; the loss and the
    parameter gradients are those of one mini-batch per rank (up to float32 summation order)."""
    for rank, results in enumerate(world):
        (loss_uneven, grads_uneven), (loss_even, grads_even) = results["uneven"][(ddp, "uneven")], \
            results["uneven"][(ddp, "even")]
        assert float(loss_even) > 1e-3 and float(grads_even.abs().max()) > 1e-6
        torch.testing.assert_close(loss_uneven, loss_even, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grads_uneven, grads_even, rtol=1e-4, atol=1e-6 * float(grads_even.abs().max()))
    if ddp:  # DDP's single all-reduce per step gives both ranks the same averaged gradients
        torch.testing.assert_close(world[0]["uneven"][(True, "uneven")][1], world[1]["uneven"][(True, "uneven")][1])
