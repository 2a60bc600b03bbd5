"""The fused_slab strategy (slab v2: fastcache/ops/contrastive/fused_slab.py, kernels in
fastcache/triton/contrastive_fused_slab.py) on CPU tensors through the Triton interpreter, against the dense
reference (fastcache/reference.py): every direction / partition / hardness / similarity variant in float64, odd
shapes (B = 1, D = 1, 384 and 1000, N not a multiple of any tile), several forward column tiles (their partials
merged) and backward tiles with ragged last ones, row chunks, offsets, gathered queries, guides with both margin
strategies, duplicate ids, NaN-padded strided inputs and a NaN-filled stored-logit buffer, float32 / bfloat16 /
float16 against the reference's own error (bf16 at scale 20 and 50 too: the stored e in bf16), both public paths,
determinism, the strategy's errors (backend, Matryoshka; the gradient filter's: tests/contrastive/test_filter_eps.py)
and that ``auto`` never picks it. The same kernels compiled for sm_90: tests/native/test_triton_compile.py.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from fastcache import contrastive_loss, contrastive_loss_and_grad  # noqa: E402
from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions, fused_slab  # noqa: E402
from fastcache.ops.contrastive.op import _strategy  # noqa: E402
from fastcache.ops.matryoshka import matryoshka_contrastive_loss  # noqa: E402
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
from test_contrastive_triton import VARIANTS  # noqa: E402

pytestmark = INTERPRETER_ONLY

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
ALL = (QD, QQ, DQ, DD)
# tiles small enough that tiny batches span several: forward 16 rows × 32 columns × 16 dims in groups of 2 row
# tiles, backward 16 × 16 × 16
SMALL_TILES = {"FORWARD_TILES": (16, 32, 16, 1, 1), "BACKWARD_TILES": (16, 16, 16, 1, 1)}


def check(batch, path="loss_and_grad", chunk_size=2, **options):
    """One op path with strategy fused_slab against the reference, in float64."""
    assert_matches(OP_PATHS[path](batch, backend="triton", strategy="fused_slab", chunk_size=chunk_size, **options),
                   reference_loss_and_grads(batch, **options))


@pytest.fixture
def small_tiles(monkeypatch):
    for name, tiles in SMALL_TILES.items():
        monkeypatch.setattr(fused_slab, name, {key: tiles for key in getattr(fused_slab, name)})
    monkeypatch.setattr(fused_slab, "FORWARD_GROUP", 2)


# ---------------------------------------------------------------------------------------------------------------
# 1. every variant and layout, float64
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("directions,partition_mode,hardness_mode,similarity", VARIANTS,
                         ids=["-".join(map(str, v[1:])) + "-" + "+".join(d[:5] for d in v[0]) for v in VARIANTS])
def test_variants_match_reference(directions, partition_mode, hardness_mode, similarity):
    batch = make_batch(5, 8, columns=2, seed=1)
    check(batch, directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
          hardness_strength=0.0 if hardness_mode is None else 3.0, similarity=similarity)


def test_autograd_path():
    batch = make_batch(4, 6, columns=2, positives=7, offset=2, gathered=True, seed=2)
    check(batch, path="autograd", directions=ALL, offset=2, hardness_mode="in_batch_negatives", hardness_strength=1.0)


def test_loss_only():
    """contrastive_loss on inputs that need no gradient: the forward alone (no e stored)."""
    batch = make_batch(5, 8, columns=2, seed=3)
    loss = contrastive_loss(batch["queries"], batch["docs"], directions=ALL, backend="triton",
                            strategy="fused_slab", chunk_size=3)
    torch.testing.assert_close(loss, reference_loss_and_grads(batch, directions=ALL)[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rows,dim,columns,chunk_size", [
    (1, 1, 1, None),  # B = 1, one dim
    (1, 5, 3, None),
    (3, 1, 2, 2),
    (13, 20, 3, 5),
    (70, 3, 2, None),  # the default tiles (64): two row and three column tiles, ragged
])
def test_shapes(rows, dim, columns, chunk_size):
    batch = make_batch(rows, dim, columns=columns, seed=3)
    check(batch, chunk_size=chunk_size, directions=ALL, hardness_mode="all_negatives", hardness_strength=1.0)


@pytest.mark.parametrize("dim", [384, 1000])
def test_large_dims(dim):
    """D = 384 and 1000: the forward's K loop, and several backward dim tiles with a ragged last one (1000)."""
    batch = make_batch(3, dim, columns=2, seed=4, noise=6.0)
    check(batch, directions=(QD, DQ), scale=30.0)


@pytest.mark.parametrize("dim", [8, 45], ids=["D_below_one_tile", "ragged_dim_tiles"])
def test_several_tiles_each_way(small_tiles, dim):
    """37 rows (chunks of 36: three row tiles, one group of two and a ragged one of one; then a chunk of one row)
    and 74 columns over three forward column tiles of 32 (the partials merged, the positive in any of them) and five
    backward tiles of 16, D below one dim tile or over three."""
    batch = make_batch(37, dim, columns=2, seed=18)
    check(batch, chunk_size=36, directions=ALL, hardness_mode="in_batch_negatives", hardness_strength=1.0)


def test_several_tiles_guided_gathered(small_tiles):
    batch = make_batch(37, 20, columns=2, positives=40, offset=3, docs_3d=True, guide_dim=5, seed=19)
    batch["doc_ids"] = torch.arange(80).view(2, 40) % 23
    check(batch, chunk_size=24, directions=(QD, QQ, DD), offset=3, margin=0.05, hardness_mode="all_negatives",
          hardness_strength=1.0)


@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("docs_3d", [False, True], ids=["docs2d", "docs3d"])
def test_gathered_offset(offset, docs_3d):
    batch = make_batch(3, 6, columns=2, positives=8, offset=offset, gathered=True, docs_3d=docs_3d, seed=5)
    check(batch, offset=offset, directions=ALL, hardness_mode="hard_negatives", hardness_strength=1.5)


def test_offset_without_all_queries():
    batch = make_batch(3, 6, columns=2, positives=7, offset=4, docs_3d=True, seed=6)
    check(batch, offset=4, directions=ALL)


@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 0.1), ("relative", 0.5), ("absolute", -0.2)])
@pytest.mark.parametrize("layout", ["local", "gathered"])
def test_guide(margin_strategy, margin, layout):
    if layout == "local":
        batch, offset = make_batch(5, 6, columns=2, guide_dim=3, seed=8), 0
    else:
        batch, offset = make_batch(3, 6, columns=2, positives=7, offset=2, docs_3d=True, guide_dim=3, seed=8), 2
    check(batch, margin=margin, margin_strategy=margin_strategy, directions=(QD, QQ, DD), offset=offset,
          hardness_mode="all_negatives", hardness_strength=1.0)


@pytest.mark.parametrize("directions", [(QD,), (QD, DD), ALL], ids=["qd", "qd+dd", "all"])
def test_doc_ids(directions):
    batch = make_batch(5, 6, columns=2, seed=11)
    batch["doc_ids"] = torch.tensor([0, 1, 2, 3, 4, 1, 9, 0, 3, 3])  # duplicates across and within columns
    check(batch, directions=directions)


def test_doc_ids_with_guide_and_offset():
    batch = make_batch(3, 6, columns=2, positives=6, offset=2, docs_3d=True, guide_dim=4, seed=12)
    batch["doc_ids"] = torch.tensor([[5, 1, 2, 3, 2, 7], [2, 8, 3, 9, 1, 5]])
    check(batch, directions=(QD, QQ, DD), offset=2, margin=0.1)


@pytest.mark.parametrize("layout", ["transposed", "every_other_col"])
def test_nan_padded_inputs(layout):
    batch = make_batch(3, 5, columns=2, positives=6, offset=2, gathered=True, seed=14)
    check({k: nan_padded(v, layout) for k, v in batch.items()}, offset=2, directions=ALL)


def test_stored_logits_buffer_nan_filled(monkeypatch, small_tiles):
    """The stored e in NaN-filled buffers (their padding columns and rows past a short last chunk included): the
    backward reads only what the forward wrote."""
    stored = []

    def nan_filled(rows, columns, dtype, device):
        stored.append(torch.full((rows + 3, (columns // 64 + 1) * 64 + 5), float("nan"), dtype=dtype)[1:1 + rows])
        return stored[-1]

    monkeypatch.setattr(fused_slab, "_stored_logits", nan_filled)
    batch = make_batch(21, 6, columns=2, positives=24, offset=2, gathered=True, seed=20)
    check(batch, chunk_size=8, offset=2, directions=ALL, hardness_mode="hard_negatives", hardness_strength=1.0)
    assert len(stored) == 4 and all(s.isnan().any() for s in stored)  # the padding stays NaN


def test_deterministic():
    batch = make_batch(37, 8, columns=2, seed=15, dtype=torch.float32)
    first = op_loss_and_grad(batch, backend="triton", strategy="fused_slab", directions=ALL, chunk_size=16)
    second = op_loss_and_grad(batch, backend="triton", strategy="fused_slab", directions=ALL, chunk_size=16)
    assert torch.equal(first[0], second[0])
    for k in first[1]:
        assert torch.equal(first[1][k], second[1][k]), k


# ---------------------------------------------------------------------------------------------------------------
# 2. low precision against the reference's own error (tolerance table: tests/helpers.py)
# ---------------------------------------------------------------------------------------------------------------

def _no_worse_than_reference(shape, options, dtype, path="loss_and_grad"):
    runs = low_precision_runs(shape, options, dtype, lambda batch: OP_PATHS[path](
        batch, backend="triton", strategy="fused_slab", chunk_size=3, **options))
    for k, (truth, reference, ours) in runs.items():
        assert_no_worse_than_reference(k, ours, reference, truth, torch.float32 if k == "loss" else dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["plain", "all_dirs_hardness", "per_direction_dot", "gathered", "guide"])
def test_low_precision_no_worse_than_reference(dtype, case):
    _no_worse_than_reference(*LOW_PRECISION_CASES[case], dtype)


@pytest.mark.parametrize("scale", [20.0, 50.0])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_stored_16_bit_logits_at_large_scales(dtype, scale):
    """The stored e in bf16 / fp16 at scale 20 and 50 (logits up to ±50), autograd path: no worse than the
    reference in the same dtype (figures: bench/fused_slab_precision.py)."""
    _no_worse_than_reference(dict(rows=8, dim=32, columns=2, noise=1.0), dict(scale=scale, directions=(QD, DQ)),
                             dtype, path="autograd")


# ---------------------------------------------------------------------------------------------------------------
# 3. selection and errors
# ---------------------------------------------------------------------------------------------------------------

def test_needs_backend_triton(monkeypatch):
    batch = make_batch(3, 4, seed=17)
    for backend in ("cpu", "torch"):
        with pytest.raises(RuntimeError, match="strategy 'fused_slab' runs Triton kernels: it needs backend 'triton'"):
            contrastive_loss(batch["queries"], batch["docs"], backend=backend, strategy="fused_slab")
    monkeypatch.setenv("FASTCACHE_STRATEGY", "fused_slab")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run here.*TRITON_INTERPRET"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"])


def test_matryoshka_refuses_it():
    batch = make_batch(3, 8, seed=17)
    with pytest.raises(RuntimeError, match="strategy 'fused_slab' is the single-dim contrastive op's only"):
        matryoshka_contrastive_loss(batch["queries"], batch["docs"], dims=(8, 4), backend="triton",
                                    strategy="fused_slab")


@pytest.mark.parametrize("budget", [2**20, 2**40], ids=["small_budget", "large_budget"])
def test_auto_never_picks_it(budget):
    """On CUDA with every backend available, auto gives tiled or slab (the choice is unchanged), never fused_slab."""
    layout = ContrastiveLayout(rows=65536, positives=65536, columns=2, dim=768, query_columns=65536,
                               own_query_offset=0)
    available = {"cpu": None, "torch": None, "cuda": None, "triton": None}
    expected = "tiled" if budget == 2**20 else "slab"
    for backend in ("auto", "triton"):
        chosen = _strategy(layout, ContrastiveOptions(), False, 0, torch.device("cuda"), available, backend, "auto",
                           budget, None)
        assert chosen[0] == expected, (backend, chosen)
