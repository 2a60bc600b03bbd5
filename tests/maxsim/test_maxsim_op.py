"""fastcache.ops.maxsim (the fused ColBERT MaxSim contrastive loss) against the dense oracle
(fastcache/reference.py maxsim_contrastive_loss_reference: the 4-D einsum, masked max, cross-entropy, through
autograd) in float64, and against sentence-transformers' own loss stage (colbert_scores + F.cross_entropy).

Every backend that runs on CPU ("cpu": csrc/cpu/maxsim.cpp, "torch"; "triton" through its interpreter when
fastcache/triton/maxsim.py exists), both public functions (autograd, one pass): odd shapes (B=1, Lq=1, Ld=1, D=384,
D=1000, N=1..3, G > B with an offset), masks with gaps, all-masked query rows, empty documents, Ld=0, ties in the
max (duplicated document tokens, integer-valued so that the products tie exactly), NaN in masked positions and in
strided padding, length_normalize, scales, small memory budgets (many document chunks); fp32/bf16/fp16 against the
float64 truth, no worse than upstream's loss stage in the same dtype (tests/helpers.py's rule); the primitives
token_max / token_grad alone against brute force; bad inputs.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    FLOAT64_TOL,
    INTERPRETER_ONLY,
    assert_no_worse_than_reference,
    nan_padded,
)
from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

from fastcache import (
    _backend,
    maxsim_contrastive_loss,
    maxsim_contrastive_loss_and_grad,
)
from fastcache.ops.maxsim.primitives import available, primitives
from fastcache.reference import maxsim_contrastive_loss_reference

# the float64 cases run the cpu and torch backends; triton (float32/bf16/fp16 only) has its own interpreter cases
BACKENDS = [name for name in ("cpu", "torch") if available(torch.device("cpu"))[name] is None]
TRITON = available(torch.device("cpu"))["triton"]
PATHS = ("autograd", "one_pass")


def make(B, Lq, D, G, N, Ld, *, seed=0, dtype=torch.float64, masks=True):
    """Seeded queries [B, Lq, D], docs [G, N, Ld, D] and masks with gaps (the first token of every query and
    document kept valid unless a test empties it)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Lq, D, generator=g, dtype=torch.float64).to(dtype)
    d = torch.randn(G, N, Ld, D, generator=g, dtype=torch.float64).to(dtype)
    if not masks:
        return q, d, None, None
    q_mask = torch.rand(B, Lq, generator=g) > 0.3
    d_mask = torch.rand(G, N, Ld, generator=g) > 0.3
    q_mask[:, 0] = True
    if Ld:
        d_mask[..., 0] = True
    return q, d, q_mask, d_mask


def run(path, q, d, **kw):
    """(loss, grad_queries, grad_docs) of the op by ``path``."""
    if path == "one_pass":
        return tuple(maxsim_contrastive_loss_and_grad(q, d, **kw))
    q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
    loss = maxsim_contrastive_loss(q, d, **kw)
    return (loss, *torch.autograd.grad(loss, (q, d)))


def oracle(q, d, **kw):
    q, d = q.detach().double().requires_grad_(), d.detach().double().requires_grad_()
    loss = maxsim_contrastive_loss_reference(q, d, **kw)
    return (loss, *torch.autograd.grad(loss, (q, d)))


def upstream(q, d, *, query_mask=None, doc_mask=None, scale=1.0, length_normalize=False, offset=0):
    """sentence-transformers' loss stage (MultiVectorMultipleNegativesRankingLoss.forward after the embedding)."""
    q, d = q.detach().requires_grad_(), d.detach().requires_grad_()
    scores = colbert_scores(q, d, queries_mask=query_mask, documents_mask=doc_mask, length_normalize=length_normalize)
    labels = (offset + torch.arange(q.size(0))) * d.size(1)
    loss = F.cross_entropy(scores * scale, labels)
    return (loss, *torch.autograd.grad(loss, (q, d)))


def assert_close_all(ours, truth, **tol):
    tol = tol or FLOAT64_TOL
    for name, a, b in zip(("loss", "grad_queries", "grad_docs"), ours, truth):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a.double(), b.double(), **tol, msg=lambda m, n=name: f"{n}: {m}")


SHAPES = [  # B, Lq, D, G, N, Ld, offset
    (1, 1, 4, 1, 1, 1, 0),
    (1, 3, 384, 2, 3, 5, 1),
    (2, 4, 1000, 3, 2, 7, 0),
    (3, 5, 16, 5, 1, 1, 2),
    (4, 7, 33, 6, 3, 9, 1),
    (2, 1, 8, 2, 2, 11, 0),
]
OPTIONS = [dict(), dict(scale=20.0), dict(scale=0.05, length_normalize=True), dict(scale=-3.0, length_normalize=True)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_matches_oracle_float64(backend, path, shape, options):
    *sizes, offset = shape
    q, d, q_mask, d_mask = make(*sizes, seed=sum(sizes))
    kw = dict(query_mask=q_mask, doc_mask=d_mask, offset=offset, **options)
    ours = run(path, q, d, backend=backend, **kw)
    assert ours[0].dtype == torch.float64 and ours[1].dtype == ours[2].dtype == torch.float64
    assert_close_all(ours, oracle(q, d, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_several_tiles(backend, dtype):
    """More query tokens than one cpu tile (256) and more document tokens than one chunk (1024): 360 query tokens,
    43 documents of 40 tokens (25 per chunk), masks with gaps."""
    q, d, q_mask, d_mask = make(40, 9, 24, 43, 1, 40, seed=30, dtype=dtype)
    q_mask[:30] = True
    kw = dict(query_mask=q_mask, doc_mask=d_mask, offset=3, scale=0.2, length_normalize=True)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for path in PATHS:
        assert_close_all(run(path, q, d, backend=backend, **kw), oracle(q, d, **kw), **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length_normalize", [False, True])
def test_no_masks_counts_nonzero_query_tokens(backend, length_normalize):
    """Without masks every token is valid; a query token that is all zeros is not counted by length_normalize
    (upstream's _query_token_counts), but still takes part in the max."""
    q, d, _, _ = make(3, 6, 12, 4, 2, 5, seed=3, masks=False)
    q[1, 4:] = 0
    kw = dict(length_normalize=length_normalize, offset=1, scale=2.0)
    for path in PATHS:
        assert_close_all(run(path, q, d, backend=backend, **kw), oracle(q, d, **kw))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_query_rows_and_empty_documents(backend):
    """A query with no valid token scores 0 against every document (and gets no gradient); a document with no valid
    token scores -1e9 (/ n_b) and gets no gradient; the positive itself may be empty."""
    q, d, q_mask, d_mask = make(4, 5, 9, 5, 3, 6, seed=7)
    q_mask[2] = False
    d_mask[1, 2] = False
    d_mask[3, 0] = False  # the positive of query 3 (offset 0)
    for length_normalize in (False, True):
        kw = dict(query_mask=q_mask, doc_mask=d_mask, length_normalize=length_normalize, scale=0.5)
        for path in PATHS:
            loss, gq, gd = run(path, q, d, backend=backend, **kw)
            assert_close_all((loss, gq, gd), oracle(q, d, **kw))
            assert torch.isfinite(loss) and gq[2].abs().max() == 0
            assert gd[1, 2].abs().max() == 0 and gd[3, 0].abs().max() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_width_documents(backend):
    """Ld = 0: every document is empty (upstream's zero-width path); every logit is -1e9, so the loss log(G·N) is
    found to float64's rounding at 1e9."""
    q = torch.randn(2, 3, 4, dtype=torch.float64)
    d = torch.randn(2, 2, 0, 4, dtype=torch.float64)
    for path in PATHS:
        loss, gq, gd = run(path, q, d, backend=backend, scale=1.0)
        assert_close_all((loss, gq, gd), oracle(q, d), rtol=0, atol=1e9 * torch.finfo(torch.float64).eps)
        assert gq.abs().max() == 0 and gd.shape == d.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("copies", [(1, 3, 5), (3, 19, 40, 69)], ids=["short", "across_lanes"])
def test_ties_route_to_the_first_token(backend, dtype, copies):
    """Duplicated document tokens (small-integer embeddings: every product exact, so the tie is real on any BLAS):
    the max and its gradient go to the lowest token index, as torch.max and therefore upstream's autograd do. Ld=70
    puts the copies in different lanes of the cpu backend's vectorised fp32 argmax and in its tail."""
    g = torch.Generator().manual_seed(5)
    Ld = copies[-1] + 1
    q = torch.randint(-3, 4, (3, 4, 8), generator=g).to(dtype)
    d = torch.randint(-3, 4, (3, 2, Ld, 8), generator=g).to(dtype)
    d[:, :, copies[0]] = 9  # the copies win every max (q has a positive entry in most rows)
    d[:, :, list(copies[1:])] = 9
    d_mask = torch.ones(3, 2, Ld, dtype=torch.bool)
    d_mask[0, 0, copies[0]] = False  # here the second copy is the first valid one
    kw = dict(doc_mask=d_mask, scale=0.1)
    for path in PATHS:
        ours = run(path, q, d, backend=backend, **kw)
        assert_close_all(ours, oracle(q, d, **kw), **({} if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)))
        assert_close_all(ours, upstream(q, d, **kw), rtol=1e-5, atol=1e-6)
        gd = ours[2]
        assert gd[..., list(copies[2:]), :].abs().max() == 0
        assert gd[1:, :, copies[1]].abs().max() == 0 and gd[0, 1, copies[1]].abs().max() == 0
        assert gd[0, 0, copies[1]].abs().max() > 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Ld", [5, 70])
def test_nan_in_a_valid_token_gives_nan(backend, Ld):
    """A NaN inside the masks is the caller's data: the loss is NaN, as upstream's (never silently dropped)."""
    q, d, q_mask, d_mask = make(2, 3, 8, 2, 2, Ld, seed=6, dtype=torch.float32)
    d[1, 1, 0, 2] = float("nan")
    for path in PATHS:
        assert torch.isnan(run(path, q, d, backend=backend, query_mask=q_mask, doc_mask=d_mask)[0])
    assert torch.isnan(upstream(q, d, query_mask=q_mask, doc_mask=d_mask)[0])


LAYOUTS = ("slice", "transposed", "every_other_row", "every_other_col")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_in_masked_positions_and_strided_padding(backend, layout):
    """NaN in every masked token and the inputs as views into NaN-filled buffers: nothing of it reaches the loss or
    a gradient."""
    q, d, q_mask, d_mask = make(3, 5, 10, 4, 2, 7, seed=11)
    q_mask[1] = False
    d_mask[2, 1] = False
    truth = oracle(q, d, query_mask=q_mask, doc_mask=d_mask, offset=1, length_normalize=True)
    q, d = nan_padded(q, layout), nan_padded(d, layout)
    q.masked_fill_(~q_mask.unsqueeze(-1), float("nan"))  # in place: the views stay views of the NaN buffers
    d.masked_fill_(~d_mask.unsqueeze(-1), float("nan"))
    for path in PATHS:
        ours = run(path, q, d, backend=backend, query_mask=q_mask, doc_mask=d_mask, offset=1, length_normalize=True)
        assert all(torch.isfinite(x).all() for x in ours)
        assert_close_all(ours, truth)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masks_as_zero_one_numbers(backend):
    q, d, q_mask, d_mask = make(2, 4, 6, 3, 2, 5, seed=2)
    expected = run("one_pass", q, d, backend=backend, query_mask=q_mask, doc_mask=d_mask)
    for dtype in (torch.int64, torch.float32, torch.uint8):
        got = run("one_pass", q, d, backend=backend, query_mask=q_mask.to(dtype), doc_mask=d_mask.to(dtype))
        assert_close_all(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("budget", [1, 3000])
def test_small_memory_budget_chunks_documents(backend, budget):
    """A budget of one document per chunk (and one of a few documents) gives the same loss and gradients."""
    q, d, q_mask, d_mask = make(3, 4, 8, 5, 3, 6, seed=4)
    kw = dict(query_mask=q_mask, doc_mask=d_mask, offset=2, scale=3.0)
    full = run("one_pass", q, d, backend=backend, **kw)
    for path in PATHS:
        assert_close_all(run(path, q, d, backend=backend, memory_budget=budget, show_progress_bar=True, **kw), full)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length_normalize", [False, True])
@pytest.mark.parametrize("offset", [0, 3])
def test_matches_sentence_transformers(backend, length_normalize, offset):
    """Upstream's loss stage on the same float32 tensors (masks with gaps, an empty document, gathered documents):
    loss and gradients within float32 rounding of the scores."""
    q, d, q_mask, d_mask = make(4, 6, 24, 7, 3, 10, seed=offset + 20, dtype=torch.float32)
    d_mask[5, 2] = False
    kw = dict(query_mask=q_mask, doc_mask=d_mask, scale=2.0, length_normalize=length_normalize, offset=offset)
    theirs = upstream(q, d, **kw)
    for path in PATHS:
        ours = run(path, q, d, backend=backend, **kw)
        assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
        for name, a, b in zip(("loss", "grad_queries", "grad_docs"), ours, theirs):
            scale = b.abs().max().item()
            assert (a - b).abs().max().item() <= 1e-5 * max(scale, 1.0), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_no_worse_than_upstream(backend, dtype):
    """fp32/bf16/fp16 inputs: float32 loss, gradients in the input dtype, errors against the float64 truth (the
    oracle on the same numbers) no worse than upstream's loss stage in that dtype (tests/helpers.py's rule)."""
    runs = {name: ([], [], []) for name in ("loss", "grad_queries", "grad_docs")}
    for seed in (13, 14, 15):
        q, d, q_mask, d_mask = make(4, 8, 64, 5, 2, 12, seed=seed, dtype=dtype)
        kw = dict(query_mask=q_mask, doc_mask=d_mask, scale=1.0, offset=1)
        truth = oracle(q, d, **kw)
        reference = upstream(q, d, **kw)
        for path in PATHS:
            ours = run(path, q, d, backend=backend, **kw)
            assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == dtype
            for name, t, r, o in zip(runs, truth, reference, ours):
                runs[name][0].append(t)
                runs[name][1].append(r)
                runs[name][2].append(o)
    for name, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(name, ours, reference, truth, torch.float32 if name == "loss" else dtype)


# the primitives alone


def brute_force_token_max(q, q_mask, d, d_mask):
    products = torch.einsum("btd,cud->btcu", q.double(), d.double())
    products = products.masked_fill(~d_mask[None, None], float("-inf"))
    values, index = products.max(dim=-1)
    found = q_mask[..., None] & d_mask.any(-1)[None, None]
    return torch.where(found, values, 0), torch.where(found, index, -1).int()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_token_max_alone(backend, dtype):
    q, d, q_mask, d_mask = make(3, 5, 20, 7, 1, 9, seed=8, dtype=dtype)
    q, d, d_mask = q, d.squeeze(1), d_mask.squeeze(1)
    q_mask[0, 2] = False
    d_mask[4] = False
    token_max, _ = primitives(backend)
    values, index = token_max(q.masked_fill(~q_mask[..., None], float("nan")), q_mask,
                              d.masked_fill(~d_mask[..., None], float("nan")), d_mask)
    expected_values, expected_index = brute_force_token_max(q, q_mask, d, d_mask)
    assert values.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert index.dtype == torch.int32 and values.shape == index.shape == (3, 5, 7)
    assert torch.equal(index, expected_index)
    torch.testing.assert_close(values.double(), expected_values, rtol=1e-5 if dtype != torch.float64 else 1e-12,
                               atol=1e-5 if dtype != torch.float64 else 1e-12)
    assert (index[0, 2] == -1).all() and (index[:, :, 4] == -1).all() and (values[0, 2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_token_grad_alone(backend, dtype):
    """The gather/scatter against explicit loops; entries with index -1 carry NaN weights that must not be read."""
    g = torch.Generator().manual_seed(9)
    B, Lq, D, C, Ld = 2, 3, 7, 4, 5
    q = torch.randn(B, Lq, D, generator=g).to(dtype)
    d = torch.randn(C, Ld, D, generator=g).to(dtype)
    index = torch.randint(-1, Ld, (B, Lq, C), generator=g, dtype=torch.int32)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.randn(B, Lq, C, generator=g, dtype=compute).masked_fill(index < 0, float("nan"))
    _, token_grad = primitives(backend)
    grad_q, grad_d = token_grad(weights, index, q, d)
    expected_q = torch.zeros(B, Lq, D, dtype=torch.float64)
    expected_d = torch.zeros(C, Ld, D, dtype=torch.float64)
    for b, t, c in itertools.product(range(B), range(Lq), range(C)):
        u = int(index[b, t, c])
        if u >= 0:
            expected_q[b, t] += float(weights[b, t, c]) * d[c, u].double()
            expected_d[c, u] += float(weights[b, t, c]) * q[b, t].double()
    assert grad_q.dtype == grad_d.dtype == compute
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grad_q.double(), expected_q, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_d.double(), expected_d, rtol=tol, atol=tol)


@pytest.mark.skipif(_backend.EXTENSION is None, reason="the compiled extension is not built")
def test_cpu_token_grad_refuses_out_of_range_index():
    q, d = torch.randn(1, 2, 3), torch.randn(2, 4, 3)
    weights = torch.ones(1, 2, 2)
    with pytest.raises(RuntimeError, match=r"index entries must lie in \[-1, Ld\)"):
        _backend.EXTENSION.maxsim_token_grad_cpu(weights, torch.full((1, 2, 2), 4, dtype=torch.int32), q, d)


# bad inputs


def _bad_inputs():
    q, d, q_mask, d_mask = make(2, 3, 4, 3, 2, 5, seed=1, dtype=torch.float32)
    return [
        ("queries 2-D", dict(queries=q[0]), ValueError, r"queries must be 3-D \[B, Lq, D\]"),
        ("queries not a tensor", dict(queries=q.tolist()), TypeError, "queries must be a torch.Tensor"),
        ("queries int", dict(queries=q.long(), docs=d.long()), ValueError, "queries must be float32"),
        ("docs 3-D", dict(docs=d[0]), ValueError, r"docs must be 4-D \[G, N, Ld, D\]"),
        ("docs dtype", dict(docs=d.double()), ValueError, "docs must have the queries' dtype"),
        ("docs D", dict(docs=d[..., :3]), ValueError, "embedding size D=4"),
        ("docs meta", dict(docs=d.to("meta")), ValueError, "docs must be on a real device"),
        ("offset too big", dict(offset=2), ValueError, "offset \\+ B must be at most G"),
        ("offset negative", dict(offset=-1), ValueError, "offset must be a non-negative int"),
        ("offset float", dict(offset=1.0), ValueError, "offset must be a non-negative int"),
        ("scale zero", dict(scale=0.0), ValueError, "scale must be a finite non-zero number"),
        ("scale nan", dict(scale=float("nan")), ValueError, "scale must be a finite non-zero number"),
        ("length_normalize", dict(length_normalize=1), ValueError, "length_normalize must be a bool"),
        ("query_mask shape", dict(query_mask=q_mask[:, :2]), ValueError, r"query_mask must have shape \[B, Lq\]"),
        ("doc_mask shape", dict(doc_mask=d_mask[0]), ValueError, r"doc_mask must have shape \[G, N, Ld\]"),
        ("doc_mask values", dict(doc_mask=d_mask.float() * 2), ValueError, "doc_mask must be bool or hold only 0"),
        ("query_mask list", dict(query_mask=q_mask.tolist()), TypeError, "query_mask must be a torch.Tensor"),
        ("empty queries", dict(queries=q[:0], offset=0), ValueError, "must have B, Lq and D >= 1"),
        ("no documents per group", dict(docs=d[:, :0]), ValueError, "N >= 1"),
        ("backend", dict(backend="cuda"), RuntimeError, "backend 'cuda' is not implemented"),
        ("backend name", dict(backend="gpu"), ValueError, "backend must be one of"),
        ("budget", dict(memory_budget="lots"), ValueError, "memory_budget must be"),
    ], (q, d, q_mask, d_mask)


BAD, BASE = _bad_inputs()


@pytest.mark.parametrize("function", [maxsim_contrastive_loss, maxsim_contrastive_loss_and_grad])
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_name_the_argument(function, case):
    _, change, error, match = case
    q, d, q_mask, d_mask = BASE
    kw = dict(queries=q, docs=d, query_mask=q_mask, doc_mask=d_mask, offset=1)
    kw.update(change)
    with pytest.raises(error, match=match):
        function(kw.pop("queries"), kw.pop("docs"), **kw)


def test_double_backward_is_refused():
    q, d, _, _ = make(2, 3, 4, 2, 1, 3, seed=0)
    q.requires_grad_()
    loss = maxsim_contrastive_loss(q, d)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, q, create_graph=True)


# the triton backend through the interpreter (tiny shapes)

TRITON_CASES = [  # B, Lq, D, G, N, Ld, offset, options
    (1, 1, 4, 1, 1, 1, 0, dict()),
    (2, 3, 20, 3, 2, 5, 1, dict(scale=5.0, length_normalize=True)),
    (3, 4, 9, 3, 3, 7, 0, dict(scale=0.5)),
]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", TRITON_CASES, ids=str)
@pytest.mark.skipif(TRITON is not None, reason=f"triton backend: {TRITON}")
@INTERPRETER_ONLY[0]
@INTERPRETER_ONLY[1]
def test_triton_interpreter_matches_oracle(path, case):
    """float32 inputs with masks (an empty document, an all-masked query row, NaN in every masked token) against the
    float64 oracle on the same numbers."""
    *sizes, offset, options = case
    q, d, q_mask, d_mask = make(*sizes, seed=sum(sizes), dtype=torch.float32)
    if sizes[3] * sizes[4] > 2:
        d_mask[-1, -1] = False
        q_mask[-1] = sizes[0] == 1
    kw = dict(query_mask=q_mask, doc_mask=d_mask, offset=offset, **options)
    truth = oracle(q, d, **kw)
    q = q.masked_fill(~q_mask.unsqueeze(-1), float("nan"))
    d = d.masked_fill(~d_mask.unsqueeze(-1), float("nan"))
    ours = run(path, q, d, backend="triton", **kw)
    assert ours[0].dtype == torch.float32 and ours[2].dtype == torch.float32
    for name, a, b in zip(("loss", "grad_queries", "grad_docs"), ours, truth):
        assert (a.double() - b).abs().max().item() <= 1e-5 * max(b.abs().max().item(), 1.0), name
