"""The GPU suite's correctness phase: ~20 curated cases, one or two per GPU kernel and option group, that say in
about a minute whether the kernels are right on a real GPU (bench/gpu_suite.sh runs them first, before any
benchmark; the broad ``-m cuda`` tests come last).

Each case runs an op on odd shapes (B = 1, 37; D = 384, 1000; N not a multiple of any tile) against the float64
reference: float64 inputs to 1e-10 (``assert_matches``), float32 / bfloat16 / float16 no worse than the same-dtype
reference plus a few rounding units (``assert_no_worse_than_reference``, tests/helpers.py). On a GPU the 16-bit
Triton cases take the real tensor-core path (bf16 is widened only under the interpreter).

Without a GPU the Triton cases run on CPU through the interpreter (tests/conftest.py turns it on), so the
default test run checks this file's own code; the CUDA kernels' cases (the epilogue, the ranking ops) skip, or fail
under FASTCACHE_REQUIRE_CUDA=1, as the suite sets on the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from helpers import (
    MATRYOSHKA_OP_PATHS,
    OP_PATHS,
    assert_low_precision_no_worse_than_reference,
    assert_matches,
    assert_no_worse_than_reference,
    low_precision_runs,
    make_batch,
    matryoshka_reference_loss_and_grads,
    reference_loss_and_grads,
)

pytestmark = [
    pytest.mark.gpu_smoke,
    # the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
BF16, FP16, FP32, FP64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
TILED, TRITON_SLAB, CUDA_SLAB = ("triton", "tiled"), ("triton", "slab"), ("cuda", "slab")
HARD = dict(hardness_mode="all_negatives", hardness_strength=1.0)

# id: ((backend, strategy), dtype, batch shape, options)
CONTRASTIVE = {
    "tiled-bf16-B37-D384": (TILED, BF16, dict(rows=37, dim=384, columns=2), {}),
    "tiled-fp16-B37-D1000-all-dirs": (TILED, FP16, dict(rows=37, dim=1000, columns=3), dict(directions=ALL, **HARD)),
    "tiled-fp32-B1-D384": (TILED, FP32, dict(rows=1, dim=384, columns=2), {}),
    "tiled-bf16-guide-ids-offset": (TILED, BF16, dict(rows=19, dim=384, columns=2, positives=40, offset=5,
                                                      docs_3d=True, guide_dim=64),
                                    dict(directions=(QD, QQ, DD), offset=5, margin=0.05, margin_strategy="relative")),
    "tiled-bf16-gathered-per-direction": (TILED, BF16, dict(rows=21, dim=384, columns=2, positives=50, offset=9,
                                                            gathered=True),
                                          dict(directions=(QD, DQ), partition_mode="per_direction", offset=9)),
    "tiled-fp64-B37-all-dirs": (TILED, FP64, dict(rows=37, dim=96, columns=2), dict(directions=ALL, **HARD)),
    "triton-slab-bf16-B37-D384": (TRITON_SLAB, BF16, dict(rows=37, dim=384, columns=2), {}),
    "triton-slab-fp16-guide": (TRITON_SLAB, FP16, dict(rows=19, dim=384, columns=2, positives=40, offset=5,
                                                       docs_3d=True, guide_dim=64),
                               dict(directions=(QD, QQ, DD), offset=5, margin=0.05)),
    "triton-slab-fp32-all-dirs-dot": (TRITON_SLAB, FP32, dict(rows=37, dim=1000, columns=2, norm=0.2),
                                      dict(directions=ALL, similarity="dot", scale=5.0)),
    "cuda-slab-bf16-B37-D384": (CUDA_SLAB, BF16, dict(rows=37, dim=384, columns=2), {}),
    "cuda-slab-fp32-all-dirs": (CUDA_SLAB, FP32, dict(rows=37, dim=1000, columns=3), dict(directions=ALL, **HARD)),
    "cuda-slab-fp16-guide-gathered": (CUDA_SLAB, FP16, dict(rows=19, dim=384, columns=2, positives=40, offset=5,
                                                            docs_3d=True, guide_dim=64),
                                      dict(directions=(QD, QQ, DD), offset=5, margin=0.05)),
    "auto-bf16-B300-D768": (("auto", "auto"), BF16, dict(rows=300, dim=768, columns=2), {}),
}
MATRYOSHKA = {
    "matryoshka-tiled-bf16-D384-5-dims": (TILED, BF16, dict(rows=37, dim=384, columns=2),
                                          dict(dims=[384, 256, 128, 64, 32])),
    "matryoshka-tiled-fp32-D1000-odd-dims": (TILED, FP32, dict(rows=37, dim=1000, columns=2),
                                             dict(dims=[1000, 500, 17], weights=[1.0, 0.5, 2.0], directions=ALL)),
    "matryoshka-tiled-fp64-guide": (TILED, FP64, dict(rows=5, dim=13, columns=2, guide_dim=5),
                                    dict(dims=[13, 9, 4], directions=(QD, QQ, DD), margin=0.05)),
    "matryoshka-cuda-slab-bf16": (CUDA_SLAB, BF16, dict(rows=37, dim=384, columns=2), dict(dims=[384, 128, 32])),
}
RANKING = ["lambda_ndcg_loss2pp", "ranknet_k4", "plistmle_default", "listnet"]


def runnable(backend: str) -> None:
    """Skip (fail under FASTCACHE_REQUIRE_CUDA=1) a case whose backend cannot run here."""
    needed = ("cuda", "triton") if backend == "auto" else (backend,)
    available = contrastive_epilogue.available(DEVICE)
    for name in needed:
        reason = available.get(name, f"backend {name!r} unknown")
        if name == "cuda" and DEVICE.type != "cuda":
            reason = "needs a CUDA GPU"
        if reason is not None:
            if os.environ.get("FASTCACHE_REQUIRE_CUDA") == "1":
                pytest.fail(f"FASTCACHE_REQUIRE_CUDA=1 but backend {name!r} cannot run: {reason}")
            pytest.skip(f"backend {name!r} cannot run: {reason}")
    if DEVICE.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("TRITON_INTERPRET=1: the Triton kernels would run in the interpreter, not on the GPU")


def on_device(paths: dict, path: str, batch: dict, **options):
    loss, grads = paths[path]({k: v.to(DEVICE) for k, v in batch.items()}, **options)
    return loss.cpu(), {k: g.cpu() for k, g in grads.items()}


@pytest.mark.parametrize("case", list(CONTRASTIVE))
def test_contrastive(case):
    (backend, strategy), dtype, shape, options = CONTRASTIVE[case]
    runnable(backend)
    settings = dict(backend=backend, strategy=strategy, **options)
    if dtype == FP64:
        batch = make_batch(**shape, seed=1)
        assert_matches(on_device(OP_PATHS, "loss_and_grad", batch, **settings),
                       reference_loss_and_grads(batch, **options))
        return
    runs = low_precision_runs(shape, options, dtype, lambda batch: on_device(OP_PATHS, "autograd", batch, **settings))
    for k, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, reference, truth, FP32 if k == "loss" else dtype)


@pytest.mark.parametrize("case", list(MATRYOSHKA))
def test_matryoshka(case):
    (backend, strategy), dtype, shape, options = MATRYOSHKA[case]
    runnable(backend)
    settings = dict(backend=backend, strategy=strategy, **options)
    if dtype == FP64:
        batch = make_batch(**shape, seed=1)
        assert_matches(on_device(MATRYOSHKA_OP_PATHS, "loss_and_grad", batch, **settings),
                       matryoshka_reference_loss_and_grads(batch, **options))
        return
    assert_low_precision_no_worse_than_reference(
        shape, options, dtype, [lambda batch: on_device(MATRYOSHKA_OP_PATHS, "loss_and_grad", batch, **settings)])


@pytest.mark.parametrize("name", RANKING)
def test_ranking_cuda(name):
    """The CUDA ranking kernels on odd list lengths with padding, float32, against the float64 reference."""
    runnable("cuda")
    from test_ranking_cuda import TOL, assert_close_to_reference, cuda_lists

    logits, y, mask = cuda_lists(5, 45, dtype=FP32, seed=3)
    assert_close_to_reference(name, logits, y, mask, TOL[FP32])
