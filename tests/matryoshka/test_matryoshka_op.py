"""fastcache.ops.matryoshka (the contrastive loss at several dims in one sweep over D) against the dense reference
(fastcache/reference.py: the contrastive reference once per dim) and against the single-dim op run dim by dim.

Both CPU backends ("cpu": the fused C++ Matryoshka epilogue, every dim in one call per chunk; "torch": the
contrastive epilogue dim by dim; "triton" through its interpreter on a few cases), both op paths (autograd,
loss_and_grad): float64 with tight
tolerances for every option that changes the maths, dims that divide nothing (D=19 with 19/7/3, D=1000 with
1000/384/100/37), weights, low-precision dtypes against the reference's own error, strided NaN-padded inputs,
prefixes of norm zero, and every bad-input error; the fused kernel's row groups, thread-count independence and
argument checks.
"""

from __future__ import annotations

import os

import pytest
import torch

from fastcache import _backend, contrastive_loss_and_grad
from fastcache.ops.contrastive.options import ContrastiveLayout, ContrastiveOptions, kernel_params
from fastcache.ops.matryoshka import matryoshka_contrastive_loss
from helpers import (
    MATRYOSHKA_OP_PATHS as PATHS,
    assert_matches,
    assert_no_worse_than_reference,
    emulate_low_precision_gemms,
    cast,
    make_batch,
    nan_padded,
    relative_error,
)
from helpers import matryoshka_op_autograd as op_autograd
from helpers import matryoshka_op_loss_and_grad as op_loss_and_grad
from helpers import matryoshka_reference_loss_and_grads as reference

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)


@pytest.fixture
def extension():
    """The compiled extension fastcache._C (skips without it)."""
    if _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")
    return _backend.EXTENSION


@pytest.fixture(params=("cpu", "torch"))
def backend(request):
    if request.param == "cpu":
        request.getfixturevalue("extension")
    return request.param


def check(batch, **options):
    """Both paths against the reference, float64."""
    expected = reference(batch, **options)
    for path in PATHS.values():
        assert_matches(path(batch, **options), expected)


# every option that changes the maths, on dims that are multiples of nothing
VARIANTS = {
    "plain": {},
    "dot": dict(similarity="dot", scale=2.0),
    "all_dirs_joint": dict(directions=ALL),
    "qd_dq_per_direction": dict(directions=(QD, DQ), partition_mode="per_direction"),
    "qd_qq": dict(directions=(QD, QQ)),
    "qd_dd_dot": dict(directions=(QD, DD), similarity="dot", scale=1.0),
    "in_batch_hardness": dict(hardness_mode="in_batch_negatives", hardness_strength=5.0),
    "hard_negatives_all_dirs": dict(directions=ALL, hardness_mode="hard_negatives", hardness_strength=2.0),
    "all_negatives_per_direction": dict(directions=(QD, DQ), partition_mode="per_direction",
                                        hardness_mode="all_negatives", hardness_strength=3.0),
    "scale_50": dict(scale=50.0),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_options_match_reference(backend, variant):
    batch = make_batch(7, 19, columns=3, seed=1)
    check(batch, dims=[19, 7, 3], weights=[1.0, 0.5, 2.0], backend=backend, chunk_size=3, **VARIANTS[variant])


DIM_SETS = [
    ((19,), None),  # one dim: the plain contrastive loss (truncation to the full width)
    ((19, 7, 3), None),
    ((3, 19, 11), [2.0, 1.0, 0.25]),  # any order; weights follow their dims
    ((17, 1), [1.0, -0.5]),  # a one-dim prefix; not the full width
    ((12, 6, 5, 4, 2), [1, 0, 3, 1, 1]),  # ints, a zero weight
]


@pytest.mark.parametrize(("dims", "weights"), DIM_SETS, ids=[str(d) for d, _ in DIM_SETS])
def test_dims_and_weights(backend, dims, weights):
    batch = make_batch(5, 19, columns=2, seed=2)
    check(batch, dims=list(dims), weights=weights, backend=backend, chunk_size=2)


def test_large_odd_dims(backend):
    """D = 1000 with 1000/384/100/37 (no block size divides them), B = 1."""
    batch = make_batch(1, 1000, columns=3, positives=2, seed=3, noise=6.0)
    check(batch, dims=[1000, 384, 100, 37], scale=30.0, directions=(QD, DQ), backend=backend)


FUSED_VARIANTS = {k: VARIANTS[k] for k in ("plain", "dot", "all_dirs_joint", "qd_dq_per_direction",
                                           "hard_negatives_all_dirs")}


@pytest.mark.parametrize("variant", list(FUSED_VARIANTS))
def test_fused_cpu_epilogue_row_groups(extension, variant):
    """The C++ Matryoshka epilogue splits a chunk's rows into groups (16 rows each, at most 64) whose column radial
    sums are added at the end: 70 rows in one chunk make 4 uneven groups, 146 candidate columns leave a tail of
    the 16-lane loops, and a second chunk of 3 rows is one group."""
    batch = make_batch(73, 21, columns=2, seed=16)
    check(batch, dims=[21, 13, 6], weights=[1.0, 0.5, 2.0], backend="cpu", chunk_size=70, **FUSED_VARIANTS[variant])


def _kernel_params(c):
    """The default options' kernel parameters for one query_to_doc chunk of c rows, c positives (rows 0..)."""
    return kernel_params(ContrastiveOptions(), ContrastiveLayout(c, c, 1, 1, c, 0), 1)


def _fused_arguments(c=40, n=50, K=3, seed=17):
    """Arguments of the C++ Matryoshka epilogue for one query_to_doc chunk of c rows against n candidates."""
    g = torch.Generator().manual_seed(seed)
    segments = torch.randn(K, c, n, generator=g) * 0.1
    row_scales, column_scales = torch.rand(K, c, generator=g) + 0.5, torch.rand(K, n, generator=g) + 0.5
    return ([segments], [0], [], None, [row_scales], [column_scales], [1.0, 0.5, 0.25], _kernel_params(c))


def test_fused_cpu_epilogue_does_not_depend_on_the_thread_count(extension):
    """Row groups are set by the chunk alone and summed in group order: bitwise equal on 1 and 2 threads."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            arguments = _fused_arguments()
            loss, row_radial, column_radial = extension.matryoshka_epilogue_cpu(*arguments)
            results.append((loss, row_radial[0], column_radial[0], arguments[0][0]))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: a.__setitem__(0, [a[0][0][:, :, ::2]]), "contiguous rows"),
    (lambda a: a.__setitem__(0, [a[0][0][:2]]), r"segments\[0\] must be \[3, 40, columns\]"),
    (lambda a: a.__setitem__(0, [a[0][0].double()]), "row_scales must have dtype Double"),
    (lambda a: a.__setitem__(1, [1]), "first direction must be query_to_doc"),
    (lambda a: a.__setitem__(5, [a[5][0][:, :7]]), r"column_scales must have shape \[3, 50\]"),
    (lambda a: a.__setitem__(4, []), "row_scales and column_scales"),
    (lambda a: a.__setitem__(6, []), "weights: one per dim"),
    (lambda a: a.__setitem__(7, a[7]._replace(offset=30)), "with offset 30 exceed the 40 positives"),
], ids=["strided", "segments", "dtype", "kind", "column_scales", "scales", "weights", "offset"])
def test_fused_cpu_epilogue_bad_input(extension, change, match):
    arguments = list(_fused_arguments())
    change(arguments)
    with pytest.raises(RuntimeError, match=match):
        extension.matryoshka_epilogue_cpu(*arguments)


def _chunk_arguments(c=40, n=50, dim=12, dims=(12, 7, 3), seed=21):
    """Arguments of the C++ Matryoshka chunk (GEMMs, epilogue, backward GEMMs) for one cosine query_to_doc chunk."""
    g = torch.Generator().manual_seed(seed)
    K = len(dims)
    x, y = torch.randn(c, dim, generator=g), torch.randn(n, dim, generator=g)
    row_scales, column_scales = torch.rand(K, c, generator=g) + 0.5, torch.rand(K, n, generator=g) + 0.5
    return ([torch.empty(K, c, n)], [0], [], None, [row_scales], [column_scales], [1.0, 0.5, 0.25], list(dims), [x],
            [y], [torch.zeros(c, dim)], [torch.zeros(dim, n)], [torch.zeros(K, c)], [torch.zeros(K, n)],
            _kernel_params(c))


@pytest.mark.parametrize("threads", [1, 2, 8])
@pytest.mark.parametrize("rows", [70, 1100], ids=["4_groups", "64_groups"])
def test_fused_cpu_chunk_is_the_epilogue_between_segment_gemms(extension, threads, rows):
    """matryoshka_chunk_cpu = the segment GEMMs, matryoshka_epilogue_cpu, then dX[:, S_k] += A_k·Y[:, S_k] and
    dYᵀ[S_k] += X[:, S_k]ᵀ·A_k, with the radial sums added to what the targets held (here: ones). 70 rows make 4
    uneven row groups, 1100 the most groups (64, of 17-18 rows); 13 more columns than rows leave a 16-lane tail."""
    a = _chunk_arguments(c=rows, n=rows + 13, dim=13, dims=(13, 8, 2))
    segments, dims, (x,), (y,) = a[0][0], a[7], a[8], a[9]
    targets = [t[0].fill_(1.0) for t in a[10:14]]
    bounds = list(zip(dims[1:] + [0], dims))
    expected_segments = torch.stack([x[:, lo:hi] @ y[:, lo:hi].T for lo, hi in bounds])
    loss, (row_radial,), (column_radial,) = extension.matryoshka_epilogue_cpu(
        [expected_segments], *a[1:7], *a[14:])
    grad_x, grad_y_t = torch.ones_like(x), torch.ones(x.size(1), y.size(0))
    for k, (lo, hi) in enumerate(bounds):
        grad_x[:, lo:hi] += expected_segments[k] @ y[:, lo:hi]
        grad_y_t[lo:hi] += x[:, lo:hi].T @ expected_segments[k]
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        total = extension.matryoshka_chunk_cpu(*a)
    finally:
        torch.set_num_threads(previous)
    assert total == pytest.approx(loss.double().sum().item(), rel=1e-6)
    for actual, wanted in zip([segments, *targets], [expected_segments, grad_x, grad_y_t, row_radial + 1,
                                                      column_radial + 1]):
        # GEMM sums, blocked by thread count and SIMD width: compared against each tensor's scale
        assert actual.shape == wanted.shape and relative_error(actual, wanted) <= 1e-5, relative_error(actual, wanted)


@pytest.mark.parametrize(("change", "match"), [
    (lambda a: a.__setitem__(7, [12, 3, 7]), "dims must descend"),
    (lambda a: a.__setitem__(7, [13, 7, 3]), "at most the operands' 12 columns"),
    (lambda a: a.__setitem__(7, [12, 7]), "dims: one per weight"),
    (lambda a: a.__setitem__(9, [a[9][0][:49]]), r"column_operands must have shape \[50, 12\]"),
    (lambda a: a.__setitem__(8, [a[8][0].double()]), "row_operands must have dtype Float"),
    (lambda a: a.__setitem__(10, []), "row_grads and column_grads_t: one per direction"),
    (lambda a: a.__setitem__(11, [a[11][0].T.contiguous().T]), "column_grads_t must be contiguous"),
    (lambda a: a.__setitem__(12, [a[12][0][:, :39]]), r"row radial sums must have shape \[3, 40\]"),
    (lambda a: a.__setitem__(13, []), "column_radial: one per direction"),
], ids=["order", "too_large", "count", "operand_shape", "operand_dtype", "grads", "strided_grad", "row_radial",
        "column_radial"])
def test_fused_cpu_chunk_bad_input(extension, change, match):
    """The chunk's own arguments (dims, operands, gradient and radial targets) are checked before any work."""
    arguments = list(_chunk_arguments())
    change(arguments)
    with pytest.raises(RuntimeError, match=match):
        extension.matryoshka_chunk_cpu(*arguments)


def test_cpu_backend_runs_the_fused_epilogue(extension, monkeypatch):
    """backend="cpu" makes one fused C++ call per chunk (every dim at once); "torch" makes none."""
    calls = []
    fused = extension.matryoshka_chunk_cpu
    monkeypatch.setattr(extension, "matryoshka_chunk_cpu", lambda *a: calls.append(1) or fused(*a))
    batch = make_batch(5, 9, columns=2, seed=18)
    expected = op_loss_and_grad(batch, dims=[9, 5, 2], backend="torch", chunk_size=2)
    assert not calls
    actual = op_loss_and_grad(batch, dims=[9, 5, 2], backend="cpu", chunk_size=2)
    assert len(calls) == 3
    assert_matches(actual, expected)


@pytest.mark.parametrize(("block_bytes", "rows_per_thread"), [(None, 10), (1, None)], ids=["cap", "floor"])
def test_fused_chunk_keeps_the_segment_blocks_in_cache(extension, monkeypatch, block_bytes, rows_per_thread):
    """Without chunk_size, the fused path caps a chunk's K segment blocks at FUSED_BLOCK_BYTES per thread, and takes
    at least MIN_FUSED_ROWS rows: more chunks than the budget alone makes, the same result."""
    from fastcache.ops.matryoshka import slab as matryoshka

    batch = make_batch(100, 9, columns=2, seed=19)
    expected = op_loss_and_grad(batch, dims=[9, 5, 2], backend="cpu", chunk_size=100)
    row_bytes = 3 * 200 * 8  # 3 dims' blocks of 200 float64 candidate columns
    monkeypatch.setattr(matryoshka, "FUSED_BLOCK_BYTES", block_bytes or rows_per_thread * row_bytes)
    monkeypatch.setattr(matryoshka, "MIN_FUSED_ROWS", 7)
    rows = 7 if rows_per_thread is None else rows_per_thread * torch.get_num_threads()
    calls = []
    fused = extension.matryoshka_chunk_cpu
    monkeypatch.setattr(extension, "matryoshka_chunk_cpu", lambda *a: calls.append(a[0][0].size(1)) or fused(*a))
    actual = op_loss_and_grad(batch, dims=[9, 5, 2], backend="cpu")
    assert calls == [min(rows, 100 - r0) for r0 in range(0, 100, rows)]
    assert_matches(actual, expected)


def test_loss_without_gradients(backend):
    """Inputs that need no gradient: the forward-only epilogue gives the same loss."""
    batch = make_batch(6, 12, columns=2, seed=19)
    options = dict(dims=[12, 5], directions=(QD, QQ), backend=backend, chunk_size=4)
    loss = matryoshka_contrastive_loss(batch["queries"], batch["docs"], **options)
    assert not loss.requires_grad
    assert_matches((loss, {}), (reference(batch, **options)[0], {}))


@pytest.mark.parametrize("directions", [(QD,), ALL, (QD, QQ, DQ)], ids=["qd", "all", "qd+qq+dq"])
def test_gathered_offset(backend, directions):
    batch = make_batch(3, 11, columns=2, positives=8, offset=4, gathered=True, docs_3d=True, seed=4)
    check(batch, dims=[11, 6, 2], offset=4, directions=directions, backend=backend, chunk_size=2)


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
@pytest.mark.parametrize("directions", [(QD,), (QD, QQ, DD)], ids=["qd", "qd+qq+dd"])
def test_guide_is_not_truncated(backend, margin_strategy, directions):
    """GIST: the guide's full embeddings mask candidates at every dim."""
    batch = make_batch(4, 13, columns=2, positives=6, offset=2, docs_3d=True, guide_dim=5, seed=5)
    check(batch, dims=[13, 9, 4], offset=2, directions=directions, margin=0.05, margin_strategy=margin_strategy,
          backend=backend, chunk_size=3)


def test_doc_ids_mask_duplicates(backend):
    batch = make_batch(5, 10, columns=2, seed=6)
    doc_ids = torch.arange(10)
    doc_ids[7] = doc_ids[1]  # a hard negative duplicates row 1's positive
    check(dict(batch, doc_ids=doc_ids), dims=[10, 4], directions=(QD, DD), backend=backend, chunk_size=2)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 50, None])
def test_chunk_size_does_not_change_the_result(backend, chunk_size):
    batch = make_batch(5, 9, columns=2, seed=7)
    expected = op_loss_and_grad(batch, dims=[9, 5, 2], directions=ALL, backend=backend, chunk_size=5)
    actual = op_loss_and_grad(batch, dims=[9, 5, 2], directions=ALL, backend=backend, chunk_size=chunk_size)
    assert_matches(actual, expected, rtol=1e-12, atol=1e-12)


def test_zero_prefix_norm(backend):
    """A row whose first dims are all zero: F.normalize divides by eps there, the gradient stays finite."""
    batch = make_batch(4, 8, columns=2, seed=8)
    batch["queries"][1, :3] = 0.0
    batch["docs"][5, :3] = 0.0
    check(batch, dims=[8, 3], backend=backend, chunk_size=3)


def test_equals_the_single_dim_op_dim_by_dim(backend):
    """The definition: Σ_k w_k · contrastive_loss(truncated to d_k), float32, gradients summed over the dims."""
    batch = make_batch(6, 24, columns=2, dtype=torch.float32, seed=9)
    dims, weights = [24, 12, 5], [1.0, 0.5, 0.25]
    options = dict(directions=(QD, DQ), hardness_mode="all_negatives", hardness_strength=1.0, backend=backend)
    loss = torch.zeros(())
    grads = {k: torch.zeros_like(batch[k]) for k in ("queries", "docs")}
    for d, w in zip(dims, weights):
        out = contrastive_loss_and_grad(batch["queries"][:, :d], batch["docs"][:, :d], **options)
        loss += w * out.loss
        grads["queries"][:, :d] += w * out.grad_queries
        grads["docs"][:, :d] += w * out.grad_docs
    actual = op_loss_and_grad(batch, dims=dims, weights=weights, chunk_size=4, **options)
    assert_matches(actual, (loss, grads), rtol=1e-5, atol=1e-6)


LOW_PRECISION_CASES = {
    "plain": (dict(rows=6, dim=32, columns=2), dict(dims=[32, 17, 5])),
    "all_dirs_hardness": (dict(rows=6, dim=32, columns=2),
                          dict(dims=[32, 16, 8], weights=[1.0, 0.5, 0.5], directions=ALL,
                               hardness_mode="all_negatives", hardness_strength=2.0)),
    "gathered_dot": (dict(rows=4, dim=24, columns=2, positives=8, offset=4, gathered=True, norm=0.3),
                     dict(dims=[24, 7], offset=4, directions=(QD, QQ, DQ), similarity="dot", scale=5.0)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_reference(backend, dtype, case):
    shape, options = LOW_PRECISION_CASES[case]
    runs = {}
    for path in PATHS.values():
        for seed in (13, 14, 15):
            batch = make_batch(**shape, dtype=dtype, seed=seed)
            outputs = [reference(cast(batch, torch.float64), **options), reference(batch, **options),
                       path(batch, backend=backend, chunk_size=4, **options)]
            loss, grads = outputs[2]
            assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads.values())
            for k in ["loss", *grads]:
                values = [o[0] if k == "loss" else o[1][k] for o in outputs]
                for lst, value in zip(runs.setdefault(k, ([], [], [])), values):
                    lst.append(value)
    for k, (truth, ref, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, ref, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_gemms_no_worse_than_reference(monkeypatch, dtype, case):
    """The per-dim slab with its GEMMs in the inputs' dtype, as bf16/fp16 CUDA inputs get it, run on CPU with those
    GEMMs emulated (tests/helpers.py emulate_low_precision_gemms): embeddings kept in their dtype, prefix norms and
    their backward in chunks of rows, segment gradient totals rounded for the backward GEMMs."""
    import fastcache.ops.matryoshka.slab as op

    low_operands = emulate_low_precision_gemms(monkeypatch, op, dtype)
    shape, options = LOW_PRECISION_CASES[case]
    runs = {}
    for seed in (13, 14, 15):
        batch = make_batch(**shape, dtype=dtype, seed=seed)
        outputs = [reference(cast(batch, torch.float64), **options), reference(batch, **options),
                   PATHS["loss_and_grad"](batch, backend="torch", chunk_size=4, **options)]
        assert all(g.dtype == dtype for g in outputs[2][1].values())
        for k in ["loss", *outputs[2][1]]:
            values = [o[0] if k == "loss" else o[1][k] for o in outputs]
            for lst, value in zip(runs.setdefault(k, ([], [], [])), values):
                lst.append(value)
    assert low_operands and all(low_operands)
    for k, (truth, ref, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, ref, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("layout", ["slice", "transposed", "every_other_col"])
def test_strided_nan_padded_inputs(backend, layout):
    batch = make_batch(3, 7, columns=2, positives=6, offset=2, gathered=True, seed=10)
    options = dict(dims=[7, 4, 1], offset=2, directions=ALL, backend=backend, chunk_size=2)
    expected = op_loss_and_grad(batch, **options)
    strided = {k: nan_padded(v, layout) for k, v in batch.items()}
    assert_matches(op_loss_and_grad(strided, **options), expected, rtol=1e-12, atol=1e-12)


BAD = [
    (dict(dims=[]), "dims must be a non-empty"),
    (dict(dims=8), "dims must be a non-empty"),
    (dict(dims=[8, 0]), "positive ints"),
    (dict(dims=[8, -2]), "positive ints"),
    (dict(dims=[8, 4.0]), "positive ints"),
    (dict(dims=[8, True]), "positive ints"),
    (dict(dims=[9, 4]), "9 exceeds the embeddings' 8 dimensions"),
    (dict(dims=[8, 4, 4]), "must not repeat"),
    (dict(dims=[8, 4], weights=[1.0]), "weights must be a sequence of 2"),
    (dict(dims=[8, 4], weights=[1.0, float("nan")]), "finite"),
    (dict(dims=[8, 4], chunk_size=0), "chunk_size"),
    (dict(dims=[8, 4], scale=0.0), "scale"),
]


@pytest.mark.parametrize(("kwargs", "match"), BAD, ids=[m for _, m in BAD])
def test_bad_input(kwargs, match):
    batch = make_batch(3, 8, columns=2, dtype=torch.float32)
    with pytest.raises(ValueError, match=match):
        op_loss_and_grad(batch, **kwargs)
    with pytest.raises(ValueError, match=match):
        op_autograd(batch, **kwargs)


def test_missing_dims_is_a_type_error():
    batch = make_batch(3, 8, columns=2, dtype=torch.float32)
    with pytest.raises(TypeError, match="dims"):
        matryoshka_contrastive_loss(batch["queries"], batch["docs"])


def test_memory_budget_sets_the_chunk(backend):
    """The budget counts a block per dim: a tiny one leaves one row per chunk (with the slow-chunk warning) and
    the same result."""
    batch = make_batch(5, 9, columns=2, seed=11)
    expected = op_loss_and_grad(batch, dims=[9, 5, 2], backend=backend, chunk_size=5)
    with pytest.warns(RuntimeWarning, match="row"):
        actual = op_loss_and_grad(batch, dims=[9, 5, 2], backend=backend, memory_budget=1)
    assert_matches(actual, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant", ["plain", "all_dirs_joint", "qd_dq_per_direction", "in_batch_hardness"])
@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
def test_triton_epilogue_in_the_interpreter(variant):
    """The op drives whatever epilogue the backend names: Triton's, on CPU tensors under TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)")
    batch = make_batch(5, 9, columns=2, seed=12)
    check(batch, dims=[9, 5, 2], weights=[1.0, 0.5, 2.0], backend="triton", chunk_size=3, **VARIANTS[variant])


def test_bench_floor_quick(extension, tmp_path):
    """bench/matryoshka_table.py --floor runs end to end at its smoke shape (no timing claims): both ops part by
    part, at the chunk heights the ops choose (the fused one from slab_rows)."""
    from fastcache.ops.contrastive import ContrastiveOptions, check_inputs
    from fastcache.ops.matryoshka.slab import slab_rows
    from helpers import run_bench_script

    stdout, report = run_bench_script("matryoshka_table.py", tmp_path / "floor.json", "--floor", "--threads", "1")
    assert "| fused ÷ single |" in stdout
    floor = report["floor"]
    assert set(floor["ops"]) == {"fused", "single"}
    assert all(t > 0 for times in floor["ops"].values() for t in times.values())
    queries, docs = torch.zeros(256, 64), torch.zeros(512, 64)  # the smoke shape: B=256, N=512, D=64, 5 dims
    layout = check_inputs(queries, docs, None, None, None, ContrastiveOptions())
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        expected = slab_rows(layout, ContrastiveOptions(), False, 0, 5, "cpu", queries)
    finally:
        torch.set_num_threads(threads)
    assert floor["chunk_rows"]["fused"] == expected


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_slab_chunks_capped_for_the_cache_on_cpu_only(backend):
    """On CPU the slab's blocks stay under the cache cap (MAX_SLAB_BYTES); on a GPU (here a meta tensor: any
    non-CPU device) the chunk is the tallest the memory budget allows (the whole batch at 64 GiB)."""
    from fastcache.ops.contrastive import ContrastiveOptions, check_inputs
    from fastcache.ops.matryoshka.slab import slab_rows

    queries, docs = torch.zeros(4096, 64), torch.zeros(131072, 64)
    layout = check_inputs(queries, docs, None, None, None, ContrastiveOptions())
    on_cpu = slab_rows(layout, ContrastiveOptions(), False, 0, 5, backend, queries, memory_budget="64GiB")
    on_gpu = slab_rows(layout, ContrastiveOptions(), False, 0, 5, backend, queries.to("meta"), memory_budget="64GiB")
    assert on_cpu < 4096 and on_gpu == 4096
