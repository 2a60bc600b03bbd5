"""Property-based tests (hypothesis) of fastcache.contrastive_loss / contrastive_loss_and_grad against the dense
reference, on every backend that can run on CPU (``fastcache.ops.contrastive.epilogue.available``): the C++
epilogue, the PyTorch one, and Triton's two strategies through its interpreter (TRITON_INTERPRET=1, small shapes).

Each example draws a shape (B rows 1..200, D dims 1..1100, 1..3 candidate columns, extra positives and an offset,
docs as [N, D] or [C, P, D]), every option (directions, partition mode, hardness, similarity, scale, gathered
``all_queries``, a guide with margin and strategy, duplicate ``doc_ids``, chunk size) and one stress input:

    ties          rows copied onto other rows (tied logits)
    expanded      queries / docs / all_queries as stride-0 expanded views of one row (every row identical)
    zero_rows     some rows are zero vectors (cosine: similarity 0, F.normalize's gradient)
    ids_mask_all  one doc id for every candidate: every candidate but the positive is masked
    guide_mask_all  a guide margin that masks every candidate but the positive
    strided       every tensor a non-contiguous view inside a NaN-filled buffer (which must stay untouched)
    large_logits  dot similarity of long vectors at scale 100 (logits of order 1e4..1e6, far past exp's range)

Properties: in float64 both op paths equal the reference (rtol = atol = 1e-10 + 64 ulps per unit of the largest
|logit|; zero rows under cosine, whose gradient is F.normalize's g / 1e-12, compared at that amplified scale) and
each other bitwise; in float32,
bfloat16 and float16 the loss and gradients are within the documented bound of the float64 truth on the same
(cast) inputs (``LOW_PRECISION_BOUND``), and finite.

Budget: the hypothesis profile (tests/conftest.py) — "ci" (default: a fixed, derandomised set of examples, the
same on every run) or "thorough" (many more, random): ``FASTCACHE_HYPOTHESIS_PROFILE=thorough pytest
tests/contrastive/test_properties_contrastive.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from contrastive_cases import (
    DD,
    LOW_PRECISION,
    LOW_PRECISION_STRESSES,
    OPERAND_ULPS,
    QD,
    RUNNERS,
    SUBNORMAL,
    TRITON_EXAMPLES,
    TRITON_RUNNERS,
    _buffers,
    _build,
    _describe,
    _gradient_unit,
    _max_logit,
    _runner_id,
    contrastive_cases,
    needs_backend,
    operand_eps,
)
from fastcache.ops.contrastive.normalize import NORMALIZE_EPS
from helpers import DIFFERENTIABLE, FLOAT64_TOL, OP_PATHS, assert_matches, max_error, reference_loss_and_grads

# the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")


@pytest.mark.parametrize("runner", RUNNERS, ids=_runner_id)
@given(data=st.data())
def test_float64_equals_reference(runner, data):
    """Both op paths equal the dense reference in float64 and each other bitwise; inputs are not modified."""
    check_float64_equals_reference(runner, data)


@pytest.mark.parametrize("runner", TRITON_RUNNERS, ids=_runner_id)
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_float64_equals_reference(runner, data):
    check_float64_equals_reference(runner, data)


def check_float64_equals_reference(runner, data):
    needs_backend(runner[0])
    case = data.draw(contrastive_cases(runner))
    _describe(case)
    batch, options = _build(case)
    before = _buffers(batch)
    expected = reference_loss_and_grads(batch, **options)
    results = [path(batch, **options) for path in OP_PATHS.values()]
    # float64 rounding grows with the logits' size (|logit| up to 1e6 under large_logits): 64 ulps per unit of L
    slack = 64 * torch.finfo(torch.float64).eps * (1.0 + _max_logit(batch, options))
    tol = {k: v + slack for k, v in FLOAT64_TOL.items()}
    if case[2] == "zero_rows":
        # F.normalize's gradient at a zero row is g / 1e-12: the rounding of g (exact value often 0) is amplified
        # 1e12 times, in the reference as much as in the op; of order (scale / B) / 1e-12 itself, it is compared
        # to 64 float64 ulps of that size
        tol["atol"] += 64 * torch.finfo(torch.float64).eps * (options["scale"] + options["hardness_strength"]) \
            / NORMALIZE_EPS
    for result in results:
        assert_matches(result, expected, **tol)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    if case[2] == "guide_mask_all" or case[2] == "ids_mask_all" and set(options["directions"]) <= {QD, DD}:
        # only the positive is left: in query_to_doc, and the guided (or id-masked doc_to_doc) blocks are empty
        assert loss_a == 0 and all((g == 0).all() for g in grads_a.values())
    for k, buffer in before.items():
        assert torch.equal(batch[k]._base.nan_to_num(-7.0), buffer), f"{k}'s buffer was written to"


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("runner", RUNNERS, ids=_runner_id)
@given(data=st.data())
def test_low_precision_within_bound_of_float64(runner, dtype, data):
    check_low_precision_within_bound(runner, dtype, data)


@pytest.mark.parametrize("runner", TRITON_RUNNERS, ids=_runner_id)
@settings(max_examples=TRITON_EXAMPLES)
@given(data=st.data())
def test_triton_low_precision_within_bound_of_float64(runner, data):
    check_low_precision_within_bound(runner, data.draw(st.sampled_from(LOW_PRECISION)), data)


def check_low_precision_within_bound(runner, dtype, data):
    needs_backend(runner[0])
    case = data.draw(contrastive_cases(runner, LOW_PRECISION_STRESSES))
    _describe(case)
    batch, options = _build(case, dtype)
    truth_loss, truth_grads = reference_loss_and_grads(
        {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}, **options)
    logit, unit = _max_logit(batch, options), _gradient_unit(batch, options)
    path = data.draw(st.sampled_from(list(OP_PATHS)))
    loss, grads = OP_PATHS[path](batch, **options)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss_error = abs(float(loss) - float(truth_loss))
    e = operand_eps(runner, dtype)
    loss_bound = OPERAND_ULPS * e * (1.0 + logit) * max(1.0, abs(float(truth_loss)))
    note(f"path={path} max logit {logit:.3g}; loss error {loss_error:.3e} (bound {loss_bound:.3e})")
    assert loss_error <= loss_bound
    for k in DIFFERENTIABLE:
        if k not in grads:
            continue
        assert grads[k].dtype == dtype and grads[k].shape == batch[k].shape, k
        truth = truth_grads[k] if truth_grads[k] is not None else torch.zeros_like(grads[k], dtype=torch.float64)
        info = torch.finfo(dtype)
        grad = grads[k]
        assert torch.isfinite(grad).all(), k
        magnitude = max(float(truth.abs().max()), unit)
        bound = (info.eps + OPERAND_ULPS * e * (1.0 + logit)) * magnitude + SUBNORMAL[dtype]
        error = max_error(grad, truth)
        note(f"grad {k}: error {error:.3e} (bound {bound:.3e}, magnitude {magnitude:.3e})")
        assert error <= bound, k
