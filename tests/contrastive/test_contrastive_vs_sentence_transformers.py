"""fastcache's contrastive op against sentence-transformers' own losses, on the same embeddings.

sentence-transformers 6.0.1 is the oracle: MultipleNegativesRankingLoss.compute_loss_from_embeddings,
CachedMultipleNegativesRankingLoss.calculate_loss and CachedGISTEmbedLoss.calculate_loss are fed random embedding
tensors (leaves with requires_grad), and fastcache.contrastive_loss must give the same loss and the same gradients
w.r.t. those tensors. The tiny models of conftest.py only serve to construct the loss objects.

Gathered layouts (``gather_across_devices=True`` on rank r of a world of W processes) are emulated without
torch.distributed: :class:`FakeWorld` patches ``all_gather_with_grad`` and ``get_rank`` in the loss's module so
that "gathering" returns a fixed world tensor with this rank's local tensor spliced in at rows r·B .. r·B+B-1.
"""

from __future__ import annotations

import itertools
import zlib

import pytest
import torch
from sentence_transformers.sentence_transformer.losses import (
    CachedGISTEmbedLoss,
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses import cached_gist_embed as cached_gist_module
from sentence_transformers.sentence_transformer.losses import (
    cached_multiple_negatives_ranking as cached_mnrl_module,
)
from sentence_transformers.sentence_transformer.losses import multiple_negatives_ranking as mnrl_module
from sentence_transformers.util import cos_sim, dot_score

import fastcache

BACKENDS = ("cpu", "torch")
DTYPES = (torch.float32, torch.float64)
DIM = 16
GUIDE_DIM = 24  # the guide model may embed in another width than the trained model
# (rtol, atol relative to the magnitude of the quantity, see assert_close): fp32 as sentence-transformers computes
# it, fp64 tightly
TOLERANCES = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-10, 1e-12)}
SIMILARITIES = {"cos": (cos_sim, 20.0), "dot": (dot_score, 1.0)}  # similarity -> (upstream function, scale)
HARDNESS = [(None, 0.0), ("in_batch_negatives", 3.0), ("hard_negatives", 5.0), ("all_negatives", 2.0)]


def _direction_configs():
    """Every valid (directions, partition_mode): query_to_doc always, per_direction only without qq / dd."""
    configs = []
    for extra in itertools.product((False, True), repeat=3):
        directions = ("query_to_doc",) + tuple(
            d for d, on in zip(("query_to_query", "doc_to_query", "doc_to_doc"), extra) if on
        )
        for partition_mode in ("joint", "per_direction"):
            if partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(directions):
                continue  # sentence-transformers and fastcache both reject this combination
            configs.append((directions, partition_mode))
    return configs


DIRECTION_CONFIGS = _direction_configs()
_SHORT = {"query_to_doc": "qd", "query_to_query": "qq", "doc_to_query": "dq", "doc_to_doc": "dd"}
DIRECTION_IDS = ["+".join(_SHORT[d] for d in dirs) + f"-{mode}" for dirs, mode in DIRECTION_CONFIGS]


def _generator(*key) -> torch.Generator:
    """A generator seeded from the test's parameters (stable across runs and processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen: torch.Generator, *shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str,
                 magnitude: float) -> None:
    """Elementwise rtol, plus an atol relative to the larger of the largest |expected| entry and ``magnitude``,
    the natural size of the quantity: a loss is a difference of log-partitions of size |logit|max (a loss near 0
    is that difference after cancellation), and a gradient entry is of size |logit|max / (B·‖x‖)."""
    rtol, atol_rel = TOLERANCES[dtype]
    atol = atol_rel * max(float(expected.detach().abs().max()), magnitude)
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(), rtol=rtol, atol=atol,
                               msg=lambda m: f"{what}: {m}")


class FakeWorld:
    """Rank ``rank`` of a world of ``world_size`` processes with ``batch_size`` rows each, without
    torch.distributed.

    ``world(t)`` registers a [W·B, D] tensor of every rank's rows of one column; ``local(t)`` is this rank's
    slice of it as a fresh leaf. The patched ``all_gather_with_grad(local)`` finds the registered world tensor
    whose local slice equals ``local`` and returns ``splice``: torch.cat of the other ranks' rows (taken from
    the world tensor, itself a leaf, so the gradient this rank's loss sends to the other ranks' embeddings is
    observable too) and ``local`` (so the gradient flows to the local embeddings), exactly the tensor that
    torch.distributed.nn.all_gather would produce on this rank.
    """

    def __init__(self, rank: int, world_size: int, batch_size: int):
        assert 0 <= rank < world_size
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.worlds: list[torch.Tensor] = []

    @property
    def offset(self) -> int:
        return self.rank * self.batch_size

    def world(self, t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        assert t.size(0) == self.world_size * self.batch_size
        t = _leaf(t) if requires_grad else t.detach().clone()
        self.worlds.append(t)
        return t

    def local(self, world: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        piece = world[self.offset:self.offset + self.batch_size]
        return _leaf(piece) if requires_grad else piece.detach().clone()

    def splice(self, world: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        return torch.cat([world[:self.offset], local, world[self.offset + self.batch_size:]])

    def all_gather_with_grad(self, tensor: torch.Tensor) -> torch.Tensor:
        matches = [w for w in self.worlds if w.dtype == tensor.dtype and w.shape[1:] == tensor.shape[1:]
                   and torch.equal(w[self.offset:self.offset + self.batch_size].detach(), tensor.detach())]
        assert len(matches) == 1, f"FakeWorld: {len(matches)} registered world tensors match the gathered one"
        return self.splice(matches[0], tensor)

    def patch(self, monkeypatch, module) -> None:
        """Make ``module`` (a sentence-transformers loss module) gather through this fake world."""
        monkeypatch.setattr(module, "all_gather_with_grad", self.all_gather_with_grad)
        monkeypatch.setattr(module, "get_rank", lambda: self.rank)


def magnitudes(embeddings, similarity: str, scale: float, rows: int, hardness_strength: float = 0.0):
    """(loss magnitude, gradient magnitude) for :func:`assert_close`: the largest |logit| the embeddings can give
    (scale + hardness_strength times the largest |similarity|) and that divided by B·(median row norm)."""
    x = torch.cat([e.detach().double().reshape(-1, e.size(-1)) for e in embeddings])
    norms = x.norm(dim=1)
    s = x / norms[:, None] if similarity == "cos" else x
    logit = (scale + hardness_strength) * float((s @ s.T).abs().max())
    return logit, logit / (rows * float(norms.median()))


def _grads(tensors):
    return [torch.zeros_like(t) if t.grad is None else t.grad for t in tensors]


# ---------------------------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch_size", [1, 5, 12])
@pytest.mark.parametrize("negatives", [0, 1, 2, 3])
@pytest.mark.parametrize("hardness_mode,hardness_strength", HARDNESS, ids=[str(h[0]) for h in HARDNESS])
@pytest.mark.parametrize("directions,partition_mode", DIRECTION_CONFIGS, ids=DIRECTION_IDS)
def test_mnrl_loss_and_grads(tiny_model, directions, partition_mode, hardness_mode, hardness_strength, negatives,
                             batch_size, backend):
    """MultipleNegativesRankingLoss.compute_loss_from_embeddings([queries, pos, neg1, ...]) equals
    contrastive_loss(queries, cat(docs)) in loss and in the gradients w.r.t. every embedding column."""
    for similarity, dtype in itertools.product(SIMILARITIES, DTYPES):
        similarity_fct, scale = SIMILARITIES[similarity]
        gen = _generator("mnrl", directions, partition_mode, hardness_mode, negatives, batch_size, similarity)
        columns = [_randn(gen, batch_size, DIM, dtype=dtype) for _ in range(2 + negatives)]
        upstream_loss = MultipleNegativesRankingLoss(
            tiny_model, scale=scale, similarity_fct=similarity_fct, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        theirs = [_leaf(c) for c in columns]
        expected = upstream_loss.compute_loss_from_embeddings(theirs, labels=None)
        expected.backward()

        ours = [_leaf(c) for c in columns]
        loss = fastcache.contrastive_loss(
            ours[0], torch.cat(ours[1:]), scale=scale, similarity=similarity, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            backend=backend, chunk_size=2 if dtype == torch.float64 else None)
        loss.backward()

        where = f"{similarity} {dtype}"
        loss_size, grad_size = magnitudes(columns, similarity, scale, batch_size, hardness_strength)
        assert loss.dtype == dtype
        assert_close(loss, expected, dtype, f"loss ({where})", loss_size)
        for k, (mine, ref) in enumerate(zip(ours, theirs)):
            assert_close(mine.grad, ref.grad, dtype, f"grad of column {k} ({where})", grad_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mini_batch_size", [1, 3, 8, 64])
@pytest.mark.parametrize(
    "directions,partition_mode,hardness_mode,hardness_strength,negatives",
    [
        (("query_to_doc",), "joint", None, 0.0, 0),
        (("query_to_doc",), "joint", "hard_negatives", 5.0, 2),
        (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives", 3.0, 1),
        (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "all_negatives", 2.0, 2),
        (("query_to_doc", "doc_to_doc"), "joint", None, 0.0, 3),
    ],
)
def test_cached_mnrl_calculate_loss(tiny_model, directions, partition_mode, hardness_mode, hardness_strength,
                                    negatives, mini_batch_size, backend):
    """CachedMultipleNegativesRankingLoss.calculate_loss(reps) on mini-batched reps: the same loss as fastcache
    (with_backward=False), and with_backward=True leaves the same gradients on the reps."""
    batch_size = 10
    for similarity, dtype in itertools.product(SIMILARITIES, DTYPES):
        similarity_fct, scale = SIMILARITIES[similarity]
        gen = _generator("cmnrl", directions, partition_mode, hardness_mode, negatives, similarity)
        columns = [_randn(gen, batch_size, DIM, dtype=dtype) for _ in range(2 + negatives)]
        cached = CachedMultipleNegativesRankingLoss(
            tiny_model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength)
        reps = [[_leaf(piece) for piece in c.split(mini_batch_size)] for c in columns]
        expected = cached.calculate_loss(reps, with_backward=False)
        expected_bw = cached.calculate_loss(reps, with_backward=True)

        ours = [_leaf(c) for c in columns]
        loss = fastcache.contrastive_loss(
            ours[0], torch.cat(ours[1:]), scale=scale, similarity=similarity, directions=directions,
            partition_mode=partition_mode, hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            backend=backend)
        loss.backward()

        where = f"{similarity} {dtype}"
        loss_size, grad_size = magnitudes(columns, similarity, scale, batch_size, hardness_strength)
        assert_close(loss, expected, dtype, f"loss ({where})", loss_size)
        assert_close(loss, expected_bw, dtype, f"loss, with_backward=True ({where})", loss_size)
        for k, (mine, pieces) in enumerate(zip(ours, reps)):
            assert_close(mine.grad, torch.cat([p.grad for p in pieces]), dtype, f"grad of column {k} ({where})",
                         grad_size)


def test_cached_calculate_loss_with_backward_accumulates_like_autograd(tiny_model):
    """with_backward=True hands the op's gradients straight to leaf reps (no graph); it must do what
    loss.backward() does: accumulate into existing .grad, and reps that are views of leaves (as
    sentence-transformers' MatryoshkaLoss passes them) still reach their leaves through autograd."""
    gen = torch.Generator().manual_seed(7)
    columns = [_randn(gen, 7, DIM, dtype=torch.float32) for _ in range(3)]
    loss = CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size=3)
    leaves = [[_leaf(piece) for piece in c.split(3)] for c in columns]
    first = loss.calculate_loss(leaves, with_backward=True)
    once = [torch.cat([r.grad for r in column]).clone() for column in leaves]
    second = loss.calculate_loss(leaves, with_backward=True)
    assert first.grad_fn is None and second.grad_fn is None and torch.equal(first, second)
    for column, grad in zip(leaves, once):
        torch.testing.assert_close(torch.cat([r.grad for r in column]), 2 * grad)

    wide = [_leaf(torch.cat([c, torch.full_like(c, float("nan"))], dim=1)) for c in columns]
    views = [[piece[:, :DIM] for piece in w.split(3)] for w in wide]  # not leaves: the autograd path
    torch.testing.assert_close(loss.calculate_loss(views, with_backward=True), first)
    for w, grad in zip(wide, once):
        torch.testing.assert_close(w.grad[:, :DIM], grad)
        assert torch.equal(w.grad[:, DIM:], torch.zeros_like(grad))


# ---------------------------------------------------------------------------------------------------------------
# Gathered MultipleNegativesRankingLoss (gather_across_devices=True), emulated with FakeWorld
# ---------------------------------------------------------------------------------------------------------------


def _gathered_mnrl_case(monkeypatch, upstream_loss, module, call, world: FakeWorld, columns, backend, **options):
    """Run the upstream loss on rank ``world.rank`` through ``call(upstream_loss, local_columns)`` and
    fastcache on the same leaves; return (expected, loss, upstream leaves, fastcache leaves).

    Leaves, per side: the local queries and local doc columns (this rank's embeddings) and the world tensor of
    every column (the other ranks' rows). Upstream: the local rows of the loss are the gathered queries at rows
    offset .. offset+B-1, which are the local queries themselves. fastcache: ``queries`` = the local queries,
    ``all_queries`` = the gathered queries (local spliced in), ``docs`` = the gathered doc columns, offset=r·B.
    The local queries reach fastcache's loss twice (as rows and as query columns), so autograd adds
    grad_queries + grad_all_queries[offset:offset+B], exactly as upstream's gather adds both uses.
    """
    def leaves():
        worlds = [world.world(c) for c in columns]
        return worlds, [world.local(w) for w in worlds]

    world.worlds.clear()
    their_worlds, their_locals = leaves()
    world.patch(monkeypatch, module)
    expected = call(upstream_loss, their_locals)
    expected.backward()
    monkeypatch.undo()

    world.worlds.clear()
    our_worlds, our_locals = leaves()
    gathered = [world.splice(w, t) for w, t in zip(our_worlds, our_locals)]
    loss = fastcache.contrastive_loss(our_locals[0], torch.cat(gathered[1:]), all_queries=gathered[0],
                                      offset=world.offset, backend=backend, **options)
    loss.backward()
    return expected, loss, (their_locals, their_worlds), (our_locals, our_worlds)


def _check_gathered_grads(theirs, ours, world: FakeWorld, dtype, where, grad_size):
    """Every gradient is comparable: this rank's loss w.r.t. the local embeddings (what stays on this rank) and
    w.r.t. the other ranks' rows (what all_gather_with_grad's backward would send to them)."""
    (their_locals, their_worlds), (our_locals, our_worlds) = theirs, ours
    for k in range(len(their_locals)):
        assert_close(our_locals[k].grad, their_locals[k].grad, dtype, f"local grad of column {k} ({where})",
                     grad_size)
        if world.world_size > 1:
            mine, ref = _grads([our_worlds[k], their_worlds[k]])
            assert_close(mine, ref, dtype, f"other ranks' grad of column {k} ({where})", grad_size)
            local_rows = slice(world.offset, world.offset + world.batch_size)
            assert not mine[local_rows].any(), "the world tensor's local rows are not used (the local leaf is)"


WORLDS = [(0, 2), (1, 2), (2, 3)]  # (rank, world_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", [0, 2])
@pytest.mark.parametrize("rank,world_size", WORLDS, ids=[f"rank{r}of{w}" for r, w in WORLDS])
@pytest.mark.parametrize("hardness_mode,hardness_strength", HARDNESS, ids=[str(h[0]) for h in HARDNESS])
@pytest.mark.parametrize("directions,partition_mode", DIRECTION_CONFIGS, ids=DIRECTION_IDS)
def test_mnrl_gathered_layout(tiny_model, monkeypatch, directions, partition_mode, hardness_mode,
                              hardness_strength, rank, world_size, negatives, backend):
    """MNRL(gather_across_devices=True) on rank r == contrastive_loss(local_q, world_docs, all_queries=world_q,
    offset=r·B), loss and gradients (local and the other ranks' rows)."""
    batch_size = 4
    world = FakeWorld(rank, world_size, batch_size)
    for similarity, dtype in itertools.product(SIMILARITIES, DTYPES):
        similarity_fct, scale = SIMILARITIES[similarity]
        gen = _generator("gmnrl", directions, partition_mode, hardness_mode, rank, world_size, negatives,
                         similarity)
        columns = [_randn(gen, world_size * batch_size, DIM, dtype=dtype) for _ in range(2 + negatives)]
        upstream_loss = MultipleNegativesRankingLoss(
            tiny_model, scale=scale, similarity_fct=similarity_fct, gather_across_devices=True,
            directions=directions, partition_mode=partition_mode, hardness_mode=hardness_mode,
            hardness_strength=hardness_strength)
        expected, loss, theirs, ours = _gathered_mnrl_case(
            monkeypatch, upstream_loss, mnrl_module,
            lambda m, local: m.compute_loss_from_embeddings(local, labels=None), world, columns, backend,
            scale=scale, similarity=similarity, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength,
            chunk_size=3 if dtype == torch.float64 else None)
        where = f"{similarity} {dtype}"
        loss_size, grad_size = magnitudes(columns, similarity, scale, batch_size, hardness_strength)
        assert_close(loss, expected, dtype, f"loss ({where})", loss_size)
        _check_gathered_grads(theirs, ours, world, dtype, where, grad_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("directions,partition_mode,hardness_mode,hardness_strength", [
    (("query_to_doc",), "joint", None, 0.0),
    (("query_to_doc", "doc_to_query"), "per_direction", "all_negatives", 2.0),
    (("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), "joint", "hard_negatives", 5.0),
])
def test_cached_mnrl_gathered_layout(tiny_model, monkeypatch, directions, partition_mode, hardness_mode,
                                     hardness_strength, backend):
    """CachedMultipleNegativesRankingLoss(gather_across_devices=True).calculate_loss on rank 1 of 3 (mini-batch
    size 3 over B=5 local rows) == fastcache's gathered call, loss and gradients."""
    batch_size, mini_batch_size = 5, 3
    world = FakeWorld(1, 3, batch_size)
    for similarity, dtype in itertools.product(SIMILARITIES, DTYPES):
        similarity_fct, scale = SIMILARITIES[similarity]
        gen = _generator("gcmnrl", directions, partition_mode, hardness_mode, similarity)
        columns = [_randn(gen, 3 * batch_size, DIM, dtype=dtype) for _ in range(3)]
        cached = CachedMultipleNegativesRankingLoss(
            tiny_model, scale=scale, similarity_fct=similarity_fct, mini_batch_size=mini_batch_size,
            gather_across_devices=True, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength)

        def call(loss_obj, local):
            # reps are mini-batch views of the local leaves, so the gradient lands on the leaves
            return loss_obj.calculate_loss([list(t.split(mini_batch_size)) for t in local], with_backward=False)

        expected, loss, theirs, ours = _gathered_mnrl_case(
            monkeypatch, cached, cached_mnrl_module, call, world, columns, backend, scale=scale,
            similarity=similarity, directions=directions, partition_mode=partition_mode,
            hardness_mode=hardness_mode, hardness_strength=hardness_strength)
        where = f"{similarity} {dtype}"
        loss_size, grad_size = magnitudes(columns, similarity, scale, batch_size, hardness_strength)
        assert_close(loss, expected, dtype, f"loss ({where})", loss_size)
        _check_gathered_grads(theirs, ours, world, dtype, where, grad_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gathered_gradients_without_autograd(tiny_model, monkeypatch, dtype, backend):
    """contrastive_loss_and_grad in the gathered layout: the local queries' gradient is grad_queries plus the
    local rows of grad_all_queries; the local docs' gradient is the local rows of grad_docs; the remaining rows
    of grad_all_queries / grad_docs are what this rank's loss sends to the other ranks (== upstream's gradient on
    the other ranks' rows)."""
    batch_size, negatives = 3, 1
    world = FakeWorld(2, 4, batch_size)
    directions = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
    gen = _generator("gnoautograd")
    columns = [_randn(gen, 4 * batch_size, DIM, dtype=dtype) for _ in range(2 + negatives)]
    upstream_loss = MultipleNegativesRankingLoss(tiny_model, gather_across_devices=True, directions=directions)
    expected, _, (their_locals, their_worlds), _ = _gathered_mnrl_case(
        monkeypatch, upstream_loss, mnrl_module, lambda m, local: m.compute_loss_from_embeddings(local, None),
        world, columns, backend, directions=directions)

    world_q, world_docs = columns[0], torch.cat(columns[1:])
    local_q = world_q[world.offset:world.offset + batch_size]
    out = fastcache.contrastive_loss_and_grad(local_q, world_docs, all_queries=world_q, offset=world.offset,
                                              directions=directions, backend=backend)
    loss_size, grad_size = magnitudes(columns, "cos", 20.0, batch_size)
    assert_close(out.loss, expected, dtype, "loss", loss_size)
    rows = slice(world.offset, world.offset + batch_size)
    assert_close(out.grad_queries + out.grad_all_queries[rows], their_locals[0].grad, dtype, "local queries",
                 grad_size)
    other = torch.ones(world_q.size(0), dtype=torch.bool)
    other[rows] = False
    assert_close(out.grad_all_queries[other], their_worlds[0].grad[other], dtype, "other ranks' queries",
                 grad_size)
    grad_docs = out.grad_docs.view(1 + negatives, -1, DIM)
    for k in range(1 + negatives):
        assert_close(grad_docs[k, rows], their_locals[1 + k].grad, dtype, f"local docs of column {k}", grad_size)
        assert_close(grad_docs[k, other], their_worlds[1 + k].grad[other], dtype, f"other ranks' column {k}",
                     grad_size)


# ---------------------------------------------------------------------------------------------------------------
# GISTEmbedLoss maths (CachedGISTEmbedLoss.calculate_loss), local and gathered
# ---------------------------------------------------------------------------------------------------------------


def _gist_threshold(g_pos: torch.Tensor, margin: float, margin_strategy: str) -> torch.Tensor:
    return g_pos - margin if margin_strategy == "absolute" else g_pos - g_pos.abs() * margin


def _guides_far_from_thresholds(gen, world: FakeWorld, columns: int, margin, margin_strategy, dtype,
                                gap: float = 1e-4):
    """Guide embeddings [columns, W·B, GUIDE_DIM] (column 0 the positives) and local guide anchors [B, ...] whose
    guide similarities all lie at least ``gap`` away from GIST's masking thresholds, so that a rounding
    difference between nn.CosineSimilarity and fastcache's normalise-then-GEMM cannot flip a mask decision."""
    B, r0 = world.batch_size, world.offset
    for _ in range(200):
        anchors = _randn(gen, B, GUIDE_DIM, dtype=dtype)
        docs = _randn(gen, columns, world.world_size * B, GUIDE_DIM, dtype=dtype)
        a = torch.nn.functional.normalize(anchors.double(), dim=-1)
        d = torch.nn.functional.normalize(docs.double(), dim=-1)
        ad = a @ d.reshape(-1, GUIDE_DIM).T
        rows = torch.arange(B)
        threshold = _gist_threshold(ad[rows, r0 + rows][:, None], margin, margin_strategy)
        sims = torch.cat([ad, a @ a.T, d[0, r0:r0 + B] @ d[0].T], dim=1)
        distance = (sims - threshold).abs()
        distance[rows, r0 + rows] = float("inf")  # the positive itself: never masked, by construction
        if bool((distance > gap).all()):
            return anchors, docs
    raise AssertionError("could not draw guide embeddings away from the GIST thresholds")


MARGINS = [("absolute", 0.0), ("absolute", 0.05), ("absolute", 0.3), ("absolute", -0.1),
           ("relative", 0.0), ("relative", 0.05), ("relative", 0.3), ("relative", -0.1)]


def _gist_case(monkeypatch, model, guide, world: FakeWorld, gathered: bool, margin_strategy, margin,
               contrast_anchors, contrast_positives, negatives, mini_batch_size, temperature, dtype, backend, gen):
    """CachedGISTEmbedLoss.calculate_loss(reps, reps_guided) vs fastcache on the same leaves; checks loss and
    gradients (local anchors, local candidates, and in the gathered layout the other ranks' candidate rows).
    Without ``gathered`` the world is one rank: the world tensors are the local ones."""
    assert gathered or world.world_size == 1
    B = world.batch_size
    columns = 1 + negatives
    anchors = _randn(gen, B, DIM, dtype=dtype)
    candidates = _randn(gen, columns, world.world_size * B, DIM, dtype=dtype)
    guide_anchors, guide_candidates = _guides_far_from_thresholds(gen, world, columns, margin, margin_strategy,
                                                                  dtype)
    gist = CachedGISTEmbedLoss(model, guide, temperature=temperature, mini_batch_size=mini_batch_size,
                               margin_strategy=margin_strategy, margin=margin, contrast_anchors=contrast_anchors,
                               contrast_positives=contrast_positives, gather_across_devices=gathered)

    def leaves():
        world.worlds.clear()
        worlds = [world.world(c) for c in candidates]
        guide_worlds = [world.world(c, requires_grad=False) for c in guide_candidates]
        locals_ = [world.local(w) for w in worlds]
        return _leaf(anchors), worlds, locals_, [world.local(w, requires_grad=False) for w in guide_worlds]

    # sentence-transformers: reps are per-column lists of mini-batch tensors, local rows only
    their_anchor, their_worlds, their_locals, their_guide_locals = leaves()
    reps = [list(t.split(mini_batch_size)) for t in [their_anchor] + their_locals]
    reps_guided = [list(t.split(mini_batch_size)) for t in [guide_anchors] + their_guide_locals]
    if gathered:
        world.patch(monkeypatch, cached_gist_module)
    expected = gist.calculate_loss(reps, reps_guided, with_backward=False)
    expected.backward()
    monkeypatch.undo()

    # fastcache: local anchors, gathered candidates as [C, W·B, D], offset = r·B (guide candidates likewise)
    our_anchor, our_worlds, our_locals, _ = leaves()
    docs = torch.stack([world.splice(w, t) for w, t in zip(our_worlds, our_locals)])
    directions = ("query_to_doc",) + ("query_to_query",) * contrast_anchors + ("doc_to_doc",) * contrast_positives
    loss = fastcache.contrastive_loss(our_anchor, docs, guide_queries=guide_anchors, guide_docs=guide_candidates,
                                      scale=1.0 / temperature, directions=directions, margin=margin,
                                      margin_strategy=margin_strategy, offset=world.offset, backend=backend)
    loss.backward()

    where = f"{dtype}, mini_batch_size={mini_batch_size}"
    loss_size, grad_size = magnitudes([anchors, candidates], "cos", 1.0 / temperature, B)
    assert_close(loss, expected, dtype, f"loss ({where})", loss_size)
    assert_close(our_anchor.grad, their_anchor.grad, dtype, f"anchor grad ({where})", grad_size)
    for k in range(columns):
        assert_close(our_locals[k].grad, their_locals[k].grad, dtype, f"local grad of column {k} ({where})",
                     grad_size)
        if gathered:
            mine, ref = _grads([our_worlds[k], their_worlds[k]])
            assert_close(mine, ref, dtype, f"other ranks' grad of column {k} ({where})", grad_size)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("contrast_positives", [False, True], ids=["no_pp", "pp"])
@pytest.mark.parametrize("contrast_anchors", [False, True], ids=["no_aa", "aa"])
@pytest.mark.parametrize("negatives", [0, 1, 2])
@pytest.mark.parametrize("margin_strategy,margin", MARGINS, ids=[f"{s}{m}" for s, m in MARGINS])
def test_gist_loss_and_grads(tiny_model, tiny_guide_model, monkeypatch, margin_strategy, margin, negatives,
                             contrast_anchors, contrast_positives, backend):
    """CachedGISTEmbedLoss.calculate_loss == contrastive_loss(anchors, docs, guide_queries, guide_docs,
    scale=1/temperature, directions=query_to_doc [+ query_to_query] [+ doc_to_doc], margin, margin_strategy)."""
    world = FakeWorld(0, 1, 7)
    for dtype, mini_batch_size in [(torch.float32, 3), (torch.float64, 7), (torch.float64, 2)]:
        gen = _generator("gist", margin_strategy, margin, negatives, contrast_anchors, contrast_positives,
                         mini_batch_size, str(dtype))
        _gist_case(monkeypatch, tiny_model, tiny_guide_model, world, False, margin_strategy, margin,
                   contrast_anchors, contrast_positives, negatives, mini_batch_size, 0.05, dtype, backend, gen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("negatives", [0, 1])
@pytest.mark.parametrize("rank,world_size", WORLDS, ids=[f"rank{r}of{w}" for r, w in WORLDS])
@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 0.0), ("absolute", 0.1), ("relative", 0.3),
                                                    ("relative", -0.1)])
def test_gist_gathered_layout(tiny_model, tiny_guide_model, monkeypatch, margin_strategy, margin, rank,
                              world_size, negatives, backend):
    """CachedGISTEmbedLoss(gather_across_devices=True) on rank r: anchors local, candidates gathered ==
    contrastive_loss(local anchors, docs [C, W·B, D], guide_docs [C, W·B, Dg], offset=r·B)."""
    world = FakeWorld(rank, world_size, 4)
    for (contrast_anchors, contrast_positives), dtype, mini_batch_size in [
        ((True, True), torch.float32, 3),
        ((True, True), torch.float64, 4),
        ((False, True), torch.float64, 1),
        ((True, False), torch.float64, 3),
    ]:
        gen = _generator("ggist", margin_strategy, margin, rank, world_size, negatives, contrast_anchors,
                         contrast_positives, str(dtype))
        _gist_case(monkeypatch, tiny_model, tiny_guide_model, world, True, margin_strategy, margin,
                   contrast_anchors, contrast_positives, negatives, mini_batch_size, 0.02, dtype, backend, gen)
