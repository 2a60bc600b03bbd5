"""GPU benchmark of the contrastive loss stage, forward + backward: fastcache (tiled, and slab with the CUDA and the
Triton epilogue) against the dense PyTorch reference, sentence-transformers' cached loss stage and the fused
cross-entropy peers (Inf-CL, Cut Cross-Entropy, Liger), next to torch.mm's bf16 rate measured in the same run.

    python bench/gpu_bench.py --out OUTDIR                  # the full grid
    python bench/gpu_bench.py --out OUTDIR --phase headline # the ceiling and the target shape only (the suite's
    python bench/gpu_bench.py --out OUTDIR --phase multivector  # MaxSim and SPLADE only (the suite's phase 3b)
    python bench/gpu_bench.py --out OUTDIR --phase rest     #   phase 3), then everything else (its phase 5)
    python bench/gpu_bench.py --out OUTDIR --budget-s 120   # stopping after ~2 minutes
    python bench/gpu_bench.py --dry-run --out OUTDIR        # tiny shapes on the CPU: every code path, no GPU

Every row goes to OUTDIR/bench_rows.jsonl the moment it is measured (appended, never deleted: a run killed at any
point keeps every finished row, and a later phase adds to it); gpu_bench.json and gpu_bench.csv are rebuilt from
all of its rows after each group and at the end (also after SIGINT, which ``timeout --signal=INT`` sends).

The grid: B = N = 16384 and B = 65536, N = 131072 (the positives and one hard-negative column), D = 384 and 768,
bfloat16 and float32, random embeddings (positive i = query i plus noise), cosine similarity, scale 20, one
direction (query_to_doc), no masks: the default loss of MultipleNegativesRankingLoss, the one every peer computes.

How each implementation computes that loss, L = mean_i [ logsumexp_j 20·cos(q_i, d_j) - 20·cos(q_i, d_i) ]:
  fastcache_*      ``fastcache.contrastive_loss(q, d)`` + backward (it normalises internally);
  reference        ``fastcache.reference.contrastive_loss_reference`` + backward: the dense B×N matrix, only where
                   it fits in GPU memory (estimate: 4 B×N float32 matrices), else recorded as skipped;
  st_cached_mbs32  ``CachedMultipleNegativesRankingLoss(model, mini_batch_size=32).calculate_loss(reps,
                   with_backward=True)`` on precomputed embeddings (its default mini-batch size; reps: per column,
                   the mini-batches as leaves, as forward_cached hands them over);
  inf_cl           ``inf_cl.cal_inf_loss(20·q̂, d̂, head_dim=h)`` (labels default to arange(B)); q̂, d̂ = F.normalize;
                   h the largest of 256, 128, ... dividing D (its kernels sum over the heads: the full dot product);
  cut_cross_entropy ``cut_cross_entropy.linear_cross_entropy(20·q̂, d̂, arange(B))``: the docs are the classifier,
                   defaults otherwise (filter_eps="high": gradient entries below bf16's resolution are skipped);
  cut_cross_entropy_exact  the same with ``filter_eps=None`` (every gradient entry: the like-for-like row);
  liger_flce       ``LigerFusedLinearCrossEntropyFunction.apply(20·q̂, d̂, arange(B))`` (its loss is element 0).

Each (shape, dim, dtype) group runs in a fresh subprocess with a timeout; the whole run has a time budget
(``--budget-s``): groups are ordered by importance (after the ceiling and the quick epilogue groups, the target
shape B=65536, N=131072, D=768, bf16) and a
group that the budget no longer allows is recorded as skipped, as is a case whose group timed out. Per case: warm-up
runs (two: the first compiles and autotunes), then timed runs (CUDA events around each run, after synchronising),
as many as fit in ``--case-seconds`` (at least 3, at most 5). The peak memory of the last timed run:
``torch.cuda.max_memory_allocated()`` minus the memory allocated before it (the inputs), and that minus the
gradients it returns. Effective TFLOP/s counts 6·B·N·D (the three GEMMs S = Q·Dᵀ, dS·D, dSᵀ·Q) per run. At the
target shape each fastcache case then runs once more under torch.profiler: its GPU time kernel by kernel (GEMMs,
epilogue, normalisation, ...), the row's ``kernels``. st_cached_mbs32 takes ~B/32 mini-batch steps: above
ST_MAX_ROWS queries it runs on the first ST_MAX_ROWS of them against every candidate and its time is scaled by
B / ST_MAX_ROWS (the row says ``extrapolated_from_rows``; its cost is linear in the queries).

Matryoshka (issue 5): at B = N = 16384, D = 768, bfloat16, the same loss at dims 768/512/256/128/64 (weights 1) in one
fused call, ``fastcache.ops.matryoshka.matryoshka_contrastive_loss(q, d, dims=...)`` + backward, tiled (the Triton
multi-dim kernels) and slab (CUDA epilogue); its rows carry ``dims`` and compare with the single-dim fastcache rows of
the same shape (target: the 5-dim loss within 1.3x of the single full-dim loss, per strategy).

Ranking (issue 6, bench/gpu_ranking.py): LambdaLoss (NDCGLoss2++), ListNet and ListMLE on precomputed logits, Q = 64
queries × n = 1024, 4096, 128 documents, float32, forward + backward: the CUDA op, the op's torch fallback and
sentence-transformers' class on a stand-in model that returns the logits; time and peak memory (rows: B = Q, N = n).

MaxSim and SPLADE (issue 20, bench/gpu_multivector.py): the ColBERT loss stage (fastcache's Triton and torch backends,
sentence-transformers' colbert_scores + cross-entropy, the token-level GEMM) at B = 128 and 512 queries, bf16 and
fp32, and SPLADE's CachedSpladeLoss loss stage (fastcache's and sentence-transformers', the dense GEMMs) at
bench/splade_table.py's full shape; their rows carry ``family`` ("maxsim", "splade"), ``ratio_to_gemm`` and
``upstream_over_case``; the MaxSim loss rows also their error against float64.

Besides: the slab epilogue alone (CUDA, Triton, PyTorch) in place on float32 blocks of 128 × 131072 and 1024 × 16384
(the slab's chunks at the two N), next to a device-to-device copy of the same block: GB/s at 8 bytes per element.

Writes OUTDIR/gpu_bench.json (machine, GPU, versions, commit, settings, every row, targets) and OUTDIR/gpu_bench.csv
(one row per case), and prints a markdown table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the sentence-transformers model is built locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

BENCH_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH_DIR), str(BENCH_DIR.parent)]  # bench/ and the repository root (fastcache itself)
from gpu_multivector import (  # noqa: E402
    MULTIVECTOR_CASES,
    add_multivector_ratios,
    make_multivector_case,
    multivector_groups,
    multivector_targets,
)
from gpu_ranking import DRY_RANKING, RANKING_CASES, RANKING_SIZES, make_ranking_case  # noqa: E402
from gpu_ranking import Q as RANKING_Q  # noqa: E402
from roofline import SLAB_BUDGET  # noqa: E402

SCALE = 20.0
MIB = 2**20
CEILING_SIZE = 8192  # torch.mm bf16 CEILING_SIZE³, CEILING_PRODUCTS of them per timed run (clocks ramp up)
CEILING_PRODUCTS = 10
PEERS = {"inf_cl": "inf-cl", "cut_cross_entropy": "cut-cross-entropy", "cut_cross_entropy_exact": "cut-cross-entropy",
         "liger_flce": "liger-kernel"}
CASES = {
    "fastcache_tiled": "fastcache, strategy tiled (Triton)",
    "fastcache_slab_cuda": "fastcache, strategy slab, CUDA epilogue",
    "fastcache_slab_triton": "fastcache, strategy slab, Triton epilogue",
    "fastcache_fused_slab": "fastcache, strategy fused_slab (slab v2: Triton GEMMs, logits stored once)",
    "fastcache_tiled_filtered": "fastcache, strategy tiled (Triton), filter_eps='auto' (gradient filter)",
    "inf_cl": "Inf-CL cal_inf_loss",
    "cut_cross_entropy": "Cut Cross-Entropy linear_cross_entropy",
    "cut_cross_entropy_exact": "Cut Cross-Entropy linear_cross_entropy, filter_eps=None",
    "liger_flce": "Liger fused linear cross-entropy",
    "reference": "dense PyTorch reference",
    "st_cached_mbs32": "sentence-transformers CachedMNRL.calculate_loss, mini_batch_size=32",
}
FASTCACHE = {"fastcache_tiled": ("triton", "tiled"), "fastcache_slab_cuda": ("cuda", "slab"),
             "fastcache_slab_triton": ("triton", "slab"), "fastcache_fused_slab": ("triton", "fused_slab")}
# the gradient filter's cases: (backend, strategy, filter_eps) (CCE's default "auto"); the row reports its hit rate
FILTERED = {"fastcache_tiled_filtered": ("triton", "tiled", "auto")}
MATRYOSHKA_CASES = {"matryoshka_tiled": "fastcache Matryoshka (5 dims), strategy tiled (Triton)",
                    "matryoshka_slab_cuda": "fastcache Matryoshka (5 dims), strategy slab, CUDA epilogue"}
MATRYOSHKA = {"matryoshka_tiled": ("triton", "tiled"), "matryoshka_slab_cuda": ("cuda", "slab")}
MATRYOSHKA_FRACTIONS = (12, 8, 4, 2, 1)  # dims = D·f/12: 768/512/256/128/64 at D = 768
MATRYOSHKA_SINGLE = {"matryoshka_tiled": "fastcache_tiled", "matryoshka_slab_cuda": "fastcache_slab_cuda"}
# (B, N, D, dtype), most important first; the first is the issue's target shape
GRID = [(65536, 131072, 768, "bfloat16"), (16384, 16384, 384, "bfloat16"), (16384, 16384, 768, "bfloat16"),
        (16384, 16384, 384, "float32"), (16384, 16384, 768, "float32"), (65536, 131072, 384, "bfloat16"),
        (65536, 131072, 768, "float32"), (65536, 131072, 384, "float32")]
DRY_GRID = [(8, 16, 32, "float32"), (8, 16, 32, "bfloat16")]
MATRYOSHKA_GRID, DRY_MATRYOSHKA_GRID = (16384, 16384, 768, "bfloat16"), DRY_GRID[1]  # after the same-shape group
# The slab epilogue alone, in place on a float32 block of rows × columns (default options): each implementation and a
# device-to-device copy of the same block (the bandwidth ceiling); GB/s count 8 bytes per element (one read and one
# write, the least any in-place epilogue moves).
EPILOGUE_CASES = {"epilogue_copy": "copy of the block (bandwidth ceiling)", "epilogue_cuda": "CUDA epilogue",
                  "epilogue_triton": "Triton epilogue", "epilogue_torch": "PyTorch epilogue"}
EPILOGUE_COLUMNS = (131072, 16384)  # the slab's block widths at the two N; rows: its chunk at SLAB_BUDGET
DRY_EPILOGUE_SHAPES = [(4, 64)]
ST_MAX_ROWS = 4096  # st_cached_mbs32 runs at most this many queries (128 mini-batches); longer batches extrapolate
WARMUPS, MIN_REPEATS, MAX_REPEATS = 2, 3, 5
ROWS_FILE = "bench_rows.jsonl"
DRY_CEILING_SIZE = 64
GROUP_TIMEOUT_S = {"small": 75.0, "large": 150.0}
PHASES = ("all", "headline", "multivector", "rest")
CSV_FIELDS = ["B", "N", "D", "dtype", "case", "label", "min_ms", "median_ms", "repeats", "tflops", "ratio_to_mm",
              "peak_beyond_inputs_mib", "peak_beyond_inputs_and_grads_mib", "loss", "gbps", "ratio_to_copy",
              "projected_ms", "filter_hit_rate", "ratio_to_gemm", "upstream_over_case", "status"]


# ---------------------------------------------------------------------------------------------------------------
# cases (run in the group's child process)
# ---------------------------------------------------------------------------------------------------------------

def _leaves(B: int, N: int, D: int, dtype, device, seed: int = 0):
    """Random queries [B, D] and docs [N, D] (positive i = query i + noise), as leaves requiring grad."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, D, generator=g, device=device)
    d = torch.randn(N, D, generator=g, device=device)
    d[:B] += 0.5 * q  # positives: closer to their query than the rest, not identical (a loss of a few nats)
    return q.to(dtype).requires_grad_(), d.to(dtype).requires_grad_()


def _normalized_inputs(lq, ld):
    """The peers' inputs: 20·q̂ (the logit scale folded into the queries) and d̂, inside the autograd graph."""
    import torch.nn.functional as F

    return F.normalize(lq, dim=-1) * SCALE, F.normalize(ld, dim=-1)


def _free_gpu_bytes() -> int | None:
    import torch

    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else None


def make_case(name: str, B: int, N: int, D: int, dtype_name: str, device: str, dry_run: bool):
    """(run, reset, info) of case ``name``: ``run()`` does the forward and backward and returns (loss, grads)."""
    import torch

    dtype = getattr(torch, dtype_name)
    info: dict = {}
    if name == "mm_ceiling":
        n = DRY_CEILING_SIZE if dry_run else CEILING_SIZE
        g = torch.Generator(device=device).manual_seed(0)
        a = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
        b = torch.randn(n, n, generator=g, device=device).to(torch.bfloat16)
        info.update(size=n, products=CEILING_PRODUCTS, flop=CEILING_PRODUCTS * 2 * n**3)

        def products():
            for _ in range(CEILING_PRODUCTS):
                c = torch.mm(a, b)
            return None, (c,)

        return products, None, info

    lq, ld = _leaves(B, N, D, dtype, device)

    def reset():
        lq.grad = ld.grad = None

    def backward_of(loss):
        loss.backward()
        return loss.detach(), (lq.grad, ld.grad)

    if name in FASTCACHE or name in MATRYOSHKA or name in FILTERED:
        import fastcache
        from fastcache.ops.matryoshka import matryoshka_contrastive_loss

        backend, strategy = {**FASTCACHE, **MATRYOSHKA, **{k: v[:2] for k, v in FILTERED.items()}}[name]
        if dry_run:  # no GPU: the same call on the pure-PyTorch backend
            backend, strategy = "torch", "slab"
        settings = {"backend": backend, "strategy": strategy}
        if strategy in ("slab", "fused_slab"):
            settings["memory_budget"] = SLAB_BUDGET
        if name in FILTERED:  # the share of backward tiles skipped, from one untimed call
            from fastcache.ops.contrastive.filtering import count_filtered_tiles

            settings["filter_eps"] = FILTERED[name][2]
            with count_filtered_tiles() as tiles:
                backward_of(fastcache.contrastive_loss(lq, ld, scale=SCALE, **settings))
            reset()
            info.update(filter_hit_rate=tiles.hit_rate, filter_tiles=tiles.total)
        info.update(settings)
        loss_fn = fastcache.contrastive_loss
        if name in MATRYOSHKA:
            info["dims"] = [D * f // 12 for f in MATRYOSHKA_FRACTIONS]
            settings["dims"] = info["dims"]
            loss_fn = matryoshka_contrastive_loss
        return (lambda: backward_of(loss_fn(lq, ld, scale=SCALE, **settings))), reset, info

    if name == "reference":
        from fastcache.reference import contrastive_loss_reference

        need, free = 4 * B * N * 4, _free_gpu_bytes()
        info.update(estimated_bytes=need)
        if free is not None and need > 0.9 * free:
            raise MemoryError(f"skipped: the dense matrices need ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB free")
        return (lambda: backward_of(contrastive_loss_reference(lq, ld, scale=SCALE))), reset, info

    if name == "st_cached_mbs32":
        from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

        from fastcache.app.benchmark import tiny_sentence_transformer

        model = tiny_sentence_transformer().to(device)
        mbs = 32
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=SCALE, mini_batch_size=mbs)
        rows = min(B, ST_MAX_ROWS)  # the first `rows` queries against every candidate: time linear in the queries
        if rows < B:
            info.update(extrapolated_from_rows=rows, time_factor=B / rows)
        columns = [lq.detach()[:rows], *ld.detach().split(B)]  # anchors, positives, each hard-negative column
        reps = [[mb.detach().requires_grad_() for mb in column.split(mbs)] for column in columns]
        leaves = [t for column in reps for t in column]
        info.update(mini_batch_size=mbs)

        def reset_reps():
            for t in leaves:
                t.grad = None

        def run_st():
            loss = loss_fn.calculate_loss(reps, with_backward=True)
            return loss.detach(), tuple(t.grad for t in leaves)

        return run_st, reset_reps, info

    targets = torch.arange(B, device=device)
    if name == "inf_cl":
        from inf_cl import cal_inf_loss

        head_dim = next((h for h in (256, 128, 64, 32, 16) if D % h == 0), None)
        if head_dim is None:
            raise ValueError(f"inf-cl needs D divisible by 16, 32, 64, 128 or 256; D={D}")
        info.update(head_dim=head_dim)
        return (lambda: backward_of(cal_inf_loss(*_normalized_inputs(lq, ld), head_dim=head_dim))), reset, info
    if name in ("cut_cross_entropy", "cut_cross_entropy_exact"):
        from cut_cross_entropy import linear_cross_entropy

        filtering = {"filter_eps": None} if name == "cut_cross_entropy_exact" else {}
        info.update(filtering)
        return (lambda: backward_of(linear_cross_entropy(*_normalized_inputs(lq, ld), targets, **filtering))), \
            reset, info
    if name == "liger_flce":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        def run_liger():
            out = LigerFusedLinearCrossEntropyFunction.apply(*_normalized_inputs(lq, ld), targets)
            return backward_of(out[0] if isinstance(out, tuple) else out)

        return run_liger, reset, info
    raise ValueError(f"unknown case {name!r}")


def make_epilogue_case(name: str, rows: int, columns: int, device: str):
    """(run, None, info) of an EPILOGUE_CASES case: the epilogue in place on a random float32 block of similarities
    (its output, the gradient, is the next run's input: the same traffic and work, no reset to time)."""
    import torch

    from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions
    from fastcache.ops.contrastive import epilogue as contrastive_epilogue

    g = torch.Generator(device=device).manual_seed(0)
    block = torch.rand(rows, columns, generator=g, device=device) * 2 - 1
    info = {"bytes_per_run": 8 * rows * columns}
    if name == "epilogue_copy":
        target = torch.empty_like(block)
        return (lambda: (None, (target.copy_(block),))), None, info
    epilogue = contrastive_epilogue.EPILOGUES[name.removeprefix("epilogue_")]
    # the slab's first chunk of a batch of B = N/2 queries (the positives, then one hard-negative column)
    layout = ContrastiveLayout(columns // 2, columns // 2, 2, 1, columns // 2, 0)
    options = ContrastiveOptions()
    def run():
        epilogue({"query_to_doc": block}, {}, None, 0, layout, options, True)
        return None, ()

    return run, None, info


def _tensor_bytes(tensors) -> int:
    from fastcache.app.harness import tensor_bytes

    return tensor_bytes([t for t in tensors if t is not None])


def epilogue_shapes() -> list[tuple[int, int]]:
    """(rows, columns) of the slab's real chunks at the target shape's N and at N = 16384 (B = N / 2 queries,
    bf16 GEMM operands, SLAB_BUDGET): the epilogue benchmark's blocks (~3900 rows at N = 131072)."""
    import roofline

    return [(roofline.slab_chunk(roofline.Shape(columns // 2, columns, 768, "bfloat16")), columns)
            for columns in EPILOGUE_COLUMNS]


def kernel_profile(run, reset, top: int = 8) -> list[dict]:
    """One more run under torch.profiler: the kernels (GPU; CPU ops in a dry run) with the most time, and the
    rest summed: the run timed phase by phase."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    if reset is not None:
        reset()
    with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    events.sort(key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))
    rows = [{"name": e.key[:120], "ms": (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3,
             "calls": e.count} for e in events]
    rest = rows[top:]
    return rows[:top] + ([{"name": "(the rest)", "ms": sum(r["ms"] for r in rest),
                           "calls": sum(r["calls"] for r in rest)}] if rest else [])


def measure(run, reset, case_seconds: float, max_repeats: int = MAX_REPEATS) -> dict:
    """Warm-ups, timed runs (CUDA events; perf_counter on CPU) and the peak memory of the last timed run."""
    import torch

    cuda = torch.cuda.is_available()

    def once(track_memory: bool):
        if reset is not None:
            reset()
        gc.collect()
        memory = None
        if cuda:
            torch.cuda.synchronize()
            if track_memory:
                torch.cuda.reset_peak_memory_stats()
                memory = torch.cuda.memory_allocated()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            if track_memory:
                memory = torch.cuda.max_memory_allocated() - memory
        else:
            begin = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - begin
        return seconds, out, memory

    for _ in range(WARMUPS):  # the first compiles (Triton) and autotunes; the second runs warm
        warm, _, _ = once(False)
    repeats = max(MIN_REPEATS, min(max_repeats, int(case_seconds / max(warm, 1e-9))))
    times = []
    for index in range(repeats):
        seconds, out, peak = once(track_memory=index == repeats - 1)
        times.append(seconds)
    loss, grads = out
    result = {"min_s": min(times), "median_s": statistics.median(times), "times_s": times, "repeats": repeats,
              "warmup_s": warm, "loss": None if loss is None else float(loss)}
    if peak is not None:
        grad_bytes = _tensor_bytes(grads) if loss is not None else 0
        result.update(peak_beyond_inputs_mib=peak / MIB, grad_mib=grad_bytes / MIB,
                      peak_beyond_inputs_and_grads_mib=(peak - grad_bytes) / MIB)
    return result


def gpu_info() -> dict:
    import torch

    info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, sms=props.multi_processor_count,
                    capability=f"{props.major}.{props.minor}")
    else:
        info["gpu"] = None
    return info


def run_group(group: dict, results_path: Path, case_seconds: float, dry_run: bool) -> None:
    """The child: every case of one group, one JSON line each (a "started" line before it, so that the parent
    knows which case a timeout interrupted)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not dry_run:
        raise SystemExit("no CUDA device (use --dry-run for the CPU code paths)")
    with results_path.open("a") as out:
        def emit(row):
            out.write(json.dumps(row) + "\n")
            out.flush()

        if group.get("ceiling"):
            emit({"gpu_info": gpu_info()})
        for name in group["cases"]:
            key = {k: group.get(k) for k in ("B", "N", "D", "dtype")}
            emit({**key, "case": name, "status": "started"})
            row = {**key, "case": name}
            try:
                if group.get("epilogue"):
                    run, reset, info = make_epilogue_case(name, group["B"], group["N"], device)
                elif group.get("ranking"):
                    run, reset, info = make_ranking_case(name, group["B"], group["N"], device, dry_run)
                elif group.get("multivector"):
                    run, reset, info = make_multivector_case(name, group["B"], group["dtype"], device, dry_run)
                else:
                    run, reset, info = make_case(name, group.get("B"), group.get("N"), group.get("D"),
                                                 group.get("dtype") or "bfloat16", device, dry_run)
                row.update(info)
                row.update(measure(run, reset, case_seconds))
                if "time_factor" in info:
                    for k in ("min_s", "median_s"):
                        row[k] *= info["time_factor"]
                if group.get("profile") and (name in FASTCACHE or name in MATRYOSHKA):
                    row["kernels"] = kernel_profile(run, reset)
                row["status"] = "ok"
            except MemoryError as error:  # our own "does not fit" estimate
                row.update(status="skipped", reason=str(error))
            except Exception as error:  # noqa: BLE001 - a peer that cannot run is recorded with its reason
                oom = isinstance(error, torch.cuda.OutOfMemoryError)
                row.update(status="skipped" if oom else "error", reason=f"{type(error).__name__}: {error}"[:800])
            emit(row)
            run = reset = None
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# the parent: groups in subprocesses, budget, report
# ---------------------------------------------------------------------------------------------------------------

def _groups(dry_run: bool, cases: list[str], dtypes: list[str], phase: str = "all") -> list[dict]:
    """The groups in running order: the ceiling, the target shape (profiled: the headline phase), MaxSim and SPLADE
    (the multivector phase), then the epilogues, the ranking ops, the other shapes and Matryoshka (the rest)."""
    groups = [{"ceiling": True, "cases": ["mm_ceiling"], "size": "small"}]
    single, matryoshka = [c for c in cases if c in CASES], [c for c in cases if c in MATRYOSHKA_CASES]
    for B, N, D, dtype in DRY_GRID if dry_run else GRID:
        shape = {"B": B, "N": N, "D": D, "dtype": dtype, "size": "large" if B * N > 2**30 else "small"}
        if dtype in dtypes and single:
            groups.append({**shape, "cases": single})
        if dtype in dtypes and matryoshka and (B, N, D, dtype) == (DRY_MATRYOSHKA_GRID if dry_run else MATRYOSHKA_GRID):
            groups.append({**shape, "cases": matryoshka})
    # the epilogues alone: right after the ceiling (they are quick)
    epilogues = [{"epilogue": True, "B": rows, "N": columns, "D": None, "dtype": "float32",
                  "cases": list(EPILOGUE_CASES), "size": "small"}
                 for rows, columns in (DRY_EPILOGUE_SHAPES if dry_run else epilogue_shapes())]
    # the ranking ops (Q queries × n documents as B × N): after the contrastive target shape
    ranking = [{"ranking": True, "B": Q, "N": n, "D": None, "dtype": "float32", "size": "small",
                "cases": [c for c in cases if c in RANKING_CASES]}
               for Q, n in ([DRY_RANKING] if dry_run else [(RANKING_Q, n) for n in RANKING_SIZES])]
    ranking = [g for g in ranking if g["cases"]]
    headline = [dict(groups[1], profile=True)] if len(groups) > 1 else []
    multivector = multivector_groups(dry_run, cases, dtypes)
    return {"all": groups[:1] + headline + multivector + epilogues + ranking + groups[2:],
            "headline": groups[:1] + headline, "multivector": multivector,
            "rest": epilogues + ranking + groups[2:]}[phase]


def _read_lines(path: Path, start: int = 0) -> list[dict]:
    """The JSON lines of ``path`` from byte ``start`` on (a line cut off by a kill is ignored)."""
    if not path.exists():
        return []
    with path.open("rb") as f:
        f.seek(start)
        text = f.read().decode(errors="replace")
    lines = []
    for line in text.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def finished_rows(out_dir: Path) -> tuple[list[dict], dict]:
    """Every finished row in out_dir/ROWS_FILE (the last one per shape and case) and the GPU's details."""
    rows, info = {}, {}
    for line in _read_lines(out_dir / ROWS_FILE):
        if "gpu_info" in line:
            info.update(line["gpu_info"])
        elif line.get("status") != "started":
            rows[tuple(line.get(k) for k in ("B", "N", "D", "dtype", "case"))] = line
    return list(rows.values()), info


def run_all(out_dir: Path, *, dry_run: bool, budget_s: float, case_seconds: float, cases: list[str],
            dtypes: list[str], phase: str = "all", after_group=None) -> dict:
    """Each group in a child process that appends its rows to out_dir/ROWS_FILE as it measures them; returns this
    run's rows (with a row, status and reason, for each case that did not finish) and the GPU's details.
    ``after_group(rows, info)`` is called after each group (the report is rewritten there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines_path = out_dir / ROWS_FILE
    deadline = time.monotonic() + budget_s
    rows: list[dict] = []
    info: dict = {}
    measured_before = {r["case"] for r in finished_rows(out_dir)[0] if r.get("status") == "ok"}
    for index, group in enumerate(_groups(dry_run, cases, dtypes, phase)):
        key = {k: group.get(k) for k in ("B", "N", "D", "dtype")}
        if group.get("ceiling") and "mm_ceiling" in measured_before:  # an earlier phase of this run measured it
            continue
        left = deadline - time.monotonic()
        timeout = min(GROUP_TIMEOUT_S[group["size"]], left)
        if timeout < 10:
            rows += [{**key, "case": c, "status": "skipped", "reason": f"time budget of {budget_s:.0f} s spent"}
                     for c in group["cases"]]
            continue
        start = lines_path.stat().st_size if lines_path.exists() else 0
        command = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(group), "--results",
                   str(lines_path), "--case-seconds", str(case_seconds)] + (["--dry-run"] if dry_run else [])
        print(f"group {index}: {key} cases {group['cases']} (timeout {timeout:.0f} s)", file=sys.stderr, flush=True)
        begin = time.monotonic()
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            failure = None if child.returncode == 0 else \
                f"group process exited {child.returncode}: " + " | ".join(child.stderr.strip().splitlines()[-3:])
        except subprocess.TimeoutExpired:
            failure = f"group timed out after {timeout:.0f} s"
        done = {}
        running = None
        for line in _read_lines(lines_path, start):
            if "gpu_info" in line:
                info.update(line["gpu_info"])
            elif line.get("status") == "started":
                running = line["case"]
            else:
                done[line["case"]] = line
                running = None
        for case in group["cases"]:
            if case in done:
                rows.append(done[case])
            else:
                why = failure or "no result"
                rows.append({**key, "case": case, "status": "skipped",
                             "reason": f"{why} (while running this case)" if case == running else
                             f"{why} (before this case started)"})
        print(f"  {time.monotonic() - begin:.1f} s" + (f"; {failure}" if failure else ""), file=sys.stderr,
              flush=True)
        if after_group is not None:
            after_group(rows, info)
    return {"rows": rows, "gpu": info}


def _peer_versions() -> dict:
    versions = {}
    for case, package in PEERS.items():
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def add_rates(rows: list[dict]) -> float | None:
    """Effective TFLOP/s (6·B·N·D per run) and the ratio to the same run's torch.mm bf16 rate, in place; returns the
    mm rate (TFLOP/s)."""
    ceiling = next((r for r in rows if r["case"] == "mm_ceiling" and r.get("status") == "ok"), None)
    mm_rate = ceiling["flop"] / ceiling["min_s"] / 1e12 if ceiling else None
    if ceiling:
        ceiling["tflops"] = mm_rate
        ceiling["ratio_to_mm"] = 1.0
    copies = {(r["B"], r["N"]): r for r in rows if r["case"] == "epilogue_copy" and r.get("status") == "ok"}
    for r in rows:
        if r["case"] in EPILOGUE_CASES and r.get("status") == "ok":
            r["gbps"] = r["bytes_per_run"] / r["min_s"] / 1e9
            copy = copies.get((r["B"], r["N"]))
            r["ratio_to_copy"] = copy["min_s"] / r["min_s"] if copy else None
        elif r["case"] not in ("mm_ceiling", *RANKING_CASES, *MULTIVECTOR_CASES) and r.get("status") == "ok":
            r["flop"] = 6 * r["B"] * r["N"] * r["D"]
            r["tflops"] = r["flop"] / r["min_s"] / 1e12
            r["ratio_to_mm"] = r["tflops"] / mm_rate if mm_rate else None
    add_multivector_ratios(rows)
    return mm_rate


def add_projections(rows: list[dict], mm_rate: float | None, gpu_name: str | None) -> dict:
    """bench/roofline.py's projection of each measured row (the model's strategies), in place: ``projected_ms`` at
    the row's shape with this run's torch.mm rate and copy bandwidth (the model's table where the run has none), and
    ``measured_over_projected``; returns the figures used."""
    import roofline

    machine, source = roofline.measured_figures(rows, mm_rate, gpu_name)
    for r in rows:
        projection = roofline.project_row(r, machine) if r.get("status") == "ok" else None
        if projection:
            r["projected_ms"] = projection["projected_ms"]
            r["measured_over_projected"] = r["min_s"] * 1e3 / projection["projected_ms"]
    return {"figures": source, "mm_tflops": machine.mm_tflops, "bandwidth_tbs": machine.bandwidth_tbs}


def targets(rows: list[dict], B=65536, N=131072, D=768, dtype="bfloat16") -> list[dict]:
    """The issue's GPU targets, at the target shape (bf16), from the rows that ran."""
    at = {r["case"]: r for r in rows if (r.get("B"), r.get("N"), r.get("D"), r.get("dtype")) == (B, N, D, dtype)
          and r.get("status") == "ok"}
    found = []
    slab = min((at[k] for k in ("fastcache_slab_cuda", "fastcache_slab_triton") if k in at),
               key=lambda r: r["min_s"], default=None)
    tiled = at.get("fastcache_tiled")
    best = min((r for r in (slab, tiled) if r), key=lambda r: r["min_s"], default=None)
    if slab and slab.get("ratio_to_mm") is not None:
        found.append({"target": "slab >= 60% of the same-run torch.mm bf16 rate",
                      "value": f"{slab['ratio_to_mm']:.0%} ({slab['case']})", "met": slab["ratio_to_mm"] >= 0.6})
    if slab and tiled:
        ratio = tiled["min_s"] / slab["min_s"]
        found.append({"target": "tiled within 1.5x of slab time", "value": f"{ratio:.2f}x", "met": ratio <= 1.5})
    if tiled and "peak_beyond_inputs_and_grads_mib" in tiled:
        peak = tiled["peak_beyond_inputs_and_grads_mib"]
        found.append({"target": "tiled peak memory beyond inputs and gradients < 1 GB", "value": f"{peak:.0f} MiB",
                      "met": peak * MIB < 1e9})
    if best and "st_cached_mbs32" in at:
        speedup = at["st_cached_mbs32"]["min_s"] / best["min_s"]
        found.append({"target": ">= 3x faster than sentence-transformers' loss stage (mini_batch_size=32)",
                      "value": f"{speedup:.1f}x", "met": speedup >= 3})
    peers = [at[k] for k in PEERS if k in at]
    if best and peers:
        slowest_ratio = max(best["min_s"] / p["min_s"] for p in peers)
        found.append({"target": "faster than each of Inf-CL, Cut Cross-Entropy, Liger (those that ran: "
                                f"{', '.join(p['case'] for p in peers)})",
                      "value": f"time / fastest peer's time = {slowest_ratio:.2f}", "met": slowest_ratio < 1})
        lean = [p["peak_beyond_inputs_and_grads_mib"] for p in peers if "peak_beyond_inputs_and_grads_mib" in p]
        if lean and "peak_beyond_inputs_and_grads_mib" in best:
            found.append({"target": "no more memory than the leanest peer",
                          "value": f"{best['peak_beyond_inputs_and_grads_mib']:.0f} MiB vs {min(lean):.0f} MiB",
                          "met": best["peak_beyond_inputs_and_grads_mib"] <= min(lean)})
    return found + matryoshka_targets(rows) + multivector_targets(rows)


def matryoshka_targets(rows: list[dict], B=16384, N=16384, D=768, dtype="bfloat16") -> list[dict]:
    """Issue 5's target per strategy: the 5-dim Matryoshka loss within 1.3x of the single full-dim loss."""
    at = {r["case"]: r for r in rows if (r.get("B"), r.get("N"), r.get("D"), r.get("dtype")) == (B, N, D, dtype)
          and r.get("status") == "ok"}
    found = []
    for name, single in MATRYOSHKA_SINGLE.items():
        if name in at and single in at:
            ratio = at[name]["min_s"] / at[single]["min_s"]
            found.append({"target": f"Matryoshka 5 dims within 1.3x of the single-dim loss ({name} / {single})",
                          "value": f"{ratio:.2f}x", "met": ratio <= 1.3})
    return found


def loss_spread(rows: list[dict]) -> dict[str, float]:
    """Per (B, N, D, dtype): the largest relative difference between the losses of the cases that ran (they all
    compute the same loss on the same inputs: a mapping error shows here)."""
    groups: dict[str, list[float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get("loss") is not None:
            dims = f" dims={'/'.join(map(str, r['dims']))}" if r.get("dims") else ""
            dims += f" {r['ranking_loss']}" if r.get("ranking_loss") else ""
            dims += f" {r['family']}" if r.get("family") else ""
            groups.setdefault(f"B={r['B']} N={r['N']} D={r['D']} {r['dtype']}{dims}", []).append(r["loss"])
    return {k: (max(v) - min(v)) / max(abs(statistics.mean(v)), 1e-30) for k, v in groups.items() if len(v) > 1}


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def _not_run(head: str, r: dict, cells: int) -> str | None:
    """The table line of a case that did not run (its status and reason, then ``cells`` empty cells), else None."""
    if r.get("status") == "ok":
        return None
    return f"{head} {r.get('status')}: {r.get('reason', '')[:120]} |" + " |" * cells


def markdown_table(rows: list[dict], mm_rate: float | None) -> str:
    lines = [f"torch.mm bf16 {CEILING_SIZE}³ in this run: {_fmt(mm_rate, '.0f')} TFLOP/s", "",
             ("| B | N | D | dtype | case | ms (min) | projected ms (bench/roofline.py) | TFLOP/s (6·B·N·D) | ÷ mm rate "
              "| peak beyond inputs+grads (MiB) | loss |"),
             "| ---: | ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["case"] in ("mm_ceiling", *EPILOGUE_CASES, *RANKING_CASES, *MULTIVECTOR_CASES):
            continue
        hit = f" ({r['filter_hit_rate']:.1%} of tiles skipped)" if "filter_hit_rate" in r else ""
        head = f"| {r['B']} | {r['N']} | {r['D']} | {r['dtype']} | {r['case']}{hit} |"
        if (skipped := _not_run(head, r, 5)) is not None:
            lines.append(skipped)
            continue
        lines.append(f"{head} {r['min_s'] * 1e3:.1f} | {_fmt(r.get('projected_ms'), '.1f')} | "
                     f"{_fmt(r.get('tflops'), '.0f')} | "
                     f"{_fmt(r.get('ratio_to_mm'), '.2f')} | {_fmt(r.get('peak_beyond_inputs_and_grads_mib'), '.0f')}"
                     f" | {_fmt(r.get('loss'), '.5g')} |")
    lines += ["", "The slab epilogue alone (float32 block, in place; GB/s at 8 bytes per element):", "",
              "| rows | columns | case | ms (min) | GB/s | ÷ copy time |", "| ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in rows:
        if r["case"] not in EPILOGUE_CASES:
            continue
        head = f"| {r['B']} | {r['N']} | {r['case']} |"
        if (skipped := _not_run(head, r, 2)) is not None:
            lines.append(skipped)
            continue
        lines.append(f"{head} {r['min_s'] * 1e3:.3f} | {_fmt(r.get('gbps'), '.0f')} | "
                     f"{_fmt(r.get('ratio_to_copy'), '.2f')} |")
    return "\n".join(lines + ranking_table(rows) + multivector_table(rows))


def ranking_table(rows: list[dict]) -> list[str]:
    """The ranking rows: time, its ratio to the same loss's sentence-transformers time (how many times faster), peak
    memory beyond the inputs."""
    st = {(r["N"], r["ranking_loss"]): r["min_s"] for r in rows
          if r["case"] in RANKING_CASES and r.get("status") == "ok" and r.get("implementation") == "st"}
    lines = ["", "Ranking ops, forward + backward on precomputed float32 logits (Q queries × n documents):", "",
             "| Q | n | case | ms (min) | sentence-transformers time ÷ this | peak beyond inputs (MiB) | loss |",
             "| ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["case"] not in RANKING_CASES:
            continue
        head = f"| {r['B']} | {r['N']} | {r['case']} |"
        if (skipped := _not_run(head, r, 3)) is not None:
            lines.append(skipped)
            continue
        reference = st.get((r["N"], r["ranking_loss"]))
        lines.append(f"{head} {r['min_s'] * 1e3:.2f} | {_fmt(reference and reference / r['min_s'], '.1f')} | "
                     f"{_fmt(r.get('peak_beyond_inputs_mib'), '.0f')} | {_fmt(r.get('loss'), '.5g')} |")
    return lines


def multivector_table(rows: list[dict]) -> list[str]:
    """The MaxSim and SPLADE rows (bench/gpu_multivector.py): time, its ratio to the same shape's GEMM case (the
    limit) and sentence-transformers' time ÷ it, peak memory; MaxSim also the token GEMM's rate and the errors
    against float64."""
    lines = ["", "MaxSim (ColBERT) loss stage, forward + backward (B queries × Lq tokens, N documents × Ld tokens, "
             "D; GEMM TFLOP/s: the token GEMM's 2·B·Lq·N·Ld·D FLOPs ÷ time; errors: relative to float64):", "",
             "| B | dtype | case | ms (min) | ÷ token GEMM | upstream ÷ this | GEMM TFLOP/s | peak beyond inputs+grads "
             "(MiB) | loss error | grad error (queries / docs) |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    splade = ["", "SPLADE CachedSpladeLoss loss stage, forward + backward (B anchors, B positives, D, float32, "
              "mini-batches; ÷ dense GEMMs: S=QDᵀ, SD, SᵀQ):", "",
              "| B | D | case | ms (min) | ÷ dense GEMMs | upstream ÷ this | peak beyond inputs+grads (MiB) | loss |",
              "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["case"] not in MULTIVECTOR_CASES:
            continue
        maxsim = r["case"].startswith("maxsim_")
        shown = r["case"] + (f" ({r['fastcache_backend']})" if r.get("fastcache_backend") else "") + \
            (f" (on {r['backend']})" if r.get("backend") and not r["case"].endswith(r["backend"]) else "")
        head = f"| {r['B']} | {r['dtype'] if maxsim else r['D']} | {shown} |"
        if (skipped := _not_run(head, r, 6 if maxsim else 4)) is not None:
            (lines if maxsim else splade).append(skipped)
            continue
        common = (f"{head} {r['min_s'] * 1e3:.2f} | {_fmt(r.get('ratio_to_gemm'), '.2f')} | "
                  f"{_fmt(r.get('upstream_over_case'), '.2f')} |")
        peak = _fmt(r.get("peak_beyond_inputs_and_grads_mib"), ".0f")
        if not maxsim:
            splade.append(f"{common} {peak} | {_fmt(r.get('loss'), '.6g')} |")
            continue
        grads = "–" if "grad_queries_rel_error" not in r else \
            f"{r['grad_queries_rel_error']:.1e} / {r['grad_docs_rel_error']:.1e}"
        lines.append(f"{common} {_fmt(r.get('gemm_tflops'), '.0f')} | {peak} | "
                     f"{_fmt(r.get('loss_rel_error'), '.1e')} | {grads} |")
    return lines + splade


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in rows:
            writer.writerow({
                **{k: r.get(k) for k in ("B", "N", "D", "dtype", "case", "repeats", "tflops", "ratio_to_mm",
                                         "peak_beyond_inputs_mib", "peak_beyond_inputs_and_grads_mib", "loss", "gbps",
                                         "ratio_to_copy", "projected_ms", "filter_hit_rate", "ratio_to_gemm",
                                         "upstream_over_case")},
                "label": {**CASES, **MATRYOSHKA_CASES, **EPILOGUE_CASES, **RANKING_CASES, **MULTIVECTOR_CASES}.get(
                    r["case"], "torch.mm bf16 (ceiling)"),
                "min_ms": None if r.get("min_s") is None else r["min_s"] * 1e3,
                "median_ms": None if r.get("median_s") is None else r["median_s"] * 1e3,
                "status": r.get("status") if r.get("status") == "ok" else f"{r.get('status')}: {r.get('reason')}",
            })


def write_report(out_dir: Path, this_run: list[dict], info: dict, header: dict) -> dict:
    """gpu_bench.json and gpu_bench.csv from every finished row on disk (this run's and earlier phases') and this
    run's rows for cases that did not finish."""
    finished, disk_info = finished_rows(out_dir)
    done = {tuple(r.get(k) for k in ("B", "N", "D", "dtype", "case")) for r in finished}
    rows = finished + [r for r in this_run if tuple(r.get(k) for k in ("B", "N", "D", "dtype", "case")) not in done]
    mm_rate = add_rates(rows)
    roofline = add_projections(rows, mm_rate, {**disk_info, **info}.get("gpu"))
    from fastcache.app.benchmark import machine_info

    report = {
        **header,
        "machine": {**machine_info(), **disk_info, **info, "peers": _peer_versions()},
        # the device machine gets a copy of the tree without .git: gpu_suite.sh passes the commit in FASTCACHE_COMMIT
        "commit": os.environ.get("FASTCACHE_COMMIT") or machine_info().get("commit"),
        "mm_tflops": mm_rate,
        "roofline": roofline,
        "cases": {**CASES, **MATRYOSHKA_CASES, **EPILOGUE_CASES, **RANKING_CASES, **MULTIVECTOR_CASES},
        "rows": rows,
        "loss_spread": loss_spread(rows),
        "targets": targets(rows),
    }
    (out_dir / "gpu_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    write_csv(rows, out_dir / "gpu_bench.csv")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for bench_rows.jsonl, gpu_bench.json and gpu_bench.csv")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on the CPU (fastcache on its torch backend): exercises every code path")
    parser.add_argument("--phase", choices=PHASES, default="all",
                        help="headline: the ceiling and the target shape; multivector: MaxSim and SPLADE; rest: "
                             "everything else; all (default)")
    parser.add_argument("--budget-s", type=float, default=330.0, help="time budget of the whole run (default 330)")
    parser.add_argument("--case-seconds", type=float, default=3.0,
                        help=f"timed runs per case: as many as fit in this many seconds, {MIN_REPEATS} to "
                             f"{MAX_REPEATS} (default 3)")
    every_case = [*CASES, *MATRYOSHKA_CASES, *RANKING_CASES, *MULTIVECTOR_CASES]
    parser.add_argument("--cases", nargs="+", choices=every_case, default=every_case, help="a subset of cases")
    parser.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], default=["bfloat16", "float32"],
                        help="a subset of the dtypes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        run_group(json.loads(args.child), args.results, args.case_seconds, args.dry_run)
        return 0
    if args.out is None:
        parser.error("--out is required")

    header = {"started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.dry_run, "phase": args.phase,
              "settings": {"scale": SCALE, "similarity": "cos", "directions": ["query_to_doc"],
                           "budget_s": args.budget_s, "case_seconds": args.case_seconds, "warmups": WARMUPS,
                           "slab_memory_budget": SLAB_BUDGET, "flop_per_run": "6*B*N*D",
                           "ceiling": f"torch.mm bf16 {CEILING_SIZE}^3", "st_max_rows": ST_MAX_ROWS}}
    progress = {"rows": [], "info": {}}

    def after_group(rows, info):
        progress.update(rows=list(rows), info=dict(info))
        write_report(args.out, progress["rows"], progress["info"], header)

    # a process started in the background inherits SIGINT ignored (and Python then installs no handler): restore it,
    # so that timeout --signal=INT always ends the run with its report
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run_all(args.out, dry_run=args.dry_run, budget_s=args.budget_s, case_seconds=args.case_seconds,
                cases=args.cases, dtypes=args.dtypes, phase=args.phase, after_group=after_group)
    except KeyboardInterrupt:  # timeout --signal=INT: keep what finished (bench_rows.jsonl has every row)
        header["interrupted"] = True
        print("interrupted: the report holds the rows that finished", file=sys.stderr, flush=True)
    report = write_report(args.out, progress["rows"], progress["info"], header)
    print(markdown_table(report["rows"], report["mm_tflops"]))
    for group, spread in report["loss_spread"].items():
        print(f"losses at {group} agree to {spread:.1e} (relative)")
    for item in report["targets"]:
        print(f"- [{'met' if item['met'] else 'NOT MET'}] {item['target']}: {item['value']}")
    print(f"\nwrote {args.out / 'gpu_bench.json'} and {args.out / 'gpu_bench.csv'} (every row: {args.out / ROWS_FILE})")
    return 130 if header.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
