"""The multi-vector (MaxSim) and sparse (SPLADE) cases of the GPU benchmark (bench/gpu_bench.py runs them in its
multivector groups, the suite's multivector phase): the CPU tables' loss stages (bench/maxsim_table.py,
bench/splade_table.py) on CUDA, forward + backward.

MaxSim (ColBERT, issue 20): maxsim_table's shape, B = 128 and 512 queries × Lq = 32 tokens, N = 2 documents per
query (the positive and one hard negative) × Ld = 128 tokens, D = 128, no masks, scale 1; bfloat16 and float32
tokens (seeded normal values rounded to the dtype). Cases (maxsim_table.make_case on the GPU):

  maxsim_fastcache_triton  ``fastcache.maxsim_contrastive_loss(q, d, backend="triton")`` + backward
  maxsim_fastcache_torch   the same, backend="torch" (the pure-PyTorch fallback)
  maxsim_upstream          sentence-transformers' MultiVectorMultipleNegativesRankingLoss loss stage:
                           ``colbert_scores`` + cross-entropy + backward
  maxsim_gemm              the token-level GEMM, all B·Lq query tokens × all B·N·Ld document tokens, in the inputs'
                           dtype, into one reused output of at most GEMM_TILE_BYTES (the products any MaxSim needs:
                           the limit; 2·B·Lq·B·N·Ld·D FLOPs: the rows' ``gemm_flop``)

Each loss case runs once more, untimed, against fastcache's torch backend in float64 on the same (rounded) inputs:
the row's ``loss_rel_error`` and ``grad_queries_rel_error`` / ``grad_docs_rel_error`` (‖g − g64‖ / ‖g64‖, Frobenius
norms: a few near-tied token maxima may route a gradient to another token, so no elementwise check here; the
elementwise ones are in tests/maxsim). The first run of the Triton MaxSim kernels on a GPU is this one.

SPLADE (issue 20): splade_table's full shape, B = 512 anchors and 512 positives, D = 30522 (BERT's vocabulary),
SPLADE-like float32 embeddings (64 / 256 active dimensions per query / document), mini_batch_size 32, the FLOPS
regularisers at splade_table's weights. Cases:

  splade_gemms             the dense GEMMs S = Q·Dᵀ, S·D, Sᵀ·Q (the limit)
  splade_fastcache_cached  fastcache's CachedSpladeLoss (fastcache's SparseMultipleNegativesRankingLoss inside)
                           ``calculate_loss(reps, with_backward=True)`` on the mini-batches; the row's
                           ``fastcache_backend`` says which backend fastcache's op chose (auto)
  splade_st_cached         sentence-transformers' CachedSpladeLoss (its inner loss), the same

A dry run (no GPU) runs the same cases at tiny shapes on the CPU (the Triton case through the interpreter when
TRITON_INTERPRET=1, else on the torch backend, as its row's ``backend`` says).
"""

from __future__ import annotations

MAXSIM_CASES = {f"maxsim_{name}": f"MaxSim: {label}" for name, label in (
    ("fastcache_triton", "fastcache maxsim_contrastive_loss, backend=triton"),
    ("fastcache_torch", "fastcache maxsim_contrastive_loss, backend=torch"),
    ("upstream", "sentence-transformers colbert_scores + cross-entropy"),
    ("gemm", "one token-level GEMM (the limit)"))}
SPLADE_CASES = {"splade_gemms": "SPLADE: bare dense GEMMs S=QDᵀ, SD, SᵀQ (the limit)",
                "splade_fastcache_cached": "SPLADE: fastcache CachedSpladeLoss(fastcache inner)",
                "splade_st_cached": "SPLADE: sentence-transformers CachedSpladeLoss"}
MULTIVECTOR_CASES = {**MAXSIM_CASES, **SPLADE_CASES}
# (B, dtype), most important first; B as in maxsim_table.FULL_BATCHES
MAXSIM_GRID = [(512, "bfloat16"), (512, "float32"), (128, "bfloat16"), (128, "float32")]
DRY_MAXSIM_BATCHES = (4,)
DRY_MAXSIM_SHAPE = {"Lq": 4, "N": 2, "Ld": 8, "D": 16}
DRY_SPLADE_SHAPE = {"B": 8, "D": 64, "query_active": 4, "doc_active": 8, "mini_batch_size": 4}
GEMM_TILE_BYTES = 2**30  # the GPU's token GEMM output chunk (8 products at B = 512, fp32: launches do not count)


def maxsim_shape(dry_run: bool) -> dict:
    from maxsim_table import FULL

    return DRY_MAXSIM_SHAPE if dry_run else FULL


def splade_shape(dry_run: bool) -> dict:
    from splade_table import FULL

    return DRY_SPLADE_SHAPE if dry_run else FULL


def multivector_groups(dry_run: bool, cases: list[str], dtypes: list[str]) -> list[dict]:
    """The benchmark's groups of these cases (one subprocess each), most important first: MaxSim at B = 512 (bf16,
    fp32), SPLADE (fp32), MaxSim at B = 128."""
    maxsim = [c for c in cases if c in MAXSIM_CASES]
    splade = [c for c in cases if c in SPLADE_CASES]
    grid = [(B, dtype) for B in DRY_MAXSIM_BATCHES for dtype in ("bfloat16", "float32")] if dry_run else MAXSIM_GRID
    shape = maxsim_shape(dry_run)
    groups = [{"multivector": "maxsim", "B": B, "N": B * shape["N"], "D": shape["D"], "dtype": dtype,
               "cases": maxsim, "size": "small"} for B, dtype in grid if dtype in dtypes and maxsim]
    if splade and "float32" in dtypes:
        s = splade_shape(dry_run)
        position = min(2, len(groups))
        groups.insert(position, {"multivector": "splade", "B": s["B"], "N": s["B"], "D": s["D"], "dtype": "float32",
                                 "cases": splade, "size": "small"})
    return groups


def make_multivector_case(name: str, B: int, dtype_name: str, device: str, dry_run: bool):
    """(run, reset, info) of MULTIVECTOR_CASES case ``name``: ``run()`` does the forward and backward and returns
    (loss, grads) (loss None for the GEMM cases)."""
    if name in MAXSIM_CASES:
        return _maxsim_case(name, B, dtype_name, device, dry_run)
    return _splade_case(name, device, dry_run)


def _maxsim_case(name: str, B: int, dtype_name: str, device: str, dry_run: bool):
    import torch
    from maxsim_table import make_case

    from fastcache.ops.maxsim.primitives import available

    shape = maxsim_shape(dry_run)
    table_name = name.removeprefix("maxsim_")
    if table_name == "fastcache_triton" and available(torch.device(device))["triton"] is not None:
        table_name = "fastcache_torch"  # a dry run without the Triton interpreter
    case = make_case(table_name, B=B, **shape, device=device, dtype=dtype_name, gemm_tile_bytes=GEMM_TILE_BYTES)
    # the row's B, N (all B·N documents), D and dtype are its group's
    info = {"family": "maxsim", "Lq": shape["Lq"], "docs_per_query": shape["N"], "Ld": shape["Ld"],
            "gemm_flop": 2 * B * shape["Lq"] * B * shape["N"] * shape["Ld"] * shape["D"]}
    if table_name.startswith("fastcache_"):
        info["backend"] = table_name.removeprefix("fastcache_")
    if case.reset is not None:  # a loss case
        info.update(_errors_against_float64(case))

    return _loss_and_grads(case), case.reset, info


def _loss_and_grads(case):
    """The table case's run as this module's: () -> (loss, grads), loss None for the GEMM cases."""
    def run():
        out = case.run()
        return out.loss, out.grads

    return run


def _errors_against_float64(case) -> dict:
    """One untimed run of a MaxSim loss case against fastcache's torch backend in float64 on the same inputs: the
    relative error of the loss and the relative Frobenius error of each gradient."""
    from fastcache import maxsim_contrastive_loss_and_grad

    queries, docs = case.inputs
    truth = maxsim_contrastive_loss_and_grad(queries.detach().double(), docs.detach().double(), backend="torch")
    out = case.run()
    case.reset()
    errors = {"loss_rel_error": abs(float(out.loss) - float(truth.loss)) / abs(float(truth.loss))}
    for key, grad, exact in zip(("grad_queries", "grad_docs"), out.grads, truth[1:]):
        errors[f"{key}_rel_error"] = float((grad.double() - exact).norm() / exact.norm())
    return errors


def _splade_case(name: str, device: str, dry_run: bool):
    """splade_table's gemms and cached cases (its embeddings, regularisers and mini-batches) on ``device``."""
    import torch
    from splade_table import make_case

    import fastcache

    s = splade_shape(dry_run)
    case = make_case(name.removeprefix("splade_"), **s, device=device)
    info = {"family": "splade", "query_active": s["query_active"], "doc_active": s["doc_active"],
            "gemm_flop": 6 * s["B"] * s["B"] * s["D"]}
    if name != "splade_gemms":
        info["mini_batch_size"] = s["mini_batch_size"]
    if name == "splade_fastcache_cached":
        info["fastcache_backend"] = fastcache.info()["contrastive_loss"][torch.device(device).type]["runs"]

    return _loss_and_grads(case), case.reset, info


# ---------------------------------------------------------------------------------------------------------------
# the parent's report: ratios, targets, table
# ---------------------------------------------------------------------------------------------------------------

def _by_shape(rows: list[dict], family: str) -> dict[tuple, dict[str, dict]]:
    """The finished rows of ``family``, per (B, dtype): case -> row."""
    found: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("family") == family and r.get("status") == "ok":
            found.setdefault((r["B"], r["dtype"]), {})[r["case"]] = r
    return found


LIMITS = {"maxsim": ("maxsim_gemm", "maxsim_upstream"), "splade": ("splade_gemms", "splade_st_cached")}


def add_multivector_ratios(rows: list[dict]) -> None:
    """In place, per row of these cases: ``ratio_to_gemm`` (its time ÷ the same shape's GEMM case: the limit),
    ``upstream_over_case`` (sentence-transformers' time ÷ its time) and ``gemm_tflops`` (the limit's FLOPs ÷ its
    time)."""
    for family, (gemm, upstream) in LIMITS.items():
        for cases in _by_shape(rows, family).values():
            for r in cases.values():
                r["gemm_tflops"] = r["gemm_flop"] / r["min_s"] / 1e12
                r["ratio_to_gemm"] = r["min_s"] / cases[gemm]["min_s"] if gemm in cases else None
                r["upstream_over_case"] = cases[upstream]["min_s"] / r["min_s"] if upstream in cases else None


def multivector_targets(rows: list[dict]) -> list[dict]:
    """The CPU tables' targets (maxsim_table.targets, splade_table.targets) for the fastcache rows on the GPU: MaxSim
    (triton) per (B, dtype), SPLADE's cached loss."""
    import maxsim_table
    import splade_table

    found = []
    for (B, dtype), cases in _by_shape(rows, "maxsim").items():
        results = {name.removeprefix("maxsim_"): {"min_s": r["min_s"], "memory": {
            "peak_beyond_inputs_and_grads_mib": r.get("peak_beyond_inputs_and_grads_mib")}}
            for name, r in cases.items()}
        found += [{**t, "target": f"MaxSim B={B} {dtype}, backend triton: {t['target']}"}
                  for t in maxsim_table.targets(results, fastcache="fastcache_triton")]
    for (B, dtype), cases in _by_shape(rows, "splade").items():
        times = {name.removeprefix("splade_"): r["min_s"] for name, r in cases.items()}
        found += [{**t, "target": f"SPLADE B={B}: {t['target']}"} for t in splade_table.targets(times)]
    return found
