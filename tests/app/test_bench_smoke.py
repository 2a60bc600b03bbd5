"""The CPU benchmark script still runs end to end (tiny shape, no timing claims): every case computes the same
loss (the gradient filter's case, on its own embeddings, reports its hit rate), and the table and JSON come out."""

from helpers import run_bench_script


def test_contrastive_table_quick(tmp_path):
    stdout, report = run_bench_script("contrastive_table.py", tmp_path / "table.json", "--no-memory")
    assert "| fastcache fused, backend=cpu" in stdout
    assert "losses of the 7 loss cases agree" in stdout
    cases = report["cases"]
    filtered = cases.pop("fastcache_cpu_filtered")  # the gradient filter's case, on its own embeddings
    assert 0 <= filtered["filter_hit_rate"] <= 1 and filtered["filter_tiles"] > 0
    assert "fastcache_cpu_filtered (filter_eps=" in stdout
    losses = [case["loss"] for case in cases.values() if case.get("loss") is not None]
    assert len(losses) == 7  # every loss case ran (the bare GEMMs have no loss)
    assert max(losses) - min(losses) <= 1e-4 * abs(losses[0])
    assert all(case["min_s"] > 0 for case in (*cases.values(), filtered))
