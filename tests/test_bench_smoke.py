"""The CPU benchmark script still runs end to end (tiny shape, no timing claims): every case computes the same
loss, and the table and JSON come out."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_contrastive_table_quick(tmp_path):
    out = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "contrastive_table.py"), "--quick", "--no-memory", "--repeats", "1",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| fastcache fused, backend=cpu" in result.stdout
    assert "losses of the 7 loss cases agree" in result.stdout
    cases = json.loads(out.read_text())["cases"]
    losses = [case["loss"] for case in cases.values() if case.get("loss") is not None]
    assert len(losses) == 7  # every loss case ran (the bare GEMMs have no loss)
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    assert all(case["min_s"] > 0 for case in cases.values())
