"""The contrastive op's hypothesis strategies and low-precision bounds, shared by the property tests
(tests/contrastive/test_properties_contrastive.py, tests/matryoshka/test_properties_matryoshka.py)."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from hypothesis import note, settings
from hypothesis import strategies as st

# Triton's kernels run on CPU tensors through its interpreter, which must be on before triton is first imported
# (as in tests/contrastive/test_contrastive_triton.py): on a machine without CUDA this module turns it on.
if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

from fastcache import _backend  # noqa: E402
from fastcache.ops.contrastive import epilogue as contrastive_epilogue  # noqa: E402
from helpers import make_batch, nan_padded  # noqa: E402

QD, QQ, DQ, DD = "query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
STRESSES = ("none", "ties", "expanded", "zero_rows", "ids_mask_all", "guide_mask_all", "strided", "large_logits")
STRIDED_LAYOUTS = ("slice", "transposed", "every_other_row", "every_other_col")
# What runs on CPU tensors (``available``): (backend, strategy) pairs; Triton runs both of its strategies (slab:
# torch GEMMs + the Triton epilogue; tiled: Triton kernels only), through the interpreter, which is slow: its
# examples draw at most SMALL_SHAPE rows / dims, and a fifth of the profile's examples (at least 5).
_AVAILABLE = [name for name, reason in contrastive_epilogue.available(torch.device("cpu")).items() if reason is None]
RUNNERS = [(name, None) for name in _AVAILABLE if name != "triton"]
TRITON_RUNNERS = [("triton", strategy) for strategy in ("slab", "tiled") if "triton" in _AVAILABLE]
MAX_SHAPE = {"cpu": (200, 1100), "torch": (200, 1100)}
SMALL_SHAPE = (24, 48)
TRITON_EXAMPLES = max(5, settings.default.max_examples // 5)


def _size(draw, small: int, large: int) -> int:
    """Mostly small sizes (where off-by-one bugs live), sometimes up to ``large``."""
    return draw(st.one_of(st.integers(1, min(small, large)), st.integers(1, large)))


@st.composite
def contrastive_cases(draw, runner: tuple[str, str | None], stresses=STRESSES):
    """(batch shape kwargs for make_batch, op options, stress name, doc_ids spec) for a (backend, strategy)."""
    backend, strategy = runner
    max_rows, max_dim = MAX_SHAPE.get(backend, SMALL_SHAPE)
    rows, dim = _size(draw, 8, max_rows), _size(draw, 16, max_dim)
    columns = draw(st.integers(1, 3))
    stress = draw(st.sampled_from(stresses))
    guided = stress == "guide_mask_all" or draw(st.booleans())
    gathered = not guided and draw(st.booleans())
    docs_3d = draw(st.booleans())
    # more positives than rows (row 0's positive at ``offset``): gathered, or docs as [C, P, D] that say P
    extra = draw(st.integers(0, 4)) if gathered or docs_3d else 0
    offset = draw(st.integers(0, extra))
    directions = [QD] + [d for d in (QQ, DQ, DD) if (d != DQ or not guided) and draw(st.booleans())]
    partition = "joint" if {QQ, DD} & set(directions) else draw(st.sampled_from(["joint", "per_direction"]))
    hardness = draw(st.sampled_from(HARDNESS_MODES))
    similarity = "dot" if stress == "large_logits" else draw(st.sampled_from(["cos", "dot"]))
    scale = 100.0 if stress == "large_logits" else draw(st.sampled_from([1.0, 20.0, 100.0, 0.05]))
    options = dict(
        directions=tuple(directions), partition_mode=partition, similarity=similarity, scale=scale,
        hardness_mode=hardness, hardness_strength=draw(st.sampled_from([0.0, 0.5, 5.0])) if hardness else 0.0,
        offset=offset, backend=backend)
    if strategy is not None:
        options["strategy"] = strategy
    if strategy != "tiled":  # tiled holds no chunk of rows
        options["chunk_size"] = draw(st.one_of(st.none(), st.integers(1, rows)))
    if guided:
        options.update(margin_strategy=draw(st.sampled_from(["absolute", "relative"])),
                       margin=10.0 if stress == "guide_mask_all" else draw(st.sampled_from([0.0, 0.05, 0.3, -0.1])))
        if stress == "guide_mask_all":
            options["margin_strategy"] = "absolute"  # threshold = g_pos - 10 < -1: every cosine exceeds it
    # dot products of random vectors grow like D: scale them to unit length unless the example stresses that
    norm = 30.0 if stress == "large_logits" else (dim ** -0.5 if similarity == "dot" else 1.0)
    shape = dict(rows=rows, dim=dim, columns=columns, positives=rows + extra, offset=offset, gathered=gathered,
                 docs_3d=docs_3d, guide_dim=_size(draw, 8, 64) if guided else None, norm=norm,
                 seed=draw(st.integers(0, 2**31 - 1)))
    ids = "all_same" if stress == "ids_mask_all" else draw(st.sampled_from([None, 2, 5]))
    return shape, options, stress, ids


def _strided_copy(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``t`` as a non-contiguous NaN-padded view, in a random layout among those that are non-contiguous for its
    shape (a single row is contiguous as a row slice, for one)."""
    for i in torch.randperm(len(STRIDED_LAYOUTS), generator=gen).tolist():
        try:
            return nan_padded(t, STRIDED_LAYOUTS[i])
        except AssertionError:  # this layout of this shape is contiguous
            continue
    raise AssertionError(f"no non-contiguous layout for shape {tuple(t.shape)}")


def _with_stress(batch: dict, stress: str, ids, seed: int) -> dict:
    """Apply one stress input (module docstring) and the doc_ids spec to a batch built by make_batch."""
    gen = torch.Generator().manual_seed(seed)
    docs_shape = batch["docs"].shape[:-1]
    if ids == "all_same":
        batch["doc_ids"] = torch.zeros(docs_shape, dtype=torch.int64)
    elif ids is not None:
        batch["doc_ids"] = torch.randint(0, ids, docs_shape, generator=gen)
    embeddings = [k for k in ("queries", "docs", "all_queries") if k in batch]
    if stress == "ties":
        for k in embeddings:
            flat = batch[k].reshape(-1, batch[k].size(-1))
            n = flat.size(0)
            src, dst = torch.randint(0, n, (2, max(1, n // 2)), generator=gen)
            flat[dst] = flat[src]
    elif stress == "expanded":
        for k in embeddings:
            t = batch[k]
            batch[k] = t[..., :1, :].expand(t.shape)
    elif stress == "zero_rows":
        for k in embeddings:
            flat = batch[k].view(-1, batch[k].size(-1))
            flat[torch.rand(flat.size(0), generator=gen) < 0.3] = 0
    elif stress == "strided":
        for k, t in list(batch.items()):
            if t.is_floating_point():
                batch[k] = _strided_copy(t, gen)
    return batch


def _buffers(batch: dict) -> dict:
    """Copies of the whole storage behind each strided view (NaN padding included), NaN as a sentinel."""
    return {k: v._base.nan_to_num(-7.0) for k, v in batch.items() if v._base is not None}


def _build(case, dtype=torch.float64):
    shape, options, stress, ids = case
    batch = make_batch(**shape, dtype=torch.float64)
    batch = _with_stress(batch, stress, ids, shape["seed"])
    return {k: v.to(dtype) if v.is_floating_point() and v.dtype != dtype else v for k, v in batch.items()}, options


def _describe(case) -> None:
    shape, options, stress, ids = case
    note(f"stress={stress} doc_ids={ids} shape={shape} options={options}")


def needs_backend(backend: str) -> None:
    if backend == "cpu" and _backend.EXTENSION is None:
        pytest.skip(f"compiled extension not available: {_backend.EXTENSION_ERROR}")


def _runner_id(runner) -> str:
    return "-".join(filter(None, runner))


# The bound of the low-precision outputs against the float64 truth on the same inputs (the inputs are cast to
# float64, so the difference is the op's own rounding). With L = max |logit| ((scale + hardness) · max |s|) and
# e = eps of the GEMM operands' precision (``operand_eps``: float32 for the slab strategies, which normalise and
# multiply in float32; the input dtype for Triton's tiled strategy, whose tensor-core GEMMs take the normalised
# embeddings and the dL/ds tiles in the input dtype):
#     |loss - truth| <= OPERAND_ULPS · e · (1 + L) · max(1, |truth|)                 (the loss is float32)
#     max |grad - truth| <= (eps(dtype) + OPERAND_ULPS · e · (1 + L)) · max(max |truth|, u) + SUBNORMAL[dtype]
# (u: ``_gradient_unit``, the floor for gradients that vanish in exact arithmetic; eps(dtype): the one rounding
# of the gradients to the input dtype). Measured (150 random examples, cpu backend): loss error up to
# 0.5 · eps32 · (1 + L), gradient error beyond the output rounding up to 0.7 · eps32 · (1 + L); OPERAND_ULPS
# = 4 leaves a margin of about 6.
OPERAND_ULPS = 4


def operand_eps(runner, dtype: torch.dtype) -> float:
    return torch.finfo(dtype if runner[1] == "tiled" else torch.float32).eps


# the spacing of the subnormal numbers: float16 gradients below 6.1e-5 are only that exact (absolute)
SUBNORMAL = {dtype: torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
             for dtype in (torch.float32, torch.bfloat16, torch.float16)}
# Not zero_rows: F.normalize's gradient at a zero row is g / 1e-12, which multiplies the rounding of g by 1e12 (and
# overflows float16): no meaningful low-precision bound; the float64 property covers zero rows.
LOW_PRECISION_STRESSES = ("none", "ties", "ids_mask_all", "guide_mask_all", "strided")


def _max_logit(batch: dict, options: dict) -> float:
    """(scale + hardness_strength) · the largest |similarity| between any two embeddings."""
    factor = options["scale"] + options["hardness_strength"]
    if options["similarity"] == "cos":
        return factor
    rows = torch.cat([batch[k].reshape(-1, batch[k].size(-1)).double() for k in ("queries", "docs", "all_queries")
                      if k in batch])
    return float((rows @ rows.T).abs().max()) * factor


def _gradient_unit(batch: dict, options: dict) -> float:
    """The size of one similarity's contribution to a gradient, (scale + hardness_strength) / B times dL/ds's
    factor from the embedding (1 / the smallest non-zero row norm under cosine, the largest norm under dot): the
    floor of the gradients' scale, so that gradients that vanish in exact arithmetic compare in absolute terms."""
    norms = torch.cat([batch[k].reshape(-1, batch[k].size(-1)).double().norm(dim=1)
                       for k in ("queries", "docs", "all_queries") if k in batch])
    nonzero = norms[norms > 0]
    if options["similarity"] == "dot":
        factor = float(norms.max())
    else:
        factor = 1 / float(nonzero.min()) if nonzero.numel() else 1.0
    return (options["scale"] + options["hardness_strength"]) / batch["queries"].size(0) * factor


LOW_PRECISION = [torch.float32, torch.bfloat16, torch.float16]
