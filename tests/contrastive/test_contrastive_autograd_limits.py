"""The contrastive and Matryoshka ops are first-order autograd Functions: what they cannot do raises a clear error
instead of a silently wrong gradient (issue 17, items 2 and 10).

- ``torch.autograd.grad(loss, q, create_graph=True)`` used to return a gradient with no graph behind it, so a
  gradient penalty on it silently changed nothing; now the backward raises.
- ``torch.func`` transforms (vmap, grad) used to end in PyTorch's "must override the setup_context staticmethod";
  now the op names itself and says what to do.
- Meta tensors used to end in "Tensor.item() cannot be called on meta tensors"; now the argument is named.
"""

from __future__ import annotations

import pytest
import torch

from fastcache import contrastive_loss
from fastcache.ops.matryoshka import matryoshka_contrastive_loss

OPS = {"contrastive": lambda q, d, **kw: contrastive_loss(q, d, **kw),
       "matryoshka": lambda q, d, **kw: matryoshka_contrastive_loss(q, d, dims=[6, 3], **kw)}


def batch():
    gen = torch.Generator().manual_seed(17)
    return torch.randn(4, 6, generator=gen, requires_grad=True), torch.randn(8, 6, generator=gen, requires_grad=True)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_double_backward_raises(op, backend):
    q, d = batch()
    loss = OPS[op](q, d, backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, q, create_graph=True)


@pytest.mark.parametrize("op", OPS)
def test_first_order_backward_still_works(op):
    """The check runs in every backward: without create_graph it must not fire (loss.backward(), and
    autograd.grad with retain_graph)."""
    q, d = batch()
    loss = OPS[op](q, d)
    (grad_q,) = torch.autograd.grad(loss, q, retain_graph=True)
    loss.backward()
    assert torch.equal(grad_q, q.grad)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("transform", ["vmap", "grad"])
def test_torch_func_transforms_raise(op, transform):
    q, d = batch()
    q, d = q.detach(), d.detach()
    if transform == "vmap":
        call = lambda: torch.func.vmap(lambda x: OPS[op](x, d))(q.unsqueeze(0).expand(2, -1, -1))  # noqa: E731
    else:
        call = lambda: torch.func.grad(lambda x: OPS[op](x, d))(q)  # noqa: E731
    with pytest.raises(RuntimeError, match="does not support torch.func transforms"):
        call()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("argument", ["queries", "docs"])
def test_meta_tensors_are_named(op, argument):
    q, d = (t.detach() for t in batch())
    q, d = (q.to("meta"), d) if argument == "queries" else (q, d.to("meta"))
    with pytest.raises(ValueError, match=f"{argument} must be on a real device"):
        OPS[op](q, d)
