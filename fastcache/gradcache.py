"""Gradient caching (GradCache, https://arxiv.org/abs/2101.06983) for fastcache's cached losses.

    (1) embed every mini-batch without an autograd graph, snapshotting the RNG state of each;
    (2) compute the loss and every embedding's gradient in one fused pass (fastcache's op), caching the gradients;
    (3) in a hook on the returned loss, replay each mini-batch with its RNG state and back-propagate its cached
        gradient, scaled by the incoming gradient (so gradient accumulation and AMP loss scaling reach it).

Only one mini-batch of activations is alive at a time. This is sentence-transformers' engine (its mini-batch
splitting, token budgets, RNG replay and model calls are reused) with two additions: under
DistributedDataParallel the replays run under ``no_sync`` and the accumulated gradients are all-reduced once
per step, instead of once per mini-batch of every column; and ``mini_batch_size="auto"`` sizes the mini-batches
from a memory budget (``mini_batch_memory_budget=`` or ``FASTCACHE_MINI_BATCH_BUDGET``, default 2 GiB; bytes or a
size string such as '512MiB', by the same rule as ``FASTCACHE_MEMORY_BUDGET``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import torch
import torch.distributed as dist
from sentence_transformers.base.losses.gradcache import _create_minibatch, _minibatch_ranges
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from fastcache._backend import size_setting

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


DEFAULT_MINI_BATCH_BUDGET = 2 * 2**30  # bytes of activations per mini-batch when mini_batch_size="auto"
_PROBE_ROWS = 8
_SAFETY = 2.0  # peak of a replay (forward + backward) over the activations autograd saves


def saved_activation_bytes(model: torch.nn.Module, features: dict[str, Tensor]) -> int:
    """Bytes that autograd saves for backward in one forward of ``features`` (distinct storages, parameters
    excluded): the activation memory a mini-batch holds during its replay. The RNG is left as it was."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    devices = [features_tensor.device for features_tensor in features.values() if isinstance(features_tensor, Tensor)]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.enable_grad(), \
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(features)
    return sum(saved.values())


def mini_batch_budget(budget: int | str | None = None) -> int:
    """Bytes of activations per mini-batch for ``mini_batch_size="auto"``: the argument, else
    ``FASTCACHE_MINI_BATCH_BUDGET``, else 2 GiB; an int or a size string such as '512MiB'
    (fastcache._backend.parse_size: zero, negative and fractional-byte values are errors)."""
    return size_setting(budget, "mini_batch_memory_budget", "FASTCACHE_MINI_BATCH_BUDGET", DEFAULT_MINI_BATCH_BUDGET)


class AutoMiniBatch:
    """``mini_batch_size="auto"``: the largest mini-batch whose replay fits ``budget`` bytes of activations.

    The activations of a few rows are measured (autograd's saved tensors, times a safety factor for the backward's
    transients) at the longest padded length seen so far, and re-measured when a batch is longer; a mini-batch of
    L tokens per row is then assumed to cost that per-row measurement scaled by L / (measured length), an
    overestimate for shorter rows (attention is quadratic in the length).
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.length = 0
        self.bytes_per_row = 0.0

    def size(self, model: torch.nn.Module, features: dict[str, Tensor]) -> int:
        rows, length = features["input_ids"].shape[:2]
        if length > self.length:
            probe = _create_minibatch(features, 0, min(_PROBE_ROWS, rows))
            probe_rows = probe["input_ids"].size(0)
            self.bytes_per_row = _SAFETY * saved_activation_bytes(model, probe) / probe_rows
            self.length = probe["input_ids"].size(1)
        per_row = self.bytes_per_row * length / max(self.length, 1)
        return int(min(rows, max(1, self.budget // max(per_row, 1.0))))


class FusedGradCacheMixin:
    """``forward_cached`` for a loss built on sentence-transformers' CachedLossMixin (it provides
    ``embed_minibatch_iter``, ``mini_batch_size``, ``mini_batch_num_tokens``) whose loss stage is fused.

    What the loss tells the engine, through methods, not attributes: :meth:`unfused_reason` (``mini_batch_size=
    "auto"`` needs the fused loss stage), and :meth:`loss_stage_keywords` (keywords for the loss stage computed from
    the batch's inputs, e.g. fastcache.losses' duplicate ids ``doc_ids``). The loss stage is ``calculate_loss``, or
    the one :meth:`forward_cached` is given (fastcache's MatryoshkaLoss gives its op to the inner loss's).

    Losses whose ``embed_minibatch_iter`` yields extra per-mini-batch outputs between the embeddings and the RNG
    state (CachedGISTEmbedLoss: the guide's embeddings) get them, concatenated per column, as the second argument
    of the loss stage instead of the labels.
    """

    def __init__(self, *args, mini_batch_memory_budget: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        size = self.mini_batch_size
        if size != "auto" and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
            raise ValueError(f"mini_batch_size must be a positive int or 'auto', got {size!r}")
        reason = self.unfused_reason() if size == "auto" else None
        if reason is not None:
            raise ValueError(f"mini_batch_size='auto' needs the fused loss, and {reason}")
        budget = DEFAULT_MINI_BATCH_BUDGET
        if mini_batch_memory_budget is not None or size == "auto":  # the variable matters only to "auto"
            budget = mini_batch_budget(mini_batch_memory_budget)
        self.auto_mini_batch = AutoMiniBatch(budget)

    def unfused_reason(self) -> str | None:
        """Why the loss stage has no fused form, naming the argument; None when it has one. The loss implements it."""
        raise NotImplementedError

    def loss_stage_keywords(self, sentence_features: list[dict[str, Tensor]]) -> dict:
        """Keywords for the loss stage computed from the batch's inputs before embedding; none by default."""
        return {}

    def _ranges(self, features: dict[str, Tensor]) -> list[tuple[int, int]]:
        """The mini-batches of one column: upstream's (by size or token budget), or sized from the memory budget."""
        if self.mini_batch_size != "auto" or self.mini_batch_num_tokens is not None:
            return _minibatch_ranges(features, self.mini_batch_size, self.mini_batch_num_tokens)
        model = self.model.module if isinstance(self.model, DistributedDataParallel) else self.model
        size = self.auto_mini_batch.size(model, features)
        rows = features["input_ids"].size(0)
        return [(begin, min(begin + size, rows)) for begin in range(0, rows, size)]

    def forward_cached(self, sentence_features, labels: Tensor | None = None,
                       loss_stage: Callable[..., Tensor] | None = None) -> Tensor:
        """GradCache's forward: ``loss_stage(reps, labels or extras, with_backward=..., **loss_stage_keywords)``,
        by default ``self.calculate_loss``, computes the loss of the mini-batch embeddings ``reps``."""
        loss_stage = self.calculate_loss if loss_stage is None else loss_stage
        sentence_features = list(sentence_features)
        grad_enabled = torch.is_grad_enabled()
        # the replay must use step (1)'s boundaries: modules may edit the features in place while embedding
        ranges = [self._ranges(features) for features in sentence_features]
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
        extra = self.loss_stage_keywords(sentence_features)
        if not grad_enabled:  # evaluation: no gradients to cache, no backward to hook into
            return loss_stage(reps, second, **extra)
        loss = loss_stage(reps, second, with_backward=True, **extra).detach().requires_grad_()
        cache = [[r.grad for r in column] for column in reps]
        unused = [str(i) for i, column in enumerate(cache) if any(g is None for g in column)]
        if unused:
            raise ValueError(f"The loss computation of {type(self).__name__} did not use input column(s) "
                             f"{', '.join(unused)}: their embeddings received no gradient. Remove the unused "
                             "column(s) from the dataset.")
        loss.register_hook(partial(replay_backward_hook, sentence_features=sentence_features, loss_obj=self,
                                   cache=cache, random_states=random_states, ranges=ranges))
        return loss
