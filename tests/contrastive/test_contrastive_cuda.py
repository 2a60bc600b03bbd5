"""The CUDA slab epilogue (csrc/cuda/contrastive_epilogue.cu) on a GPU: marked ``cuda``, run by bench/gpu_suite.sh.

* the epilogue contract: ``EPILOGUES["cuda"]`` against the pure-PyTorch epilogue in float64 on the same random
  similarity blocks, every option (directions, partition modes, hardness modes, guide masks with both margin
  strategies, duplicate ids, gathered offsets, chunk rows row0 > 0), odd sizes, NaN-padded (strided) blocks,
  float32 and float64, with and without the gradient;
* the op end to end: ``contrastive_loss(..., backend="cuda")`` against the dense reference;
* the binding ``fastcache._C.contrastive_epilogue_cuda``: its argument checks and a non-default stream.

Without a GPU (or without the CUDA build of the extension) every test skips with the reason; with
``FASTCACHE_REQUIRE_CUDA=1`` (set by bench/gpu_suite.sh) they fail instead, so a broken GPU build cannot pass.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from fastcache import _backend
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions
from fastcache.ops.contrastive.options import kernel_params
from helpers import OP_PATHS, assert_matches, make_batch, reference_loss_and_grads

pytestmark = pytest.mark.cuda

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}


def _cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device"
    if _backend.EXTENSION is None:
        return f"fastcache._C is not built: {_backend.EXTENSION_ERROR}"
    if not hasattr(_backend.EXTENSION, "contrastive_epilogue_cuda"):
        return "fastcache._C was built without the CUDA kernels (FASTCACHE_BUILD_CUDA=1 builds them)"
    return None


@pytest.fixture(autouse=True)
def _needs_cuda():
    reason = _cuda_missing()
    if reason is not None:
        if os.environ.get("FASTCACHE_REQUIRE_CUDA") == "1":
            pytest.fail(f"FASTCACHE_REQUIRE_CUDA=1 but {reason}")
        pytest.skip(reason)


def _epilogue_cuda():
    assert "cuda" in contrastive_epilogue.EPILOGUES, "contrastive_epilogue.EPILOGUES has no 'cuda' entry"
    return contrastive_epilogue.EPILOGUES["cuda"]


def _padded(values: torch.Tensor, pad: bool) -> torch.Tensor:
    """``values`` as is, or as a strided view inside a NaN-filled buffer with 3 more columns per row."""
    if not pad:
        return values.clone()
    big = torch.full((values.size(0), values.size(1) + 3), float("nan"), dtype=values.dtype, device=values.device)
    view = big[:, 1:1 + values.size(1)]
    view.copy_(values)
    return view


def _case(chunk, row0, rows, positives, columns, options, *, guided, ids, gathered, seed, device="cuda"):
    """Random raw similarity blocks (and guide blocks, doc ids) of rows row0 .. row0+chunk of one call, float64 on
    ``device``, with the layout: what the slab driver hands an epilogue."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = columns * positives
    query_columns = positives if gathered else rows
    widths = {QD: n, QQ: rows if guided else query_columns, DQ: query_columns, DD: positives if guided else n}

    def uniform(width):
        return torch.rand(chunk, width, generator=g, device=device, dtype=torch.float64) * 2 - 1

    blocks = {k: uniform(widths[k]) for k in options.directions}
    pos = options.offset + row0 + torch.arange(chunk, device=device)
    blocks[QD][torch.arange(chunk, device=device), pos] += 0.5  # positives a little more similar
    guides = {}
    if guided:
        guides = {k: uniform(widths[k]) for k in options.directions}
        guides[QD][torch.arange(chunk, device=device), pos] = 0.6  # a guide that masks some columns, not all
    doc_ids = torch.randint(0, max(1, n // 2), (n,), generator=g, device=device) if ids else None
    layout = ContrastiveLayout(rows, positives, columns, 8, query_columns, options.offset if gathered else 0)
    return blocks, guides, doc_ids, layout


def _compare(blocks, guides, doc_ids, row0, layout, options, dtype, pad, compute_grad, tol=None, epilogue=None):
    """``epilogue`` (default EPILOGUES["cuda"]) on ``dtype`` (optionally NaN-padded) copies against epilogue_torch in
    float64 on the same values (rounded to ``dtype`` first)."""
    tol = tol or TOL[dtype]
    epilogue = epilogue or _epilogue_cuda()
    blocks = {k: v.to(dtype).double() for k, v in blocks.items()}
    guides = {k: v.to(dtype).double() for k, v in guides.items()}
    expected_blocks = {k: v.clone() for k, v in blocks.items()}
    expected = contrastive_epilogue.epilogue_torch(expected_blocks, guides, doc_ids, row0, layout, options,
                                                   compute_grad)
    ours_blocks = {k: _padded(v.to(dtype), pad) for k, v in blocks.items()}
    ours_guides = {k: _padded(v.to(dtype), pad) for k, v in guides.items()}
    loss = epilogue(ours_blocks, ours_guides, doc_ids, row0, layout, options, compute_grad)
    if loss.is_cuda:
        torch.cuda.synchronize()
    assert loss.dtype == dtype and loss.shape == expected.shape
    torch.testing.assert_close(loss.double(), expected, **tol)
    for k, v in ours_blocks.items():
        if pad:  # the padding around the block is never touched
            assert torch.isnan(v.as_strided((v.size(0), 1), (v.stride(0), 1), v.storage_offset() - 1)).all(), k
            assert torch.isnan(v.as_strided((v.size(0), 2), (v.stride(0), 1), v.storage_offset() + v.size(1))).all()
        if compute_grad:
            torch.testing.assert_close(v.double(), expected_blocks[k], **tol, msg=lambda m, k=k: f"{k}: {m}")
        else:  # without the gradient the similarity blocks are not rewritten
            torch.testing.assert_close(v, blocks[k].to(dtype), rtol=0, atol=0)


DIRECTION_SETS = [(QD,), (QD, DQ), (QD, QQ), (QD, DD), (QD, QQ, DQ, DD)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("directions", DIRECTION_SETS, ids=lambda d: "+".join(x[0] + x[-3] for x in d))
@pytest.mark.parametrize("partition_mode", ["joint", "per_direction"])
@pytest.mark.parametrize("hardness_mode", HARDNESS_MODES)
def test_epilogue_every_option(dtype, directions, partition_mode, hardness_mode):
    if partition_mode == "per_direction" and {QQ, DD} & set(directions):
        pytest.skip("per_direction needs every direction to hold the positive")
    for gathered, ids, pad, compute_grad in itertools.product([False, True], repeat=4):
        options = ContrastiveOptions(scale=20.0, directions=directions, partition_mode=partition_mode,
                                     hardness_mode=hardness_mode, hardness_strength=2.5 if hardness_mode else 0.0,
                                     offset=3 if gathered else 0)
        rows, positives = 11, 17 if gathered else 11
        data = _case(6, 5, rows, positives, 3, options, guided=False, ids=ids, gathered=gathered, seed=1)
        _compare(*data[:3], 5, data[3], options, dtype, pad, compute_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("directions", [(QD,), (QD, QQ), (QD, DD), (QD, QQ, DD)], ids=str)
@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_epilogue_guided(dtype, directions, margin_strategy):
    for ids, pad, hardness_mode in itertools.product([False, True], [False, True], HARDNESS_MODES):
        options = ContrastiveOptions(scale=20.0, directions=directions, margin=0.1, margin_strategy=margin_strategy,
                                     hardness_mode=hardness_mode, hardness_strength=1.5 if hardness_mode else 0.0)
        data = _case(7, 2, 9, 9, 2, options, guided=True, ids=ids, gathered=False, seed=2)
        _compare(*data[:3], 2, data[3], options, dtype, pad, True)


# (chunk, rows, positives, columns): one row; one column; a row longer than every thread block; sizes that are no
# multiple of a warp; a fully masked block (doc_to_doc with one positive column: every column is the row's own)
SHAPES = [(1, 1, 1, 1), (1, 1, 1, 5), (3, 3, 1000, 5), (2, 5, 40000, 1), (33, 33, 33, 3), (65, 130, 130, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_epilogue_shapes(dtype, shape):
    chunk, rows, positives, columns = shape
    gathered = positives != rows
    for partition_mode, directions in [("joint", (QD, QQ, DQ, DD)), ("per_direction", (QD, DQ))]:
        options = ContrastiveOptions(scale=7.0, directions=directions, partition_mode=partition_mode,
                                     hardness_mode="all_negatives", hardness_strength=1.0, offset=positives - rows)
        row0 = rows - chunk
        data = _case(chunk, row0, rows, positives, columns, options, guided=False, ids=True, gathered=gathered,
                     seed=3)
        _compare(*data[:3], row0, data[3], options, dtype, True, True)


def test_epilogue_large_logits():
    """Logits far beyond exp's range (scale 1000): the online max keeps everything finite (float32 rounds a logit
    of ~1000 to ~6e-5, hence the tolerance)."""
    options = ContrastiveOptions(scale=1000.0, directions=(QD, QQ, DQ, DD))
    data = _case(8, 0, 8, 8, 2, options, guided=False, ids=False, gathered=False, seed=4)
    _compare(*data[:3], 0, data[3], options, torch.float32, False, True, tol={"rtol": 1e-3, "atol": 0.05})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [
    {},
    {"directions": (QD, QQ, DQ, DD), "hardness_mode": "hard_negatives", "hardness_strength": 3.0},
    {"directions": (QD, DQ), "partition_mode": "per_direction", "similarity": "dot", "scale": 5.0},
    {"guided": True, "directions": (QD, QQ, DD), "margin": 0.05, "margin_strategy": "relative"},
    {"gathered": True, "directions": (QD, QQ, DQ), "offset": 4, "doc_ids": True},
], ids=["default", "all_dirs_hard", "per_direction_dot", "gist_relative", "gathered_ids"])
def test_op_backend_cuda_matches_reference(dtype, options):
    options = dict(options)
    guided, gathered, with_ids = (options.pop(k, False) for k in ("guided", "gathered", "doc_ids"))
    batch = make_batch(13, 24, columns=3, positives=21 if gathered else None, offset=options.get("offset", 0),
                       gathered=gathered, guide_dim=16 if guided else None, dtype=dtype, seed=5)
    if with_ids:
        batch["doc_ids"] = torch.arange(batch["docs"].size(0)) % 17
    batch = {k: v.cuda() for k, v in batch.items()}
    expected = reference_loss_and_grads(batch, **options)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}  # {}: helpers' float64 tolerances
    for chunk_size in (None, 4):
        for path in OP_PATHS.values():
            assert_matches(path(batch, backend="cuda", chunk_size=chunk_size, **options), expected, **tol)


def _binding_args(qd, **overrides):
    """The binding's positional arguments for a query_to_doc-only call on ``qd`` (rows 0.., P = rows)."""
    args = {"query_to_doc": qd, "query_to_query": None, "doc_to_query": None, "doc_to_doc": None,
            "guide_query_to_doc": None, "guide_query_to_query": None, "guide_doc_to_doc": None, "doc_ids": None}
    layout = ContrastiveLayout(qd.size(0), qd.size(0), 1, 1, qd.size(0), 0)
    params = kernel_params(ContrastiveOptions(scale=20.0), layout, 1)
    args.update((k, v) for k, v in overrides.items() if k in args)
    params = params._replace(**{k: v for k, v in overrides.items() if k not in args})
    return [*args.values(), params, torch.cuda.current_stream(qd.device).cuda_stream]


@pytest.mark.parametrize("make_overrides, message", [
    (lambda: {"query_to_doc": torch.zeros(4, 8)}, "query_to_doc must be a CUDA tensor"),
    (lambda: {"query_to_doc": torch.zeros(4, 8, device="cuda", dtype=torch.bfloat16)}, "float32 or float64"),
    (lambda: {"query_to_doc": torch.zeros(4, 8, device="cuda").t()}, "contiguous along its last dimension"),
    (lambda: {"doc_to_query": torch.zeros(3, 4, device="cuda")}, "doc_to_query must be 2-D with 4 rows"),
    (lambda: {"doc_to_query": torch.zeros(4, 4, device="cuda", dtype=torch.float64)}, "doc_to_query must have dtype"),
    (lambda: {"query_to_query": torch.zeros(4, 4)}, "query_to_query must be on cuda"),
    (lambda: {"query_to_query": torch.zeros(4, 2, device="cuda")}, "own query columns"),
    (lambda: {"doc_to_doc": torch.zeros(4, 2, device="cuda")}, "doc_to_doc must have 4 to 8 columns"),
    (lambda: {"doc_ids": torch.zeros(7, dtype=torch.long, device="cuda")}, "doc_ids must be a contiguous int64 vector"),
    (lambda: {"doc_ids": torch.zeros(8, dtype=torch.int32, device="cuda")}, "doc_ids must be a contiguous int64 vector"),
    (lambda: {"guide_query_to_doc": torch.zeros(4, 7, device="cuda")}, "guide_query_to_doc must have the shape"),
    (lambda: {"guide_query_to_query": torch.zeros(4, 4, device="cuda")}, "guide_query_to_query given without"),
    (lambda: {"row0": 2}, "exceed the 4 positives"),
    (lambda: {"num_positives": 9}, "num_positives must be 1 to the 8 columns"),
    (lambda: {"batch_size": 0}, "batch_size must be positive"),
    (lambda: {"hardness_mode": 4}, "hardness_mode must be 0"),
    (lambda: {"margin_strategy": 2}, "margin_strategy must be 0"),
])
def test_binding_rejects_bad_arguments(make_overrides, message):
    qd = torch.zeros(4, 8, device="cuda")
    with pytest.raises(RuntimeError, match=message):
        _backend.EXTENSION.contrastive_epilogue_cuda(*_binding_args(qd, **make_overrides()))


def test_binding_runs_on_the_given_stream():
    """The kernel runs on the stream passed in: a side stream's result, after synchronising it, equals the
    default stream's, and the binding's result does not depend on which stream is current."""
    g = torch.Generator(device="cuda").manual_seed(6)
    values = torch.rand(64, 3000, generator=g, device="cuda") * 2 - 1
    a, b = values.clone(), values.clone()
    loss_a = _backend.EXTENSION.contrastive_epilogue_cuda(*_binding_args(a, num_positives=64, batch_size=64))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        loss_b = _backend.EXTENSION.contrastive_epilogue_cuda(*_binding_args(b, num_positives=64, batch_size=64,
                                                                             stream=side.cuda_stream))
    side.synchronize()
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=0)
    torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert not torch.equal(a, values)  # the gradient was written in place
