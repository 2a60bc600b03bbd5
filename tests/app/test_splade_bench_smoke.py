"""bench/splade_table.py still runs end to end (tiny shape, no timing claims): the contrastive losses of the op, both
inner losses and both cached losses agree, and the table and JSON come out."""

from helpers import run_bench_script


def test_splade_table_quick(tmp_path):
    stdout, report = run_bench_script("splade_table.py", tmp_path / "splade.json", "--no-memory")
    assert "| sentence-transformers CachedSpladeLoss |" in stdout and "Targets" in stdout
    cases = report["cases"]
    assert set(cases) == {"gemms", "sparse_gemms", "fastcache_op", "fastcache_mnrl", "st_mnrl", "fastcache_cached",
                          "st_cached"}
    contrastive = [cases[k]["loss"] for k in ("fastcache_op", "fastcache_mnrl", "st_mnrl")]
    assert max(contrastive) - min(contrastive) <= 1e-5 * abs(contrastive[0])
    # the cached losses add the (small, positive) FLOPS regularisers to the same contrastive loss
    assert abs(cases["fastcache_cached"]["loss"] - cases["st_cached"]["loss"]) <= 1e-5 * abs(contrastive[0])
    assert 0 < cases["st_cached"]["loss"] - contrastive[0] < 1e-3 * abs(contrastive[0])
    assert all(case["min_s"] > 0 for case in cases.values())
