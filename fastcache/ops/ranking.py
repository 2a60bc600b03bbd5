"""Learning-to-rank losses on padded score lists, forward and backward fused, memory O(Q·n).

Inputs: ``logits`` [Q, n] (one row of document scores per query), ``labels`` [Q, n] (relevance) and ``mask``
[Q, n] bool (True = a real document; None = all real). Padding may hold anything (NaN included): it is never
read into the maths and gets a zero gradient. Non-padding logits must be finite; non-padding labels must not
be NaN or +inf; a -inf label means "irrelevant" exactly as in sentence-transformers (no pair in LambdaLoss,
probability 0 in ListNet, ranked last when sorting by label). Each op returns the float32 (float64 for float64
logits) scalar loss; the gradient comes back in the logits' dtype. Ties in a sort are broken by position.

LambdaLoss (Wang et al. 2018, in sentence-transformers' formulation). Per query, documents sorted by logit
(descending): s_p, y_p at rank p (0-based), D_p = log2(p + 2), gains G_p = (2^max(y_p,0) - 1) / max(maxDCG@k, eps)
with maxDCG@k = sum_{r<k} (2^y_(r) - 1) / D_r over the labels sorted descending (negative labels count as 0).
Every backend computes the gains in float64 with numerator and denominator scaled by 2^-t, t the row's largest
label (2^(y-t)·(1 - 2^-y) in place of 2^y - 1), so no finite label overflows: a label of 1024 gives the exact value
(sentence-transformers' float32 2^y is inf from 128 on, and its LambdaLoss NaN). RankNet computes no gain at all.
A pair (p, q), both ranks < k, both labels finite, with y_p > y_q (NDCGLoss1: every pair, p = q included) has

    loss_pq = -log_b max(max(sigmoid(sigma·(s_p - s_q)), eps)^w_pq, eps)     (b = 2 or e: ``reduction_log``)

    weighting "none" (RankNet)  w = 1
              "ndcg_loss1"      w = G_p / D_p
              "ndcg_loss2"      w = delta_|p-q| · |G_p - G_q|,  delta_r = |1/log2(1 + r) - 1/log2(2 + r)|
              "lambdarank"      w = |1/D_p - 1/D_q| · |G_p - G_q|
              "ndcg_loss2pp"    w = mu · (ndcg_loss2 weight) + (lambdarank weight)

and the loss is the mean of loss_pq over every pair of the batch. ``eps=0`` means no clamp: loss_pq =
-w_pq·log_b sigmoid(sigma·(s_p - s_q)), computed in log space, so it stays finite where sentence-transformers'
sigmoid underflows to 0 and its log(0) makes the loss inf; a row without a positive label (maxDCG@k = 0) has gains 0
where sentence-transformers' 0/0 is NaN (the limit of eps -> 0 in both cases). The weights do not depend on the logits'
values (only on their order), so no gradient flows through them. sentence-transformers returns NaN when the
batch has no pair (e.g. all labels equal); here the loss is 0 with a zero gradient.

Autograd: each op's gradient is computed in its fused forward, so the ops are first-order only. A backward with
``create_graph=True`` (a gradient penalty, a Hessian) raises a RuntimeError, as do torch.func transforms (vmap,
grad, ...); meta tensors are a ValueError (the ops read their inputs' values).

PListMLE (Lan et al. 2014). Per query, documents in input order (``respect_input_order``) or sorted by label
(descending): loss_q = -sum_r w_r (s_r - log(sum_{t>=r} exp(s_t) + eps)), w_r the position weight of rank r among
the row's real documents (ListMLE: w = 1); loss = mean_q loss_q over all Q rows (an all-padding row counts 0).
The log-sum-exp runs max-shifted, so large logits do not overflow (sentence-transformers' exp does past ~88).

ListNet (Cao et al. 2007). Per query, loss_q = -sum_j softmax(y)_j log softmax(s)_j over real documents;
loss = mean_q loss_q over all Q rows.

Backends: ``cpu`` (csrc/cpu/ranking.cpp: one pass per query, pairs visited in place, never an [n, n] tensor),
``cuda`` (csrc/cuda/ranking.cu, CUDA tensors, one thread block per query: LambdaLoss with its rows in shared
memory, lists up to 4096 documents, several blocks per query when there are few; PListMLE with log-sum-exp scans;
ListNet with block reductions) and ``torch`` (pure PyTorch: LambdaLoss in blocks of ranks, [Q, rows, n] at a time
within the memory budget; the fallback on CUDA tensors when the extension has no CUDA kernels, and for LambdaLoss
lists longer than 4096 under ``auto``). The CUDA LambdaLoss adds with float atomics, so its results may differ in
the last bits between runs; under ``torch.use_deterministic_algorithms(True)`` ``auto`` takes ``torch`` instead
(and ``backend="cuda"`` raises).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from fastcache import _backend
from fastcache.ops._autograd_guard import check_real_device, refuse_double_backward, refuse_functorch

WEIGHTINGS = {"none": 0, "ndcg_loss1": 1, "ndcg_loss2": 2, "lambdarank": 3, "ndcg_loss2pp": 4}
REDUCTION_LOGS = ("natural", "binary")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
DIFF_LIMIT = 1e8  # sentence-transformers clamps score differences to +-1e8 (no gradient beyond)
_TORCH_PAIR_TEMPORARIES = 8  # [Q, rows, n] temporaries alive at once in the torch LambdaLoss

CUDA_MAX_LAMBDA_LIST = 4096  # csrc/cuda/ranking.h kMaxLambdaList: the LambdaLoss kernel's rows live in shared memory


def available(device: torch.device, function: str) -> dict[str, str | None]:
    """Backends of the ranking ops and, for each, None when it can run on ``device`` or the reason it cannot
    (``function``: the op's CUDA kernel in fastcache._C)."""
    return {"cpu": _backend.cpu_kernel_status(device), "torch": None,
            "cuda": _backend.cuda_kernel_status(device, function)}


def _stream(t: Tensor) -> int:
    """The raw cudaStream_t of ``t``'s device's current stream (the compiled CUDA kernels launch on it)."""
    return torch.cuda.current_stream(t.device).cuda_stream


@dataclass(frozen=True)
class LambdaOptions:
    """Options of :func:`lambda_loss` (validated on construction). See the module docstring for the maths."""

    weighting: str = "ndcg_loss2pp"
    mu: float = 10.0
    k: int | None = None
    sigma: float = 1.0
    eps: float = 1e-10
    reduction_log: str = "binary"

    def __post_init__(self):
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {tuple(WEIGHTINGS)}, got {self.weighting!r}")
        _check_number("mu", self.mu, minimum=0.0)
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise ValueError(f"k must be None or a positive int, got {self.k!r}")
        _check_number("sigma", self.sigma, minimum=0.0, strict=True)
        _check_number("eps", self.eps, minimum=0.0)
        if self.reduction_log not in REDUCTION_LOGS:
            raise ValueError(f"reduction_log must be one of {REDUCTION_LOGS}, got {self.reduction_log!r}")


def _check_number(name: str, value, *, minimum: float, strict: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < minimum or (strict and value == minimum):
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def check_inputs(logits: Tensor, labels: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (naming the argument) and return contiguous logits and labels in the compute dtype (float64 for
    float64 logits, else float32) and a contiguous bool mask."""
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.dtype not in DTYPES:
        raise ValueError("logits must be a [Q, n] tensor of float32, bfloat16, float16 or float64, got "
                         f"{type(logits).__name__} {getattr(logits, 'dtype', '')} {tuple(getattr(logits, 'shape', ()))}")
    for name, tensor in (("logits", logits), ("labels", labels), ("mask", mask)):
        check_real_device(name, tensor)
    if logits.size(0) == 0 or logits.size(1) == 0:
        raise ValueError(f"logits must have at least one query and one document, got shape {tuple(logits.shape)}")
    if not isinstance(labels, Tensor) or labels.shape != logits.shape:
        raise ValueError(f"labels must be a tensor of the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__}")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be real numbers, got dtype {labels.dtype}")
    if mask is None:
        mask = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
    elif not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.shape != logits.shape:
        raise ValueError(f"mask must be a bool tensor of the logits' shape {tuple(logits.shape)}, got "
                         f"{getattr(mask, 'dtype', type(mask).__name__)} {tuple(getattr(mask, 'shape', ()))}")
    if labels.device != logits.device or mask.device != logits.device:
        raise ValueError(f"logits, labels and mask must be on one device, got {logits.device}, {labels.device}, "
                         f"{mask.device}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    s = logits.detach().to(dtype).contiguous()
    y = labels.detach().to(dtype).contiguous()
    mask = mask.contiguous()
    bad = mask & ~torch.isfinite(s)
    if bad.any():
        raise ValueError(f"logits must be finite where mask is True; found {s[bad][0].item()} at (query, document) "
                         f"{tuple(bad.nonzero()[0].tolist())}")
    bad = mask & (torch.isnan(y) | (y == float("inf")))
    if bad.any():
        raise ValueError(f"labels must not be NaN or +inf where mask is True (-inf means irrelevant); found "
                         f"{y[bad][0].item()} at (query, document) {tuple(bad.nonzero()[0].tolist())}")
    return s, y, mask


class RankingLoss(torch.autograd.Function):
    """One autograd Function for every ranking op: the forward computes the loss and dL/dlogits in one fused
    call (``compute(with_grad) -> (loss, grad)``) and keeps the gradient; the backward scales it (first order
    only: a backward with create_graph=True raises, naming ``op``)."""

    @staticmethod
    def forward(ctx, logits: Tensor, compute: Callable[[bool], tuple[Tensor, Tensor | None]], op: str) -> Tensor:
        loss, grad = compute(ctx.needs_input_grad[0])
        ctx.save_for_backward(grad if grad is not None else torch.empty(0))
        ctx.input_dtype = logits.dtype
        ctx.op = op
        return loss

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        refuse_double_backward(ctx.op)
        (grad,) = ctx.saved_tensors
        return (grad * grad_output.to(grad.dtype)).to(ctx.input_dtype), None, None


def _run(logits: Tensor, compute: Callable[[bool], tuple[Tensor, Tensor | None]], op: str) -> Tensor:
    return RankingLoss.apply(logits, compute, f"fastcache.ops.ranking.{op}")


def _sort_valid(key: Tensor, mask: Tensor) -> Tensor:
    """Per row, the indices that sort real documents by ``key`` descending (ties by position), padding last."""
    order = key.masked_fill(~mask, float("-inf")).sort(dim=1, descending=True, stable=True).indices
    return order.gather(1, mask.gather(1, order).to(torch.int8).sort(dim=1, descending=True, stable=True).indices)


def _scatter_back(order: Tensor, grad_sorted: Tensor) -> Tensor:
    return torch.zeros_like(grad_sorted).scatter_(1, order, grad_sorted)


# ---- LambdaLoss / RankNet ----

def _lambda_torch(s: Tensor, y: Tensor, mask: Tensor, opts: LambdaOptions, with_grad: bool):
    """Per-row pair-loss sums, pair counts and d(sum)/ds in plain PyTorch, [Q, rows, n] pair blocks at a time."""
    Q, n = s.shape
    order = _sort_valid(s, mask)
    valid = mask.gather(1, order)
    s = s.gather(1, order).masked_fill(~valid, 0.0)
    y = y.gather(1, order).masked_fill(~valid, float("-inf"))
    position = torch.arange(n, device=s.device)
    top = valid & (position < (opts.k or n))[None, :]
    finite = top & torch.isfinite(y)
    discount = torch.log2(position.to(s.dtype) + 2.0)
    gain = _gains(y, opts.k or n, opts.eps).to(s.dtype) if opts.weighting != "none" else None
    inv_d = 1.0 / discount
    c = 1.0 / math.log(2.0) if opts.reduction_log == "binary" else 1.0
    log_eps = log_clamp(opts.eps, s.dtype)
    loss_sum = torch.zeros(Q, dtype=torch.float64, device=s.device)
    count = torch.zeros(Q, dtype=torch.float64, device=s.device)
    grad = torch.zeros_like(s)
    rows = max(1, _backend.memory_budget() // (_TORCH_PAIR_TEMPORARIES * Q * n * s.element_size()))
    for p0 in range(0, n, rows):
        p1 = min(n, p0 + rows)
        raw = s[:, p0:p1, None] - s[:, None, :]
        x = opts.sigma * raw.clamp(-DIFF_LIMIT, DIFF_LIMIT)
        pairs = finite[:, p0:p1, None] & finite[:, None, :]
        if opts.weighting != "ndcg_loss1":
            pairs &= y[:, p0:p1, None] > y[:, None, :]
        w = _pair_weights(opts, gain, inv_d, position, p0, p1, x)
        log_sig = torch.nn.functional.logsigmoid(x)
        t = w * log_sig.clamp(min=log_eps)
        loss_sum -= c * torch.where(pairs, t.clamp(min=log_eps), 0.0).sum(dim=(1, 2), dtype=torch.float64)
        count += pairs.sum(dim=(1, 2))
        if with_grad:
            live = pairs & (log_sig > log_eps) & (t > log_eps) & (raw.abs() <= DIFF_LIMIT)
            g = torch.where(live, -c * opts.sigma * w * torch.sigmoid(-x), 0.0)
            grad[:, p0:p1] += g.sum(dim=2)
            grad -= g.sum(dim=1)
    return loss_sum, count, _scatter_back(order, grad) if with_grad else None


def log_clamp(eps: float, dtype: torch.dtype) -> float:
    """The lower clamp of the log-probabilities: log eps, and for eps = 0 (no clamp) the dtype's lowest finite
    number rather than log 0 = -inf, so that a zero weight times a log-probability stays 0."""
    return math.log(eps) if eps > 0 else torch.finfo(dtype).min


def _gains(y: Tensor, k: int, eps: float) -> Tensor:
    """G = (2^max(y,0) - 1) / max(maxDCG@k, eps) per row of labels ``y`` [Q, n] sorted by logit (-inf / padding: no
    gain), in float64 and scaled by 2^-t (t: the row's largest max(y, 0)) so that no finite label overflows. A row
    with maxDCG@k = 0 (eps = 0, no positive label) has no gain: 0, not 0/0."""
    y = y.to(torch.float64).clamp(min=0.0)
    top = y.amax(dim=1, keepdim=True)
    scaled = torch.exp2(y - top) * -torch.expm1(-y * math.log(2.0))  # (2^y - 1)·2^-t
    discount = torch.log2(torch.arange(y.size(1), device=y.device, dtype=torch.float64) + 2.0)
    max_dcg = (scaled.sort(dim=1, descending=True).values / discount)[:, :k].sum(dim=1, keepdim=True)
    max_dcg = torch.maximum(max_dcg, eps * torch.exp2(-top))
    return torch.where(max_dcg > 0, scaled / max_dcg, 0.0)


def _pair_weights(opts: LambdaOptions, gain: Tensor | None, inv_d: Tensor, position: Tensor, p0: int, p1: int,
                  x: Tensor) -> Tensor:
    """The weights w of the pairs (p0 <= p < p1, q), [Q, p1 - p0, n]: only the terms the weighting uses."""
    if opts.weighting == "none":
        return torch.ones_like(x)
    if opts.weighting == "ndcg_loss1":
        return (gain[:, p0:p1] * inv_d[p0:p1])[:, :, None].expand_as(x)
    gain_diff = (gain[:, p0:p1, None] - gain[:, None, :]).abs()
    w = torch.zeros_like(x)
    if opts.weighting in ("ndcg_loss2", "ndcg_loss2pp"):
        rank_diff = (position[p0:p1, None] - position[None, :]).abs().to(x.dtype)
        delta = (1.0 / torch.log2(rank_diff + 1.0) - 1.0 / torch.log2(rank_diff + 2.0)).abs()
        delta = delta.masked_fill(rank_diff == 0, 0.0)
        w = w + (opts.mu if opts.weighting == "ndcg_loss2pp" else 1.0) * delta * gain_diff
    if opts.weighting in ("lambdarank", "ndcg_loss2pp"):
        w = w + (inv_d[p0:p1, None] - inv_d[None, :]).abs() * gain_diff
    return w


def _lambda_cpu(s: Tensor, y: Tensor, mask: Tensor, opts: LambdaOptions, with_grad: bool):
    return _backend.EXTENSION.lambda_loss_cpu(s, y, mask, WEIGHTINGS[opts.weighting], float(opts.mu), opts.k or 0,
                                              float(opts.sigma), float(opts.eps), opts.reduction_log == "binary",
                                              with_grad)


def _lambda_cuda(s: Tensor, y: Tensor, mask: Tensor, opts: LambdaOptions, with_grad: bool):
    return _backend.EXTENSION.lambda_loss_cuda(s, y, mask, WEIGHTINGS[opts.weighting], float(opts.mu), opts.k or 0,
                                               float(opts.sigma), float(opts.eps), opts.reduction_log == "binary",
                                               with_grad, _stream(s))


_LAMBDA_BACKENDS = {"cpu": _lambda_cpu, "torch": _lambda_torch, "cuda": _lambda_cuda}


def lambda_loss(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, weighting: str | None = "ndcg_loss2pp",
                mu: float = 10.0, k: int | None = None, sigma: float = 1.0, eps: float = 1e-10,
                reduction_log: str = "binary", backend: str | None = None) -> Tensor:
    """LambdaLoss over padded lists (see the module docstring): the mean pair loss of the batch, 0 without pairs.

    ``weighting``: "none" (None), "ndcg_loss1", "ndcg_loss2", "lambdarank" or "ndcg_loss2pp" (with ``mu``); ``k``
    truncates to NDCG@k; ``sigma`` scales score differences; ``eps`` clamps probabilities and maxDCG (0: no clamp);
    ``reduction_log`` is "binary" (log2) or "natural". ``backend``: auto | cpu | cuda | torch."""
    refuse_functorch("fastcache.ops.ranking.lambda_loss")
    opts = LambdaOptions(weighting or "none", mu, k, sigma, eps, reduction_log)
    s, y, mask = check_inputs(logits, labels, mask)
    status = available(s.device, "lambda_loss_cuda")
    if status["cuda"] is None and s.size(1) > CUDA_MAX_LAMBDA_LIST:
        status["cuda"] = (f"the CUDA LambdaLoss kernel takes lists of up to {CUDA_MAX_LAMBDA_LIST} documents, "
                          f"got {s.size(1)}")
    if status["cuda"] is None and torch.are_deterministic_algorithms_enabled():
        status["cuda"] = ("the CUDA LambdaLoss kernel adds its pairs' gradients with float atomics (not bitwise "
                          "reproducible) and torch.use_deterministic_algorithms(True) is set")
    kernel = _LAMBDA_BACKENDS[_backend.resolve_backend(s.device, status, backend)]

    def compute(with_grad: bool):
        loss_sum, count, grad = kernel(s, y, mask, opts, with_grad)
        total = count.sum()
        norm = 1.0 / total.clamp(min=1.0)  # no pair: loss 0, gradient 0
        loss = (loss_sum.sum() * norm).to(s.dtype)
        return loss, grad * norm.to(s.dtype) if with_grad else None

    return _run(logits, compute, "lambda_loss")


def ranknet(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, k: int | None = None,
            sigma: float = 1.0, eps: float = 1e-10, reduction_log: str = "binary",
            backend: str | None = None) -> Tensor:
    """RankNet: :func:`lambda_loss` with weighting "none" (every pair with y_p > y_q weighs 1)."""
    return lambda_loss(logits, labels, mask, weighting="none", k=k, sigma=sigma, eps=eps,
                       reduction_log=reduction_log, backend=backend)


# ---- PListMLE / ListMLE ----

def _plistmle_torch(s: Tensor, y: Tensor, mask: Tensor, weights: Tensor | None, respect_input_order: bool,
                    eps: float, with_grad: bool):
    """Per-row losses and their d/ds in plain PyTorch (running log-sum-exps, no overflow)."""
    order = _sort_valid(torch.zeros_like(s) if respect_input_order else y, mask)
    valid = mask.gather(1, order)
    s_sorted = s.gather(1, order).masked_fill(~valid, float("-inf"))
    suffix = torch.logcumsumexp(s_sorted.flip(1), dim=1).flip(1)
    lhat = torch.logaddexp(suffix, torch.full_like(suffix, math.log(eps)))
    w = torch.ones_like(s) if weights is None else weights
    w = torch.where(valid, w, 0.0)
    s_real = torch.where(valid, s_sorted, 0.0)
    loss_rows = -(w * (s_real - lhat)).sum(dim=1)
    if not with_grad:
        return loss_rows, None
    # sum_{r<=t} w_r exp(s_t - lhat_r) = exp(s_t + logcumsumexp_r(log w_r - lhat_r)); weights are >= 0
    log_acc = torch.logcumsumexp(torch.where(w > 0, torch.log(w) - lhat, float("-inf")), dim=1)
    grad_sorted = torch.where(valid, -w + torch.exp(s_real + log_acc), 0.0)
    return loss_rows, _scatter_back(order, grad_sorted)


def _plistmle_cpu(s, y, mask, weights, respect_input_order, eps, with_grad):
    return _backend.EXTENSION.plistmle_cpu(s, y, mask, weights, respect_input_order, float(eps), with_grad)


def _plistmle_cuda(s, y, mask, weights, respect_input_order, eps, with_grad):
    return _backend.EXTENSION.plistmle_cuda(s, y, mask, weights, respect_input_order, float(eps), with_grad,
                                            _stream(s))


_PLISTMLE_BACKENDS = {"cpu": _plistmle_cpu, "torch": _plistmle_torch, "cuda": _plistmle_cuda}


def plistmle_default_weights(mask: Tensor) -> Tensor:
    """sentence-transformers' PListMLELambdaWeight, normalised per row: w_r = (2^(N-r) - 1) / sum_r' (2^(N-r') - 1)
    for the N real documents of the row, computed as (2^-r - 2^-N) / ... so that no list length overflows (the
    upstream form is NaN past N ~ 127 in float32). Shape [Q, n], by rank; zero past each row's N."""
    N = mask.sum(dim=1, keepdim=True).to(torch.float64)
    r = torch.arange(mask.size(1), device=mask.device, dtype=torch.float64)[None, :]
    w = torch.where(r < N, torch.exp2(-r) - torch.exp2(-N), 0.0)
    return w / w.sum(dim=1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)


def plistmle(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, position_weights: Tensor | None = None,
             respect_input_order: bool = True, eps: float = 1e-10, backend: str | None = None) -> Tensor:
    """Position-aware ListMLE (see the module docstring). ``position_weights``: None (all 1: ListMLE), or a finite
    non-negative tensor [n] or [Q, n], the weight of rank r among each row's real documents (e.g.
    :func:`plistmle_default_weights`). ``respect_input_order``: documents in input order, else sorted by label."""
    refuse_functorch("fastcache.ops.ranking.plistmle")
    _check_number("eps", eps, minimum=0.0, strict=True)
    s, y, mask = check_inputs(logits, labels, mask)
    weights = None
    if position_weights is not None:
        if not isinstance(position_weights, Tensor) or position_weights.dim() not in (1, 2) or \
                position_weights.shape[-1] != s.size(1) or (position_weights.dim() == 2 and
                                                            position_weights.size(0) not in (1, s.size(0))):
            raise ValueError(f"position_weights must be a tensor [n] or [Q, n] with n={s.size(1)}, Q={s.size(0)}; "
                             f"got {tuple(getattr(position_weights, 'shape', ()))}")
        weights = position_weights.detach().to(device=s.device, dtype=s.dtype).expand_as(s).contiguous()
        if not (torch.isfinite(weights).all() and (weights >= 0).all()):
            raise ValueError("position_weights must be finite and non-negative")
    kernel = _PLISTMLE_BACKENDS[_backend.resolve_backend(s.device, available(s.device, "plistmle_cuda"), backend)]

    def compute(with_grad: bool):
        loss_rows, grad = kernel(s, y, mask, weights, bool(respect_input_order), eps, with_grad)
        Q = s.size(0)
        return loss_rows.sum() / Q, grad / Q if with_grad else None

    return _run(logits, compute, "plistmle")


def listmle(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, respect_input_order: bool = True,
            eps: float = 1e-10, backend: str | None = None) -> Tensor:
    """ListMLE: :func:`plistmle` with every position weight 1."""
    return plistmle(logits, labels, mask, respect_input_order=respect_input_order, eps=eps, backend=backend)


# ---- ListNet ----

def _listnet_torch(s: Tensor, y: Tensor, mask: Tensor, with_grad: bool):
    """Per-row cross-entropies and their d/ds in plain PyTorch."""
    real_row = mask.any(dim=1, keepdim=True)
    logits = torch.where(mask, s, float("-inf")).where(real_row, 0.0)
    log_p = torch.log_softmax(logits, dim=1)
    target = torch.softmax(torch.where(mask, y, float("-inf")).where(real_row, 0.0), dim=1)
    target = torch.where(mask, target, 0.0)
    loss_rows = -torch.where(target > 0, target * log_p, 0.0).sum(dim=1)
    grad = torch.where(mask, log_p.exp() - target, 0.0) if with_grad else None
    return loss_rows, grad


def _listnet_cpu(s, y, mask, with_grad):
    return _backend.EXTENSION.listnet_cpu(s, y, mask, with_grad)


def _listnet_cuda(s, y, mask, with_grad):
    return _backend.EXTENSION.listnet_cuda(s, y, mask, with_grad, _stream(s))


_LISTNET_BACKENDS = {"cpu": _listnet_cpu, "torch": _listnet_torch, "cuda": _listnet_cuda}


def listnet(logits: Tensor, labels: Tensor, mask: Tensor | None = None, *, backend: str | None = None) -> Tensor:
    """ListNet (see the module docstring): mean over rows of CE(softmax(labels), softmax(logits)) over real
    documents. A row whose real labels are all -inf has no target distribution: a ValueError."""
    refuse_functorch("fastcache.ops.ranking.listnet")
    s, y, mask = check_inputs(logits, labels, mask)
    no_target = mask.any(dim=1) & ~(mask & (y > float("-inf"))).any(dim=1)
    if no_target.any():
        raise ValueError(f"labels: every real document of query {int(no_target.nonzero()[0])} has label -inf, "
                         "so ListNet has no target distribution")
    kernel = _LISTNET_BACKENDS[_backend.resolve_backend(s.device, available(s.device, "listnet_cuda"), backend)]

    def compute(with_grad: bool):
        loss_rows, grad = kernel(s, y, mask, with_grad)
        Q = s.size(0)
        return loss_rows.sum() / Q, grad / Q if with_grad else None

    return _run(logits, compute, "listnet")
