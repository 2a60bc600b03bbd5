"""fastcache's gradient cache under DistributedDataParallel (2 gloo processes on CPU): the same parameter
gradients as sentence-transformers' cached loss, with DDP's per-backward all-reduce replaced by one all-reduce
per step (upstream all-reduces once per mini-batch of every column)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import relative_error

TESTS = Path(__file__).resolve().parents[1]
WORLD = 2
TEXTS = [
    ["the cat", "a dog at work", "sun", "nice weather today", "car", "query document", "the sun today", "a cat dog"],
    ["cat", "dog work", "the sun", "weather nice", "a car", "document", "today sun", "dog cat"],
]


def _rank_main(rank: int, store: str, model_dir: str, out_dir: str) -> None:
    sys.path.insert(0, str(TESTS))
    warnings.simplefilter("ignore")
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import losses as st_losses
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel

    from fastcache import losses

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = SentenceTransformer(model_dir, device="cpu").eval()  # written once by the test: no rank rewrites it
        half = len(TEXTS[0]) // WORLD
        texts = [column[rank * half:(rank + 1) * half] for column in TEXTS]
        results = {}
        for name, cls in (("upstream", st_losses.CachedMultipleNegativesRankingLoss),
                          ("fastcache", losses.CachedMultipleNegativesRankingLoss)):
            model.zero_grad(set_to_none=True)
            ddp = DistributedDataParallel(model, find_unused_parameters=True)  # BERT's pooler is unused
            calls = [0]

            def counting_hook(state, bucket):
                calls[0] += 1
                return default_hooks.allreduce_hook(state, bucket)

            ddp.register_comm_hook(dist.group.WORLD, counting_hook)
            loss = cls(model, mini_batch_size=2)
            loss.model = ddp  # what SentenceTransformerTrainer does under DDP
            value = loss([model.preprocess(column) for column in texts], None)
            value.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[name] = {"loss": float(value), "grads": grads, "ddp_allreduce_calls": calls[0]}
            # a gradient-accumulation micro-step (the trainer wraps it in no_sync): no averaging at all
            model.zero_grad(set_to_none=True)
            calls[0] = 0
            with ddp.no_sync():
                loss([model.preprocess(column) for column in texts], None).backward()
            local = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[name].update(local_grads=local, no_sync_calls=calls[0])
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_upstream_with_one_sync_per_step(tmp_path):
    context = mp.get_context("spawn")
    processes = [context.Process(target=_rank_main, args=(rank, str(tmp_path / "store"), str(tmp_path / "model"),
                                                          str(tmp_path))) for rank in range(WORLD)]
    # both ranks build the same model folder: write it once first
    sys.path.insert(0, str(TESTS))
    from conftest import build_tiny_bert

    build_tiny_bert(tmp_path / "model", seed=0)
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=240)
    hung = [p for p in processes if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a rank hung"
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    for rank_results in results:
        upstream, ours = rank_results["upstream"], rank_results["fastcache"]
        assert ours["loss"] == pytest.approx(upstream["loss"], rel=1e-5)
        # parameter gradients summed over mini-batches and ranks in another order than upstream's: compared
        # against their own scale (max |a - e| <= 1e-4 max |e|), not per element
        assert relative_error(ours["grads"], upstream["grads"]) <= 1e-4
        # 2 columns x 2 mini-batches of 2 rows per rank: upstream syncs at every replay, fastcache never
        # through DDP (its single all-reduce per step is its own)
        assert upstream["ddp_allreduce_calls"] >= 4
        assert ours["ddp_allreduce_calls"] == 0
        assert relative_error(ours["local_grads"], upstream["local_grads"]) <= 1e-4
        assert ours["no_sync_calls"] == upstream["no_sync_calls"] == 0
    # the averaged gradients are the same on every rank; the micro-step's local ones are not
    assert not torch.allclose(results[0]["fastcache"]["local_grads"], results[1]["fastcache"]["local_grads"])
    torch.testing.assert_close(results[0]["fastcache"]["grads"], results[1]["fastcache"]["grads"])
