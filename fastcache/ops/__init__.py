"""fastcache ops: one file per op family (public function, autograd Function, backend dispatch)."""

from fastcache.ops.contrastive import (
    ContrastiveLossAndGrad,
    ContrastiveOptions,
    contrastive_loss,
    contrastive_loss_and_grad,
)

__all__ = ["ContrastiveLossAndGrad", "ContrastiveOptions", "contrastive_loss", "contrastive_loss_and_grad"]
