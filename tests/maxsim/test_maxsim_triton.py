"""The Triton kernels of the MaxSim primitives (fastcache/triton/maxsim.py) on CPU tensors, through the Triton
interpreter (TRITON_INTERPRET=1), against a float64 PyTorch statement of each primitive written here.

token_max (masked max over document tokens of the query·doc dot products, first argmax) and token_grad (the gather
into the queries, the scatter into the documents): odd shapes (1 included, nothing a multiple of a tile), small
tiles so that every loop runs several times (query rows, documents per program, document tokens, dims), D = 1000
once, masks with gaps, fully masked query tokens, empty documents, ties (duplicated document tokens: the first
wins, across and within tiles), NaN at masked positions and in strided padding, fp32 / bf16 / fp16 against float64
on the same rounded inputs, and the errors on bad input. The error bound is elementwise: the same maths on the
absolute values times a per-dtype factor (fp32 accumulation; 2^-16 for the bf16 hi + lo operands of the 16-bit
grad_docs dots). The interpreter is slow: shapes are tiny. Also bench/maxsim_kernels.py --smoke. sm_90 compile facts:
tests/native/test_maxsim_triton_compile.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from helpers import INTERPRETER_ONLY, nan_padded  # noqa: E402

from fastcache.triton.maxsim import GradTiles, MaxTiles, token_grad, token_max  # noqa: E402

pytestmark = INTERPRETER_ONLY

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SMALL_MAX = MaxTiles(block_m=16, block_n=16, block_k=16, docs=2, warps=4, stages=1)
SMALL_GRAD = GradTiles(block_d=16, block_m=16, block_u=16, warps=4, stages=1, gather_m=16, gather_warps=4)
# |kernel - float64| <= factor · (the same sum over absolute values): fp32 accumulation of exact products (16-bit
# inputs are compared on the same rounded values); grad_docs' 16-bit path rounds w·q to 16 significant bits
VALUE_FACTOR = 1e-5
GRAD_FACTOR = {torch.float32: 1e-5, torch.bfloat16: 4e-5, torch.float16: 4e-5}
NAN = float("nan")


# ---------------------------------------------------------------------------------------------------------------
# the float64 statement of both primitives
# ---------------------------------------------------------------------------------------------------------------

def reference_token_max(q, query_mask, d, doc_mask):
    """values, index and the top-2 gap (float64; inf where there is no runner-up) by einsum and a masked max; the
    masked tokens are zeroed first (their NaN must not reach a result)."""
    q = q.double().where(query_mask[..., None], 0.0)
    d = d.double().where(doc_mask[..., None], 0.0)
    s = torch.einsum("btd,cud->btcu", q, d).masked_fill(~doc_mask[None, None], float("-inf"))
    values, index = s.max(-1)  # torch.max: the first maximal index
    top2 = s.topk(min(2, s.size(-1)), -1).values if s.size(-1) else s
    gap = (top2[..., 0] - top2[..., 1]) if s.size(-1) > 1 else torch.full(values.shape, float("inf"))
    found = query_mask[:, :, None] & doc_mask.any(-1)[None, None]
    return values.where(found, 0.0), index.where(found, -1), gap.nan_to_num(float("inf"))


def reference_token_grad(w, index, q, d):
    """grad_q (gather) and grad_d (index_add), float64; entries with index -1 read nothing (NaN there ignored)."""
    C, Ld = index.size(2), d.size(1)
    hit = index >= 0
    u = index.clamp(min=0).long()
    gathered = d.double()[torch.arange(C)[None, None, :], u]  # [B, Lq, C, D]
    weighted = torch.where(hit[..., None], w.double()[..., None] * gathered, 0.0)
    grad_q = weighted.sum(2)
    grad_d = torch.zeros(C * Ld, q.size(2), dtype=torch.float64)
    flat = (torch.arange(C)[None, None, :] * Ld + u)[hit]
    rows = torch.where(hit[..., None], w.double()[..., None] * q.double()[:, :, None, :], 0.0)[hit]
    grad_d.index_add_(0, flat, rows)
    return grad_q, grad_d.view(C, Ld, -1)


# ---------------------------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------------------------

def make_inputs(B, Lq, C, Ld, D, dtype, seed=0, layout=None):
    """Random tokens (rounded to dtype) and masks with gaps; a fully masked query token and an empty document where
    the shape allows; NaN at every masked token; ``layout``: a NaN-padded strided view (tests/helpers.py)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, D, generator=g).to(dtype)
    d = torch.randn(C, Ld, D, generator=g).to(dtype)
    query_mask = torch.rand(B, Lq, generator=g) > 0.25
    doc_mask = torch.rand(C, Ld, generator=g) > 0.3
    if B * Lq > 1:
        query_mask.view(-1)[0] = False
    if C > 1:
        doc_mask[C // 2] = False
    if B * Lq * C * Ld:  # something to find
        query_mask.view(-1)[-1] = True
        doc_mask[-1, -1] = True
    if layout is not None:
        q, d = nan_padded(q, layout), nan_padded(d, layout)
    return q.masked_fill_(~query_mask[..., None], NAN), query_mask, d.masked_fill_(~doc_mask[..., None], NAN), doc_mask


def absolute_scale(q, query_mask, d, doc_mask):
    """Σ_k |q_k·d_k| bounds the rounding of each dot product: its maximum over valid pairs."""
    q = q.double().where(query_mask[..., None], 0.0).abs()
    d = d.double().where(doc_mask[..., None], 0.0).abs()
    return torch.einsum("btd,cud->btcu", q, d).amax(-1) if d.size(1) else torch.zeros(q.shape[:2] + d.shape[:1])


def check_token_max(q, query_mask, d, doc_mask, tiles=SMALL_MAX):
    values, index = token_max(q, query_mask, d, doc_mask, tiles=tiles)
    assert values.dtype == torch.float32 and index.dtype == torch.int32
    ref_values, ref_index, gap = reference_token_max(q, query_mask, d, doc_mask)
    bound = VALUE_FACTOR * absolute_scale(q, query_mask, d, doc_mask)
    err = (values.double() - ref_values).abs()
    assert torch.all(err <= bound), f"max error {err.max():.3g}, bound there {bound.flatten()[err.argmax()]:.3g}"
    clear = gap > 2 * bound  # argmax decided beyond the rounding
    assert torch.equal(index.long()[clear], ref_index[clear])
    assert torch.equal(index < 0, ref_index < 0)  # -1 exactly where nothing was found
    assert torch.all(values[index < 0] == 0)
    return values, index


def check_token_grad(w, index, q, d, tiles=SMALL_GRAD):
    grad_q, grad_d = token_grad(w, index, q, d, tiles=tiles)
    assert grad_q.dtype == grad_d.dtype == torch.float32
    ref_q, ref_d = reference_token_grad(w, index, q, d)
    abs_q, abs_d = reference_token_grad(w.abs(), index, q.abs(), d.abs())
    factor = GRAD_FACTOR[q.dtype]
    for name, got, ref, scale in (("grad_q", grad_q, ref_q, abs_q), ("grad_d", grad_d, ref_d, abs_d)):
        err = (got.double() - ref).abs()
        assert torch.all(err <= factor * scale), f"{name}: max error {err.max():.3g}"
    return grad_q, grad_d


def random_index(query_mask, doc_mask, seed=1):
    """An index of valid document tokens (or -1: a quarter of the entries, every masked query token and every
    empty document), as token_max could give it."""
    g = torch.Generator().manual_seed(seed)
    (B, Lq), C = query_mask.shape, doc_mask.size(0)
    Ld = doc_mask.size(1)
    index = torch.full((B, Lq, C), -1, dtype=torch.int32)
    for c in range(C):
        valid = doc_mask[c].nonzero().flatten()
        if len(valid):
            pick = valid[torch.randint(len(valid), (B, Lq), generator=g)]
            keep = (torch.rand(B, Lq, generator=g) > 0.25) & query_mask
            index[:, :, c] = torch.where(keep, pick, -1).to(torch.int32)
    assert index.max() < Ld
    return index


def nan_weights(index, seed=2):
    """Weights with NaN wherever index is -1 (never to be read)."""
    w = torch.randn(index.shape, generator=torch.Generator().manual_seed(seed))
    return w.masked_fill(index < 0, NAN)


# ---------------------------------------------------------------------------------------------------------------
# token_max
# ---------------------------------------------------------------------------------------------------------------

SHAPES = [  # B, Lq, C, Ld, D
    (1, 1, 1, 1, 1),
    (1, 3, 1, 5, 7),
    (2, 5, 3, 7, 33),  # C odd over 2 documents per program
    (3, 7, 5, 37, 20),  # 21 query rows (2 row tiles), Ld over 3 token tiles
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_max_matches_reference(shape, dtype):
    check_token_max(*make_inputs(*shape, dtype))


@pytest.mark.parametrize("layout", ["slice", "every_other_row"])
def test_token_max_strided_nan_padded(layout):
    """Views inside NaN-filled buffers (strides along every leading dim), masks strided too."""
    q, query_mask, d, doc_mask = make_inputs(2, 5, 3, 19, 24, torch.bfloat16, seed=3, layout=layout)
    query_mask = torch.ones(2, 10, dtype=torch.bool)[:, ::2].copy_(query_mask)
    doc_mask = torch.zeros(6, 19, dtype=torch.bool)[::2].copy_(doc_mask)
    assert q.stride(-1) == 1 and not q.is_contiguous() and not query_mask.is_contiguous()
    check_token_max(q, query_mask, d, doc_mask)


def test_token_max_wide_dim():
    """D = 1000: masked tails of the K loop (64-dim steps)."""
    check_token_max(*make_inputs(2, 3, 3, 9, 1000, torch.float32, seed=4),
                    tiles=SMALL_MAX._replace(block_k=64))


def test_token_max_default_tiles():
    """The launch configuration the GPU gets (TOKEN_MAX_TILES: the 16-bit and the fp32 tiles), on odd shapes."""
    for dtype in (torch.float32, torch.bfloat16):
        check_token_max(*make_inputs(3, 7, 11, 21, 40, dtype, seed=5), tiles=None)


def test_token_max_ties_take_the_first_token():
    """Duplicated document tokens: equal products; the lowest valid u wins, within a 16-token tile (u = 3 and 9)
    and across tiles (u = 5 and 21, 40; u = 2 masked out although it holds the best token too)."""
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 8, generator=g)
    d = torch.randn(2, 45, 8, generator=g) * 0.1
    best = q[0, 0] * 10
    d[0, [3, 9]] = best
    d[1, [2, 5, 21, 40]] = best
    doc_mask = torch.ones(2, 45, dtype=torch.bool)
    doc_mask[1, 2] = False
    query_mask = torch.ones(2, 3, dtype=torch.bool)
    values, index = check_token_max(q, query_mask, d, doc_mask)
    assert index[0, 0, 0] == 3 and index[0, 0, 1] == 5
    assert values[0, 0, 0] == values[0, 0, 1]


def test_token_max_all_masked():
    """No valid query token, no valid document token: values 0 and index -1 everywhere, NaN inputs unread."""
    q = torch.full((2, 3, 5), NAN)
    d = torch.full((2, 4, 5), NAN)
    ones_q, ones_d = torch.ones(2, 3, dtype=torch.bool), torch.ones(2, 4, dtype=torch.bool)
    for query_mask, doc_mask in ((~ones_q, ones_d), (ones_q, ~ones_d)):
        values, index = token_max(q, query_mask, d, doc_mask, tiles=SMALL_MAX)
        assert torch.equal(values, torch.zeros(2, 3, 2)) and torch.equal(index, torch.full((2, 3, 2), -1,
                                                                                          dtype=torch.int32))


def test_empty_sizes():
    """Zero query tokens, documents or document tokens: the right shapes, nothing launched (all zeros, -1)."""
    for B, Lq, C, Ld in ((0, 3, 2, 4), (2, 0, 2, 4), (2, 3, 0, 4), (2, 3, 2, 0)):
        q, d = torch.randn(B, Lq, 8), torch.randn(C, Ld, 8)
        values, index = token_max(q, torch.ones(B, Lq, dtype=torch.bool), d, torch.ones(C, Ld, dtype=torch.bool))
        assert values.shape == index.shape == (B, Lq, C) and torch.all(index == -1)
        grad_q, grad_d = token_grad(values, index, q, d)
        assert grad_q.shape == q.shape and grad_d.shape == d.shape
        assert not grad_q.any() and not grad_d.any()


# ---------------------------------------------------------------------------------------------------------------
# token_grad
# ---------------------------------------------------------------------------------------------------------------

GRAD_SHAPES = [  # B, Lq, C, Ld, D
    (1, 1, 1, 1, 1),
    (2, 5, 3, 7, 33),  # D over 3 dim blocks
    (3, 7, 4, 37, 20),  # 21 rows over 2 row blocks, Ld over 3 token blocks
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: str(t).split(".")[1])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_token_grad_matches_reference(shape, dtype):
    """A random index (-1 in a quarter of the entries and at masked query tokens, NaN weights there), NaN at
    every masked token (never read)."""
    q, query_mask, d, doc_mask = make_inputs(*shape, dtype, seed=7)
    index = random_index(query_mask, doc_mask)
    check_token_grad(nan_weights(index), index, q, d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda t: str(t).split(".")[1])
def test_token_grad_default_tiles(dtype):
    """The launch configuration the GPU gets (TOKEN_GRAD_TILES' 16-bit tiles), D = 384 over 3 dim blocks."""
    q, query_mask, d, doc_mask = make_inputs(3, 7, 3, 11, 384, dtype, seed=12)
    index = random_index(query_mask, doc_mask, seed=13)
    check_token_grad(nan_weights(index), index, q, d, tiles=None)


def test_token_grad_many_rows_on_one_token():
    """Every query token picks the same document token: the scatter sums 21 rows into one, in any dtype."""
    for dtype in DTYPES:
        q, _, d, _ = make_inputs(3, 7, 2, 5, 12, dtype, seed=8)
        index = torch.full((3, 7, 2), 4, dtype=torch.int32)
        q = q.nan_to_num(0.5)
        d = d.nan_to_num(0.5)
        check_token_grad(torch.randn(3, 7, 2), index, q, d)


@pytest.mark.parametrize("layout", ["slice", "every_other_row"])
def test_token_grad_strided(layout):
    """Strided embeddings (NaN-padded) and strided weights and index (views of bigger buffers)."""
    B, Lq, C = 2, 5, 3
    q, query_mask, d, doc_mask = make_inputs(B, Lq, C, 19, 24, torch.float16, seed=9, layout=layout)
    index = random_index(query_mask, doc_mask, seed=10)
    weights = torch.full((B, C, 2 * Lq), NAN).transpose(1, 2)[:, ::2].copy_(nan_weights(index))
    strided_index = torch.full((B + 1, Lq, C + 2), 7, dtype=torch.int32)[1:, :, 1:-1].copy_(index)
    assert not weights.is_contiguous() and not strided_index.is_contiguous()
    check_token_grad(weights, strided_index, q, d)


def test_token_grad_broadcast_weights():
    """Weights expanded along the query tokens (stride 0: dL/dscore[b, c] for every t, as the op passes them)."""
    q, query_mask, d, doc_mask = make_inputs(2, 5, 3, 9, 16, torch.bfloat16, seed=14)
    index = random_index(query_mask, doc_mask, seed=15)
    weights = torch.randn(2, 1, 3).expand(2, 5, 3)
    assert weights.stride(1) == 0
    check_token_grad(weights, index, q, d)


def test_token_max_then_token_grad_is_the_autograd_gradient():
    """token_grad of token_max's index, default tiles: the gradient of Σ w·values that float64 autograd gives
    through the masked max of the reference."""
    B, Lq, C = 2, 5, 4
    q, query_mask, d, doc_mask = make_inputs(B, Lq, C, 19, 24, torch.float32, seed=11)
    _, index = token_max(q, query_mask, d, doc_mask)
    w = torch.randn(B, Lq, C)
    grad_q, grad_d = token_grad(w, index, q, d)
    q64 = q.double().where(query_mask[..., None], 0.0).requires_grad_()
    d64 = d.double().where(doc_mask[..., None], 0.0).requires_grad_()
    s = torch.einsum("btd,cud->btcu", q64, d64).masked_fill(~doc_mask[None, None], float("-inf"))
    found = query_mask[:, :, None] & doc_mask.any(-1)[None, None]
    (s.max(-1).values.where(found, 0.0) * w.double()).sum().backward()
    assert torch.allclose(grad_q.double(), q64.grad, rtol=1e-5, atol=1e-5)
    assert torch.allclose(grad_d.double(), d64.grad, rtol=1e-5, atol=1e-5)


def test_kernel_benchmark_smoke(capsys):
    """bench/maxsim_kernels.py --smoke (the GPU timing script at a tiny shape, here through the interpreter)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    import maxsim_kernels

    assert maxsim_kernels.main(["--smoke"]) == 0
    table = capsys.readouterr().out
    for case in ("gemm", "token_max triton", "token_max torch", "token_grad triton", "token_grad torch"):
        assert f"| {case} |" in table


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    q, query_mask, d, doc_mask = make_inputs(2, 3, 2, 4, 8, torch.float32)
    index = torch.zeros(2, 3, 2, dtype=torch.int32)
    w = torch.ones(2, 3, 2)
    cases = [
        (lambda: token_max(q.double(), query_mask, d.double(), doc_mask), "queries must be a 3-D tensor"),
        (lambda: token_max(q[0], query_mask, d, doc_mask), "queries must be a 3-D tensor"),
        (lambda: token_max(q, query_mask, d.half(), doc_mask), "docs must have the queries' dtype"),
        (lambda: token_max(q, query_mask, d[..., :7], doc_mask), "docs must have the queries' dtype, dim"),
        (lambda: token_max(q.transpose(1, 2).contiguous().transpose(1, 2), query_mask, d, doc_mask),
         "queries must be contiguous along its last dim"),
        (lambda: token_max(q, query_mask, nan_padded(d.nan_to_num(), "every_other_col"), doc_mask),
         "docs must be contiguous along its last dim"),
        (lambda: token_max(q, query_mask.int(), d, doc_mask), r"query_mask must be a bool tensor of shape \[2, 3\]"),
        (lambda: token_max(q, query_mask, d, doc_mask[:, :3]), r"doc_mask must be a bool tensor of shape \[2, 4\]"),
        (lambda: token_grad(w.double(), index, q, d), r"weights must be a torch.float32 tensor of shape \[2, 3, 2\]"),
        (lambda: token_grad(w, index.long(), q, d), "index must be a torch.int32 tensor"),
        (lambda: token_grad(w, index[:, :2], q, d), r"index must be a torch.int32 tensor of shape \[2, 3, 2\]"),
        (lambda: token_grad(w, index + 4, q, d), r"index must hold document token positions in \[-1, 4\)"),
        (lambda: token_grad(w, index - 2, q, d), r"got values in \[-2, -2\]"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()
