"""The benchmark harness lives in the package, ``fastcache/app/harness.py`` (``fastcache bench`` and ``fastcache train``
use it too); the scripts in bench/ import it from here as ``harness``, with what only those scripts share: their
common command-line options and the busy-machine warning."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fastcache.app.harness import (  # noqa: F401 - re-exported for the bench scripts
    MIB,
    Case,
    RunOutput,
    Timing,
    peak_memory,
    peak_memory_many,
    tensor_bytes,
    time_case,
    time_cases,
)


def add_table_arguments(parser: argparse.ArgumentParser, *, quick: str, default_out: Path, repeats_default=3,
                        repeats_help: str = "timed runs per case (the table shows the minimum)",
                        memory_help: str = "skip the peak-memory subprocesses") -> None:
    """The options of the table scripts: --quick (``quick`` says what it runs), --out (``default_out`` for the full
    run), --repeats, --warmup, --no-memory and --parallel (memory subprocesses at once)."""
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=None,
                        help=f"JSON results (default: {default_out.relative_to(Path(__file__).resolve().parents[1])} "
                             "for the full run, none for --quick)")
    parser.add_argument("--repeats", type=int, default=repeats_default, help=repeats_help)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs per case before timing")
    parser.add_argument("--no-memory", action="store_true", help=memory_help)
    parser.add_argument("--parallel", type=int, default=2,
                        help="memory subprocesses at once (after all timing is done; default 2)")


def load_at_start() -> tuple[float, float, float]:
    """The load averages now, with a warning on stderr when the last minute's says other processes use the CPU."""
    load = os.getloadavg()
    if load[0] > 0.5:
        print(f"warning: 1-minute load average {load[0]:.2f} before the run: other processes use the CPU, so the "
              "timings will be noisy", file=sys.stderr)
    return load


def print_targets(found: list[dict], quick: bool) -> None:
    """The targets a table script checked (dicts with "target", "value", "met", optionally "within_noise"), one line
    each; none: nothing."""
    if not found:
        return
    print("\nTargets" + (" (quick settings: indicative only)" if quick else "") + ":")
    for item in found:
        verdict = "met" if item["met"] else "NOT MET"
        if item.get("within_noise"):
            verdict += ", within the run-to-run spread"
        print(f"- [{verdict}] {item['target']}: {item['value']}")
