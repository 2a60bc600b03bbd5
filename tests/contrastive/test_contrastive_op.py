"""fastcache.contrastive_loss / contrastive_loss_and_grad against the dense reference (fastcache/reference.py).

Every option and layout, for both CPU backends ("cpu": the compiled C++ epilogue, "torch": the pure-PyTorch one):
float64 with tight tolerances, the low-precision dtypes against the reference's own error, strided NaN-padded
views, gradcheck, autograd behaviour, input validation, numerical edge cases, determinism and the memory budget.
"""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from fastcache import _backend, contrastive_loss, contrastive_loss_and_grad
from fastcache.reference import contrastive_loss_reference
from helpers import (
    DIFFERENTIABLE,
    OP_PATHS,
    assert_matches,
    assert_no_worse_than_reference,
    emulate_low_precision_gemms,
    low_precision_runs,
    make_batch,
    nan_padded,
    op_autograd,
    op_loss_and_grad,
    reference_loss_and_grads,
)

BACKENDS = ("cpu", "torch")
QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
DIRECTION_SETS = [(QD,), (QD, DQ), (QD, QQ), (QD, DD), (QD, QQ, DQ, DD)]
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
UNPARTITIONED = {QQ, DD}  # blocks without the positive: joint partition only


def _dirs_id(directions):
    return "+".join(d.replace("query", "q").replace("doc", "d").replace("_to_", "") for d in directions)


def _partition_ok(directions, partition_mode):
    return partition_mode == "joint" or not UNPARTITIONED & set(directions)


def check_both_paths(batch, **options):
    """Both op paths (autograd and loss_and_grad) against the reference, in float64."""
    expected = reference_loss_and_grads(batch, **options)
    for path in OP_PATHS.values():
        assert_matches(path(batch, **options), expected)


def needs_cpu_extension(backend):
    if backend == "cpu" and _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    needs_cpu_extension(request.param)
    return request.param


# ---------------------------------------------------------------------------------------------------------------
# 1. every variant against the dense reference, float64
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = [
    (dirs, part, hard, sim)
    for dirs, part, hard, sim in itertools.product(
        DIRECTION_SETS, ("joint", "per_direction"), HARDNESS_MODES, ("cos", "dot"))
    if _partition_ok(dirs, part)
]


@pytest.mark.parametrize(
    "directions,partition_mode,hardness_mode,similarity", VARIANTS,
    ids=[f"{_dirs_id(d)}-{p}-{h}-{s}" for d, p, h, s in VARIANTS])
def test_variants_match_reference(backend, directions, partition_mode, hardness_mode, similarity):
    batch = make_batch(5, 8, columns=2, seed=1)
    check_both_paths(batch, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
                     hardness_strength=0.0 if hardness_mode is None else 3.0, similarity=similarity, backend=backend,
                     chunk_size=2)


@pytest.mark.parametrize("directions", [d for d in DIRECTION_SETS if UNPARTITIONED & set(d)], ids=_dirs_id)
def test_per_direction_rejects_blocks_without_positive(directions):
    batch = make_batch(3, 4)
    for fn in (contrastive_loss, contrastive_loss_and_grad, contrastive_loss_reference):
        with pytest.raises(ValueError, match="partition_mode"):
            fn(batch["queries"], batch["docs"], directions=directions, partition_mode="per_direction")


@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES[1:])
def test_hardness_strength_zero_is_no_hardness(backend, hardness_mode):
    batch = make_batch(4, 6, columns=2, seed=2)
    plain = op_loss_and_grad(batch, backend=backend, directions=(QD, DQ))
    zero = op_loss_and_grad(batch, backend=backend, directions=(QD, DQ), hardness_mode=hardness_mode,
                            hardness_strength=0.0)
    assert_matches(zero, plain)


@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES[1:])
def test_hardness_changes_the_loss(backend, hardness_mode):
    batch = make_batch(4, 6, columns=2, seed=2)
    plain, _ = op_loss_and_grad(batch, backend=backend)
    hard, _ = op_loss_and_grad(batch, backend=backend, hardness_mode=hardness_mode, hardness_strength=5.0)
    assert hard > plain  # the penalty only adds to negatives' logits


@pytest.mark.parametrize("scale", [1, 20, 100, 0.05])
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("directions", [(QD,), (QD, QQ, DQ, DD)], ids=_dirs_id)
def test_scale(backend, scale, similarity, directions):
    batch = make_batch(4, 6, columns=2, seed=3)
    check_both_paths(batch, scale=scale, similarity=similarity, directions=directions, backend=backend)


@pytest.mark.parametrize("columns", [1, 2, 3])
@pytest.mark.parametrize("docs_3d", [False, True], ids=["docs2d", "docs3d"])
@pytest.mark.parametrize("hardness_mode", [None, "hard_negatives", "all_negatives"])
@pytest.mark.parametrize("directions", [(QD,), (QD, DD), (QD, QQ, DQ, DD)], ids=_dirs_id)
def test_hard_negative_columns(backend, columns, docs_3d, hardness_mode, directions):
    batch = make_batch(4, 5, columns=columns, docs_3d=docs_3d, seed=4)
    check_both_paths(batch, hardness_mode=hardness_mode, hardness_strength=2.0, directions=directions,
                     backend=backend, chunk_size=3)


@pytest.mark.parametrize("offset", [0, 2, 5])
@pytest.mark.parametrize("docs_3d", [False, True], ids=["docs2d", "docs3d"])
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=_dirs_id)
@pytest.mark.parametrize("hardness_mode", [None, "in_batch_negatives"])
def test_gathered_offset_with_all_queries(backend, offset, docs_3d, directions, hardness_mode):
    """The gathered layout: all_queries [P, D], queries = all_queries[offset:offset+B], P > B positives."""
    batch = make_batch(3, 6, columns=2, positives=8, offset=offset, gathered=True, docs_3d=docs_3d, seed=5)
    assert torch.equal(batch["all_queries"][offset:offset + 3], batch["queries"])
    check_both_paths(batch, offset=offset, directions=directions, hardness_mode=hardness_mode,
                     hardness_strength=1.5, backend=backend, chunk_size=2)


@pytest.mark.parametrize("offset", [0, 2, 4])
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=_dirs_id)
def test_offset_without_all_queries(backend, offset, directions):
    """Local queries (B rows) against P = 7 gathered positives given as docs [C, P, D]."""
    batch = make_batch(3, 6, columns=2, positives=7, offset=offset, docs_3d=True, seed=6)
    check_both_paths(batch, offset=offset, directions=directions, backend=backend, chunk_size=2)


def test_queries_as_a_view_of_all_queries(backend):
    """Real gathered use: queries is all_queries[offset:offset+B] itself; autograd sums both gradients."""
    batch = make_batch(3, 5, columns=2, positives=6, offset=2, gathered=True, seed=7)
    grads = []
    for fn in (contrastive_loss_reference, contrastive_loss):
        aq = batch["all_queries"].clone().requires_grad_()
        docs = batch["docs"].clone().requires_grad_()
        extra = {} if fn is contrastive_loss_reference else {"backend": backend}
        fn(aq[2:5], docs, all_queries=aq, offset=2, directions=(QD, QQ, DQ, DD), **extra).backward()
        grads.append((aq.grad, docs.grad))
    for ours, ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


GUIDE_DIRECTIONS = [(QD,), (QD, QQ), (QD, DD), (QD, QQ, DD)]


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5, -0.2])
@pytest.mark.parametrize("directions", GUIDE_DIRECTIONS, ids=_dirs_id)
@pytest.mark.parametrize("layout", ["local", "gathered"])
def test_guide(backend, margin_strategy, margin, directions, layout):
    """GIST masking. "gathered": GIST's layout, B local queries against P = 7 positives, docs [C, P, D]."""
    if layout == "local":
        batch, offset = make_batch(5, 6, columns=2, guide_dim=3, seed=8), 0
    else:
        batch, offset = make_batch(3, 6, columns=2, positives=7, offset=2, docs_3d=True, guide_dim=3, seed=8), 2
    check_both_paths(batch, margin=margin, margin_strategy=margin_strategy, directions=directions, offset=offset,
                     backend=backend, chunk_size=2)


def test_guide_masks_something():
    """The guide tests above are not vacuous: the guide changes the loss for the margins used."""
    batch = make_batch(5, 6, columns=2, guide_dim=3, seed=8)
    unguided = {k: v for k, v in batch.items() if not k.startswith("guide")}
    base, _ = reference_loss_and_grads(unguided, directions=(QD, QQ, DD))
    for margin in (0.0, 0.1, 0.5):
        guided, _ = reference_loss_and_grads(batch, directions=(QD, QQ, DD), margin=margin)
        assert guided < base


@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES[1:])
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
def test_guide_with_hardness(backend, hardness_mode, partition_mode):
    batch = make_batch(4, 6, columns=3, guide_dim=4, seed=9)
    check_both_paths(batch, hardness_mode=hardness_mode, hardness_strength=2.0, partition_mode=partition_mode,
                     margin=0.05, backend=backend)


def test_guide_dtype_may_differ(backend):
    """The guide is another model: its dtype and dims need not match the embeddings'."""
    batch = make_batch(4, 6, columns=2, guide_dim=3, seed=10)
    mixed = dict(batch, guide_queries=batch["guide_queries"].float(), guide_docs=batch["guide_docs"].float())
    expected = reference_loss_and_grads(batch, directions=(QD, QQ, DD), margin=0.1)
    assert_matches(op_loss_and_grad(mixed, directions=(QD, QQ, DD), margin=0.1, backend=backend), expected,
                   rtol=1e-6, atol=1e-6)


SHAPES = [  # rows, dim, columns, chunk_size
    (1, 1, 1, None),
    (1, 4, 3, 1),
    (1, 384, 2, None),
    (2, 1000, 2, 1),
    (3, 1, 2, None),
    (7, 3, 2, 3),
    (7, 3, 1, 1),
    (7, 5, 3, None),
    (7, 5, 2, 100),
    (13, 4, 2, 4),
    (2, 384, 3, 3),
]


@pytest.mark.parametrize("rows,dim,columns,chunk_size", SHAPES)
@pytest.mark.parametrize("directions", [(QD,), (QD, DQ), (QD, QQ, DQ, DD)], ids=_dirs_id)
def test_shapes_and_chunks(backend, rows, dim, columns, chunk_size, directions):
    batch = make_batch(rows, dim, columns=columns, seed=11)
    check_both_paths(batch, directions=directions, backend=backend, chunk_size=chunk_size,
                     hardness_mode="all_negatives", hardness_strength=1.0)


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 5, 6, 50])
def test_chunk_size_does_not_change_the_result(backend, chunk_size):
    batch = make_batch(6, 7, columns=2, positives=9, offset=3, gathered=True, seed=12)
    options = dict(directions=(QD, QQ, DQ, DD), offset=3, backend=backend)
    assert_matches(op_loss_and_grad(batch, chunk_size=chunk_size, **options), op_loss_and_grad(batch, **options),
                   rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# 2. low-precision dtypes against the reference's own error (tolerance table: tests/helpers.py)
# ---------------------------------------------------------------------------------------------------------------

LOW_PRECISION_CASES = {
    "plain": (dict(rows=6, dim=32, columns=2), {}),
    "all_dirs_hardness": (dict(rows=6, dim=32, columns=2),
                          dict(directions=(QD, QQ, DQ, DD), hardness_mode="all_negatives", hardness_strength=2.0)),
    "per_direction_dot": (dict(rows=6, dim=16, columns=2, norm=0.3),
                          dict(directions=(QD, DQ), partition_mode="per_direction", similarity="dot", scale=5.0)),
    "gathered": (dict(rows=4, dim=32, columns=2, positives=8, offset=4, gathered=True),
                 dict(directions=(QD, QQ, DQ), offset=4)),
    "guide": (dict(rows=4, dim=32, columns=2, positives=8, offset=2, docs_3d=True, guide_dim=8),
              dict(directions=(QD, QQ, DD), offset=2, margin=0.05)),
    "large_dim": (dict(rows=3, dim=384, columns=2, noise=6.0), dict(scale=30.0, directions=(QD, DQ))),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
@pytest.mark.parametrize("path", list(OP_PATHS))
def test_low_precision_no_worse_than_reference(backend, dtype, case, path):
    shape, options = LOW_PRECISION_CASES[case]
    runs = low_precision_runs(shape, options, dtype,
                              lambda batch: OP_PATHS[path](batch, backend=backend, chunk_size=3, **options))
    for k, (truth, reference, ours) in runs.items():
        # the loss is float32 whatever the inputs: float32's slack (tests/helpers.py)
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_gemms_no_worse_than_reference(monkeypatch, dtype, case):
    """The slab with its GEMMs in the inputs' dtype, as bf16/fp16 CUDA inputs get it (low_precision_gemms), run on
    CPU with those GEMMs emulated (tests/helpers.py emulate_low_precision_gemms). Checks the rest: operands
    normalised in their dtype, dL/ds rounded for the gradient GEMMs, the normalisation and its backward in chunks
    of rows."""
    import fastcache.ops.contrastive.slab as op

    low_operands = emulate_low_precision_gemms(monkeypatch, op, dtype)
    shape, options = LOW_PRECISION_CASES[case]
    runs = low_precision_runs(shape, options, dtype,
                              lambda batch: op_loss_and_grad(batch, backend="torch", chunk_size=3, **options))
    assert low_operands and all(low_operands)
    for k, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_output_dtypes(backend, dtype):
    batch = make_batch(3, 4, columns=2, positives=5, offset=1, gathered=True, docs_3d=True, dtype=dtype)
    out = contrastive_loss_and_grad(batch["queries"], batch["docs"], all_queries=batch["all_queries"], offset=1,
                                    backend=backend)
    expected_loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.loss.dtype == expected_loss_dtype and out.loss.shape == ()
    for g, k in zip(out[1:], DIFFERENTIABLE):
        assert g.dtype == dtype and g.shape == batch[k].shape
    loss = contrastive_loss(batch["queries"].requires_grad_(), batch["docs"], all_queries=batch["all_queries"],
                            offset=1, backend=backend)
    assert loss.dtype == expected_loss_dtype
    loss.backward()
    assert batch["queries"].grad.dtype == dtype


# ---------------------------------------------------------------------------------------------------------------
# 3. non-contiguous NaN-padded views
# ---------------------------------------------------------------------------------------------------------------

STRIDED_LAYOUTS = ["slice", "transposed", "every_other_row", "every_other_col"]
STRIDED_CASES = {
    "gathered_docs2d": (dict(rows=3, dim=5, columns=2, positives=6, offset=2, gathered=True),
                        dict(offset=2, directions=(QD, QQ, DQ, DD)), ["queries", "docs", "all_queries"]),
    "guided_docs3d": (dict(rows=3, dim=5, columns=2, positives=6, offset=1, docs_3d=True, guide_dim=4),
                      dict(offset=1, directions=(QD, QQ, DD), margin=0.1),
                      ["queries", "docs", "guide_queries", "guide_docs"]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
@pytest.mark.parametrize("case", list(STRIDED_CASES))
@pytest.mark.parametrize("path", list(OP_PATHS))
def test_strided_nan_padded_inputs(backend, dtype, layout, case, path):
    shape, options, names = STRIDED_CASES[case]
    batch = make_batch(**shape, dtype=dtype, seed=14)
    expected = OP_PATHS[path](batch, backend=backend, chunk_size=2, **options)
    strided = {k: nan_padded(v, layout) if k in names else v for k, v in batch.items()}
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    assert_matches(OP_PATHS[path](strided, backend=backend, chunk_size=2, **options), expected, **tol)


@pytest.mark.parametrize("layout", STRIDED_LAYOUTS)
def test_strided_inputs_are_not_modified(backend, layout):
    batch = make_batch(3, 4, columns=2, gathered=True, seed=15)
    strided = {k: nan_padded(v, layout) for k, v in batch.items()}
    buffers = {k: v._base.clone() for k, v in strided.items()}
    op_loss_and_grad(strided, directions=(QD, QQ, DQ, DD), similarity="dot", backend=backend)
    op_autograd(strided, directions=(QD, QQ, DQ, DD), backend=backend)
    for k, v in strided.items():
        assert torch.equal(v._base.nan_to_num(-7.0), buffers[k].nan_to_num(-7.0)), k


# ---------------------------------------------------------------------------------------------------------------
# 4. gradcheck
# ---------------------------------------------------------------------------------------------------------------

GRADCHECK_CASES = {
    "plain_cos": (dict(rows=3, dim=4, columns=2), {}),
    "all_dirs_dot": (dict(rows=3, dim=4, columns=2, norm=0.5),
                     dict(directions=(QD, QQ, DQ, DD), similarity="dot", scale=3.0)),
    "per_direction": (dict(rows=3, dim=4, columns=2), dict(directions=(QD, DQ), partition_mode="per_direction")),
    "gathered": (dict(rows=2, dim=4, columns=2, positives=5, offset=2, gathered=True),
                 dict(directions=(QD, QQ, DQ, DD), offset=2)),
    "gathered_docs3d": (dict(rows=2, dim=3, columns=3, positives=4, offset=1, gathered=True, docs_3d=True),
                        dict(directions=(QD, DQ), offset=1, scale=5.0)),
    "guide": (dict(rows=3, dim=4, columns=2, guide_dim=3), dict(directions=(QD, QQ, DD), margin=0.1)),
    "guide_gathered": (dict(rows=2, dim=4, columns=2, positives=5, offset=3, docs_3d=True, guide_dim=3),
                       dict(directions=(QD, QQ, DD), offset=3, margin_strategy="relative", margin=0.2)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(backend, case):
    shape, options = GRADCHECK_CASES[case]
    batch = make_batch(**shape, seed=16)
    names = [k for k in DIFFERENTIABLE if k in batch]
    guides = {k: v for k, v in batch.items() if k.startswith("guide")}

    def fn(*tensors):
        named = dict(zip(names, tensors))
        rest = {k: v for k, v in named.items() if k not in ("queries", "docs")}
        return contrastive_loss(named["queries"], named["docs"], **rest, **guides, backend=backend, chunk_size=2,
                                **options)

    inputs = tuple(batch[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES[1:])
def test_hardness_gradient_is_stop_gradient(backend, hardness_mode):
    """gradcheck does not apply to the hardness penalty: it is stopgrad(s) by definition, so finite differences
    see a penalty that the gradient deliberately ignores. Check instead that the gradient is the reference's
    (autograd through .detach()) and that it differs from the finite-difference one, i.e. the stop-gradient
    is in effect, not lost."""
    batch = make_batch(3, 4, columns=2, seed=17)
    options = dict(hardness_mode=hardness_mode, hardness_strength=4.0, scale=2.0, directions=(QD, DQ))
    ours = op_autograd(batch, backend=backend, **options)
    assert_matches(ours, reference_loss_and_grads(batch, **options))
    q, d = batch["queries"], batch["docs"]
    direction = torch.randn(q.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    h = 1e-6
    fd = (contrastive_loss(q + h * direction, d, backend=backend, **options)
          - contrastive_loss(q - h * direction, d, backend=backend, **options)) / (2 * h)
    analytic = (ours[1]["queries"] * direction).sum()
    assert abs(fd - analytic) > 1e-5  # central differences are good to ~1e-9 here


# ---------------------------------------------------------------------------------------------------------------
# 5. autograd behaviour
# ---------------------------------------------------------------------------------------------------------------

def test_autograd_and_loss_and_grad_agree_bitwise(backend):
    batch = make_batch(6, 8, columns=2, positives=9, offset=3, gathered=True, seed=18)
    options = dict(directions=(QD, QQ, DQ, DD), offset=3, hardness_mode="in_batch_negatives", hardness_strength=1.0,
                   backend=backend)
    loss_a, grads_a = op_autograd(batch, **options)
    loss_b, grads_b = op_loss_and_grad(batch, **options)
    assert torch.equal(loss_a, loss_b)
    for k in grads_a:
        assert torch.equal(grads_a[k], grads_b[k]), k


@pytest.mark.parametrize("factor", [3.0, -0.5, 0.0])
def test_backward_scales_by_grad_output(backend, factor):
    batch = make_batch(4, 5, columns=2, gathered=True, seed=19)
    _, grads = op_loss_and_grad(batch, backend=backend, directions=(QD, QQ))
    q, d, aq = (batch[k].clone().requires_grad_() for k in DIFFERENTIABLE)
    (contrastive_loss(q, d, all_queries=aq, backend=backend, directions=(QD, QQ)) * factor).backward()
    for k, leaf in zip(DIFFERENTIABLE, (q, d, aq)):
        torch.testing.assert_close(leaf.grad, grads[k] * factor, rtol=1e-12, atol=1e-14)


def test_loss_used_twice_accumulates(backend):
    batch = make_batch(4, 5, seed=20)
    _, grads = op_loss_and_grad(batch, backend=backend)
    q = batch["queries"].clone().requires_grad_()
    loss = contrastive_loss(q, batch["docs"], backend=backend)
    (loss + 2 * loss).backward()
    torch.testing.assert_close(q.grad, 3 * grads["queries"], rtol=1e-12, atol=1e-14)


def test_no_gradient_to_guides(backend):
    batch = make_batch(4, 5, columns=2, guide_dim=3, seed=21)
    gq = batch["guide_queries"].clone().requires_grad_()
    gd = batch["guide_docs"].clone().requires_grad_()
    q = batch["queries"].clone().requires_grad_()
    loss = contrastive_loss(q, batch["docs"], guide_queries=gq, guide_docs=gd, directions=(QD, QQ, DD),
                            backend=backend)
    loss.backward()
    assert q.grad is not None
    assert gq.grad is None and gd.grad is None


def test_backward_when_only_the_guide_requires_grad(backend):
    """Only a guide tensor requires grad (say, an unfrozen guide model): nothing differentiable reaches the
    loss's inputs, so backward must either be impossible (the loss needs no grad) or give the guide nothing;
    it must not crash inside the op."""
    batch = make_batch(4, 5, columns=2, guide_dim=3, seed=21)
    gq = batch["guide_queries"].clone().requires_grad_()
    loss = contrastive_loss(batch["queries"], batch["docs"], guide_queries=gq, guide_docs=batch["guide_docs"],
                            backend=backend)
    if loss.requires_grad:
        loss.backward()
    assert gq.grad is None


def test_no_grad_mode_returns_the_loss(backend):
    batch = make_batch(4, 5, columns=2, gathered=True, seed=22)
    expected, _ = reference_loss_and_grads(batch, directions=(QD, QQ, DQ, DD))
    leaves = {k: v.clone().requires_grad_() for k, v in batch.items()}
    with torch.no_grad():
        loss = contrastive_loss(leaves["queries"], leaves["docs"], all_queries=leaves["all_queries"],
                                directions=(QD, QQ, DQ, DD), backend=backend)
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # loss_and_grad computes its gradients without a graph, so under no_grad too
        out = contrastive_loss_and_grad(leaves["queries"], leaves["docs"], all_queries=leaves["all_queries"],
                                        directions=(QD, QQ, DQ, DD), backend=backend)
    torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_loss_and_grad_builds_no_graph(backend):
    batch = make_batch(4, 5, seed=23)
    q = batch["queries"].clone().requires_grad_()
    out = contrastive_loss_and_grad(q, batch["docs"], backend=backend)
    assert not out.loss.requires_grad and not out.grad_queries.requires_grad and q.grad is None


@pytest.mark.parametrize("requires", [(), ("queries",), ("docs",), ("all_queries",), ("docs", "all_queries")])
def test_partial_requires_grad(backend, requires):
    batch = make_batch(4, 5, columns=2, positives=6, offset=1, gathered=True, seed=24)
    options = dict(directions=(QD, QQ, DQ, DD), offset=1)
    expected_loss, expected_grads = reference_loss_and_grads(batch, **options)
    leaves = {k: v.clone().requires_grad_(k in requires) for k, v in batch.items()}
    loss = contrastive_loss(leaves["queries"], leaves["docs"], all_queries=leaves["all_queries"], backend=backend,
                            **options)
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-10, atol=1e-10)
    assert loss.requires_grad == bool(requires)
    if requires:
        loss.backward()
    for k in DIFFERENTIABLE:
        if k in requires:
            torch.testing.assert_close(leaves[k].grad, expected_grads[k], rtol=1e-10, atol=1e-10)
        else:
            assert leaves[k].grad is None


def test_inputs_from_a_graph(backend):
    """Embeddings that are outputs of other ops: the gradient flows back through them."""
    batch = make_batch(4, 5, columns=2, seed=25)
    w = torch.randn(5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    expected_w = None
    for fn in (contrastive_loss_reference, contrastive_loss):
        w.grad = None
        extra = {} if fn is contrastive_loss_reference else {"backend": backend}
        fn(batch["queries"] @ w, batch["docs"] @ w, directions=(QD, DQ), **extra).backward()
        expected_w = w.grad.clone() if expected_w is None else expected_w
    torch.testing.assert_close(w.grad, expected_w, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# 6. bad input -> ValueError naming the argument
# ---------------------------------------------------------------------------------------------------------------

def _base(**overrides):
    batch = make_batch(3, 4, columns=2, seed=26, dtype=torch.float32)
    kwargs = {}
    for k, v in overrides.items():
        if k in ("queries", "docs"):
            batch[k] = v(batch) if callable(v) else v
        else:
            kwargs[k] = v(batch) if callable(v) else v
    return batch["queries"], batch["docs"], kwargs


def _poison(name, value, where=(0, 0)):
    def make(b):
        t = (b[name] if name in b else b["queries"]).clone()
        t[where] = value
        return t
    return make


def _guides(**changes):
    g = {"guide_queries": torch.randn(3, 2), "guide_docs": torch.randn(6, 2)}
    g.update(changes)
    return g


BAD_INPUTS = {
    # shapes
    "docs_dim": (dict(docs=torch.randn(6, 5)), r"docs have 5 dims"),
    "all_queries_dim": (dict(all_queries=torch.randn(3, 5)), r"all_queries has 5 dims"),
    "queries_ndim1": (dict(queries=torch.randn(4)), r"queries must have 2 dimensions"),
    "queries_ndim3": (dict(queries=torch.randn(1, 3, 4)), r"queries must have 2 dimensions"),
    "docs_ndim1": (dict(docs=torch.randn(4)), r"docs must have 2 or 3 dimensions"),
    "docs_ndim4": (dict(docs=torch.randn(1, 2, 3, 4)), r"docs must have 2 or 3 dimensions"),
    "all_queries_ndim3": (dict(all_queries=torch.randn(1, 3, 4)), r"all_queries must have 2 dimensions"),
    "docs_rows_not_multiple": (dict(docs=torch.randn(7, 4)), r"docs has 7 rows"),
    "docs_rows_not_multiple_of_all_queries": (dict(docs=torch.randn(6, 4), all_queries=torch.randn(4, 4)),
                                              r"docs has 6 rows.*all_queries"),
    "all_queries_rows_vs_docs3d": (dict(docs=torch.randn(2, 3, 4), all_queries=torch.randn(4, 4)),
                                   r"all_queries has 4 rows"),
    "offset_out_of_range": (dict(offset=1), r"offset=1"),
    "offset_out_of_range_gathered": (dict(offset=2, docs=torch.randn(8, 4), all_queries=torch.randn(4, 4)),
                                     r"offset=2"),
    "offset_out_of_range_docs3d": (dict(offset=3, docs=torch.randn(2, 5, 4)), r"offset=3"),
    # empty
    "empty_batch": (dict(queries=torch.randn(0, 4), docs=torch.randn(0, 4)), r"queries is empty"),
    "empty_dim": (dict(queries=torch.randn(3, 0), docs=torch.randn(6, 0)), r"queries is empty"),
    "empty_docs": (dict(docs=torch.randn(0, 4)), r"docs is empty"),
    "empty_all_queries": (dict(all_queries=torch.randn(0, 4)), r"all_queries is empty"),
    # non-finite
    "nan_queries": (dict(queries=_poison("queries", float("nan"))), r"^queries contains NaN or Inf"),
    "inf_queries": (dict(queries=_poison("queries", float("inf"), (2, 3))), r"^queries contains NaN or Inf"),
    "nan_docs": (dict(docs=_poison("docs", float("nan"), (5, 1))), r"^docs contains NaN or Inf"),
    "neginf_docs": (dict(docs=_poison("docs", float("-inf"))), r"^docs contains NaN or Inf"),
    "nan_all_queries": (dict(all_queries=_poison("all_queries", float("nan"), (1, 1))),
                        r"^all_queries contains NaN or Inf"),
    "nan_guide_queries": (dict(guide_queries=lambda b: torch.tensor([[0.0, 1.0], [float("nan"), 1.0], [1.0, 1.0]]),
                               guide_docs=lambda b: torch.randn(6, 2)), r"^guide_queries contains NaN or Inf"),
    "inf_guide_docs": (dict(guide_queries=lambda b: torch.randn(3, 2),
                            guide_docs=lambda b: torch.randn(6, 2).index_fill(0, torch.tensor([4]), float("inf"))),
                       r"^guide_docs contains NaN or Inf"),
    # options
    "unknown_direction": (dict(directions=(QD, "doc_to_everything")), r"directions: unknown"),
    "no_query_to_doc": (dict(directions=(DQ, QQ)), r"directions must include 'query_to_doc'"),
    "repeated_direction": (dict(directions=(QD, QQ, QQ)), r"directions must not repeat"),
    "directions_string": (dict(directions=QD), r"directions must be a tuple"),
    "empty_directions": (dict(directions=()), r"directions must include"),
    "partition_mode": (dict(partition_mode="mean"), r"partition_mode must be one of"),
    "hardness_mode": (dict(hardness_mode="hardest"), r"hardness_mode must be one of"),
    "similarity": (dict(similarity="l2"), r"similarity must be one of"),
    "margin_strategy": (dict(margin_strategy="percent"), r"margin_strategy must be one of"),
    "scale_zero": (dict(scale=0), r"scale must be"),
    "scale_nan": (dict(scale=float("nan")), r"scale must be"),
    "scale_inf": (dict(scale=float("inf")), r"scale must be"),
    "scale_string": (dict(scale="20"), r"scale must be"),
    "hardness_strength_negative": (dict(hardness_mode="all_negatives", hardness_strength=-1.0),
                                   r"hardness_strength must be"),
    "hardness_strength_nan": (dict(hardness_mode="all_negatives", hardness_strength=float("nan")),
                              r"hardness_strength must be"),
    "offset_negative": (dict(offset=-1), r"offset must be a non-negative int"),
    "offset_float": (dict(offset=1.0), r"offset must be a non-negative int"),
    "offset_bool": (dict(offset=True), r"offset must be a non-negative int"),
    "margin_nan": (dict(margin=float("nan")), r"margin must be a finite number"),
    # dtypes
    "integer_queries": (dict(queries=torch.ones(3, 4, dtype=torch.int64), docs=torch.ones(6, 4, dtype=torch.int64)),
                        r"queries must be float32"),
    "integer_docs": (dict(docs=torch.ones(6, 4, dtype=torch.int32)), r"docs must be float32"),
    "bool_all_queries": (dict(all_queries=torch.ones(3, 4, dtype=torch.bool)), r"all_queries must be float32"),
    "integer_guide": (dict(guide_queries=torch.ones(3, 2, dtype=torch.int64), guide_docs=torch.ones(6, 2)),
                      r"guide_queries must be float32"),
    "mismatched_dtypes": (dict(docs=lambda b: b["docs"].double()), r"queries, docs and all_queries must share"),
    "mismatched_all_queries_dtype": (dict(all_queries=lambda b: b["queries"].half()), r"must share a dtype"),
    "not_a_tensor": (dict(queries=[[1.0, 2.0, 3.0, 4.0]]), r"queries must be a torch.Tensor"),
    "all_queries_not_a_tensor": (dict(all_queries=[[1.0] * 4] * 3), r"all_queries must be a torch.Tensor"),
    # guide
    "guide_with_doc_to_query": (dict(directions=(QD, DQ), **_guides()), r"directions: 'doc_to_query'"),
    "guide_with_all_queries": (dict(all_queries=lambda b: b["queries"], **_guides()), r"all_queries cannot"),
    "only_guide_queries": (dict(guide_queries=torch.randn(3, 2)), r"guide_queries and guide_docs"),
    "only_guide_docs": (dict(guide_docs=torch.randn(6, 2)), r"guide_queries and guide_docs"),
    "guide_queries_rows": (dict(**_guides(guide_queries=torch.randn(2, 2))), r"guide_queries has 2 rows"),
    "guide_docs_layout": (dict(**_guides(guide_docs=torch.randn(9, 2))), r"guide_docs must be laid out"),
    "guide_docs_3d_vs_2d": (dict(**_guides(guide_docs=torch.randn(2, 3, 2))), r"guide_docs must be laid out"),
    "guide_dims": (dict(**_guides(guide_docs=torch.randn(6, 3))), r"guide_docs have 3 dims"),
    "guide_docs_ndim1": (dict(**_guides(guide_docs=torch.randn(6))), r"guide_docs must have 2 or 3"),
    # settings
    "chunk_size_zero": (dict(chunk_size=0), r"chunk_size must be"),
    "chunk_size_negative": (dict(chunk_size=-2), r"chunk_size must be"),
    "chunk_size_float": (dict(chunk_size=2.0), r"chunk_size must be"),
    "chunk_size_bool": (dict(chunk_size=True), r"chunk_size must be"),
    "backend_name": (dict(backend="gpu"), r"backend must be one of"),
    "memory_budget_zero": (dict(memory_budget=0), r"memory_budget must be"),
    "memory_budget_negative": (dict(memory_budget=-1), r"memory_budget must be"),
    "memory_budget_float": (dict(memory_budget=1e6), r"memory_budget must be"),
}


@pytest.mark.parametrize("fn", [contrastive_loss, contrastive_loss_and_grad], ids=["loss", "loss_and_grad"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_value_error(fn, case):
    overrides, match = BAD_INPUTS[case]
    queries, docs, kwargs = _base(**overrides)
    with pytest.raises(ValueError, match=match):
        fn(queries, docs, **kwargs)


@pytest.mark.parametrize("path", ["cpu", "cpu_progress_bar", "torch"])  # the C++ call's own check; Python's
@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("name", ["queries", "docs", "all_queries"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_inputs_are_named_on_every_path(path, similarity, dtype, name, value):
    """One NaN or ±Inf anywhere in an embedding input (here the last value of a 3-D docs tensor or of a gathered
    all_queries) is a ValueError naming it, whichever path checks it."""
    batch = make_batch(3, 7, columns=2, seed=8, dtype=dtype)
    inputs = {"queries": batch["queries"], "docs": batch["docs"].reshape(2, 3, 7),
              "all_queries": torch.cat([batch["queries"], batch["queries"].flip(0)])[:3]}
    inputs[name] = inputs[name].clone()
    inputs[name].view(-1)[-1] = value
    settings = dict(backend=path.split("_")[0], show_progress_bar=path.endswith("bar"))
    with pytest.raises(ValueError, match=rf"^{name} contains NaN or Inf"):
        contrastive_loss_and_grad(inputs["queries"], inputs["docs"], all_queries=inputs["all_queries"],
                                  similarity=similarity, **settings)


def test_options_validated_once_are_told_apart_by_type():
    """The op validates each distinct option set once: a value equal to a valid one but of another type (1.0 or
    True for offset=1) is still rejected after the valid one was used, and unhashable values (directions as a
    list) are validated too."""
    batch = make_batch(3, 4, columns=2, seed=3, dtype=torch.float32)
    all_queries = torch.cat([batch["queries"], batch["queries"][:1]])
    docs = torch.cat([batch["docs"][:3], all_queries[3:], batch["docs"][3:], batch["docs"][:1]])
    contrastive_loss_and_grad(batch["queries"], docs, all_queries=all_queries, offset=1)
    for offset in (1.0, True):
        with pytest.raises(ValueError, match="offset must be a non-negative int"):
            contrastive_loss_and_grad(batch["queries"], docs, all_queries=all_queries, offset=offset)
    as_list = contrastive_loss_and_grad(batch["queries"], batch["docs"], directions=[QD, QQ])
    as_tuple = contrastive_loss_and_grad(batch["queries"], batch["docs"], directions=(QD, QQ))
    assert torch.equal(as_list.loss, as_tuple.loss)
    with pytest.raises(ValueError, match="directions: unknown"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"], directions=[QD, "doc_to_everything"])


def test_large_finite_inputs_are_not_taken_for_non_finite():
    """fp32 values whose squares overflow fp32 (1e30) are finite: the C++ path's check passes them, and its cosine
    similarity (the norm accumulated in fp64) is that of the unscaled rows. (F.normalize, hence the reference and
    sentence-transformers, overflows to an infinite norm there and gives zero vectors.)"""
    batch = make_batch(3, 7, columns=2, seed=9, dtype=torch.float32)
    result = contrastive_loss_and_grad(batch["queries"] * 1e30, batch["docs"] * 1e30, backend="cpu")
    torch.testing.assert_close(result.loss, contrastive_loss_reference(batch["queries"], batch["docs"]))


@pytest.mark.parametrize("case", [c for c in BAD_INPUTS if not any(
    s in c for s in ("chunk_size", "backend", "memory_budget"))])
def test_reference_rejects_the_same_inputs(case):
    overrides, match = BAD_INPUTS[case]
    queries, docs, kwargs = _base(**overrides)
    with pytest.raises(ValueError, match=match):
        contrastive_loss_reference(queries, docs, **kwargs)


@pytest.mark.parametrize("fn", [contrastive_loss, contrastive_loss_and_grad], ids=["loss", "loss_and_grad"])
def test_unknown_keyword_raises_type_error(fn):
    queries, docs, _ = _base()
    with pytest.raises(TypeError, match=r"unknown argument.*temperature"):
        fn(queries, docs, temperature=0.05)


@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_gpu_backend_on_cpu_tensors_raises(backend_name, monkeypatch):
    """An explicit backend that cannot run here is an error, never a silent fallback (triton runs CPU tensors
    only through its interpreter, which tests/conftest.py turns on: off for this test)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    queries, docs, _ = _base()
    with pytest.raises(RuntimeError, match=rf"backend '{backend_name}'"):
        contrastive_loss(queries, docs, backend=backend_name)


def test_backend_env_is_validated(monkeypatch):
    monkeypatch.setenv("FASTCACHE_BACKEND", "fastest")
    queries, docs, _ = _base()
    with pytest.raises(ValueError, match="FASTCACHE_BACKEND"):
        contrastive_loss(queries, docs)


@pytest.mark.parametrize("name", ["docs", "all_queries", "guide_docs"])
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (CUDA) to put one tensor on")
def test_tensors_on_different_devices(name):
    batch = make_batch(3, 4, columns=2, guide_dim=2 if name == "guide_docs" else None, seed=27,
                       dtype=torch.float32)
    if name == "all_queries":
        batch["all_queries"] = batch["queries"].clone()
    batch[name] = batch[name].cuda()
    q, d = batch.pop("queries"), batch.pop("docs")
    with pytest.raises(ValueError, match=rf"one device.*{name}"):
        contrastive_loss(q, d, **batch)


# ---------------------------------------------------------------------------------------------------------------
# 7. numerics
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directions", [(QD,), (QD, QQ, DQ, DD)], ids=_dirs_id)
@pytest.mark.parametrize("hardness_mode", [None, "all_negatives"])
def test_large_logits_float64(backend, directions, hardness_mode):
    """Dot similarity of norm-30 vectors at scale 100: logits of order 1e6, far past exp's range."""
    batch = make_batch(4, 8, columns=2, norm=30.0, noise=2.0, seed=28)
    options = dict(similarity="dot", scale=100.0, directions=directions, hardness_mode=hardness_mode,
                   hardness_strength=5.0, backend=backend)
    assert (batch["queries"] @ batch["docs"].T).abs().max() * 100 > 1e6  # exp overflows float64 past ~709
    loss, grads = op_loss_and_grad(batch, **options)
    assert loss > 1e5  # and the positive is not always the best match
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    check_both_paths(batch, **options)


@pytest.mark.parametrize("path", list(OP_PATHS))
def test_large_logits_float32(backend, path):
    shape = dict(rows=4, dim=8, columns=2, norm=30.0)
    options = dict(similarity="dot", scale=100.0, directions=(QD, QQ, DQ, DD))
    runs = low_precision_runs(shape, options, torch.float32,
                              lambda batch: OP_PATHS[path](batch, backend=backend, **options))
    for k, (truth, reference, ours) in runs.items():
        assert all(torch.isfinite(x).all() for x in ours), k
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32)


@pytest.mark.parametrize("which", ["query", "positive", "negative", "all_queries", "everything"])
def test_zero_vectors_under_cosine(backend, which):
    """F.normalize semantics: a zero row has similarity 0 to everything and gradient g / eps."""
    batch = make_batch(4, 5, columns=2, positives=5, offset=1, gathered=True, seed=29)
    if which == "query":
        batch["queries"][2] = 0
    elif which == "positive":
        batch["docs"][1 + 1] = 0
    elif which == "negative":
        batch["docs"][7] = 0
    elif which == "all_queries":
        batch["all_queries"][0] = 0
    else:
        batch = {k: torch.zeros_like(v) for k, v in batch.items()}
    options = dict(directions=(QD, QQ, DQ, DD), offset=1, backend=backend)
    loss, grads = op_loss_and_grad(batch, **options)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads.values())
    check_both_paths(batch, **options)


@pytest.mark.parametrize("similarity", ["cos", "dot"])
@pytest.mark.parametrize("directions", [(QD,), (QD, DQ), (QD, QQ, DQ, DD)], ids=_dirs_id)
def test_identical_rows_ties(backend, similarity, directions):
    """Every query and doc the same vector: all logits tie, loss = log(number of unmasked columns)."""
    v = torch.tensor([[0.3, -1.2, 0.5]], dtype=torch.float64)
    batch = {"queries": v.repeat(4, 1), "docs": v.repeat(8, 1)}
    check_both_paths(batch, similarity=similarity, directions=directions, backend=backend)
    loss, _ = op_loss_and_grad(batch, similarity=similarity, directions=directions, backend=backend)
    columns = {QD: 8, QQ: 3, DQ: 4, DD: 6}
    torch.testing.assert_close(loss, torch.tensor(math.log(sum(columns[d] for d in directions)),
                                                  dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_duplicate_positive_in_batch(backend):
    """Two rows share the same positive text (a common false negative): still equal to the reference."""
    batch = make_batch(5, 6, columns=2, seed=30)
    batch["docs"][3] = batch["docs"][1]
    batch["queries"][3] = batch["queries"][1]
    check_both_paths(batch, directions=(QD, QQ, DQ, DD), backend=backend)


@pytest.mark.parametrize("directions", [(QD,), (QD, QQ), (QD, DD), (QD, QQ, DD)], ids=_dirs_id)
@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 10.0), ("relative", 50.0)])
def test_guide_masking_everything_but_the_positive(backend, directions, margin_strategy, margin):
    """A threshold below -1 masks every guided column except query_to_doc's positive: loss 0, gradient 0."""
    batch = make_batch(4, 5, columns=2, guide_dim=3, seed=31)
    batch["guide_queries"][:] = batch["guide_docs"][:4]  # guide positive similarity 1, so relative works too
    options = dict(directions=directions, margin=margin, margin_strategy=margin_strategy, backend=backend)
    expected_loss, expected_grads = reference_loss_and_grads(batch, **options)
    assert expected_loss == 0 and all((g == 0).all() for g in expected_grads.values())
    for path in OP_PATHS.values():
        assert_matches(path(batch, **options), (expected_loss, expected_grads))


@pytest.mark.parametrize("directions,columns", [((QD, QQ), 1), ((QD, DD), 1), ((QD, DD), 3), ((QD, QQ, DQ, DD), 2)],
                         ids=["qq", "dd", "dd-3cols", "all"])
def test_single_row_blocks_fully_masked(backend, directions, columns):
    """B = 1: query_to_query's only column is the row's own query and doc_to_doc's only columns are the row's own
    documents, so those blocks are entirely masked (logsumexp = -inf, softmax weight 0)."""
    batch = make_batch(1, 4, columns=columns, seed=32)
    check_both_paths(batch, directions=directions, backend=backend)


def test_one_dimensional_embeddings_cosine(backend):
    """D = 1 under cosine: every similarity is +-1."""
    batch = {"queries": torch.tensor([[2.0], [-1.0], [0.5]], dtype=torch.float64),
             "docs": torch.tensor([[1.0], [3.0], [-2.0], [-1.0], [4.0], [0.1]], dtype=torch.float64)}
    check_both_paths(batch, directions=(QD, QQ, DQ, DD), backend=backend)


# ---------------------------------------------------------------------------------------------------------------
# 8. determinism
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_deterministic(dtype, guided):
    needs_cpu_extension("cpu")
    batch = make_batch(40, 64, columns=2, guide_dim=16 if guided else None, dtype=dtype, seed=33)
    options = dict(directions=(QD, QQ, DD) if guided else (QD, QQ, DQ, DD), backend="cpu",
                   hardness_mode="all_negatives", hardness_strength=1.0, chunk_size=16)
    runs = [op_loss_and_grad(batch, **options) for _ in range(2)] + [op_autograd(batch, **options)]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, runs[0][0])
        for k in grads:
            assert torch.equal(grads[k], runs[0][1][k]), k


def test_deterministic_across_thread_counts():
    needs_cpu_extension("cpu")
    batch = make_batch(24, 16, columns=2, dtype=torch.float32, seed=34)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            results.append(op_loss_and_grad(batch, backend="cpu", directions=(QD, DQ), chunk_size=8))
    finally:
        torch.set_num_threads(threads)
    # the epilogue is row-parallel with no cross-row reductions; the GEMMs may block differently with
    # more threads, so equality to rounding rather than bitwise
    assert_matches(results[1], results[0], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# 9. memory budget
# ---------------------------------------------------------------------------------------------------------------

def test_tiny_budget_warns_and_is_correct(backend):
    batch = make_batch(20, 6, columns=2, gathered=True, seed=35)
    options = dict(directions=(QD, QQ, DQ, DD), backend=backend)
    expected = reference_loss_and_grads(batch, **options)
    for path in OP_PATHS.values():
        with pytest.warns(RuntimeWarning, match="memory_budget=1 bytes"):
            result = path(batch, memory_budget=1, **options)
        assert_matches(result, expected)


def test_enough_budget_does_not_warn(backend):
    batch = make_batch(20, 6, columns=2, seed=35)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op_loss_and_grad(batch, memory_budget=32 * 2**20, backend=backend)


def test_chunk_size_overrides_budget():
    batch = make_batch(20, 6, seed=35)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op_loss_and_grad(batch, memory_budget=1, chunk_size=20)


def test_budget_sets_the_chunk(backend):
    """A larger budget never gives fewer rows per chunk (read from the warning, which names the row count), a
    1-byte budget gives one row, and the default budget runs this batch without a warning."""
    import re

    batch = make_batch(64, 8, seed=36)
    rows = []
    from fastcache.ops.contrastive.slab import GEMM_WORKSPACE_BYTES

    # budgets above the fixed GEMM allowance, plus 1 byte for the one-row case
    for budget in (1, *(GEMM_WORKSPACE_BYTES + b for b in (2**14, 17_000, 18_000, 20_000, 22_000, 2**15, 2**16))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            op_loss_and_grad(batch, backend=backend, memory_budget=budget)
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        rows.append(int(re.search(r"leaves (\d+) row", messages[0]).group(1)) if messages else 16)
    assert rows[0] == 1
    assert rows == sorted(rows) and rows[-1] >= 16, rows
    assert len(set(rows)) >= 3, rows  # the budgets above really span several chunk sizes
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op_loss_and_grad(batch, backend=backend)


def test_show_progress_bar(backend):
    batch = make_batch(7, 4, columns=2, seed=38)
    assert_matches(op_loss_and_grad(batch, backend=backend, chunk_size=2, show_progress_bar=True),
                   op_loss_and_grad(batch, backend=backend, chunk_size=2), rtol=0, atol=0)


@pytest.mark.parametrize("text,expected", [
    ("64MiB", 64 * 2**20),
    ("64mib", 64 * 2**20),
    ("256MB", 256 * 2**20),
    ("268435456", 268435456),
    ("1.5GiB", int(1.5 * 2**30)),
    ("512k", 512 * 1024),
    (" 2 GiB ", 2 * 2**30),
    ("1T", 2**40),
])
def test_memory_budget_env_parses_sizes(monkeypatch, text, expected):
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", text)
    assert _backend.memory_budget() == expected
    assert _backend.memory_budget(12345) == 12345  # the argument wins


def test_memory_budget_env_reaches_the_op(monkeypatch, backend):
    batch = make_batch(20, 6, columns=2, seed=37)
    expected = reference_loss_and_grads(batch)
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", "1k")
    with pytest.warns(RuntimeWarning, match="memory_budget=1024 bytes"):
        result = op_loss_and_grad(batch, backend=backend)
    assert_matches(result, expected)
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", "64MiB")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        op_loss_and_grad(batch, backend=backend)
        monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", "1k")
        op_loss_and_grad(batch, backend=backend, memory_budget=2**26)  # the argument beats the environment


@pytest.mark.parametrize("text", ["lots", "64XB", "-1MiB", "1e6", "64 MiB extra", "MiB", "0x100"])
def test_memory_budget_env_rejects_bad_strings(monkeypatch, text):
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", text)
    queries, docs, _ = _base()
    with pytest.raises(ValueError, match="FASTCACHE_MEMORY_BUDGET"):
        contrastive_loss(queries, docs)


@pytest.mark.parametrize("text", ["0", "0.0001k"])
def test_memory_budget_env_zero_rejected(monkeypatch, text):
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", text)
    queries, docs, _ = _base()
    with pytest.raises(ValueError, match="memory_budget"):
        contrastive_loss(queries, docs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_sees_every_non_finite_value(dtype):
    from fastcache.ops.contrastive.options import all_finite

    x = torch.randn(5, 7).to(dtype)
    assert all_finite(x) and all_finite(x[:, ::2]) and all_finite(x.T)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for where in ((0, 0), (4, 6), (2, 3)):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
        assert not all_finite(torch.full((3, 2), bad, dtype=dtype))
    huge = torch.finfo(dtype).max
    assert all_finite(torch.tensor([huge, -huge], dtype=dtype))  # the float64 difference does not overflow
    assert all_finite(torch.tensor([huge, huge, huge], dtype=dtype))  # the sum overflows, the values are finite


def test_chunk_rows_caps_blocks_for_the_cache_only_on_cpu():
    """On CPU blocks stay under MAX_SLAB_BYTES (cache); a GPU gets the tallest chunk its budget holds, so the auto
    strategy compares the budget, not the CPU cache cap, with MIN_SLAB_ROWS."""
    from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions
    from fastcache.ops.contrastive.slab import MAX_SLAB_BYTES, chunk_rows

    layout = ContrastiveLayout(rows=65536, positives=65536, columns=2, dim=768, query_columns=65536,
                               own_query_offset=0)
    options = ContrastiveOptions()
    budget = 8 * 2**30
    capped = chunk_rows(layout, options, False, 0, budget, 4)
    uncapped = chunk_rows(layout, options, False, 0, budget, 4, cache_cap=False)
    assert capped == MAX_SLAB_BYTES // (layout.candidates * 4)
    fixed = 2 * (layout.rows + layout.candidates) * layout.dim * 4 + 16 * 2**20
    assert uncapped == (budget - fixed) // (layout.candidates * 4) > capped
