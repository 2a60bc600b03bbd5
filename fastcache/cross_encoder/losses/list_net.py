"""ListNetLoss (cross-encoder) through :func:`fastcache.ops.ranking.listnet`."""

from __future__ import annotations

from sentence_transformers.cross_encoder.losses import list_net as st_list_net
from torch import Tensor

from fastcache.cross_encoder.losses.listwise import ListwiseLossMixin
from fastcache.losses.arguments import changed_modules
from fastcache.ops.ranking import listnet


class ListNetLoss(ListwiseLossMixin, st_list_net.ListNetLoss):
    """sentence-transformers' ListNetLoss (same arguments and results), fused; keyword ``cache_gradients=True``
    adds gradient caching."""

    def unfused_reason(self) -> str | None:
        return changed_modules(self, "cross_entropy_loss")  # replaced or reconfigured after construction

    def ranking_loss(self, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        return listnet(logits, labels, mask)
