"""The C++ L2 row normalisation (csrc/cpu/normalize.cpp) that the contrastive op's cpu backend uses, against
torch.nn.functional.normalize and its autograd backward (in float64), on odd shapes, every input dtype, NaN-padded
strided views, zero and tiny rows; and its argument checks."""

import pytest
import torch
import torch.nn.functional as F

from fastcache import _backend
from fastcache.ops.contrastive.normalize import NORMALIZE_EPS, _normalized, _normalized_backward_
from helpers import nan_padded

pytestmark = pytest.mark.skipif(_backend.EXTENSION is None, reason="the compiled extension fastcache._C is missing")

SHAPES = [(1, 1), (1, 384), (3, 7), (37, 1000), (130, 33)]
COMPUTE = {torch.float32: torch.float32, torch.bfloat16: torch.float32, torch.float16: torch.float32,
           torch.float64: torch.float64}
TOL = {torch.float32: dict(rtol=2e-6, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-14)}


def rows_with_edge_cases(rows: int, dim: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Gaussian rows with scales from 1e-3 to 1e3; when there are enough rows, a zero row, a row whose norm is
    below eps and a row with one large entry."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    x *= 10.0 ** torch.empty(rows, 1, dtype=torch.float64).uniform_(-3, 3, generator=g)
    if rows >= 3:
        x[0] = 0.0
        x[1] *= 1e-15 / x[1].norm()
        x[2, 0] = 1e4
    return x.to(dtype)


def truth(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """F.normalize and its autograd gradient, in float64 on the same numbers."""
    leaf = x.to(torch.float64).requires_grad_()
    y = F.normalize(leaf, dim=1, eps=NORMALIZE_EPS)
    y.backward(grad.to(torch.float64))
    return y.detach(), leaf.grad


def assert_gradients_close(got, expected, grad, divisor):
    """Close relative to the size of each row's terms, |g| / divisor: the gradient g - x̂·(x̂ᵀg) cancels, and rows
    below eps get gradients of order 1/eps."""
    scale = grad.double().abs().amax(dim=1, keepdim=True) / divisor.double()
    torch.testing.assert_close(got.double() / scale, expected.double() / scale, **TOL[got.dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_forward_and_backward_match_f_normalize(shape, dtype):
    x = rows_with_edge_cases(*shape, dtype)
    compute = COMPUTE[dtype]
    grad = torch.randn(shape, dtype=compute, generator=torch.Generator().manual_seed(1))
    y, divisor = _normalized(x, compute, True, native=True)
    assert y.dtype == divisor.dtype == compute and y.is_contiguous() and divisor.shape == (shape[0], 1)
    expected_y, expected_grad = truth(x, grad)
    torch.testing.assert_close(y.double(), expected_y, **TOL[compute])
    torch.testing.assert_close(divisor.double(), x.double().norm(dim=1, keepdim=True).clamp_min(NORMALIZE_EPS),
                               **TOL[compute])
    assert_gradients_close(_normalized_backward_(grad.clone(), y, divisor, native=True), expected_grad, grad, divisor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_as_the_torch_form(dtype):
    """The cpu backend's normalisation and the torch backend's agree to rounding (the op's backends differ only
    in rounding)."""
    x = rows_with_edge_cases(67, 1000, dtype, seed=3)
    grad = torch.randn(67, 1000, dtype=dtype, generator=torch.Generator().manual_seed(4))
    native, torch_form = _normalized(x, dtype, True, native=True), _normalized(x, dtype, True)
    for a, b in zip(native, torch_form):
        torch.testing.assert_close(a, b, **TOL[dtype])
    assert_gradients_close(_normalized_backward_(grad.clone(), *native, native=True),
                           _normalized_backward_(grad.clone(), *torch_form), grad, native[1])


@pytest.mark.parametrize("layout", ["slice", "transposed", "every_other_row", "every_other_col"])
def test_strided_inputs_read_only_their_elements(layout):
    """Views inside NaN-filled buffers: no NaN leaks in from the padding."""
    x = rows_with_edge_cases(19, 45, torch.float32)
    y, divisor = _normalized(nan_padded(x, layout), torch.float32, True, native=True)
    assert torch.isfinite(y).all() and torch.isfinite(divisor).all()
    torch.testing.assert_close(y, _normalized(x, torch.float32, True, native=True)[0], rtol=0, atol=0)


def test_non_finite_rows_stay_in_their_row():
    """A NaN or inf entry gives NaN in its own row, as F.normalize does, and leaves the other rows alone."""
    x = rows_with_edge_cases(4, 9, torch.float32)
    x[1, 3], x[3, 0] = float("nan"), float("inf")
    y, _ = _normalized(x, torch.float32, True, native=True)
    expected = F.normalize(x, dim=1, eps=NORMALIZE_EPS)
    assert torch.equal(torch.isnan(y), torch.isnan(expected))
    torch.testing.assert_close(y[[0, 2]], expected[[0, 2]], **TOL[torch.float32])


def test_results_do_not_depend_on_the_thread_count():
    x = rows_with_edge_cases(2000, 100, torch.float32)
    grad = torch.randn(2000, 100, generator=torch.Generator().manual_seed(5))
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            y, divisor = _normalized(x, torch.float32, True, native=True)
            results.append((y, divisor, _normalized_backward_(grad.clone(), y, divisor, native=True)))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_bad_arguments_are_named():
    ext = _backend.EXTENSION
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="x must be 2-D"):
        ext.l2_normalize_cpu(torch.randn(3), torch.float32, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="dtype must be float32 or float64"):
        ext.l2_normalize_cpu(x, torch.float16, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="x must be a floating-point tensor"):
        ext.l2_normalize_cpu(torch.ones(3, 4, dtype=torch.int64), torch.float32, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        ext.l2_normalize_cpu(x, torch.float32, 0.0)
    y, divisor = ext.l2_normalize_cpu(x, torch.float32, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="normalized must be a contiguous"):
        ext.l2_normalize_backward_cpu_(torch.randn(3, 4), y.T.contiguous().T, divisor, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="divisor must be"):
        ext.l2_normalize_backward_cpu_(torch.randn(3, 4), y, divisor[:2], NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="grad must be float32 or float64"):
        ext.l2_normalize_backward_cpu_(torch.randn(3, 4).half(), y, divisor, NORMALIZE_EPS)
    with pytest.raises(RuntimeError, match="grad must be contiguous"):
        ext.l2_normalize_backward_cpu_(torch.randn(4, 3).T, y, divisor, NORMALIZE_EPS)
