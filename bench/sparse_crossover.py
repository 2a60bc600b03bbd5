"""Where the contrastive op's sparse products stop beating the dense slab on CPU: the density that auto's rule
(fastcache/ops/contrastive/sparse.py, SPARSE_MAX_DENSITY) should stay below.

    python bench/sparse_crossover.py            # B = N = 256, D = 30522 and 4096, densities 0.5% .. 8%; ~2 min
    python bench/sparse_crossover.py --quick    # B = N = 64, D = 2048 (smoke run)

Each case: fastcache.contrastive_loss_and_grad(q, d, similarity="dot", scale=1) with strategy "slab" (dense GEMMs)
and "sparse", fp32, on SPLADE-like embeddings (bench/splade_table.py's splade_embeddings: non-negative, the same
number of non-zero entries in every row, at random positions), timed interleaved (fastcache.app.harness.time_cases);
the table shows the minimum of the repeats and slab ÷ sparse (> 1: sparse is faster). The full run writes
bench/results/sparse_crossover_cpu.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import Case, RunOutput, load_at_start, time_cases  # noqa: E402
from splade_table import splade_embeddings  # noqa: E402

import fastcache  # noqa: E402
from fastcache.app.benchmark import run_machine, save_json  # noqa: E402
from fastcache.ops.contrastive.sparse import SPARSE_MAX_DENSITY  # noqa: E402

DENSITIES = (0.005, 0.01, 0.02, 0.04, 0.08)
FULL = {"rows": 256, "dims": (30522, 4096)}
QUICK = {"rows": 64, "dims": (2048,)}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "sparse_crossover_cpu.json"


def make_case(strategy: str, rows: int, dim: int, density: float, seed: int = 0) -> Case:
    generator = torch.Generator().manual_seed(seed)
    active = max(1, round(density * dim))
    q, d = (splade_embeddings(rows, dim, active, generator) for _ in range(2))

    def run():
        out = fastcache.contrastive_loss_and_grad(q, d, similarity="dot", scale=1.0, strategy=strategy)
        return RunOutput(out.loss, (out.grad_queries, out.grad_docs))

    return Case(f"{strategy} D={dim} density={density}", run, (q, d))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"smoke shape {QUICK} instead of {FULL}")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the table shows the minimum)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="JSON results (default: bench/results/"
                        "sparse_crossover_cpu.json for the full run, none for --quick)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    load = load_at_start()
    rows = []
    print(f"B = N = {shape['rows']}, fp32, {torch.get_num_threads()} threads; auto picks sparse at density <= "
          f"{SPARSE_MAX_DENSITY:g}\n")
    print("| D | density | slab s | sparse s | slab ÷ sparse |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for dim in shape["dims"]:
        for density in DENSITIES:
            cases = [make_case(s, shape["rows"], dim, density) for s in ("slab", "sparse")]
            (slab, out_slab), (sparse, out_sparse) = time_cases(cases, repeats=args.repeats)
            difference = abs(float(out_slab.loss) - float(out_sparse.loss))
            assert difference <= 1e-5 * max(1.0, abs(float(out_slab.loss))), f"losses differ by {difference}"
            rows.append({"dim": dim, "density": density, "slab_s": slab.min_s, "sparse_s": sparse.min_s,
                         "slab_over_sparse": slab.min_s / sparse.min_s})
            print(f"| {dim} | {density:g} | {slab.min_s:.4f} | {sparse.min_s:.4f} | {slab.min_s / sparse.min_s:.2f} |",
                  flush=True)
    out_path = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out_path is not None:
        save_json({"machine": run_machine(load), "shape": shape, "repeats": args.repeats,
                   "threads": torch.get_num_threads(), "sparse_max_density": SPARSE_MAX_DENSITY, "cases": rows},
                  out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
