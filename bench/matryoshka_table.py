"""CPU benchmark of the Matryoshka loss stage: fastcache's fused multi-dimension loss against sentence-transformers'
MatryoshkaLoss and the single-dimension cached loss.

    python bench/matryoshka_table.py            # B=4096, N=8192, D=384, dims 384/256/128/64/32, mbs 32 (minutes)
    python bench/matryoshka_table.py --quick    # B=256, N=512, D=64, dims 64/32/16/8/4 (smoke run)
    python bench/matryoshka_table.py --fastcache-only --threads 1 --repeats 5 \
        --out bench/results/matryoshka_cpu_fastcache_1thread.json   # the two fastcache cases (seconds, not minutes)
    python bench/matryoshka_table.py --fastcache-only --threads 1 --profile   # where each case's time goes
    python bench/matryoshka_table.py --threads 1 --floor --repeats 5 \
        --out bench/results/matryoshka_cpu_floor_1thread.json   # the two ops part by part (what bounds the ratio)

Every case is the loss stage of a cached (GradCache) MultipleNegativesRankingLoss, as its forward runs it once the
mini-batches are embedded: ``calculate_loss(reps, with_backward=True)`` on random fp32 embeddings handed over as
sentence-transformers' gradient cache does (per column, mini-batches of ``mini_batch_size`` rows that require
grad): the loss and every embedding's gradient, B anchors, B positives and B hard negatives (N = 2B candidates),
cosine similarity, scale 20. The cases run interleaved (A B C A B C ..., fastcache.app.harness.time_cases), the table
shows the minimum of the repeats and the ratios within the run. The full run (every case) writes
bench/results/matryoshka_cpu.json unless --out says otherwise; --quick and subsets of cases write only with --out.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the sentence-transformers model is built locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, RunOutput, print_targets, time_cases  # noqa: E402

from fastcache.app.benchmark import run_machine, save_json, tiny_sentence_transformer  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
FULL = {"B": 4096, "D": 384, "dims": (384, 256, 128, 64, 32), "mini_batch_size": 32}
QUICK = {"B": 256, "D": 64, "dims": (64, 32, 16, 8, 4), "mini_batch_size": 32}
DEFAULT_OUT = BENCH_DIR / "results" / "matryoshka_cpu.json"
CASES = {
    "fastcache_matryoshka": "fastcache MatryoshkaLoss(fastcache CachedMNRL): all dims in one fused call",
    "fastcache_single": "fastcache CachedMNRL, full dimension only",
    "st_matryoshka_over_fastcache": "sentence-transformers MatryoshkaLoss(fastcache CachedMNRL): dim by dim",
    "st_matryoshka": "sentence-transformers MatryoshkaLoss(CachedMNRL)",
    "st_single": "sentence-transformers CachedMNRL, full dimension only",
}


class _ModelOfWidth:
    """Stands in for a model of ``width`` dims in MatryoshkaLoss's constructor (which only asks for the width;
    the loss stage never runs the model)."""

    def __init__(self, width: int):
        self.width = width

    def get_embedding_dimension(self) -> int:
        return self.width


def make_case(name: str, B: int, D: int, dims: tuple[int, ...], mini_batch_size: int, seed: int = 0) -> Case:
    """Case ``name`` of :data:`CASES`: the loss stage on 3 columns of B random fp32 embeddings of D dims."""
    from sentence_transformers.sentence_transformer import losses as st_losses

    from fastcache import losses as fc_losses

    generator = torch.Generator().manual_seed(seed)
    columns = [torch.randn(B, D, generator=generator) for _ in range(3)]
    reps = [[mb.detach().requires_grad_() for mb in column.split(mini_batch_size)] for column in columns]
    leaves = [t for column in reps for t in column]
    model = tiny_sentence_transformer()
    inner_impl = st_losses if name.startswith("st_") and not name.endswith("fastcache") else fc_losses
    inner = inner_impl.CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    wrapper = {"fastcache_matryoshka": fc_losses.MatryoshkaLoss, "st_matryoshka": st_losses.MatryoshkaLoss,
               "st_matryoshka_over_fastcache": st_losses.MatryoshkaLoss}.get(name)
    if wrapper is not None:  # the wrapper checks the dims against the width of a model of D dims
        wrapped = wrapper(_ModelOfWidth(D), inner, list(dims))

    def reset():
        for t in leaves:
            t.grad = None

    def run():
        if name == "fastcache_matryoshka":  # the inner loss stage through the step's Matryoshka op, as forward runs it
            loss = inner.cached_loss(reps, op=wrapped.step_op(), with_backward=True)
        else:
            loss = inner.calculate_loss(reps, with_backward=True)
        return RunOutput(loss.detach(), tuple(t.grad for t in leaves))

    info = {"label": CASES[name], "B": B, "N": 2 * B, "D": D, "mini_batch_size": mini_batch_size,
            "dims": list(dims) if wrapper is not None else [D]}
    return Case(name, run, leaves, reset=reset, info=info)


def profile(cases: list[Case], repeats: int) -> None:
    """Print where each case's time goes (the run of least total among ``repeats``, after one warm-up): the
    similarity GEMMs of the forward (aten::mm), the gradient GEMMs of the backward (aten::addmm_), the rest
    (the compiled epilogue, normalisation, Python), as torch.profiler records them."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    print("| case | total ms | forward GEMMs (mm) | backward GEMMs (addmm_) | rest: epilogue, normalisation, Python |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for case in cases:
        best = None
        for run in range(repeats + 1):
            case.reset()
            with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                case.run()
                total = time.perf_counter() - start
            if run == 0 or (best is not None and total >= best[0]):
                continue
            ops = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
            best = (total, ops.get("aten::mm", 0.0), ops.get("aten::addmm_", 0.0))
        total, forward, backward = best
        print(f"| {case.name} | {total * 1e3:.0f} | {forward * 1e3:.0f} | {backward * 1e3:.0f} | "
              f"{(total - forward - backward) * 1e3:.0f} |")


def floor(B: int, D: int, dims: tuple[int, ...], repeats: int, seed: int = 0, **_) -> dict:
    """Print what bounds the fused loss stage against the single-dim one, part by part: both ops' loss and gradient
    calls (fastcache.ops, cosine, scale 20, N = 2B candidates), and their chunk loops rebuilt from the same calls with
    a clock around each part: the forward GEMMs (K segment products per chunk, or one), the C++ epilogue
    (matryoshka_epilogue_cpu on the K blocks, or contrastive_epilogue_cpu on one), the backward GEMMs (dX and dYᵀ
    per segment, or dX and dY), at the chunk heights the ops choose. Minimum over ``repeats`` interleaved runs.
    What the op spends beyond its parts (normalisation, radial sums, Python) is the last column. Returns the
    table (seconds) and the chunk heights."""
    from fastcache import _backend, contrastive_loss_and_grad
    from fastcache.ops import contrastive as C
    from fastcache.ops.contrastive import epilogue as contrastive_epilogue
    from fastcache.ops.contrastive.options import kernel_params
    from fastcache.ops.contrastive.slab import chunk_rows
    from fastcache.ops.matryoshka import matryoshka_contrastive_loss_and_grad
    from fastcache.ops.matryoshka import slab as M

    extension = _backend.EXTENSION
    generator = torch.Generator().manual_seed(seed)
    queries, docs = torch.randn(B, D, generator=generator), torch.randn(2 * B, D, generator=generator)
    options = C.ContrastiveOptions()
    layout = C.check_inputs(queries, docs, None, None, None, options)
    q, d = (torch.nn.functional.normalize(x, dim=1) for x in (queries, docs))
    N, K = d.size(0), len(dims)
    segments = list(zip(dims[1:] + (0,), dims))
    norms_q, norms_d = M._prefix_norms(queries, dims, torch.float32), M._prefix_norms(docs, dims, torch.float32)
    fused_rows = M.slab_rows(layout, options, False, 0, K, "cpu", queries)
    single_rows = chunk_rows(layout, options, False, 0, _backend.memory_budget(None), 4,
                             contrastive_epilogue.WORKSPACE_BLOCKS["cpu"])

    def parts(fused: bool) -> list[float]:
        rows = fused_rows if fused else single_rows
        blocks = torch.empty(K if fused else 1, rows, N)
        bounds = segments if fused else [(0, D)]
        grad_q, grad_d = torch.zeros(B, D), torch.zeros(D, N) if fused else torch.zeros(N, D)
        clock = [0.0, 0.0, 0.0]
        for r0 in range(0, B, rows):
            c = min(rows, B - r0)
            start = time.perf_counter()
            for k, (lo, hi) in enumerate(bounds):
                torch.mm(q[r0:r0 + c, lo:hi], d[:, lo:hi].T, out=blocks[k, :c])
            middle = time.perf_counter()
            if fused:
                extension.matryoshka_epilogue_cpu([blocks[:, :c]], [0], [], None, [norms_q[1][:, r0:r0 + c]],
                                                  [norms_d[1]], [1.0] * K, kernel_params(options, layout, 1, r0))
            else:
                extension.contrastive_epilogue_cpu(blocks[0, :c], None, None, None, None, None, None, None,
                                                   kernel_params(options, layout, 1, r0))
            end = time.perf_counter()
            for k, (lo, hi) in enumerate(bounds):
                grad_q[r0:r0 + c, lo:hi].addmm_(blocks[k, :c], d[:, lo:hi])
                if fused:  # the fused op's transposed column gradient (ops/matryoshka/slab.py: _segment_gemms_)
                    grad_d[lo:hi].addmm_(q[r0:r0 + c, lo:hi].T, blocks[k, :c])
                else:
                    grad_d.addmm_(blocks[k, :c].T, q[r0:r0 + c])
            clock[0] += middle - start
            clock[1] += end - middle
            clock[2] += time.perf_counter() - end
        return clock

    def total(fused: bool) -> float:
        start = time.perf_counter()
        if fused:
            matryoshka_contrastive_loss_and_grad(queries, docs, dims=dims)
        else:
            contrastive_loss_and_grad(queries, docs)
        return time.perf_counter() - start

    best = {name: [float("inf")] * 4 for name in ("fused", "single")}
    for run in range(repeats + 1):  # the first run warms up
        for name in best:
            measured = [total(name == "fused")] + parts(name == "fused")
            if run:
                best[name] = [min(a, b) for a, b in zip(best[name], measured)]
    print(f"B={B}, N={2 * B}, D={D}, dims {dims}, fp32, {torch.get_num_threads()} threads; chunk rows: fused "
          f"{fused_rows}, single {single_rows}; ms, min of {repeats}\n")
    print("| op | total | forward GEMMs | epilogue | backward GEMMs | rest |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (whole, forward, epilogue, backward) in best.items():
        print(f"| {name} | {whole * 1e3:.0f} | {forward * 1e3:.0f} | {epilogue * 1e3:.0f} | {backward * 1e3:.0f} | "
              f"{(whole - forward - epilogue - backward) * 1e3:.0f} |")
    ratios = [f / s for f, s in zip(best["fused"], best["single"])]
    print("| fused ÷ single | " + " | ".join(f"{r:.2f}" for r in ratios[:4]) + " | |")
    parts_s = ("total_s", "forward_gemms_s", "epilogue_s", "backward_gemms_s")
    return {"chunk_rows": {"fused": fused_rows, "single": single_rows},
            "ops": {name: dict(zip(parts_s, times)) for name, times in best.items()}}


def targets(t: dict[str, float]) -> list[dict]:
    found = []
    if "fastcache_matryoshka" in t and "fastcache_single" in t:
        ratio = t["fastcache_matryoshka"] / t["fastcache_single"]
        found.append({"target": "fused Matryoshka loss stage <= 1.3x the single-dimension fused loss stage",
                      "value": f"{ratio:.2f}x", "met": ratio <= 1.3})
    if "fastcache_matryoshka" in t and "st_matryoshka" in t:
        speedup = t["st_matryoshka"] / t["fastcache_matryoshka"]
        found.append({"target": ">= 5x faster than sentence-transformers' MatryoshkaLoss(CachedMNRL) loss stage",
                      "value": f"{speedup:.2f}x", "met": speedup >= 5})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke shape {QUICK} instead of {FULL}")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: "
                        f"{DEFAULT_OUT.relative_to(BENCH_DIR.parent)} for the full run of every case, none for "
                        "--quick or a subset)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the table shows the minimum)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="a subset of cases")
    parser.add_argument("--fastcache-only", action="store_true",
                        help="only fastcache_matryoshka and fastcache_single (the 1.3x target; overrides --cases)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the timing table: each case's forward GEMMs, backward GEMMs and the rest")
    parser.add_argument("--floor", action="store_true",
                        help="instead of the timing table: the fused and single-dim ops part by part (forward GEMMs, "
                             "epilogue, backward GEMMs, rest), timed in their chunk loops")
    args = parser.parse_args(argv)
    if args.fastcache_only:
        args.cases = ["fastcache_matryoshka", "fastcache_single"]
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        print(f"warning: 1-minute load average {load_at_start[0]:.2f} before the run: the timings will be noisy",
              file=sys.stderr)
    if args.floor:
        report = floor(**shape, repeats=args.repeats)
        if args.out is not None:
            save_json({"machine": run_machine(load_at_start), "shape": {**shape, "dims": list(shape["dims"])},
                       "dtype": "float32", "repeats": args.repeats, "floor": report}, args.out)
        return 0
    cases = [make_case(name, **shape) for name in args.cases]
    if args.profile:
        profile(cases, args.repeats)
        return 0
    timed = time_cases(cases, warmup=args.warmup, repeats=args.repeats)
    results = {case.name: {**case.info, "min_s": timing.min_s, "median_s": timing.median_s,
                           "times_s": timing.times_s, "loss": float(output.loss)}
               for case, (timing, output) in zip(cases, timed)}
    t = {k: r["min_s"] for k, r in results.items()}
    base = t.get("fastcache_single")
    print(f"B={shape['B']} anchors, N={2 * shape['B']} candidates, D={shape['D']}, dims {shape['dims']}, "
          f"mini_batch_size={shape['mini_batch_size']}, fp32, {torch.get_num_threads()} threads\n")
    print(f"| case | seconds (min of {args.repeats}) | median | ÷ fastcache single-dim | ÷ fastcache Matryoshka |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for key, r in results.items():
        ratio_single = f"{r['min_s'] / base:.2f}" if base else "–"
        ratio_fused = f"{r['min_s'] / t['fastcache_matryoshka']:.2f}" if "fastcache_matryoshka" in t else "–"
        print(f"| {CASES[key]} | {r['min_s']:.3f} | {r['median_s']:.3f} | {ratio_single} | {ratio_fused} |")
    multi = {k: r["loss"] for k, r in results.items() if len(r["dims"]) > 1}
    if len(multi) > 1:
        print(f"\nMatryoshka losses agree to {max(multi.values()) - min(multi.values()):.2e} "
              f"(mean {sum(multi.values()) / len(multi):.6f})")
    found = targets(t)
    print_targets(found, args.quick)
    full = not args.quick and set(args.cases) == set(CASES)
    out_path = args.out if args.out is not None else (DEFAULT_OUT if full else None)
    if out_path is not None:
        report = {"machine": run_machine(load_at_start), "shape": {**shape, "dims": list(shape["dims"])}, "dtype": "float32",
                  "repeats": args.repeats, "warmup": args.warmup, "quick": args.quick, "cases": results,
                  "targets": found}
        save_json(report, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
