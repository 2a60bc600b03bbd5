"""The benchmark harness lives in the package, ``fastcache/harness.py`` (``fastcache bench`` and ``fastcache train``
use it too); the scripts in bench/ import it from here as ``harness``."""

from fastcache.harness import (  # noqa: F401 - re-exported for the bench scripts
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
