"""gather_across_devices=True in a real world of 2 processes (gloo, CPU) against single-process maths.

Each rank takes its half (rows r·B .. r·B+B-1) of a fixed full batch of float64 embeddings (seeded random leaf
tensors, the same on both ranks) and computes the loss with ``gather_across_devices=True``. What must hold:

* On each rank, fastcache's loss and the gradient w.r.t. that rank's embeddings (after both ranks' backward)
  equal sentence-transformers' gathered computation, run in the same world.
* Single-process form of that computation, ``L_r``: the loss of rank r's rows against the concatenated batch,
  where ``all_gather_with_grad`` returns the full batch (with rank r's rows being rank r's tensors) and
  ``get_rank()`` returns r (``_emulated_rank_losses``). Rank r's loss is ``L_r``, and the gradient of rank r's
  embeddings is the rows r·B.. of ∂(Σ_r' L_r')/∂(full batch): all_gather's backward sums every rank's gradient
  of the gathered copy, while a tensor that is not gathered (GIST's anchors) gets its own rank's gradient only.
* Full-batch identity: where a row's loss is the same whether computed on its rank or in one process over the
  full batch — every MultipleNegativesRankingLoss configuration (all four directions, both partition modes,
  hardness), and GIST without the anchor-anchor block — the mean of the ranks' losses equals the 1-process
  full-batch loss L, and each rank's gradient equals world_size · ∂L/∂(its rows) (Σ_r L_r = world_size · L).
  GIST's anchor-anchor block compares a rank's anchors with its own anchors only (anchors are not gathered),
  so with contrast_anchors=True the identity does not hold, and only the per-rank form is asserted.
* The same through the model: fastcache's cached losses on each rank's half of the tokenized texts; the sum of
  the ranks' parameter gradients equals world_size times the 1-process full-batch gradient (no DDP, so each
  rank's parameter gradient is its own part).

All ranks' results are computed in one spawned world (started once per module, bounded by a deadline) and written
to files that the tests read.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch

from helpers import spawn_world, start_gloo_rank

TESTS = Path(__file__).resolve().parents[1]
WORLD = 2
B = 4  # rows per rank
DIM = 16
GUIDE_DIM = 24
SPLIT = [3, 1]  # the mini-batches of calculate_loss's reps on each rank
DEADLINE_S = 150  # the whole world (two Python start-ups, two tiny models, every configuration)

_ALL = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
MNRL_CONFIGS = {}
for _dirs, _mode in [(("query_to_doc",), "joint"), (("query_to_doc", "query_to_query"), "joint"),
                     (("query_to_doc", "doc_to_query"), "joint"), (("query_to_doc", "doc_to_doc"), "joint"),
                     (_ALL, "joint"), (("query_to_doc",), "per_direction"),
                     (("query_to_doc", "doc_to_query"), "per_direction")]:
    for _columns in (2, 3):
        _key = "+".join(d.replace("query", "q").replace("doc", "d").replace("_to_", "") for d in _dirs)
        MNRL_CONFIGS[f"{_key}-{_mode}-{_columns}col"] = (
            {"directions": _dirs, "partition_mode": _mode}, _columns)
for _hardness, _strength in [("in_batch_negatives", 4.0), ("hard_negatives", 3.0), ("all_negatives", 2.0)]:
    MNRL_CONFIGS[f"{_hardness}-all-joint-4col"] = (
        {"directions": _ALL, "hardness_mode": _hardness, "hardness_strength": _strength}, 4)
MNRL_CONFIGS["dot-qd-joint-3col"] = ({"similarity_fct": "dot", "scale": 0.5}, 3)

CACHED_CONFIGS = {key: MNRL_CONFIGS[key] for key in
                  ("qd-joint-3col", "qd+qq+dq+dd-joint-3col", "qd+dq-per_direction-2col",
                   "all_negatives-all-joint-4col")}

GIST_CONFIGS = {}
for _aa, _pp in [(True, True), (True, False), (False, True), (False, False)]:
    for _columns in (2, 3):
        GIST_CONFIGS[f"aa{int(_aa)}-pp{int(_pp)}-{_columns}col"] = (
            {"contrast_anchors": _aa, "contrast_positives": _pp, "temperature": 0.05, "margin": 0.05}, _columns)
GIST_CONFIGS["relative-3col"] = ({"margin_strategy": "relative", "margin": 0.1, "temperature": 0.05,
                                  "contrast_anchors": False}, 3)

FEATURE_CONFIGS = {
    "CachedMultipleNegativesRankingLoss": {"mini_batch_size": 3, "directions": _ALL},
    "CachedGISTEmbedLoss": {"mini_batch_size": 3, "margin": 0.02, "contrast_anchors": False},
}
TEXTS = [
    ["the cat sat", "a dog at work", "sun over the car", "nice weather today", "car work query", "query document",
     "the sun today", "a cat and a dog"],
    ["cat sat", "dog work", "the sun car", "weather nice", "a car query", "document query", "today sun", "dog cat"],
]


# ---------------------------------------------------------------------------------------------------------------
# Shared between the ranks and the checks
# ---------------------------------------------------------------------------------------------------------------


def _full_batch(key: str, columns: int) -> dict[str, list[torch.Tensor]]:
    """The full batch (WORLD·B rows) of one configuration, float64: anchors, positives near their anchors, hard
    negatives that share part of theirs, and guide embeddings that are noisy views of the same vectors."""
    import zlib

    gen = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    n = WORLD * B
    anchors = torch.randn(n, DIM, generator=gen, dtype=torch.float64)
    emb = [anchors, anchors + 0.9 * torch.randn(n, DIM, generator=gen, dtype=torch.float64)]
    for _ in range(columns - 2):
        emb.append(0.5 * anchors + torch.randn(n, DIM, generator=gen, dtype=torch.float64))
    mix = torch.randn(DIM, GUIDE_DIM, generator=gen, dtype=torch.float64)
    guide = [e @ mix + 0.5 * torch.randn(n, GUIDE_DIM, generator=gen, dtype=torch.float64) for e in emb]
    return {"emb": emb, "guide": guide}


def _rows(rank: int) -> slice:
    return slice(rank * B, (rank + 1) * B)


def _kwargs(kwargs: dict) -> dict:
    from sentence_transformers.util import dot_score

    return {**kwargs, "similarity_fct": dot_score} if kwargs.get("similarity_fct") == "dot" else dict(kwargs)


def _loss(impl: str, name: str, model, guide, **kwargs):
    """fastcache's (impl="fc") or sentence-transformers' (impl="st") loss ``name``."""
    import importlib

    if impl == "fc":
        cls = getattr(importlib.import_module("fastcache.losses"), name)
    else:  # from the defining module, whatever fastcache.patch_sentence_transformers() did to the public one
        cls = getattr(importlib.import_module(f"sentence_transformers.sentence_transformer.losses.{UPSTREAM[name]}"),
                      name)
    return cls(model, guide, **kwargs) if "GIST" in name else cls(model, **kwargs)


def _split(tensor: torch.Tensor, requires_grad: bool, sizes: list[int]) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(requires_grad) for t in tensor.split(sizes)]


def _compute(kind: str, loss, emb: list[torch.Tensor], guide: list[torch.Tensor], sizes: list[int] = SPLIT):
    """The loss of ``emb`` (this rank's rows, or the full batch) and the gradients w.r.t. each column; cached
    losses get the columns as mini-batches of ``sizes`` rows."""
    if kind == "mnrl":
        leaves = [e.detach().clone().requires_grad_() for e in emb]
        value = loss.compute_loss_from_embeddings(leaves, None)
        value.backward()
        return value.detach(), [leaf.grad for leaf in leaves]
    reps = [_split(e, True, sizes) for e in emb]
    second = [_split(g, False, sizes) for g in guide] if kind == "gist" else None
    value = loss.calculate_loss(reps, second, with_backward=True)
    return value.detach(), [torch.cat([r.grad for r in column]) for column in reps]


UPSTREAM = {
    "MultipleNegativesRankingLoss": "multiple_negatives_ranking",
    "CachedMultipleNegativesRankingLoss": "cached_multiple_negatives_ranking",
    "CachedGISTEmbedLoss": "cached_gist_embed",
}
KINDS = {
    "mnrl": ("MultipleNegativesRankingLoss", MNRL_CONFIGS, {}),
    "cached": ("CachedMultipleNegativesRankingLoss", CACHED_CONFIGS, {"mini_batch_size": 3}),
    "gist": ("CachedGISTEmbedLoss", GIST_CONFIGS, {"mini_batch_size": 3}),
}


# ---------------------------------------------------------------------------------------------------------------
# The ranks
# ---------------------------------------------------------------------------------------------------------------


def _rank_main(rank: int, folder: str) -> None:
    """One rank: every configuration with fastcache and with sentence-transformers, gathered; then the cached
    losses through the model on this rank's half of the texts. Results go to ``folder/rank{rank}.pt``."""
    import torch.distributed as dist

    model, guide = start_gloo_rank(rank, folder, WORLD, 60)
    try:
        results = {"world_size": dist.get_world_size()}
        for kind, (name, configs, extra) in KINDS.items():
            for key, (kwargs, columns) in configs.items():
                batch = _full_batch(key, columns)
                emb = [e[_rows(rank)] for e in batch["emb"]]
                guided = [g[_rows(rank)] for g in batch["guide"]]
                for impl in ("fc", "st"):
                    loss = _loss(impl, name, model, guide, gather_across_devices=True, **extra, **_kwargs(kwargs))
                    results[(kind, key, impl)] = _compute(kind, loss, emb, guided)
        half = len(TEXTS[0]) // WORLD
        texts = [column[rank * half:(rank + 1) * half] for column in TEXTS]
        for name, kwargs in FEATURE_CONFIGS.items():
            model.zero_grad(set_to_none=True)
            loss = _loss("fc", name, model, guide, gather_across_devices=True, **kwargs)
            value = loss([model.preprocess(column) for column in texts], None)
            value.backward()
            results[("features", name)] = (value.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                                           if p.grad is not None})
        torch.save(results, Path(folder) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Run both ranks once (spawned, deadline DEADLINE_S); return their results, indexed by rank."""
    return spawn_world(_rank_main, tmp_path_factory.mktemp("gloo_world"), WORLD, DEADLINE_S)


# ---------------------------------------------------------------------------------------------------------------
# The single-process reference
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The same tiny models as the ranks build (same seeds), in this process."""
    sys.path.insert(0, str(TESTS))
    from conftest import build_tiny_bert

    folder = tmp_path_factory.mktemp("reference_models")
    return build_tiny_bert(folder / "model", seed=0), build_tiny_bert(folder / "guide", seed=1)


@contextlib.contextmanager
def _as_rank(loss, rank: int, full: list[torch.Tensor]):
    """Within the block, the upstream ``loss``'s module sees rank ``rank`` of WORLD, and all_gather_with_grad
    returns the full column whose rows of that rank are the tensor it is given (found by value)."""
    module = sys.modules[type(loss).__module__]

    def gather(tensor):
        for column in full:
            if column.shape[1:] == tensor.shape[1:] and torch.equal(column[_rows(rank)].detach(), tensor.detach()):
                return torch.cat([column[:rank * B], tensor, column[(rank + 1) * B:]])
        raise AssertionError("all_gather_with_grad got a tensor that is no column of this rank")

    saved = module.all_gather_with_grad, module.get_rank
    module.all_gather_with_grad, module.get_rank = gather, (lambda: rank)
    try:
        yield
    finally:
        module.all_gather_with_grad, module.get_rank = saved


def _emulated_rank_losses(kind: str, key: str, models):
    """Upstream's gathered maths in one process: [L_r for each rank], and the gradient of Σ_r L_r w.r.t. each
    full column."""
    name, configs, extra = KINDS[kind]
    kwargs, columns = configs[key]
    batch = _full_batch(key, columns)
    full = [e.detach().clone().requires_grad_() for e in batch["emb"]]
    losses, total = [], 0
    for rank in range(WORLD):
        loss = _loss("st", name, *models, gather_across_devices=True, **extra, **_kwargs(kwargs))
        local = [f[_rows(rank)] for f in full]
        with _as_rank(loss, rank, full + batch["guide"]):
            if kind == "mnrl":
                value = loss.compute_loss_from_embeddings(local, None)
            else:
                reps = [list(t.split(SPLIT)) for t in local]
                second = [list(g[_rows(rank)].split(SPLIT)) for g in batch["guide"]] if kind == "gist" else None
                value = loss.calculate_loss(reps, second, with_backward=False)
        losses.append(value.detach())
        total = total + value
    total.backward()
    return losses, [f.grad for f in full]


def _full_batch_loss(kind: str, key: str, models):
    """The 1-process loss on the full batch (no gathering) and its gradients w.r.t. each column."""
    name, configs, extra = KINDS[kind]
    kwargs, columns = configs[key]
    batch = _full_batch(key, columns)
    loss = _loss("st", name, *models, **extra, **_kwargs(kwargs))
    return _compute(kind, loss, batch["emb"], batch["guide"], sizes=[3, 3, 2])


def _assert_close(actual, expected, what: str, rtol: float = 1e-8, atol: float = 1e-11) -> None:
    """Elementwise rtol plus atol times the largest |expected| entry (and the expected values non-trivial)."""
    scale = float(expected.abs().max())
    assert scale > 1e-6, f"{what}: trivial reference {scale}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


def _full_batch_identity_holds(kind: str, key: str) -> bool:
    """Whether every row's loss on its rank equals its loss in one process over the full batch."""
    return kind != "gist" or not KINDS[kind][1][key][0].get("contrast_anchors", True)


def _cases(full_batch_identity: bool = False):
    return [pytest.param(kind, key, id=f"{kind}-{key}") for kind, (_, configs, _) in KINDS.items() for key in configs
            if not full_batch_identity or _full_batch_identity_holds(kind, key)]


# ---------------------------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------------------------


def test_the_world_was_distributed(world):
    assert [r["world_size"] for r in world] == [WORLD] * WORLD


@pytest.mark.parametrize(("kind", "key"), _cases())
def test_gathered_equals_upstream_in_the_same_world(world, kind, key):
    """On each rank, fastcache's gathered loss and local gradients are sentence-transformers'."""
    for rank, results in enumerate(world):
        (loss_fc, grads_fc), (loss_st, grads_st) = results[(kind, key, "fc")], results[(kind, key, "st")]
        _assert_close(loss_fc, loss_st, f"rank {rank} loss")
        for column, (g_fc, g_st) in enumerate(zip(grads_fc, grads_st)):
            _assert_close(g_fc, g_st, f"rank {rank} column {column} gradient")


@pytest.mark.parametrize(("kind", "key"), _cases())
def test_gathered_equals_single_process_per_rank(world, models, kind, key):
    """Rank r's loss is L_r (its rows against the concatenated batch); its gradient is its rows of
    ∂(Σ_r' L_r')/∂(full batch)."""
    losses, grads = _emulated_rank_losses(kind, key, models)
    for rank, results in enumerate(world):
        loss_fc, grads_fc = results[(kind, key, "fc")]
        _assert_close(loss_fc, losses[rank], f"rank {rank} loss")
        for column, (g_fc, g_full) in enumerate(zip(grads_fc, grads)):
            _assert_close(g_fc, g_full[_rows(rank)], f"rank {rank} column {column} gradient")


@pytest.mark.parametrize(("kind", "key"), _cases(full_batch_identity=True))
def test_gathered_against_the_full_batch(world, models, kind, key):
    """Where the full-batch identity holds (not for GIST's per-rank anchor-anchor block): mean of the ranks'
    losses = 1-process loss L, and each rank's gradient = world_size · ∂L/∂(its rows)."""
    loss, grads = _full_batch_loss(kind, key, models)
    mean = sum(results[(kind, key, "fc")][0] for results in world) / WORLD
    _assert_close(mean, loss, "mean of the ranks' losses")
    for rank, results in enumerate(world):
        for column, (g_fc, g_full) in enumerate(zip(results[(kind, key, "fc")][1], grads)):
            _assert_close(g_fc, WORLD * g_full[_rows(rank)], f"rank {rank} column {column} gradient")


@pytest.mark.parametrize("name", list(FEATURE_CONFIGS))
def test_cached_losses_through_the_model(world, models, name):
    """fastcache's cached loss on each rank's half of the texts, gathered: the mean loss is the 1-process loss
    on all texts and the ranks' parameter gradients sum to world_size times its gradient."""
    model, guide = models
    model.eval()
    model.zero_grad(set_to_none=True)
    loss = _loss("st", name, model, guide, **FEATURE_CONFIGS[name])
    value = loss([model.preprocess(column) for column in TEXTS], None)
    value.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    mean = sum(results[("features", name)][0] for results in world) / WORLD
    torch.testing.assert_close(mean, value.detach(), rtol=1e-4, atol=1e-6)
    assert float(value.detach()) > 1e-3
    summed = {n: sum(results[("features", name)][1][n] for results in world) for n in expected}
    assert all(set(results[("features", name)][1]) == set(expected) for results in world)
    scale = max(float(g.abs().max()) for g in expected.values())
    assert scale > 1e-5
    for n in expected:
        torch.testing.assert_close(summed[n], WORLD * expected[n], rtol=1e-4, atol=1e-5 * WORLD * scale,
                                   msg=lambda m, n=n: f"{n}: {m}")
