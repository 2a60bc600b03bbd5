"""Shared test helpers: seeded embedding batches, NaN-padded strided views, the ops (contrastive, Matryoshka) and
their dense references run side by side, the per-dtype tolerances of the low-precision comparisons, and the CPU
emulation of the slab's low-precision CUDA GEMMs.

Low-precision tolerance (``assert_no_worse_than_reference``). The truth is the dense reference in float64 on the
low-precision inputs cast to float64 (so the inputs are the same numbers). For each output (the loss and every
gradient) the error of one batch is the largest absolute difference from the truth divided by the truth's largest
magnitude; it is averaged over a few seeded batches (one batch's reference error is itself a random variable:
the reference can be lucky by 5x on one seed, which made single-batch ratios flaky). We require

    mean error(ours) <= FACTOR * mean error(reference in the low dtype) + ATOL_ULPS[dtype] * eps(dtype)

The reference computes everything (similarities, softmax, autograd) in the low dtype, as sentence-transformers
does, so its error is what a user gets today; ours may be at most twice that, plus a few rounding units of the
output dtype (ours rounds its float32 gradients to the input dtype once).

    dtype      eps(dtype)   ATOL_ULPS   relative slack
    float32    1.19e-07     4           4.8e-07
    bfloat16   7.81e-03     1           7.8e-03
    float16    9.77e-04     1           9.8e-04

The loss of a low-precision call is float32 whatever the input dtype, so the loss always gets float32's slack.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

from fastcache import contrastive_loss, contrastive_loss_and_grad
from fastcache.ops.matryoshka import matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad
from fastcache.reference import contrastive_loss_reference, matryoshka_contrastive_loss_reference

DIFFERENTIABLE = ("queries", "docs", "all_queries")
SETTINGS = ("backend", "strategy", "memory_budget", "chunk_size", "show_progress_bar")
FACTOR = 2.0
ATOL_ULPS = {torch.float32: 4.0, torch.bfloat16: 1.0, torch.float16: 1.0}
FLOAT64_TOL = {"rtol": 1e-10, "atol": 1e-10}


# a Triton interpreter module's pytestmark: only under the interpreter (tests/conftest.py turns it on for the session
# on a machine without CUDA; elsewhere only when TRITON_INTERPRET=1 was set before Python started), the interpreter's
# own NumPy warnings (runtime loop bounds) off
INTERPRETER_ONLY = [
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                       reason="the Triton interpreter is off (set TRITON_INTERPRET=1 before importing triton)"),
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning"),
]


def make_batch(
    rows: int,
    dim: int,
    *,
    columns: int = 1,
    positives: int | None = None,
    offset: int = 0,
    gathered: bool = False,
    docs_3d: bool = False,
    guide_dim: int | None = None,
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    noise: float = 2.0,
    guide_noise: float = 0.7,
    norm: float = 1.0,
) -> dict[str, Tensor]:
    """A seeded batch, keyed by the op's argument names.

    ``positives`` (P, default ``rows``) queries Q exist globally; this process's ``rows`` queries are
    Q[offset:offset+rows]. Candidates: the P positives (Q_k plus noise, so the positive is usually but not always
    the best match), then ``columns - 1`` random hard-negative columns. Sizes in the tests are small, so
    ``noise`` = 2 keeps the positive from winning by so much that the loss and its gradients vanish.
    ``gathered`` adds ``all_queries`` = Q; ``docs_3d`` gives docs as [C, P, D] (else [C*P, D], column-major).
    ``guide_dim`` adds guide embeddings built the same way (a second "model"; ``guide_noise`` = 0.7 makes it a
    stronger one, so that its masking is partial). ``norm`` scales every vector (large-logit tests)."""
    P = rows if positives is None else positives
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    Q = randn(P, dim)
    cand = torch.cat([Q + noise * randn(P, dim)] + [randn(P, dim) for _ in range(columns - 1)])
    Q, cand = Q * norm, cand * norm
    batch = {"queries": Q[offset:offset + rows].clone(), "docs": cand.view(columns, P, dim) if docs_3d else cand}
    if gathered:
        batch["all_queries"] = Q.clone()
    if guide_dim is not None:
        gQ = Q[:, :1].expand(P, guide_dim) * 0.3 + randn(P, guide_dim)
        gcand = torch.cat([gQ + guide_noise * randn(P, guide_dim)] + [randn(P, guide_dim) for _ in range(columns - 1)])
        batch["guide_queries"] = gQ[offset:offset + rows].clone()
        batch["guide_docs"] = gcand.view(columns, P, guide_dim) if docs_3d else gcand
    return {k: v.to(dtype).contiguous() for k, v in batch.items()}


def cast(batch: dict[str, Tensor], dtype: torch.dtype) -> dict[str, Tensor]:
    return {k: v.to(dtype) for k, v in batch.items()}


def nan_padded(t: Tensor, layout: str) -> Tensor:
    """A non-contiguous view holding ``t``'s values inside a bigger NaN-filled buffer.

    layout: "slice" (a window of a bigger buffer), "transposed" (last two dims stored transposed),
    "every_other_row" (rows at stride 2 along dim -2, NaN between), "every_other_col" (stride 2 along the
    last dim, NaN between)."""
    nan = float("nan")
    lead = t.shape[:-2]
    n, d = t.shape[-2:]
    if layout == "slice":
        big = torch.full((*[s + 1 for s in lead], n + 3, d + 5), nan, dtype=t.dtype)
        view = big[(*[slice(1, 1 + s) for s in lead], slice(2, 2 + n), slice(1, 1 + d))]
    elif layout == "transposed":
        big = torch.full((*lead, d + 2, n + 3), nan, dtype=t.dtype)
        view = big[..., 1:1 + d, :n].transpose(-1, -2)
    elif layout == "every_other_row":
        big = torch.full((*lead, 2 * n, d), nan, dtype=t.dtype)
        view = big[..., ::2, :]
    elif layout == "every_other_col":
        big = torch.full((*lead, n, 2 * d), nan, dtype=t.dtype)
        view = big[..., 1::2]
    else:
        raise ValueError(layout)
    view.copy_(t)
    assert not view.is_contiguous() or t.numel() <= 1
    assert torch.equal(view, t)
    return view


def _leaves(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The batch with its embeddings as autograd leaves: the same tensors (memory layout included, so that both op
    paths see the same inputs: a clone may change the strides of a size-1 dim, and with them the GEMMs' rounding)."""
    return {k: (v.detach().requires_grad_() if k in DIFFERENTIABLE else v) for k, v in batch.items()}


def _split(batch):
    rest = {k: v for k, v in batch.items() if k not in ("queries", "docs")}
    return batch["queries"], batch["docs"], rest


def _autograd_loss_and_grads(loss_fn, batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """loss_fn(queries, docs, ...) on fresh leaves of the batch, and the gradients autograd gives them."""
    leaves = _leaves(batch)
    q, d, rest = _split(leaves)
    loss = loss_fn(q, d, **rest, **options)
    loss.backward()
    return loss.detach(), {k: leaves[k].grad for k in DIFFERENTIABLE if k in leaves}


def _reference(reference, batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """A dense reference's loss and its autograd gradients (in the batch's dtype); the op's run settings
    (backend, chunk_size, ...) are accepted and ignored, so one options dict serves both."""
    options = {k: v for k, v in options.items() if k not in SETTINGS}
    return _autograd_loss_and_grads(reference, batch, **options)


def _one_pass(loss_and_grad, batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """An op's ``*_loss_and_grad`` function on the batch, its gradients keyed like the batch."""
    q, d, rest = _split(batch)
    out = loss_and_grad(q, d, **rest, **options)
    grads = {"queries": out.grad_queries, "docs": out.grad_docs}
    if "all_queries" in batch:
        grads["all_queries"] = out.grad_all_queries
    else:
        assert out.grad_all_queries is None
    return out.loss, grads


def reference_loss_and_grads(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """The dense contrastive reference's loss and its autograd gradients (settings ignored)."""
    return _reference(contrastive_loss_reference, batch, **options)


def op_autograd(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """fastcache.contrastive_loss and the gradients autograd gives its inputs."""
    return _autograd_loss_and_grads(contrastive_loss, batch, **options)


def op_loss_and_grad(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """fastcache.contrastive_loss_and_grad, its gradients keyed like the batch."""
    return _one_pass(contrastive_loss_and_grad, batch, **options)


def matryoshka_reference_loss_and_grads(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """The dense Matryoshka reference (the contrastive reference once per dim) and its autograd gradients."""
    return _reference(matryoshka_contrastive_loss_reference, batch, **options)


def matryoshka_op_autograd(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """fastcache.ops.matryoshka.matryoshka_contrastive_loss and the gradients autograd gives its inputs."""
    return _autograd_loss_and_grads(matryoshka_contrastive_loss, batch, **options)


def matryoshka_op_loss_and_grad(batch: dict[str, Tensor], **options) -> tuple[Tensor, dict[str, Tensor]]:
    """fastcache.ops.matryoshka.matryoshka_contrastive_loss_and_grad, its gradients keyed like the batch."""
    return _one_pass(matryoshka_contrastive_loss_and_grad, batch, **options)


OP_PATHS = {"autograd": op_autograd, "loss_and_grad": op_loss_and_grad}
MATRYOSHKA_OP_PATHS = {"autograd": matryoshka_op_autograd, "loss_and_grad": matryoshka_op_loss_and_grad}


def assert_matches(actual: tuple[Tensor, dict], expected: tuple[Tensor, dict], **tol) -> None:
    """Loss and every gradient close (float64 tolerances by default); shapes and dtypes equal."""
    tol = tol or FLOAT64_TOL
    (loss, grads), (ref_loss, ref_grads) = actual, expected
    torch.testing.assert_close(loss, ref_loss, **tol, msg=lambda m: f"loss: {m}")
    assert grads.keys() == ref_grads.keys()
    for k in ref_grads:
        if ref_grads[k] is None:  # the reference never used this input (all_queries without qq/dq): zero
            ref_grads = dict(ref_grads, **{k: torch.zeros_like(grads[k])})
        assert grads[k].shape == ref_grads[k].shape, k
        torch.testing.assert_close(grads[k], ref_grads[k], **tol, msg=lambda m, k=k: f"grad {k}: {m}")


def max_error(x: Tensor, truth: Tensor) -> float:
    return (x.double() - truth.double()).abs().max().item()


def relative_error(x: Tensor, truth: Tensor) -> float:
    """Largest absolute error over the truth's largest magnitude."""
    return max_error(x, truth) / max(truth.abs().max().item(), 1e-30)


def assert_no_worse_than_reference(name: str, ours: list[Tensor], reference: list[Tensor], truth: list[Tensor],
                                   dtype: torch.dtype) -> None:
    """mean relative error(ours) <= FACTOR * mean relative error(reference) + ATOL_ULPS[dtype] * eps(dtype),
    means over the batches given (module docstring)."""
    ours_error = sum(map(relative_error, ours, truth)) / len(truth)
    ref_error = sum(map(relative_error, reference, truth)) / len(truth)
    slack = ATOL_ULPS[dtype] * torch.finfo(dtype).eps
    assert ours_error <= FACTOR * ref_error + slack, (
        f"{name}: mean relative error {ours_error:.3e} vs reference {ref_error:.3e} in {dtype} (allowed "
        f"{FACTOR} x {ref_error:.3e} + {slack:.3e})")


LOW_PRECISION_SEEDS = (13, 14, 15, 16)


def low_precision_runs(shape, options, dtype, run, reference=reference_loss_and_grads, seeds=LOW_PRECISION_SEEDS):
    """(truth, reference, ours) per output name, each a list over ``seeds``: ``run`` (batch -> loss, grads) on
    seeded batches in ``dtype`` against ``reference`` in ``dtype`` and in float64 (the truth); checks that the loss
    is a float32 scalar and the gradients have their input's dtype and shape."""
    runs = {}
    for seed in seeds:
        batch = make_batch(**shape, dtype=dtype, seed=seed)
        truth_loss, truth_grads = reference(cast(batch, torch.float64), **options)
        ref_loss, ref_grads = reference(batch, **options)
        loss, grads = run(batch)
        assert loss.dtype == torch.float32 and loss.shape == ()
        for k, g in grads.items():
            assert g.dtype == dtype and g.shape == batch[k].shape, k
        for k, triple in [("loss", (truth_loss, ref_loss, loss))] + [
                (k, (truth_grads[k], ref_grads[k], grads[k])) for k in grads]:
            for lst, value in zip(runs.setdefault(k, ([], [], [])), triple):
                lst.append(value)
    return runs


def assert_low_precision_no_worse_than_reference(shape, options, dtype, paths) -> None:
    """Each Matryoshka op path (batch -> loss, grads) on seeded batches in ``dtype``: float32 loss, gradients in
    ``dtype``, errors no worse than the reference's own in ``dtype``."""
    for path in paths:
        runs = low_precision_runs(shape, options, dtype, path, matryoshka_reference_loss_and_grads, seeds=(13, 14, 15))
        for k, (truth, ref, ours) in runs.items():
            assert_no_worse_than_reference(k, ours, ref, truth, torch.float32 if k == "loss" else dtype)


def spawn_world(rank_main, folder, world: int, deadline_s: float) -> list:
    """Run ``rank_main(rank, str(folder))`` in ``world`` spawned processes, killed at the deadline (a hang fails the
    test); return what each rank saved as ``folder/rank{rank}.pt``, indexed by rank."""
    import time

    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(rank_main, args=(str(folder),), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process gloo world did not finish within {deadline_s} s (a hang)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(5)
    return [torch.load(folder / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def start_gloo_rank(rank: int, folder: str, world: int, timeout_s: float, build=None):
    """In a spawned rank: offline, quiet, one thread; this rank's own models, built before the process group (under
    torch.distributed save_pretrained writes on rank 0 only) by ``build(Path(folder))``, by default a tiny model and
    guide (seeds 0 and 1); then the gloo group over ``folder/store``. Returns the models ((model, guide))."""
    import datetime
    import sys
    import warnings
    from pathlib import Path

    import torch.distributed as dist

    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from conftest import build_tiny_bert

    if build is None:
        models = (build_tiny_bert(Path(folder) / f"model{rank}", seed=0),
                  build_tiny_bert(Path(folder) / f"guide{rank}", seed=1))
    else:
        models = build(Path(folder))
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return models


def run_bench_script(name: str, out, *args: str) -> tuple[str, dict]:
    """Run ``bench/<name>`` at its smoke settings (``--quick --repeats 1``, its JSON report to ``out``, then
    ``args``) in a fresh interpreter; it must exit 0. Returns its standard output and the report."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(repo / "bench" / name), "--quick", "--repeats", "1",
                             "--out", str(out), *args], capture_output=True, text=True, timeout=600, cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout, json.loads(out.read_text())


def load_host_emulation(source: str, build_directory):
    """Compile ``tests/<source>`` (a CUDA binding with its kernels run on the host, emulated CUDA threads, from
    tests/cuda_host_emulation.h) as a Python extension in ``build_directory`` and import it; module name after the
    source file."""
    from pathlib import Path

    from torch.utils import cpp_extension

    repo = Path(__file__).resolve().parents[1]
    return cpp_extension.load(
        name=f"fastcache_{Path(source).stem}",
        sources=[str(repo / "tests" / source)],
        extra_include_paths=[str(repo / "csrc"), str(repo / "tests")],
        extra_cflags=["-O1", "-std=c++17"],
        build_directory=str(build_directory),
        verbose=False,
    )


def emulate_low_precision_gemms(monkeypatch, module, dtype: torch.dtype) -> list[bool]:
    """Run ``module``'s slab (fastcache.ops.contrastive.slab or fastcache.ops.matryoshka.slab) as bf16/fp16 CUDA inputs
    get it, on CPU:
    low_precision_gemms says yes for ``dtype``, the normalisation goes 2 rows at a time, and mm/addmm's
    fp32-output overloads (CUDA only) are emulated by fp32 products of the same operands (exact: a product of two
    bf16/fp16 numbers is exact in fp32; cuBLAS accumulates in fp32 too). Returns a list that records, per GEMM,
    whether both operands were in ``dtype``."""
    low_operands = []

    def mm_into(out, a, b):
        low_operands.append(a.dtype == b.dtype == dtype)
        out.copy_(a.float() @ b.float())

    def addmm_into(acc, a, b):
        low_operands.append(a.dtype == b.dtype == dtype)
        acc.add_(a.float() @ b.float())

    from fastcache.ops.contrastive import normalize

    monkeypatch.setattr(module, "low_precision_gemms", lambda x: x.dtype == dtype)
    # the row chunks where they are read: the contrastive op's normalisation, the Matryoshka slab's prefix norms
    for owner in {normalize, module}:
        if hasattr(owner, "NORMALIZE_ROWS"):
            monkeypatch.setattr(owner, "NORMALIZE_ROWS", 2)
    monkeypatch.setattr(module, "_mm_into", mm_into)
    monkeypatch.setattr(module, "_addmm_into", addmm_into)
    return low_operands
