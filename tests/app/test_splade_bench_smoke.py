"""bench/splade_table.py and bench/sparse_crossover.py still run end to end (tiny shapes, no timing claims): the
contrastive losses of the op, both inner losses and both cached losses agree, and the tables and JSON come out."""

from helpers import run_bench_script


def test_splade_table_quick(tmp_path):
    stdout, report = run_bench_script("splade_table.py", tmp_path / "splade.json", "--no-memory")
    assert "| sentence-transformers CachedSpladeLoss |" in stdout and "Targets" in stdout
    cases = report["cases"]
    assert set(cases) == {"gemms", "sparse_gemms", "fastcache_op", "fastcache_op_slab", "fastcache_mnrl", "st_mnrl",
                          "fastcache_cached", "st_cached"}
    contrastive = [cases[k]["loss"] for k in ("fastcache_op", "fastcache_op_slab", "fastcache_mnrl", "st_mnrl")]
    assert max(contrastive) - min(contrastive) <= 1e-5 * abs(contrastive[0])
    # the cached losses add the (small, positive) FLOPS regularisers to the same contrastive loss
    assert abs(cases["fastcache_cached"]["loss"] - cases["st_cached"]["loss"]) <= 1e-5 * abs(contrastive[0])
    assert 0 < cases["st_cached"]["loss"] - contrastive[0] < 1e-3 * abs(contrastive[0])
    assert all(case["min_s"] > 0 for case in cases.values())


def test_sparse_crossover_quick(tmp_path):
    """bench/sparse_crossover.py (slab against sparse products over densities) runs, both strategies give one loss
    (the script asserts it), one row per density."""
    stdout, report = run_bench_script("sparse_crossover.py", tmp_path / "crossover.json")
    assert "| D | density | slab s | sparse s | slab ÷ sparse |" in stdout
    assert [row["density"] for row in report["cases"]] == [0.005, 0.01, 0.02, 0.04, 0.08]
    assert all(row["slab_s"] > 0 and row["sparse_s"] > 0 for row in report["cases"])
