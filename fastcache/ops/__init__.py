"""fastcache ops: one package per op family (options and checks, strategies, the autograd Function, the public
functions; see each package's docstring), and the ranking ops (ranking.py)."""

from fastcache.ops.contrastive import (
    ContrastiveLossAndGrad,
    ContrastiveOptions,
    contrastive_loss,
    contrastive_loss_and_grad,
)

__all__ = ["ContrastiveLossAndGrad", "ContrastiveOptions", "contrastive_loss", "contrastive_loss_and_grad"]
