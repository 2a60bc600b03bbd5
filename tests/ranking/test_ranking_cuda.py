"""The CUDA ranking kernels (csrc/cuda/ranking.cu through fastcache._C.*_cuda) on a GPU: marked ``cuda``, run by
bench/gpu_suite.sh.

* every op and LambdaLoss scheme (k, sigma, eps, both logs; RankNet; ListMLE / PListMLE in input and label order;
  ListNet) with ``backend="cuda"`` against the dense float64 references (fastcache.reference) on ragged
  NaN-padded lists with -inf labels, n from 1 to 4096 (the LambdaLoss kernel's longest list), float64 and float32;
* bfloat16 / float16 logits (the kernels run float32 on them; the gradient comes back in the input dtype);
* padding invariance, all-padding rows, no pair, large logits, no gradient;
* dispatch: auto picks cuda on CUDA tensors; LambdaLoss past 4096 documents goes to torch under auto and is a clear
  error with backend="cuda"; a non-default stream.

The same kernels' maths runs without a GPU in tests/ranking/test_ranking_host_emulation.py. Without a GPU (or without the
CUDA build of the extension) every test here skips with the reason; with ``FASTCACHE_REQUIRE_CUDA=1`` (set by
bench/gpu_suite.sh) they fail instead.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache import _backend
from fastcache.ops import ranking
from test_ranking_host_emulation import check_edge_rows, edge_lists
from test_ranking_op import OPS, assert_grad_close, make_lists, resolve, run_op, run_reference

pytestmark = pytest.mark.cuda

# float32: the kernels accumulate pair terms in float32 (__expf, shared-memory atomics in any order); the loss and
# the gradients are compared relative to the largest gradient of the batch
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (2e-5, 1e-4)}  # (loss relative, gradient relative to the max)
# one rounding of the returned gradient: relative to the largest, and float16's subnormal step 2^-24 (LambdaLoss
# gradients of long lists are mean over ~n² pairs: below float16's normal range)
HALF_TOL = {torch.bfloat16: (8e-3, 0.0), torch.float16: (1e-3, 2.0**-24)}
SHAPES = [(1, 1), (5, 33), (3, 1000), (2, 4096)]


@pytest.fixture(autouse=True)
def _needs_cuda_ranking():
    reason = None
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif _backend.EXTENSION is None or not hasattr(_backend.EXTENSION, "lambda_loss_cuda"):
        reason = ("fastcache._C lacks lambda_loss_cuda (not built, or built without the CUDA kernels: "
                  f"FASTCACHE_BUILD_CUDA=1 builds them); {_backend.EXTENSION_ERROR or ''}")
    if reason is not None:
        if os.environ.get("FASTCACHE_REQUIRE_CUDA") == "1":
            pytest.fail(f"FASTCACHE_REQUIRE_CUDA=1 but {reason}")
        pytest.skip(reason)


def cuda_lists(Q: int, n: int, *, dtype=torch.float64, **kwargs):
    """tests/test_ranking_op.make_lists on the GPU; a row whose real labels are all -inf gets label 1 on its first
    real document (ListNet needs a target distribution)."""
    logits, y, mask = make_lists(Q, n, dtype=dtype, **kwargs)
    no_target = ~(mask & torch.isfinite(y)).any(dim=1)
    first = mask.to(torch.int8).argmax(dim=1)
    y[no_target, first[no_target]] = 1.0
    return logits.cuda(), y.cuda(), mask.cuda()


def assert_close_to_reference(name: str, logits, y, mask, tol):
    op, reference, options, reference_options = resolve(name, mask)
    loss, grad = run_op(op, logits, y, mask, backend="cuda", **options)
    want_loss, want_grad = run_reference(reference, logits, y, mask, **reference_options)
    assert grad.dtype == logits.dtype and torch.isfinite(loss) and torch.isfinite(grad[mask]).all()
    loss_tol, grad_tol, grad_atol = (*tol, 0.0)[:3]
    assert abs(loss.double() - want_loss) <= loss_tol * max(1.0, abs(want_loss.item())), (loss, want_loss)
    error = (grad[mask].double() - want_grad[mask]).abs().max()
    scale = want_grad[mask].abs().max().clamp(min=1e-30)
    assert error <= grad_tol * scale + grad_atol, (error, scale)
    assert (grad[~mask] == 0).all()  # padding: zero gradient, its NaN never read


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(OPS))
def test_matches_reference(name, dtype, shape):
    labels = "continuous" if shape[1] % 2 else "graded"
    logits, y, mask = cuda_lists(*shape, labels=labels, seed=shape[1], dtype=dtype)
    assert_close_to_reference(name, logits, y, mask, TOL[dtype])


@pytest.mark.parametrize("n", [45, 4096])
@pytest.mark.parametrize("dtype", list(HALF_TOL), ids=str)
@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "lambda_ndcg_loss1", "ranknet_k4", "plistmle_default",
                                  "listmle_by_label", "listnet"])
def test_half_precision(name, dtype, n):
    """Low-precision logits: the loss (float32) within float32 accumulation of the float64 truth on the same
    numbers, the gradient in the input dtype within one rounding of it (relative to the largest)."""
    logits, y, mask = cuda_lists(3, n, seed=1, dtype=dtype)
    assert_close_to_reference(name, logits, y, mask, (2e-5, *HALF_TOL[dtype]))


@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "lambda_ndcg_loss1", "plistmle_default", "listnet"])
def test_padding_invariance(name):
    """The same lists padded differently (wider, padding between documents, NaN or huge values) give the same
    loss and the same gradients on the real documents."""
    Q, n, wide = 4, 300, 517
    logits, y, mask = cuda_lists(Q, n, seed=3)
    op, _, options, _ = resolve(name, mask)
    loss, grad = run_op(op, logits, y, mask, backend="cuda", **options)
    generator = torch.Generator().manual_seed(0)
    spread = torch.stack([torch.randperm(wide, generator=generator)[:n].sort().values for _ in range(Q)]).cuda()
    for fill in (float("nan"), 1e30):
        logits2 = torch.full((Q, wide), fill, dtype=logits.dtype, device="cuda").scatter(1, spread, logits)
        y2 = torch.full((Q, wide), fill, dtype=y.dtype, device="cuda").scatter(1, spread, y)
        mask2 = torch.zeros(Q, wide, dtype=torch.bool, device="cuda").scatter(1, spread, mask)
        op2, _, options2, _ = resolve(name, mask2)
        loss2, grad2 = run_op(op2, logits2, y2, mask2, backend="cuda", **options2)
        torch.testing.assert_close(loss2, loss, rtol=1e-10, atol=1e-12)
        assert_grad_close(grad2.gather(1, spread)[mask], grad[mask], 1e-10)  # atomics: any order
        assert (grad2[~mask2] == 0).all()


def test_edge_rows():
    """All-padding rows, a list of length 1, all labels equal (LambdaLoss: no pair, loss 0 and zero gradient),
    logits past exp's float range (finite results)."""
    logits, y, mask = (t.cuda() for t in edge_lists())
    check_edge_rows(lambda name, *lists: assert_close_to_reference(name, *lists, TOL[torch.float64]), logits, y, mask)
    big = (logits.nan_to_num(0.0) * 100.0).float()
    for op in (ranking.lambda_loss, ranking.listmle, ranking.listnet):
        loss, grad = run_op(op, big, y, mask, backend="cuda")
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_without_gradient():
    logits, y, mask = cuda_lists(3, 200, seed=8)
    for name in ("lambda_lambdarank", "plistmle_custom_by_label", "listnet"):
        op, reference, options, reference_options = resolve(name, mask)
        with torch.no_grad():
            loss = op(logits, y, mask, backend="cuda", **options)
        torch.testing.assert_close(loss, reference(logits, y, mask, **reference_options), rtol=1e-9, atol=1e-12)


def test_dispatch_and_long_lists():
    """auto takes cuda on CUDA tensors; LambdaLoss past 4096 documents: torch under auto (the same value as the CPU
    kernel), an error naming the limit with backend="cuda"; ListMLE and ListNet have no length limit."""
    device = torch.device("cuda")
    for function in ("lambda_loss_cuda", "plistmle_cuda", "listnet_cuda"):
        assert ranking.available(device, function)["cuda"] is None
    assert _backend.resolve_backend(device, ranking.available(device, "listnet_cuda")) == "cuda"
    logits, y, mask = cuda_lists(2, 4097, seed=10, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="lists of up to 4096 documents, got 4097"):
        ranking.lambda_loss(logits, y, mask, backend="cuda")
    loss_auto, grad_auto = run_op(ranking.lambda_loss, logits, y, mask)
    loss_cpu, grad_cpu = run_op(ranking.lambda_loss, logits.cpu(), y.cpu(), mask.cpu())
    assert abs(loss_auto.item() - loss_cpu.item()) <= 1e-5 * abs(loss_cpu.item())
    assert (grad_auto.cpu() - grad_cpu).abs().max() <= 1e-4 * grad_cpu.abs().max()
    logits, y, mask = cuda_lists(3, 6000, seed=11)
    for name in ("listmle", "listnet"):
        assert_close_to_reference(name, logits, y, mask, TOL[torch.float64])


def test_deterministic_algorithms_avoid_the_atomic_lambda_kernel():
    """Under torch.use_deterministic_algorithms(True) LambdaLoss leaves the CUDA kernel (float atomics): auto gives
    bitwise-identical repeats through the torch path, backend="cuda" names the reason; the other ops keep cuda."""
    logits, y, mask = cuda_lists(4, 300, seed=13, dtype=torch.float32)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.raises(RuntimeError, match="float atomics"):
            ranking.lambda_loss(logits, y, mask, backend="cuda")
        first, again = (run_op(ranking.lambda_loss, logits, y, mask) for _ in range(2))
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        want = run_op(ranking.lambda_loss, logits, y, mask, backend="torch")
        assert torch.equal(first[0], want[0]) and torch.equal(first[1], want[1])
        assert _backend.resolve_backend(logits.device, ranking.available(logits.device, "listnet_cuda")) == "cuda"
    finally:
        torch.use_deterministic_algorithms(previous)


def test_non_default_stream():
    """The kernels launch on the current stream: on a side stream the results equal the default stream's."""
    logits, y, mask = cuda_lists(8, 777, seed=12, dtype=torch.float32)
    expected = [run_op(op, logits, y, mask, backend="cuda") for op in (ranking.lambda_loss, ranking.listmle,
                                                                       ranking.listnet)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        got = [run_op(op, logits, y, mask, backend="cuda") for op in (ranking.lambda_loss, ranking.listmle,
                                                                      ranking.listnet)]
    torch.cuda.current_stream().wait_stream(stream)
    for (loss, grad), (want_loss, want_grad) in zip(got, expected):
        torch.testing.assert_close(loss, want_loss, rtol=1e-6, atol=1e-7)
        assert_grad_close(grad, want_grad, 1e-5, atol=1e-8)  # float32 atomics: any order
