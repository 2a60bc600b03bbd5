"""The CUDA ranking kernels' maths without a GPU: csrc/cuda/ranking_kernel.cuh and its binding
(csrc/cuda/ranking_torch.cpp: sorting, maxDCG@k, lengths, argument checks) compiled for the host with CUDA's thread
names emulated (tests/ranking/ranking_host_emulation.cpp on tests/cuda_host_emulation.h: one std::thread per CUDA thread,
warp barriers for __shfl_down_sync, a lock for the shared-memory atomicAdd), run through the ops of
fastcache.ops.ranking with ``backend="cuda"`` against the dense references: every op and LambdaLoss scheme (k,
sigma, eps, both logs), ragged NaN-padded lists with -inf labels, lengths 1 to 70 (more ranks than warps, more
documents than lanes), all-padding rows, no pair, float32 and float64 (bfloat16 / float16 reach the kernels as
float32), several thread-block sizes (one warp, 8 warps) and blocks per LambdaLoss query, with and without the
gradient. The real
kernels on a GPU: tests/ranking/test_ranking_cuda.py."""

from __future__ import annotations

import types

import pytest
import torch

from fastcache import _backend
from fastcache.ops import ranking
from fastcache.reference import lambda_loss_reference
from helpers import load_host_emulation
from test_ranking_edge_cases import assert_close_to_truth, issue_lists
from test_ranking_op import OPS, assert_grad_close, make_lists, resolve, run_op, run_reference

CUDA_FUNCTIONS = ("lambda_loss_cuda", "plistmle_cuda", "listnet_cuda")
# (loss relative, gradient relative to its largest entry, gradient absolute: the rounding of terms up to 1): the
# kernels add pair terms with atomics in any order
TOL = {torch.float64: (1e-10, 1e-10, 1e-12), torch.float32: (2e-5, 2e-5, 2e-6)}


@pytest.fixture(scope="module")
def module(tmp_path_factory):
    return load_host_emulation("ranking/ranking_host_emulation.cpp", tmp_path_factory.mktemp("ranking_host_emulation"))


@pytest.fixture
def emulated(module, monkeypatch):
    """The ranking ops' "cuda" backend runs the emulated kernels on CPU tensors: fastcache._C's *_cuda functions
    are the emulated ones, the stream is 0 and "cuda" is runnable on the CPU. Returns set_threads(threads, splits):
    CUDA threads per thread block and thread blocks per LambdaLoss query."""
    extension = types.SimpleNamespace(**{name: getattr(module, name) for name in CUDA_FUNCTIONS})
    monkeypatch.setattr(_backend, "EXTENSION", extension)
    monkeypatch.setattr(ranking, "_stream", lambda t: 0)
    monkeypatch.setattr(ranking, "available", lambda device, function: {"torch": None, "cuda": None})
    return module.set_threads


def check(name: str, logits, y, mask, dtype=torch.float64):
    op, reference, options, reference_options = resolve(name, mask)
    loss, grad = run_op(op, logits.to(dtype), y, mask, backend="cuda", **options)
    want_loss, want_grad = run_reference(reference, logits.to(dtype), y, mask, **reference_options)
    assert loss.dtype == dtype and grad.dtype == dtype
    loss_tol, grad_tol, grad_atol = TOL[dtype]
    torch.testing.assert_close(loss.double(), want_loss, rtol=loss_tol, atol=0.0)  # a sum of non-negative terms
    assert_grad_close(grad[mask], want_grad[mask], grad_tol, grad_atol)
    assert (grad[~mask] == 0).all()  # padding: zero gradient, its NaN never read


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_every_op_and_scheme(emulated, name, dtype):
    """Ragged lists (row lengths from n down to 1), graded and continuous labels with a few -inf."""
    emulated(64, 1)
    for shape, labels in [((3, 7), "graded"), ((5, 37), "continuous"), ((2, 70), "graded")]:
        logits, y, mask = make_lists(*shape, labels=labels, seed=shape[1])
        check(name, logits, y, mask, dtype)


@pytest.mark.parametrize("threads,splits", [(32, 1), (32, 3), (256, 1), (256, 2)])
@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "lambda_ndcg_loss1", "lambda_k3_natural", "listmle_by_label",
                                  "listnet"])
def test_thread_block_sizes(emulated, name, threads, splits):
    """One warp (every rank p in one warp, lanes wrap around q) and 8 warps (more warps than ranks in short rows);
    LambdaLoss queries shared by 1 to 3 thread blocks (their parts added with atomics); PListMLE / ListNet: runs of
    several ranks per thread (45 documents, 32 threads) and threads without any."""
    emulated(threads, splits)
    logits, y, mask = make_lists(40 if threads == 32 else 3, 45, seed=7)
    y[-1, 45 // 2] = 1.0  # the last row's one document: a finite label (ListNet needs a target)
    check(name, logits, y, mask)


def edge_lists():
    """4 lists of 9 documents: row 1 all padding, row 2 one document (logit 0.7, label 1), rows 0 and 3 ragged."""
    logits, y, mask = make_lists(4, 9, seed=6)
    mask[1] = False
    mask[2] = False
    mask[2, 3] = True
    logits[2, 3], y[2, 3] = 0.7, 1.0
    return logits, y, mask


def check_edge_rows(check_op, logits, y, mask):
    """Every op on :func:`edge_lists` through ``check_op(name, logits, y, mask)``; LambdaLoss with all labels equal
    (no pair): loss 0 and a zero gradient."""
    for name in ("listmle", "plistmle_default", "listnet", "lambda_ndcg_loss2pp", "lambda_ndcg_loss1"):
        check_op(name, logits, y, mask)
    equal = torch.ones_like(y).masked_fill(~mask, float("nan"))
    loss, grad = run_op(ranking.lambda_loss, logits, equal, mask, backend="cuda")
    assert loss == 0 and (grad == 0).all()


def test_edge_rows(emulated):
    """All-padding rows, a list of length 1, all labels equal."""
    emulated(64, 2)
    check_edge_rows(check, *edge_lists())


def test_without_gradient(emulated):
    """No gradient asked for (compute_grad false): the same losses."""
    emulated(64, 1)
    logits, y, mask = make_lists(3, 20, seed=8)
    for name in ("lambda_lambdarank", "plistmle_custom_by_label", "listnet"):
        op, reference, options, reference_options = resolve(name, mask)
        with torch.no_grad():
            loss = op(logits, y, mask, backend="cuda", **options)
        torch.testing.assert_close(loss, reference(logits, y, mask, **reference_options), rtol=TOL[torch.float64][0],
                                   atol=0.0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_inputs(emulated, dtype):
    """bfloat16 / float16 logits reach the kernels as float32: the loss is within float32 rounding of the float64
    truth on the same numbers, the gradient comes back in the input dtype."""
    emulated(64, 1)
    logits, y, mask = make_lists(3, 30, seed=9, dtype=dtype)
    for name in ("lambda_ndcg_loss2pp", "listmle", "listnet"):
        op, reference, options, reference_options = resolve(name, mask)
        loss, grad = run_op(op, logits, y, mask, backend="cuda", **options)
        want_loss, want_grad = run_reference(reference, logits, y, mask, **reference_options)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert abs(loss.double() - want_loss) <= 1e-5 * max(1.0, abs(want_loss))
        assert (grad[mask].double() - want_grad[mask]).abs().max() <= 1e-2 * want_grad[mask].abs().max()


@pytest.mark.parametrize("weighting", list(ranking.WEIGHTINGS))
def test_large_labels(emulated, weighting):
    """Issue 17: the kernel computed 2^label in the logits' dtype (inf from 128 in float32, from 1024 in float64:
    NaN losses, and RankNet's weight 1 + 0·(inf - inf)). The binding now computes the gains in float64 relative to
    the row's largest label, RankNet none: the values of tests/ranking/test_ranking_edge_cases.py's CPU cases."""
    emulated(32, 2)
    for top, truth_top in ((130.0, 130.0), (1024.0, 200.0), (1e30, 200.0)):
        _, truth_labels = issue_lists(truth_top)
        for dtype, rel in ((torch.float64, 1e-11), (torch.float32, 2e-6)):
            logits, labels = issue_lists(top, dtype)
            loss, grad = run_op(ranking.lambda_loss, logits, labels, None, weighting=weighting, backend="cuda")
            want_loss, want_grad = run_reference(lambda_loss_reference, logits, truth_labels, None,
                                                 weighting=weighting)
            assert_close_to_truth(loss, grad, want_loss, want_grad, rel)


def test_binding_checks(module):
    """The binding names the argument and what it expected."""
    logits = torch.zeros(2, 5)
    mask = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="lambda_loss_cuda: lists of 1 to 4096 documents, got n = 4097"):
        module.lambda_loss_cuda(torch.zeros(1, 4097), torch.zeros(1, 4097), torch.ones(1, 4097, dtype=torch.bool),
                                4, 10.0, 0, 1.0, 1e-10, True, True, 0)
    with pytest.raises(RuntimeError, match="lambda_loss_cuda: weighting must be 0"):
        module.lambda_loss_cuda(logits, logits, mask, 5, 10.0, 0, 1.0, 1e-10, True, True, 0)
    with pytest.raises(RuntimeError, match="labels must be contiguous, of the logits' shape"):
        module.listnet_cuda(logits, logits.double(), mask, True, 0)
    with pytest.raises(RuntimeError, match="mask must be a contiguous bool tensor"):
        module.listnet_cuda(logits, logits, mask.float(), True, 0)
    with pytest.raises(RuntimeError, match="logits must be float32 or float64"):
        module.listnet_cuda(logits.half(), logits.half(), mask, True, 0)
    with pytest.raises(RuntimeError, match="position_weights must be contiguous, of the logits' shape"):
        module.plistmle_cuda(logits, logits, mask, torch.ones(5), True, 1e-10, True, 0)
