"""The loss layer's reading of numeric arguments: what sentence-transformers accepts, the ops get as Python numbers.

sentence-transformers uses its arguments in tensor arithmetic, so a NumPy scalar or a one-element tensor works
there as well as a Python number; fastcache's op option classes take Python ints and floats. These helpers convert
at the loss layer, and say when a value has no op form (the loss then keeps the upstream maths).
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor, nn


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


def _settings(module: nn.Module) -> dict:
    return {key: value for key, value in vars(module).items() if not key.startswith("_") and key != "training"}


def changed_module(loss: nn.Module, name: str, default: nn.Module) -> str | None:
    """Why ``loss.<name>`` does not compute what ``default`` (the module upstream's constructor sets, whose maths
    the fused op has) computes, naming it: replaced or reconfigured on the instance after construction, or given
    parameters, buffers or hooks; None when it is unchanged. The loss then keeps the upstream maths, which call it."""
    module = getattr(loss, name, None)
    if (type(module) is type(default) and _settings(module) == _settings(default)
            and not any(True for _ in module.parameters()) and not any(True for _ in module.buffers())
            and not (module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                     or module._backward_pre_hooks)):
        return None
    if isinstance(module, nn.Module):
        shown = ", ".join(f"{key}={value!r}" for key, value in _settings(module).items())
        shown = f"{type(module).__name__}({shown})"
    else:
        shown = repr(module)
    return f"{name}={shown} is not {default!r} with its defaults, which the fused op computes"


# The modules sentence-transformers' constructors set, whose maths the fused ops compute (never modified).
UPSTREAM_MODULES = {"similarity_fct": nn.CosineSimilarity(dim=-1), "cross_entropy_loss": nn.CrossEntropyLoss()}


def changed_modules(loss: nn.Module, *names: str) -> str | None:
    """The first :func:`changed_module` reason among the attributes ``names`` (keys of UPSTREAM_MODULES)."""
    return next((reason for name in names if (reason := changed_module(loss, name, UPSTREAM_MODULES[name]))), None)

