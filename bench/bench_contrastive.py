"""pytest-benchmark timings of the contrastive loss stage on CPU (the cases of bench/contrastive_table.py).

Not part of the default test run (testpaths is tests/ and addopts disables benchmarks); run it explicitly:

    python -m pytest bench/bench_contrastive.py --benchmark-enable
    FASTCACHE_BENCH_QUICK=1 python -m pytest bench/bench_contrastive.py --benchmark-enable   # small shape

Every case is the loss forward and backward at B=4096 queries, N=8192 candidates, D=384, fp32 (quick: B=256,
N=512, D=64). A case takes seconds, so each runs one warm-up round and three timed rounds of one call. Peak memory
is not measured here: bench/contrastive_table.py measures it in a fresh process per case.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from contrastive_table import CASES, FULL, QUICK, make_case  # noqa: E402

SHAPE = QUICK if os.environ.get("FASTCACHE_BENCH_QUICK", "0") not in ("", "0") else FULL
ROUNDS = 3


def _needs(name: str) -> None:
    if name.startswith("st_"):
        pytest.importorskip("sentence_transformers")
    if name in ("fastcache_cpu", "fastcache_cpu_64mib"):
        from fastcache import _backend

        if _backend.EXTENSION is None:
            pytest.skip(f"the compiled extension is not built: {_backend.EXTENSION_ERROR}")


@pytest.mark.parametrize("name", list(CASES))
def test_contrastive_loss_stage(benchmark, name):
    _needs(name)
    case = make_case(name, **SHAPE)
    benchmark.group = "contrastive loss stage B={B} N={N} D={D} fp32 fwd+bwd".format(**SHAPE)
    benchmark.extra_info.update(case.info)

    def run():
        case.run()  # drop the gradients at once: they would otherwise stay alive into the next round

    benchmark.pedantic(run, setup=case.reset, rounds=ROUNDS, warmup_rounds=1, iterations=1)
