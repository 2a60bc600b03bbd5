"""Property-based tests (hypothesis) of the Matryoshka op (fastcache.ops.matryoshka: the contrastive loss at several
embedding dims in one sweep over D) against its dense reference (the contrastive reference once per dim, on the
truncated embeddings), on every backend that runs on CPU: the C++ one, the PyTorch one, and Triton's two strategies
(slab: its epilogue on torch GEMMs; tiled: the multi-dim Triton kernels) through its interpreter (TRITON_INTERPRET=1,
small shapes, few examples).

Each example draws what tests/contrastive/test_properties_contrastive.py draws (B rows 1..200, D dims 1..1100, 1..3 candidate
columns, extra positives and an offset, docs as [N, D] or [C, P, D], directions, partition mode, hardness,
similarity, scale, gathered ``all_queries``, a guide with margin and strategy, duplicate ``doc_ids``, chunk size,
and one stress input of that file: ties, expanded, zero_rows, ids_mask_all, guide_mask_all, strided, large_logits),
plus the Matryoshka dims and weights:

    dims          1..6 distinct dims in 1..D (random, so multiples of nothing; often D itself), in any order
    weights       None (1 each) or one per dim among 1, 0.5, 2, 3 (an int), 0 and -0.5
    zero_prefix   a further stress: some rows' first d dims are zero, d one of the dims (cosine similarity:
                  that prefix has norm 0, F.normalize divides by eps there, the larger prefixes are fine)

Properties: in float64 both op paths equal the reference (rtol = atol = 1e-10 + 64 ulps per unit of the largest
|logit| at any dim, times Σ|w|; zero rows and zero prefixes, whose gradient is F.normalize's g / 1e-12, compared
at that amplified scale), equal each other bitwise, and leave their inputs (and the NaN-filled memory around
strided ones) untouched; when every candidate but the positive is masked the loss and gradients are exactly 0.
In float32, bfloat16 and float16 the loss and gradients are finite and within the bound of the float64 truth on
the same (cast) inputs that tests/contrastive/test_properties_contrastive.py documents for one dim, summed over the dims with
their |weights|, its e scaled by log2 of the number of rows (``_bounds``, ``_summation_ulps``); under cosine a
gradient's scale includes its terms before F.normalize's projection (a one-dim prefix's gradient is exactly 0,
made of cancelling terms); with a guide, plus twice the error of the reference run in the same dtype (near a tie,
the guide's mask decisions differ between precisions).

Budget: the hypothesis profile (tests/conftest.py) — "ci" (default: 25 derandomised examples per test, the same on
every run; Triton's slab and tiled strategies a fifth of that, at least 5) or "thorough" (500 random ones):
``FASTCACHE_HYPOTHESIS_PROFILE=thorough pytest tests/matryoshka/test_properties_matryoshka.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from fastcache.ops.contrastive.normalize import NORMALIZE_EPS
from helpers import (
    DIFFERENTIABLE,
    FACTOR,
    FLOAT64_TOL,
    MATRYOSHKA_OP_PATHS,
    assert_matches,
    matryoshka_reference_loss_and_grads,
    max_error,
    reference_loss_and_grads,
)
from contrastive_cases import (
    LOW_PRECISION,
    LOW_PRECISION_STRESSES,
    OPERAND_ULPS,
    RUNNERS,
    STRESSES,
    SUBNORMAL,
    TRITON_EXAMPLES,
    TRITON_RUNNERS,
    _build,
    _buffers,
    _gradient_unit,
    _runner_id,
    contrastive_cases,
    needs_backend,
    operand_eps,
)

# the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
QD, DD = "query_to_doc", "doc_to_doc"
EMBEDDINGS = ("queries", "docs", "all_queries")
MATRYOSHKA_STRESSES = STRESSES + ("zero_prefix",)
WEIGHTS = (1.0, 0.5, 2.0, 3, 0.0, -0.5)


@st.composite
def matryoshka_cases(draw, runner: tuple[str, str | None], stresses=MATRYOSHKA_STRESSES):
    """(contrastive case of tests/contrastive/test_properties_contrastive.py with dims and weights in its options, the
    zero-prefix length or None)."""
    shape, options, stress, ids = draw(contrastive_cases(runner, stresses))
    dim = shape["dim"]
    count = draw(st.integers(1, min(6, dim)))
    dims = draw(st.lists(st.integers(1, dim), min_size=count, max_size=count, unique=True))
    if dim not in dims and draw(st.booleans()):  # often the full width is one of the dims, as in training
        dims[0] = dim
    weights = draw(st.one_of(st.none(), st.lists(st.sampled_from(WEIGHTS), min_size=count, max_size=count)))
    options = dict(options, dims=dims, weights=weights)
    prefix = None
    if stress == "zero_prefix":
        options["similarity"] = "cos"
        prefix = draw(st.sampled_from(sorted(dims)))
    return (shape, options, stress, ids), prefix


def _build_matryoshka(case, prefix: int | None, dtype=torch.float64):
    """The batch of the contrastive case (stress applied, cast to ``dtype``), with the zero-prefix stress."""
    batch, options = _build(case, dtype)
    if prefix is not None:
        gen = torch.Generator().manual_seed(case[0]["seed"] + 1)
        for k in EMBEDDINGS:
            if k in batch:
                flat = batch[k].view(-1, batch[k].size(-1))
                flat[torch.rand(flat.size(0), generator=gen) < 0.3, :prefix] = 0
    return batch, options


def _truncated(batch: dict, dim: int) -> dict:
    return {k: v[..., :dim] if k in EMBEDDINGS else v for k, v in batch.items()}


def _max_logits(batch: dict, options: dict) -> dict[int, float]:
    """Per dim d, (scale + hardness_strength) · the largest |similarity| between two embeddings truncated to d:
    the Gram matrix of every embedding row accumulated over the dims' segments, from the smallest dim up."""
    factor = options["scale"] + options["hardness_strength"]
    dims = sorted(options["dims"])
    if options["similarity"] == "cos":
        return {d: factor for d in dims}
    rows = torch.cat([batch[k].reshape(-1, batch[k].size(-1)).double() for k in EMBEDDINGS if k in batch])
    gram = torch.zeros(rows.size(0), rows.size(0), dtype=torch.float64)
    result = {}
    for lo, hi in zip([0] + dims[:-1], dims):
        gram += rows[:, lo:hi] @ rows[:, lo:hi].T
        result[hi] = float(gram.abs().max()) * factor
    return result


def _weights(options: dict) -> dict[int, float]:
    weights = options["weights"] or [1.0] * len(options["dims"])
    return {d: abs(float(w)) for d, w in zip(options["dims"], weights)}


def _describe(case, prefix) -> None:
    shape, options, stress, ids = case
    note(f"stress={stress} zero prefix={prefix} doc_ids={ids} shape={shape} options={options}")


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
    case, prefix = data.draw(matryoshka_cases(runner))
    _describe(case, prefix)
    batch, options = _build_matryoshka(case, prefix)
    before = _buffers(batch)
    expected = matryoshka_reference_loss_and_grads(batch, **options)
    results = [path(batch, **options) for path in MATRYOSHKA_OP_PATHS.values()]
    weight = max(1.0, sum(_weights(options).values()))
    # float64 rounding grows with the logits' size (|logit| up to 1e6 under large_logits): 64 ulps per unit of L,
    # in units of the largest gradient or of one similarity's contribution to it (``_gradient_unit`` at each dim):
    # an entry whose terms cancel to ~0 keeps their rounding
    eps = torch.finfo(torch.float64).eps
    magnitude = max([1.0] + [float(g.abs().max()) for g in expected[1].values() if g is not None]
                    + [_gradient_unit(_truncated(batch, d), options) for d in options["dims"]])
    slack = 64 * eps * (1.0 + max(_max_logits(batch, options).values())) * weight * magnitude
    tol = {k: v + slack for k, v in FLOAT64_TOL.items()}
    if case[2] in ("zero_rows", "zero_prefix"):
        # F.normalize's gradient at a zero row (prefix) is g / 1e-12: the rounding of g is amplified 1e12 times, in
        # the reference as much as in the op (tests/contrastive/test_properties_contrastive.py)
        tol["atol"] += 64 * eps * (options["scale"] + options["hardness_strength"]) / NORMALIZE_EPS * weight
    for result in results:
        assert_matches(result, expected, **tol)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b) and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    if case[2] == "guide_mask_all" or case[2] == "ids_mask_all" and set(options["directions"]) <= {QD, DD}:
        # only the positive is left at every dim (the guide is never truncated; ids do not depend on the dim)
        assert loss_a == 0 and all((g == 0).all() for g in grads_a.values())
    for k, buffer in before.items():
        assert torch.equal(batch[k]._base.nan_to_num(-7.0), buffer), f"{k}'s buffer was written to"


def _gradient_magnitudes(batch: dict, options: dict, grads: dict) -> dict[str, float]:
    """Per input, the scale of the terms of its gradient (``grads``: the float64 truth's, one dim): its largest
    |entry|, at least ``_gradient_unit``; under cosine also the largest |dL/dx̂| / ‖x‖, the gradient w.r.t. the
    normalised embedding before F.normalize's backward projects it (the projection can cancel it, to exactly 0
    for a one-dim prefix, leaving rounding of this size)."""
    unit = _gradient_unit(batch, options)
    result = {k: max(unit, 0.0 if g is None else float(g.abs().max())) for k, g in grads.items()}
    if options["similarity"] == "cos":
        norms = {k: batch[k].norm(dim=-1, keepdim=True).clamp_min(NORMALIZE_EPS) for k in grads}
        normalized = dict(batch, **{k: batch[k] / norms[k] for k in grads})
        _, before_projection = reference_loss_and_grads(normalized, **dict(options, similarity="dot"))
        for k, g in before_projection.items():
            if g is not None:
                result[k] = max(result[k], float((g / norms[k]).abs().max()))
    return result


def _summation_ulps(batch: dict) -> float:
    """log2(2 + n), n the number of embedding rows: the rounding units a float32 sum of up to n terms (a row's
    log-sum-exp, the mean over rows, a gradient's sum over candidates) accumulates when summed in blocks. The
    one-dim bound was measured on small sums; rows of ±1 cosines of a one-dim prefix, 181 of them, exceeded it by
    1.2x (thorough-profile finding)."""
    return math.log2(2 + sum(batch[k].numel() // batch[k].size(-1) for k in EMBEDDINGS if k in batch))


def _bounds(runner, dtype, batch: dict, options: dict) -> tuple[float, dict[str, float]]:
    """(the loss bound, per input the gradient bound beyond the output rounding) of a low-precision run on
    ``batch`` (its float64 copy): the one-dim bounds of tests/contrastive/test_properties_contrastive.py at each dim d (its
    largest logit L_d, its truth's loss, its gradients' magnitude M_d from ``_gradient_magnitudes``), weighted by
    |w_d| and summed, with e = eps of the operands' precision times ``_summation_ulps``:

        |loss - truth| <= Σ_d |w_d| · OPERAND_ULPS · e · (1 + L_d) · max(1, |truth_d|)
        max |grad - truth| <= eps(dtype) · max |truth| + Σ_d |w_d| · OPERAND_ULPS · e · (1 + L_d) · M_d + SUBNORMAL
    """
    e = operand_eps(runner, dtype) * _summation_ulps(batch)
    single = {k: v for k, v in options.items() if k not in ("dims", "weights")}
    logits, weights = _max_logits(batch, options), _weights(options)
    loss_bound, grad_bounds = 0.0, {k: 0.0 for k in DIFFERENTIABLE if k in batch}
    for d in options["dims"]:
        truncated = _truncated(batch, d)
        loss, grads = reference_loss_and_grads(truncated, **single)
        factor = weights[d] * OPERAND_ULPS * e * (1 + logits[d])
        loss_bound += factor * max(1.0, abs(float(loss)))
        for k, magnitude in _gradient_magnitudes(truncated, single, grads).items():
            grad_bounds[k] += factor * magnitude
    return loss_bound, grad_bounds


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
    case, prefix = data.draw(matryoshka_cases(runner, LOW_PRECISION_STRESSES))
    _describe(case, prefix)
    batch, options = _build_matryoshka(case, prefix, dtype)
    exact = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    truth_loss, truth_grads = matryoshka_reference_loss_and_grads(exact, **options)
    loss_bound, grad_bounds = _bounds(runner, dtype, exact, options)
    if "guide_queries" in batch:
        # the guide's mask is a step function of its similarities: a candidate within rounding of the threshold is
        # masked or not depending on the precision, the reference's own in this dtype as much as the op's
        reference_loss, reference_grads = matryoshka_reference_loss_and_grads(batch, **options)
        loss_bound += FACTOR * abs(float(reference_loss) - float(truth_loss))
        for k in grad_bounds:
            if truth_grads[k] is not None:
                grad_bounds[k] += FACTOR * max_error(reference_grads[k], truth_grads[k])
    path = data.draw(st.sampled_from(list(MATRYOSHKA_OP_PATHS)))
    loss, grads = MATRYOSHKA_OP_PATHS[path](batch, **options)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss_error = abs(float(loss) - float(truth_loss))
    note(f"path={path}; loss error {loss_error:.3e} (bound {loss_bound:.3e})")
    assert loss_error <= loss_bound
    for k, grad in grads.items():
        assert grad.dtype == dtype and grad.shape == batch[k].shape, k
        assert torch.isfinite(grad).all(), k
        truth = truth_grads[k] if truth_grads[k] is not None else torch.zeros_like(grad, dtype=torch.float64)
        bound = torch.finfo(dtype).eps * float(truth.abs().max()) + grad_bounds[k] + SUBNORMAL[dtype]
        error = max_error(grad, truth)
        note(f"grad {k}: error {error:.3e} (bound {bound:.3e})")
        assert error <= bound, k
