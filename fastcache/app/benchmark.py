"""`fastcache bench`: the loss stage of the in-batch contrastive loss (MultipleNegativesRankingLoss), fastcache
against sentence-transformers' cached loss, the dense plain-PyTorch reference and the bare GEMMs, across batch
sizes: time and peak memory, printed as a table, written as JSON and drawn as PNG plots (with matplotlib, the
optional extra ``fastcache[plots]``).

Every case (:func:`make_case`, shared with bench/contrastive_table.py) runs the loss forward and backward (the loss
and dL/d(embeddings)) on random fp32 embeddings: B queries, N = C·B candidates laid out column-major (the B
positives, then C-1 hard-negative columns), D dims, cosine similarity, scale 20. Time: the cases of one batch size
run interleaved (fastcache.app.harness.time_cases), the minimum of the repeats. Memory: one fresh subprocess per case
and batch size (fastcache.app.harness.peak_memory), the peak beyond the inputs and the gradients every implementation
must return.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from fastcache.app.harness import MIB, Case, RunOutput, peak_memory_many, time_cases

REPO = Path(__file__).resolve().parents[2]  # the checkout, when there is one (machine_info's commit)
WARMUP_SHAPE = {"B": 64, "N": 128, "D": 32}  # the memory child's warm-up run (loads libraries before the baseline)
DEFAULT_BATCH_SIZES = (256, 1024, 4096)
DEFAULT_CASES = ("gemms", "fastcache_cpu", "reference", "st_cached_mbs32", "st_cached_mbs256")

CASES = {
    "gemms": "bare GEMMs S=Q·Dᵀ, S·D, Sᵀ·Q (the limit)",
    "fastcache_cpu": "fastcache fused, backend=cpu, budget 256 MiB",
    "fastcache_cpu_64mib": "fastcache fused, backend=cpu, budget 64 MiB",
    "fastcache_torch": "fastcache fused, backend=torch, budget 256 MiB",
    "fastcache_cpu_filtered": "fastcache fused, backend=cpu, filter_eps=2^-12 (bf16's auto), trained-like embeddings",
    "reference": "dense reference (fastcache.reference) + backward",
    "st_cached_mbs32": "sentence-transformers CachedMNRL.calculate_loss, mini_batch_size=32",
    "st_cached_mbs256": "sentence-transformers CachedMNRL.calculate_loss, mini_batch_size=256",
    "st_mnrl": "sentence-transformers MNRL.compute_loss_from_embeddings + backward",
}
BUDGETS_MIB = {"fastcache_cpu": 256, "fastcache_cpu_64mib": 64, "fastcache_torch": 256, "fastcache_cpu_filtered": 256}
BACKENDS = {"fastcache_cpu": "cpu", "fastcache_cpu_64mib": "cpu", "fastcache_torch": "torch",
            "fastcache_cpu_filtered": "cpu"}
FILTER_EPS = {"fastcache_cpu_filtered": 2.0**-12}  # the gradient filter's cases: filter_eps
ST_MINI_BATCH = {"st_cached_mbs32": 32, "st_cached_mbs256": 256}

_TINY_MODEL = None


def tiny_sentence_transformer():
    """A tiny random BERT SentenceTransformer built offline (the losses' constructors need a model; the loss
    stage never calls it). Built once per process in a temporary folder, which is removed after loading."""
    global _TINY_MODEL
    if _TINY_MODEL is None:
        import transformers
        from sentence_transformers import SentenceTransformer
        from transformers import BertConfig, BertModel, BertTokenizerFast

        transformers.utils.logging.disable_progress_bar()
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters), "the", "a"]
        with tempfile.TemporaryDirectory() as folder:
            vocab_file = os.path.join(folder, "vocab.txt")
            Path(vocab_file).write_text("\n".join(vocab) + "\n")
            state = torch.random.get_rng_state()
            torch.manual_seed(0)
            config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64)
            BertModel(config).save_pretrained(folder)
            torch.random.set_rng_state(state)
            BertTokenizerFast(vocab=vocab_file).save_pretrained(folder)
            _TINY_MODEL = SentenceTransformer(folder, device="cpu")
    return _TINY_MODEL


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf requiring grad that shares ``t``'s memory (a copy would free the original before the memory
    baseline, leaving the high-water mark above the resident size)."""
    return t.detach().requires_grad_()


def _clear_grads(tensors):
    def reset():
        for t in tensors:
            t.grad = None

    return reset


def trained_like(B: int, N: int, D: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit embeddings with the similarities of a trained model (the gradient filter's cases; random embeddings
    leave no tile below any useful filter_eps): x = a·c + b·z with one shared direction c and unit random z
    (a² = 0.1: unrelated pairs at cosine ~0.1), the positive of query i sharing ρ of its z (cosine ~0.75), each
    hard negative of query i half (~0.55)."""
    a, b = 0.1**0.5, 0.9**0.5
    common = torch.nn.functional.normalize(torch.randn(D, generator=generator), dim=0)

    def unit(n):
        return torch.nn.functional.normalize(torch.randn(n, D, generator=generator), dim=1)

    z_q = unit(B)
    related = [0.72] + [0.5] * (N // B - 1)  # per candidate column: the share of its query's z
    z_d = torch.cat([r * z_q + (1 - r * r) ** 0.5 * unit(B) for r in related])
    return a * common + b * z_q, a * common + b * z_d


def make_case(name: str, B: int, N: int, D: int, seed: int = 0) -> Case:
    """Case ``name`` (a key of :data:`CASES`) at B queries, N = C·B candidates, D dims, fp32."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    if N % B:
        raise ValueError(f"N={N} must be a multiple of B={B} (positives, then hard-negative columns)")
    generator = torch.Generator().manual_seed(seed)
    if name in FILTER_EPS:
        q, d = trained_like(B, N, D, generator)
    else:
        q = torch.randn(B, D, generator=generator)
        d = torch.randn(N, D, generator=generator)
    info = {"label": CASES[name], "B": B, "N": N, "D": D}

    if name == "gemms":
        def run():
            s = q @ d.T
            return RunOutput(None, (s @ d, s.T @ q))

        return Case(name, run, (q, d), info=info)

    if name in BACKENDS:
        import fastcache

        budget = BUDGETS_MIB[name] * MIB
        info.update(backend=BACKENDS[name], memory_budget_mib=BUDGETS_MIB[name])
        options = {"filter_eps": FILTER_EPS[name]} if name in FILTER_EPS else {}
        if options:
            info.update(options, **filter_report(q, d, BACKENDS[name], budget, options["filter_eps"]))

        def run():
            out = fastcache.contrastive_loss_and_grad(q, d, backend=BACKENDS[name], memory_budget=budget, **options)
            return RunOutput(out.loss, (out.grad_queries, out.grad_docs))

        return Case(name, run, (q, d), info=info)

    if name == "reference":
        from fastcache.reference import contrastive_loss_reference

        lq, ld = _leaf(q), _leaf(d)
        del q, d

        def run():
            loss = contrastive_loss_reference(lq, ld)
            loss.backward()
            return RunOutput(loss.detach(), (lq.grad, ld.grad))

        return Case(name, run, (lq, ld), reset=_clear_grads((lq, ld)), info=info)

    columns = [q, *d.split(B)]  # sentence-transformers' input columns: anchors, positives, each hard negative
    del q, d
    model = tiny_sentence_transformer()
    if name == "st_mnrl":
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

        loss_fn = MultipleNegativesRankingLoss(model)
        leaves = [_leaf(c) for c in columns]
        del columns

        def run():
            loss = loss_fn.compute_loss_from_embeddings(leaves, None)
            loss.backward()
            return RunOutput(loss.detach(), tuple(t.grad for t in leaves))

        return Case(name, run, leaves, reset=_clear_grads(leaves), info=info)

    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    mbs = ST_MINI_BATCH[name]
    info.update(mini_batch_size=mbs)
    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mbs)
    # as forward_cached hands them over: per column, the mini-batch embeddings as leaves requiring grad
    reps = [[_leaf(mb) for mb in c.split(mbs)] for c in columns]
    del columns
    leaves = [t for column in reps for t in column]

    def run():
        loss = loss_fn.calculate_loss(reps, with_backward=True)
        return RunOutput(loss.detach(), tuple(t.grad for t in leaves))

    return Case(name, run, leaves, reset=_clear_grads(leaves), info=info)


def filter_report(q: torch.Tensor, d: torch.Tensor, backend: str, budget: int, eps: float) -> dict:
    """The gradient filter at ``eps`` on these embeddings: the share of backward tiles skipped, the loss and
    the gradients' largest difference from the exact call's over the exact gradient's largest magnitude."""
    import fastcache
    from fastcache.ops.contrastive.filtering import count_filtered_tiles

    exact = fastcache.contrastive_loss_and_grad(q, d, backend=backend, memory_budget=budget)
    with count_filtered_tiles() as tiles:
        filtered = fastcache.contrastive_loss_and_grad(q, d, backend=backend, memory_budget=budget, filter_eps=eps)
    report = {"filter_hit_rate": tiles.hit_rate, "filter_tiles": tiles.total,
              "filter_loss_difference": abs(float(filtered.loss - exact.loss))}
    for name in ("grad_queries", "grad_docs"):
        ours, truth = getattr(filtered, name), getattr(exact, name)
        report[f"filter_{name}_error"] = float((ours - truth).abs().max() / truth.abs().max())
    return report


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict:
    cpu_model = platform.processor() or None
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu_model)
    except OSError:
        pass
    versions = {}
    for package in ("fastcache", "sentence_transformers", "transformers"):
        try:
            versions[package] = __import__(package).__version__
        except Exception as error:  # noqa: BLE001 - report, do not fail the benchmark
            versions[package] = f"unavailable ({type(error).__name__})"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": cpu_model,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        **versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": _git("rev-parse", "HEAD"),
        "tracked_changes": bool(status) if status is not None else None,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def default_cases() -> list[str]:
    """:data:`DEFAULT_CASES`, with the pure-PyTorch backend standing in for the compiled one where it is not built."""
    from fastcache import _backend

    if _backend.EXTENSION is not None:
        return list(DEFAULT_CASES)
    return [("fastcache_torch" if name == "fastcache_cpu" else name) for name in DEFAULT_CASES]


def run_bench(batch_sizes=DEFAULT_BATCH_SIZES, *, candidates_per_query: int = 2, dim: int = 384,
              cases=None, repeats: int = 3, warmup: int = 1, memory: bool = True, parallel: int = 1,
              progress: bool = True) -> dict:
    """Time (and measure the peak memory of) each case at B in ``batch_sizes`` queries × C·B candidates, D=``dim``.
    Returns the report: machine details, settings, and per case and batch size ``min_s``, ``median_s``, ``loss``
    and ``peak_mib`` (peak beyond inputs and gradients; None without ``memory``) or ``error``."""
    from tqdm.auto import tqdm

    cases = list(cases or default_cases())
    results: dict[str, dict[str, dict]] = {name: {} for name in cases}
    load_at_start = os.getloadavg()
    for B in tqdm(batch_sizes, desc="timing", unit="batch size", disable=not progress):
        shape = {"B": B, "N": candidates_per_query * B, "D": dim}
        built, timings = [], []
        for name in cases:
            try:
                built.append(make_case(name, **shape))
            except Exception as error:  # noqa: BLE001 - one broken case must not hide the others
                results[name][str(B)] = {"error": f"{type(error).__name__}: {error}"}
        try:
            timings = time_cases(built, warmup=warmup, repeats=repeats)
        except Exception as error:  # noqa: BLE001
            for case in built:
                results[case.name][str(B)] = {"error": f"{type(error).__name__}: {error}"}
        for case, (timing, output) in zip(built, timings):
            results[case.name][str(B)] = {"min_s": timing.min_s, "median_s": timing.median_s,
                                          "loss": None if output.loss is None else float(output.loss),
                                          "peak_mib": None}
        del built, timings
    if memory:
        jobs = [(f"{name}|{B}", {"name": name, "B": B, "N": candidates_per_query * B, "D": dim},
                 {"name": name, **WARMUP_SHAPE})
                for B in batch_sizes for name in cases if "error" not in results[name][str(B)]]
        if progress:
            print(f"measuring peak memory: {len(jobs)} subprocesses ...", file=sys.stderr, flush=True)
        for key, measured in peak_memory_many(jobs, __file__, "make_case", parallel=parallel).items():
            name, B = key.split("|")
            results[name][B]["peak_mib"] = measured.get("peak_beyond_inputs_and_grads_mib")
            if "error" in measured:
                results[name][B]["memory_error"] = measured["error"]
    return {"machine": run_machine(load_at_start), "dtype": "float32", "candidates_per_query": candidates_per_query, "D": dim,
            "batch_sizes": list(batch_sizes), "repeats": repeats, "warmup": warmup,
            "labels": {name: CASES[name] for name in cases}, "cases": results}


def markdown_table(report: dict) -> str:
    """One row per case and batch size: seconds, × the bare GEMMs at that size, and peak memory."""
    cases = report["cases"]
    lines = [f"Loss stage forward + backward, N = {report['candidates_per_query']}·B candidates, D={report['D']}, "
             f"fp32, {report['machine']['torch_threads']} threads, min of {report['repeats']}",
             "", "| case | B | seconds | × bare GEMMs | peak beyond inputs+grads (MiB) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for B in map(str, report["batch_sizes"]):
        gemm = cases.get("gemms", {}).get(B, {}).get("min_s")
        for name, label in report["labels"].items():
            row = cases[name][B]
            if "error" in row:
                lines.append(f"| {label} | {B} | error: {row['error']} | | |")
                continue
            ratio = f"{row['min_s'] / gemm:.2f}" if gemm else "–"
            peak = "–" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
            lines.append(f"| {label} | {B} | {row['min_s']:.4f} | {ratio} | {peak} |")
    return "\n".join(lines)


PLOTS_MISSING = "fastcache bench draws its plots with matplotlib: pip install 'fastcache[plots]' (or pass --no-plots)"


class PlotsUnavailable(ImportError):
    """matplotlib (the optional extra ``fastcache[plots]``) is not installed; the message says what to do."""


def require_plots() -> None:
    """Raise :class:`PlotsUnavailable` when matplotlib cannot be imported (checked before a run, so that a long
    benchmark does not end without its plots)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise PlotsUnavailable(PLOTS_MISSING) from error


def plot(report: dict, out_dir: Path) -> list[Path]:
    """bench_time.png and (with memory) bench_memory.png in ``out_dir``: each case against batch size, log-log.
    Needs matplotlib (:func:`require_plots`)."""
    require_plots()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for key, ylabel, filename in (("min_s", "seconds (forward + backward)", "bench_time.png"),
                                  ("peak_mib", "peak memory beyond inputs + grads (MiB)", "bench_memory.png")):
        # a log axis: a peak too small to measure (<= 0 at tiny sizes) has no point
        series = {name: [(int(B), row[key]) for B, row in by_batch.items() if (row.get(key) or 0) > 0]
                  for name, by_batch in report["cases"].items()}
        series = {name: points for name, points in series.items() if points}
        if not series:
            continue
        figure, axes = plt.subplots(figsize=(8, 5))
        for name, points in series.items():
            axes.plot(*zip(*points), marker="o", label=report["labels"][name])
        axes.set_xscale("log", base=2)
        axes.set_yscale("log")
        axes.set_xlabel(f"batch size B (queries; N = {report['candidates_per_query']}·B candidates, D={report['D']})")
        axes.set_ylabel(ylabel)
        axes.grid(True, which="both", alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / filename
        figure.savefig(path, dpi=120)
        plt.close(figure)
        written.append(path)
    return written


def run_machine(load_at_start: tuple[float, float, float]) -> dict:
    """:func:`machine_info` plus the load averages at the start and the end of the run (timings taken while other
    processes use the CPU are noisy: the report says so)."""
    return {**machine_info(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}


def save_json(report: dict, path: Path) -> None:
    """Write ``report`` as indented JSON to ``path`` (its folder created) and say so."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {path}")


def write_report(report: dict, out_dir: Path, *, plots: bool = True) -> list[Path]:
    """bench.json and (``plots``) the plots in ``out_dir`` (created)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    return [path, *(plot(report, out_dir) if plots else [])]
