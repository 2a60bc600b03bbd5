"""The forward pass shared by the listwise cross-encoder losses, with optional gradient caching.

sentence-transformers' listwise losses (LambdaLoss, RankNetLoss, ListMLELoss, PListMLELoss, ListNetLoss) all take
(queries, lists of documents) and a list of label tensors, score every (query, document) pair with the
CrossEncoder in chunks of ``mini_batch_size`` pairs, apply ``activation_fn`` and compute the loss on the padded
[Q, n] score matrix. :class:`ListwiseLossMixin` does the same, computes the loss with a fused op of
:mod:`fastcache.ops.ranking` and, with ``cache_gradients=True``, caches gradients (GradCache):

    (1) score the pairs in mini-batches without an autograd graph, snapshotting the RNG state of each;
    (2) compute the loss and dL/dscore (Q·n numbers) with the fused op;
    (3) in a hook on the returned loss, replay each mini-batch with its RNG state and back-propagate
        dL/dscore · grad_output through it (:func:`fastcache.gradcache.replay_backward_hook`).

Only one mini-batch of activations is alive at a time, however long the lists; loss and gradients equal the
uncached ones (the replay reproduces dropout). Upstream keeps every pair's activations until the backward.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import nullcontext
from functools import partial
from typing import Any

import torch
from sentence_transformers.base.losses.gradcache import RandContext
from sentence_transformers.util import batch_to_device
from torch import Tensor

from fastcache.gradcache import replay_backward_hook


class ListwiseLossMixin:
    """Mix in before a sentence-transformers listwise loss; subclasses define :meth:`ranking_loss`.

    ``cache_gradients`` (keyword, default False): gradient caching as in the module docstring, mini-batches of
    ``mini_batch_size`` pairs (None: as many pairs as there are queries, as upstream)."""

    def __init__(self, *args, cache_gradients: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(cache_gradients, bool):
            raise ValueError(f"cache_gradients must be a bool, got {cache_gradients!r}")
        self.cache_gradients = cache_gradients
        self.check_cache_gradients()

    def unfused_reason(self) -> str | None:
        """Why this configuration has no fused form (the upstream maths runs), naming the argument; None when the
        fused op computes the loss."""
        return None

    @property
    def fused(self) -> bool:
        """Whether the fused op computes the loss (:meth:`unfused_reason` is None)."""
        return self.unfused_reason() is None

    def check_cache_gradients(self) -> None:
        reason = self.unfused_reason() if self.cache_gradients else None
        if reason is not None:
            raise ValueError(f"cache_gradients=True needs the fused loss, and {type(self).__name__}'s {reason}")

    def ranking_loss(self, logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """The loss of padded scores [Q, n] (after ``activation_fn``), labels [Q, n] and the validity mask."""
        raise NotImplementedError

    def embed_minibatch_iter(self, sentence_feature: dict[str, Any], with_grad: bool, copy_random_state: bool,
                             random_states: list | None = None, ranges=None) -> Iterator[tuple[Tensor, Any]]:
        """Score the pairs of ``sentence_feature`` in mini-batches: (scores [b], RNG snapshot or None) each.
        ``with_grad=False`` scores under no_grad; ``random_states`` replays earlier snapshots."""
        pairs, size = sentence_feature["pairs"], sentence_feature["mini_batch_size"]
        for index, begin in enumerate(range(0, len(pairs), size)):
            tokens = self.model.preprocess(pairs[begin:begin + size], prompt=sentence_feature["prompt"],
                                           task=sentence_feature["task"])
            tokens = batch_to_device(tokens, self.model.device)
            replay = nullcontext() if random_states is None else random_states[index]
            with replay, nullcontext() if with_grad else torch.no_grad():
                state = RandContext(*tokens.values()) if copy_random_state else None
                scores = self.model(tokens)["scores"].view(-1)
            yield scores, state

    def listwise_loss(self, scores: Tensor, labels: list[Tensor], docs_per_query: list[int]) -> Tensor:
        """Flat pair scores -> activation -> padded [Q, n] matrices -> the fused loss."""
        scores = self.activation_fn(scores.float())
        device = scores.device
        rows = torch.repeat_interleave(torch.arange(len(docs_per_query), device=device),
                                       torch.tensor(docs_per_query, device=device))
        columns = torch.cat([torch.arange(count, device=device) for count in docs_per_query])
        shape = (len(docs_per_query), max(docs_per_query))
        matrix = scores.new_zeros(shape).index_put((rows, columns), scores)
        mask = torch.zeros(shape, dtype=torch.bool, device=device).index_put_((rows, columns),
                                                                              torch.tensor(True, device=device))
        label_matrix = torch.zeros(shape, dtype=torch.float32, device=device)
        label_matrix[rows, columns] = torch.cat([torch.as_tensor(lbl) for lbl in labels]).float().to(device)
        return self.ranking_loss(matrix, label_matrix, mask)

    def forward(self, inputs: list, labels: list[Tensor], prompt: str | None = None, task: str | None = None) -> Tensor:
        if not self.fused:
            self.check_cache_gradients()
            return super().forward(inputs, labels, prompt=prompt, task=task)
        name = type(self).__name__
        if isinstance(labels, Tensor):
            raise ValueError(f"{name} expects a list of labels for each sample, but got a single value for each "
                             "sample.")
        if len(inputs) != 2:
            raise ValueError(f"{name} expects two inputs (queries, documents_list), but got {len(inputs)} inputs.")
        queries, docs_list = inputs
        docs_per_query = [len(docs) for docs in docs_list]
        if docs_per_query != [len(lbls) for lbls in labels]:
            raise ValueError(f"Number of documents per query in inputs ({docs_per_query}) does not match number of "
                             f"labels per query ({[len(lbls) for lbls in labels]}).")
        pairs = [(query, document) for query, docs in zip(queries, docs_list) for document in docs]
        size = self.mini_batch_size or len(queries)
        features = {"pairs": pairs, "prompt": prompt, "task": task,
                    "mini_batch_size": size if size > 0 else len(pairs)}
        if not (self.cache_gradients and torch.is_grad_enabled()):
            scores = [s for s, _ in self.embed_minibatch_iter(features, with_grad=True, copy_random_state=False)]
            return self.listwise_loss(torch.cat(scores), labels, docs_per_query)
        scored = list(self.embed_minibatch_iter(features, with_grad=False, copy_random_state=True))
        leaves = [scores.detach().requires_grad_() for scores, _ in scored]
        loss = self.listwise_loss(torch.cat(leaves), labels, docs_per_query)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        cache = [[torch.zeros_like(leaf) if g is None else g for leaf, g in zip(leaves, grads)]]
        loss = loss.detach().requires_grad_()
        loss.register_hook(partial(replay_backward_hook, sentence_features=[features], loss_obj=self, cache=cache,
                                   random_states=[[state for _, state in scored]], ranges=[None]))
        return loss
