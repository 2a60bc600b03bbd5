"""CPU benchmark of SPLADE's contrastive loss stage: fastcache's fused op and drop-ins against sentence-transformers'
SparseMultipleNegativesRankingLoss and CachedSpladeLoss, and the bare GEMMs the maths needs.

    python bench/splade_table.py              # B=512, D=30522 (BERT's vocabulary), mbs 32; a few minutes on 2 cores
    python bench/splade_table.py --quick      # B=64, D=2048 (smoke run; JSON only with --out)

Every case is one forward and backward of the loss stage from embeddings: the loss and its gradients w.r.t. the
embeddings of B anchors and B positives (N = B candidates), dot similarity, scale 1 (upstream's defaults), fp32,
on SPLADE-like embeddings: non-negative, each query row with ``query_active`` non-zero entries, each document
row with ``doc_active`` (log(1 + relu) of random logits at random vocabulary positions), the rest exactly zero.

    gemms                  S = Q·Dᵀ, S·D, Sᵀ·Q: the three dense products any dense implementation needs
    sparse_gemms           the same three products with CSR operands (torch.sparse): what a sparse-aware kernel
                           could reach (conversion of the operands included)
    fastcache_op           fastcache.contrastive_loss_and_grad(q, d, similarity="dot", scale=1): auto picks the
                           sparse products here (strategy "sparse": SPLADE's densities are below its threshold)
    fastcache_op_slab      the same with strategy "slab" (dense GEMMs and the fused epilogue)
    fastcache_mnrl         fastcache SparseMultipleNegativesRankingLoss.compute_loss_from_embeddings + backward
    st_mnrl                sentence-transformers' SparseMultipleNegativesRankingLoss, the same
    fastcache_cached       fastcache CachedSpladeLoss(fastcache inner).calculate_loss(reps, with_backward=True)
    st_cached              sentence-transformers' CachedSpladeLoss(its inner loss), the same

The cached cases get the embeddings as the gradient cache hands them over (per column, mini-batches of
``mini_batch_size`` rows that require grad; upstream's default 32) and include the FLOPS regularisers (weights
3e-5 and 5e-5, as upstream's example). The cases run interleaved (fastcache.app.harness.time_cases); the table
shows the minimum of the repeats and ratios within the run; peak memory beyond the inputs and gradients is
measured in subprocesses (fastcache.app.harness.peak_memory). The full run writes bench/results/splade_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the losses' model is built locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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

from fastcache.app.benchmark import run_machine, save_json, tiny_sentence_transformer  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
FULL = {"B": 512, "D": 30522, "query_active": 64, "doc_active": 256, "mini_batch_size": 32}
QUICK = {"B": 64, "D": 2048, "query_active": 16, "doc_active": 64, "mini_batch_size": 32}
DEFAULT_OUT = BENCH_DIR / "results" / "splade_cpu.json"
CASES = {
    "gemms": "bare GEMMs S=QDᵀ, SD, SᵀQ (dense)",
    "sparse_gemms": "the same with CSR operands (torch.sparse, conversion included)",
    "fastcache_op": "fastcache.contrastive_loss_and_grad (dot, scale 1; auto)",
    "fastcache_op_slab": "the same, strategy slab (dense GEMMs)",
    "fastcache_mnrl": "fastcache SparseMultipleNegativesRankingLoss",
    "st_mnrl": "sentence-transformers SparseMultipleNegativesRankingLoss",
    "fastcache_cached": "fastcache CachedSpladeLoss(fastcache inner)",
    "st_cached": "sentence-transformers CachedSpladeLoss",
}
REGULARIZERS = {"document_regularizer_weight": 3e-5, "query_regularizer_weight": 5e-5}


def splade_embeddings(rows: int, dim: int, active: int, generator: torch.Generator) -> torch.Tensor:
    """[rows, dim] non-negative, ``active`` non-zero entries a row (random positions, log1p of |N(0, 2)|)."""
    out = torch.zeros(rows, dim)
    positions = torch.rand(rows, dim, generator=generator).argsort(dim=1)[:, :active]
    out.scatter_(1, positions, torch.log1p(2 * torch.randn(rows, active, generator=generator).abs()))
    return out


def make_case(name: str, B: int, D: int, query_active: int, doc_active: int, mini_batch_size: int,
              seed: int = 0, device: str = "cpu") -> Case:
    """Case ``name`` of :data:`CASES` on one batch of SPLADE-like embeddings (module docstring), on ``device``
    (bench/gpu_multivector.py runs the GEMMs and cached cases on CUDA)."""
    from sentence_transformers.sparse_encoder import losses as st_sparse

    import fastcache
    from fastcache.sparse_encoder import losses as fc_sparse

    generator = torch.Generator().manual_seed(seed)
    columns = [splade_embeddings(B, D, query_active, generator).to(device),
               splade_embeddings(B, D, doc_active, generator).to(device)]
    info = {"label": CASES[name], "B": B, "N": B, "D": D, "query_active": query_active, "doc_active": doc_active,
            "mini_batch_size": mini_batch_size if name.endswith("cached") else None}
    if name in ("gemms", "sparse_gemms"):
        q, d = columns
        grad_s = torch.randn(B, B, generator=generator).to(device)

        def run():
            if name == "gemms":
                s = q @ d.T
                return RunOutput(None, (s, grad_s @ d, grad_s.T @ q))
            q_csr, q_t_csr, d_t_csr = q.to_sparse_csr(), q.T.to_sparse_csr(), d.T.to_sparse_csr()
            s = torch.mm(q_csr, d.T)
            return RunOutput(None, (s, torch.mm(d_t_csr, grad_s.T).T, torch.mm(q_t_csr, grad_s).T))

        return Case(name, run, columns, info=info)
    if name.startswith("fastcache_op"):
        strategy = "slab" if name == "fastcache_op_slab" else "auto"

        def run():
            result = fastcache.contrastive_loss_and_grad(*columns, similarity="dot", scale=1.0, strategy=strategy)
            return RunOutput(result.loss, (result.grad_queries, result.grad_docs))

        return Case(name, run, columns, info=info)
    model = tiny_sentence_transformer().to(device)  # the constructors want a model; the loss stage never calls it
    impl = fc_sparse if name.startswith("fastcache") else st_sparse
    inner = impl.SparseMultipleNegativesRankingLoss(model)
    if name.endswith("cached"):
        loss = impl.CachedSpladeLoss(model, inner, mini_batch_size=mini_batch_size, **REGULARIZERS)
        reps = [[mb.detach().requires_grad_() for mb in column.split(mini_batch_size)] for column in columns]
        leaves = [t for column in reps for t in column]

        def run():
            return RunOutput(loss.calculate_loss(reps, with_backward=True).detach(), tuple(t.grad for t in leaves))
    else:
        leaves = [column.detach().requires_grad_() for column in columns]

        def run():
            value = inner.compute_loss_from_embeddings(leaves, None)
            value.backward()
            return RunOutput(value.detach(), tuple(t.grad for t in leaves))

    def reset():
        for t in leaves:
            t.grad = None

    return Case(name, run, leaves, reset=reset, info=info)


def targets(t: dict[str, float]) -> list[dict]:
    found = []
    if "fastcache_cached" in t and "st_cached" in t:
        speedup = t["st_cached"] / t["fastcache_cached"]
        found.append({"target": ">= 3x faster than sentence-transformers' CachedSpladeLoss loss stage at its default "
                                "mini_batch_size", "value": f"{speedup:.2f}x", "met": speedup >= 3})
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_table_arguments(parser, quick=f"smoke shape {QUICK} instead of {FULL}", default_out=DEFAULT_OUT)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="a subset of cases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shape = QUICK if args.quick else FULL
    load = load_at_start()
    cases = [make_case(name, **shape) for name in args.cases]
    timed = time_cases(cases, warmup=args.warmup, repeats=args.repeats)
    results = {case.name: {**case.info, "min_s": timing.min_s, "median_s": timing.median_s,
                           "times_s": timing.times_s,
                           "loss": None if output.loss is None else float(output.loss)}
               for case, (timing, output) in zip(cases, timed)}
    del cases, timed
    if not args.no_memory:
        print(f"measuring peak memory: {len(results)} subprocesses ...", file=sys.stderr, flush=True)
        quick = {**QUICK, "B": 8, "D": 64}
        jobs = [(name, {"name": name, **shape}, {"name": name, **quick}) for name in results]
        for name, measured in peak_memory_many(jobs, __file__, "make_case", parallel=args.parallel).items():
            results[name]["peak_mib"] = measured.get("peak_beyond_inputs_and_grads_mib")
            if "error" in measured:
                results[name]["memory_error"] = measured["error"]
    t = {k: r["min_s"] for k, r in results.items()}
    print(f"B={shape['B']} anchors, N={shape['B']} candidates, D={shape['D']}, {shape['query_active']} / "
          f"{shape['doc_active']} active dims per query / document, mini_batch_size={shape['mini_batch_size']}, "
          f"fp32, {torch.get_num_threads()} threads\n")
    print(f"| case | seconds (min of {args.repeats}) | median | ÷ dense GEMMs | ÷ fastcache op | "
          "peak MiB beyond inputs + grads |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for key, r in results.items():
        ratios = [f"{r['min_s'] / t[base]:.2f}" if base in t else "–" for base in ("gemms", "fastcache_op")]
        peak = r.get("peak_mib")
        print(f"| {CASES[key]} | {r['min_s']:.3f} | {r['median_s']:.3f} | {ratios[0]} | {ratios[1]} | "
              f"{'–' if peak is None else f'{peak:.0f}'} |")
    losses = {k: r["loss"] for k, r in results.items() if k.endswith("mnrl") or k.startswith("fastcache_op")}
    if len(losses) > 1:
        print(f"\ncontrastive losses agree to {max(losses.values()) - min(losses.values()):.2e}")
    found = targets(t)
    print_targets(found, args.quick)
    full = not args.quick and set(args.cases) == set(CASES)
    out_path = args.out if args.out is not None else (DEFAULT_OUT if full else None)
    if out_path is not None:
        save_json({"machine": run_machine(load), "shape": shape, "dtype": "float32", "repeats": args.repeats,
                   "warmup": args.warmup, "quick": args.quick, "cases": results, "targets": found}, out_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
