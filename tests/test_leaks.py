"""Resource hygiene: memory stays flat over many iterations, and interrupted runs leave no state behind.

Memory. Two measures, each able to fail:
* RSS (``/proc/self/statm``) from after a warm-up to the end of 1000 iterations of the op and of the Matryoshka
  op (every CPU backend, both paths) and of each drop-in loss at the embedding level, fastcache's MatryoshkaLoss
  around MNRL, cached MNRL and cached GIST included (the compiled extension, the autograd Function, the cached
  losses' calculate_loss). The bound, RSS_BOUND = 8 MiB, is well below what leaking one input per
  iteration would add (900 iterations x 64 KiB = 56 MiB, checked), and above the allocator's own jitter.
* Live tensors (every ``torch.Tensor`` the garbage collector can see) through the model, for every drop-in loss
  and MatryoshkaLoss around the three, including the gradient cache's RNG states, cached gradients and replay
  hook: the count after the last iteration equals the count after the first, so not even one tensor per step
  survives.
The model-level loop runs MODEL_ITERATIONS steps (50 in CI: one tensor kept per step would show 50 times;
FASTCACHE_LEAK_ITERATIONS=1000 on demand); the op and embedding loops always run 1000. Everything runs on one
thread: on a loaded machine, spin-waiting intra-op threads make each small step 70x slower (measured: 2.3 ms on
one thread, 160 ms on two with the cores oversubscribed), and what leaks does not depend on the thread count.

Interrupted runs. An exception inside the cached backward (a replayed mini-batch fails), a KeyboardInterrupt
while embedding the mini-batches, an exception inside the op's slab loop (the Matryoshka op's too, under
fastcache's MatryoshkaLoss, whose inner loss must be left as it was), and a step whose loss is never
back-propagated: afterwards the loss object's attributes are what they were, the global RNG state is restored,
no tensor is left alive, and the next normal step gives bitwise the result of a fresh loss object.
"""

from __future__ import annotations

import gc
import os
import warnings
from functools import partial

import pytest
import torch

from fastcache import _backend, contrastive_loss, contrastive_loss_and_grad
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.matryoshka import matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad
from drop_in_losses import LOSSES, MATRYOSHKA_INNER, TEXTS, make_loss, make_matryoshka_loss
from helpers import make_batch

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
# the CPU backends (Triton on CPU is its interpreter, NumPy code with nothing compiled of ours to leak)
BACKENDS = [name for name, reason in contrastive_epilogue.available(torch.device("cpu")).items()
            if reason is None and name in ("cpu", "torch")]
ITERATIONS = 1000
WARM_UP = 100
MODEL_ITERATIONS = int(os.environ.get("FASTCACHE_LEAK_ITERATIONS", "50"))
RSS_BOUND = 8 * 2**20
ROWS, DIM = 64, 128  # one float32 input of [ROWS, DIM] is 32 KiB; docs (2 columns) 64 KiB


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated module attributes warns
        warnings.simplefilter("ignore", FutureWarning)
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


def assert_rss_flat(step, iterations: int = ITERATIONS) -> None:
    """Run ``step`` WARM_UP times, then to ``iterations``: RSS grows by less than RSS_BOUND."""
    for _ in range(WARM_UP):
        step()
    gc.collect()
    start = rss()
    for _ in range(iterations - WARM_UP):
        step()
    gc.collect()
    growth = rss() - start
    assert growth < RSS_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {iterations - WARM_UP} iterations"


def test_the_bound_would_catch_a_leaked_input():
    leaked_per_iteration = 2 * ROWS * DIM * 4  # the docs of one call
    assert (ITERATIONS - WARM_UP) * leaked_per_iteration > 6 * RSS_BOUND


def _op_step(loss_fn, loss_and_grad_fn, path: str, batch: dict, options: dict):
    """One call of the op's ``path`` (autograd: loss and backward; loss_and_grad) on the same inputs."""
    batch = dict(batch)
    q, d = batch.pop("queries"), batch.pop("docs")
    if path == "autograd":
        q.requires_grad_()
        d.requires_grad_()

        def step():
            q.grad = d.grad = None
            loss_fn(q, d, **batch, **options).backward()
    else:
        def step():
            loss_and_grad_fn(q, d, **batch, **options)
    return step


def _needs(backend: str) -> None:
    if backend == "cpu" and _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")


@pytest.mark.parametrize("guided", [False, True], ids=["plain", "guided"])
@pytest.mark.parametrize("path", ["autograd", "loss_and_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_op_rss_flat(backend, path, guided):
    _needs(backend)
    batch = make_batch(ROWS, DIM, columns=2, guide_dim=16 if guided else None, dtype=torch.float32, seed=60)
    options = dict(directions=(QD, QQ, DD) if guided else (QD, QQ, DQ, DD), backend=backend, chunk_size=24,
                   hardness_mode="all_negatives", hardness_strength=1.0)
    assert_rss_flat(_op_step(contrastive_loss, contrastive_loss_and_grad, path, batch, options))


@pytest.mark.parametrize("path", ["autograd", "loss_and_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_matryoshka_op_rss_flat(backend, path):
    _needs(backend)
    batch = make_batch(ROWS, DIM, columns=2, dtype=torch.float32, seed=62)
    options = dict(dims=[DIM, 50, 17], weights=[1.0, 0.5, 0.25], directions=(QD, DQ), backend=backend,
                   chunk_size=32, hardness_mode="all_negatives", hardness_strength=1.0)
    assert_rss_flat(_op_step(matryoshka_contrastive_loss, matryoshka_contrastive_loss_and_grad, path, batch,
                             options))


def _embedding_level_step(loss, name: str, step_op=None):
    """One loss stage of the loss ``name`` (a drop-in's name) on fixed [ROWS, DIM] embeddings, with backward:
    the cached losses' calculate_loss on mini-batches of 16, the others' embedding-level entry point; with
    ``step_op`` (a function giving each step's fastcache.losses.fused_contrastive LossOp, e.g. MatryoshkaLoss's
    step_op), the same entry points through that op."""
    gen = torch.Generator().manual_seed(61)
    embeddings = [torch.randn(ROWS, DIM, generator=gen) for _ in range(3)]
    guide = [torch.randn(ROWS, 16, generator=gen) for _ in range(3)]

    def step():
        op = {} if step_op is None else {"op": step_op()}
        if "Cached" in name:
            reps = [[t.clone().requires_grad_() for t in e.split(16)] for e in embeddings]
            stage = loss.calculate_loss if step_op is None else partial(loss.cached_loss, **op)
            if "GIST" in name:
                stage(reps, [list(g.split(16)) for g in guide], with_backward=True)
            else:
                stage(reps, with_backward=True)
        elif "GIST" in name:
            leaves = [e.clone().requires_grad_() for e in embeddings]
            loss.fused_loss(leaves, guide, **op).backward()
        elif step_op is not None:
            leaves = [e.clone().requires_grad_() for e in embeddings]
            loss.fused_loss(leaves, **op).backward()
        else:
            leaves = [e.clone().requires_grad_() for e in embeddings]
            loss.compute_loss_from_embeddings(leaves, None).backward()
    return step


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_embedding_level_rss_flat(tiny_model, tiny_guide_model, name):
    loss = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    assert_rss_flat(_embedding_level_step(loss, name))


@pytest.mark.parametrize("inner", MATRYOSHKA_INNER)
def test_matryoshka_loss_embedding_level_rss_flat(tiny_model, tiny_guide_model, inner):
    """fastcache's MatryoshkaLoss: each step builds its Matryoshka op (step_op) and runs the inner loss stage
    through it, as its forward does."""
    loss = make_matryoshka_loss(inner, tiny_model, tiny_guide_model)  # the model's dims: a prefix of DIM
    assert_rss_flat(_embedding_level_step(loss.loss, inner, loss.step_op))


def _step(loss, model) -> list[torch.Tensor]:
    model.zero_grad(set_to_none=True)
    value = loss([model.preprocess(column) for column in TEXTS], None)
    value.backward()
    return [value.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]


def _assert_keeps_no_tensor(loss, tiny_model) -> None:
    """MODEL_ITERATIONS training steps of ``loss`` through the model leave as many live tensors as one, and RSS
    flat."""
    features = [tiny_model.preprocess(column) for column in TEXTS]

    def step():
        tiny_model.zero_grad(set_to_none=True)
        loss([dict(f) for f in features], None).backward()

    step()
    tiny_model.zero_grad(set_to_none=True)
    before, rss_before = live_tensors(), rss()
    for _ in range(MODEL_ITERATIONS):
        step()
    tiny_model.zero_grad(set_to_none=True)
    assert live_tensors() == before
    assert rss() - rss_before < RSS_BOUND


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_through_the_model_keeps_no_tensor(tiny_model, tiny_guide_model, name):
    _assert_keeps_no_tensor(make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name]), tiny_model)


@pytest.mark.parametrize("inner", MATRYOSHKA_INNER)
def test_matryoshka_loss_through_the_model_keeps_no_tensor(tiny_model, tiny_guide_model, inner):
    _assert_keeps_no_tensor(make_matryoshka_loss(inner, tiny_model, tiny_guide_model), tiny_model)


# ---------------------------------------------------------------------------------------------------------------
# Interrupted runs
# ---------------------------------------------------------------------------------------------------------------

class Boom(Exception):
    pass


def _fail_on_call(module: torch.nn.Module, call: int, error: BaseException):
    """A forward hook that raises ``error`` on the ``call``-th forward of ``module`` (1-based), once."""
    calls = [0]

    def hook(*_):
        calls[0] += 1
        if calls[0] == call:
            raise error

    return module.register_forward_hook(hook)


def _state(loss) -> dict:
    return {k: v for k, v in vars(loss).items() if not k.startswith("_")}


def _assert_recovers(loss, model, fresh, interrupted) -> None:
    """``interrupted()`` raises; then the loss object's attributes, the RNG state and the live tensors are as
    before, and a normal step gives bitwise what ``fresh`` (a new loss object) gives."""
    expected = _step(fresh, model)
    model.zero_grad(set_to_none=True)
    state, rng = _state(loss), torch.get_rng_state()
    before = live_tensors()
    with pytest.raises((Boom, KeyboardInterrupt)):
        interrupted()
    model.zero_grad(set_to_none=True)
    assert _state(loss).keys() == state.keys()
    assert all(_state(loss)[k] is v for k, v in state.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert live_tensors() == before
    result = _step(loss, model)
    assert len(result) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(result, expected))


CACHED = [name for name in LOSSES if "Cached" in name]


@pytest.mark.parametrize("name", CACHED)
def test_exception_inside_the_cached_backward(tiny_model, tiny_guide_model, name):
    loss = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    fresh = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])

    def interrupted():
        value = loss([tiny_model.preprocess(column) for column in TEXTS], None)
        # 3 columns x 3 mini-batches embedded without grad, then the replay: fail in the 4th replayed mini-batch
        handle = _fail_on_call(tiny_model, 4, Boom("replay failed"))
        try:
            value.backward()
        finally:
            handle.remove()

    _assert_recovers(loss, tiny_model, fresh, interrupted)


@pytest.mark.parametrize("name", CACHED)
def test_keyboard_interrupt_while_embedding(tiny_model, tiny_guide_model, name):
    loss = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    fresh = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])

    def interrupted():
        handle = _fail_on_call(tiny_model, 5, KeyboardInterrupt())
        try:
            loss([tiny_model.preprocess(column) for column in TEXTS], None)
        finally:
            handle.remove()

    _assert_recovers(loss, tiny_model, fresh, interrupted)


def _assert_recovers_from_a_failing_epilogue(loss, fresh, model, monkeypatch) -> None:
    """The epilogue fails in the middle of the slab loop (second chunk) of ``loss``'s step; it recovers."""
    monkeypatch.setenv("FASTCACHE_BACKEND", "torch")
    original = contrastive_epilogue.EPILOGUES["torch"]
    calls = [0]

    def interrupted():
        def failing(*args, **kwargs):
            calls[0] += 1
            if calls[0] == 2:
                raise Boom("epilogue failed")
            return original(*args, **kwargs)

        with monkeypatch.context() as patch:
            patch.setitem(contrastive_epilogue.EPILOGUES, "torch", failing)
            patch.setenv("FASTCACHE_MEMORY_BUDGET", "1")  # one row per chunk
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # the tiny budget warns
                loss([model.preprocess(column) for column in TEXTS], None).backward()

    _assert_recovers(loss, model, fresh, interrupted)
    assert calls == [2]  # it failed in the second chunk, and only then


@pytest.mark.parametrize("name", ["MultipleNegativesRankingLoss", "CachedMultipleNegativesRankingLoss",
                                  "CachedGISTEmbedLoss"])
def test_exception_inside_the_op(tiny_model, tiny_guide_model, name, monkeypatch):
    loss = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    fresh = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    _assert_recovers_from_a_failing_epilogue(loss, fresh, tiny_model, monkeypatch)


@pytest.mark.parametrize("inner", MATRYOSHKA_INNER)
def test_exception_inside_the_matryoshka_op(tiny_model, tiny_guide_model, inner, monkeypatch):
    """fastcache's MatryoshkaLoss: the inner loss is left as it was too (the step's fused op removed)."""
    loss = make_matryoshka_loss(inner, tiny_model, tiny_guide_model)
    fresh = make_matryoshka_loss(inner, tiny_model, tiny_guide_model)
    inner_state = _state(loss.loss)
    _assert_recovers_from_a_failing_epilogue(loss, fresh, tiny_model, monkeypatch)
    assert _state(loss.loss) == inner_state


@pytest.mark.parametrize("name", CACHED)
def test_abandoned_step_frees_its_cache(tiny_model, tiny_guide_model, name):
    """A loss computed and never back-propagated (say, the trainer skipped the step): once the loss tensor is
    dropped, the gradient cache and RNG states it holds are freed."""
    loss = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])
    fresh = make_loss(name, tiny_model, tiny_guide_model, **LOSSES[name])

    def interrupted():
        for _ in range(3):
            loss([tiny_model.preprocess(column) for column in TEXTS], None)
        raise Boom("skipped")

    _assert_recovers(loss, tiny_model, fresh, interrupted)
