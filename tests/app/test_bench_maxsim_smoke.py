"""bench/maxsim_table.py still runs end to end (tiny shape, no timing claims): every loss case computes the same
loss, the table, the targets and the JSON (with each case's peak memory) come out."""

from helpers import run_bench_script


def test_maxsim_table_quick(tmp_path):
    stdout, report = run_bench_script("maxsim_table.py", tmp_path / "table.json", "--parallel", "2")
    assert "| fastcache maxsim_contrastive_loss, backend=cpu" in stdout
    assert "losses of the 3 loss cases agree" in stdout and "within 1.5x of one token-level GEMM" in stdout
    (batch,) = report["batches"].values()
    cases = batch["cases"]
    assert set(cases) == {"fastcache_cpu", "fastcache_torch", "upstream", "gemm"}
    losses = [case["loss"] for case in cases.values() if case["loss"] is not None]
    assert len(losses) == 3 and max(losses) - min(losses) <= 1e-5 * abs(losses[0])
    assert all(case["min_s"] > 0 and "peak_beyond_inputs_and_grads_mib" in case["memory"] for case in cases.values())
    assert {item["target"] for item in batch["targets"]} >= {"within 1.5x of one token-level GEMM"}
