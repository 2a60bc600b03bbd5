"""The autograd Function of the fused contrastive ops (the contrastive loss and the Matryoshka one), and their
graph-free one-pass form.

Both take the op's entry point ``op`` (a module-level function, e.g. fastcache.ops.contrastive.op.loss_and_grads),
its options (a frozen :class:`~fastcache.ops.contrastive.options.ContrastiveOptions`), its keyword settings and
every tensor: ``op(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, need_grad,
**settings) -> (loss, dL/dqueries, dL/ddocs, dL/dall_queries or None)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from fastcache.ops._autograd_guard import refuse_double_backward
from fastcache.ops.contrastive.options import ContrastiveLossAndGrad, ContrastiveOptions

LossAndGrads = Callable[..., tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]]


class PrecomputedGradLoss(torch.autograd.Function):
    """A loss whose forward pass also computes its gradients: ``op(queries, docs, all_queries, guide_queries,
    guide_docs, doc_ids, options, need_grad, **settings)`` returns (loss, dL/dqueries, dL/ddocs, dL/dall_queries or
    None); backward scales them by the incoming gradient. The guides and ids get no gradient (the public functions
    pass the guides detached). First-order only: a backward with ``create_graph=True`` raises.

    The gradients are kept in their inputs' dtypes, but for fp16 inputs in fp32 (twice the memory), cast after the
    incoming gradient is applied: a loss scale (AMP's GradScaler, 2^16 by default) then brings entries far below
    fp16's range (~2e-9 per negative at B=65536) back up instead of finding them flushed to 0, and without one the
    result is the one-pass path's to the bit."""

    @staticmethod
    def forward(ctx, op: LossAndGrads, options: ContrastiveOptions, settings: Mapping, queries: Tensor, docs: Tensor,
                all_queries: Tensor | None, guide_queries: Tensor | None, guide_docs: Tensor | None,
                doc_ids: Tensor | None) -> Tensor:
        need_grad = any(ctx.needs_input_grad[3:6])
        loss, gq, gd, gaq = op(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, need_grad,
                               **settings)
        if need_grad:
            ctx.dtypes = [None if x is None else x.dtype for x in (queries, docs, all_queries)]
            # roofline: grad.autograd_output (the fp32 gradients kept in the inputs' dtype, scaled in backward)
            ctx.save_for_backward(*(None if g is None else g if x.dtype == torch.float16 else g.to(x.dtype)
                                    for g, x in ((gq, queries), (gd, docs), (gaq, all_queries))))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward("fastcache's contrastive op")
        return (None, None, None,
                *(None if g is None else (g * grad_loss.to(g.dtype)).to(dtype)
                  for g, dtype in zip(ctx.saved_tensors, ctx.dtypes)),
                None, None, None)


def one_pass(op: LossAndGrads, options: ContrastiveOptions, settings: Mapping, queries: Tensor, docs: Tensor,
             all_queries: Tensor | None, guide_queries: Tensor | None, guide_docs: Tensor | None,
             doc_ids: Tensor | None) -> ContrastiveLossAndGrad:
    """The loss and its gradients without an autograd graph (what gradient caching consumes): ``op`` with
    need_grad on detached inputs, the gradients cast to the dtypes of the inputs they belong to."""
    inputs = [t.detach() if isinstance(t, Tensor) else t
              for t in (queries, docs, all_queries, guide_queries, guide_docs, doc_ids)]
    with torch.no_grad():
        loss, gq, gd, gaq = op(*inputs, options, True, **settings)

    def like(grad: Tensor, x: Tensor) -> Tensor:
        return grad if grad.dtype == x.dtype else grad.to(x.dtype)

    return ContrastiveLossAndGrad(loss, like(gq, queries), like(gd, docs),
                                  None if gaq is None else like(gaq, all_queries))
