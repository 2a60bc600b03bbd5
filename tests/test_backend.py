"""Backend selection: FASTCACHE_BACKEND and backend=, the errors for backends that cannot run, info(), the
`python -m fastcache info` command, and importing fastcache when the compiled extension cannot load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import fastcache
import fastcache.losses
from fastcache import _backend
from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.maxsim import primitives as maxsim_primitives

CPU = torch.device("cpu")
INFO_KEYS = {"fastcache", "torch", "torch_cuda", "cuda_available", "triton", "extension", "cuda_kernels",
             "FASTCACHE_BACKEND", "memory_budget_bytes", "contrastive_loss", "maxsim_contrastive_loss"}
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _inputs(dtype=torch.float64, rows=6, negatives=1, dim=8):
    gen = torch.Generator().manual_seed(1234)
    queries = torch.randn(rows, dim, generator=gen, dtype=dtype)
    docs = torch.randn((1 + negatives) * rows, dim, generator=gen, dtype=dtype)
    return queries, docs


def _loss_and_grads(**settings):
    queries, docs = (t.requires_grad_(True) for t in _inputs())
    loss = fastcache.contrastive_loss(queries, docs, directions=DIRECTIONS, hardness_mode="all_negatives",
                                      hardness_strength=2.0, **settings)
    loss.backward()
    return loss.detach(), queries.grad, docs.grad


@pytest.fixture
def epilogue_calls(monkeypatch):
    """Counts the calls of each backend's epilogue (the one place where the backends differ); for "cpu" also its
    whole slab in one C++ call (fastcache/ops/contrastive/slab.py ``_slab_cpu``, which runs the C++ epilogue inside)."""
    import fastcache.ops.contrastive.op as op

    calls = {name: 0 for name in contrastive_epilogue.EPILOGUES}

    def counting(function, name):
        def count(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return count

    for name, function in list(contrastive_epilogue.EPILOGUES.items()):
        monkeypatch.setitem(contrastive_epilogue.EPILOGUES, name, counting(function, name))
    monkeypatch.setattr(op, "_slab_cpu", counting(op._slab_cpu, "cpu"))
    return calls


@pytest.fixture
def no_backend_env(monkeypatch):
    """The defaults: neither FASTCACHE_BACKEND nor FASTCACHE_MEMORY_BUDGET set."""
    monkeypatch.delenv("FASTCACHE_BACKEND", raising=False)
    monkeypatch.delenv("FASTCACHE_MEMORY_BUDGET", raising=False)


def test_extension_is_built():
    assert _backend.EXTENSION is not None, f"fastcache._C did not load: {_backend.EXTENSION_ERROR}"
    assert contrastive_epilogue.available(CPU)["cpu"] is None


def test_auto_picks_cpu_when_the_extension_is_built(no_backend_env, epilogue_calls):
    assert _backend.requested_backend() == "auto"
    assert _backend.resolve_backend(CPU, contrastive_epilogue.available(CPU)) == "cpu"
    _loss_and_grads()
    assert epilogue_calls["cpu"] > 0 and epilogue_calls["torch"] == 0


@pytest.mark.parametrize("name", ["torch", "cpu", "auto", " Torch ", "CPU"])
def test_env_selects_the_backend(monkeypatch, epilogue_calls, name):
    monkeypatch.setenv("FASTCACHE_BACKEND", name)
    expected = {"auto": "cpu"}.get(name.strip().lower(), name.strip().lower())
    _loss_and_grads()
    assert epilogue_calls[expected] > 0
    assert sum(epilogue_calls.values()) == epilogue_calls[expected]


def test_argument_overrides_env(monkeypatch, epilogue_calls):
    monkeypatch.setenv("FASTCACHE_BACKEND", "cpu")
    _loss_and_grads(backend="torch")
    assert sum(epilogue_calls.values()) == epilogue_calls["torch"] > 0
    monkeypatch.setenv("FASTCACHE_BACKEND", "cuda")  # an env choice that cannot run is ignored under backend=
    _loss_and_grads(backend="cpu")
    assert epilogue_calls["cpu"] > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_and_cpu_backends_agree(no_backend_env, monkeypatch, dtype):
    results = {}
    for name in ("torch", "cpu"):
        queries, docs = _inputs(dtype)
        by_arg = fastcache.contrastive_loss_and_grad(queries, docs, directions=DIRECTIONS, backend=name,
                                                     hardness_mode="in_batch_negatives", hardness_strength=3.0)
        monkeypatch.setenv("FASTCACHE_BACKEND", name)
        by_env = fastcache.contrastive_loss_and_grad(queries, docs, directions=DIRECTIONS,
                                                     hardness_mode="in_batch_negatives", hardness_strength=3.0)
        monkeypatch.delenv("FASTCACHE_BACKEND")
        for a, b in zip(by_arg[:3], by_env[:3]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # the same backend, selected two ways
        results[name] = by_arg
    tol = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-13)}[dtype]
    for what, a, b in zip(("loss", "grad_queries", "grad_docs"), results["torch"][:3], results["cpu"][:3]):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("name,reason", [("cuda", "CUDA"), ("triton", "TRITON_INTERPRET=1")])
def test_gpu_backends_cannot_run_cpu_tensors(monkeypatch, name, reason):
    """cuda never runs CPU tensors; triton only through the interpreter (tests/contrastive/test_contrastive_triton.py)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    queries, docs = _inputs()
    message = rf"backend '{name}' cannot run here: .*{reason}"
    with pytest.raises(RuntimeError, match=message):
        fastcache.contrastive_loss(queries, docs, backend=name)
    with pytest.raises(RuntimeError, match=message):
        fastcache.contrastive_loss_and_grad(queries, docs, backend=name)
    monkeypatch.setenv("FASTCACHE_BACKEND", name)
    with pytest.raises(RuntimeError, match=message):
        fastcache.contrastive_loss(queries, docs)


def test_auto_strategy_and_backend_on_cpu_ignore_triton(no_backend_env, monkeypatch, epilogue_calls):
    """Even with the Triton interpreter on, auto keeps the compiled CPU epilogue and the slab strategy."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("FASTCACHE_STRATEGY", raising=False)
    _loss_and_grads()
    assert sum(epilogue_calls.values()) == epilogue_calls["cpu"] > 0


def test_cuda_status_names_the_missing_kernel(monkeypatch):
    class WithoutCuda:
        pass

    monkeypatch.setattr(_backend, "EXTENSION", WithoutCuda())
    assert "contrastive_epilogue_cuda" in _backend.cuda_kernel_status(torch.device("cuda"), "contrastive_epilogue_cuda")
    with_cuda = type("WithCuda", (), {"contrastive_epilogue_cuda": staticmethod(lambda *a: None)})()
    monkeypatch.setattr(_backend, "EXTENSION", with_cuda)
    assert _backend.cuda_kernel_status(torch.device("cuda"), "contrastive_epilogue_cuda") is None
    assert "CUDA tensors" in _backend.cuda_kernel_status(CPU, "contrastive_epilogue_cuda")


def test_unknown_backend_is_a_value_error(monkeypatch):
    queries, docs = _inputs()
    with pytest.raises(ValueError, match=r"^backend must be one of .*'bogus'"):
        fastcache.contrastive_loss(queries, docs, backend="bogus")
    monkeypatch.setenv("FASTCACHE_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"^FASTCACHE_BACKEND must be one of .*'bogus'"):
        fastcache.contrastive_loss(queries, docs)
    with pytest.raises(ValueError, match="FASTCACHE_BACKEND"):
        fastcache.contrastive_loss_and_grad(queries, docs)


def test_info(no_backend_env):
    info = fastcache.info()
    assert set(info) == INFO_KEYS
    assert info["fastcache"] == fastcache.__version__
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["cuda_available"] == torch.cuda.is_available()
    assert info["extension"] == "built"
    assert info["cuda_kernels"] is bool(getattr(_backend.EXTENSION, "has_cuda", False))
    assert info["FASTCACHE_BACKEND"] == "auto"
    assert info["memory_budget_bytes"] == _backend.memory_budget() > 0
    cpu = info["contrastive_loss"]["cpu"]
    assert cpu["runs"] == "cpu"
    assert cpu["available"]["cpu"] == "yes" and cpu["available"]["torch"] == "yes"
    for name in ("cuda", "triton"):
        assert cpu["available"][name] == (contrastive_epilogue.available(CPU)[name] or "yes")
    assert ("cuda" in info["contrastive_loss"]) == torch.cuda.is_available()
    # the MaxSim op's backends (C++ cpu, torch, Triton; no CUDA kernels), as the op itself chooses among them
    maxsim = info["maxsim_contrastive_loss"]
    assert set(maxsim) == set(info["contrastive_loss"])
    assert maxsim["cpu"]["runs"] == "cpu"
    assert maxsim["cpu"]["available"] == {name: why or "yes" for name, why in maxsim_primitives.available(CPU).items()}
    assert list(maxsim["cpu"]["available"]) == ["cpu", "torch", "triton"]
    if torch.cuda.is_available():
        assert maxsim["cuda"]["runs"] == "triton" and maxsim["cuda"]["available"]["cpu"] != "yes"
    json.dumps(info)  # plain data, printable as JSON


def test_info_reports_the_env_choice_and_errors(monkeypatch):
    monkeypatch.setenv("FASTCACHE_BACKEND", "torch")
    monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", "64MiB")
    info = fastcache.info()
    assert info["FASTCACHE_BACKEND"] == "torch"
    assert info["memory_budget_bytes"] == 64 * 2**20
    assert info["contrastive_loss"]["cpu"]["runs"] == info["maxsim_contrastive_loss"]["cpu"]["runs"] == "torch"
    monkeypatch.setenv("FASTCACHE_BACKEND", "cuda")  # info() reports a choice that cannot run, never raises
    assert info_runs_error(fastcache.info(), "cannot run here")
    assert info_runs_error(fastcache.info(), "not implemented for this op", op="maxsim_contrastive_loss")
    monkeypatch.setenv("FASTCACHE_BACKEND", "bogus")
    assert info_runs_error(fastcache.info(), "FASTCACHE_BACKEND must be one of")
    assert info_runs_error(fastcache.info(), "FASTCACHE_BACKEND must be one of", op="maxsim_contrastive_loss")


def info_runs_error(info, text, op="contrastive_loss"):
    runs = info[op]["cpu"]["runs"]
    return runs.startswith("error: ") and text in runs


def _subprocess_env():
    """This environment without the fastcache settings (the child runs with the defaults)."""
    return {k: v for k, v in os.environ.items() if k not in ("FASTCACHE_BACKEND", "FASTCACHE_MEMORY_BUDGET")}


def test_python_m_fastcache_info(no_backend_env):
    """`python -m fastcache info` prints info() as JSON and exits 0."""
    done = subprocess.run([sys.executable, "-m", "fastcache", "info"], capture_output=True, text=True,
                          timeout=120, env=_subprocess_env())
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed == json.loads(json.dumps(fastcache.info()))
    assert printed["extension"] == "built"


_WITHOUT_EXTENSION = textwrap.dedent("""
    import importlib.abc
    import sys
    import warnings

    class BlockExtension(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "fastcache._C":
                raise ImportError("fastcache._C blocked by the test")
            return None

    sys.meta_path.insert(0, BlockExtension())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import fastcache
    assert "fastcache._C" not in sys.modules
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert any("compiled extension is not available" in m and "blocked by the test" in m for m in messages), messages

    import torch
    from fastcache.reference import contrastive_loss_reference

    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    docs = torch.randn(10, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    directions = ("query_to_doc", "doc_to_query")
    loss = fastcache.contrastive_loss(queries, docs, directions=directions)  # auto -> torch
    loss.backward()
    explicit = fastcache.contrastive_loss_and_grad(queries, docs, directions=directions, backend="torch")
    reference = contrastive_loss_reference(queries, docs, directions=directions)
    grads = torch.autograd.grad(reference, (queries, docs))
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(explicit.loss, reference.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(queries.grad, grads[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(docs.grad, grads[1], rtol=1e-10, atol=1e-12)

    try:
        fastcache.contrastive_loss(queries, docs, backend="cpu")
    except RuntimeError as error:
        assert "extension" in str(error), str(error)
    else:
        raise AssertionError("backend='cpu' ran without the extension")

    info = fastcache.info()
    assert info["extension"].startswith("missing"), info["extension"]
    assert "blocked by the test" in info["extension"]
    assert info["contrastive_loss"]["cpu"]["runs"] == "torch"
    assert info["contrastive_loss"]["cpu"]["available"]["cpu"] != "yes"
    assert info["maxsim_contrastive_loss"]["cpu"]["runs"] == "torch"
    assert "blocked by the test" in info["maxsim_contrastive_loss"]["cpu"]["available"]["cpu"]
    print("OK")
""")


def test_import_without_the_extension_warns_and_falls_back_to_torch():
    """With fastcache._C unloadable, `import fastcache` warns (RuntimeWarning), auto runs the torch backend with
    correct results, and an explicit backend='cpu' is a RuntimeError that names the extension."""
    done = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True, text=True, timeout=120,
                          env=_subprocess_env())
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OK")


_INTERPRETER_TOO_LATE = textwrap.dedent("""
    import os
    import triton  # compiled-mode Triton: TRITON_INTERPRET is not set yet
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import fastcache
    queries, docs = torch.randn(3, 4), torch.randn(3, 4)
    try:
        fastcache.contrastive_loss(queries, docs, backend="triton")
    except RuntimeError as error:
        assert "set after triton was imported" in str(error), str(error)
    else:
        raise AssertionError("backend='triton' ran on CPU tensors with compiled-mode Triton")
    print("OK")
""")


def test_triton_on_cpu_needs_the_interpreter_before_triton_is_imported():
    pytest.importorskip("triton")
    env = {k: v for k, v in _subprocess_env().items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _INTERPRETER_TOO_LATE], capture_output=True, text=True, timeout=120,
                          env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("OK")


# ------------------------------------------------------------------ argument types and the one rule for sizes


@pytest.mark.parametrize("name", ["backend", "strategy"])
@pytest.mark.parametrize("value", [1, True, b"cpu"])
def test_non_string_backend_or_strategy_is_a_value_error(no_backend_env, name, value):
    """Issue 17.10: backend=1 was an AttributeError from ``.strip()``."""
    queries, docs = _inputs()
    expected = rf"^{name} must be one of .* \(a string\); got {re.escape(repr(value))} \({type(value).__name__}\)$"
    with pytest.raises(ValueError, match=expected):
        fastcache.contrastive_loss(queries, docs, **{name: value})
    with pytest.raises(ValueError, match=expected):
        getattr(_backend, f"requested_{name}")(value)


def test_empty_backend_variable_means_auto(monkeypatch):
    monkeypatch.setenv("FASTCACHE_BACKEND", " ")
    monkeypatch.setenv("FASTCACHE_STRATEGY", "")
    assert _backend.requested_backend() == _backend.requested_strategy() == "auto"
    assert _backend.setting_errors() == {}


@pytest.mark.parametrize("value,expected", [("64MiB", 64 * 2**20), (" 1.5GiB ", 3 * 2**29), (2**26, 2**26),
                                            ("67108864", 2**26), ("65536k", 2**26)])
def test_sizes_are_accepted_as_argument_and_variable(no_backend_env, monkeypatch, tiny_model, value, expected):
    """Issue 17.11: memory_budget="64MiB" was rejected as an argument though the variable accepted it."""
    assert _backend.memory_budget(value) == expected
    queries, docs = _inputs()
    fastcache.contrastive_loss(queries, docs, memory_budget=value)
    cached = fastcache.losses.CachedMultipleNegativesRankingLoss
    assert cached(tiny_model, mini_batch_size="auto", mini_batch_memory_budget=value).auto_mini_batch.budget == expected
    if isinstance(value, str):
        monkeypatch.setenv("FASTCACHE_MEMORY_BUDGET", value)
        monkeypatch.setenv("FASTCACHE_MINI_BATCH_BUDGET", value)
        assert _backend.memory_budget() == expected
        assert cached(tiny_model, mini_batch_size="auto").auto_mini_batch.budget == expected


@pytest.mark.parametrize("value", ["0", "0.5", "-1", "0.0001k", "abc", "", 0, -5, 1.5, True])
@pytest.mark.parametrize("where", ["argument", "variable"])
@pytest.mark.parametrize("budget", ["memory", "mini_batch"])
def test_bad_sizes_are_rejected_showing_what_was_written(no_backend_env, monkeypatch, tiny_model, value, where,
                                                          budget):
    """Issue 17.11: FASTCACHE_MINI_BATCH_BUDGET=0 fell back to 2 GiB silently, FASTCACHE_MEMORY_BUDGET=0.5 reported
    "got 0"; now zero, negative and fractional-byte sizes are errors everywhere, quoting the value as written."""
    if where == "variable" and not isinstance(value, str):
        pytest.skip("variables are strings")
    if value == "" and where == "variable":
        pytest.skip("an empty variable is unset: the default")
    variable, argument = {"memory": ("FASTCACHE_MEMORY_BUDGET", "memory_budget"),
                          "mini_batch": ("FASTCACHE_MINI_BATCH_BUDGET", "mini_batch_memory_budget")}[budget]
    monkeypatch.delenv("FASTCACHE_MINI_BATCH_BUDGET", raising=False)
    kwargs = {}
    if where == "variable":
        monkeypatch.setenv(variable, value)
    else:
        kwargs[argument] = value
    name = variable if where == "variable" else argument
    with pytest.raises(ValueError, match=rf"^{name} must be .*; got {re.escape(repr(value))}"):
        if budget == "memory":
            fastcache.contrastive_loss(*_inputs(), **kwargs)
        else:
            fastcache.losses.CachedMultipleNegativesRankingLoss(tiny_model, mini_batch_size="auto", **kwargs)
    if where == "variable":
        assert set(_backend.setting_errors()) == {variable}
