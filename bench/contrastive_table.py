"""CPU benchmark table of the contrastive loss stage: fastcache against the bare GEMMs and sentence-transformers.

    python bench/contrastive_table.py            # B=4096, N=8192, D=384 (a few minutes on 2 cores)
    python bench/contrastive_table.py --quick    # B=256, N=512, D=64 (smoke run, well under a minute)

Every case runs the loss stage forward and backward (the loss and dL/d(embeddings)) on random fp32 embeddings:
B queries, N = C·B candidates laid out column-major (the B positives, then C-1 hard-negative columns), D dims,
cosine similarity, scale 20. It times every case in this process (warm-up, then the minimum of the repeats),
measures each case's peak memory in a fresh subprocess (bench/harness.py), prints a markdown table and whether
the targets are met, and writes a JSON file with the machine's details (the full run writes
bench/results/contrastive_cpu.json unless --out says otherwise; --quick writes only with --out).

This module also defines the cases (:data:`CASES`, :func:`make_case`) for bench/bench_contrastive.py.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no Hub: the sentence-transformers model is built locally
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import MIB, Case, RunOutput, peak_memory_many, time_case  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
FULL = {"B": 4096, "N": 8192, "D": 384}
QUICK = {"B": 256, "N": 512, "D": 64}
WARMUP_SHAPE = {"B": 64, "N": 128, "D": 32}  # the memory child's warm-up run (loads libraries before the baseline)
DEFAULT_OUT = BENCH_DIR / "results" / "contrastive_cpu.json"

CASES = {
    "gemms": "bare GEMMs S=Q·Dᵀ, S·D, Sᵀ·Q (the limit)",
    "fastcache_cpu": "fastcache fused, backend=cpu, budget 256 MiB",
    "fastcache_cpu_64mib": "fastcache fused, backend=cpu, budget 64 MiB",
    "fastcache_torch": "fastcache fused, backend=torch, budget 256 MiB",
    "reference": "dense reference (fastcache.reference) + backward",
    "st_cached_mbs32": "sentence-transformers CachedMNRL.calculate_loss, mini_batch_size=32",
    "st_cached_mbs256": "sentence-transformers CachedMNRL.calculate_loss, mini_batch_size=256",
    "st_mnrl": "sentence-transformers MNRL.compute_loss_from_embeddings + backward",
}
BUDGETS_MIB = {"fastcache_cpu": 256, "fastcache_cpu_64mib": 64, "fastcache_torch": 256}
BACKENDS = {"fastcache_cpu": "cpu", "fastcache_cpu_64mib": "cpu", "fastcache_torch": "torch"}
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


def make_case(name: str, B: int, N: int, D: int, seed: int = 0) -> Case:
    """Case ``name`` (a key of :data:`CASES`) at B queries, N = C·B candidates, D dims, fp32."""
    if name not in CASES:
        raise ValueError(f"unknown case {name!r}; cases: {', '.join(CASES)}")
    if N % B:
        raise ValueError(f"N={N} must be a multiple of B={B} (positives, then hard-negative columns)")
    generator = torch.Generator().manual_seed(seed)
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

        def run():
            out = fastcache.contrastive_loss_and_grad(q, d, backend=BACKENDS[name], memory_budget=budget)
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


# ---------------------------------------------------------------------------------------------------- the table


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
    parser.add_argument("--quick", action="store_true", help=f"smoke shape {QUICK} instead of {FULL}")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default: {DEFAULT_OUT.relative_to(REPO)} for the full run, none for "
                             "--quick)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per case (the table shows the minimum)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), help="a subset of cases")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--parallel", type=int, default=2,
                        help="memory subprocesses at once (after all timing is done; default 2)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    load_at_start = os.getloadavg()
    if load_at_start[0] > 0.5:
        print(f"warning: 1-minute load average {load_at_start[0]:.2f} before the run: other processes use the CPU, "
              "so the timings will be noisy", file=sys.stderr)
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
    losses = {k: r["loss"] for k, r in results.items() if r.get("loss") is not None}
    if losses:
        spread = max(losses.values()) - min(losses.values())
        mean = sum(losses.values()) / len(losses)
        print(f"losses of the {len(losses)} loss cases agree to {spread:.2e} (mean {mean:.6f})")
    found = targets(results)
    if found:
        print("\nTargets" + (" (quick shape: indicative only)" if args.quick else "") + ":")
        for item in found:
            print(f"- [{'met' if item['met'] else 'NOT MET'}] {item['target']}: {item['value']}")

    if out_path is not None:
        machine = {**machine_info(), "load_average_at_start": load_at_start, "load_average_at_end": os.getloadavg()}
        report = {"machine": machine, "shape": shape, "dtype": "float32", "repeats": args.repeats,
                  "warmup": args.warmup, "quick": args.quick, "gemm_flop": flops, "cases": results,
                  "targets": found}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
