"""dL/ds as a 16-bit GEMM operand keeps the negatives' gradients (issue 16, item 3).

The slab's gradient GEMMs (bf16/fp16 CUDA inputs) and the tiled kernels' products take dL/ds in the embeddings'
dtype. Its entries are coef·softmax: ~scale/(B·N) for a typical negative (2e-9 at B=65536, N=131072, scale 20),
below fp16's smallest subnormal (6e-8), so that every such negative's gradient used to become exactly 0. Now dL/ds
is multiplied by a power of two (``operand_grad_scale``) before the cast and the fp32 sums are divided by it.

The same underflow at a shape the CPU runs quickly: hard negatives orthogonal to every query (cosine 0 against
the positives' 1, at scale 20) have softmax entries e^-20 ≈ 2e-9, and coef = scale/B = 2.5 at B = 8: dL/ds ≈ 5e-9,
again below 6e-8. Their gradients are compared row by row, each against its own norm, with a float64 truth on the
same fp16-rounded inputs. A control with the scale forced to 1 (the old code) shows that the test can fail: the
same rows' gradients are then exactly 0.

Paths: the slab with the GEMM emulation that the CPU tests use for the CUDA low-precision GEMMs
(``emulate_low_precision_gemms``), and the Triton tiled kernels under the interpreter; the contrastive op and the
Matryoshka op.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import fastcache.ops.contrastive.slab as contrastive_module
import fastcache.ops.matryoshka.slab as matryoshka_module
from fastcache import contrastive_loss, contrastive_loss_and_grad
from fastcache.ops.matryoshka import matryoshka_contrastive_loss
from fastcache.reference import contrastive_loss_reference, matryoshka_contrastive_loss_reference
from helpers import emulate_low_precision_gemms

# the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
B, D = 8, 16
DIMS = [16, 8]
LOSS_SCALE = 2.0**16  # GradScaler's initial scale


def orthogonal_negatives(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and positives on dims 0-3 and 8-11 (positive i = query i + a little noise), one column of hard
    negatives on dims 4-7 and 12-15: cosine 0 to every query, in every prefix of DIMS too. fp16-rounded."""
    gen = torch.Generator().manual_seed(16)
    query_dims = (torch.arange(D) // 4) % 2 == 0
    queries = torch.randn(B, D, generator=gen) * query_dims
    positives = queries + 0.05 * torch.randn(B, D, generator=gen) * query_dims
    negatives = torch.randn(B, D, generator=gen) * ~query_dims
    return queries.to(dtype), torch.cat([positives, negatives]).to(dtype)


def negatives_error(grad_docs: torch.Tensor, truth: torch.Tensor) -> float:
    """The largest relative error of a hard negative's gradient row, against that row's own norm."""
    ours, exact = grad_docs[B:].double(), truth[B:]
    assert bool((exact.norm(dim=1) > 0).all()), "the truth must give every hard negative a gradient"
    return float(((ours - exact).norm(dim=1) / exact.norm(dim=1)).max())


def truth(queries, docs, matryoshka: bool) -> torch.Tensor:
    q, d = queries.double().requires_grad_(), docs.double().requires_grad_()
    loss = matryoshka_contrastive_loss_reference(q, d, dims=DIMS) if matryoshka else contrastive_loss_reference(q, d)
    loss.backward()
    return d.grad


def run(queries, docs, strategy: str, matryoshka: bool) -> torch.Tensor:
    """dL/ddocs through autograd, with the loss scaled by LOSS_SCALE as AMP's GradScaler does (and divided
    back in float64): fp16 gradients this small exist only under a loss scale."""
    settings = dict(backend="torch", strategy="slab") if strategy == "slab" else dict(backend="triton",
                                                                                       strategy="tiled")
    queries, docs = queries.clone().requires_grad_(), docs.clone().requires_grad_()
    if matryoshka:
        loss = matryoshka_contrastive_loss(queries, docs, dims=DIMS, **settings)
    else:
        loss = contrastive_loss(queries, docs, **settings)
    (loss * LOSS_SCALE).backward()
    return docs.grad.double() / LOSS_SCALE


def setup_path(monkeypatch, strategy: str, matryoshka: bool, dtype: torch.dtype) -> None:
    if strategy == "slab":
        low = emulate_low_precision_gemms(monkeypatch, matryoshka_module if matryoshka else contrastive_module, dtype)
        assert not low  # nothing ran yet
    elif os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)")


def force_unscaled(monkeypatch) -> None:
    """The old code: dL/ds cast to the operand dtype as it is."""
    monkeypatch.setattr(contrastive_module, "operand_grad_scale", lambda bound: 1.0)
    monkeypatch.setattr(matryoshka_module, "operand_grad_scale", lambda bound: 1.0)
    try:
        import fastcache.ops.contrastive.tiled as triton_contrastive
    except ImportError:
        return
    monkeypatch.setattr(triton_contrastive, "operand_grad_scale", lambda bound: 1.0)


@pytest.mark.parametrize("matryoshka", [False, True], ids=["contrastive", "matryoshka"])
@pytest.mark.parametrize("strategy", ["slab", "tiled"])
def test_fp16_negatives_keep_their_gradients(monkeypatch, strategy, matryoshka):
    queries, docs = orthogonal_negatives(torch.float16)
    setup_path(monkeypatch, strategy, matryoshka, torch.float16)
    exact = truth(queries, docs, matryoshka)
    assert float(exact[B:].abs().max()) < 1e-6  # the regime: entries far below fp16's normal range
    # fp16's rounding of the operands and of the results (subnormal even under the loss scale: ~4e-5): ~1%; the
    # old code's error is 100% (the control below)
    assert negatives_error(run(queries, docs, strategy, matryoshka), exact) < 3e-2


@pytest.mark.parametrize("matryoshka", [False, True], ids=["contrastive", "matryoshka"])
@pytest.mark.parametrize("strategy", ["slab", "tiled"])
def test_unscaled_fp16_operand_loses_the_negatives(monkeypatch, strategy, matryoshka):
    """The control: with the scale forced to 1 the same negatives' gradients are exactly 0 (what the test above
    would see on the old code)."""
    queries, docs = orthogonal_negatives(torch.float16)
    setup_path(monkeypatch, strategy, matryoshka, torch.float16)
    force_unscaled(monkeypatch)
    grad_docs = run(queries, docs, strategy, matryoshka)
    assert float(grad_docs[B:].abs().max()) == 0.0
    assert float(grad_docs[:B].abs().max()) > 0.0


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_fp16_saved_gradients_survive_a_loss_scale(monkeypatch, backend):
    """The op's autograd Function keeps the gradients of fp16 inputs in fp32 between forward and backward (cast
    after the incoming gradient is applied): the negatives' ~1e-9 gradients, exact in the fp32 maths of the CPU
    backends, reach the loss-scaled backward instead of being flushed to 0 when saved (the old code: 0)."""
    queries, docs = orthogonal_negatives(torch.float16)
    exact = truth(queries, docs, False)
    q, d = queries.clone().requires_grad_(), docs.clone().requires_grad_()
    (contrastive_loss(q, d, backend=backend) * LOSS_SCALE).backward()
    assert negatives_error(d.grad.double() / LOSS_SCALE, exact) < 3e-2
    fp32_grad = contrastive_loss_and_grad(queries.float(), docs.float(), backend=backend).grad_docs
    assert float(fp32_grad[B:].abs().max()) < 6e-8  # what the old code cast to fp16 before the loss scale: 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_changes_nothing_where_the_operand_had_the_range(monkeypatch, dtype):
    """bf16 has fp32's exponent range: the scaled operand gives the unscaled result to rounding (a power of two
    is exact), so the scale cannot hurt where it was not needed."""
    queries, docs = orthogonal_negatives(dtype)
    emulate_low_precision_gemms(monkeypatch, contrastive_module, dtype)
    scaled = contrastive_loss_and_grad(queries, docs, backend="torch", strategy="slab").grad_docs
    force_unscaled(monkeypatch)
    unscaled = contrastive_loss_and_grad(queries, docs, backend="torch", strategy="slab").grad_docs
    assert torch.equal(scaled, unscaled)


def test_operand_grad_scale_is_a_power_of_two_within_fp16():
    for bound in (20 / 65536, 2.5, 1e-30, 1e30, 50.0):
        p = contrastive_module.operand_grad_scale(bound)
        mantissa, _ = math.frexp(p)
        assert mantissa == 0.5, p
        assert p * bound <= contrastive_module.LOW_PRECISION_GRAD_MAX or p == 2.0**-126
        assert p * bound > contrastive_module.LOW_PRECISION_GRAD_MAX / 2 or p in (2.0**126, 2.0**-126)


def test_out_dtype_gemm_check_runs_the_real_call():
    """The overloads exist in this torch but reject CPU tensors: the real 2×2 call finds that (hasattr alone said
    yes), gives the reason once as a warning, and the slab runs its GEMMs in fp32."""
    contrastive_module.out_dtype_gemm_failure.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="run in float32 for torch.bfloat16 inputs on cpu"):
            reason = contrastive_module.out_dtype_gemm_failure(torch.device("cpu"), torch.bfloat16)
        assert reason is not None and "mm" in reason
        assert contrastive_module.out_dtype_gemm_failure(torch.device("cpu"), torch.bfloat16) == reason  # cached
    finally:
        contrastive_module.out_dtype_gemm_failure.cache_clear()
