"""The one benchmark harness of fastcache: wall-clock timing and peak memory of a benchmark case.

A *case* is a :class:`Case`: inputs already allocated, a ``run()`` that does one full unit of work (here: a loss
forward and backward) and returns a :class:`RunOutput` (the loss and the gradient tensors the work produced), and an
optional untimed ``reset()`` called before every run (e.g. to drop the ``.grad`` of leaf tensors).

Timing (:func:`time_case`): ``warmup`` untimed runs, then ``repeats`` timed runs with ``time.perf_counter``; the
minimum and the median in seconds.

Memory (:func:`peak_memory`): each case runs once in a fresh Python subprocess (``python bench/harness.py
--memory ...``), so no earlier case leaves memory or a higher peak behind. The child

0. is started through ``/bin/sh`` (which forks it), so that its ``ru_maxrss`` does not start at the parent's
   resident size (Linux keeps the high-water mark across exec);
1. imports, builds the case at a tiny shape and runs it once (loads lazily-initialised libraries, thread pools,
   JIT kernels), then drops it;
2. builds the case at the measured shape, touches every input (reads each tensor) and takes the baseline
   ``getrusage(RUSAGE_SELF).ru_maxrss``;
3. runs the case once and takes ``ru_maxrss`` again.

``peak beyond inputs`` is the difference; ``peak beyond inputs and gradients`` subtracts the bytes of the gradient
tensors the run returned (distinct storages counted once), which any implementation must hand back. The rest is
the workspace: similarity blocks, normalised copies, accumulators, temporaries, allocator slack. ``ru_maxrss`` is a
high-water mark of the whole process, so a case whose set-up had a transient peak above its steady state would
hide part of its run: the child records that gap (``baseline_gap_mib``, the high-water mark minus the resident size
at the baseline) so the number can be trusted when it is near zero.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MIB = 2**20


@dataclass
class RunOutput:
    """What one run of a case produced: the loss (None when the case computes none) and its gradient tensors."""

    loss: object = None
    grads: Sequence = ()


@dataclass
class Case:
    """A benchmark case with its inputs allocated. ``run`` is timed; ``reset`` (untimed) precedes every run."""

    name: str
    run: Callable[[], RunOutput]
    inputs: Sequence = ()
    reset: Callable[[], None] | None = None
    info: dict = field(default_factory=dict)


@dataclass
class Timing:
    min_s: float
    median_s: float
    times_s: list[float]


def time_case(case: Case, *, warmup: int = 1, repeats: int = 3) -> tuple[Timing, RunOutput]:
    """Seconds per run: ``warmup`` untimed runs, then ``repeats`` timed ones. Returns the timing and the output
    of the last run (for a consistency check of the loss)."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    out = None
    for _ in range(warmup):
        if case.reset is not None:
            case.reset()
        out = case.run()
        del out
    times = []
    for _ in range(repeats):
        if case.reset is not None:
            case.reset()
        out = None
        gc.collect()
        start = time.perf_counter()
        out = case.run()
        times.append(time.perf_counter() - start)
    return Timing(min(times), statistics.median(times), times), out


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (None entries skipped)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def _maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _load_module(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _measure_in_this_process(module_path: str, factory: str, kwargs: dict, warmup_kwargs: dict | None) -> dict:
    """The child's side of :func:`peak_memory` (see the module docstring)."""
    make = getattr(_load_module(module_path), factory)
    if warmup_kwargs is not None:
        case = make(**warmup_kwargs)
        if case.reset is not None:
            case.reset()
        out = case.run()
        del case, out
        gc.collect()
    case = make(**kwargs)
    for t in case.inputs:
        float(t.detach().sum())  # touch every page of the inputs
    if case.reset is not None:
        case.reset()
    gc.collect()
    baseline = _maxrss_bytes()
    baseline_gap = baseline - _rss_bytes()
    out = case.run()
    peak = _maxrss_bytes()
    grads = tensor_bytes(out.grads)
    return {
        "case": case.name,
        "baseline_mib": baseline / MIB,
        "baseline_gap_mib": max(0, baseline_gap) / MIB,
        "peak_beyond_inputs_mib": (peak - baseline) / MIB,
        "grad_mib": grads / MIB,
        "peak_beyond_inputs_and_grads_mib": (peak - baseline - grads) / MIB,
        "inputs_mib": tensor_bytes(case.inputs) / MIB,
    }


def _start(module_path, factory: str, kwargs: dict, warmup_kwargs: dict | None) -> subprocess.Popen:
    command = [sys.executable, os.path.abspath(__file__), "--memory", os.fspath(module_path), factory,
               json.dumps(kwargs), json.dumps(warmup_kwargs)]
    if os.path.exists("/bin/sh"):
        # Linux carries a process's high-water mark across exec: a child exec'd straight from this (large)
        # process starts with ru_maxrss = our resident size. A shell that forks the child (no exec: a command
        # follows) gives it a fresh high-water mark that starts at the shell's few MiB.
        command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _collect(process: subprocess.Popen, timeout: float | None) -> dict:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if process.returncode != 0 or not lines:
        tail = (stderr or stdout).strip().splitlines()[-5:]
        return {"error": f"exit {process.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def peak_memory(module_path: str | os.PathLike, factory: str, kwargs: dict, *, warmup_kwargs: dict | None = None,
                timeout: float | None = 900.0) -> dict:
    """Peak memory of one run of ``module.factory(**kwargs)`` (a :class:`Case`), measured in a fresh subprocess
    as described in the module docstring. ``kwargs`` must be JSON-serialisable; ``warmup_kwargs`` build the tiny
    warm-up case (None: no warm-up). Returns the child's dict (sizes in MiB), or ``{"error": ...}``."""
    return _collect(_start(module_path, factory, kwargs, warmup_kwargs), timeout)


def peak_memory_many(jobs: list[tuple[str, dict, dict | None]], module_path, factory: str, *, parallel: int = 1,
                     timeout: float | None = 900.0) -> dict[str, dict]:
    """:func:`peak_memory` of several cases, ``parallel`` subprocesses at a time (peak RSS is per process, so
    children side by side do not change each other's numbers, only their speed). ``jobs``: (key, kwargs,
    warmup_kwargs) triples; the result keeps their order."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {key: pool.submit(peak_memory, module_path, factory, kwargs, warmup_kwargs=warmup_kwargs,
                                    timeout=timeout) for key, kwargs, warmup_kwargs in jobs}
        return {key: future.result() for key, future in futures.items()}


def _main() -> None:
    parser = argparse.ArgumentParser(description="fastcache benchmark harness (the memory subprocess)")
    parser.add_argument("--memory", nargs=4, metavar=("MODULE", "FACTORY", "KWARGS", "WARMUP_KWARGS"),
                        required=True)
    args = parser.parse_args()
    module_path, factory, kwargs, warmup_kwargs = args.memory
    result = _measure_in_this_process(module_path, factory, json.loads(kwargs), json.loads(warmup_kwargs))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _main()
