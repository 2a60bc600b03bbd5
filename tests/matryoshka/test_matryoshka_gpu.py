"""The Matryoshka op's tiled strategy (the Triton multi-dim kernels) on a CUDA GPU (marked ``cuda``; skipped without
one; run by bench/gpu_suite.sh): against the dense reference in float64, in float32 / bfloat16 / float16 against the
reference's own error (tests/helpers.py) on a small and on a D = 768 case with five dims, against the slab on the
GPU, determinism, the automatic choice under a small budget and memory linear in the batch. Kept to few kernel
variants, each compiled on first use (the suite's test phase has a time limit): below float64, every case has five
dims, the default options and one direction, so that one compiled set per dtype serves them all. The same maths on
CPU through the Triton interpreter, every option: tests/matryoshka/test_matryoshka_triton.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.matryoshka import matryoshka_contrastive_loss_and_grad
from helpers import (MATRYOSHKA_OP_PATHS, assert_low_precision_no_worse_than_reference, assert_matches, make_batch,
                     matryoshka_reference_loss_and_grads, relative_error)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
CUDA = torch.device("cuda")
TILED = dict(backend="triton", strategy="tiled")


@pytest.fixture(autouse=True)
def triton_on_the_gpu():
    reason = contrastive_epilogue.available(CUDA)["triton"]
    if reason is not None:
        pytest.skip(reason)
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter, not on the GPU")


def on_gpu(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


def run_on_gpu(path: str, batch: dict, **options):
    loss, grads = MATRYOSHKA_OP_PATHS[path](on_gpu(batch), **options)
    return loss.cpu(), {k: g.cpu() for k, g in grads.items()}


FIVE_DIMS = (1.0, 2 / 3, 1 / 3, 1 / 6, 1 / 12)  # of D: 768/512/256/128/64 at D = 768


def five_dims(dim: int) -> list[int]:
    return sorted({max(1, round(dim * f)) for f in FIVE_DIMS}, reverse=True)


FLOAT64_CASES = {  # every direction (doc_to_query fused), B and N over several tiles, dims inside output tiles
    "all_dirs_hardness": (dict(rows=70, dim=150, columns=2),
                          dict(dims=[150, 129, 128, 37, 1], weights=[1.0, 0.5, 2.0, 1.0, 0.25], directions=ALL,
                               hardness_mode="all_negatives", hardness_strength=2.0)),
    "guide_doc_ids": (dict(rows=5, dim=13, columns=2, guide_dim=5),
                      dict(dims=[13, 9, 4], directions=(QD, QQ, DD), margin=0.05, margin_strategy="relative")),
}


@pytest.mark.parametrize("path", list(MATRYOSHKA_OP_PATHS))
@pytest.mark.parametrize("case", list(FLOAT64_CASES))
def test_float64(case, path):
    shape, options = FLOAT64_CASES[case]
    batch = make_batch(**shape, seed=1)
    if "guide_dim" in shape:
        batch["doc_ids"] = torch.tensor([0, 1, 2, 3, 4, 1, 9, 0, 3, 3])
    assert_matches(run_on_gpu(path, batch, **TILED, **options), matryoshka_reference_loss_and_grads(batch, **options))


LOW_PRECISION_CASES = {
    "small": (dict(rows=6, dim=32, columns=2), dict(dims=five_dims(32))),
    "d768": (dict(rows=300, dim=768, columns=2), dict(dims=five_dims(768))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_reference(dtype, case):
    shape, options = LOW_PRECISION_CASES[case]
    assert_low_precision_no_worse_than_reference(
        shape, options, dtype, [lambda batch: run_on_gpu("loss_and_grad", batch, **TILED, **options)])


def test_same_as_the_slab_and_deterministic():
    batch = on_gpu(make_batch(300, 96, columns=2, seed=5, dtype=torch.bfloat16))
    options = dict(dims=five_dims(96))
    first = matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], **TILED, **options)
    second = matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], **TILED, **options)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)
    slab = matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], backend="triton", strategy="slab",
                                                **options)
    torch.testing.assert_close(first.loss, slab.loss, rtol=1e-4, atol=1e-5)
    for a, b in zip(first[1:3], slab[1:3]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_auto_strategy_goes_tiled_under_a_small_budget(monkeypatch):
    from fastcache.ops.matryoshka import tiled as triton_matryoshka

    calls = []
    original = triton_matryoshka.matryoshka_tiled
    monkeypatch.setattr(triton_matryoshka, "matryoshka_tiled", lambda *a: calls.append(1) or original(*a))
    batch = on_gpu(make_batch(512, 32, columns=2, seed=6, dtype=torch.float32))
    tiny = matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=five_dims(32),
                                                memory_budget=2**20)
    assert calls  # 1 MiB holds fewer than MIN_SLAB_ROWS rows: tiled
    calls.clear()
    roomy = matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=five_dims(32),
                                                 memory_budget=2**30)
    assert not calls
    for a, b in zip(tiny[:3], roomy[:3]):  # tiles and slab sum in another order: error relative to the scale
        assert relative_error(a, b) <= 1e-4, relative_error(a, b)


def test_tiled_memory_is_linear_in_the_batch():
    """Peak memory beyond the inputs: fp32 gradient accumulators, the outputs, O(K·(B + N)) statistics, the norm
    pre-pass's chunk temporaries, the backward's scratch (K - 1 fp32 tiles and K 16-bit passes per program) and the
    autotuner's copy of the gradient it restores after timing (the first call); never a B x N block (2 GiB in
    float32 here)."""
    from fastcache.triton.matryoshka import BACKWARD_CONFIGS

    rows, dim = 16384, 128
    batch = on_gpu(make_batch(rows, dim, columns=2, seed=7, dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=five_dims(dim), **TILED)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    embeddings = 3 * rows * dim  # queries + two columns of docs
    K = len(five_dims(dim))
    configs = [c.kwargs for c in BACKWARD_CONFIGS[2, False]]
    owned = [-(-2 * rows // c["OWN"]) * c["OWN"] for c in configs]  # programs over the doc rows
    scratch = max(n * (K - 1) * c["SWEPT"] * 4 for n, c in zip(owned, configs)) + \
        max(n * K * c["PASS"] * 2 for n, c in zip(owned, configs))
    restored = 4 * 2 * rows * dim  # the docs' fp32 gradient
    assert extra < 16 * embeddings + scratch + restored + 64 * 2**20, extra
