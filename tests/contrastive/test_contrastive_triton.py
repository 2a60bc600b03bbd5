"""The Triton kernels of the contrastive op on CPU tensors, through the Triton interpreter (TRITON_INTERPRET=1).

Both strategies of backend "triton": slab (torch GEMMs + the Triton epilogue) and tiled (Triton forward and
backward kernels, nothing bigger than a tile), against the dense reference (fastcache/reference.py): every
direction / partition / hardness / similarity variant in float64, odd shapes (B = 1, B and N across several tiles
and not multiples of the tile, D = 1000 once), offsets, gathered queries, guides with both margin strategies,
duplicate ids, NaN-padded inputs and blocks, the tiled backward's loops with small tiles on kernel operands inside
NaN-filled buffers, float32 / bfloat16 / float16 against the reference's own error, the strategy setting and its
errors, a fastcache loss class run with FASTCACHE_BACKEND=triton (every kernel compiled for sm_90:
tests/native/test_triton_compile.py). The interpreter is slow: shapes are small. The same kernels on a real GPU:
tests/contrastive/test_contrastive_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

# only under the interpreter (the GPU runs tests/contrastive/test_contrastive_gpu.py)
pytest.importorskip("triton")

from fastcache import _backend, contrastive_loss, contrastive_loss_and_grad  # noqa: E402
from fastcache.ops.contrastive import epilogue as contrastive_epilogue  # noqa: E402
from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions  # noqa: E402
from helpers import (  # noqa: E402
    INTERPRETER_ONLY,
    OP_PATHS,
    assert_matches,
    assert_no_worse_than_reference,
    low_precision_runs,
    make_batch,
    nan_padded,
    op_loss_and_grad,
    reference_loss_and_grads,
)
from test_contrastive_op import LOW_PRECISION_CASES  # noqa: E402

pytestmark = INTERPRETER_ONLY

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
STRATEGIES = ("slab", "tiled")
CPU = torch.device("cpu")


@pytest.fixture(params=STRATEGIES)
def strategy(request):
    return request.param


def check(batch, strategy, path="loss_and_grad", **options):
    """One op path with backend triton and ``strategy`` against the reference, in float64."""
    chunk = {"chunk_size": 2} if strategy == "slab" else {}
    assert_matches(OP_PATHS[path](batch, backend="triton", strategy=strategy, **chunk, **options),
                   reference_loss_and_grads(batch, **options))


# ---------------------------------------------------------------------------------------------------------------
# 1. every variant, float64
# ---------------------------------------------------------------------------------------------------------------

VARIANTS = [  # directions, partition, hardness, similarity: every direction set with each hardness mode once
    ((QD,), "joint", None, "cos"),
    ((QD,), "joint", "in_batch_negatives", "dot"),
    ((QD,), "per_direction", "hard_negatives", "cos"),
    ((QD, DQ), "joint", "all_negatives", "cos"),
    ((QD, DQ), "per_direction", None, "dot"),
    ((QD, DQ), "per_direction", "in_batch_negatives", "cos"),
    ((QD, QQ), "joint", "hard_negatives", "dot"),
    ((QD, DD), "joint", "in_batch_negatives", "cos"),
    ((QD, DD), "joint", "all_negatives", "dot"),
    (ALL, "joint", None, "cos"),
    (ALL, "joint", "hard_negatives", "dot"),
    (ALL, "joint", "all_negatives", "cos"),
]


@pytest.mark.parametrize("directions,partition_mode,hardness_mode,similarity", VARIANTS,
                         ids=["-".join(map(str, v[1:])) + "-" + "+".join(d[:5] for d in v[0]) for v in VARIANTS])
def test_variants_match_reference(strategy, directions, partition_mode, hardness_mode, similarity):
    batch = make_batch(5, 8, columns=2, seed=1)
    check(batch, strategy, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
          hardness_strength=0.0 if hardness_mode is None else 3.0, similarity=similarity)


def test_autograd_path(strategy):
    batch = make_batch(4, 6, columns=2, positives=7, offset=2, gathered=True, seed=2)
    check(batch, strategy, path="autograd", directions=ALL, offset=2, hardness_mode="in_batch_negatives",
          hardness_strength=1.0)


SHAPES = [  # rows, dim, columns: B = 1; one dim; B and N across several 64-wide tiles, not multiples of them
    (1, 1, 1),
    (1, 5, 3),
    (3, 1, 2),
    (70, 3, 2),
    (13, 20, 3),
]


@pytest.mark.parametrize("rows,dim,columns", SHAPES)
def test_shapes(strategy, rows, dim, columns):
    batch = make_batch(rows, dim, columns=columns, seed=3)
    check(batch, strategy, directions=ALL, hardness_mode="all_negatives", hardness_strength=1.0)


def test_large_dim_spans_several_output_tiles(strategy):
    """D = 1000: the K loop and (tiled) several BLOCK_DO-wide output chunks with a ragged last one."""
    batch = make_batch(3, 1000, columns=2, seed=4, noise=6.0)
    check(batch, strategy, directions=(QD, DQ), scale=30.0)


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("docs_3d", [False, True], ids=["docs2d", "docs3d"])
def test_gathered_offset(strategy, offset, docs_3d):
    batch = make_batch(3, 6, columns=2, positives=8, offset=offset, gathered=True, docs_3d=docs_3d, seed=5)
    check(batch, strategy, offset=offset, directions=ALL, hardness_mode="hard_negatives", hardness_strength=1.5)


def test_offset_without_all_queries(strategy):
    batch = make_batch(3, 6, columns=2, positives=7, offset=4, docs_3d=True, seed=6)
    check(batch, strategy, offset=4, directions=ALL)


@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 0.1), ("relative", 0.5), ("absolute", -0.2)])
@pytest.mark.parametrize("layout", ["local", "gathered"])
def test_guide(strategy, margin_strategy, margin, layout):
    if layout == "local":
        batch, offset = make_batch(5, 6, columns=2, guide_dim=3, seed=8), 0
    else:
        batch, offset = make_batch(3, 6, columns=2, positives=7, offset=2, docs_3d=True, guide_dim=3, seed=8), 2
    check(batch, strategy, margin=margin, margin_strategy=margin_strategy, directions=(QD, QQ, DD), offset=offset,
          hardness_mode="all_negatives", hardness_strength=1.0)


def test_guide_dtype_and_dims_may_differ(strategy):
    batch = make_batch(4, 6, columns=2, guide_dim=3, seed=10)
    mixed = dict(batch, guide_queries=batch["guide_queries"].float(), guide_docs=batch["guide_docs"].float())
    expected = reference_loss_and_grads(batch, directions=(QD, QQ, DD), margin=0.1)
    actual = op_loss_and_grad(mixed, directions=(QD, QQ, DD), margin=0.1, backend="triton", strategy=strategy)
    assert_matches(actual, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("directions", [(QD,), (QD, DD), ALL], ids=["qd", "qd+dd", "all"])
def test_doc_ids(strategy, directions):
    batch = make_batch(5, 6, columns=2, seed=11)
    batch["doc_ids"] = torch.tensor([0, 1, 2, 3, 4, 1, 9, 0, 3, 3])  # duplicates across and within columns
    check(batch, strategy, directions=directions)


def test_doc_ids_with_guide_and_offset(strategy):
    batch = make_batch(3, 6, columns=2, positives=6, offset=2, docs_3d=True, guide_dim=4, seed=12)
    batch["doc_ids"] = torch.tensor([[5, 1, 2, 3, 2, 7], [2, 8, 3, 9, 1, 5]])
    check(batch, strategy, directions=(QD, QQ, DD), offset=2, margin=0.1)


@pytest.mark.parametrize("layout", ["transposed", "every_other_col"])
def test_nan_padded_inputs(strategy, layout):
    batch = make_batch(3, 5, columns=2, positives=6, offset=2, gathered=True, seed=14)
    strided = {k: nan_padded(v, layout) for k, v in batch.items()}
    check(strided, strategy, offset=2, directions=ALL)


def test_tiled_normalises_in_row_chunks(monkeypatch):
    """The tiled driver normalises (and back-propagates the normalisation) NORMALIZE_ROWS rows at a time."""
    from fastcache.ops.contrastive import normalize as op

    monkeypatch.setattr(op, "NORMALIZE_ROWS", 3)
    batch = make_batch(7, 5, columns=2, positives=8, offset=1, gathered=True, seed=13)
    check(batch, "tiled", offset=1, directions=ALL)


def _nan_padded_operands(original):
    """tiled's _normalized_in_own_dtype whose copies are views inside NaN-filled buffers (row stride D + 3, NaN rows and
    columns around): the kernels read past no mask without a NaN showing."""
    def copy(x, acc, cosine):
        y, norm = original(x, acc, cosine)
        buffer = torch.full((y.size(0) + 3, y.size(1) + 3), float("nan"), dtype=y.dtype)
        view = buffer[1:1 + y.size(0), 2:2 + y.size(1)]
        view.copy_(y)
        return view, norm
    return copy


@pytest.mark.parametrize("dim", [8, 45], ids=["D_below_one_chunk", "ragged_chunks"])
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
def test_tiled_backward_tiles_and_chunks_on_nan_padded_operands(monkeypatch, guided, dim):
    """The backward's loops with small tiles (a program owns 16 rows or columns, sweeps 32 at a time in passes of
    64, 16 output dims per product): 37 rows and 74-80 columns over several tiles and passes with ragged last
    ones, D below one product's dims or over three with a ragged last one; every kernel operand inside a
    NaN-filled buffer."""
    import triton

    from fastcache.ops.contrastive import tiled as triton_contrastive
    from fastcache.triton import contrastive as kernels

    for key in kernels.BACKWARD_CONFIGS:
        monkeypatch.setitem(kernels.BACKWARD_CONFIGS, key,
                            [triton.Config(dict(OWN=16, SWEPT=32, PASS=64, BLOCK_K=16, BLOCK_DO=16))])
    monkeypatch.setattr(triton_contrastive, "_normalized_in_own_dtype",
                        _nan_padded_operands(triton_contrastive._normalized_in_own_dtype))
    if guided:
        batch = make_batch(37, dim, columns=2, positives=40, offset=3, docs_3d=True, guide_dim=5, seed=18)
        check(batch, "tiled", directions=(QD, QQ, DD), offset=3, margin=0.05, hardness_mode="all_negatives",
              hardness_strength=1.0)
    else:
        batch = make_batch(37, dim, columns=2, seed=18)
        check(batch, "tiled", directions=ALL, hardness_mode="in_batch_negatives", hardness_strength=1.0)


def test_tiled_is_deterministic():
    batch = make_batch(70, 8, columns=2, seed=15, dtype=torch.float32)
    first = op_loss_and_grad(batch, backend="triton", strategy="tiled", directions=ALL)
    second = op_loss_and_grad(batch, backend="triton", strategy="tiled", directions=ALL)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


# ---------------------------------------------------------------------------------------------------------------
# 2. the slab epilogue alone: strided blocks inside NaN-filled buffers, against the PyTorch epilogue
# ---------------------------------------------------------------------------------------------------------------

def _padded_block(values: torch.Tensor) -> torch.Tensor:
    """values as a [c, n] view with row stride n + 3 inside a NaN-filled buffer."""
    buffer = torch.full((values.size(0) + 1, values.size(1) + 3), float("nan"), dtype=values.dtype)
    view = buffer[:values.size(0), 1:1 + values.size(1)]
    view.copy_(values)
    return view


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("compute_grad", [True, False], ids=["grad", "loss_only"])
def test_slab_epilogue_on_padded_blocks(dtype, guided, compute_grad):
    rows, positives, columns, row0 = 5, 9, 3, 2
    layout = ContrastiveLayout(rows=12, positives=positives, columns=columns, dim=4, query_columns=positives,
                               own_query_offset=1)
    options = ContrastiveOptions(directions=(QD, QQ, DD) if guided else ALL, offset=1, hardness_mode="all_negatives",
                                 hardness_strength=2.0, margin=0.05, scale=7.0)
    gen = torch.Generator().manual_seed(0)
    n = positives * columns
    widths = {QD: n, QQ: positives, DQ: positives, DD: positives if guided else n}
    sims = {k: torch.rand(rows, widths[k], generator=gen, dtype=dtype) * 2 - 1 for k in options.directions}
    guides = {k: torch.rand(rows, widths[k], generator=gen, dtype=dtype) for k in options.directions} if guided else {}
    ids = torch.randint(0, 6, (n,), generator=gen)
    expected_blocks = {k: v.clone() for k, v in sims.items()}
    expected = contrastive_epilogue.epilogue_torch(expected_blocks, guides, ids, row0, layout, options, compute_grad)
    blocks = {k: _padded_block(v) for k, v in sims.items()}
    loss = contrastive_epilogue.EPILOGUES["triton"](blocks, {k: _padded_block(v) for k, v in guides.items()}, ids,
                                                    row0, layout, options, compute_grad)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(loss, expected, **tol)
    for k, block in blocks.items():
        torch.testing.assert_close(block, expected_blocks[k] if compute_grad else sims[k], **tol, msg=k)
        assert block._base.isnan().sum() == block._base.numel() - block.numel()  # the padding stays untouched


# ---------------------------------------------------------------------------------------------------------------
# 3. low precision against the reference's own error (tolerance table: tests/helpers.py)
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain", "all_dirs_hardness", "per_direction_dot", "gathered", "guide"])
def test_low_precision_no_worse_than_reference(strategy, dtype, case):
    shape, options = LOW_PRECISION_CASES[case]
    chunk = {"chunk_size": 3} if strategy == "slab" else {}
    runs = low_precision_runs(shape, options, dtype, lambda batch: op_loss_and_grad(
        batch, backend="triton", strategy=strategy, **chunk, **options))
    for k, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32 if k == "loss" else dtype)


# ---------------------------------------------------------------------------------------------------------------
# 4. selection: backend triton on CPU, the strategy setting and its errors
# ---------------------------------------------------------------------------------------------------------------

def test_triton_is_available_on_cpu_under_the_interpreter(monkeypatch):
    assert contrastive_epilogue.available(CPU)["triton"] is None
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET=1" in contrastive_epilogue.available(CPU)["triton"]


def test_strategy_from_env_and_argument(monkeypatch):
    batch = make_batch(4, 6, columns=2, seed=16)
    calls = []
    monkeypatch.setitem(contrastive_epilogue.EPILOGUES, "triton",
                        lambda *args, _f=contrastive_epilogue.EPILOGUES["triton"]: calls.append(1) or _f(*args))
    tiled = op_loss_and_grad(batch, backend="triton", strategy="tiled")
    assert not calls
    monkeypatch.setenv("FASTCACHE_STRATEGY", "slab")
    slab = op_loss_and_grad(batch, backend="triton")
    assert calls
    monkeypatch.setenv("FASTCACHE_STRATEGY", "tiled")
    calls.clear()
    assert_matches(op_loss_and_grad(batch, backend="triton"), tiled, rtol=0, atol=0)
    assert not calls
    assert_matches(slab, tiled, rtol=1e-12, atol=1e-13)
    monkeypatch.setenv("FASTCACHE_BACKEND", "triton")  # auto strategy on CPU: the slab
    monkeypatch.delenv("FASTCACHE_STRATEGY")
    op_loss_and_grad(batch)
    assert calls


def test_tiled_needs_triton(monkeypatch):
    batch = make_batch(3, 4, seed=17)
    for backend in ("cpu", "torch"):
        with pytest.raises(RuntimeError, match="strategy 'tiled' runs Triton kernels: it needs backend 'triton'"):
            contrastive_loss(batch["queries"], batch["docs"], backend=backend, strategy="tiled")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here.*TRITON_INTERPRET"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"], strategy="tiled")


def test_unknown_strategy_is_a_value_error(monkeypatch):
    batch = make_batch(3, 4, seed=17)
    with pytest.raises(ValueError, match=r"^strategy must be one of auto, slab, tiled, fused_slab, sparse; got 'bogus'"):
        contrastive_loss(batch["queries"], batch["docs"], strategy="bogus")
    monkeypatch.setenv("FASTCACHE_STRATEGY", "Bogus")
    with pytest.raises(ValueError, match=r"^FASTCACHE_STRATEGY must be one of"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"])


def test_fastest_epilogue_is_timed_once_per_bucket(monkeypatch):
    """The auto choice between GPU epilogues (here the CPU ones stand in): the faster by the given clock, cached
    per shape bucket; every candidate leaves the caller's blocks untouched."""
    monkeypatch.setattr(contrastive_epilogue, "_FASTEST", {})
    layout = ContrastiveLayout(rows=6, positives=6, columns=2, dim=4, query_columns=6, own_query_offset=0)
    options = ContrastiveOptions()
    blocks = {QD: torch.rand(6, 12, generator=torch.Generator().manual_seed(0))}
    original = blocks[QD].clone()
    clock = {"triton": 1.0, "torch": 2.0}
    timed = []

    def seconds(name, run):
        run()
        timed.append(name)
        return clock[name]

    names = ("torch", "triton")
    assert contrastive_epilogue.fastest(names, blocks, {}, None, 0, layout, options, True, seconds) == "triton"
    assert timed == ["torch", "triton"] and torch.equal(blocks[QD], original)
    clock["triton"] = 3.0  # cached: not timed again for a block of the same bucket (rows 5..8, columns 9..16)
    smaller = {QD: blocks[QD][:5, :10]}
    assert contrastive_epilogue.fastest(names, smaller, {}, None, 0, layout, options, True, seconds) == "triton"
    assert len(timed) == 2
    bigger = {QD: torch.rand(6, 20)}
    assert contrastive_epilogue.fastest(names, bigger, {}, None, 0, layout, options, True, seconds) == "torch"
    assert len(timed) == 4


# ---------------------------------------------------------------------------------------------------------------
# 5. the library on the Triton path: a loss class with FASTCACHE_BACKEND=triton
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy_env", STRATEGIES)
def test_cached_mnrl_loss_class_on_triton_matches_cpu(tiny_model, monkeypatch, strategy_env):
    from fastcache import losses

    anchors = ["the cat sat", "a dog ran far", "sun and weather", "nice car today", "work work"]
    positives = ["cat sat", "the dog ran", "nice weather sun", "a car", "the work today"]
    negatives = ["dog query", "document cat", "car sun", "weather", "a query today"]
    results = {}
    for backend in ("cpu", "triton"):
        monkeypatch.setenv("FASTCACHE_BACKEND", backend)
        monkeypatch.setenv("FASTCACHE_STRATEGY", strategy_env if backend == "triton" else "slab")
        tiny_model.zero_grad(set_to_none=True)
        loss = losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=2)
        features = [tiny_model.preprocess(texts) for texts in (anchors, positives, negatives)]
        value = loss(features, None)
        value.backward()
        results[backend] = (value.detach(), {n: p.grad.clone() for n, p in tiny_model.named_parameters()
                                             if p.grad is not None})
    tiny_model.zero_grad(set_to_none=True)
    (loss_cpu, grads_cpu), (loss_triton, grads_triton) = results["cpu"], results["triton"]
    assert float(loss_cpu) > 1e-3 and grads_cpu.keys() == grads_triton.keys()
    torch.testing.assert_close(loss_triton, loss_cpu, rtol=1e-5, atol=1e-6)
    scale = max(float(g.abs().max()) for g in grads_cpu.values())
    assert scale > 1e-4
    for name, grad in grads_cpu.items():
        torch.testing.assert_close(grads_triton[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_available_reports_the_cuda_epilogue_reason():
    reason = contrastive_epilogue.available(CPU)["cuda"]
    if _backend.EXTENSION is not None and hasattr(_backend.EXTENSION, "contrastive_epilogue_cuda"):
        assert "CUDA tensors" in reason
    else:
        assert "contrastive_epilogue_cuda" in reason or "not available" in reason


# ---------------------------------------------------------------------------------------------------------------
# 6. the same kernels compiled for the GPU (no GPU needed): tests/native/test_triton_compile.py
# ---------------------------------------------------------------------------------------------------------------

# Every kernel of fastcache/triton/contrastive.py and matryoshka.py, compiled for sm_90 with the arguments the runtime
# passes at the headline shape (bench/triton_compile.py): ptxas spills, shared memory, wgmma, atomics, int64 offsets.
