"""A negative scale (GISTEmbedLoss with temperature < 0): the op on every backend (the drop-in losses:
tests/losses/test_gist_negative_temperature.py).

logit = scale·s with scale < 0 ranks the least similar candidates first; masking comes after the scaling (a
masked candidate's logit is -inf), so masked candidates are left out of the softmax. sentence-transformers masks
the similarities before dividing by the temperature: -inf / (negative temperature) = +inf, so its loss is NaN as
soon as one candidate is masked (with GIST's default contrast_anchors=True the anchor-anchor diagonal always is).
Here: the op (slab with the cpu, torch and Triton epilogues, the tiled strategy, the low-precision GEMM path, the
Matryoshka op, the CUDA epilogue through its host emulation) against the dense reference (fastcache/reference.py,
which masks after scaling too), float64.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from fastcache import contrastive_loss, contrastive_loss_and_grad
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.contrastive import ContrastiveOptions
from fastcache.reference import contrastive_loss_reference
from helpers import (
    MATRYOSHKA_OP_PATHS,
    OP_PATHS,
    assert_matches,
    emulate_low_precision_gemms,
    load_host_emulation,
    make_batch,
    matryoshka_reference_loss_and_grads,
    op_loss_and_grad,
    reference_loss_and_grads,
)
from test_contrastive_cuda import _case, _compare

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
# the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
ALL = (QD, QQ, DQ, DD)

# (batch arguments, options): every direction set, both partitions, each hardness mode, a guide with both margin
# strategies, gathered queries at an offset, duplicate ids
VARIANTS = {
    "plain": ({}, dict(scale=-20.0)),
    "all_directions": (dict(columns=2), dict(scale=-5.0, directions=ALL)),
    "per_direction": ({}, dict(scale=-5.0, directions=(QD, DQ), partition_mode="per_direction")),
    "in_batch_hardness": (dict(columns=2), dict(scale=-7.0, hardness_mode="in_batch_negatives",
                                                 hardness_strength=3.0)),
    "hard_negatives": (dict(columns=2), dict(scale=-7.0, directions=ALL, hardness_mode="hard_negatives",
                                             hardness_strength=2.0)),
    "all_negatives": (dict(columns=2), dict(scale=-3.0, directions=(QD, DQ), partition_mode="per_direction",
                                            hardness_mode="all_negatives", hardness_strength=5.0)),
    "guided_absolute": (dict(columns=2, guide_dim=6), dict(scale=-20.0, directions=(QD, QQ, DD), margin=0.05)),
    "guided_relative": (dict(columns=2, guide_dim=6), dict(scale=-50.0, margin=0.1, margin_strategy="relative")),
    "gathered": (dict(columns=2, positives=7, offset=2, gathered=True), dict(scale=-10.0, offset=2, directions=ALL)),
    "dot": (dict(columns=2), dict(scale=-0.5, similarity="dot", directions=(QD, DD))),
}


def _batch(variant: str, with_ids: bool = False) -> tuple[dict, dict]:
    arguments, options = VARIANTS[variant]
    batch = make_batch(5, 8, seed=3, **arguments)
    if with_ids:  # two candidates share ids with other rows' positives
        n = batch["docs"].shape[0]
        ids = torch.arange(n)
        ids[-1], ids[-2] = ids[0], ids[1]
        batch["doc_ids"] = ids
    return batch, options


def _triton_interpreted():
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)")


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["cpu", "torch", "triton"])
def test_op_matches_reference(backend, variant):
    if backend == "triton":
        _triton_interpreted()
    batch, options = _batch(variant, with_ids=variant == "plain")
    expected = reference_loss_and_grads(batch, **options)
    assert math.isfinite(float(expected[0]))
    for path in OP_PATHS.values():
        assert_matches(path(batch, backend=backend, chunk_size=2, **options), expected)


@pytest.mark.parametrize("variant", ["plain", "all_directions", "per_direction", "hard_negatives",
                                     "guided_relative", "gathered"])
def test_tiled_strategy_matches_reference(variant):
    """The Triton tiled kernels (their fp16 gradient scale is a power of two of |scale|/B)."""
    _triton_interpreted()
    batch, options = _batch(variant, with_ids=variant == "plain")
    assert_matches(op_loss_and_grad(batch, backend="triton", strategy="tiled", **options),
                   reference_loss_and_grads(batch, **options))


def test_low_precision_gemms(monkeypatch):
    """The slab with its GEMMs in fp16 (as fp16 CUDA inputs get it, emulated on CPU): dL/ds is scaled by a power
    of two of |scale|/B before it becomes an fp16 operand."""
    import fastcache.ops.contrastive.slab as op

    low_operands = emulate_low_precision_gemms(monkeypatch, op, torch.float16)
    batch, options = _batch("all_directions")
    batch = {k: v.to(torch.float16) for k, v in batch.items()}
    loss, grads = op_loss_and_grad(batch, backend="torch", chunk_size=2, **options)
    assert low_operands and all(low_operands)
    ref_loss, ref_grads = reference_loss_and_grads({k: v.double() for k, v in batch.items()}, **options)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-3, atol=1e-3)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k].double(), g, rtol=0.05, atol=0.02 * float(g.abs().max()))


@pytest.mark.parametrize("backend", ["cpu", "torch", "triton", "tiled"])
@pytest.mark.parametrize("variant", ["plain", "hard_negatives", "guided_absolute"])
def test_matryoshka_op_matches_reference(backend, variant):
    settings = dict(backend=backend, chunk_size=2)
    if backend in ("triton", "tiled"):
        _triton_interpreted()
        if backend == "tiled":
            settings = dict(backend="triton", strategy="tiled")
    batch, options = _batch(variant)
    dims = dict(dims=[8, 5, 2], weights=[1.0, 0.5, 2.0])
    expected = matryoshka_reference_loss_and_grads(batch, **dims, **options)
    for path in MATRYOSHKA_OP_PATHS.values():
        assert_matches(path(batch, **dims, **settings, **options), expected)


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_masked_candidates_are_left_out(backend):
    """A guide that masks every candidate but the positive: the loss is 0 at any scale (the positive alone in the
    softmax), as the reference gives; the same batch with the masked candidates removed gives the same loss."""
    batch, _ = _batch("guided_absolute")
    q, d = batch["queries"], batch["docs"]
    for scale in (-20.0, 20.0):
        loss = contrastive_loss(q, d, guide_queries=batch["guide_queries"], guide_docs=batch["guide_docs"],
                                scale=scale, margin=10.0, backend=backend)
        assert float(loss) == 0.0
        assert float(contrastive_loss_reference(q, d, guide_queries=batch["guide_queries"],
                                                guide_docs=batch["guide_docs"], scale=scale, margin=10.0)) == 0.0
    # one query and five candidates (its positive first), a guide that masks exactly candidates 1 and 2: the loss
    # of the softmax over candidates 0, 3 and 4 alone, and no gradient to the masked ones
    q, d = q[:1], d[:5]
    guide_q = torch.tensor([[1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    guide_d = torch.tensor([[1.0, 1.0, 0.0, 0.0]] + [[1.0, 0.0, 0.0, 0.0]] * 2 + [[0.0, 0.0, 0.0, 1.0]] * 2,
                           dtype=torch.float64)  # cosines with the guide's query: 0.71 (positive), 1, 1, 0, 0
    out = contrastive_loss_and_grad(q, d, guide_queries=guide_q, guide_docs=guide_d, scale=-20.0, backend=backend)
    kept = [0, 3, 4]
    logits = -20.0 * torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(d[kept], dim=1).T
    torch.testing.assert_close(out.loss, torch.logsumexp(logits[0], 0) - logits[0, 0], rtol=1e-12, atol=1e-12)
    assert torch.all(out.grad_docs[1:3] == 0)
    assert torch.all(out.grad_docs[kept].abs().sum(dim=1) > 0)


def test_options_take_any_finite_non_zero_scale():
    assert ContrastiveOptions(scale=-0.01).scale == -0.01
    for bad in (0, 0.0, -0.0, float("nan"), float("-inf")):
        with pytest.raises(ValueError, match="scale must be a finite non-zero number"):
            ContrastiveOptions(scale=bad)


# ---------------------------------------------------------------------------------------------------------------
# The CUDA epilogue's maths (csrc/cuda/contrastive_epilogue_kernel.cuh) through its host emulation
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def emulated_cuda_epilogue(tmp_path_factory):
    module = load_host_emulation("contrastive/cuda_host_emulation.cpp", tmp_path_factory.mktemp("cuda_host_emulation"))

    def epilogue(blocks, guides, doc_ids, row0, layout, options, compute_grad):
        arguments = contrastive_epilogue._compiled_arguments(blocks, guides, doc_ids, row0, layout, options,
                                                             compute_grad)
        module.set_threads(64)
        return module.contrastive_epilogue_cuda(*arguments, 0)

    return epilogue


@pytest.mark.parametrize(("guided", "options"), [
    (False, dict(scale=-20.0, directions=ALL, hardness_mode="hard_negatives", hardness_strength=2.0)),
    (False, dict(scale=-5.0, directions=(QD, DQ), partition_mode="per_direction", hardness_mode="all_negatives",
                 hardness_strength=1.0, offset=3)),
    (True, dict(scale=-20.0, directions=(QD, QQ, DD), margin=0.1, margin_strategy="relative")),
], ids=["hard_negatives", "per_direction", "guided"])
def test_cuda_epilogue_host_emulation(emulated_cuda_epilogue, guided, options):
    options = ContrastiveOptions(**options)
    gathered = options.offset > 0
    data = _case(3, 2, 9, 13 if gathered else 9, 2, options, guided=guided, ids=True, gathered=gathered, seed=4,
                 device="cpu")
    for dtype in (torch.float32, torch.float64):
        _compare(*data[:3], 2, data[3], options, dtype, True, True, epilogue=emulated_cuda_epilogue)
