"""Property-based tests (hypothesis) of the ranking ops against the dense references: random list counts and
lengths, ragged NaN-padded lists, label kinds (graded, binary, continuous, with -inf irrelevant documents),
tied logits, logits shifted far from zero, every op and option set of tests/ranking/test_ranking_op.py, both CPU backends.
Budgets: the hypothesis profiles of tests/conftest.py (FASTCACHE_HYPOTHESIS_PROFILE=ci|thorough) per op option
set and backend: 25 derandomised examples each in CI, 500 random ones with thorough."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from test_ranking_op import BACKENDS, OPS, assert_grad_close, make_lists, resolve, run_op, run_reference


@st.composite
def ranking_cases(draw):
    Q = draw(st.integers(1, 8))
    n = draw(st.integers(1, 48))
    logits, labels, mask = make_lists(Q, n, seed=draw(st.integers(0, 2**16)),
                                      labels=draw(st.sampled_from(["graded", "binary", "continuous"])),
                                      ragged=draw(st.booleans()), irrelevant=draw(st.booleans()))
    if draw(st.booleans()):  # ties: logits on a coarse grid
        logits = torch.round(logits * 2) / 2
    logits = logits + draw(st.sampled_from([0.0, -40.0, 300.0]))  # the softmax-based ops must shift by the max
    return logits, labels, mask


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(OPS))
@given(case=ranking_cases())
def test_float64_equals_reference(case, name, backend):
    logits, labels, mask = case
    op, reference, options, reference_options = resolve(name, mask)
    no_target = (mask.any(dim=1) & (labels.masked_fill(~mask, float("-inf")) == float("-inf")).all(dim=1)).any()
    if name == "listnet" and no_target:  # a row with only -inf labels has no target distribution: documented error
        with pytest.raises(ValueError, match="no target distribution"):
            run_op(op, logits, labels, mask, backend=backend, **options)
        return
    loss, grad = run_op(op, logits, labels, mask, backend=backend, **options)
    want_loss, want_grad = run_reference(reference, logits, labels, mask, **reference_options)
    assert torch.isfinite(loss) and torch.isfinite(grad[mask]).all()
    torch.testing.assert_close(loss, want_loss, rtol=1e-9, atol=1e-12)  # a sum of non-negative terms
    assert_grad_close(grad[mask], want_grad[mask], 1e-9)  # sums of terms: relative to the largest entry
    assert (grad[~mask] == 0).all()  # padding (NaN) is never read and gets no gradient
