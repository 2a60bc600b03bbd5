"""The C++ CPU kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

The extension is built by the project's own setup.py (``FASTCACHE_CXXFLAGS``, every csrc/cpu source) with
``-fsanitize=address,undefined -fno-sanitize-recover=all`` (and ``-fno-wrapv``, so that signed overflow is
checked too) into a TEMPORARY directory — never over the installed fastcache/_C*.so, which other processes use.
A subprocess then loads that build as ``fastcache._C`` (with the ASan runtime preloaded, as Python itself is not
instrumented) and runs the CPU test subset SANITIZED_TESTS on the "cpu" backend: any out-of-bounds access,
use-after-free or undefined behaviour aborts it with the sanitizer's report, which the test shows.

Time: about 1.7 minutes of CPU to build (the torch headers dominate), then the 689 tests: 91 s in all on 2 cores
(2026-11-29). The build directory is kept between runs when FASTCACHE_SANITIZER_BUILD names one (incremental); by
default it is a fresh temporary directory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
FLAGS = "-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -fno-wrapv"
# the CPU test subset run under the sanitizers: the C++ contrastive epilogue on every option, layout, stress input
# and dtype (the op tests and the property tests), and the other C++ kernels' op tests (ranking, Matryoshka,
# MaxSim, the row normalisation, the sparse products: all of that file)
SANITIZED_TESTS = [f"tests/{name}" for name in (
    "contrastive/test_contrastive_op.py", "contrastive/test_contrastive_duplicates.py",
    "contrastive/test_properties_contrastive.py", "ranking/test_ranking_op.py", "matryoshka/test_matryoshka_op.py",
    "maxsim/test_maxsim_op.py", "contrastive/test_normalize_cpu.py", "contrastive/test_contrastive_sparse.py")]
# (not: the low-precision statistics and budget / thread-count tests, which exercise no other C++ path; and the
# "GPU backend on CPU tensors raises" check, which this module's Triton interpreter makes runnable)
SELECTION = ("(cpu and not low_precision and not deterministic_across_thread and not budget "
             "and not gpu_backend_on_cpu) or test_contrastive_sparse")
MIN_TESTS = 850  # the selection runs ~880 tests today: a much smaller number means it stopped matching
BUILD_TIMEOUT_S = 600
RUN_TIMEOUT_S = 600

_RUNNER = """
import importlib.util, sys
import torch
spec = importlib.util.spec_from_file_location("fastcache._C", {so!r})
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["fastcache._C"] = module
from fastcache import _backend
assert _backend.EXTENSION is module, _backend.EXTENSION_ERROR
import pytest
# --capture=sys: a sanitizer report goes to the process's stderr, which pytest's fd capture would swallow
sys.exit(pytest.main(["-q", "-x", "--capture=sys", "-p", "no:cacheprovider", "-k", {selection!r}, *{tests!r}]))
"""


def _runtime(name: str) -> str | None:
    path = subprocess.run(["c++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


@pytest.fixture(scope="module")
def sanitized_extension(tmp_path_factory) -> Path:
    """fastcache._C built with ASan + UBSan into a temporary directory; the path of the .so."""
    pytest.importorskip("torch.utils.cpp_extension")
    if shutil.which("c++") is None or _runtime("libasan.so") is None:
        pytest.skip("no C++ compiler with the AddressSanitizer runtime")
    folder = Path(os.environ.get("FASTCACHE_SANITIZER_BUILD") or tmp_path_factory.mktemp("sanitized_build"))
    env = dict(os.environ, FASTCACHE_BUILD_CUDA="0", FASTCACHE_CXXFLAGS=FLAGS,
               LDFLAGS="-fsanitize=address,undefined", MAX_JOBS=str(os.cpu_count() or 2))
    build = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(folder / "lib"), "--build-temp",
         str(folder / "tmp")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    (so,) = (folder / "lib" / "fastcache").glob("_C*.so")
    installed = {p.resolve() for p in (ROOT / "fastcache").glob("_C*.so")}
    assert so.resolve() not in installed
    return so


def test_the_build_is_instrumented(sanitized_extension):
    """The .so calls into both sanitizers' runtimes (so a clean run below means something)."""
    symbols = subprocess.run(["nm", "-D", "--undefined-only", str(sanitized_extension)], capture_output=True,
                             text=True, check=True).stdout
    assert "__asan_report_load" in symbols or "__asan_loadN" in symbols
    assert "__ubsan_handle_" in symbols


def test_cpu_tests_run_clean_under_asan_and_ubsan(sanitized_extension, tmp_path):
    env = dict(os.environ)
    logs = tmp_path / "sanitizer"  # each runtime also writes its report to <logs>.<pid>
    env.update(
        LD_PRELOAD=" ".join(filter(None, [_runtime("libasan.so"), _runtime("libubsan.so")])),
        # Python and torch are not instrumented: their allocations are not leaks of ours
        ASAN_OPTIONS=f"detect_leaks=0:abort_on_error=1:halt_on_error=1:print_summary=1:log_path={logs}",
        UBSAN_OPTIONS=f"halt_on_error=1:print_stacktrace=1:print_summary=1:log_path={logs}",
        PYTHONPATH=os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")])),
    )
    code = _RUNNER.format(so=str(sanitized_extension), selection=SELECTION, tests=SANITIZED_TESTS)
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=RUN_TIMEOUT_S)
    reports = "".join(path.read_text() for path in sorted(tmp_path.glob("sanitizer.*")))
    report = reports[:6000] + run.stdout[-4000:] + run.stderr[-4000:]
    assert not reports, report
    assert run.returncode == 0, report
    assert "AddressSanitizer" not in run.stderr and "runtime error:" not in run.stderr, report
    passed = re.search(r"(\d+) passed", run.stdout)
    assert passed and int(passed.group(1)) >= MIN_TESTS and " failed" not in run.stdout, report
