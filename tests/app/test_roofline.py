"""bench/roofline.py: the model's arithmetic against hand-computed FLOPs and bytes on small shapes, the issue's
figures at the headline shape, the projection rule, the command and its JSON, and the ``roofline:`` tags in the
code (each names a term of the table; each term caused by fastcache's code is tagged in its files)."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import replace
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def roofline():
    """bench/roofline.py as the module ``roofline`` (the name bench/gpu_bench.py imports it by; its dataclasses need
    their module registered)."""
    if "roofline" not in sys.modules:
        spec = importlib.util.spec_from_file_location("roofline", ROOT / "bench" / "roofline.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["roofline"] = module
        spec.loader.exec_module(module)
    return sys.modules["roofline"]


# no memory limit (1e9 TB/s) or no compute limit (1e9 TFLOP/s): the projection is the other term plus the launches
FAST_MEMORY = {"mm_tflops": 100.0, "bandwidth_tbs": 1e9}
FAST_COMPUTE = {"mm_tflops": 1e9, "bandwidth_tbs": 2.0}


def _launch_s(roofline, strategy, shape, machine) -> float:
    _, build, fixed = roofline.STRATEGIES[strategy]
    return sum(k.launches for k in build(replace(shape, **fixed), machine)) * roofline.LAUNCH_S


def test_slab_v1_flops_and_bytes_by_hand(roofline):
    """B=64, N=128, D=32, chunks of 16 rows. bf16: per logit 4 (fp32 GEMM output) + 4 + 8 (epilogue) + 6 (cast)
    + 2·2 (gradient GEMMs read dL/ds) = 26 B, the embeddings read by 3 GEMMs per chunk 3·2·32·(1/16 + 1/128) = 13.5,
    the fp32 gradient accumulators 8·32/128 + 8·32/16 = 18; per embedding row 2·2·32 (normalise) + 10·32
    (its backward) + 10·32 (autograd's dtype and scale) + 12·32 (zero, unscale) = 1152 B. fp32: no cast, dL/ds
    read as fp32 (4 + 4), operands of 4 bytes."""
    machine = roofline.MACHINES["H100"]
    s = roofline.Shape(64, 128, 32, "bfloat16", chunk=16)
    p = roofline.project("fastcache_slab_cuda", s, machine)
    assert p["flop"] == 6 * 64 * 128 * 32
    assert p["hbm_bytes"] == pytest.approx(64 * 128 * (26 + 13.5 + 18) + 192 * 1152)
    f = roofline.project("fastcache_slab_cuda", replace(s, dtype="float32"), machine)
    per_logit = 4 + 12 + 0 + 8 + 3 * 4 * 32 * (1 / 16 + 1 / 128) + 18
    per_row = 2 * 4 * 32 + 12 * 32 + 16 * 32 + 12 * 32
    assert f["hbm_bytes"] == pytest.approx(64 * 128 * per_logit + 192 * per_row)
    assert f["mm_tflops"] == machine.fp32_tflops and p["mm_tflops"] == machine.mm_tflops


def test_issue_figures_at_the_headline(roofline):
    """The issue's derivation: 6·B·N·D = 39.6 TFLOP for the slab, ~26 B/logit around its GEMMs (here plus the
    operand reads and the accumulators: under 30), chunks of ~3900 rows; tiled and Inf-CL 10·B·N·D; CCE without
    filtering 8·B·N·D; slab v2 within the issue's 8 B/logit beyond the GEMMs' operand reads; Liger's 512-row chunks
    and 12 B/logit of logits traffic."""
    s = roofline.Shape(**roofline.HEADLINE)
    h100 = roofline.MACHINES["H100"]
    BND = s.B * s.N * s.D
    assert 3000 < roofline.slab_chunk(s) < 4500
    slab = roofline.project("fastcache_slab_cuda", s, h100)
    assert slab["flop"] == pytest.approx(39.6e12, rel=1e-3) == 6 * BND
    assert 26 < slab["hbm_bytes_per_logit"] < 30
    for name in ("fastcache_tiled", "tiled_v2_design", "inf_cl", "matryoshka_tiled"):
        assert roofline.project(name, s, h100)["flop"] == 10 * BND, name
    assert roofline.project("cut_cross_entropy_exact", s, h100)["flop"] == pytest.approx(8 * BND)
    filtered = roofline.project("cut_cross_entropy", replace(s, filter_hit_rate=0.75), h100)
    assert filtered["flop"] == pytest.approx((4 + 4 * 0.25) * BND)
    v2 = roofline.project("slab_v2_design", s, h100)
    operand_reads = sum(k["hbm"] for k in v2["kernels"] if "GEMM" in k["kernel"])
    assert v2["flop"] == 6 * BND and 3 * s.e * s.logits <= operand_reads
    beyond = sum(roofline.TERMS[t].amount(s) for t in ("slab_v2.logits_store", "slab_v2.lse_partials")) + \
        2 * roofline.TERMS["slab_v2.logits_load"].amount(s)
    assert beyond <= 8
    liger = roofline.liger(s, h100)
    assert {p.get("rows") for k in liger for _, _, p in k.terms} >= {512}
    logits_traffic = sum(roofline.TERMS[t].amount(s) * n for t, n in (
        ("liger.logits_write", 1), ("liger.cross_entropy", 1), ("liger.grad_operand_read", 2)))
    assert logits_traffic == 12


def test_projection_is_the_sum_of_each_kernels_larger_limit(roofline):
    """Projected time = Σ max(FLOPs / mm rate, bytes / bandwidth) + launches: with either limit made free, the
    other one alone (plus launches); in between, at least the larger and at most their sum."""
    s = roofline.Shape(256, 512, 64, "bfloat16", chunk=64)
    for strategy in ("fastcache_slab_cuda", "fastcache_tiled", "slab_v2_design", "liger_flce"):
        compute = replace(roofline.MACHINES["H100"], **FAST_MEMORY)
        memory = replace(roofline.MACHINES["H100"], **FAST_COMPUTE)
        c, m = roofline.project(strategy, s, compute), roofline.project(strategy, s, memory)
        launches = _launch_s(roofline, strategy, s, compute)
        assert c["projected_ms"] == pytest.approx((c["flop"] / 100e12 + launches) * 1e3, rel=1e-6)
        assert m["projected_ms"] == pytest.approx((m["hbm_bytes"] / 2e12 + launches) * 1e3, rel=1e-6)
        both = roofline.project(strategy, s, replace(roofline.MACHINES["H100"], mm_tflops=100.0, bandwidth_tbs=2.0))
        flop_s, byte_s = both["flop"] / 100e12, both["hbm_bytes"] / 2e12
        assert max(flop_s, byte_s) + launches <= both["projected_ms"] / 1e3 * (1 + 1e-9)
        assert both["projected_ms"] <= both["no_overlap_ms"] * (1 + 1e-9)
        assert both["no_overlap_ms"] == pytest.approx((flop_s + byte_s + launches) * 1e3, rel=1e-6)
        assert both["ratio_to_mm"] == pytest.approx(6 * s.B * s.N * s.D / (both["projected_ms"] / 1e3) / 100e12)


def test_l2_rate_is_a_third_limit_only_when_given(roofline):
    s = roofline.Shape(**roofline.HEADLINE)
    plain = roofline.project("fastcache_tiled", s, roofline.MACHINES["H100"])
    slow_l2 = roofline.project("fastcache_tiled", s, replace(roofline.MACHINES["H100"], l2_tbs=1.0))
    assert plain["l2_bytes"] == slow_l2["l2_bytes"] > 0
    assert slow_l2["projected_ms"] >= slow_l2["l2_bytes"] / 1e12 * 1e3 > plain["projected_ms"]
    # tiled v2 keeps the gradient on chip: no per-tile read-modify-write through L2
    assert roofline.project("tiled_v2_design", s, roofline.MACHINES["H100"])["l2_bytes"] < plain["l2_bytes"]


def test_matryoshka_dims_and_row_projection(roofline):
    """The Matryoshka slab's bytes grow with its dims; a gpu_bench row is projected at its own dims."""
    s = roofline.Shape(1024, 2048, 64, "bfloat16", chunk=256)
    h100 = roofline.MACHINES["H100"]
    one, five = (roofline.project("matryoshka_slab_cuda", s, h100, {"dims": k}) for k in (1, 5))
    assert one["flop"] == five["flop"] == 6 * 1024 * 2048 * 64 and five["hbm_bytes"] > 2 * one["hbm_bytes"]
    row = {"case": "matryoshka_slab_cuda", "B": 1024, "N": 2048, "D": 64, "dtype": "bfloat16", "dims": [64, 32]}
    two = roofline.project_row(row, h100)
    assert two["dims"] == 2 and one["hbm_bytes"] < two["hbm_bytes"] < five["hbm_bytes"]
    assert roofline.project_row({**row, "case": "epilogue_copy"}, h100) is None


def test_same_run_figures(roofline):
    """A suite run's mm rate and its widest device-to-device copy's bandwidth replace the table's; the GPU's name
    picks the table entry otherwise."""
    rows = [{"case": "epilogue_copy", "B": 10, "N": 16384, "gbps": 2000.0},
            {"case": "epilogue_copy", "B": 10, "N": 131072, "gbps": 2800.0}]
    machine, source = roofline.measured_figures(rows, 700.0, "NVIDIA H200")
    assert (machine.name, machine.mm_tflops, machine.bandwidth_tbs) == ("H200", 700.0, 2.8)
    assert "same run" in source
    machine, source = roofline.measured_figures([], None, "NVIDIA H100 80GB HBM3")
    assert machine == roofline.MACHINES["H100"] and "table" in source


def test_command_prints_every_strategy_on_both_machines(roofline, capsys):
    assert roofline.main([]) == 0
    out = capsys.readouterr().out
    for label, _, _ in roofline.STRATEGIES.values():
        assert label.split(" (")[0] in out
    assert out.count("| H100 |") == out.count("| H200 |") == len(roofline.STRATEGIES)


def test_command_json_and_gpu_bench_input(roofline, capsys, tmp_path):
    assert roofline.main(["--json", "--machine", "H100", "--mm-tflops", "500", "--bandwidth", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["mm_tflops"] for m in data["machines"]] == [500]
    slab = next(p for p in data["projections"] if p["strategy"] == "fastcache_slab_cuda")
    assert slab["B"] == 65536 and slab["bandwidth_tbs"] == 2 and slab["projected_ms"] > 0
    shape = {"B": 4096, "N": 8192, "D": 256, "dtype": "bfloat16"}
    report = {"mm_tflops": 600.0, "machine": {"gpu": "NVIDIA H100"},
              "rows": [{**shape, "case": "fastcache_slab_cuda", "status": "ok", "min_s": 0.01},
                       {**shape, "case": "reference", "status": "ok", "min_s": 0.02}]}
    path = tmp_path / "gpu_bench.json"
    path.write_text(json.dumps(report))
    assert roofline.main(["--gpu-bench", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [m["mm_tflops"] for m in data["machines"]] == [600.0]
    assert [(c["case"], c["measured_ms"]) for c in data["measured"]] == [("fastcache_slab_cuda", 10.0)]
    with pytest.raises(SystemExit):
        roofline.main(["--filter-hit-rate", "1.5"])


TAG = re.compile(r"roofline:([^\n]*)")
TERM_NAME = re.compile(r"\b([a-z][a-z0-9_]*\.[a-z][a-z0-9_]*)\b")


def _tags() -> dict[str, set[str]]:
    """file (relative) -> the term names in its ``roofline:`` comments."""
    found = {}
    for path in [*ROOT.joinpath("fastcache").rglob("*.py"), *ROOT.joinpath("csrc").rglob("*.c*"),
                 *ROOT.joinpath("csrc").rglob("*.h")]:
        names = {n for comment in TAG.findall(path.read_text()) for n in TERM_NAME.findall(comment)}
        if names:
            found[str(path.relative_to(ROOT))] = names
    return found


def test_code_tags_name_terms_of_the_table(roofline):
    tags = _tags()
    assert tags, "no roofline: tags found"
    for path, names in tags.items():
        assert names <= set(roofline.TERMS), (path, names - set(roofline.TERMS))
    for name, term in roofline.TERMS.items():
        for source in term.sources:
            if (ROOT / source).is_file():
                assert name in tags.get(source, set()), f"term {name} is not tagged in {source}"
            else:
                assert source.startswith(("peer:", "design")), (name, source)
