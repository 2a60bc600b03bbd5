"""The MaxSim and SPLADE rows of the GPU benchmark (bench/gpu_multivector.py, gpu_bench.py --phase multivector, the
suite's multivector phase) without a GPU: the dry run on tiny CPU shapes (the Triton MaxSim case through the
interpreter) records every case with the same loss and its error against float64; the ratios and targets from
rows; the groups of the plan. The real run is bench/gpu_suite.sh on a GPU machine."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # puts bench/ on sys.path: gpu_multivector imports as gpu_bench does
    return module


@pytest.fixture(scope="module")
def multivector(gpu_bench):
    import gpu_multivector

    return gpu_multivector


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """gpu_bench.py --dry-run --phase multivector, both dtypes: (its report, its stdout, the output folder)."""
    out = tmp_path_factory.mktemp("multivector")
    command = [sys.executable, str(BENCH / "gpu_bench.py"), "--dry-run", "--phase", "multivector", "--dtypes",
               "bfloat16", "float32", "--out", str(out), "--case-seconds", "0.01"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "gpu_bench.json").read_text()), result.stdout, out


def test_dry_run_measures_every_case(dry_run, multivector):
    report, stdout, out = dry_run
    rows = report["rows"]
    assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
    B, shape = multivector.DRY_MAXSIM_BATCHES[0], multivector.DRY_MAXSIM_SHAPE
    maxsim = [r for r in rows if r["case"] in multivector.MAXSIM_CASES]
    assert sorted((r["case"], r["dtype"]) for r in maxsim) == sorted(
        (case, dtype) for case in multivector.MAXSIM_CASES for dtype in ("bfloat16", "float32"))
    for r in maxsim:  # the row's key is its group's: all B·N documents
        assert (r["B"], r["N"], r["D"], r["family"]) == (B, B * shape["N"], shape["D"], "maxsim")
        assert r["gemm_flop"] == 2 * B * shape["Lq"] * B * shape["N"] * shape["Ld"] * shape["D"] and r["min_s"] > 0
    splade = [r for r in rows if r["case"] in multivector.SPLADE_CASES]
    assert {r["case"] for r in splade} == set(multivector.SPLADE_CASES)
    assert all((r["B"], r["N"], r["D"], r["dtype"]) == (8, 8, 64, "float32") for r in splade)
    triton_available = importlib.util.find_spec("triton") is not None  # conftest: TRITON_INTERPRET=1 without CUDA
    assert all(r["backend"] == ("triton" if triton_available else "torch")
               for r in maxsim if r["case"] == "maxsim_fastcache_triton")
    fastcache_cached = next(r for r in splade if r["case"] == "splade_fastcache_cached")
    assert fastcache_cached["fastcache_backend"] in ("cpu", "torch", "cuda", "triton")
    # the MaxSim table and the SPLADE table, the CSV with the new columns
    assert "MaxSim (ColBERT) loss stage" in stdout and "SPLADE CachedSpladeLoss loss stage" in stdout
    assert sum(line.startswith(f"| {B} | ") and "maxsim_" in line for line in stdout.splitlines()) == len(maxsim)
    with (out / "gpu_bench.csv").open() as f:
        table = {(r["case"], r["dtype"]): r for r in csv.DictReader(f)}
    assert float(table[("maxsim_gemm", "float32")]["ratio_to_gemm"]) == 1
    assert table[("splade_st_cached", "float32")]["label"] == multivector.SPLADE_CASES["splade_st_cached"]


def test_dry_run_losses_agree_and_match_float64(dry_run):
    """Every MaxSim loss case computes the same loss (bf16: sentence-transformers multiplies in bf16); each against
    float64 on the same inputs; both cached SPLADE losses the same value."""
    report, _, _ = dry_run
    rows = {(r["case"], r["dtype"]): r for r in report["rows"]}
    for dtype, loss_error, grad_error in (("float32", 1e-6, 1e-5), ("bfloat16", 1e-6, 1e-2)):
        for case in ("maxsim_fastcache_triton", "maxsim_fastcache_torch"):
            r = rows[(case, dtype)]
            assert r["loss_rel_error"] <= loss_error and math.isfinite(r["loss"])
            assert r["grad_queries_rel_error"] <= grad_error and r["grad_docs_rel_error"] <= grad_error
        upstream = rows[("maxsim_upstream", dtype)]
        assert upstream["loss_rel_error"] <= (1e-6 if dtype == "float32" else 2e-2)
        assert rows[("maxsim_gemm", dtype)]["loss"] is None and "loss_rel_error" not in rows[("maxsim_gemm", dtype)]
    spread = report["loss_spread"]
    maxsim_fp32 = next(v for k, v in spread.items() if k.endswith("float32 maxsim"))
    assert maxsim_fp32 <= 1e-6
    assert next(v for k, v in spread.items() if k.endswith("splade")) <= 1e-6
    assert rows[("splade_gemms", "float32")]["loss"] is None


def test_ratios_and_targets_from_rows(gpu_bench):
    """ratio_to_gemm and upstream_over_case within one (B, dtype); the CPU tables' targets for the fastcache rows
    (MaxSim: the Triton case; SPLADE: the cached loss), named by shape."""
    key = {"B": 512, "N": 1024, "D": 128, "dtype": "bfloat16", "family": "maxsim", "status": "ok", "gemm_flop": 1e12}
    rows = [{**key, "case": "maxsim_gemm", "min_s": 0.010},
            {**key, "case": "maxsim_fastcache_triton", "min_s": 0.012, "peak_beyond_inputs_and_grads_mib": 100.0},
            {**key, "case": "maxsim_upstream", "min_s": 0.060, "peak_beyond_inputs_and_grads_mib": 2000.0},
            {**key, "dtype": "float32", "case": "maxsim_fastcache_triton", "min_s": 1.0},  # no GEMM, no upstream
            {"B": 512, "N": 512, "D": 30522, "dtype": "float32", "family": "splade", "status": "ok",
             "gemm_flop": 6 * 512 * 512 * 30522, "case": "splade_fastcache_cached", "min_s": 0.002},
            {"B": 512, "N": 512, "D": 30522, "dtype": "float32", "family": "splade", "status": "ok",
             "gemm_flop": 6 * 512 * 512 * 30522, "case": "splade_st_cached", "min_s": 0.005},
            {**key, "case": "maxsim_fastcache_torch", "status": "skipped", "reason": "time budget"}]
    gpu_bench.add_rates(rows)
    triton = rows[1]
    assert triton["ratio_to_gemm"] == pytest.approx(1.2) and triton["upstream_over_case"] == pytest.approx(5)
    assert triton["gemm_tflops"] == pytest.approx(1e12 / 0.012 / 1e12) and "tflops" not in triton  # not 6·B·N·D
    assert rows[3]["ratio_to_gemm"] is None and rows[3]["upstream_over_case"] is None
    assert rows[4]["upstream_over_case"] == pytest.approx(2.5) and rows[4]["ratio_to_gemm"] is None
    assert "ratio_to_gemm" not in rows[6]
    found = {t["target"]: t for t in gpu_bench.targets(rows)}
    prefix = "MaxSim B=512 bfloat16, backend triton: "
    assert found[prefix + ">= 3x faster than sentence-transformers' loss stage"]["met"]  # 5x
    assert found[prefix + "within 1.5x of one token-level GEMM"]["value"] == "1.20x"
    assert found[prefix + "peak memory beyond inputs and gradients <= 1/10 of sentence-transformers'"]["met"]
    splade = [t for t in found.values() if t["target"].startswith("SPLADE B=512: ")]
    assert len(splade) == 1 and not splade[0]["met"] and splade[0]["value"] == "2.50x"
    assert not any(t["target"].startswith("MaxSim B=512 float32") for t in found.values())


def test_plan_of_the_multivector_phase(gpu_bench, multivector):
    """MaxSim at B=512 (bf16, fp32) first, then SPLADE (fp32 only), then B=128; --dtypes and --cases filter it."""
    groups = gpu_bench._groups(False, list(multivector.MULTIVECTOR_CASES), ["bfloat16", "float32"], "multivector")
    assert [(g["multivector"], g["B"], g["dtype"]) for g in groups] == [
        ("maxsim", 512, "bfloat16"), ("maxsim", 512, "float32"), ("splade", 512, "float32"),
        ("maxsim", 128, "bfloat16"), ("maxsim", 128, "float32")]
    assert groups[0]["N"] == 512 * 2 and groups[0]["D"] == 128 and groups[2]["D"] == 30522
    assert all(g["size"] == "small" for g in groups)
    bf16 = gpu_bench._groups(False, list(multivector.MULTIVECTOR_CASES), ["bfloat16"], "multivector")
    assert [(g["multivector"], g["B"]) for g in bf16] == [("maxsim", 512), ("maxsim", 128)]
    only_splade = gpu_bench._groups(False, ["splade_st_cached"], ["bfloat16", "float32"], "multivector")
    assert [g["cases"] for g in only_splade] == [["splade_st_cached"]]
    assert gpu_bench._groups(False, list(gpu_bench.CASES), ["bfloat16", "float32"], "multivector") == []
