"""The ranking ops (fastcache.ops.ranking) against the dense references (fastcache.reference): values and
gradients on ragged lists with NaN-filled padding, every option, both backends, float64 / float32 / bfloat16 /
float16, padding invariance, edge cases (no pair, length 1, all-padding rows, large logits, n = 4096) and every
bad-input error."""

from __future__ import annotations

import math

import pytest
import torch

from fastcache import _backend
from fastcache.ops import ranking
from fastcache.reference import lambda_loss_reference, listnet_reference, plistmle_reference

BACKENDS = ["torch"] + (["cpu"] if _backend.EXTENSION is not None else [])
WEIGHTINGS = list(ranking.WEIGHTINGS)


def make_lists(Q: int, n: int, *, seed: int = 0, labels: str = "graded", ragged: bool = True,
               irrelevant: bool = True, dtype=torch.float64):
    """Seeded padded lists: logits [Q, n] (distinct values), labels, mask; padding filled with NaN. Ragged: row q
    holds a random number of documents (row 0 all n, the last row 1 when Q > 2), not all at the front.
    ``irrelevant`` puts a few -inf labels on real documents."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(Q, n, generator=g, dtype=torch.float64) * 2
    if labels == "graded":
        y = torch.randint(0, 4, (Q, n), generator=g).to(torch.float64)
    elif labels == "binary":
        y = (torch.rand(Q, n, generator=g) < 0.3).to(torch.float64)
    else:
        y = torch.rand(Q, n, generator=g, dtype=torch.float64) * 3 - 0.5
    mask = torch.ones(Q, n, dtype=torch.bool)
    if ragged and n > 1:
        mask = torch.rand(Q, n, generator=g) < 0.75
        mask[0] = True
        if Q > 2:
            mask[-1] = False
            mask[-1, n // 2] = True
    if irrelevant:
        y[torch.rand(Q, n, generator=g) < 0.1] = float("-inf")
    logits = logits.masked_fill(~mask, float("nan")).to(dtype)
    y = y.masked_fill(~mask, float("nan"))
    return logits, y, mask


OPS = {  # name -> (op, reference, options)
    **{f"lambda_{w}": (ranking.lambda_loss, lambda_loss_reference, {"weighting": w}) for w in WEIGHTINGS},
    "lambda_k3_natural": (ranking.lambda_loss, lambda_loss_reference,
                          {"weighting": "ndcg_loss2pp", "k": 3, "reduction_log": "natural", "mu": 3.0}),
    "lambda_sigma_eps": (ranking.lambda_loss, lambda_loss_reference,
                         {"weighting": "ndcg_loss1", "k": 5, "sigma": 2.5, "eps": 1e-3}),
    "ranknet_k4": (ranking.ranknet, lambda_loss_reference, {"k": 4}),
    "listmle": (ranking.listmle, plistmle_reference, {}),
    "listmle_by_label": (ranking.listmle, plistmle_reference, {"respect_input_order": False}),
    "plistmle_default": (ranking.plistmle, plistmle_reference, {"position_weights": "default"}),
    "plistmle_custom_by_label": (ranking.plistmle, plistmle_reference,
                                 {"position_weights": "ramp", "respect_input_order": False, "eps": 1e-3}),
    "listnet": (ranking.listnet, listnet_reference, {}),
}


def resolve(name: str, mask: torch.Tensor):
    """(op, reference, op options, reference options) for one OPS entry and one mask."""
    op, reference, options = OPS[name]
    options = dict(options)
    if options.get("position_weights") == "default":
        options["position_weights"] = ranking.plistmle_default_weights(mask)
    elif options.get("position_weights") == "ramp":
        options["position_weights"] = 1.0 / torch.arange(1, mask.size(1) + 1, dtype=torch.float64)
    reference_options = dict(options)
    if name.startswith("ranknet"):
        reference_options["weighting"] = "none"
    return op, reference, options, reference_options


def run_op(op, logits, labels, mask, **options):
    x = logits.detach().clone().requires_grad_()
    loss = op(x, labels, mask, **options)
    loss.backward()
    return loss.detach(), x.grad


def assert_grad_close(grad, want, rel: float, atol: float = 1e-12):
    """Gradient entries are sums of pair (or rank) terms, rounded in whatever order a backend adds them: an entry
    whose terms cancel keeps the rounding of the terms, not its own size. So compare every entry relative to the
    largest entry of ``want`` (their common scale), never each to itself, plus ``atol``: the rounding of terms of
    size up to 1 where every entry cancels (ListMLE's -1 + e^(s - log(e^s + eps)) on a list of one)."""
    scale = want.double().abs().max()
    error = (grad.double() - want.double()).abs().max()
    assert error <= rel * scale + atol, (float(error), float(scale))


def run_reference(reference, logits, labels, mask, **options):
    x = logits.detach().to(torch.float64).requires_grad_()
    loss = reference(x, labels, mask, **options)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 33)])
def test_matches_reference_float64(name, backend, shape):
    for labels in ("graded", "continuous"):
        logits, y, mask = make_lists(*shape, labels=labels, seed=shape[1])
        op, reference, options, reference_options = resolve(name, mask)
        loss, grad = run_op(op, logits, y, mask, backend=backend, **options)
        want_loss, want_grad = run_reference(reference, logits, y, mask, **reference_options)
        assert loss.dtype == torch.float64 and grad.dtype == torch.float64
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)  # a sum of non-negative terms
        assert_grad_close(grad[mask], want_grad[mask], 1e-10)
        assert (grad[~mask] == 0).all()  # padding: zero gradient, NaN never read


LOW_PRECISION_TOL = {torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", list(LOW_PRECISION_TOL))
@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "lambda_ndcg_loss1", "ranknet_k4", "plistmle_default",
                                  "listmle_by_label", "listnet"])
def test_low_precision(name, dtype, backend):
    """Low-precision logits: the loss (float32) is within float32 rounding of the float64 truth on the same
    numbers; gradients come back in the input dtype, within one rounding of it (relative to the largest)."""
    logits, y, mask = make_lists(6, 45, seed=1, dtype=dtype)
    op, reference, options, reference_options = resolve(name, mask)
    loss, grad = run_op(op, logits, y, mask, backend=backend, **options)
    want_loss, want_grad = run_reference(reference, logits, y, mask, **reference_options)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert abs(loss.double() - want_loss) <= 2e-6 * max(1.0, abs(want_loss))
    scale = want_grad[mask].abs().max()
    error = (grad[mask].double() - want_grad[mask]).abs().max()
    assert error <= LOW_PRECISION_TOL[dtype] * scale, (error, scale)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "lambda_ndcg_loss1", "plistmle_default", "listnet"])
def test_padding_invariance(name, backend):
    """The same lists padded differently (wider, padding between documents, padding filled with NaN or huge
    values) give the same loss and the same gradients on the real documents."""
    logits, y, mask = make_lists(4, 9, seed=3)
    op, _, options, _ = resolve(name, mask)
    loss, grad = run_op(op, logits, y, mask, backend=backend, **options)
    wide = 14
    spread = torch.stack([torch.randperm(wide, generator=torch.Generator().manual_seed(q))[:9].sort().values
                          for q in range(4)])
    for fill in (float("nan"), 1e30):
        logits2 = torch.full((4, wide), fill, dtype=logits.dtype).scatter(1, spread, logits)
        y2 = torch.full((4, wide), fill, dtype=y.dtype).scatter(1, spread, y)
        mask2 = torch.zeros(4, wide, dtype=torch.bool).scatter(1, spread, mask)
        op2, _, options2, _ = resolve(name, mask2)
        loss2, grad2 = run_op(op2, logits2, y2, mask2, backend=backend, **options2)
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=1e-14)
        assert_grad_close(grad2.gather(1, spread)[mask], grad[mask], 1e-12)
        assert (grad2[~mask2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_cpu_float32_accuracy_on_long_lists(backend):
    """float32 LambdaLoss on a 300-long list (vectorised exp / log1p in the CPU kernel) against float64."""
    logits, y, mask = make_lists(3, 300, seed=4, labels="continuous", dtype=torch.float32)
    loss, grad = run_op(ranking.lambda_loss, logits, y, mask, backend=backend)
    want_loss, want_grad = run_reference(lambda_loss_reference, logits, y, mask)
    assert abs(loss.double() - want_loss) <= 1e-5 * abs(want_loss)
    assert (grad[mask].double() - want_grad[mask]).abs().max() <= 1e-5 * want_grad[mask].abs().max()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_lambda_without_pairs_is_zero(weighting, backend):
    """All labels equal (sentence-transformers: NaN), or every list of length 1: loss 0 and zero gradient. For
    NDCGLoss1 every pair of finite labels counts (both orders and the diagonal), so there the reference's finite
    loss and gradient."""
    logits, _, mask = make_lists(3, 6, seed=5)
    equal = torch.ones(3, 6, dtype=torch.float64)
    single = torch.zeros(3, 6, dtype=torch.bool)
    single[:, 2] = True
    single_logits = logits.nan_to_num(0.5).masked_fill(~single, float("nan"))
    for s, y, m in ((logits, equal, mask), (single_logits, equal.masked_fill(~single, float("nan")), single)):
        loss, grad = run_op(ranking.lambda_loss, s, y, m, weighting=weighting, backend=backend)
        want_loss, want_grad = run_reference(lambda_loss_reference, s, y, m, weighting=weighting)
        assert torch.isfinite(loss) and torch.isfinite(grad[m]).all()
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
        assert_grad_close(grad[m], want_grad[m], 1e-10)
        if weighting != "ndcg_loss1":
            assert loss == 0 and (grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_padding_rows_and_length_one(backend):
    """A query without documents contributes 0 (and counts in the ListMLE / ListNet mean over queries); a list of
    length 1 gives the reference's value."""
    logits, y, mask = make_lists(4, 5, seed=6)
    mask[1] = False
    mask[2] = False
    mask[2, 3] = True
    logits[2, 3], y[2, 3] = 0.7, 1.0
    for name in ("listmle", "plistmle_default", "listnet", "lambda_ndcg_loss2pp"):
        op, reference, options, reference_options = resolve(name, mask)
        loss, grad = run_op(op, logits, y, mask, backend=backend, **options)
        want_loss, want_grad = run_reference(reference, logits, y, mask, **reference_options)
        torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
        assert_grad_close(grad[mask], want_grad[mask], 1e-10)
        assert (grad[1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_logits_stay_finite(backend):
    """ListMLE / ListNet / LambdaLoss are shift-invariant (up to eps): logits + 1000 (upstream's exp overflows
    past ~88) give the values and gradients of the unshifted logits."""
    logits, y, mask = make_lists(3, 20, seed=7, irrelevant=False)
    for op in (ranking.listmle, ranking.listnet, ranking.lambda_loss):
        for dtype in (torch.float64, torch.float32):
            base = logits.to(dtype)
            loss, grad = run_op(op, base, y, mask, backend=backend)
            shifted_loss, shifted_grad = run_op(op, base + 1000.0, y, mask, backend=backend)
            assert torch.isfinite(shifted_loss) and torch.isfinite(shifted_grad[mask]).all()
            rtol = 1e-9 if dtype == torch.float64 else 2e-3  # float32 spacing at 1000 is 6e-5
            torch.testing.assert_close(shifted_loss, loss, rtol=rtol, atol=rtol)
            assert_grad_close(shifted_grad[mask], grad[mask], rtol)


@pytest.mark.parametrize("name", ["lambda_ndcg_loss2pp", "listmle", "listnet"])
def test_lists_of_4096(name):
    """n = 4096: the compiled kernel and the blocked PyTorch backend agree (float64), all finite."""
    if "cpu" not in BACKENDS:
        pytest.skip("the compiled extension is not built")
    logits, y, mask = make_lists(1, 4096, seed=8)
    op, _, options, _ = resolve(name, mask)
    loss, grad = run_op(op, logits, y, mask, backend="cpu", **options)
    want_loss, want_grad = run_op(op, logits, y, mask, backend="torch", **options)
    assert torch.isfinite(loss) and torch.isfinite(grad[mask]).all()
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert_grad_close(grad[mask], want_grad[mask], 1e-10)


def test_plistmle_default_weights_are_upstreams_without_overflow():
    """plistmle_default_weights equals sentence-transformers' normalised PListMLELambdaWeight where that is finite
    (upstream computes 2^n in float32), and stays finite and normalised for lists far longer than 127."""
    from sentence_transformers.cross_encoder.losses import PListMLELambdaWeight

    mask = torch.zeros(3, 40, dtype=torch.bool)
    mask[0, :40] = True
    mask[1, :7] = True
    mask[2, :1] = True
    upstream = PListMLELambdaWeight()(mask).double()
    upstream = upstream / upstream.sum(dim=1, keepdim=True)
    torch.testing.assert_close(ranking.plistmle_default_weights(mask), upstream, rtol=1e-6, atol=1e-12)  # fp32 2^n
    long = torch.ones(1, 3000, dtype=torch.bool)
    w = ranking.plistmle_default_weights(long)
    assert torch.isfinite(w).all() and math.isclose(float(w.sum()), 1.0, rel_tol=1e-12)
    assert torch.isnan(PListMLELambdaWeight()(long).float() / PListMLELambdaWeight()(long).float().sum()).any()


def test_no_grad_and_backend_choice():
    logits, y, mask = make_lists(3, 8, seed=9)
    with torch.no_grad():
        loss = ranking.lambda_loss(logits, y, mask)
    assert not loss.requires_grad
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run here"):
        ranking.listnet(logits, y, mask, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        ranking.listnet(logits, y, mask, backend="gpu")


BAD_INPUTS = [
    (lambda s, y, m: ranking.listnet(s[0], y, m), "logits must be a \\[Q, n\\] tensor"),
    (lambda s, y, m: ranking.listnet(s.long(), y, m), "logits must be a \\[Q, n\\] tensor"),
    (lambda s, y, m: ranking.listnet(s[:, :0], y[:, :0], m[:, :0]), "at least one query and one document"),
    (lambda s, y, m: ranking.listnet(s, y[:, :-1], m), "labels must be a tensor of the logits' shape"),
    (lambda s, y, m: ranking.listnet(s, [1.0], m), "labels must be a tensor of the logits' shape"),
    (lambda s, y, m: ranking.listnet(s, y, m.float()), "mask must be a bool tensor"),
    (lambda s, y, m: ranking.listnet(s, y, m[:, :-1]), "mask must be a bool tensor"),
    (lambda s, y, m: ranking.listnet(s.masked_fill(m, float("nan")), y, m), "logits must be finite where mask"),
    (lambda s, y, m: ranking.lambda_loss(s.masked_fill(m, float("inf")), y, m), "logits must be finite where mask"),
    (lambda s, y, m: ranking.lambda_loss(s, y.masked_fill(m, float("nan")), m), "labels must not be NaN or \\+inf"),
    (lambda s, y, m: ranking.listmle(s, y.masked_fill(m, float("inf")), m), "labels must not be NaN or \\+inf"),
    (lambda s, y, m: ranking.listnet(s, y.masked_fill(m, float("-inf")), m), "has label -inf"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, weighting="ndcg"), "weighting must be one of"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, k=0), "k must be None or a positive int"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, k=2.5), "k must be None or a positive int"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, sigma=0.0), "sigma must be a finite number > 0"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, eps=-1.0), "eps must be a finite number >= 0"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, mu=float("nan")), "mu must be a finite number >= 0"),
    (lambda s, y, m: ranking.lambda_loss(s, y, m, reduction_log="log10"), "reduction_log must be one of"),
    (lambda s, y, m: ranking.plistmle(s, y, m, position_weights=torch.ones(3)), "position_weights must be a tensor"),
    (lambda s, y, m: ranking.plistmle(s, y, m, position_weights=-torch.ones(8)), "finite and non-negative"),
    (lambda s, y, m: ranking.plistmle(s, y, m, eps=0.0), "eps must be a finite number > 0"),
]


@pytest.mark.parametrize("call,message", BAD_INPUTS)
def test_bad_input(call, message):
    logits, y, mask = make_lists(3, 8, seed=10)
    with pytest.raises(ValueError, match=message):
        call(logits, y, mask)
