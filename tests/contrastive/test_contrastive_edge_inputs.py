"""Inputs that used to give a silent wrong answer in the contrastive and Matryoshka ops (issue 17, items 3 and 5),
and the one rule for numeric options (no bools).

- Huge rows under cosine (1e19): cosine is scale-invariant, so the loss and the gradient direction must be those of
  the same rows at scale 1 on every backend. The torch and triton backends used to square the rows in float32
  (inf norms: loss log N), and the Matryoshka op's raw prefix products overflowed (NaN, inf).
- ``all_queries`` that does not hold ``queries`` at ``offset`` is still accepted: they are separate inputs with
  separate gradients (gradcheck perturbs one at a time), as the op's docstring says.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache import contrastive_loss_and_grad
from fastcache.ops.matryoshka import matryoshka_contrastive_loss_and_grad
from fastcache.reference import contrastive_loss_reference, matryoshka_contrastive_loss_reference

BACKENDS = ["cpu", "torch", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


def runnable(backend: str) -> None:
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off")


def batch():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(4, 8, generator=gen), torch.randn(8, 8, generator=gen)


@pytest.mark.parametrize("matryoshka", [False, True], ids=["contrastive", "matryoshka"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_rows_under_cosine(backend, matryoshka):
    runnable(backend)
    q, d = batch()
    huge = 1e19
    if matryoshka:
        truth = matryoshka_contrastive_loss_reference(q.double() * huge, d.double() * huge, dims=[8, 4])
        out = matryoshka_contrastive_loss_and_grad(q * huge, d * huge, dims=[8, 4], backend=backend)
        small = matryoshka_contrastive_loss_and_grad(q, d, dims=[8, 4], backend=backend)
    else:
        truth = contrastive_loss_reference(q.double() * huge, d.double() * huge)
        out = contrastive_loss_and_grad(q * huge, d * huge, backend=backend)
        small = contrastive_loss_and_grad(q, d, backend=backend)
    assert abs(float(out.loss) - float(truth)) <= 1e-5 * float(truth)
    # d(loss)/d(c·x) = d(loss)/dx / c: the same gradients, 1e19 times smaller, against their own scale
    for big, ref in ((out.grad_queries, small.grad_queries), (out.grad_docs, small.grad_docs)):
        assert float((big.double() * huge - ref.double()).abs().max()) <= 1e-5 * float(ref.abs().max())


@pytest.mark.parametrize("option", ["scale", "hardness_strength", "margin", "offset"])
def test_bools_are_not_numbers(option):
    """One rule for every numeric option: True is rejected, as offset=True always was."""
    q, d = batch()
    with pytest.raises(ValueError, match=option):
        contrastive_loss_and_grad(q, d, **{option: True})


@pytest.mark.parametrize("backend", BACKENDS)
def test_matryoshka_one_dim_has_no_gradient(backend):
    """At one dim, cos = sign(x_0)·sign(y_0) is piecewise constant: its gradient is exactly 0 (issue 17, item 4: the
    kernels' radial subtraction used to leave ~1e-6 to 4e-4 of rounding). With other dims it adds only its loss."""
    runnable(backend)
    q, d = batch()
    alone = matryoshka_contrastive_loss_and_grad(q, d, dims=[1], backend=backend)
    assert float(alone.grad_queries.abs().max()) == 0.0 and float(alone.grad_docs.abs().max()) == 0.0
    assert abs(float(alone.loss) - float(matryoshka_contrastive_loss_reference(q.double(), d.double(), dims=[1]))) \
        <= 1e-6 * float(alone.loss)
    qq, dd = q.double().requires_grad_(), d.double().requires_grad_()
    truth = matryoshka_contrastive_loss_reference(qq, dd, dims=[8, 4, 1], weights=[1.0, 2.0, 3.0])
    truth.backward()
    out = matryoshka_contrastive_loss_and_grad(q, d, dims=[8, 4, 1], weights=[1.0, 2.0, 3.0], backend=backend)
    assert abs(float(out.loss) - float(truth)) <= 1e-5 * float(truth)
    for ours, exact in ((out.grad_queries, qq.grad), (out.grad_docs, dd.grad)):
        assert float((ours.double() - exact).abs().max()) <= 1e-5 * float(exact.abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_matryoshka_one_dim_at_a_zero_first_coordinate_is_the_reference(backend):
    """Where a row's first coordinate is 0 the one-dim cosine is not piecewise constant: F.normalize (the
    reference) makes it x_0 / 1e-12, whose gradient is g / 1e-12; the op gives that too, in float64."""
    runnable(backend)
    q, d = (x.double() for x in batch())
    q[1, 0] = 0.0
    qq, dd = q.clone().requires_grad_(), d.clone().requires_grad_()
    truth = matryoshka_contrastive_loss_reference(qq, dd, dims=[1])
    truth.backward()
    out = matryoshka_contrastive_loss_and_grad(q, d, dims=[1], backend=backend)
    assert float(qq.grad[1, 0].abs()) > 1e6  # the g / 1e-12 that the op must reproduce
    scale = float(qq.grad.abs().max())  # elsewhere the exact gradient is 0 (float64 rounding of that size)
    for ours, exact in ((out.grad_queries, qq.grad), (out.grad_docs, dd.grad)):
        assert float((ours - exact).abs().max()) <= 1e-9 * scale
