"""CPU benchmark table of the contrastive loss stage: fastcache against the bare GEMMs and sentence-transformers.

    python bench/contrastive_table.py            # B=4096, N=8192, D=384 (a few minutes on 2 cores)
    python bench/contrastive_table.py --quick    # B=256, N=512, D=64 (smoke run, well under a minute)

Every case runs the loss stage forward and backward (the loss and dL/d(embeddings)) on random fp32 embeddings:
B queries, N = C·B candidates laid out column-major (the B positives, then C-1 hard-negative columns), D dims,
cosine similarity, scale 20 (the gradient filter's case, fastcache_cpu_filtered, on embeddings with a trained
model's similarities instead: fastcache.app.benchmark.trained_like; it also reports its hit rate and its error
against the exact call on them). It times every case in this process (warm-up, then the minimum of the repeats),
measures each case's peak memory in a fresh subprocess (fastcache/app/harness.py), prints a markdown table and whether
the targets are met, and writes a JSON file with the machine's details (the full run writes
bench/results/contrastive_cpu.json unless --out says otherwise; --quick writes only with --out).

The cases (:data:`CASES`, :func:`make_case`) are fastcache.app.benchmark's, shared with ``fastcache bench`` and
bench/bench_contrastive.py.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the sentence-transformers model is built locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import add_table_arguments, load_at_start, peak_memory_many, print_targets, time_case  # noqa: E402

# the cases live in the package (``fastcache bench`` runs them across batch sizes); re-exported for bench/ scripts
from fastcache.app.benchmark import (  # noqa: E402, F401
    BUDGETS_MIB,
    CASES,
    FILTER_EPS,
    make_case,
    run_machine,
    save_json,
)

BENCH_DIR = Path(__file__).resolve().parent
FULL = {"B": 4096, "N": 8192, "D": 384}
QUICK = {"B": 256, "N": 512, "D": 64}
WARMUP_SHAPE = {"B": 64, "N": 128, "D": 32}  # the memory child's warm-up run (loads libraries before the baseline)
DEFAULT_OUT = BENCH_DIR / "results" / "contrastive_cpu.json"


def _fmt(x: float | None, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def targets(results: dict) -> list[dict]:
    """The targets that the measured cases allow checking."""
    t = {k: r["min_s"] for k, r in results.items() if r.get("min_s") is not None}
    found = []
    if "fastcache_cpu" in t and "gemms" in t:
        ratio = t["fastcache_cpu"] / t["gemms"]
        found.append({"target": "fused cpu forward+backward <= 1.3x the bare GEMMs", "value": f"{ratio:.2f}x",
                      "met": ratio <= 1.3})
    if "fastcache_cpu" in t and "st_cached_mbs32" in t:
        speedup = t["st_cached_mbs32"] / t["fastcache_cpu"]
        found.append({"target": ">= 4x faster than sentence-transformers' cached loss stage (mini_batch_size=32)",
                      "value": f"{speedup:.2f}x", "met": speedup >= 4})
    if "fastcache_cpu" in t and "st_cached_mbs256" in t:
        speedup = t["st_cached_mbs256"] / t["fastcache_cpu"]
        found.append({"target": "faster than sentence-transformers' cached loss stage (mini_batch_size=256)",
                      "value": f"{speedup:.2f}x", "met": speedup > 1})
    for key, budget in BUDGETS_MIB.items():
        beyond = results.get(key, {}).get("memory", {}).get("peak_beyond_inputs_and_grads_mib")
        if beyond is not None:
            found.append({"target": f"{key}: peak memory beyond inputs and gradients <= budget {budget} MiB",
                          "value": f"{beyond:.1f} MiB", "met": beyond <= budget})
    return found


def markdown_table(results: dict, shape: dict, repeats: int) -> str:
    t_gemm = results.get("gemms", {}).get("min_s")
    t_ours = results.get("fastcache_cpu", {}).get("min_s")
    lines = [
        f"B={shape['B']} queries, N={shape['N']} candidates, D={shape['D']}, fp32, forward+backward, "
        f"{torch.get_num_threads()} threads",
        "",
        f"| case | seconds (min of {repeats}) | median | × bare GEMMs | time ÷ fastcache cpu | "
        "peak beyond inputs+grads (MiB) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for key, r in results.items():
        if r.get("error"):
            lines.append(f"| {CASES[key]} | error: {r['error']} | | | | |")
            continue
        t = r["min_s"]
        memory = r.get("memory", {})
        beyond = memory.get("peak_beyond_inputs_and_grads_mib")
        mem = _fmt(beyond, ".1f") if "error" not in memory else f"error: {memory['error']}"
        lines.append(f"| {CASES[key]} | {t:.4f} | {r['median_s']:.4f} | {_fmt(t / t_gemm if t_gemm else None, '.2f')}"
                     f" | {_fmt(t / t_ours if t_ours else None, '.2f')} | {mem} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_table_arguments(parser, quick=f"smoke shape {QUICK} instead of {FULL}", default_out=DEFAULT_OUT)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="a subset of cases")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    load = load_at_start()
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)

    results: dict[str, dict] = {}
    for key in args.cases:
        print(f"timing {key} ...", file=sys.stderr, flush=True)
        try:
            case = make_case(key, **shape)
            timing, output = time_case(case, warmup=args.warmup, repeats=args.repeats)
        except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
            results[key] = {"label": CASES[key], "error": f"{type(error).__name__}: {error}"}
            continue
        loss = None if output.loss is None else float(output.loss)
        results[key] = {**case.info, "min_s": timing.min_s, "median_s": timing.median_s, "times_s": timing.times_s,
                        "loss": loss}
        del case, output
        gc.collect()

    if not args.no_memory:
        print("measuring peak memory (one subprocess per case) ...", file=sys.stderr, flush=True)
        # the sentence-transformers children import the most: start them first
        keys = sorted((k for k in results if "error" not in results[k]), key=lambda k: not k.startswith("st_"))
        jobs = [(key, {"name": key, **shape}, {"name": key, **WARMUP_SHAPE}) for key in keys]
        memory = peak_memory_many(jobs, Path(__file__).resolve(), "make_case", parallel=args.parallel)
        for key, m in memory.items():
            results[key]["memory"] = m
            if m.get("baseline_gap_mib", 0) > 16:
                print(f"warning: {key}: the high-water mark was {m['baseline_gap_mib']:.0f} MiB above the resident "
                      "size at the baseline, so its peak may be under-reported", file=sys.stderr)

    flops = 3 * 2 * shape["B"] * shape["N"] * shape["D"]
    t_gemm = results.get("gemms", {}).get("min_s")
    print(markdown_table(results, shape, args.repeats))
    if t_gemm:
        print(f"\nbare GEMMs: {flops / 1e9:.1f} GFLOP in {t_gemm:.3f} s = "
              f"{flops / t_gemm / 1e9:.0f} GFLOP/s")
    for key in FILTER_EPS.keys() & results.keys():
        r = results[key]
        if "filter_hit_rate" in r:
            print(f"{key} (filter_eps={r['filter_eps']:.3g}, its own embeddings): {r['filter_hit_rate']:.1%} of "
                  f"{r['filter_tiles']} backward tiles skipped; vs the exact call on them: gradient error "
                  f"{r['filter_grad_queries_error']:.2e} (queries), {r['filter_grad_docs_error']:.2e} (docs) of the "
                  f"largest entry, loss difference {r['filter_loss_difference']:.1e}")
    # the loss cases on the same random embeddings (the filtered cases have their own)
    losses = {k: r["loss"] for k, r in results.items() if r.get("loss") is not None and k not in FILTER_EPS}
    if losses:
        spread = max(losses.values()) - min(losses.values())
        mean = sum(losses.values()) / len(losses)
        print(f"losses of the {len(losses)} loss cases agree to {spread:.2e} (mean {mean:.6f})")
    found = targets(results)
    print_targets(found, args.quick)

    if out_path is not None:
        report = {"machine": run_machine(load), "shape": shape, "dtype": "float32", "repeats": args.repeats,
                  "warmup": args.warmup, "quick": args.quick, "gemm_flop": flops, "cases": results,
                  "targets": found}
        save_json(report, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
