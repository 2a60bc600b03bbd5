"""Edge cases of the ranking ops (fastcache.ops.ranking) found in issue 17, on every CPU backend: labels so large that
2^label overflows (RankNet depends only on the labels' order; LambdaLoss's gains are exact for any finite label),
second-order gradients and torch.func transforms (a clear error, never a gradient without a graph), meta tensors
(a clear error naming the argument). The emulated CUDA kernel's large-label case is in
tests/ranking/test_ranking_host_emulation.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastcache.ops import ranking
from fastcache.reference import lambda_loss_reference
from test_ranking_op import BACKENDS, WEIGHTINGS, make_lists, run_op, run_reference

ISSUE_LOGITS = [[0.3, -0.2, 1.1, 0.5, 0.0], [1.5, 0.7, -0.4, 0.2, 0.9]]


def issue_lists(top: float, dtype=torch.float64):
    """Two lists of 5 documents with labels [top, 1, 2, 0, 1] (the issue's case), a second row with -inf and a
    negative label as well."""
    logits = torch.tensor(ISSUE_LOGITS, dtype=dtype)
    labels = torch.tensor([[top, 1.0, 2.0, 0.0, 1.0], [top, float("-inf"), 2.0, -3.0, 1.0]], dtype=torch.float64)
    return logits, labels


def assert_close_to_truth(loss, grad, want_loss, want_grad, rel):
    """The loss relative to itself, the gradient relative to its largest entry (the entries are sums of pair
    terms: their rounding scales with the largest, not with each entry)."""
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert abs(loss.double() - want_loss) <= rel * abs(want_loss), (loss, want_loss)
    scale = want_grad.abs().max()
    assert (grad.double() - want_grad).abs().max() <= rel * scale, (grad, want_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("top", [127.0, 128.0, 1000.0, 1024.0, 1e30])
def test_ranknet_depends_only_on_the_labels_order(top, backend):
    """Issue 17: RankNet with a label of 1024 gave 15.65 on the cpu backend (a weight 1 + 0·(inf - inf)); labels
    >= 128 gave NaN on torch in float32. RankNet weighs every pair 1: the value equals that of any labels of the
    same order (here 5 in place of ``top``) in float64 and float32."""
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        logits, labels = issue_lists(top, dtype)
        loss, grad = run_op(ranking.ranknet, logits, labels, None, backend=backend)
        small = labels.clone()
        small[:, 0] = 5.0
        want_loss, want_grad = run_reference(lambda_loss_reference, logits, small, None, weighting="none")
        assert_close_to_truth(loss, grad, want_loss, want_grad, rel)


def test_ranknet_large_label_matches_sentence_transformers():
    """sentence-transformers' RankNetLoss class (float32, its weight 1 never multiplies the overflowing gains) on
    the issue's lists with the label 1024: our value."""
    st_losses = pytest.importorskip("sentence_transformers.cross_encoder.losses")
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from ranking_table import FixedScores, listwise_batch

    scores = torch.tensor([ISSUE_LOGITS[0], ISSUE_LOGITS[0]])
    labels = torch.tensor([[1024.0, 1.0, 2.0, 0.0, 1.0]] * 2)
    model = FixedScores(scores)
    inputs, label_list = listwise_batch(scores, labels, [5, 5])
    want = st_losses.RankNetLoss(model)(inputs, label_list)
    for backend in BACKENDS:
        got = ranking.ranknet(scores, labels, backend=backend)
        assert torch.isfinite(want) and abs(got.item() - want.item()) <= 1e-6 * want.item(), (backend, got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_lambda_gains_of_large_labels_are_exact(weighting, backend):
    """Issue 17: LambdaLoss with a label of 1024 gave a finite wrong 14.76 (cpu), NDCGLoss1 NaN, and the torch
    backend NaN from labels >= 128 in float32. The gains are computed relative to the row's largest label, so:
    a label the float64 reference can still take (1000, and 130 where float32 2^y overflows) gives its value; 1024
    and 1e30 (2^y is inf even in float64) give the exact value, which equals the float64 reference's at 200 to
    within 2^-190 (the other gains are 2^-198 of the top one and below)."""
    for top, truth_top in ((130.0, 130.0), (1000.0, 1000.0), (1024.0, 200.0), (1e30, 200.0)):
        _, truth_labels = issue_lists(truth_top)
        for dtype, rel in ((torch.float64, 1e-11), (torch.float32, 2e-6)):
            logits, labels = issue_lists(top, dtype)
            loss, grad = run_op(ranking.lambda_loss, logits, labels, None, weighting=weighting, backend=backend)
            want_loss, want_grad = run_reference(lambda_loss_reference, logits, truth_labels, None,
                                                 weighting=weighting)
            assert_close_to_truth(loss, grad, want_loss, want_grad, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_gains_with_k_and_ragged_lists(backend):
    """Large labels in ragged NaN-padded lists with -inf labels, with k: y + 900, where 2^y is still finite in
    float64, so the float64 reference is the truth."""
    logits, y, mask = make_lists(4, 12, seed=21)
    big = y + 900.0
    for options in ({"weighting": "ndcg_loss2pp", "k": 4}, {"weighting": "ndcg_loss1"}, {"weighting": "lambdarank"}):
        loss, grad = run_op(ranking.lambda_loss, logits, big, mask, backend=backend, **options)
        want_loss, want_grad = run_reference(lambda_loss_reference, logits, big, mask, **options)
        assert_close_to_truth(loss, grad[mask], want_loss, want_grad[mask], 1e-11)


OPS = {
    "lambda_loss": lambda s, y: ranking.lambda_loss(s, y),
    "ranknet": lambda s, y: ranking.ranknet(s, y),
    "plistmle": lambda s, y: ranking.plistmle(s, y, position_weights=ranking.plistmle_default_weights(
        torch.ones_like(y, dtype=torch.bool))),
    "listmle": lambda s, y: ranking.listmle(s, y),
    "listnet": lambda s, y: ranking.listnet(s, y),
}


CHECKED_BY = {"ranknet": "lambda_loss", "listmle": "plistmle"}  # the op whose checks a wrapper's call goes through


def issue_inputs():
    logits, labels = issue_lists(3.0)
    return logits.clone().requires_grad_(), labels


@pytest.mark.parametrize("name", list(OPS))
def test_double_backward_raises(name):
    """Issue 17: autograd.grad(loss, s, create_graph=True) returned a gradient without a graph, so a gradient
    penalty silently changed nothing. It raises at that call (and at backward(create_graph=True)); a first-order
    gradient still works after."""
    logits, labels = issue_inputs()
    entry = CHECKED_BY.get(name, name)
    with pytest.raises(RuntimeError, match=f"ranking.{entry} does not support double backward"):
        torch.autograd.grad(OPS[name](logits, labels), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward \\(create_graph=True"):
        OPS[name](logits, labels).backward(create_graph=True)
    logits.grad = None
    (grad,) = torch.autograd.grad(OPS[name](logits, labels), logits)
    assert torch.isfinite(grad).all() and not grad.requires_grad


@pytest.mark.parametrize("name", list(OPS))
def test_torch_func_transforms_raise(name):
    """Issue 17: torch.func.grad ended in PyTorch's "must override the setup_context staticmethod", vmap in a
    data-dependent control-flow error. Both now name the op and what to do instead."""
    logits, labels = issue_inputs()
    entry = CHECKED_BY.get(name, name)
    message = f"ranking.{entry} does not support torch.func transforms"
    with pytest.raises(RuntimeError, match=message):
        torch.func.grad(lambda s: OPS[name](s, labels))(logits.detach())
    with pytest.raises(RuntimeError, match=message):
        torch.vmap(lambda s: OPS[name](s, labels[:1]))(logits.detach()[:, None])


@pytest.mark.parametrize("name", list(OPS))
def test_meta_tensors_raise(name):
    """Issue 17: meta tensors ended in "Tensor.item() cannot be called on meta tensors"."""
    logits, labels = issue_lists(3.0)
    with pytest.raises(ValueError, match="logits must be on a real device \\(cpu or cuda\\), got meta"):
        OPS[name](logits.to("meta"), labels.to("meta"))
    with pytest.raises(ValueError, match="labels must be on a real device \\(cpu or cuda\\), got meta"):
        OPS[name](logits, labels.to("meta"))


# ---- LambdaLoss eps=0: no clamp, finite where sentence-transformers' log(0) is inf and its 0/0 NaN ----

def eps_zero_lists(dtype):
    """Row 0: pairs misordered by about 300 (sigmoid(-300) is 0 in float32: log 0 = -inf; 5e-131 in float64);
    row 1: no positive label (maxDCG 0) but pairs (0 > -1 > -2); row 2: ordinary."""
    logits = torch.tensor([[0.0, 300.0, 1.0, 0.5, -1.0], [0.3, -0.2, 0.1, 0.0, 2.0], [1.0, 0.2, -0.5, 0.7, 0.1]],
                          dtype=dtype)
    labels = torch.tensor([[3.0, 0.0, 1.0, 2.0, 0.0], [0.0, -1.0, 0.0, -2.0, 0.0], [2.0, 1.0, 0.0, 1.0, 0.0]],
                          dtype=torch.float64)
    return logits, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_lambda_eps_zero_is_the_limit_of_small_eps(weighting, backend):
    """eps=0 (accepted: "no clamp") is finite in float32 and float64 where sentence-transformers' maths gives inf
    (log of an underflowed sigmoid) or NaN (gains 0/0 of a list without a positive label), and equals the loss at
    an eps small enough to clamp nothing (the dense reference in float64 at eps=1e-300 is clamp-free here but for
    the gains of row 1, whose limit is 0)."""
    logits64, labels = eps_zero_lists(torch.float64)
    want_loss, want_grad = run_reference(lambda_loss_reference, logits64, labels, None, weighting=weighting,
                                         eps=1e-300)
    upstream = lambda_loss_reference(logits64.float(), labels.float(), weighting=weighting, eps=0.0)
    assert not torch.isfinite(upstream)  # sentence-transformers' maths (float32, as its loss): inf or NaN
    for dtype, rel in ((torch.float64, 1e-12), (torch.float32, 2e-6)):
        logits, _ = eps_zero_lists(dtype)
        loss, grad = run_op(ranking.lambda_loss, logits, labels, None, weighting=weighting, eps=0.0, backend=backend)
        assert_close_to_truth(loss, grad, want_loss, want_grad, rel)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lambda_eps_zero_as_reference_where_finite(backend):
    """Where sentence-transformers' maths is finite at eps=0 (no underflow, every list with a positive label), the
    op gives its value, every weighting, float64, with k and ragged lists."""
    logits, labels, mask = make_lists(4, 9, seed=5)
    labels = labels.clone()
    labels[:, 0] = 3.0  # a positive label in every list (maxDCG > 0)
    for weighting in WEIGHTINGS:
        for k in (None, 4):
            want_loss, want_grad = run_reference(lambda_loss_reference, logits, labels, mask, weighting=weighting,
                                                 k=k, eps=0.0)
            assert torch.isfinite(want_loss)
            loss, grad = run_op(ranking.lambda_loss, logits, labels, mask, weighting=weighting, k=k, eps=0.0,
                                backend=backend)
            assert_close_to_truth(loss, grad, want_loss, want_grad, 1e-12)



@pytest.fixture(scope="module")
def ranking_host_module(tmp_path_factory):
    """tests/ranking/ranking_host_emulation.cpp: the CUDA ranking kernels and their binding compiled for the host."""
    from helpers import load_host_emulation

    return load_host_emulation("ranking/ranking_host_emulation.cpp", tmp_path_factory.mktemp("ranking_host_emulation"))


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_lambda_eps_zero_emulated_cuda_kernel(ranking_host_module, monkeypatch, weighting):
    """The CUDA LambdaLoss (csrc/cuda/ranking_kernel.cuh and ranking_torch.cpp, with CUDA's thread names emulated;
    set up as tests/ranking/test_ranking_host_emulation.py does) at eps=0: the values of the CPU backends."""
    from fastcache import _backend

    monkeypatch.setattr(_backend, "EXTENSION", ranking_host_module)
    monkeypatch.setattr(ranking, "_stream", lambda t: 0)
    monkeypatch.setattr(ranking, "available", lambda device, function: {"torch": None, "cuda": None})
    ranking_host_module.set_threads(32, 2)
    logits64, labels = eps_zero_lists(torch.float64)
    want_loss, want_grad = run_reference(lambda_loss_reference, logits64, labels, None, weighting=weighting,
                                         eps=1e-300)
    for dtype, rel in ((torch.float64, 1e-11), (torch.float32, 2e-6)):
        logits, _ = eps_zero_lists(dtype)
        loss, grad = run_op(ranking.lambda_loss, logits, labels, None, weighting=weighting, eps=0.0, backend="cuda")
        assert_close_to_truth(loss, grad, want_loss, want_grad, rel)
