"""The loss layer's reading of numeric arguments: what sentence-transformers accepts, the ops get as Python numbers.

sentence-transformers uses its arguments in tensor arithmetic, so a NumPy scalar or a one-element tensor works
there as well as a Python number; fastcache's op option classes take Python ints and floats. These helpers convert
at the loss layer, and say when a value has no op form (the loss then keeps the upstream maths).
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor


def as_float(value) -> float | None:
    """``value`` as a Python float: a Python or NumPy real number, or a one-element real tensor that requires no
    gradient; None for anything else (a tensor that requires grad: upstream trains it)."""
    if isinstance(value, Tensor):
        return None if value.numel() != 1 or value.requires_grad or value.is_complex() else float(value)
    return float(value) if isinstance(value, numbers.Real) else None


def finite_float(value) -> float | None:
    """:func:`as_float`, None unless finite."""
    number = as_float(value)
    return number if number is not None and math.isfinite(number) else None


def positive_float(value) -> float | None:
    """:func:`as_float`, None unless finite and positive."""
    number = finite_float(value)
    return number if number is not None and number > 0 else None


def describe(name: str, value) -> str:
    """``name=value`` as the user passed it, for an error message (a tensor as its number and grad flag)."""
    if isinstance(value, Tensor) and value.numel() == 1:
        return f"{name}=tensor({value.item()!r}{', requires_grad=True' if value.requires_grad else ''})"
    return f"{name}={value!r}"
