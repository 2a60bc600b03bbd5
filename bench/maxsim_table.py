"""CPU benchmark of the ColBERT (MaxSim) contrastive loss stage: fastcache's fused op against sentence-transformers'
MultiVectorMultipleNegativesRankingLoss scoring and the one token-level GEMM the maths needs.

    python bench/maxsim_table.py                    # B=128 and B=512 queries (minutes on 2 cores)
    python bench/maxsim_table.py --batches 128      # one batch size
    python bench/maxsim_table.py --quick            # B=8, tiny tokens (smoke run, seconds)

Every case is the loss stage forward and backward on random fp32 token embeddings: B queries of Lq=32 tokens, N=2
documents per query (the positive and one hard negative) of Ld=128 tokens, D=128; the loss and dL/d(queries),
dL/d(documents), scale 1, no masks (every token valid):

    fastcache_cpu     fastcache.maxsim_contrastive_loss(backend="cpu") + backward (csrc/cpu/maxsim.cpp)
    fastcache_torch   the same with backend="torch"
    upstream          sentence-transformers' loss stage: colbert_scores + F.cross_entropy + backward
    gemm              one token-level GEMM: all B·Lq query tokens against all B·N·Ld document tokens, into one reused
                      32 MiB output (the products any MaxSim needs: the limit)

The cases run interleaved (fastcache.app.harness.time_cases: A B C D A B C D ...), the table shows the minimum of
the repeats and the ratios within the run; each case's peak memory beyond its inputs and gradients is measured
in a fresh subprocess (fastcache/app/harness.py). The full run writes bench/results/maxsim_cpu.json unless --out
says otherwise; --quick writes only with --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import (  # noqa: E402
    Case,
    RunOutput,
    add_table_arguments,
    load_at_start,
    peak_memory_many,
    print_targets,
    time_cases,
)

from fastcache.app.benchmark import run_machine, save_json  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "maxsim_cpu.json"
FULL = {"Lq": 32, "N": 2, "Ld": 128, "D": 128}
FULL_BATCHES = (128, 512)
QUICK = {"Lq": 8, "N": 2, "Ld": 16, "D": 32}
QUICK_BATCHES = (8,)
WARMUP_SHAPE = {"B": 2, "Lq": 4, "N": 2, "Ld": 8, "D": 16}
GEMM_TILE_BYTES = 32 * 2**20
CASES = {
    "fastcache_cpu": "fastcache maxsim_contrastive_loss, backend=cpu",
    "fastcache_torch": "fastcache maxsim_contrastive_loss, backend=torch",
    "upstream": "sentence-transformers colbert_scores + cross-entropy",
    "gemm": "one token-level GEMM (the limit)",
}


def make_case(name: str, B: int, Lq: int, N: int, Ld: int, D: int, seed: int = 0, device: str = "cpu",
              dtype: str = "float32", gemm_tile_bytes: int = GEMM_TILE_BYTES) -> Case:
    """Case ``name`` of :data:`CASES` (or ``fastcache_<backend>`` for any backend of the op, e.g. triton: what
    bench/gpu_multivector.py runs) on B queries [B, Lq, D] and documents [B, N, Ld, D] (seeded normal tokens,
    rounded to ``dtype``, on ``device``); the gemm case writes chunks of at most ``gemm_tile_bytes``."""
    import torch.nn.functional as F

    from fastcache import maxsim_contrastive_loss

    generator = torch.Generator(device=device).manual_seed(seed)
    queries = torch.randn(B, Lq, D, generator=generator, device=device).to(getattr(torch, dtype)).requires_grad_()
    docs = torch.randn(B, N, Ld, D, generator=generator, device=device).to(queries.dtype).requires_grad_()
    backend = name.removeprefix("fastcache_")
    info = {"label": CASES.get(name, f"fastcache maxsim_contrastive_loss, backend={backend}"), "B": B, "Lq": Lq,
            "N": N, "Ld": Ld, "D": D, "dtype": dtype}

    def reset():
        queries.grad = docs.grad = None

    if name == "gemm":
        q, d = queries.detach().reshape(-1, D), docs.detach().reshape(-1, D)
        columns = max(1, gemm_tile_bytes // (q.element_size() * q.size(0)))
        out = torch.empty(q.size(0), columns, device=device, dtype=q.dtype)

        def run():
            for c0 in range(0, d.size(0), columns):
                chunk = d[c0:c0 + columns]
                torch.mm(q, chunk.T, out=out[:, :chunk.size(0)])
            return RunOutput()

        return Case(name, run, (queries, docs), info=info)

    labels = torch.arange(B, device=device) * N

    def run():
        if name == "upstream":
            from sentence_transformers.multi_vector_encoder.scoring import colbert_scores

            loss = F.cross_entropy(colbert_scores(queries, docs) * 1.0, labels)
        else:
            loss = maxsim_contrastive_loss(queries, docs, backend=backend)
        loss.backward()
        return RunOutput(loss.detach(), (queries.grad, docs.grad))

    return Case(name, run, (queries, docs), reset=reset, info=info)


def targets(results: dict[str, dict], fastcache: str = "fastcache_cpu") -> list[dict]:
    """The targets of the ``fastcache`` case against the upstream and gemm cases of ``results`` (case -> "min_s" and
    optionally "memory": {"peak_beyond_inputs_and_grads_mib": ...})."""
    t = {key: r["min_s"] for key, r in results.items() if "min_s" in r}
    found = []
    if fastcache in t and "upstream" in t:
        speedup = t["upstream"] / t[fastcache]
        found.append({"target": ">= 3x faster than sentence-transformers' loss stage", "value": f"{speedup:.2f}x",
                      "met": speedup >= 3})
    if fastcache in t and "gemm" in t:
        ratio = t[fastcache] / t["gemm"]
        found.append({"target": "within 1.5x of one token-level GEMM", "value": f"{ratio:.2f}x", "met": ratio <= 1.5})
    memory = {key: r["memory"].get("peak_beyond_inputs_and_grads_mib") for key, r in results.items() if "memory" in r}
    if memory.get(fastcache) is not None and memory.get("upstream"):
        share = memory[fastcache] / memory["upstream"]
        found.append({"target": "peak memory beyond inputs and gradients <= 1/10 of sentence-transformers'",
                      "value": f"{share:.3f}", "met": share <= 0.1})
    return found


def markdown_table(results: dict[str, dict], repeats: int) -> str:
    t_gemm = results.get("gemm", {}).get("min_s")
    t_up = results.get("upstream", {}).get("min_s")
    lines = [f"| case | seconds (min of {repeats}) | median | ÷ token GEMM | upstream ÷ case | "
             "peak MiB beyond inputs and gradients |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for key, r in results.items():
        if "error" in r:
            lines.append(f"| {r['label']} | error: {r['error']} | | | | |")
            continue
        memory = r.get("memory", {}).get("peak_beyond_inputs_and_grads_mib")
        lines.append(f"| {r['label']} | {r['min_s']:.3f} | {r['median_s']:.3f} | "
                     f"{r['min_s'] / t_gemm:.2f} | {t_up / r['min_s'] if t_up else float('nan'):.2f} | "
                     f"{'–' if memory is None else f'{memory:.0f}'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_table_arguments(parser, quick=f"smoke shape {QUICK}, B in {QUICK_BATCHES}", default_out=DEFAULT_OUT)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help=f"query batch sizes (default {FULL_BATCHES}, --quick {QUICK_BATCHES})")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="a subset of cases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    batches = args.batches or (QUICK_BATCHES if args.quick else FULL_BATCHES)
    load = load_at_start()
    report = {"shape": shape, "dtype": "float32", "repeats": args.repeats, "warmup": args.warmup,
              "quick": args.quick, "threads": torch.get_num_threads(), "batches": {}}
    for B in batches:
        print(f"B={B}: timing {', '.join(args.cases)} ...", file=sys.stderr, flush=True)
        cases = [make_case(name, B=B, **shape) for name in args.cases]
        timed = time_cases(cases, warmup=args.warmup, repeats=args.repeats)
        results = {case.name: {**case.info, "min_s": timing.min_s, "median_s": timing.median_s,
                               "times_s": timing.times_s,
                               "loss": None if output.loss is None else float(output.loss)}
                   for case, (timing, output) in zip(cases, timed)}
        del cases, timed
        if not args.no_memory:
            print(f"B={B}: peak memory (one subprocess per case) ...", file=sys.stderr, flush=True)
            jobs = [(key, {"name": key, "B": B, **shape}, {"name": key, **WARMUP_SHAPE}) for key in results]
            for key, m in peak_memory_many(jobs, Path(__file__).resolve(), "make_case",
                                           parallel=args.parallel).items():
                results[key]["memory"] = m
        found = targets(results)
        gemm_flop = 2 * B * shape["Lq"] * B * shape["N"] * shape["Ld"] * shape["D"]
        print(f"\nB={B} queries × Lq={shape['Lq']}, {B * shape['N']} documents × Ld={shape['Ld']}, D={shape['D']}, "
              f"fp32, {torch.get_num_threads()} threads (token GEMM {gemm_flop / 1e9:.1f} GFLOP)\n")
        print(markdown_table(results, args.repeats))
        losses = [r["loss"] for r in results.values() if r.get("loss") is not None]
        if losses:
            print(f"losses of the {len(losses)} loss cases agree to {max(losses) - min(losses):.2e} "
                  f"(mean {sum(losses) / len(losses):.6f})")
        print_targets(found, args.quick)
        report["batches"][str(B)] = {"gemm_flop": gemm_flop, "cases": results, "targets": found}
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out_path is not None:
        save_json({"machine": run_machine(load), **report}, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
