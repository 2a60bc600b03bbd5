"""Gradient caching (GradCache, https://arxiv.org/abs/2101.06983) for fastcache's cached losses.

    (1) embed every mini-batch without an autograd graph, snapshotting the RNG state of each;
    (2) compute the loss and every embedding's gradient in one fused pass (fastcache's op), caching the gradients;
    (3) in a hook on the returned loss, replay each mini-batch with its RNG state and back-propagate its cached
        gradient, scaled by the incoming gradient (so gradient accumulation and AMP loss scaling reach it).

Only one mini-batch of activations is alive at a time. This is sentence-transformers' engine (its mini-batch
splitting, token budgets, RNG replay and model calls are reused) with one change for multi-GPU training: under
DistributedDataParallel the replays run under ``no_sync`` and the accumulated gradients are all-reduced once
per step, instead of once per mini-batch of every column.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
from sentence_transformers.base.losses.gradcache import _minibatch_ranges
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

_BUCKET_BYTES = 64 * 2**20  # gradients all-reduced together, like DDP's buckets


def all_reduce_gradients(model: torch.nn.Module) -> None:
    """Average every parameter gradient over the ranks, in flat buckets of one dtype (as DDP's reducer does)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    world = dist.get_world_size()
    start = 0
    while start < len(grads):
        end, size = start, 0
        while end < len(grads) and grads[end].dtype == grads[start].dtype and size < _BUCKET_BYTES:
            size += grads[end].numel() * grads[end].element_size()
            end += 1
        bucket = grads[start:end]
        flat = torch.cat([g.reshape(-1) for g in bucket])
        dist.all_reduce(flat)
        flat.div_(world)
        for g, averaged in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(averaged.view_as(g))
        start = end


def _syncs_once(model) -> bool:
    """Whether ``model`` is a DDP module that would all-reduce in this backward pass (not inside no_sync)."""
    return isinstance(model, DistributedDataParallel) and model.require_backward_grad_sync


def replay_backward_hook(grad_output: Tensor, sentence_features, loss_obj, cache, random_states, ranges) -> None:
    """Step (3): re-embed each mini-batch with gradients and back-propagate its cached gradient · grad_output.

    The cache, RNG states and mini-batch ranges belong to one forward pass (passed in, not read off the loss), so
    a second forward before this backward cannot mix them up. Under DDP the replays skip DDP's per-backward
    all-reduce; the gradients are averaged once at the end.
    """
    model = loss_obj.model
    sync_once = _syncs_once(model)
    with torch.enable_grad(), model.no_sync() if sync_once else nullcontext():
        for features, grads, states, column_ranges in zip(sentence_features, cache, random_states, ranges):
            replays = loss_obj.embed_minibatch_iter(sentence_feature=features, with_grad=True,
                                                    copy_random_state=False, random_states=states,
                                                    ranges=column_ranges)
            for (reps, *_), grad in zip(replays, grads):
                if not reps.requires_grad:  # e.g. a frozen Router route; a later mini-batch may still need it
                    continue
                # under autocast the cache is low precision while the replay (outside autocast) is fp32
                surrogate = torch.dot(reps.flatten().float(), grad.flatten().float()) * grad_output
                surrogate.backward()
    if sync_once:
        all_reduce_gradients(model)


class FusedGradCacheMixin:
    """``forward_cached`` for a loss built on sentence-transformers' CachedLossMixin (it provides
    ``embed_minibatch_iter``, ``mini_batch_size``, ``mini_batch_num_tokens``) whose ``calculate_loss`` is fused.

    Losses whose ``embed_minibatch_iter`` yields extra per-mini-batch outputs between the embeddings and the RNG
    state (CachedGISTEmbedLoss: the guide's embeddings) get them, concatenated per column, as the second argument
    of ``calculate_loss`` instead of the labels. With ``mask_duplicates`` (fastcache.losses), the candidates'
    duplicate ids, computed from the token ids, reach ``calculate_loss`` as ``doc_ids``.
    """

    def forward_cached(self, sentence_features, labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        grad_enabled = torch.is_grad_enabled()
        # the replay must use step (1)'s boundaries: modules may edit the features in place while embedding
        ranges = [_minibatch_ranges(f, self.mini_batch_size, self.mini_batch_num_tokens) for f in sentence_features]
        reps, extras, random_states = [], [], []
        for features, column_ranges in zip(sentence_features, ranges):
            column_reps, column_extras, column_states = [], [], []
            for reps_mb, *extra, state in self.embed_minibatch_iter(sentence_feature=features, with_grad=False,
                                                                     copy_random_state=grad_enabled,
                                                                     ranges=column_ranges):
                column_reps.append(reps_mb.detach().requires_grad_())
                column_extras.append([e.detach() for e in extra])
                column_states.append(state)
            reps.append(column_reps)
            extras.append(column_extras)
            random_states.append(column_states)
        second = labels
        if extras and extras[0] and extras[0][0]:  # e.g. the guide's embeddings: one list of mini-batches a column
            second = [[mb[0] for mb in column] for column in extras]
        doc_ids = self.duplicate_ids(sentence_features) if getattr(self, "mask_duplicates", False) else None
        extra = {} if doc_ids is None else {"doc_ids": doc_ids}
        if not grad_enabled:  # evaluation: no gradients to cache, no backward to hook into
            return self.calculate_loss(reps, second, **extra)
        loss = self.calculate_loss(reps, second, with_backward=True, **extra).detach().requires_grad_()
        cache = [[r.grad for r in column] for column in reps]
        unused = [str(i) for i, column in enumerate(cache) if any(g is None for g in column)]
        if unused:
            raise ValueError(f"The loss computation of {type(self).__name__} did not use input column(s) "
                             f"{', '.join(unused)}: their embeddings received no gradient. Remove the unused "
                             "column(s) from the dataset.")
        loss.register_hook(partial(replay_backward_hook, sentence_features=sentence_features, loss_obj=self,
                                   cache=cache, random_states=random_states, ranges=ranges))
        return loss
