"""The one benchmark harness of fastcache: wall-clock timing and peak memory of a benchmark case (used by
``fastcache bench``, ``fastcache train`` and the scripts in bench/, which import it as ``harness``).

A *case* is a :class:`Case`: inputs already allocated, a ``run()`` that does one full unit of work (here: a loss
forward and backward) and returns a :class:`RunOutput` (the loss and the gradient tensors the work produced), and an
optional untimed ``reset()`` called before every run (e.g. to drop the ``.grad`` of leaf tensors).

Timing (:func:`time_case`): ``warmup`` untimed runs, then ``repeats`` timed runs with ``time.perf_counter``; the
minimum and the median in seconds. :func:`time_cases` does the same for several cases, interleaving their timed
runs (A B A B ...) so that cases compared with each other share the machine's drift.

Memory (:func:`peak_memory`): each case runs once in a fresh Python subprocess (``python -m fastcache.app.harness
--memory ...``), so no earlier case leaves memory or a higher peak behind. The child

0. is started through ``/bin/sh`` (which forks it), so that its ``ru_maxrss`` does not start at the parent's
   resident size (Linux keeps the high-water mark across exec);
1. imports, builds the case at a tiny shape and runs it once (loads lazily-initialised libraries, thread pools,
   JIT kernels), then drops it;
2. builds the case at the measured shape, touches every input (reads each tensor), resets the high-water mark to
   the resident size (Linux: ``5`` written to ``/proc/self/clear_refs``) and takes the baseline: the high-water
   mark ``VmHWM`` of ``/proc/self/status`` (``getrusage(RUSAGE_SELF).ru_maxrss`` where the reset is not possible);
3. runs the case once and reads the high-water mark again.

``peak beyond inputs`` is the difference; ``peak beyond inputs and gradients`` subtracts the bytes of the gradient
tensors the run returned (distinct storages counted once), which any implementation must hand back. The rest is
the workspace: similarity blocks, normalised copies, accumulators, temporaries, allocator slack. The high-water mark
is one of the whole process, so without the reset of step 2 a case whose set-up or warm-up had a transient peak
above its steady state (e.g. a training step, whose parameter-sized temporaries do not shrink with the warm-up's
tiny shape) would hide part of its run. The child records whether it could reset (``peak_reset``) and the gap that
is left (``baseline_gap_mib``, the high-water mark minus the resident size at the baseline; near zero after a
reset), so the number can be trusted when the gap is near zero.
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
    return time_cases([case], warmup=warmup, repeats=repeats)[0]


def time_cases(cases: Sequence[Case], *, warmup: int = 1, repeats: int = 3) -> list[tuple[Timing, RunOutput]]:
    """:func:`time_case` of several cases, interleaved: the warm-up runs of every case, then ``repeats`` rounds
    that time each case once in turn (A B A B ...). Cases that do nearly the same work (e.g. two losses in one
    training step) then see the same drift of the machine (clock, other processes), so their difference is not
    a difference of when they ran. Returns (timing, output of the last run) per case, in order."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for case in cases:
        for _ in range(warmup):
            if case.reset is not None:
                case.reset()
            out = case.run()
            del out
    times: list[list[float]] = [[] for _ in cases]
    outputs: list[RunOutput | None] = [None for _ in cases]
    for _ in range(repeats):
        for index, case in enumerate(cases):
            if case.reset is not None:
                case.reset()
            outputs[index] = None
            gc.collect()
            start = time.perf_counter()
            outputs[index] = case.run()
            times[index].append(time.perf_counter() - start)
    return [(Timing(min(t), statistics.median(t), t), out) for t, out in zip(times, outputs)]


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


def _hwm_bytes() -> int | None:
    """The process's high-water mark of resident memory (``VmHWM``), None where /proc/self/status lacks it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the high-water mark to the resident size (Linux >= 4.0); False where that is not possible."""
    if _hwm_bytes() is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


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
    reset = _reset_peak()
    peak_bytes = _hwm_bytes if reset else _maxrss_bytes
    baseline = peak_bytes()
    baseline_gap = baseline - _rss_bytes()
    out = case.run()
    peak = peak_bytes()
    grads = tensor_bytes(out.grads)
    return {
        "case": case.name,
        "baseline_mib": baseline / MIB,
        "baseline_gap_mib": max(0, baseline_gap) / MIB,
        "peak_reset": reset,
        "peak_beyond_inputs_mib": (peak - baseline) / MIB,
        "grad_mib": grads / MIB,
        "peak_beyond_inputs_and_grads_mib": (peak - baseline - grads) / MIB,
        "inputs_mib": tensor_bytes(case.inputs) / MIB,
    }


def _start(module_path, factory: str, kwargs: dict, warmup_kwargs: dict | None,
           env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-m", "fastcache.app.harness", "--memory", os.fspath(module_path), factory,
               json.dumps(kwargs), json.dumps(warmup_kwargs)]
    if os.path.exists("/bin/sh"):
        # Linux carries a process's high-water mark across exec: a child exec'd straight from this (large)
        # process starts with ru_maxrss = our resident size. A shell that forks the child (no exec: a command
        # follows) gives it a fresh high-water mark that starts at the shell's few MiB.
        command = ["/bin/sh", "-c", '"$@"; exit $?', "sh", *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=None if env is None else {**os.environ, **env})


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
                timeout: float | None = 900.0, env: dict[str, str] | None = None) -> dict:
    """Peak memory of one run of ``module.factory(**kwargs)`` (a :class:`Case`), measured in a fresh subprocess
    as described in the module docstring. ``kwargs`` must be JSON-serialisable; ``warmup_kwargs`` build the tiny
    warm-up case (None: no warm-up); ``env``: variables added to the child's environment (e.g. allocator
    settings, which a process reads when it starts). Returns the child's dict (sizes in MiB), or
    ``{"error": ...}``."""
    return _collect(_start(module_path, factory, kwargs, warmup_kwargs, env), timeout)


def peak_memory_many(jobs: list[tuple[str, dict, dict | None]], module_path, factory: str, *, parallel: int = 1,
                     timeout: float | None = 900.0, env: dict[str, str] | None = None) -> dict[str, dict]:
    """:func:`peak_memory` of several cases, ``parallel`` subprocesses at a time (peak RSS is per process, so
    children side by side do not change each other's numbers, only their speed). ``jobs``: (key, kwargs,
    warmup_kwargs) triples; the result keeps their order."""
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        futures = {key: pool.submit(peak_memory, module_path, factory, kwargs, warmup_kwargs=warmup_kwargs,
                                    timeout=timeout, env=env) for key, kwargs, warmup_kwargs in jobs}
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
