"""The contrastive op's strategy "sparse" (fastcache/ops/contrastive/sparse.py: the slab with products over the
non-zero entries, C++ csrc/cpu/sparse.cpp) against the dense reference, on embeddings with most entries zero:
every option and layout, odd shapes, zero rows, strided NaN-padded views, the low-precision dtypes against the
reference's own error, determinism, auto's choice, the primitives, and the errors it gives.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from fastcache import _backend, contrastive_loss_and_grad
from fastcache.ops.contrastive import op as contrastive_op
from fastcache.ops.contrastive import sparse
from fastcache.ops.contrastive.epilogue import available
from fastcache.ops.matryoshka import matryoshka_contrastive_loss_and_grad
from helpers import (
    OP_PATHS,
    assert_matches,
    assert_no_worse_than_reference,
    cast,
    make_batch,
    nan_padded,
    reference_loss_and_grads,
)

pytestmark = pytest.mark.skipif(_backend.EXTENSION is None, reason="the sparse strategy runs the compiled extension")

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTION_SETS = [(QD,), (QD, DQ), (QD, QQ), (QD, DD), (QD, QQ, DQ, DD)]
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")


def sparsified(batch: dict, density: float = 0.3, seed: int = 0, offset: int = 0, zero_rows: bool = True) -> dict:
    """``batch`` with all but about ``density`` of the query and document entries set to zero (the guide stays
    dense: another model), queries still rows offset.. of all_queries; with ``zero_rows``, the last query column
    and the first document all zero (an empty SPLADE vector)."""
    g = torch.Generator().manual_seed(seed)

    def keep(t):
        return t * (torch.rand(t.shape, generator=g) < density).to(t.dtype)

    out = dict(batch)
    rows = batch["queries"].size(0)
    if "all_queries" in batch:
        out["all_queries"] = keep(batch["all_queries"])
        if zero_rows:
            out["all_queries"][-1] = 0
        out["queries"] = out["all_queries"][offset:offset + rows].clone()
    else:
        out["queries"] = keep(batch["queries"])
        if zero_rows:
            out["queries"][-1] = 0
    out["docs"] = keep(batch["docs"])
    if zero_rows:
        out["docs"].view(-1, out["docs"].size(-1))[0] = 0
    return out


def check_both_paths(batch, **options):
    expected = reference_loss_and_grads(batch, **options)
    for path in OP_PATHS.values():
        assert_matches(path(batch, strategy="sparse", **options), expected)


VARIANTS = [(dirs, part, hard, sim) for dirs, part, hard, sim in itertools.product(
    DIRECTION_SETS, ("joint", "per_direction"), HARDNESS_MODES, ("cos", "dot"))
    if part == "joint" or not {QQ, DD} & set(dirs)]


@pytest.mark.parametrize("directions,partition_mode,hardness_mode,similarity", VARIANTS,
                         ids=["+".join(d[0] for d in v[0]) + f"-{v[1]}-{v[2]}-{v[3]}" for v in VARIANTS])
def test_variants_match_reference(directions, partition_mode, hardness_mode, similarity):
    batch = sparsified(make_batch(5, 40, columns=3, seed=1), seed=1)
    check_both_paths(batch, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                     hardness_strength=1.5, similarity=similarity, scale=7.0, chunk_size=2)


@pytest.mark.parametrize("rows,dim,columns,chunk_size", [(1, 1, 1, None), (1, 384, 2, None), (2, 1000, 2, 1),
                                                         (7, 3, 2, 3), (9, 77, 3, 4), (33, 129, 1, None)])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
def test_shapes(rows, dim, columns, chunk_size, similarity):
    batch = sparsified(make_batch(rows, dim, columns=columns, seed=rows + dim), density=0.2, seed=dim,
                       zero_rows=rows > 1)
    check_both_paths(batch, similarity=similarity, chunk_size=chunk_size, directions=(QD, DD))


@pytest.mark.parametrize("docs_3d", [False, True], ids=["docs2d", "docs3d"])
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=lambda d: "+".join(x[0] for x in d))
def test_gathered_offset_with_all_queries(docs_3d, directions):
    batch = make_batch(3, 24, columns=2, positives=8, offset=5, gathered=True, docs_3d=docs_3d, seed=3)
    check_both_paths(sparsified(batch, seed=3, offset=5), directions=directions, offset=5, chunk_size=2)


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
@pytest.mark.parametrize("margin", [0.0, 0.1])
def test_guide(margin_strategy, margin):
    batch = make_batch(3, 24, columns=2, positives=7, offset=2, docs_3d=True, guide_dim=5, seed=8)
    check_both_paths(sparsified(batch, seed=8, offset=2, zero_rows=False), margin=margin,
                     margin_strategy=margin_strategy, directions=(QD, QQ, DD), offset=2, chunk_size=2)


def test_doc_ids():
    batch = sparsified(make_batch(4, 30, columns=2, seed=5), seed=5)
    ids = torch.tensor([0, 1, 2, 3, 1, 9, 2, 8])
    check_both_paths(dict(batch, doc_ids=ids), directions=(QD, DD), chunk_size=3)


@pytest.mark.parametrize("layout", ["slice", "transposed", "every_other_row", "every_other_col"])
def test_strided_nan_padded_inputs(layout):
    batch = sparsified(make_batch(5, 33, columns=2, seed=6), seed=6)
    padded = dict(batch, queries=nan_padded(batch["queries"], layout), docs=nan_padded(batch["docs"], layout))
    expected = reference_loss_and_grads(batch, similarity="dot", scale=3.0)
    assert_matches(OP_PATHS["loss_and_grad"](padded, strategy="sparse", similarity="dot", scale=3.0), expected)


def test_splade_shape_fp32():
    """A SPLADE-like batch (non-negative, a few non-zeros in a wide vocabulary, dot, scale 1) in fp32 against the
    float64 reference, errors measured against the gradients' own scale."""
    g = torch.Generator().manual_seed(0)
    q = torch.relu(torch.randn(16, 3000, generator=g)) * (torch.rand(16, 3000, generator=g) < 0.01)
    d = torch.relu(torch.randn(32, 3000, generator=g)) * (torch.rand(32, 3000, generator=g) < 0.03)
    truth, truth_grads = reference_loss_and_grads({"queries": q.double(), "docs": d.double()}, similarity="dot",
                                                  scale=1.0)
    out = contrastive_loss_and_grad(q, d, similarity="dot", scale=1.0, strategy="sparse")
    assert abs(out.loss.item() - truth.item()) <= 1e-6 * max(1.0, truth.abs().item())
    for ours, exact in ((out.grad_queries, truth_grads["queries"]), (out.grad_docs, truth_grads["docs"])):
        assert ours.dtype == torch.float32
        assert (ours.double() - exact).abs().max() <= 1e-6 * exact.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("options", [dict(), dict(similarity="dot", scale=2.0, directions=(QD, DQ))],
                         ids=["cos", "dot"])
def test_low_precision_no_worse_than_reference(dtype, options):
    """Gradients in the inputs' dtype, a float32 loss, errors no worse than the reference's own in that dtype
    (against float64; tests/helpers.py assert_no_worse_than_reference)."""
    runs = {}
    for seed in (13, 14, 15):
        # no zero rows: the fp16 reference normalises them to NaN (F.normalize's eps underflows)
        exact = sparsified(make_batch(6, 48, columns=2, seed=seed), seed=seed, zero_rows=False)
        batch = cast(exact, dtype)
        truth, ref = reference_loss_and_grads(cast(batch, torch.float64), **options), \
            reference_loss_and_grads(batch, **options)
        loss, grads = OP_PATHS["loss_and_grad"](batch, strategy="sparse", **options)
        assert loss.dtype == torch.float32
        for k, grad in grads.items():
            assert grad.dtype == dtype and grad.shape == batch[k].shape
        for k, triple in [("loss", (truth[0], ref[0], loss))] + [(k, (truth[1][k], ref[1][k], grads[k]))
                                                                 for k in grads]:
            runs.setdefault(k, []).append(triple)
    for k, triples in runs.items():
        assert_no_worse_than_reference(k, [t[2] for t in triples], [t[1] for t in triples], [t[0] for t in triples],
                                       torch.float32 if k == "loss" else dtype)


def test_deterministic_across_thread_counts():
    batch = sparsified(make_batch(12, 200, columns=2, dtype=torch.float32, seed=4), density=0.1, seed=4)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(OP_PATHS["loss_and_grad"](batch, strategy="sparse", directions=(QD, QQ, DQ)))
    finally:
        torch.set_num_threads(threads)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)


def test_nan_input_is_an_error():
    batch = sparsified(make_batch(4, 20, seed=2), seed=2)
    batch["docs"][2, 3] = float("nan")
    with pytest.raises(ValueError, match="docs contains NaN or Inf"):
        OP_PATHS["loss_and_grad"](batch, strategy="sparse")


def test_auto_picks_sparse_for_sparse_inputs(monkeypatch):
    """auto on CPU: the sparse products for SPLADE-like inputs, the slab for dense ones or with filter_eps; the
    same results either way."""
    chosen = []
    slab = contrastive_op._slab
    monkeypatch.setattr(contrastive_op, "_slab", lambda *a, products, **k: chosen.append(products) or
                        slab(*a, products=products, **k))
    dense = make_batch(8, 500, seed=7)
    batch = sparsified(dense, density=sparse.SPARSE_MAX_DENSITY / 2, seed=7, zero_rows=False)
    expected = reference_loss_and_grads(batch, similarity="dot")
    assert_matches(OP_PATHS["loss_and_grad"](batch, similarity="dot", show_progress_bar=True), expected)
    assert chosen == [sparse.SPARSE_PRODUCTS]
    assert sparse.sparse_enough(batch["queries"], batch["docs"])
    assert not sparse.sparse_enough(dense["queries"], batch["docs"])
    assert not sparse.sparse_enough(torch.zeros(0, 5))
    layout = contrastive_op.check_inputs(dense["queries"], dense["docs"], None, None, None,
                                         contrastive_op.parse_arguments({})[0], None)
    args = (layout, None, False, 0, torch.device("cpu"), available(torch.device("cpu")), None, None, None, None)
    assert contrastive_op._strategy(*args, lambda: True) == ("sparse", "cpu")
    assert contrastive_op._strategy(*args, lambda: False) == ("slab", "cpu")
    assert contrastive_op._strategy(*args) == ("slab", "cpu")


def test_sparse_enough_counts_a_sample_of_rows():
    x = torch.zeros(1000, 100)
    x[:, :2] = 1.0  # 2% of the entries
    assert sparse.sparse_enough(x) == (0.02 <= sparse.SPARSE_MAX_DENSITY)
    x[::7, :] = 1.0
    assert not sparse.sparse_enough(x)


def test_errors():
    batch = sparsified(make_batch(4, 20, seed=2), seed=2)
    with pytest.raises(RuntimeError, match="strategy 'sparse' .* needs backend 'cpu', got 'torch'"):
        OP_PATHS["loss_and_grad"](batch, strategy="sparse", backend="torch")
    with pytest.raises(ValueError, match="strategy 'sparse' has no gradient filter"):
        OP_PATHS["loss_and_grad"](batch, strategy="sparse", filter_eps="auto")
    with pytest.raises(RuntimeError, match="strategy 'sparse' is the single-dim contrastive op's only"):
        matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=(20, 10), strategy="sparse")
    layout = contrastive_op.check_inputs(batch["queries"], batch["docs"], None, None, None,
                                         contrastive_op.parse_arguments({})[0], None)
    with pytest.raises(RuntimeError, match="needs CPU tensors, got tensors on cuda"):
        contrastive_op._strategy(layout, None, False, 0, torch.device("cuda"), available(torch.device("cpu")), None,
                                 "sparse", None, None)


# ---------------------------------------------------------------------------------------------------------------
# the primitives (csrc/cpu/sparse.cpp) against dense float64 products
# ---------------------------------------------------------------------------------------------------------------

def _sparse_matrix(rows, width, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, width, generator=g) * (torch.rand(rows, width, generator=g) < density)
    x[rows // 2] = 0  # an empty row
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_sparse_rows_hold_the_non_zero_entries(dtype):
    x = _sparse_matrix(9, 70, 0.2, 0, dtype)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    rows = sparse.SparseRows.of(x, compute)
    assert rows.values.dtype == compute and rows.columns.dtype == torch.int32
    dense = torch.zeros(9, 70, dtype=compute)
    for r in range(9):
        k = slice(rows.starts[r], rows.starts[r + 1])
        assert torch.all(rows.columns[k][1:] > rows.columns[k][:-1])  # column order
        dense[r, rows.columns[k].long()] = rows.values[k]
    assert torch.equal(dense, x.to(compute))
    starts, columns, values = rows[2:7].transposed()
    transposed = torch.zeros(70, 5, dtype=compute)
    for v in range(70):
        transposed[v, columns[starts[v]:starts[v + 1]].long()] = values[starts[v]:starts[v + 1]]
    assert torch.equal(transposed, x[2:7].to(compute).T)


@pytest.mark.parametrize("width", [1, 31, 300])
def test_products_match_dense(width):
    a, b = _sparse_matrix(13, width, 0.3, 1), _sparse_matrix(10, width, 0.3, 2)
    ra, rb = sparse.SparseRows.of(a, torch.float32), sparse.SparseRows.of(b, torch.float32)
    out = torch.full((20, 10), float("nan"))[::2]  # strided rows; every entry written
    sparse.SPARSE_PRODUCTS.scores(out, ra[3:13], rb)
    exact = a[3:13].double() @ b.double().T
    assert (out.double() - exact).abs().max() <= 1e-6 * max(1.0, exact.abs().max().item())
    g = torch.randn(10, 10, generator=torch.Generator().manual_seed(3))
    da, db = torch.ones(10, width), torch.ones(10, width)
    sparse.SPARSE_PRODUCTS.add(da, db, g, ra[3:13], rb)
    for ours, truth in ((da, 1 + g.double() @ b.double()), (db, 1 + g.double().T @ a[3:13].double())):
        assert (ours.double() - truth).abs().max() <= 1e-6 * truth.abs().max()


def test_primitive_argument_errors():
    ext = _backend.EXTENSION
    rows = sparse.SparseRows.of(_sparse_matrix(4, 8, 0.5, 4), torch.float32)
    with pytest.raises(RuntimeError, match="bᵀ has a column past out's width"):
        ext.sparse_scores_cpu(torch.empty(4, 2), rows.starts, rows.columns, rows.values, 0, *rows.transposed())
    with pytest.raises(RuntimeError, match="a has too few rows"):
        ext.sparse_scores_cpu(torch.empty(5, 4), rows.starts, rows.columns, rows.values, 0, *rows.transposed())
    with pytest.raises(RuntimeError, match="g must have out's rows"):
        ext.sparse_add_products_cpu(torch.zeros(3, 8), torch.zeros(4, 4), *rows.transposed())
    with pytest.raises(RuntimeError, match="columns must be a contiguous int32 vector"):
        ext.sparse_transpose_cpu(rows.starts, rows.columns.long(), rows.values, 0, 4, 8)
    with pytest.raises(RuntimeError, match="column 7 out of range"):
        ext.sparse_transpose_cpu(rows.starts, torch.full_like(rows.columns, 7), rows.values, 0, 4, 7)


def test_chunk_rows_leave_out_the_dense_operands():
    """The sparse products' chunks come from the blocks alone: at SPLADE's D the dense operands and gradients
    exceed a small budget, which would leave the dense slab one row per chunk."""
    import warnings

    from fastcache.ops.contrastive.slab import slab_rows

    queries, docs = torch.zeros(64, 30522), torch.zeros(64, 30522)
    options = contrastive_op.parse_arguments({})[0]
    layout = contrastive_op.check_inputs(queries, docs, None, None, None, options, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the dense slab's "fewer than 16 rows" warning
        assert slab_rows(layout, options, False, 0, "cpu", queries, 32 * 2**20) == 1
    assert slab_rows(layout, options, False, 0, "cpu", queries, 32 * 2**20, sparse=True) == 64


def test_sparse_rows_keep_float64_entries_below_float32_range():
    x = torch.zeros(2, 5, dtype=torch.float64)
    x[0, 3], x[1, 0] = 1e-50, -1e-300
    rows = sparse.SparseRows.of(x, torch.float64)
    assert rows.starts.tolist() == [0, 1, 2] and rows.columns.tolist() == [3, 0]
    assert rows.values.tolist() == [1e-50, -1e-300]
