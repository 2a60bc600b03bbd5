"""Published reference values of the ranking losses: the loss tests of allRank (https://github.com/allegro/allRank,
the reference implementation of the LambdaLoss framework, which sentence-transformers' LambdaLoss follows). Each
case restates the inputs and the expected value of one allRank test (the source file is cited per case) and checks
that fastcache's op, on every CPU backend, and fastcache.reference give it.

How allRank's conventions map onto ours:

* Padding: allRank marks a padded document by the label -1 (``PADDED_Y_VALUE``); here that is ``mask=False``
  (:func:`allrank_inputs` turns one into the other; the padded document's logit stays in the input and must be
  ignored).
* lambdaLoss: its default reduction is ``"sum"`` over the valid pairs of the batch, ours the mean over the same
  pairs. Each case states its pair count, counted by hand from the labels (ndcgLoss1 counts every pair of finite
  labels, both orders and the diagonal: 3 documents give 9; the other schemes the pairs with y_i > y_j), and compares
  count × ours with allRank's sum. Its defaults are ours (eps 1e-10, sigma 1, mu 10, k None); its
  ``weighing_scheme`` "ndcgLoss1_scheme", "ndcgLoss2PP_scheme" and "rankNet_scheme" are our weightings
  "ndcg_loss1", "ndcg_loss2pp" and "none"; ``reduction_log`` is the same argument. The tied logits (0.5, 0.5) of
  its cases carry equal labels, so its unstable sort and our tie-break by position give the same pairs.
* listMLE: documents sorted by label (our ``respect_input_order=False``), the mean over queries as ours. It adds eps
  inside the max-shifted sum, log(sum exp(s - max) + eps) + max, where we add it to the sum itself: a difference of
  about eps·|1 - e^max| = 1e-10 here. Its random shuffle (for ties in the labels) does not matter: no tie.
* listNet: the mean over queries of the cross-entropy between softmax(labels) and softmax(logits), as ours, except
  that it adds eps (1e-10) to softmax(logits) before the log: a relative difference below 1e-9 in the cases used.
* rankNet: ``BCEWithLogitsLoss`` over the score differences of the pairs with y_i > y_j, i.e. the mean over pairs
  of -ln sigmoid(s_i - s_j): our :func:`ranknet` with ``reduction_log="natural"``. allRank's tests compute their
  expected values with that closed form (``BCEWithLogitsLoss`` on the differences); here it is evaluated with
  :func:`math.log1p`, independently of both implementations.

The tolerance is pytest.approx's default (1e-6 relative): allRank computed its values in float32.

Not mapped, and why:

* tests/test_listnet.py ``test_listnet_stable_for_very_small_prediction`` (a logit of -1e30): its expected value is
  set by allRank's eps, which caps the log-probability of that document at log(1e-10) (≈ 6.19 in all); our ListNet
  is the exact cross-entropy, ≈ 2.7e29 there (finite: the logit is finite). A different convention, not a shared
  value.
* tests/losses/test_ranknet.py ``test_ranknet_two_pairs_weighted`` and ``..._weighted_pow``: pair weights
  |y_i - y_j| and |y_i² - y_j²| (rankNet_weightByGTDiff, _pow) are none of our LambdaLoss weightings.
* The tests of NDCG and MRR (metrics), NeuralNDCG, ApproxNDCG, the ordinal, pointwise and binary ListNet losses and
  the click models: fastcache has no such op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from fastcache import _backend
from fastcache.ops import ranking
from fastcache.reference import lambda_loss_reference, listnet_reference, plistmle_reference

BACKENDS = ["torch"] + (["cpu"] if _backend.EXTENSION is not None else [])
ALLRANK_PADDING = -1.0


@dataclass(frozen=True)
class Case:
    source: str  # the allRank test (file::function) that publishes the value
    op: str  # "lambda_loss", "ranknet", "listmle" or "listnet"
    logits: list[float]
    labels: list[float]  # allRank's y_true: -1 marks a padded document
    expected: float
    pairs: int = 1  # lambdaLoss: allRank sums over this many pairs, we average
    options: dict = field(default_factory=dict)


def bce_with_logits_positive(*differences: float) -> float:
    """allRank's rankNet expectation: BCEWithLogitsLoss(differences, ones) = mean of -ln sigmoid(d) = ln(1 + e^-d)."""
    return sum(math.log1p(math.exp(-d)) for d in differences) / len(differences)


def listnet_cross_entropy(logits: list[float], labels: list[float], eps: float) -> float:
    """allRank's listNet expectation (its tests compute it with scipy's softmax):
    -sum softmax(y) log(softmax(s) + eps)."""
    def softmax(x):
        top = max(x)
        e = [math.exp(v - top) for v in x]
        return [v / sum(e) for v in e]

    return -sum(p * math.log(q + eps) for p, q in zip(softmax(labels), softmax(logits)))


CASES = [
    # tests/test_lambdaloss.py: lambdaLoss(y_pred, y_true, weighing_scheme=..., reduction_log=...), reduction "sum";
    # each with and without a padded fourth document (logit 1.0, label -1)
    *[Case(f"tests/test_lambdaloss.py::{name}", "lambda_loss", logits, labels, expected, pairs,
           {"weighting": weighting, "reduction_log": log})
      for name, weighting, log, expected, pairs in [
          ("test_ndcgloss1_ignores_padded", "ndcg_loss1", "binary", 2.9272110462, 9),
          ("test_ndcgloss2_ignores_padded", "ndcg_loss2pp", "binary", 1.1244146823, 2),
          ("test_ranknet_ignores_padded", "none", "natural", 1.1962778568, 2)]
      for logits, labels in [([0.5, 0.3, 0.5], [0.5, 0.3, 0.5]), ([0.5, 0.3, 0.5, 1.0], [0.5, 0.3, 0.5, -1.0])]],
    # tests/losses/test_listmle.py: listMLE (sorted by label, mean over queries)
    Case("tests/losses/test_listmle.py::test_listmle_ignores_padded_value", "listmle", [0.5, 0.3, 0.5],
         [1.0, 0.0, -1.0], 0.5981389284133911, options={"respect_input_order": False}),
    # tests/test_listnet.py: listNet, expected = -sum softmax(y_true) log(softmax(y_pred) + eps) over real documents
    Case("tests/test_listnet.py::test_listnet_simple", "listnet", [0.5, 0.2], [1.0, 0.0],
         listnet_cross_entropy([0.5, 0.2], [1.0, 0.0], eps=0.0)),
    Case("tests/test_listnet.py::test_listnet_ignores_padded_value", "listnet", [0.5, 0.2, 0.5], [1.0, 0.0, -1.0],
         listnet_cross_entropy([0.5, 0.2], [1.0, 0.0], eps=1e-10)),
    # tests/losses/test_ranknet.py: rankNet = BCEWithLogitsLoss over the differences of the pairs with y_i > y_j
    Case("tests/losses/test_ranknet.py::test_ranknet_onepair", "ranknet", [0.5, 0.2], [1.0, 0.0],
         bce_with_logits_positive(0.5 - 0.2)),
    Case("tests/losses/test_ranknet.py::test_ranknet_onepair_minus", "ranknet", [0.2, 0.5], [1.0, 0.0],
         bce_with_logits_positive(0.2 - 0.5)),
    Case("tests/losses/test_ranknet.py::test_ranknet_two_pairs", "ranknet", [0.5, 0.2, 0.1], [1.0, 0.0, 0.0],
         bce_with_logits_positive(0.3, 0.4)),
    Case("tests/losses/test_ranknet.py::test_ranknet_pair_reversed", "ranknet", [0.2, 0.5], [0.0, 1.0],
         bce_with_logits_positive(0.3)),
    Case("tests/losses/test_ranknet.py::test_ranknet_pair_multirelevancy", "ranknet", [0.2, 0.5], [0.0, 2.0],
         bce_with_logits_positive(0.3)),
    Case("tests/losses/test_ranknet.py::test_ranknet_onepair_masked", "ranknet", [0.5, 0.2, 0.66],
         [1.0, 0.0, -1.0], bce_with_logits_positive(0.5 - 0.2)),
]


def allrank_inputs(case: Case):
    """One query: logits [1, n] float64 (requiring grad), labels with allRank's padding as NaN, and the mask."""
    labels = torch.tensor([case.labels], dtype=torch.float64)
    mask = labels != ALLRANK_PADDING
    logits = torch.tensor([case.logits], dtype=torch.float64, requires_grad=True)
    return logits, labels.masked_fill(~mask, float("nan")), mask


def reference_value(case: Case, logits, labels, mask) -> torch.Tensor:
    options = dict(case.options)
    if case.op == "ranknet":
        return lambda_loss_reference(logits, labels, mask, weighting="none", reduction_log="natural", **options)
    reference = {"lambda_loss": lambda_loss_reference, "listmle": plistmle_reference,
                 "listnet": listnet_reference}[case.op]
    return reference(logits, labels, mask, **options)


def op_value(case: Case, logits, labels, mask, backend: str) -> torch.Tensor:
    options = dict(case.options)
    if case.op == "ranknet":
        options["reduction_log"] = "natural"
    return getattr(ranking, case.op)(logits, labels, mask, backend=backend, **options)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.source.split('::')[1]}-n{len(c.logits)}")
def test_allrank_value(case, backend):
    logits, labels, mask = allrank_inputs(case)
    loss = op_value(case, logits, labels, mask, backend)
    assert loss.item() * case.pairs == pytest.approx(case.expected), case.source
    loss.backward()  # finite gradient, zero on allRank's padded document
    assert torch.isfinite(logits.grad).all() and (logits.grad[~mask] == 0).all()


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.source.split('::')[1]}-n{len(c.logits)}")
def test_allrank_value_of_the_reference(case):
    logits, labels, mask = allrank_inputs(case)
    assert reference_value(case, logits, labels, mask).item() * case.pairs == pytest.approx(case.expected), \
        case.source
