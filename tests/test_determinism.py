"""Determinism: the same inputs give bitwise-identical losses and gradients, run after run, on every backend.

What is guaranteed (and checked here, on CPU; on a CUDA machine the same tests run the GPU backends), for a
fixed backend, dtype, memory budget / chunk size and thread count:
* the op's loss and gradients are bitwise identical across calls in one process, across its two paths
  (``contrastive_loss`` + backward and ``contrastive_loss_and_grad``), and across processes (a fresh process has
  other heap addresses, hence other alignments for the vectorised C++ loops);
* the Matryoshka op likewise (both paths, every backend and Triton strategy that runs here, several dims and
  weights);
* the drop-in losses through a model (dropout off) give bitwise-identical losses and parameter gradients run
  after run, the cached ones included (their gradient cache replays the same mini-batches), and so does
  fastcache's MatryoshkaLoss around them;
* the C++ epilogue is parallel over rows with no cross-row reduction, so its own part is independent of the
  thread count.

What is not (documented exceptions): results are equal only to rounding, not bitwise,
* across thread counts: torch's GEMMs block their reductions by the number of threads;
* across chunk sizes / memory budgets: the gradient GEMMs accumulate over chunks in another order;
* across backends (C++ vs PyTorch epilogue: another exp and summation order; tests/contrastive/test_contrastive_op.py
  bounds their difference), and across machines with other instruction sets (AVX-512 vs AVX2 lanes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastcache import _backend
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from drop_in_losses import LOSSES, MATRYOSHKA_INNER, TEXTS, make_loss, make_matryoshka_loss
from helpers import MATRYOSHKA_OP_PATHS, OP_PATHS, make_batch

# the Triton interpreter's own use of NumPy (runtime loop bounds), not ours
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
TESTS = Path(__file__).resolve().parent
QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
# (device, backend, strategy) for everything that can run here: the CPU backends, Triton's two strategies
# (through the interpreter on CPU, which is sequential: it shows the maths is order-stable, not that the GPU
# kernels are), and on a machine with CUDA the GPU backends (where atomics or split reductions would show).
DEVICES = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
RUNNERS = [(device, name, strategy) for device in DEVICES
           for name, reason in contrastive_epilogue.available(device).items() if reason is None
           for strategy in (("slab", "tiled") if name == "triton" else (None,))]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CASES = {
    "plain": (dict(rows=37, dim=50, columns=2), dict(chunk_size=16)),
    "all_dirs_hardness": (dict(rows=37, dim=50, columns=3),
                          dict(directions=(QD, QQ, DQ, DD), hardness_mode="all_negatives", hardness_strength=1.0,
                               chunk_size=10)),
    "gathered": (dict(rows=20, dim=33, columns=2, positives=45, offset=20, gathered=True),
                 dict(directions=(QD, QQ, DQ), offset=20, chunk_size=7)),
    "guided_ids": (dict(rows=24, dim=40, columns=2, guide_dim=12),
                   dict(directions=(QD, QQ, DD), margin=0.05, chunk_size=9)),
}


def _runner_id(runner) -> str:
    return "-".join([runner[0].type] + [x for x in runner[1:] if x])


def _settings(runner) -> tuple[torch.device, dict]:
    device, backend, strategy = runner
    if backend == "cpu" and _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")
    return device, {"backend": backend} if strategy is None else {"backend": backend, "strategy": strategy}


# the Triton interpreter is slow: float32 and bfloat16 in the default budget, float16 and float64 marked slow
OP_PARAMS = [pytest.param(runner, dtype, id=f"{_runner_id(runner)}-{dtype}",
                          marks=[pytest.mark.slow] if runner[0].type == "cpu" and runner[1] == "triton"
                          and dtype in ("float16", "float64") else [])
             for runner in RUNNERS for dtype in DTYPES]


def _batch(case: str, dtype: torch.dtype) -> tuple[dict, dict]:
    shape, options = CASES[case]
    batch = make_batch(**shape, dtype=dtype, seed=50)
    if case == "guided_ids":
        batch["doc_ids"] = torch.arange(batch["docs"].size(0)) % 11
    return batch, options


def _flat(result) -> list[torch.Tensor]:
    loss, grads = result
    return [loss] + [grads[k] for k in sorted(grads)]


def assert_bitwise_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, i
        # compare the bits, so that -0.0 vs 0.0 or NaN payloads would count as differences too
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)), f"output {i} differs"


@pytest.mark.parametrize("runner,dtype", OP_PARAMS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_repeated_calls_and_both_paths(runner, case, dtype):
    device, settings = _settings(runner)
    batch, options = _batch(case, DTYPES[dtype])
    batch = {k: v.to(device) for k, v in batch.items()}
    if settings.get("strategy") == "tiled":
        options = {k: v for k, v in options.items() if k != "chunk_size"}
    runs = [_flat(path(batch, **settings, **options)) for path in OP_PATHS.values() for _ in range(2)]
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])


# The Matryoshka op: its own sweep over D around the same epilogues (slab), or Triton's multi-dim kernels (tiled);
# the Triton interpreter (1-5 s a case here when idle, 20-30 s on a busy machine) on float32
MATRYOSHKA_PARAMS = [pytest.param(runner, case, dtype, id=f"{case}-{_runner_id(runner)}-{dtype}")
                     for runner in RUNNERS for case in CASES for dtype in DTYPES
                     if runner[1] != "triton" or dtype == "float32"]


@pytest.mark.parametrize("runner,case,dtype", MATRYOSHKA_PARAMS)
def test_matryoshka_op_repeated_calls_and_both_paths(runner, case, dtype):
    device, settings = _settings(runner)
    batch, options = _batch(case, DTYPES[dtype])
    batch = {k: v.to(device) for k, v in batch.items()}
    dim = batch["queries"].size(1)
    options = dict(options, dims=[dim, dim // 2 + 1, 3], weights=[1.0, 0.5, 0.25])
    if settings.get("strategy") == "tiled":
        options.pop("chunk_size")
    runs = [_flat(path(batch, **settings, **options)) for path in MATRYOSHKA_OP_PATHS.values() for _ in range(2)]
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])


_SUBPROCESS = """
import sys, torch
sys.path.insert(0, {tests!r})
import test_determinism as t
from helpers import OP_PATHS
out = {{}}
for case in t.CASES:
    for dtype in ("float32", "bfloat16"):
        batch, options = t._batch(case, t.DTYPES[dtype])
        out[(case, dtype)] = t._flat(OP_PATHS["loss_and_grad"](batch, backend={backend!r}, **options))
torch.save(out, {path!r})
"""


@pytest.mark.parametrize("backend", [name for device, name, _ in RUNNERS if device.type == "cpu"
                                     and name in ("cpu", "torch")])
def test_op_across_processes(backend, tmp_path):
    """A fresh process (other heap addresses and alignments, same thread count) gives the same bits."""
    _settings((torch.device("cpu"), backend, None))
    path = tmp_path / "results.pt"
    code = _SUBPROCESS.format(tests=str(TESTS), backend=backend, path=str(path))
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300,
                   env={**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())})
    theirs = torch.load(path)
    for (case, dtype), result in theirs.items():
        batch, options = _batch(case, DTYPES[dtype])
        assert_bitwise_equal(_flat(OP_PATHS["loss_and_grad"](batch, backend=backend, **options)), result)


def test_cpu_epilogue_independent_of_thread_count():
    """The C++ epilogue alone (blocks in, dL/ds and row losses out) is bitwise the same on 1 and 2+ threads."""
    if _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")
    from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions

    gen = torch.Generator().manual_seed(51)
    rows, positives = 64, 64
    options = ContrastiveOptions(scale=20.0, directions=(QD, QQ, DQ, DD), hardness_mode="in_batch_negatives",
                                 hardness_strength=2.0)
    layout = ContrastiveLayout(rows, positives, 2, 8, positives, 0)
    blocks = {QD: torch.rand(rows, 2 * positives, generator=gen) * 2 - 1,
              QQ: torch.rand(rows, positives, generator=gen) * 2 - 1,
              DQ: torch.rand(rows, positives, generator=gen) * 2 - 1,
              DD: torch.rand(rows, 2 * positives, generator=gen) * 2 - 1}
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            copies = {k: v.clone() for k, v in blocks.items()}
            loss_rows = contrastive_epilogue.epilogue_cpu(copies, {}, None, 0, layout, options, True)
            results.append([loss_rows] + [copies[k] for k in sorted(copies)])
    finally:
        torch.set_num_threads(threads)
    assert_bitwise_equal(results[1], results[0])




def _three_steps_bitwise_equal(loss, tiny_model) -> None:
    """Three training steps of ``loss`` through the model: the same loss and parameter gradients, bit for bit."""
    runs = []
    for _ in range(3):
        tiny_model.zero_grad(set_to_none=True)
        value = loss([tiny_model.preprocess(column) for column in TEXTS], None)
        value.backward()
        runs.append([value.detach()] + [p.grad.clone() for p in tiny_model.parameters() if p.grad is not None])
    tiny_model.zero_grad(set_to_none=True)
    assert float(runs[0][0]) > 0 and len(runs[0]) > 10
    for run in runs[1:]:
        assert_bitwise_equal(run, runs[0])


@pytest.mark.parametrize("name", list(LOSSES))
def test_losses_through_the_model(tiny_model, tiny_guide_model, name):
    _three_steps_bitwise_equal(make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name]), tiny_model)


@pytest.mark.parametrize("inner", MATRYOSHKA_INNER)
def test_matryoshka_loss_through_the_model(tiny_model, tiny_guide_model, inner):
    _three_steps_bitwise_equal(make_matryoshka_loss(inner, tiny_model, tiny_guide_model), tiny_model)
