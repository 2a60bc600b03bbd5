"""What was built, and which backend runs an op.

Backends: ``cpu`` (the compiled C++ kernels of ``fastcache._C``), ``torch`` (pure PyTorch, runs anywhere),
``cuda`` (compiled CUDA kernels) and ``triton`` (Triton kernels: CUDA tensors, or CPU tensors through the Triton
interpreter when ``TRITON_INTERPRET=1`` is set). ``FASTCACHE_BACKEND`` (auto | torch | cpu | cuda | triton) or an
op's ``backend=`` argument overrides the automatic choice; a choice that cannot run is an error, never a silent
fallback. ``FASTCACHE_STRATEGY`` (auto | slab | tiled) or an op's ``strategy=`` argument picks the algorithm.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
STRATEGIES = ("auto", "slab", "tiled")
DEFAULT_MEMORY_BUDGET = 256 * 2**20


def _load_extension():
    try:
        from fastcache import _C
    except ImportError as error:  # not compiled, or compiled against another torch
        return None, f"{type(error).__name__}: {error}"
    return _C, None


EXTENSION, EXTENSION_ERROR = _load_extension()


@functools.cache
def triton_version() -> str | None:
    """Triton's version, None when it is not installed (asked once: a failed import costs ~20 us per call)."""
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def _requested(argument: str | None, variable: str, choices: tuple[str, ...], what: str) -> str:
    """The argument, else the environment variable, else ``auto``; validated against ``choices``."""
    name = (argument if argument is not None else os.environ.get(variable, "auto")).strip().lower()
    if name not in choices:
        source = what if argument is not None else variable
        raise ValueError(f"{source} must be one of {', '.join(choices)}; got {name!r}")
    return name


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for: the ``backend`` argument, else ``FASTCACHE_BACKEND``, else ``auto``."""
    return _requested(backend, "FASTCACHE_BACKEND", BACKENDS, "backend")


def requested_strategy(strategy: str | None = None) -> str:
    """The strategy asked for: the ``strategy`` argument, else ``FASTCACHE_STRATEGY``, else ``auto``."""
    return _requested(strategy, "FASTCACHE_STRATEGY", STRATEGIES, "strategy")


def resolve_backend(device: torch.device, available: Mapping[str, str | None], backend: str | None = None) -> str:
    """Pick the backend for tensors on ``device``.

    ``available`` maps each backend an op implements to ``None`` when it can run here, or to the reason it
    cannot. ``auto`` takes the first runnable entry for the device type; an explicit choice that cannot run
    raises a RuntimeError that says why.
    """
    name = requested_backend(backend)
    if name == "auto":
        preference = ("cpu", "torch") if device.type == "cpu" else ("cuda", "triton", "torch")
        for candidate in preference:
            if candidate in available and available[candidate] is None:
                return candidate
        return "torch"
    if name not in available:
        raise RuntimeError(f"backend {name!r} is not implemented for this op; implemented: {', '.join(available)}")
    if available[name] is not None:
        raise RuntimeError(f"backend {name!r} cannot run here: {available[name]}")
    return name


def cpu_kernel_status(device: torch.device) -> str | None:
    """None when the compiled CPU kernels can run tensors on ``device``, else why not."""
    if EXTENSION is None:
        return f"the compiled extension fastcache._C is not available ({EXTENSION_ERROR})"
    if device.type != "cpu":
        return f"the compiled CPU kernels run CPU tensors, got tensors on {device}"
    return None


def triton_kernel_status(device: torch.device) -> str | None:
    """None when Triton kernels can run tensors on ``device`` (CUDA, or CPU under ``TRITON_INTERPRET=1``),
    else why not."""
    if triton_version() is None:
        return "triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton kernels run CUDA tensors, or CPU tensors only through the interpreter (TRITON_INTERPRET=1)"
        import triton.language

        if type(triton.language.zeros).__name__ != "InterpretedFunction":
            return ("TRITON_INTERPRET=1 was set after triton was imported: Triton's own functions were compiled "
                    "for the GPU; set it before the first import of triton")
        return None
    return f"Triton kernels run CUDA tensors, got tensors on {device}"


def cuda_kernel_status(device: torch.device, function: str) -> str | None:
    """None when the compiled CUDA kernel ``function`` of fastcache._C can run tensors on ``device``, else why not."""
    if EXTENSION is None:
        return f"the compiled extension fastcache._C is not available ({EXTENSION_ERROR})"
    if not hasattr(EXTENSION, function):
        return f"fastcache._C was built without CUDA kernels (no {function}; needs torch with CUDA and nvcc)"
    if device.type != "cuda":
        return f"the compiled CUDA kernels run CUDA tensors, got tensors on {device}"
    return None


def parse_bytes(text: str, name: str = "FASTCACHE_MEMORY_BUDGET") -> int:
    """'268435456', '256MiB', '256MB', '1.5GiB', '512k' -> bytes (binary units for K/M/G/T with or without 'i')."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*", text.lower())
    if not match:
        raise ValueError(f"{name} must be a size such as 268435456, 256MiB or 1GiB; got {text!r}")
    number, unit = float(match.group(1)), match.group(2)
    return int(number * 1024 ** " kmgt".index(unit or " "))


def memory_budget(budget: int | None = None) -> int:
    """The workspace budget in bytes: the argument, else ``FASTCACHE_MEMORY_BUDGET``, else 256 MiB."""
    if budget is None:
        env = os.environ.get("FASTCACHE_MEMORY_BUDGET")
        budget = parse_bytes(env) if env else DEFAULT_MEMORY_BUDGET
    if isinstance(budget, bool) or not isinstance(budget, int) or budget <= 0:
        raise ValueError(f"memory_budget must be a positive number of bytes; got {budget!r}")
    return budget
