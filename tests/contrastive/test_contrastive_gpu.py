"""The contrastive op on a CUDA GPU (marked ``cuda``; skipped without one; run by the GPU suite): every GPU backend
x strategy (cuda + slab, triton + slab, triton + tiled, triton + fused_slab, and auto) against the dense reference
in float64, and in float32 / bfloat16 / float16 against the reference's own error (tests/helpers.py), on odd and on
larger shapes; the automatic choices, determinism and the tiled strategy's memory. The same maths on CPU through
the Triton interpreter: tests/contrastive/test_contrastive_triton.py and test_contrastive_fused_slab.py.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache import contrastive_loss_and_grad
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from helpers import (
    OP_PATHS,
    assert_matches,
    assert_no_worse_than_reference,
    low_precision_runs,
    make_batch,
    reference_loss_and_grads,
    relative_error,
)
from test_contrastive_op import LOW_PRECISION_CASES

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
COMBOS = [("cuda", "slab"), ("triton", "slab"), ("triton", "tiled"), ("triton", "fused_slab"), ("auto", "slab"),
          ("auto", "auto")]
CUDA = torch.device("cuda")


@pytest.fixture(params=COMBOS, ids=["-".join(c) for c in COMBOS])
def combo(request):
    backend, strategy = request.param
    available = contrastive_epilogue.available(CUDA)
    for needed in ("cuda", "triton") if backend == "auto" else (backend,):
        if available[needed] is not None:
            pytest.skip(f"backend {needed!r} cannot run: {available[needed]}")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter, not on the GPU")
    return {"backend": backend, "strategy": strategy}


def on_gpu(batch: dict) -> dict:
    return {k: v.to(CUDA) for k, v in batch.items()}


def run_on_gpu(path: str, batch: dict, **options):
    """An op path on the GPU copy of ``batch``; loss and gradients back on the CPU."""
    loss, grads = OP_PATHS[path](on_gpu(batch), **options)
    return loss.cpu(), {k: g.cpu() for k, g in grads.items()}


VARIANTS = [
    ((QD,), "joint", None, "cos"),
    ((QD,), "joint", "in_batch_negatives", "dot"),
    ((QD, DQ), "per_direction", "hard_negatives", "cos"),
    ((QD, QQ), "joint", "all_negatives", "dot"),
    ((QD, DD), "joint", "hard_negatives", "cos"),
    (ALL, "joint", "all_negatives", "cos"),
]


@pytest.mark.parametrize("directions,partition_mode,hardness_mode,similarity", VARIANTS)
@pytest.mark.parametrize("path", list(OP_PATHS))
def test_variants_float64(combo, directions, partition_mode, hardness_mode, similarity, path):
    batch = make_batch(5, 8, columns=2, seed=1)
    options = dict(directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                   hardness_strength=0.0 if hardness_mode is None else 3.0, similarity=similarity)
    assert_matches(run_on_gpu(path, batch, **combo, **options), reference_loss_and_grads(batch, **options))


SHAPES = [(1, 1, 1), (3, 5, 3), (70, 3, 2), (13, 1000, 2), (200, 96, 3)]  # rows, dim, columns


@pytest.mark.parametrize("rows,dim,columns", SHAPES)
def test_shapes_float64(combo, rows, dim, columns):
    batch = make_batch(rows, dim, columns=columns, seed=2)
    options = dict(directions=ALL, hardness_mode="all_negatives", hardness_strength=1.0)
    assert_matches(run_on_gpu("loss_and_grad", batch, **combo, chunk_size=None, **options),
                   reference_loss_and_grads(batch, **options))


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_guide_gathered_doc_ids_float64(combo, margin_strategy):
    batch = make_batch(3, 6, columns=2, positives=7, offset=2, docs_3d=True, guide_dim=3, seed=3)
    batch["doc_ids"] = torch.tensor([[5, 1, 2, 3, 2, 7, 0], [2, 8, 3, 9, 1, 5, 4]])
    options = dict(directions=(QD, QQ, DD), offset=2, margin=0.1, margin_strategy=margin_strategy)
    assert_matches(run_on_gpu("loss_and_grad", batch, **combo, **options), reference_loss_and_grads(batch, **options))


def test_gathered_float64(combo):
    batch = make_batch(4, 6, columns=2, positives=9, offset=3, gathered=True, seed=4)
    options = dict(directions=ALL, offset=3, hardness_mode="in_batch_negatives", hardness_strength=1.0)
    assert_matches(run_on_gpu("autograd", batch, **combo, **options), reference_loss_and_grads(batch, **options))


LARGE_CASES = {
    "large_plain": (dict(rows=300, dim=384, columns=2), {}),
    "large_all_dirs": (dict(rows=260, dim=200, columns=3),
                       dict(directions=ALL, hardness_mode="hard_negatives", hardness_strength=1.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES) + list(LARGE_CASES))
def test_low_precision_no_worse_than_reference(combo, dtype, case):
    shape, options = {**LOW_PRECISION_CASES, **LARGE_CASES}[case]
    runs = low_precision_runs(shape, options, dtype,
                              lambda batch: run_on_gpu("loss_and_grad", batch, **combo, **options))
    for k, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_slab_gemms_keep_low_precision_operands(dtype):
    """bf16/fp16 inputs get the slab's GEMMs in their own dtype (tensor-core rate) when torch has mm/addmm's
    fp32-output overloads (torch >= 2.8, as on the GPU machine); fp32 inputs keep fp32 GEMMs."""
    from fastcache.ops.contrastive.slab import low_precision_gemms

    if not hasattr(torch.ops.aten.mm, "dtype_out"):
        pytest.skip(f"torch {torch.__version__} has no fp32-output mm for {dtype} operands (torch >= 2.8)")
    assert low_precision_gemms(torch.empty(1, 1, device=CUDA, dtype=dtype))
    assert not low_precision_gemms(torch.empty(1, 1, device=CUDA))


def test_triton_strategies_are_deterministic(combo):
    if combo["strategy"] not in ("tiled", "fused_slab"):
        pytest.skip("the Triton strategies only")
    batch = on_gpu(make_batch(300, 64, columns=2, seed=5, dtype=torch.bfloat16))
    first = contrastive_loss_and_grad(batch["queries"], batch["docs"], directions=ALL, **combo)
    second = contrastive_loss_and_grad(batch["queries"], batch["docs"], directions=ALL, **combo)
    for a, b in zip(first[:3], second[:3]):
        assert torch.equal(a, b)


def test_auto_strategy_goes_tiled_under_a_small_budget(monkeypatch):
    if contrastive_epilogue.available(CUDA)["triton"] is not None:
        pytest.skip(contrastive_epilogue.available(CUDA)["triton"])
    calls = []
    for name, function in list(contrastive_epilogue.EPILOGUES.items()):
        monkeypatch.setitem(contrastive_epilogue.EPILOGUES, name,
                            lambda *args, _f=function: calls.append(1) or _f(*args))
    batch = on_gpu(make_batch(512, 32, columns=2, seed=6, dtype=torch.float32))
    tiny = contrastive_loss_and_grad(batch["queries"], batch["docs"], memory_budget=2**20)
    assert not calls  # 1 MiB holds fewer than MIN_SLAB_ROWS rows: tiled, no epilogue
    roomy = contrastive_loss_and_grad(batch["queries"], batch["docs"], memory_budget=2**30)
    assert calls
    for a, b in zip(tiny[:3], roomy[:3]):  # tiles and slab sum in another order: error relative to the scale
        assert relative_error(a, b) <= 1e-4, relative_error(a, b)


def test_tiled_memory_is_linear_in_the_batch():
    """Peak memory of the tiled strategy beyond its inputs: the normalised copies, fp32 gradients, O(B)
    statistics, the backward's scratch (PASS 16-bit values per owned row) and the autotuner's copy of the gradient
    it restores after timing (the first call), never a B x N block (which would be 2 GiB here)."""
    if contrastive_epilogue.available(CUDA)["triton"] is not None:
        pytest.skip(contrastive_epilogue.available(CUDA)["triton"])
    from fastcache.triton.contrastive import BACKWARD_CONFIGS

    rows, dim = 16384, 128
    batch = on_gpu(make_batch(rows, dim, columns=2, seed=7, dtype=torch.bfloat16))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    contrastive_loss_and_grad(batch["queries"], batch["docs"], backend="triton", strategy="tiled")
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    embeddings = 3 * rows * dim  # queries + two columns of docs
    scratch = max(-(-2 * rows // c.kwargs["OWN"]) * c.kwargs["OWN"] * c.kwargs["PASS"] * 2
                  for c in BACKWARD_CONFIGS[2, False])  # programs over the doc rows
    restored = 4 * 2 * rows * dim  # the docs' fp32 gradient
    # copies, fp32 grads, fp32 normalisation temp, out
    assert extra < embeddings * (2 + 4 + 4 + 2) + scratch + restored + 2**20, extra
