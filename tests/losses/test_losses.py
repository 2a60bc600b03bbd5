"""fastcache's drop-in losses against sentence-transformers' classes of the same name, on a tiny BERT.

Each ``fastcache.losses`` class replaces only the loss maths of its sentence-transformers 6.0.1 parent, so on the
same tokenized text it must give the same loss and the same parameter gradients after ``backward()``: the loss
within 1e-4 relative, each gradient within rtol 1e-4 plus an atol of 1e-5 times the largest gradient entry. The
model stays in eval() (dropout off) for these comparisons, except in the dropout-replay test.

The texts are random sentences over the tiny vocabulary (words of the vocab and random letter strings); a
positive keeps most words of its anchor and a hard negative shares three words with it, so the positive is
usually, not always, the best match: losses and gradients are far from zero and GIST's guide masks some
candidates, not all (``test_texts_give_non_degenerate_embeddings`` checks this). Every comparison also checks
that the loss and the gradients it compares are non-trivial. (This needs a tokenizer that knows the tiny
vocabulary: one that maps every word to [UNK] makes all texts of one length embed alike; the fixtures check it.)

The reference classes are imported from their defining modules, so fastcache.patch_sentence_transformers() (which
swaps names in the public losses module) cannot turn a comparison into fastcache against itself.
"""

from __future__ import annotations

import functools
import random
import warnings

import pytest
import torch
from conftest import _WORDS, build_tiny_bert
from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import uses_gradient_cache
from sentence_transformers.sentence_transformer.losses.cached_gist_embed import (
    CachedGISTEmbedLoss as STCachedGISTEmbedLoss,
)
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_ranking import (
    CachedMultipleNegativesRankingLoss as STCachedMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.cached_multiple_negatives_symmetric_ranking import (
    CachedMultipleNegativesSymmetricRankingLoss as STCachedMultipleNegativesSymmetricRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.gist_embed import GISTEmbedLoss as STGISTEmbedLoss
from sentence_transformers.sentence_transformer.losses.matryoshka import MatryoshkaLoss
from sentence_transformers.sentence_transformer.losses.multiple_negatives_ranking import (
    MultipleNegativesRankingLoss as STMultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.losses.multiple_negatives_symmetric_ranking import (
    MultipleNegativesSymmetricRankingLoss as STMultipleNegativesSymmetricRankingLoss,
)
from sentence_transformers.util import cos_sim, dot_score, euclidean_sim, pytorch_cos_sim

from fastcache import losses as fc_losses

ROWS = 8
UPSTREAM = {
    "MultipleNegativesRankingLoss": STMultipleNegativesRankingLoss,
    "CachedMultipleNegativesRankingLoss": STCachedMultipleNegativesRankingLoss,
    "MultipleNegativesSymmetricRankingLoss": STMultipleNegativesSymmetricRankingLoss,
    "CachedMultipleNegativesSymmetricRankingLoss": STCachedMultipleNegativesSymmetricRankingLoss,
    "GISTEmbedLoss": STGISTEmbedLoss,
    "CachedGISTEmbedLoss": STCachedGISTEmbedLoss,
}
NAMES = tuple(UPSTREAM)
CACHED = tuple(name for name in NAMES if name.startswith("Cached"))
MNRL_NAMES = tuple(name for name in NAMES if "GIST" not in name)
GIST_NAMES = ("GISTEmbedLoss", "CachedGISTEmbedLoss")
SYMMETRIC = ("MultipleNegativesSymmetricRankingLoss", "CachedMultipleNegativesSymmetricRankingLoss")

# Every valid (directions, partition_mode): query_to_doc always; per_direction only without qq / dd.
_SHORT = {"qd": "query_to_doc", "qq": "query_to_query", "dq": "doc_to_query", "dd": "doc_to_doc"}
DIRECTION_CONFIGS = [
    (tuple(_SHORT[s] for s in ids.split("+")), mode)
    for ids, mode in [
        ("qd", "joint"), ("qd+qq", "joint"), ("qd+dq", "joint"), ("qd+dd", "joint"), ("qd+qq+dq", "joint"),
        ("qd+qq+dd", "joint"), ("qd+dq+dd", "joint"), ("qd+qq+dq+dd", "joint"),
        ("qd", "per_direction"), ("qd+dq", "per_direction"),
    ]
]
DIRECTION_IDS = ["+".join(k for k, v in _SHORT.items() if v in dirs) + f"-{mode}" for dirs, mode in DIRECTION_CONFIGS]
HARDNESS = [("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 2.0), (None, 0.0)]


# ---------------------------------------------------------------------------------------------------------------
# Models, texts, features
# ---------------------------------------------------------------------------------------------------------------


def _knows_its_vocab(model) -> bool:
    return model.tokenizer.convert_tokens_to_ids("weather") != model.tokenizer.unk_token_id


def _tiny_bert(folder, seed: int, hidden_size: int = 32) -> SentenceTransformer:
    """conftest's tiny BERT (for tests that train it or need another width)."""
    built = build_tiny_bert(folder, seed=seed, hidden_size=hidden_size)
    assert _knows_its_vocab(built), "conftest's tokenizer maps every word to [UNK]: the texts would embed alike"
    return built


@pytest.fixture(scope="module")
def model(tiny_model):
    """The trained model: conftest's tiny BERT (32 dims, mean pooling), in eval mode between tests."""
    assert _knows_its_vocab(tiny_model), "conftest's tokenizer maps every word to [UNK]: the texts would embed alike"
    return tiny_model


@pytest.fixture(scope="module")
def guide(tiny_guide_model):
    """GIST's guide: the same architecture and tokenizer, another seed."""
    return tiny_guide_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tensors here are tiny, and with two threads on a busy 2-core machine the
    threads' spin-waits made this file about eight times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _clean(request):
    """Every test starts and ends with the shared models in eval mode and without gradients."""
    models = [request.getfixturevalue(name) for name in ("model", "guide") if name in request.fixturenames]
    for m in models:
        m.eval()
        m.zero_grad(set_to_none=True)
    yield
    for m in models:
        m.eval()
        m.zero_grad(set_to_none=True)


def _word(rng: random.Random) -> str:
    if rng.random() < 0.4:
        return rng.choice(_WORDS)
    return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 5)))


@functools.lru_cache(maxsize=None)
def _texts(columns: int, rows: int = ROWS, seed: int = 0) -> tuple[tuple[str, ...], ...]:
    """``columns`` text columns of ``rows`` rows: anchors, positives (most of the anchor's words plus one), then
    hard negatives (three of the anchor's words among random ones)."""
    rng = random.Random(f"{seed}-{columns}-{rows}")
    anchors = [[_word(rng) for _ in range(rng.randint(3, 8))] for _ in range(rows)]
    out = [[" ".join(a) for a in anchors]]
    out.append([" ".join([w for w in a if rng.random() < 0.7] + [_word(rng)]) for a in anchors])
    for _ in range(columns - 2):
        out.append([" ".join(rng.sample(a, k=min(3, len(a))) + [_word(rng) for _ in range(rng.randint(1, 3))])
                    for a in anchors])
    return tuple(tuple(column) for column in out)


def _features(model, texts) -> list[dict]:
    """Fresh tokenized features for each column (modules may write into the dicts they are given)."""
    return [model.preprocess(list(column)) for column in texts]


def _make(name: str, impl: str, model, guide=None, **kwargs):
    """The loss ``name`` from fastcache (impl="fc") or sentence-transformers (impl="st")."""
    cls = getattr(fc_losses, name) if impl == "fc" else UPSTREAM[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the two symmetric classes are deprecated upstream
        if "GIST" in name:
            return cls(model, guide, **kwargs)
        return cls(model, **kwargs)


def _grads(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _run(loss, model, texts, *, scale: float = 1.0):
    """loss(features) → (scale · loss).backward() → (loss value, the model's parameter gradients)."""
    model.zero_grad(set_to_none=True)
    value = loss(_features(model, texts), None)
    (value * scale if scale != 1.0 else value).backward()
    return value.detach().clone(), _grads(model)


def _grad_scale(grads: dict[str, torch.Tensor]) -> float:
    return max(float(g.abs().max()) for g in grads.values())


def _assert_same(actual, expected, *, rtol: float = 1e-4, atol: float = 1e-5, what: str = "") -> None:
    """Same loss (relative 1e-4) and same gradients (rtol, plus atol times the largest gradient entry); the
    expected loss and gradients must be non-trivial."""
    loss_a, grads_a = actual
    loss_e, grads_e = expected
    assert torch.isfinite(loss_e) and float(loss_e.abs()) > 1e-3, f"{what}: trivial reference loss {loss_e}"
    torch.testing.assert_close(loss_a, loss_e, rtol=1e-4, atol=1e-7, msg=lambda m: f"{what} loss: {m}")
    assert grads_a.keys() == grads_e.keys(), f"{what}: gradients of different parameters"
    scale = _grad_scale(grads_e)
    assert scale > 1e-4, f"{what}: vanishing reference gradients (largest entry {scale})"
    for name in grads_e:
        torch.testing.assert_close(grads_a[name], grads_e[name], rtol=rtol, atol=atol * scale,
                                   msg=lambda m, name=name: f"{what} grad of {name}: {m}")


def _compare(name, model, texts, guide=None, **kwargs):
    """fastcache's and sentence-transformers' ``name`` on the same features: same loss and gradients."""
    expected = _run(_make(name, "st", model, guide, **kwargs), model, texts)
    actual = _run(_make(name, "fc", model, guide, **kwargs), model, texts)
    _assert_same(actual, expected, what=f"{name}{kwargs}")
    return actual


# ---------------------------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------------------------


def test_texts_give_non_degenerate_embeddings(model, guide):
    texts = _texts(3)
    assert all(len(set(column)) == ROWS for column in texts)
    with torch.no_grad():
        emb = [model.encode(list(c), convert_to_tensor=True) for c in texts]
        gemb = [guide.encode(list(c), convert_to_tensor=True) for c in texts]
    sim = cos_sim(emb[0], emb[1])
    off = ~torch.eye(ROWS, dtype=torch.bool)
    assert float((1 - cos_sim(emb[1], emb[1])[off]).min()) > 1e-3  # no two positives embed alike
    assert float(sim.diagonal().mean()) > float(sim[off].mean())  # positives are nearer on average...
    assert int((sim.argmax(dim=1) == torch.arange(ROWS)).sum()) >= ROWS // 2
    # ... and GIST's guide (margin 0) masks some in-batch candidates, not all
    gsim = cos_sim(gemb[0], torch.cat(gemb[1:]))
    masked = gsim > gsim[torch.arange(ROWS), torch.arange(ROWS)].unsqueeze(1)
    assert 0 < int(masked.sum()) < masked.numel() // 2


# ---------------------------------------------------------------------------------------------------------------
# MultipleNegativesRankingLoss family
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("columns", [2, 3, 4])
@pytest.mark.parametrize(("directions", "partition_mode"), DIRECTION_CONFIGS, ids=DIRECTION_IDS)
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_mnrl_directions(model, name, directions, partition_mode, columns):
    extra = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    _compare(name, model, _texts(columns), directions=directions, partition_mode=partition_mode, **extra)


@pytest.mark.parametrize("columns", [2, 4])
@pytest.mark.parametrize(("directions", "partition_mode"),
                         [DIRECTION_CONFIGS[0], DIRECTION_CONFIGS[7], DIRECTION_CONFIGS[9]],
                         ids=[DIRECTION_IDS[0], DIRECTION_IDS[7], DIRECTION_IDS[9]])
@pytest.mark.parametrize(("hardness_mode", "hardness_strength"), HARDNESS, ids=[str(m) for m, _ in HARDNESS])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_mnrl_hardness(model, name, hardness_mode, hardness_strength, directions, partition_mode, columns):
    extra = {"mini_batch_size": 5} if name.startswith("Cached") else {}
    _compare(name, model, _texts(columns), directions=directions, partition_mode=partition_mode,
             hardness_mode=hardness_mode, hardness_strength=hardness_strength, **extra)


def _custom_cos(a, b):
    return cos_sim(a, b)


SIMILARITIES = {
    "cos_sim": (cos_sim, 20.0),
    "dot_score": (dot_score, 0.5),
    "lambda_cos": (lambda a, b: cos_sim(a, b), 20.0),
    "partial_cos": (functools.partial(cos_sim), 20.0),
    "pytorch_cos_sim": (pytorch_cos_sim, 20.0),
    "function_cos": (_custom_cos, 15.0),
    "euclidean_sim": (euclidean_sim, 2.0),
}


@pytest.mark.parametrize("columns", [2, 3])
@pytest.mark.parametrize("similarity", list(SIMILARITIES))
@pytest.mark.parametrize("name", MNRL_NAMES)
def test_mnrl_similarity_functions(model, name, similarity, columns):
    """cos_sim / dot_score run fused; any other callable (lambda, partial, another function) keeps upstream's
    maths and must still match."""
    fct, scale = SIMILARITIES[similarity]
    extra = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    if name in SYMMETRIC:
        _compare(name, model, _texts(columns), similarity_fct=fct, scale=scale, **extra)
    else:
        _compare(name, model, _texts(columns), similarity_fct=fct, scale=scale,
                 directions=("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"), **extra)


@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss"])
def test_mnrl_scales_and_single_process_gather(model, name, scale):
    """scale reaches the maths; gather_across_devices=True without a process group is the local loss."""
    extra = {"mini_batch_size": 4} if name.startswith("Cached") else {}
    _compare(name, model, _texts(3), scale=scale, gather_across_devices=True, **extra)


@pytest.mark.parametrize(("mini_batch_size", "mini_batch_num_tokens"),
                         [(1, None), (3, None), (4, None), (8, None), (32, None), (32, 40), (32, 100), (3, 60)])
@pytest.mark.parametrize("name", CACHED)
def test_cached_mini_batches(model, guide, name, mini_batch_size, mini_batch_num_tokens):
    """Mini-batches that do and do not divide the batch (8 rows), larger than it, and token budgets."""
    _compare(name, model, _texts(3), guide=guide, mini_batch_size=mini_batch_size,
             mini_batch_num_tokens=mini_batch_num_tokens)


# ---------------------------------------------------------------------------------------------------------------
# GISTEmbedLoss and CachedGISTEmbedLoss
# ---------------------------------------------------------------------------------------------------------------

MARGINS = [("absolute", 0.0), ("absolute", 0.01), ("absolute", 0.03), ("relative", 0.0), ("relative", 0.01),
           ("relative", 0.05)]


@pytest.mark.parametrize(("contrast_anchors", "contrast_positives"),
                         [(True, True), (True, False), (False, True), (False, False)], ids=["aa+pp", "aa", "pp", "-"])
@pytest.mark.parametrize(("margin_strategy", "margin"), MARGINS, ids=[f"{s}-{m}" for s, m in MARGINS])
@pytest.mark.parametrize("name", GIST_NAMES)
def test_gist_margins_and_contrasts(model, guide, name, margin_strategy, margin, contrast_anchors,
                                    contrast_positives):
    extra = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    _compare(name, model, _texts(3), guide=guide, margin_strategy=margin_strategy, margin=margin,
             contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, **extra)


@pytest.mark.parametrize(("name", "columns"),
                         [("GISTEmbedLoss", 2), ("CachedGISTEmbedLoss", 2), ("CachedGISTEmbedLoss", 4)])
@pytest.mark.parametrize("temperature", [0.01, 0.05])
@pytest.mark.parametrize(("contrast_anchors", "contrast_positives"), [(True, True), (False, False)],
                         ids=["aa+pp", "-"])
def test_gist_columns(model, guide, name, columns, temperature, contrast_anchors, contrast_positives):
    extra = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    _compare(name, model, _texts(columns), guide=guide, temperature=temperature, margin=0.01,
             contrast_anchors=contrast_anchors, contrast_positives=contrast_positives, **extra)


@pytest.mark.parametrize("name", GIST_NAMES)
def test_gist_guide_that_retokenizes(model, tmp_path, name):
    """A guide with another width and a shorter max_seq_length: the texts are re-tokenized for it.

    The reference is upstream's GISTEmbedLoss for both: upstream's CachedGISTEmbedLoss crashes on this path in
    sentence-transformers 6.0.1 (it calls .to() on every value of the guide's features, and preprocess() returns
    the string 'modality' among them), so fastcache's cached class must not inherit that embed_minibatch as is.
    """
    other = _tiny_bert(tmp_path / "guide48", seed=2, hidden_size=48)
    other.max_seq_length = 32
    extra = {"mini_batch_size": 3} if name.startswith("Cached") else {}
    ours = _make(name, "fc", model, other, margin=0.01, **extra)
    assert ours.must_retokenize
    expected = _run(_make("GISTEmbedLoss", "st", model, other, margin=0.01), model, _texts(3))
    _assert_same(_run(ours, model, _texts(3)), expected, what=f"{name} re-tokenizing guide")


# ---------------------------------------------------------------------------------------------------------------
# Gradient caching: dropout replay, several forwards, scaled backward, no_grad, autocast
# ---------------------------------------------------------------------------------------------------------------

MAIN_KWARGS = {
    "MultipleNegativesRankingLoss": {},
    "CachedMultipleNegativesRankingLoss": {"mini_batch_size": 3},
    "MultipleNegativesSymmetricRankingLoss": {},
    "CachedMultipleNegativesSymmetricRankingLoss": {"mini_batch_size": 3},
    "GISTEmbedLoss": {"margin": 0.01},
    "CachedGISTEmbedLoss": {"mini_batch_size": 3, "margin": 0.01},
}


@pytest.mark.parametrize("name", CACHED)
def test_cached_dropout_replay(model, guide, name):
    """With dropout on, the cached loss replays each mini-batch's RNG: two runs from one seed give bit-identical
    gradients, equal to upstream's cached loss from the same seed; another seed gives other gradients."""
    texts = _texts(3)
    runs = {}
    model.train()
    for key, impl, seed in [("fc", "fc", 7), ("fc_again", "fc", 7), ("st", "st", 7), ("fc_other_seed", "fc", 8)]:
        torch.manual_seed(seed)
        runs[key] = _run(_make(name, impl, model, guide, **MAIN_KWARGS[name]), model, texts)
    model.eval()
    eval_run = _run(_make(name, "fc", model, guide, **MAIN_KWARGS[name]), model, texts)
    assert torch.equal(runs["fc"][0], runs["fc_again"][0])
    for param, grad in runs["fc"][1].items():
        assert torch.equal(grad, runs["fc_again"][1][param]), f"{param}: not bit-identical across two runs"
    _assert_same(runs["fc"], runs["st"], what=f"{name} train mode")
    # dropout was on: another seed and eval mode give other gradients
    for other in (runs["fc_other_seed"], eval_run):
        assert any(not torch.allclose(g, other[1][p], rtol=1e-3, atol=1e-6) for p, g in runs["fc"][1].items())


@pytest.mark.parametrize("name", NAMES)
def test_two_forwards_then_one_backward(model, guide, name):
    """loss(batch 1), loss(batch 2), then (l1 + l2).backward() equals the sum of two separate backward passes:
    each hook back-propagates its own forward's cache."""
    loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
    texts_1, texts_2 = _texts(3, seed=1), _texts(3, seed=2)
    l1, g1 = _run(loss, model, texts_1)
    l2, g2 = _run(loss, model, texts_2)
    first = loss(_features(model, texts_1), None)
    second = loss(_features(model, texts_2), None)
    (first + second).backward()
    together = (first.detach() + second.detach(), _grads(model))
    _assert_same(together, (l1 + l2, {p: g1[p] + g2[p] for p in g1}), rtol=1e-5, atol=1e-6, what=name)


@pytest.mark.parametrize("name", NAMES)
def test_backward_scaling(model, guide, name):
    """(loss / 4).backward() (gradient accumulation) gives gradients / 4; loss · 1024 (a GradScaler) · 1024."""
    loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
    texts = _texts(3)
    base = _run(loss, model, texts)
    for factor in (0.25, 1024.0):
        value, grads = _run(loss, model, texts, scale=factor)
        _assert_same((value, {p: g / factor for p, g in grads.items()}), base, rtol=1e-5, atol=1e-6,
                     what=f"{name} x{factor}")


@pytest.mark.parametrize("name", NAMES)
def test_no_grad(model, guide, name):
    """Under torch.no_grad(): the same value as with gradients, no graph, no hook, no parameter gradient."""
    loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
    texts = _texts(3)
    with_grad = loss(_features(model, texts), None).detach()
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        value = loss(_features(model, texts), None)
    assert not value.requires_grad and value.grad_fn is None
    assert not value._backward_hooks
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(value, with_grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_autocast_bfloat16(model, guide, name):
    """Under autocast(cpu, bfloat16) the loss runs and its loss and gradients stay close to float32."""
    texts = _texts(3)
    loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
    fp32 = _run(loss, model, texts)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        value = loss(_features(model, texts), None)
    value.backward()
    grads = _grads(model)
    assert torch.isfinite(value)
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads.keys() == fp32[1].keys()
    torch.testing.assert_close(value.float(), fp32[0], rtol=0.05, atol=0.02)
    flat = torch.cat([grads[p].flatten().float() for p in fp32[1]])
    flat32 = torch.cat([fp32[1][p].flatten() for p in fp32[1]])
    assert float((flat - flat32).norm() / flat32.norm()) < 0.1
    assert float(torch.nn.functional.cosine_similarity(flat, flat32, dim=0)) > 0.99


# ---------------------------------------------------------------------------------------------------------------
# The sentence-transformers surface: config, citation, isinstance, calculate_loss, MatryoshkaLoss, the trainer
# ---------------------------------------------------------------------------------------------------------------

SURFACE_KWARGS = [
    {},
    {"scale": 30.0, "similarity_fct": dot_score, "directions": ("query_to_doc", "doc_to_query"),
     "partition_mode": "per_direction"},
    {"directions": ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"),
     "hardness_mode": "all_negatives", "hardness_strength": 3.0},
]


def _surface(loss) -> dict:
    return {
        "config": loss.get_config_dict(),
        "citation": getattr(loss, "citation", None),  # upstream's CachedGISTEmbedLoss has none
        "uses_gradient_cache": uses_gradient_cache(loss),
        "requires_media_counts": getattr(loss, "requires_media_counts", None),
        "temperature": getattr(loss, "temperature", None),
    }


@pytest.mark.parametrize("kwargs", range(len(SURFACE_KWARGS)))
@pytest.mark.parametrize("name", NAMES)
def test_config_citation_and_isinstance(model, guide, name, kwargs):
    if "GIST" in name:
        kwargs = [{}, {"temperature": 0.05, "margin_strategy": "relative", "margin": 0.1},
                  {"contrast_anchors": False, "contrast_positives": False}][kwargs]
    elif name in SYMMETRIC:
        kwargs = [{}, {"scale": 30.0, "similarity_fct": dot_score}, {"gather_across_devices": True}][kwargs]
    else:
        kwargs = SURFACE_KWARGS[kwargs]
    if name.startswith("Cached"):
        kwargs = {**kwargs, "mini_batch_size": 5, "mini_batch_num_tokens": 64}
    ours = _make(name, "fc", model, guide, **kwargs)
    theirs = _make(name, "st", model, guide, **kwargs)
    assert isinstance(ours, UPSTREAM[name])
    assert type(ours).__name__ == name
    assert type(theirs).__module__.startswith("sentence_transformers.")
    assert _surface(ours) == _surface(theirs)


def _split_reps(tensors, sizes=(3, 3, 2), requires_grad=True):
    return [[t.detach().clone().requires_grad_(requires_grad) for t in column.split(list(sizes))]
            for column in tensors]


@pytest.mark.parametrize("with_backward", [True, False])
@pytest.mark.parametrize("name", CACHED)
def test_calculate_loss_directly(model, guide, name, with_backward):
    """calculate_loss(reps, labels, with_backward=...) on mini-batch lists of embeddings: the loss and the
    embeddings' gradients of upstream's; with_backward=True returns a detached loss."""
    texts = _texts(4)
    with torch.no_grad():
        emb = [model.encode(list(c), convert_to_tensor=True) for c in texts]
        guided = [guide.encode(list(c), convert_to_tensor=True) for c in texts]
    results = {}
    for impl in ("st", "fc"):
        loss = _make(name, impl, model, guide, **MAIN_KWARGS[name])
        reps = _split_reps(emb)
        second = _split_reps(guided, requires_grad=False) if "GIST" in name else None
        value = loss.calculate_loss(reps, second, with_backward=with_backward)
        if with_backward:
            assert not value.requires_grad
        else:
            assert all(r.grad is None for column in reps for r in column)
            value.backward()
        results[impl] = (value.detach(), {f"{c}.{i}": r.grad for c, col in enumerate(reps) for i, r in enumerate(col)})
    _assert_same(results["fc"], results["st"], rtol=1e-4, atol=1e-5, what=name)


@pytest.mark.parametrize(("name", "weights"), [("CachedMultipleNegativesRankingLoss", None),
                                               ("CachedMultipleNegativesRankingLoss", [1.0, 0.5]),
                                               ("CachedGISTEmbedLoss", None),
                                               ("MultipleNegativesRankingLoss", [1.0, 0.3]),
                                               ("GISTEmbedLoss", None)])
def test_matryoshka_wraps_ours(model, guide, name, weights):
    """MatryoshkaLoss(model, ours, [32, 16]) gives the loss and gradients of MatryoshkaLoss around upstream's
    (for cached losses it decorates calculate_loss, for the others the model's forward)."""
    runs = {}
    for impl in ("st", "fc"):
        inner = _make(name, impl, model, guide, **MAIN_KWARGS[name])
        wrapped = MatryoshkaLoss(model, inner, [32, 16], matryoshka_weights=weights)
        assert wrapped.uses_gradient_cache == name.startswith("Cached")
        runs[impl] = _run(wrapped, model, _texts(3))
    _assert_same(runs["fc"], runs["st"], what=f"Matryoshka({name})")


def test_trainer_steps_save_and_reload(tmp_path):
    """A few SentenceTransformerTrainer steps with fastcache's CachedMNRL: the training loss goes down, the model
    saves (with a model card) and reloads to the same embeddings."""
    datasets = pytest.importorskip("datasets")
    pytest.importorskip("accelerate")
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = _tiny_bert(tmp_path / "model", seed=0)
    anchors, positives = _texts(2, rows=16, seed=3)
    dataset = datasets.Dataset.from_dict({"anchor": list(anchors), "positive": list(positives)})
    loss = fc_losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=6, per_device_train_batch_size=8, learning_rate=2e-3,
        report_to="none", save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss)
    assert isinstance(trainer.loss, fc_losses.CachedMultipleNegativesRankingLoss)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 6 and all(map(torch.isfinite, torch.tensor(losses)))
    # 2 batches an epoch: the last epoch's batches against the first epoch's
    assert sum(losses[-2:]) < 0.8 * sum(losses[:2]), losses

    model.eval()
    saved = tmp_path / "saved"
    model.save(str(saved))
    card = (saved / "README.md").read_text()
    assert "CachedMultipleNegativesRankingLoss" in card
    reloaded = SentenceTransformer(str(saved), device="cpu")
    reloaded.eval()
    sentences = list(anchors[:4])
    torch.testing.assert_close(reloaded.encode(sentences, convert_to_tensor=True),
                               model.encode(sentences, convert_to_tensor=True), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_fewer_than_two_columns(model, guide, name):
    """One column is a ValueError (upstream's CachedGISTEmbedLoss fails with an IndexError instead)."""
    features = _features(model, _texts(2)[:1])
    with pytest.raises(Exception):
        _make(name, "st", model, guide, **MAIN_KWARGS[name])(features, None)
    with pytest.raises(ValueError, match="2"):
        _make(name, "fc", model, guide, **MAIN_KWARGS[name])(_features(model, _texts(2)[:1]), None)


@pytest.mark.parametrize("name", GIST_NAMES[:1])
def test_gist_more_than_three_columns(model, guide, name):
    for impl in ("st", "fc"):
        with pytest.raises(ValueError, match="2 or 3"):
            _make(name, impl, model, guide)(_features(model, _texts(4)), None)


@pytest.mark.parametrize(("column", "rows"), [(1, 6), (1, 10), (2, 5)])
@pytest.mark.parametrize("name", NAMES)
def test_columns_of_different_lengths(model, guide, name, column, rows):
    """A column with another number of rows than the anchors is a ValueError that names the column (upstream
    may raise an IndexError or silently compute a loss)."""
    texts = list(_texts(3, rows=10))
    texts = [list(c[:ROWS]) for c in texts]
    texts[column] = list(_texts(3, rows=10)[column][:rows])
    loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
    with pytest.raises(ValueError, match=rf"column {column}\b"):
        loss(_features(model, texts), None)


def test_nan_embeddings(model, guide):
    """NaN embeddings are a ValueError, through compute_loss_from_embeddings and through calculate_loss."""
    emb = [torch.randn(ROWS, 32) for _ in range(3)]
    emb[1][2, 5] = float("nan")
    for name in ("MultipleNegativesRankingLoss", "MultipleNegativesSymmetricRankingLoss"):
        loss = _make(name, "fc", model)
        with pytest.raises(ValueError, match="NaN"):
            loss.compute_loss_from_embeddings([e.clone().requires_grad_() for e in emb], None)
    for name in CACHED:
        loss = _make(name, "fc", model, guide, **MAIN_KWARGS[name])
        second = _split_reps([torch.randn(ROWS, 32) for _ in range(3)], requires_grad=False) if "GIST" in name else None
        with pytest.raises(ValueError, match="NaN"):
            loss.calculate_loss(_split_reps(emb), second, with_backward=True)
    # NaN in the guide's embeddings
    guided = [torch.randn(ROWS, 32) for _ in range(3)]
    guided[0][0, 0] = float("nan")
    loss = _make("CachedGISTEmbedLoss", "fc", model, guide)
    with pytest.raises(ValueError, match="NaN"):
        loss.calculate_loss(_split_reps([torch.randn(ROWS, 32) for _ in range(3)]),
                            _split_reps(guided, requires_grad=False))


BAD_OPTIONS = [
    {"scale": 0.0},
    {"scale": -1.0},
    {"directions": ("query_to_doc", "sideways")},
    {"directions": ("doc_to_query",)},
    {"directions": ()},
    {"partition_mode": "both"},
    {"directions": ("query_to_doc", "query_to_query"), "partition_mode": "per_direction"},
    {"hardness_mode": "hardest"},
    {"hardness_mode": "all_negatives", "hardness_strength": -1.0},
]


@pytest.mark.parametrize(("name", "kwargs"), [
    pytest.param(name, kwargs, id=f"{name}-{kwargs}") for name in MNRL_NAMES for kwargs in BAD_OPTIONS
    if name not in SYMMETRIC or set(kwargs) == {"scale"}  # the symmetric classes take only scale of these
])
def test_bad_options_are_value_errors_as_upstream(model, name, kwargs):
    for impl in ("st", "fc"):
        with pytest.raises(ValueError):
            _make(name, impl, model, **kwargs)


@pytest.mark.parametrize("name", GIST_NAMES)
def test_bad_gist_margin_strategy(model, guide, name):
    for impl in ("st", "fc"):
        with pytest.raises(ValueError, match="margin_strategy"):
            _make(name, impl, model, guide, margin_strategy="percent")


@pytest.mark.parametrize("name", CACHED)
def test_static_embedding_model_under_cached_losses(model, guide, name):
    """A StaticEmbedding model cannot be split into mini-batches: ValueError, as upstream."""
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding

    static = SentenceTransformer(modules=[StaticEmbedding(model.tokenizer, embedding_dim=16)], device="cpu")
    for impl in ("st", "fc"):
        with pytest.raises(ValueError, match="StaticEmbedding"):
            _make(name, impl, static, guide)
