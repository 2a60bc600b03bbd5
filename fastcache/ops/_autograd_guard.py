"""Clear errors where a fused op's autograd Function cannot follow PyTorch, instead of a silent wrong gradient.

fastcache's Functions compute dL/dinputs inside their fused forward and their backward only scales that saved
tensor by the incoming gradient. So they are first-order only: a backward with ``create_graph=True`` would return a
gradient with no graph behind it (a gradient penalty built on it would silently be constant), and they are not
written for torch.func transforms (vmap, grad, jacrev, ...: PyTorch would stop with "must override the
setup_context staticmethod", or earlier on data-dependent checks). They also read values (``.item()``, ``.any()``)
to validate inputs, which meta tensors do not have.

API (each ``op`` is the public name used in the message, e.g. "fastcache.ops.ranking.lambda_loss"):

* :func:`refuse_functorch` ``(op)`` - call first in the public function, before any input check: raises
  RuntimeError when a torch.func transform is active.
* :func:`refuse_double_backward` ``(op)`` - call first in ``Function.backward``: raises RuntimeError when the
  backward runs with ``create_graph=True`` (PyTorch runs a backward with grad mode on exactly then).
* :func:`check_real_device` ``(name, tensor)`` - raises ValueError when ``tensor`` is on the meta device, naming
  the argument.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _functorch_active() -> bool:
    active = getattr(torch._C, "_are_functorch_transforms_active", None)  # what Function.apply itself consults
    return bool(active()) if active is not None else False


def refuse_functorch(op: str) -> None:
    """RuntimeError when called under a torch.func transform (vmap, grad, jacrev, jvp, ...)."""
    if _functorch_active():
        raise RuntimeError(
            f"{op} does not support torch.func transforms (vmap, grad, jacrev, jvp, ...): its autograd Function "
            "computes the gradient inside its fused forward. Call it on the whole batch (it is batched already) and "
            "take gradients with loss.backward() or torch.autograd.grad.")


def refuse_double_backward(op: str) -> None:
    """RuntimeError when the calling backward runs with create_graph=True (grad mode is on in a backward exactly
    then): the returned gradient would be a constant with no graph behind it."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} does not support double backward (create_graph=True, e.g. a gradient penalty or a Hessian): its "
            "gradient is computed in the fused forward and has no graph behind it, so any second-order term would "
            "silently be 0. Use create_graph=False, or the plain-PyTorch reference (fastcache.reference) for "
            "second-order terms.")


def check_real_device(name: str, tensor: Tensor) -> None:
    """ValueError naming ``name`` when ``tensor`` is a meta tensor (no values to check or compute on)."""
    if isinstance(tensor, Tensor) and tensor.device.type == "meta":
        raise ValueError(f"{name} must be on a real device (cpu or cuda), got meta: the op reads its values")
