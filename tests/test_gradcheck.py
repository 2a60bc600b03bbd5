"""torch.autograd.gradcheck in float64 of every autograd path: finite differences against the analytic gradients.

* The op (``contrastive_loss``) on the CPU backends (C++ and PyTorch epilogues), with every set of directions (query_to_doc plus any subset
  of the other three), both partition modes where they apply, both similarities, local and gathered
  (``all_queries`` and an offset; cosine locally, dot gathered), docs as [N, D] and [C, P, D], a guide with either margin strategy, duplicate
  ``doc_ids``, and chunks smaller than the batch. The hardness penalty is excluded: it is stopgrad(s) by
  definition, so finite differences see what the gradient deliberately ignores (tests/contrastive/test_contrastive_op.py
  checks that gradient against the reference's autograd instead). Triton's slab and tiled strategies (through
  the interpreter on CPU) on two small cases that together use every direction, gathering, a guide and ids.
* The drop-in losses' embedding-level paths, as the trainer calls them: MultipleNegativesRankingLoss and
  MultipleNegativesSymmetricRankingLoss ``compute_loss_from_embeddings``, the cached losses' ``calculate_loss``
  on lists of mini-batches (CachedMultipleNegativesRankingLoss, CachedMultipleNegativesSymmetricRankingLoss,
  CachedGISTEmbedLoss), with their options; fastcache's MatryoshkaLoss around MNRL, cached MNRL and cached GIST.
* The Matryoshka op (fastcache.ops.matryoshka) on the CPU backends: several dims and weights, every direction,
  gathering, a guide and ids.

The backward of the op is once-differentiable (it returns gradients computed in the forward pass), so there is
no gradgradcheck: a second derivative raises, which is checked too.
"""

from __future__ import annotations

import itertools
from functools import partial

import pytest
import torch

from fastcache import _backend, contrastive_loss
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.matryoshka import matryoshka_contrastive_loss
from drop_in_losses import MATRYOSHKA_INNER, make_loss, make_matryoshka_loss
from helpers import DIFFERENTIABLE, make_batch

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
_AVAILABLE = [name for name, reason in contrastive_epilogue.available(torch.device("cpu")).items() if reason is None]
BACKENDS = [name for name in _AVAILABLE if name in ("cpu", "torch")]
# Triton on CPU is its interpreter (~0.3 s a call; gradcheck makes two calls per input element): a few cases
TRITON_STRATEGIES = ["slab", "tiled", "fused_slab"] if "triton" in _AVAILABLE else []
GRADCHECK = dict(eps=1e-6, atol=1e-7, rtol=1e-5)

DIRECTION_SETS = [(QD,) + extra for n in range(4) for extra in itertools.combinations((QQ, DQ, DD), n)]
OP_CASES = []
for _dirs in DIRECTION_SETS:
    _modes = ("joint",) if {QQ, DD} & set(_dirs) else ("joint", "per_direction")
    for _mode, (_sim, _layout) in itertools.product(_modes, (("cos", "local"), ("dot", "gathered"))):
        OP_CASES.append(pytest.param(_dirs, _mode, _sim, _layout, id="-".join(
            ["+".join(d.replace("query", "q").replace("doc", "d").replace("_to_", "") for d in _dirs),
             _mode, _sim, _layout])))


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "cpu" and _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")
    return request.param


def _gradcheck_op(batch: dict, backend: str, strategy: str = "slab", op=contrastive_loss, **options) -> None:
    names = [k for k in DIFFERENTIABLE if k in batch]
    fixed = {k: v for k, v in batch.items() if k not in names}
    chunk = {"chunk_size": 2} if strategy == "slab" else {}

    def fn(*tensors):
        named = dict(zip(names, tensors), **fixed)
        q, d = named.pop("queries"), named.pop("docs")
        return op(q, d, **named, backend=backend, strategy=strategy, **chunk, **options)

    inputs = tuple(batch[k].clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, inputs, **GRADCHECK)


@pytest.mark.parametrize("directions,partition_mode,similarity,layout", OP_CASES)
def test_op(backend, directions, partition_mode, similarity, layout):
    gathered = layout == "gathered"
    batch = make_batch(3, 4, columns=2, positives=5 if gathered else None, offset=1 if gathered else 0,
                       gathered=gathered, docs_3d=gathered, norm=0.6 if similarity == "dot" else 1.0, seed=40)
    _gradcheck_op(batch, backend, directions=directions, partition_mode=partition_mode, similarity=similarity,
                  scale=4.0 if similarity == "cos" else 2.0, offset=1 if gathered else 0)


@pytest.mark.parametrize("margin_strategy,margin", [("absolute", 0.1), ("relative", 0.3), ("absolute", -0.2)])
@pytest.mark.parametrize("directions", [(QD,), (QD, QQ), (QD, DD), (QD, QQ, DD)],
                         ids=["qd", "qd+qq", "qd+dd", "qd+qq+dd"])
def test_op_guided(backend, directions, margin_strategy, margin):
    batch = make_batch(3, 4, columns=2, positives=5, offset=2, docs_3d=True, guide_dim=3, seed=41)
    _gradcheck_op(batch, backend, directions=directions, margin=margin, margin_strategy=margin_strategy, offset=2,
                  scale=5.0)


@pytest.mark.parametrize("directions", [(QD,), (QD, DD), (QD, QQ, DQ, DD)], ids=["qd", "qd+dd", "all"])
def test_op_duplicate_ids(backend, directions):
    batch = make_batch(4, 3, columns=2, seed=42)
    batch["doc_ids"] = torch.tensor([0, 1, 0, 2, 1, 3, 0, 4])  # duplicates of rows 0, 1 and 2's positives
    _gradcheck_op(batch, backend, directions=directions, scale=3.0)


@pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0 to a scalar:DeprecationWarning")
@pytest.mark.parametrize("case", ["all-dirs-gathered-dot", "guided-ids"])
@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_op_triton(strategy, case):
    if case == "guided-ids":
        batch = make_batch(2, 3, columns=2, positives=3, offset=1, docs_3d=True, guide_dim=2, seed=45)
        batch["doc_ids"] = torch.tensor([[0, 1, 2], [1, 0, 3]])
        options = dict(directions=(QD, QQ, DD), margin=0.1, offset=1, scale=4.0)
    else:
        batch = make_batch(2, 3, columns=2, positives=3, offset=1, gathered=True, norm=0.6, seed=46)
        options = dict(directions=(QD, QQ, DQ, DD), similarity="dot", offset=1, scale=2.0)
    _gradcheck_op(batch, "triton", strategy, **options)


def test_op_is_once_differentiable(backend):
    """First order only: asking for a graph of the gradient (create_graph=True) raises at once, never a silent zero
    (tests/contrastive/test_contrastive_autograd_limits.py has the other ops and torch.func)."""
    batch = make_batch(3, 4, columns=2, seed=43)
    q = batch["queries"].clone().requires_grad_()
    loss = contrastive_loss(q, batch["docs"], backend=backend)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(loss, q, create_graph=True)


# The Matryoshka op (one sweep over D for every dim) on the CPU backends: dims that divide nothing, weights (a
# negative one), every direction, gathering and per-direction partitions, a guide (never truncated) and ids. Not
# Triton (the interpreter takes 23 s for one case with slab and 40 s with tiled on the idle machine): its slab
# epilogue is the one test_op_triton checks, and both strategies' gradients are compared with the reference's
# autograd in tests/matryoshka/test_properties_matryoshka.py and tests/matryoshka/test_matryoshka_triton.py.
MATRYOSHKA = dict(dims=[5, 4, 2], weights=[1.0, 0.5, -2.0])
MATRYOSHKA_CASES = {
    "all-dirs-cos": (dict(rows=3, dim=5, columns=2), dict(directions=(QD, QQ, DQ, DD), scale=4.0)),
    "qd+dq-per-direction-dot-gathered": (
        dict(rows=3, dim=5, columns=2, positives=5, offset=1, gathered=True, docs_3d=True, norm=0.6),
        dict(directions=(QD, DQ), partition_mode="per_direction", similarity="dot", scale=2.0, offset=1)),
    "qd+qq+dd-guided-ids": (dict(rows=3, dim=5, columns=2, positives=4, offset=1, docs_3d=True, guide_dim=3),
                            dict(directions=(QD, QQ, DD), margin=0.1, offset=1, scale=5.0)),
}


def _matryoshka_batch(case: str) -> tuple[dict, dict]:
    shape, options = MATRYOSHKA_CASES[case]
    batch = make_batch(**shape, seed=47)
    if "ids" in case:
        batch["doc_ids"] = torch.tensor([[0, 1, 2, 3], [1, 4, 0, 5]])
    return batch, options


@pytest.mark.parametrize("case", list(MATRYOSHKA_CASES))
def test_matryoshka_op(backend, case):
    batch, options = _matryoshka_batch(case)
    _gradcheck_op(batch, backend, op=matryoshka_contrastive_loss, **MATRYOSHKA, **options)


# ---------------------------------------------------------------------------------------------------------------
# The losses' embedding-level paths
# ---------------------------------------------------------------------------------------------------------------

def _embeddings(columns: int, rows: int = 4, dim: int = 5, seed: int = 44) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    anchors = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    return [anchors] + [anchors + 1.5 * torch.randn(rows, dim, generator=gen, dtype=torch.float64)
                        for _ in range(columns - 1)]


EMBEDDING_LOSSES = {
    "MultipleNegativesRankingLoss": {},
    "MultipleNegativesRankingLoss-all-directions": dict(
        directions=(QD, QQ, DQ, DD), scale=5.0),
    "MultipleNegativesRankingLoss-per-direction-dot": dict(
        directions=(QD, DQ), partition_mode="per_direction", similarity_fct="dot", scale=1.0),
    "MultipleNegativesSymmetricRankingLoss": dict(scale=5.0),
}
CACHED_LOSSES = {
    "CachedMultipleNegativesRankingLoss": dict(directions=(QD, QQ, DQ, DD), scale=5.0),
    "CachedMultipleNegativesSymmetricRankingLoss": dict(scale=5.0),
    "CachedGISTEmbedLoss": dict(temperature=0.2, margin=0.05),
    "CachedGISTEmbedLoss-relative-no-anchors": dict(temperature=0.2, margin=0.1, margin_strategy="relative",
                                                    contrast_anchors=False),
}


def _kwargs(kwargs: dict) -> dict:
    from sentence_transformers.util import dot_score

    return dict(kwargs, similarity_fct=dot_score) if kwargs.get("similarity_fct") == "dot" else dict(kwargs)


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("case", list(EMBEDDING_LOSSES))
def test_compute_loss_from_embeddings(tiny_model, case, columns):
    loss = make_loss(case.split("-")[0], tiny_model, None, **_kwargs(EMBEDDING_LOSSES[case]))
    inputs = tuple(e.requires_grad_() for e in _embeddings(columns))
    assert torch.autograd.gradcheck(lambda *emb: loss.compute_loss_from_embeddings(list(emb), None), inputs,
                                    **GRADCHECK)


def _cached_loss_stage(loss, name: str, embeddings: list[torch.Tensor], op=None):
    """A function of the embedding columns: the cached loss's calculate_loss on mini-batches of 3 and 1 rows per
    column (with ``op``, a fastcache.losses.fused_contrastive LossOp: its cached_loss through that op); a GIST
    guide's embeddings are fixed (a different, smaller space)."""
    guide = [e[:, :3].clone() * 0.5 + 0.1 for e in embeddings]
    stage = loss.calculate_loss if op is None else partial(loss.cached_loss, op=op)

    def fn(*emb):
        reps = [list(e.split([3, 1])) for e in emb]
        if "GIST" in name:
            return stage(reps, [list(g.split([3, 1])) for g in guide])
        return stage(reps)

    return fn


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("case", list(CACHED_LOSSES))
def test_cached_calculate_loss(tiny_model, tiny_guide_model, case, columns):
    name = case.split("-")[0]
    loss = make_loss(name, tiny_model, tiny_guide_model, mini_batch_size=3, **CACHED_LOSSES[case])
    embeddings = _embeddings(columns)
    fn = _cached_loss_stage(loss, name, embeddings)
    assert torch.autograd.gradcheck(fn, tuple(e.requires_grad_() for e in embeddings), **GRADCHECK)


@pytest.mark.parametrize("inner", MATRYOSHKA_INNER)
def test_matryoshka_loss_stage(tiny_model, tiny_guide_model, inner):
    """fastcache's MatryoshkaLoss at dims 5/3 of 5-dim embeddings: the inner loss's embedding-level path through
    the step's Matryoshka op (every dim in one op call), as its forward runs it."""
    cached = "Cached" in inner
    loss = make_matryoshka_loss(inner, tiny_model, tiny_guide_model, dims=[5, 3],
                                **({"mini_batch_size": 3} if cached else {}))
    assert loss.fused
    embeddings = _embeddings(3)
    op = loss.step_op()
    fn = _cached_loss_stage(loss.loss, inner, embeddings, op) if cached else \
        (lambda *emb: loss.loss.fused_loss(list(emb), op=op))

    assert torch.autograd.gradcheck(fn, tuple(e.requires_grad_() for e in embeddings), **GRADCHECK)
