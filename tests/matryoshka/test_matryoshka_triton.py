"""The Matryoshka op's tiled strategy (fastcache/triton/matryoshka.py) on CPU tensors, through the Triton interpreter.

Against the dense reference (the contrastive reference once per dim, fastcache/reference.py): every option in
float64 (directions, partition modes, hardness, cos/dot, scale), dims that divide nothing and fall inside a
BLOCK_K block or an output tile (D=19 with 19/7/3, D=300 with 300/256/130/128/37/1), weights (zero, negative),
B = 1 and B, N across several 64-wide tiles, gathered queries with an offset, guides with both margin strategies,
duplicate ids, prefixes of norm zero, NaN-padded strided inputs (those with unit stride along D reach the kernels
in place), the backward's loops with small tiles, both op paths; float32 / bfloat16 / float16 against the
reference's own error (also across several output tiles); same as the slab; determinism; the strategy setting and
its errors; fastcache's MatryoshkaLoss over cached MNRL, cached GIST and the symmetric loss on the tiled path
against the CPU slab (the kernels compiled for sm_90: tests/native/test_triton_compile.py). Shapes are tiny (the
interpreter is slow). The same kernels on a GPU: tests/matryoshka/test_matryoshka_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastcache.ops.matryoshka import matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad  # noqa: E402
from helpers import (  # noqa: E402
    INTERPRETER_ONLY,
    MATRYOSHKA_OP_PATHS,
    assert_low_precision_no_worse_than_reference,
    assert_matches,
    make_batch,
    matryoshka_op_loss_and_grad,
    matryoshka_reference_loss_and_grads,
    nan_padded,
)
from test_matryoshka_op import DIM_SETS, LOW_PRECISION_CASES, VARIANTS  # noqa: E402

pytestmark = INTERPRETER_ONLY  # only under the Triton interpreter

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
TILED = dict(backend="triton", strategy="tiled")


def check(batch, path="loss_and_grad", **options):
    """One op path on the tiled strategy against the reference, float64."""
    assert_matches(MATRYOSHKA_OP_PATHS[path](batch, **TILED, **options),
                   matryoshka_reference_loss_and_grads(batch, **options))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_options_match_reference(variant):
    batch = make_batch(7, 19, columns=3, seed=1)
    check(batch, dims=[19, 7, 3], weights=[1.0, 0.5, 2.0], **VARIANTS[variant])


@pytest.mark.parametrize(("dims", "weights"), DIM_SETS, ids=[str(d) for d, _ in DIM_SETS])
def test_dims_and_weights(dims, weights):
    batch = make_batch(5, 19, columns=2, seed=2)
    check(batch, dims=list(dims), weights=weights)


@pytest.mark.parametrize("path", list(MATRYOSHKA_OP_PATHS))
def test_dims_across_blocks_and_output_tiles(path):
    """D = 300: dims inside BLOCK_K blocks, ending inside and on the edges of the 128-wide output tiles, a one-dim
    prefix; the doc_to_query gradient fused into query_to_doc's."""
    batch = make_batch(3, 300, columns=2, seed=3, noise=6.0)
    check(batch, path, dims=[300, 256, 130, 128, 37, 1], weights=[1.0, 0.5, 1.0, 2.0, 1.0, 0.25], scale=30.0,
          directions=(QD, DQ), partition_mode="per_direction")


SHAPES = [(1, 1, 1, [1]), (1, 5, 3, [5, 2]), (70, 9, 2, [9, 4])]  # rows, dim, columns, dims


@pytest.mark.parametrize("rows,dim,columns,dims", SHAPES, ids=[str(s[:3]) for s in SHAPES])
def test_shapes(rows, dim, columns, dims):
    """B = 1, D = 1; B and N across several 64-wide tiles, not multiples of them."""
    batch = make_batch(rows, dim, columns=columns, seed=4)
    check(batch, dims=dims, directions=ALL, hardness_mode="all_negatives", hardness_strength=1.0)


@pytest.mark.parametrize("directions", [(QD,), ALL], ids=["qd", "all"])
def test_gathered_offset(directions):
    batch = make_batch(3, 11, columns=2, positives=8, offset=4, gathered=True, docs_3d=True, seed=5)
    check(batch, "autograd", dims=[11, 6, 2], offset=4, directions=directions, hardness_mode="hard_negatives",
          hardness_strength=1.5)


@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_guide_is_not_truncated(margin_strategy):
    batch = make_batch(4, 13, columns=2, positives=6, offset=2, docs_3d=True, guide_dim=5, seed=6)
    check(batch, dims=[13, 9, 4], offset=2, directions=(QD, QQ, DD), margin=0.05, margin_strategy=margin_strategy,
          hardness_mode="in_batch_negatives", hardness_strength=1.0)


def test_doc_ids_with_guide():
    batch = make_batch(5, 10, columns=2, guide_dim=4, seed=7)
    batch["doc_ids"] = torch.tensor([0, 1, 2, 3, 4, 1, 9, 0, 3, 3])  # duplicates across and within columns
    check(batch, dims=[10, 4], directions=(QD, QQ, DD), margin=0.1)


def test_doc_ids_all_directions():
    batch = make_batch(5, 10, columns=2, seed=7)
    batch["doc_ids"] = torch.tensor([0, 1, 2, 3, 4, 1, 9, 0, 3, 3])
    check(batch, dims=[10, 4], directions=ALL)


def test_zero_prefix_norm():
    """A row whose first dims are all zero: F.normalize divides by eps there, the gradient stays finite."""
    batch = make_batch(4, 8, columns=2, seed=8)
    batch["queries"][1, :3] = 0.0
    batch["docs"][5, :3] = 0.0
    check(batch, dims=[8, 3])


@pytest.mark.parametrize("layout", ["slice", "transposed", "every_other_col"])
def test_strided_nan_padded_inputs(layout):
    batch = make_batch(3, 7, columns=2, positives=6, offset=2, gathered=True, seed=9)
    strided = {k: nan_padded(v, layout) for k, v in batch.items()}
    check(strided, dims=[7, 4, 1], offset=2, directions=ALL)


@pytest.mark.parametrize(("dim", "dims"), [(12, [12, 5]), (45, [45, 32, 17, 16, 3])],
                         ids=["D_below_one_chunk", "dims_inside_and_on_chunk_edges"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_backward_tiles_and_segments_on_nan_padded_operands(monkeypatch, guided, dim, dims):
    """The backward's loops with small tiles (a program owns 16 rows or columns, sweeps 32 at a time in passes of
    64, 16 output dims per product): 37 rows and 74-80 columns over several tiles and passes with ragged last ones,
    dim segments inside one chunk, ending inside chunks and on their edges, D below one chunk; the embeddings reach
    the kernels inside NaN-filled buffers (row stride D + 5), so that a missing mask shows as NaN."""
    import triton

    from fastcache.triton import matryoshka as kernels

    for key in kernels.BACKWARD_CONFIGS:
        monkeypatch.setitem(kernels.BACKWARD_CONFIGS, key,
                            [triton.Config(dict(OWN=16, SWEPT=32, PASS=64, BLOCK_K=16, BLOCK_DO=16))])
    if guided:
        batch = make_batch(37, dim, columns=2, positives=40, offset=3, docs_3d=True, guide_dim=5, seed=16)
        options = dict(directions=(QD, QQ, DD), offset=3, margin=0.05, hardness_mode="all_negatives",
                       hardness_strength=1.0)
    else:
        batch = make_batch(37, dim, columns=2, seed=16)
        options = dict(directions=ALL, hardness_mode="in_batch_negatives", hardness_strength=1.0)
    padded = {k: nan_padded(v, "slice") for k, v in batch.items() if k != "guide_docs"}
    check(dict(batch, **padded), dims=dims, weights=[1.0, 0.5, 2.0, 1.0, 0.25][:len(dims)], **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", list(LOW_PRECISION_CASES))
def test_low_precision_no_worse_than_reference(dtype, case):
    """fp32 accumulation of the input dtype's products, per-dim scaling in fp32, on both op paths."""
    shape, options = LOW_PRECISION_CASES[case]
    assert_low_precision_no_worse_than_reference(shape, options, dtype, [
        lambda batch, path=path: path(batch, **TILED, **options) for path in MATRYOSHKA_OP_PATHS.values()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_low_precision_dims_across_output_tiles(dtype):
    """The backward tiles of 16-bit (128 output dims) and float32 inputs (64) with dims inside and on their edges.
    (No one-dim prefix here: x/|x| has a zero gradient that the reference gets exactly, ours up to rounding.)"""
    options = dict(dims=[300, 256, 130, 128, 37], directions=(QD, DQ), scale=30.0)
    assert_low_precision_no_worse_than_reference(dict(rows=3, dim=300, columns=2, noise=6.0), options, dtype,
                                                 [lambda batch: matryoshka_op_loss_and_grad(batch, **TILED, **options)])


def test_same_as_the_slab():
    """float32, the other strategy of the same op: equal up to rounding."""
    batch = make_batch(6, 24, columns=2, dtype=torch.float32, seed=10)
    options = dict(dims=[24, 12, 5], weights=[1.0, 0.5, 0.25], directions=(QD, DQ), hardness_mode="all_negatives",
                   hardness_strength=1.0)
    assert_matches(matryoshka_op_loss_and_grad(batch, **TILED, **options),
                   matryoshka_op_loss_and_grad(batch, backend="torch", strategy="slab", **options),
                   rtol=1e-5, atol=1e-6)


def test_deterministic():
    batch = make_batch(70, 8, columns=2, seed=11, dtype=torch.float32)
    first = matryoshka_op_loss_and_grad(batch, dims=[8, 3], directions=ALL, **TILED)
    second = matryoshka_op_loss_and_grad(batch, dims=[8, 3], directions=ALL, **TILED)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


def test_loss_only_forward():
    """Without inputs that need gradients the backward kernels do not run; the loss is the same."""
    batch = make_batch(5, 9, columns=2, seed=12)
    expected, _ = matryoshka_reference_loss_and_grads(batch, dims=[9, 4])
    loss = matryoshka_contrastive_loss(batch["queries"], batch["docs"], dims=[9, 4], **TILED)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# selection: strategy argument and FASTCACHE_STRATEGY, auto, errors
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def tiled_calls(monkeypatch):
    """Counts the calls of the tiled strategy."""
    from fastcache.ops.matryoshka import tiled as triton_matryoshka

    calls = []
    original = triton_matryoshka.matryoshka_tiled
    monkeypatch.setattr(triton_matryoshka, "matryoshka_tiled", lambda *a: calls.append(1) or original(*a))
    return calls


def test_strategy_from_argument_and_env(monkeypatch, tiled_calls):
    batch = make_batch(4, 6, columns=2, seed=13)
    tiled = matryoshka_op_loss_and_grad(batch, dims=[6, 2], **TILED)
    assert len(tiled_calls) == 1
    monkeypatch.setenv("FASTCACHE_STRATEGY", "tiled")
    assert_matches(matryoshka_op_loss_and_grad(batch, dims=[6, 2], backend="triton"), tiled, rtol=0, atol=0)
    assert len(tiled_calls) == 2
    monkeypatch.setenv("FASTCACHE_BACKEND", "triton")  # auto strategy on CPU: the slab
    monkeypatch.setenv("FASTCACHE_STRATEGY", "auto")
    assert_matches(matryoshka_op_loss_and_grad(batch, dims=[6, 2]), tiled, rtol=1e-12, atol=1e-13)
    assert len(tiled_calls) == 2


def test_tiled_needs_triton(monkeypatch):
    batch = make_batch(3, 4, seed=14)
    for backend in ("cpu", "torch"):
        with pytest.raises(RuntimeError, match="strategy 'tiled' runs Triton kernels: it needs backend 'triton'"):
            matryoshka_contrastive_loss(batch["queries"], batch["docs"], dims=[4, 2], backend=backend,
                                        strategy="tiled")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here.*TRITON_INTERPRET"):
        matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=[4, 2], strategy="tiled")


def test_unknown_strategy_is_a_value_error():
    batch = make_batch(3, 4, seed=14)
    with pytest.raises(ValueError, match=r"^strategy must be one of auto, slab, tiled, fused_slab, sparse; got 'bogus'"):
        matryoshka_contrastive_loss(batch["queries"], batch["docs"], dims=[4, 2], strategy="bogus")


# ---------------------------------------------------------------------------------------------------------------
# the library on the tiled path: a fastcache Matryoshka loss class
# ---------------------------------------------------------------------------------------------------------------

INNER_LOSSES = {
    "cached_mnrl": lambda model, guide, losses: losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=2),
    "cached_gist": lambda model, guide, losses: losses.CachedGISTEmbedLoss(model, guide, mini_batch_size=2,
                                                                           margin=0.05),
    "symmetric": lambda model, guide, losses: losses.MultipleNegativesSymmetricRankingLoss(model),
}


@pytest.mark.parametrize("inner", list(INNER_LOSSES))
def test_matryoshka_loss_class_on_tiled_matches_cpu(tiny_model, tiny_guide_model, monkeypatch, inner):
    """fastcache.losses.MatryoshkaLoss over a fused inner loss (plain, cached, GIST, symmetric) with
    FASTCACHE_BACKEND=triton FASTCACHE_STRATEGY=tiled: the loss and parameter gradients of the CPU slab."""
    from fastcache import losses

    texts = [["the cat sat", "a dog ran far", "sun and weather", "nice car today", "work work"],
             ["cat sat", "the dog ran", "nice weather sun", "a car", "the work today"],
             ["dog query", "document cat", "car sun", "weather", "a query today"]]
    columns = texts if inner != "symmetric" else texts[:2]
    results = {}
    for backend, strategy in (("cpu", "slab"), ("triton", "tiled")):
        monkeypatch.setenv("FASTCACHE_BACKEND", backend)
        monkeypatch.setenv("FASTCACHE_STRATEGY", strategy)
        tiny_model.zero_grad(set_to_none=True)
        loss = losses.MatryoshkaLoss(tiny_model, INNER_LOSSES[inner](tiny_model, tiny_guide_model, losses),
                                     [32, 16, 5], matryoshka_weights=[1.0, 0.5, 2.0])
        value = loss([tiny_model.preprocess(column) for column in columns], None)
        value.backward()
        results[backend] = (value.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()
                                             if p.grad is not None})
    tiny_model.zero_grad(set_to_none=True)
    (loss_cpu, grads_cpu), (loss_tiled, grads_tiled) = results["cpu"], results["triton"]
    assert float(loss_cpu) > 1e-3 and grads_cpu.keys() == grads_tiled.keys()
    torch.testing.assert_close(loss_tiled, loss_cpu, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads_cpu.values())
    assert scale > 1e-4
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_tiled[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the same kernels compiled for the GPU (no GPU needed): tests/native/test_triton_compile.py
# ---------------------------------------------------------------------------------------------------------------
