"""What was built, and which backend runs an op.

Backends: ``cpu`` (the compiled C++ kernels of ``fastcache._C``), ``torch`` (pure PyTorch, runs anywhere),
``cuda`` (compiled CUDA kernels) and ``triton`` (Triton kernels: CUDA tensors, or CPU tensors through the Triton
interpreter when ``TRITON_INTERPRET=1`` is set). ``FASTCACHE_BACKEND`` (auto | torch | cpu | cuda | triton) or an
op's ``backend=`` argument overrides the automatic choice; a choice that cannot run is an error, never a silent
fallback. ``FASTCACHE_STRATEGY`` (auto | slab | tiled | fused_slab | sparse) or an op's ``strategy=`` argument picks the
algorithm.

Sizes (``FASTCACHE_MEMORY_BUDGET`` / ``memory_budget=``, ``FASTCACHE_MINI_BATCH_BUDGET`` /
``mini_batch_memory_budget=``) follow one rule, :func:`parse_size`: an int number of bytes, or a string such as
``268435456``, ``64MiB`` or ``1.5GiB``, from the argument or the variable alike; zero, negative or fractional-byte
values are rejected with a message that shows what was written. :func:`setting_errors` checks every variable at
once, for commands that must refuse bad settings before doing any work.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from fractions import Fraction

import torch

BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
STRATEGIES = ("auto", "slab", "tiled", "fused_slab", "sparse")
# the strategies that run one backend's kernels only: that backend, and what its kernels are (for messages)
STRATEGY_BACKENDS = {"tiled": ("triton", "Triton kernels"), "fused_slab": ("triton", "Triton kernels"),
                     "sparse": ("cpu", "the compiled CPU products")}
DEFAULT_MEMORY_BUDGET = 256 * 2**20
SETTINGS = ("FASTCACHE_BACKEND", "FASTCACHE_STRATEGY", "FASTCACHE_MEMORY_BUDGET", "FASTCACHE_MINI_BATCH_BUDGET")


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
    """The argument, else the environment variable (unset or empty: ``auto``); validated against ``choices``."""
    source = what if argument is not None else variable
    value = argument if argument is not None else (os.environ.get(variable, "").strip() or "auto")
    if not isinstance(value, str):
        raise ValueError(f"{source} must be one of {', '.join(choices)} (a string); got {value!r} "
                         f"({type(value).__name__})")
    name = value.strip().lower()
    if name not in choices:
        raise ValueError(f"{source} must be one of {', '.join(choices)}; got {value!r}")
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


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b?)\s*")


def parse_size(value: int | str, name: str, default_of: str | None = None) -> int:
    """A positive whole number of bytes from an int or a string: '268435456', '256MiB', '256MB', '1.5GiB', '512k'
    (K/M/G/T are binary units, with or without 'i' and 'B'). ``name`` (the argument, or the variable that sets the
    default of the argument ``default_of``) starts the error message, which shows ``value`` as written."""
    if default_of is None:
        expected = f"{name} must be a positive number of bytes (a whole number: an int, or a string such as '256MiB')"
    else:
        expected = (f"{name} must be a size such as 268435456, 256MiB or 1.5GiB (a positive whole number of bytes; it "
                    f"sets the default of {default_of}=)")
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"{expected}; got {value!r} ({type(value).__name__})")
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value.lower())
        if not match:
            raise ValueError(f"{expected}; got {value!r}")
        exact = Fraction(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " ")
        if exact.denominator != 1:
            raise ValueError(f"{expected}; got {value!r} ({float(exact):g} bytes: not a whole number)")
        size = int(exact)
    if size <= 0:
        raise ValueError(f"{expected}; got {value!r}")
    return size


def size_setting(argument: int | str | None, what: str, variable: str, default: int) -> int:
    """Bytes from the argument (named ``what``), else the environment ``variable`` (unset or empty: ``default``),
    by :func:`parse_size`."""
    if argument is not None:
        return parse_size(argument, what)
    text = os.environ.get(variable, "")
    return parse_size(text, variable, default_of=what) if text.strip() else default


def memory_budget(budget: int | str | None = None) -> int:
    """The workspace budget in bytes: the argument, else ``FASTCACHE_MEMORY_BUDGET``, else 256 MiB."""
    return size_setting(budget, "memory_budget", "FASTCACHE_MEMORY_BUDGET", DEFAULT_MEMORY_BUDGET)


def setting_errors() -> dict[str, str]:
    """Each FASTCACHE_* variable of :data:`SETTINGS` that is set to a value its reader would reject, with the
    reader's one-line message (empty when all are valid; which backend can run is :func:`resolve_backend`'s
    question)."""
    checks = {"FASTCACHE_BACKEND": requested_backend, "FASTCACHE_STRATEGY": requested_strategy,
              "FASTCACHE_MEMORY_BUDGET": memory_budget,
              "FASTCACHE_MINI_BATCH_BUDGET": lambda: size_setting(None, "mini_batch_memory_budget",
                                                                  "FASTCACHE_MINI_BATCH_BUDGET", 1)}
    errors = {}
    for variable, check in checks.items():
        if not os.environ.get(variable, "").strip():
            continue
        try:
            check()
        except ValueError as error:
            errors[variable] = str(error)
    return errors
