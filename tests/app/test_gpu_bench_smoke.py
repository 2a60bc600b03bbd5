"""bench/gpu_bench.py without a GPU: its --dry-run on tiny CPU shapes, its budget and timeout bookkeeping, its
targets; and bench/gpu_suite.sh's bash syntax. The real run is bench/gpu_suite.sh on a GPU machine."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_suite_scripts_are_valid_bash():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    for script in ("gpu_suite.sh", "fetch_peer_wheels.sh"):
        result = subprocess.run([bash, "-n", str(BENCH / script)], capture_output=True, text=True)
        assert result.returncode == 0, f"{script}: {result.stderr}"


def test_dry_run_records_every_case(gpu_bench, tmp_path):
    """One dry-run group (bf16) and the ceiling: every case has a timing or a reason; the cases that ran compute the
    same loss; the JSON and the CSV agree."""
    command = [sys.executable, str(BENCH / "gpu_bench.py"), "--dry-run", "--dtypes", "bfloat16", "--out",
               str(tmp_path), "--case-seconds", "0.01"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = report["rows"]
    B, N, D, dtype = gpu_bench.DRY_GRID[1]
    import gpu_multivector  # bf16 only: the MaxSim cases (SPLADE runs fp32; tests/app/test_gpu_multivector.py)

    assert {r["case"] for r in rows} == {"mm_ceiling", *gpu_bench.CASES, *gpu_bench.MATRYOSHKA_CASES,
                                         *gpu_bench.EPILOGUE_CASES, *gpu_bench.RANKING_CASES,
                                         *gpu_multivector.MAXSIM_CASES}
    assert report["mm_tflops"] > 0 and report["dry_run"] and report["commit"]
    epilogues = {r["case"]: r for r in rows if r["case"] in gpu_bench.EPILOGUE_CASES}
    for name in ("epilogue_copy", "epilogue_torch"):  # the CUDA and Triton ones need a GPU: an error with its reason
        assert epilogues[name]["status"] == "ok" and epilogues[name]["gbps"] > 0, epilogues[name]
    assert all(r["status"] == "ok" or r["reason"] for r in epilogues.values())
    assert epilogues["epilogue_copy"]["ratio_to_copy"] == 1
    for r in rows:
        if r["case"] in ("mm_ceiling", *epilogues, *gpu_bench.RANKING_CASES, *gpu_bench.MULTIVECTOR_CASES):
            continue
        assert (r["B"], r["N"], r["D"], r["dtype"]) == (B, N, D, dtype)
        if r["status"] == "ok":
            assert r["min_s"] > 0 and r["repeats"] >= 1 and r["tflops"] > 0 and math.isfinite(r["loss"])
        else:  # a peer that is not installed (or cannot run on a CPU) is recorded with its reason
            assert r["case"] in gpu_bench.PEERS and r["status"] == "error" and r["reason"], r
    ran = {r["case"] for r in rows if r["status"] == "ok"}
    assert {*gpu_bench.FASTCACHE, *gpu_bench.MATRYOSHKA, "reference", "st_cached_mbs32"} <= ran
    for matryoshka in (False, True):  # the Matryoshka rows (5 dims) compute their own loss, the same in each
        losses = [r["loss"] for r in rows if r["status"] == "ok" and r["loss"] is not None
                  and bool(r.get("dims")) == matryoshka and not r.get("ranking_loss") and not r.get("family")]
        assert max(losses) - min(losses) <= 2e-2 * abs(losses[0])  # bf16 reference vs fp32-accumulating cases
    assert all(r["dims"] == [32, 21, 10, 5, 2] for r in rows if r["case"] in gpu_bench.MATRYOSHKA)
    ranking = [r for r in rows if r["case"] in gpu_bench.RANKING_CASES]  # every ranking case ran, per loss one value
    assert all(r["status"] == "ok" and r["min_s"] > 0 and (r["B"], r["N"]) == gpu_bench.DRY_RANKING for r in ranking)
    for loss in {r["ranking_loss"] for r in ranking}:
        values = [r["loss"] for r in ranking if r["ranking_loss"] == loss]
        assert len(values) == 3 and max(values) - min(values) <= 1e-5 * abs(values[0]), (loss, values)
    assert "sentence-transformers time ÷ this" in result.stdout
    assert all(r["status"] == "ok" for r in rows if r["case"] in gpu_multivector.MAXSIM_CASES)
    assert len(report["loss_spread"]) == 2 + 3 + 1  # contrastive, Matryoshka, the three ranking losses, MaxSim
    with (tmp_path / "gpu_bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == gpu_bench.CSV_FIELDS and len(table) == len(rows)
    assert not list(tmp_path.glob("group_*.jsonl"))
    on_disk = [json.loads(line) for line in (tmp_path / gpu_bench.ROWS_FILE).read_text().splitlines()]
    assert {r["case"] for r in on_disk if r.get("status") == "ok"} == {r["case"] for r in rows if r["status"] == "ok"}
    # bench/roofline.py's projection next to each modelled row, at this run's mm rate and copy bandwidth
    assert "same run" in report["roofline"]["figures"] and "projected ms" in result.stdout
    assert all(r["projected_ms"] > 0 for r in rows if r["status"] == "ok" and r["case"] in
               {*gpu_bench.FASTCACHE, *gpu_bench.MATRYOSHKA, "st_cached_mbs32"})
    profiled = [r for r in rows if r.get("kernels")]  # the target shape's fastcache cases, timed kernel by kernel
    assert {r["case"] for r in profiled} == {*gpu_bench.FASTCACHE} and all(
        k["ms"] >= 0 and k["calls"] >= 1 for r in profiled for k in r["kernels"])


def test_spent_budget_skips_groups_with_the_reason(gpu_bench, tmp_path):
    measured = gpu_bench.run_all(tmp_path, dry_run=True, budget_s=0, case_seconds=0.01, cases=["reference"],
                                 dtypes=["float32"])
    assert [r["case"] for r in measured["rows"]] == ["mm_ceiling", "reference", *gpu_bench.EPILOGUE_CASES]
    assert all(r["status"] == "skipped" and "time budget" in r["reason"] for r in measured["rows"])


def test_timed_out_group_names_the_interrupted_case(gpu_bench, tmp_path, monkeypatch):
    """A group whose process times out: its finished cases are kept, the running one and the rest are skipped."""
    def fake_run(command, **kwargs):
        results = Path(command[command.index("--results") + 1])
        group = json.loads(command[command.index("--child") + 1])
        key = {k: group.get(k) for k in ("B", "N", "D", "dtype")}
        with results.open("a") as out:  # children append to the run's one rows file
            if group.get("ceiling"):  # the ceiling group finishes
                out.write(json.dumps({**key, "case": "mm_ceiling", "status": "ok", "min_s": 1.0}) + "\n")
                return subprocess.CompletedProcess(command, 0, "", "")
            out.write(json.dumps({**key, "case": group["cases"][0], "status": "started"}) + "\n"
                      + json.dumps({**key, "case": group["cases"][0], "status": "ok", "min_s": 1.0}) + "\n"
                      + json.dumps({**key, "case": group["cases"][1], "status": "started"}) + "\n")
        raise subprocess.TimeoutExpired(command, kwargs["timeout"])

    monkeypatch.setattr(gpu_bench.subprocess, "run", fake_run)
    measured = gpu_bench.run_all(tmp_path, dry_run=True, budget_s=100, case_seconds=0.01,
                                 cases=["reference", "fastcache_tiled", "inf_cl"], dtypes=["float32"])
    rows = {r["case"]: r for r in measured["rows"] if r.get("dtype") == "float32"}
    assert rows["reference"]["status"] == "ok"
    assert rows["fastcache_tiled"]["status"] == "skipped"
    assert "timed out" in rows["fastcache_tiled"]["reason"] and "while running" in rows["fastcache_tiled"]["reason"]
    assert "before this case started" in rows["inf_cl"]["reason"]


def test_rates_and_targets(gpu_bench):
    """TFLOP/s from 6·B·N·D and the same-run mm rate; each target computed from the target-shape rows."""
    shape = {"B": 65536, "N": 131072, "D": 768, "dtype": "bfloat16"}
    flop = 6 * 65536 * 131072 * 768
    rows = [{"case": "mm_ceiling", "status": "ok", "flop": 1e15, "min_s": 1.25},  # 800 TFLOP/s
            {**shape, "case": "fastcache_slab_cuda", "status": "ok", "min_s": flop / 560e12,
             "peak_beyond_inputs_and_grads_mib": 3000.0},
            {**shape, "case": "fastcache_slab_triton", "status": "ok", "min_s": flop / 400e12},
            {**shape, "case": "fastcache_tiled", "status": "ok", "min_s": flop / 500e12,
             "peak_beyond_inputs_and_grads_mib": 100.0},
            {**shape, "case": "st_cached_mbs32", "status": "ok", "min_s": 10 * flop / 560e12},
            {**shape, "case": "inf_cl", "status": "ok", "min_s": flop / 300e12, "peak_beyond_inputs_and_grads_mib": 50.0},
            {**shape, "case": "liger_flce", "status": "error", "reason": "x"},
            {**shape, "dtype": "float32", "case": "fastcache_tiled", "status": "ok", "min_s": 1e9}]
    assert gpu_bench.add_rates(rows) == pytest.approx(800)
    assert rows[1]["tflops"] == pytest.approx(560) and rows[1]["ratio_to_mm"] == pytest.approx(0.7)
    found = {t["target"].split(" (")[0]: t for t in gpu_bench.targets(rows)}
    assert found["slab >= 60% of the same-run torch.mm bf16 rate"]["met"]  # the faster slab: cuda, 70%
    assert found["tiled within 1.5x of slab time"]["met"]  # 1.12x
    assert found["tiled peak memory beyond inputs and gradients < 1 GB"]["met"]
    assert found[">= 3x faster than sentence-transformers' loss stage"]["met"]  # 10x
    assert found["faster than each of Inf-CL, Cut Cross-Entropy, Liger"]["met"]  # only inf_cl ran
    assert not found["no more memory than the leanest peer"]["met"]  # 3000 MiB (slab, the fastest) vs 50 MiB


def test_rows_get_the_projection_at_the_same_run_figures(gpu_bench):
    """Each modelled row gets bench/roofline.py's projection at its shape, with the run's torch.mm rate and its
    widest device-to-device copy's bandwidth (GB/s counted as the model counts: read + write)."""
    from dataclasses import replace

    import roofline

    shape = {"B": 16384, "N": 16384, "D": 768, "dtype": "bfloat16"}
    rows = [{"case": "mm_ceiling", "status": "ok", "flop": 1e15, "min_s": 1.25},  # 800 TFLOP/s
            {"case": "epilogue_copy", "status": "ok", "B": 3900, "N": 131072, "bytes_per_run": 2.5e9, "min_s": 1e-3},
            {**shape, "case": "fastcache_tiled", "status": "ok", "min_s": 0.05},
            {**shape, "case": "matryoshka_slab_cuda", "status": "ok", "min_s": 0.2, "dims": [768, 384]},
            {**shape, "case": "reference", "status": "ok", "min_s": 0.1}]
    mm_rate = gpu_bench.add_rates(rows)
    figures = gpu_bench.add_projections(rows, mm_rate, "NVIDIA H200")
    assert figures["mm_tflops"] == pytest.approx(800) and figures["bandwidth_tbs"] == pytest.approx(2.5)
    machine = replace(roofline.MACHINES["H200"], mm_tflops=mm_rate, bandwidth_tbs=2.5)
    tiled = roofline.project("fastcache_tiled", roofline.Shape(**shape), machine)
    assert rows[2]["projected_ms"] == pytest.approx(tiled["projected_ms"])
    assert rows[2]["measured_over_projected"] == pytest.approx(50 / tiled["projected_ms"])
    two_dims = roofline.project("matryoshka_slab_cuda", roofline.Shape(**shape), machine, {"dims": 2})
    assert rows[3]["projected_ms"] == pytest.approx(two_dims["projected_ms"])
    assert "projected_ms" not in rows[4]  # the dense reference is not modelled


def test_matryoshka_targets(gpu_bench):
    """Per strategy, the 5-dim Matryoshka time over the single-dim time of the same shape, at most 1.3."""
    shape = {"B": 16384, "N": 16384, "D": 768, "dtype": "bfloat16"}
    rows = [{**shape, "case": "fastcache_tiled", "status": "ok", "min_s": 1.0},
            {**shape, "case": "matryoshka_tiled", "status": "ok", "min_s": 1.2},
            {**shape, "case": "fastcache_slab_cuda", "status": "ok", "min_s": 1.0},
            {**shape, "case": "matryoshka_slab_cuda", "status": "ok", "min_s": 1.5},
            {**shape, "D": 384, "case": "matryoshka_tiled", "status": "ok", "min_s": 9.0}]
    found = {t["target"].split("(")[1].split(" /")[0]: t for t in gpu_bench.targets(rows)}
    assert found["matryoshka_tiled"]["met"] and found["matryoshka_tiled"]["value"] == "1.20x"
    assert not found["matryoshka_slab_cuda"]["met"]


def test_killed_run_keeps_every_finished_row(tmp_path):
    """The dry run killed mid-way (SIGINT to its process group, as ``timeout --signal=INT`` sends, after its third
    finished row): every row that finished is on disk, and the report written on the way out holds them."""
    import os
    import signal
    import time

    command = [sys.executable, str(BENCH / "gpu_bench.py"), "--dry-run", "--dtypes", "bfloat16", "--out",
               str(tmp_path), "--case-seconds", "0.01"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    rows_file = tmp_path / "bench_rows.jsonl"

    def finished() -> list[dict]:
        if not rows_file.exists():
            return []
        lines = [json.loads(line) for line in rows_file.read_text().splitlines() if line.endswith("}")]
        return [r for r in lines if "case" in r and r.get("status") != "started"]

    deadline = time.monotonic() + 300
    while len(finished()) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, "the dry run ended before it could be interrupted"
    os.killpg(process.pid, signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    kept = finished()
    assert len(kept) >= 3
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["interrupted"]
    reported = {(r["case"], r.get("B"), r.get("N")) for r in report["rows"] if r.get("status") == "ok"}
    assert {(r["case"], r.get("B"), r.get("N")) for r in kept if r["status"] == "ok"} <= reported


def test_phases_split_the_plan(gpu_bench, tmp_path):
    """headline: the ceiling and the target shape (profiled); multivector: MaxSim and SPLADE; rest: everything
    else; together: all of it."""
    groups = {phase: gpu_bench._groups(True, [*gpu_bench.CASES, *gpu_bench.MULTIVECTOR_CASES], ["bfloat16", "float32"],
                                       phase) for phase in gpu_bench.PHASES}
    assert [g["cases"] for g in groups["headline"]] == [["mm_ceiling"], list(gpu_bench.CASES)]
    assert groups["headline"][1]["profile"] and (groups["headline"][1]["B"], groups["headline"][1]["N"]) == \
        gpu_bench.DRY_GRID[0][:2]
    assert groups["multivector"] and all(g.get("multivector") for g in groups["multivector"])
    assert groups["all"] == groups["headline"] + groups["multivector"] + groups["rest"]


def test_epilogue_blocks_are_the_slab_chunks(gpu_bench):
    """The epilogue benchmark's blocks are the slab's real chunks at the target shape (thousands of rows, not
    128: hundreds of CUDA blocks / Triton programs, as in the real run)."""
    shapes = dict((columns, rows) for rows, columns in gpu_bench.epilogue_shapes())
    assert 2000 < shapes[131072] < 8192 and shapes[16384] >= 8192


def test_st_cached_extrapolates_long_batches(gpu_bench):
    run, reset, info = gpu_bench.make_case("st_cached_mbs32", 64, 128, 8, "float32", "cpu", True)
    assert "time_factor" not in info  # B <= ST_MAX_ROWS: the whole batch
    original = gpu_bench.ST_MAX_ROWS
    try:
        gpu_bench.ST_MAX_ROWS = 16
        run, reset, info = gpu_bench.make_case("st_cached_mbs32", 64, 128, 8, "float32", "cpu", True)
    finally:
        gpu_bench.ST_MAX_ROWS = original
    assert info["extrapolated_from_rows"] == 16 and info["time_factor"] == 4
    loss, grads = run()
    assert math.isfinite(float(loss)) and len(grads) == 16 // 32 + 1 + 2 * (64 // 32)


def test_suite_dry_run_runs_the_phases_in_order(gpu_bench, tmp_path):
    """bash bench/gpu_suite.sh OUT --dry-run: every phase in the planned order (preflight, correctness, headline,
    multivector, sanitizers, the rest), each exiting 0 (or skipped, with why), at most 8 files, the results on
    disk."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    import os

    done = subprocess.run([bash, str(BENCH / "gpu_suite.sh"), str(tmp_path), "--dry-run"], capture_output=True,
                          text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    assert list(suite["phases"]) == ["preflight", "correctness_triton", "headline", "multivector",
                                     "correctness_cuda", "headline_cuda", "sanitizers", "cuda_tests", "rest"]
    assert all(p["rc"] == 0 or (p["rc"] is None and "skipped" in p["note"]) for p in suite["phases"].values()), suite
    files = {p.name for p in tmp_path.iterdir()}
    assert files == {"suite.json", "suite.log", "preflight.json", "correctness.xml", "bench_rows.jsonl",
                     "gpu_bench.json", "gpu_bench.csv", "junit_cuda.xml"}
    assert json.loads((tmp_path / "preflight.json").read_text())["dry_run"]
    correctness = (tmp_path / "correctness.xml").read_text()
    assert correctness.count("<testcase") >= 3 and "<failure" not in correctness
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["phase"] == "rest"  # the last phase's report holds the headline's rows too
    assert {"mm_ceiling", "fastcache_tiled", "fastcache_slab_cuda", "epilogue_copy"} <= {r["case"] for r in
                                                                                       report["rows"]}
    # the multivector phase: MaxSim in both dtypes and SPLADE (a group its 80 s no longer allowed on a busy machine:
    # skipped with the reason), the first group measured, the rows in the suite's output
    import gpu_multivector

    multivector = {(r["case"], r["dtype"]): r for r in report["rows"] if r["case"] in gpu_multivector.MULTIVECTOR_CASES}
    assert len(multivector) == 2 * 4 + 3
    assert all(r["status"] == "ok" or "time budget" in r["reason"] for r in multivector.values()), multivector
    assert all(multivector[(case, "bfloat16")]["status"] == "ok" for case in gpu_multivector.MAXSIM_CASES)
    assert "| 4 | bfloat16 | maxsim_fastcache_triton |" in done.stdout


def test_a_later_phase_keeps_the_ceiling_already_measured(gpu_bench, tmp_path):
    """The headline's CUDA-epilogue call and the rest come after the headline phase in the same OUTDIR: the torch.mm
    ceiling measured there is not measured again (GPU time is scarce)."""
    (tmp_path / gpu_bench.ROWS_FILE).write_text(json.dumps({"case": "mm_ceiling", "status": "ok", "min_s": 1.0}) + "\n")
    measured = gpu_bench.run_all(tmp_path, dry_run=True, budget_s=0, case_seconds=0.01, cases=["reference"],
                                 dtypes=["float32"], phase="headline")
    assert [r["case"] for r in measured["rows"]] == ["reference"]
