"""The gradient filter, ``filter_eps`` (fastcache/ops/contrastive/__init__.py states the rule and its bound).

In float64 against the dense reference: the loss is unchanged (the filter touches only the backward); the gradient
of every embedding row stays within the stated bound, Σ over its entries of min(|dL/ds|, eps·|scale|/B) times the
partner's norm (over the normalisation's 1/max(|x|, 1e-12) for cosine); it is exactly the gradient of the kept
tiles (dL/ds masked to the tiles whose largest |dL/ds| reaches the threshold, with each strategy's tile shape);
eps=None is the exact path to the bit and counts nothing; eps > 1 skips every tile (no |dloss_i/dlogit| exceeds
1) and the gradients are zero; an eps below every positive's |dloss_i/dlogit| keeps the positives' tiles. Every
strategy that filters: the cpu slab (C++), the torch slab and the Triton tiled kernels (under the interpreter,
tiny shapes). Bad values raise errors naming the argument; the Matryoshka op and the fused_slab strategy, which
have no filter, refuse it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import INTERPRETER_ONLY, make_batch

from fastcache import contrastive_loss_and_grad
from fastcache.ops.contrastive import ContrastiveOptions
from fastcache.ops.contrastive.filtering import count_filtered_tiles
from fastcache.ops.contrastive.slab import FILTER_TILE_COLUMNS, FILTER_TILE_ROWS
from fastcache.ops.matryoshka import matryoshka_contrastive_loss_and_grad
from fastcache.reference import contrastive_loss_reference

# strategy -> (the op's settings, the (rows, columns) of the tiles that filter the row and the column gradients, the
# tile shapes it counts: the slab decides each tile once for both products, the tiled kernels once per kernel)
SLAB_TILE = (FILTER_TILE_ROWS, FILTER_TILE_COLUMNS)
STRATEGIES = {
    "cpu": ({"backend": "cpu"}, SLAB_TILE, SLAB_TILE, [SLAB_TILE]),
    "torch": ({"backend": "torch"}, SLAB_TILE, SLAB_TILE, [SLAB_TILE]),
}
try:
    from fastcache.triton.contrastive import BACKWARD_CONFIGS

    # float64, no guide, under the interpreter (the first configuration): a program owns OWN rows (columns), sweeps
    # SWEPT
    OWN, SWEPT = (BACKWARD_CONFIGS[8, False][0].kwargs[k] for k in ("OWN", "SWEPT"))
    STRATEGIES["tiled"] = ({"backend": "triton", "strategy": "tiled"}, (OWN, SWEPT), (SWEPT, OWN),
                           [(OWN, SWEPT), (SWEPT, OWN)])
except ImportError:  # no Triton: the tiled cases are not collected
    pass


def strategies():
    return [pytest.param(name, marks=INTERPRETER_ONLY) if name == "tiled" else name for name in STRATEGIES]


# B rows against N = columns·B candidates: more than one tile each way for every strategy
ROWS = {"cpu": 70, "torch": 70, "tiled": 40}
COLUMNS = {"cpu": 5, "torch": 5, "tiled": 3}


def _batch(strategy, seed=0, noise=1.0, docs_3d=False, offset=0):
    rows = ROWS[strategy]
    return make_batch(rows, 24, columns=COLUMNS[strategy], positives=rows + offset, offset=offset, seed=seed,
                      noise=noise, docs_3d=docs_3d)


def _exact_grad_of_similarities(batch, scale, similarity, offset=0):
    """dL/ds of the query_to_doc block (joint, no hardness) in float64 with the normalised operands: G, q̂, d̂."""
    q, d = batch["queries"], batch["docs"].reshape(-1, batch["queries"].size(1))
    if similarity == "cos":
        q, d = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    rows = q.size(0)
    probabilities = torch.softmax(scale * q @ d.T, dim=1)
    onehot = F.one_hot(torch.arange(rows) + offset, d.size(0)).to(q.dtype)
    return scale / rows * (probabilities - onehot), q, d


def _kept_tiles(grad, tile, threshold):
    """Per tile (rows × columns from the origin): whether its largest |grad| reaches threshold."""
    return F.max_pool2d(grad.abs()[None], tile, ceil_mode=True)[0] >= threshold


def _tile_mask(grad, tile, threshold):
    """1 on the entries of the tiles whose largest |grad| reaches threshold."""
    kept = _kept_tiles(grad, tile, threshold).to(grad.dtype)
    return kept.repeat_interleave(tile[0], 0).repeat_interleave(tile[1], 1)[:grad.size(0), :grad.size(1)]


def _op(batch, strategy, **options):
    settings = STRATEGIES[strategy][0]
    with count_filtered_tiles() as tiles:
        result = contrastive_loss_and_grad(batch["queries"], batch["docs"], **settings, **options)
    return result, tiles


@pytest.mark.parametrize("strategy", strategies())
@pytest.mark.parametrize("similarity,scale,offset,docs_3d", [("cos", 20.0, 0, False), ("dot", 7.0, 3, True),
                                                             ("cos", -5.0, 2, True)])
@pytest.mark.parametrize("eps", [1e-3, 0.05])
def test_gradient_within_the_bound_and_exactly_the_kept_tiles(strategy, similarity, scale, offset, docs_3d, eps):
    batch = _batch(strategy, offset=offset, docs_3d=docs_3d)
    options = {"scale": scale, "similarity": similarity, "offset": offset}
    reference = {k: v.detach().requires_grad_(True) for k, v in batch.items()}
    loss_ref = contrastive_loss_reference(reference["queries"], reference["docs"], **options)
    loss_ref.backward()
    result, tiles = _op(batch, strategy, filter_eps=eps, **options)
    exact, _ = _op(batch, strategy, **options)
    assert torch.equal(result.loss, exact.loss)  # the filter touches only the backward
    torch.testing.assert_close(result.loss, loss_ref.detach(), rtol=1e-12, atol=1e-12)

    grad, q, d = _exact_grad_of_similarities(batch, scale, similarity, offset)
    threshold = eps * abs(scale) / q.size(0)
    # the stated bound: every skipped entry has |dL/ds| < threshold
    partial = grad.abs().clamp(max=threshold)
    norm_scale = {name: 1 / x.reshape(-1, x.size(-1)).norm(dim=1).clamp(min=1e-12) if similarity == "cos"
                  else torch.ones(x.reshape(-1, x.size(-1)).size(0), dtype=x.dtype)
                  for name, x in (("queries", batch["queries"]), ("docs", batch["docs"]))}
    bounds = {"queries": partial @ d.norm(dim=1) * norm_scale["queries"],
              "docs": partial.T @ q.norm(dim=1) * norm_scale["docs"]}
    for name, ours in (("queries", result.grad_queries), ("docs", result.grad_docs)):
        error = (ours - reference[name].grad).reshape(-1, ours.size(-1)).norm(dim=1)
        assert bool((error <= bounds[name] * (1 + 1e-9) + 1e-13).all()), name

    # exactly the gradient of the kept tiles (each strategy's tile shapes)
    _, row_tile, column_tile, counted = STRATEGIES[strategy]
    x_q = batch["queries"].detach().requires_grad_(True)
    x_d = batch["docs"].reshape(-1, x_q.size(1)).detach().requires_grad_(True)
    normalised = (F.normalize(x_q, dim=-1), F.normalize(x_d, dim=-1)) if similarity == "cos" else (x_q, x_d)
    s = normalised[0] @ normalised[1].T
    (g_q,) = torch.autograd.grad((s * grad * _tile_mask(grad, row_tile, threshold)).sum(), x_q, retain_graph=True)
    (g_d,) = torch.autograd.grad((s * grad * _tile_mask(grad, column_tile, threshold)).sum(), x_d)
    torch.testing.assert_close(result.grad_queries, g_q, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(result.grad_docs.reshape(g_d.shape), g_d, rtol=1e-10, atol=1e-12)
    kept = [_kept_tiles(grad, tile, threshold) for tile in counted]
    assert (tiles.skipped, tiles.total) == (sum(int((~k).sum()) for k in kept), sum(k.numel() for k in kept))


@pytest.mark.parametrize("strategy", strategies())
def test_none_is_the_exact_path(strategy):
    batch = _batch(strategy)
    default, tiles_default = _op(batch, strategy)
    none, tiles_none = _op(batch, strategy, filter_eps=None)
    for a, b in zip(default, none):
        assert torch.equal(a, b) if a is not None else b is None
    assert tiles_default.total == tiles_none.total == 0


@pytest.mark.parametrize("strategy", strategies())
@pytest.mark.parametrize("options", [{}, {"directions": ("query_to_doc", "query_to_query", "doc_to_query",
                                                         "doc_to_doc")},
                                     {"directions": ("query_to_doc", "doc_to_query"),
                                      "partition_mode": "per_direction", "hardness_mode": "hard_negatives",
                                      "hardness_strength": 3.0}])
def test_eps_above_one_skips_every_tile(strategy, options):
    """|dloss_i/dlogit_ij| ≤ 1 for every entry (softmax minus one-hot), so eps = 1.5 skips every tile: gradients
    exactly zero, the loss unchanged."""
    batch = _batch(strategy)
    result, tiles = _op(batch, strategy, filter_eps=1.5, **options)
    exact, _ = _op(batch, strategy, **options)
    assert torch.equal(result.loss, exact.loss)
    assert tiles.total > 0 and tiles.skipped == tiles.total
    assert not result.grad_queries.any() and not result.grad_docs.any()


@pytest.mark.parametrize("strategy", strategies())
def test_positives_tiles_kept_when_their_gradient_reaches_eps(strategy):
    """scale 1: every softmax entry is ~1/N, so |dloss_i/dlogit| is ~1/N at a negative and ~1 - 1/N at the
    positive; eps = 0.5 sits between them: exactly the tiles holding a positive are kept, and the gradient is that
    of the positives' entries and their tiles' negatives."""
    batch = _batch(strategy)
    result, tiles = _op(batch, strategy, filter_eps=0.5, scale=1.0)
    grad, q, _ = _exact_grad_of_similarities(batch, 1.0, "cos")
    rows = q.size(0)
    positives = grad[torch.arange(rows), torch.arange(rows)].abs() * rows
    negatives = grad.clone()
    negatives[torch.arange(rows), torch.arange(rows)] = 0
    assert positives.min() > 0.5 > negatives.abs().max() * rows  # the maths says: keep positives, skip the rest
    _, row_tile, _, _ = STRATEGIES[strategy]
    kept = _tile_mask(grad, row_tile, 0.5 / rows)
    assert bool((kept[torch.arange(rows), torch.arange(rows)] == 1).all())
    assert 0 < tiles.skipped < tiles.total
    assert result.grad_queries.abs().sum(dim=1).min() > 0  # every row keeps its positive's gradient


def test_auto_is_cut_cross_entropys_value():
    """"auto": torch.finfo(dtype).eps / 32, as Cut Cross-Entropy's _handle_eps."""
    for dtype, value in ((torch.bfloat16, 2.0**-12), (torch.float16, 2.0**-15), (torch.float32, 2.0**-28),
                         (torch.float64, 2.0**-57)):
        assert ContrastiveOptions(filter_eps="auto").for_dtype(dtype).filter_eps == value
    assert ContrastiveOptions(filter_eps=0.25).for_dtype(torch.bfloat16).filter_eps == 0.25


def test_auto_filters_float32_calls():
    batch = {k: v.float() for k, v in _batch("cpu").items()}
    with count_filtered_tiles() as tiles:
        result = contrastive_loss_and_grad(batch["queries"], batch["docs"], backend="cpu", filter_eps="auto")
    assert tiles.total > 0 and torch.isfinite(result.grad_queries).all()


@pytest.mark.parametrize("value", [0, 0.0, -1e-3, float("nan"), float("inf"), "Auto", "1e-3", True, [1e-3]])
def test_bad_values_name_the_argument(value):
    batch = _batch("cpu")
    with pytest.raises(ValueError, match="filter_eps"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"], filter_eps=value)


@pytest.mark.parametrize("strategy", [pytest.param("fused_slab", marks=INTERPRETER_ONLY)])
def test_fused_slab_refuses_it(strategy):
    batch = _batch("cpu")
    with pytest.raises(ValueError, match="filter_eps"):
        contrastive_loss_and_grad(batch["queries"], batch["docs"], backend="triton", strategy=strategy,
                                  filter_eps=1e-3)


def test_matryoshka_refuses_it():
    batch = _batch("cpu")
    with pytest.raises(ValueError, match="filter_eps"):
        matryoshka_contrastive_loss_and_grad(batch["queries"], batch["docs"], dims=(24, 8), filter_eps=1e-3)
