"""The in-batch contrastive loss (InfoNCE / MultipleNegativesRankingLoss / GISTEmbedLoss) from embeddings, fused.

Notation: B local queries q_i, candidates d_j (N = C·P of them, column-major: the P positives, then each
hard-negative column), query columns Q_k (Mq of them: ``all_queries``, else the queries themselves), the positive
of row i is candidate ``offset + i`` and p_i = d_{offset+i}. With s(a, b) the cosine (or dot) similarity:

    query_to_doc    s(q_i, d_j)   j < N    (the positive is here)
    query_to_query  s(q_i, Q_k)   k < Mq,  k = own query masked
    doc_to_query    s(Q_k, p_i)   k < Mq
    doc_to_doc      s(p_i, d_j)   j < N,   j ≡ offset+i (mod P) masked

    logit = scale·s  (+ hardness_strength·stopgrad(s) on the penalised query_to_doc columns)
    joint:          loss = mean_i [ logsumexp_{all blocks} logit_i - logit_i,pos ]
    per_direction:  loss = mean_i [ mean_b logsumexp_b logit_i - logit_i,pos ]

With a ``guide`` (GISTEmbedLoss), column j of a block is masked when the guide's similarity exceeds the guide's
positive similarity g_i,pos minus the margin (``absolute``: g - margin, ``relative``: g - |g|·margin), the
positive never; query_to_query is then the anchor-anchor block (q_i against the B local queries) and doc_to_doc
the positive-positive block (p_i against the P positives), both masked by the guide only.

With ``doc_ids`` (an integer per candidate, e.g. a hash of its token ids), a candidate with the id of row i's
positive is a duplicate of it: masked in query_to_doc (never the positive itself) and in doc_to_doc.

Two strategies (``strategy=`` / ``FASTCACHE_STRATEGY``):

- slab: rows in chunks; per chunk, GEMMs into chunk×columns blocks, one fused epilogue (C++, CUDA, Triton or
  PyTorch: fastcache/ops/contrastive_epilogue.py) that turns the blocks into dL/ds in place (and gives the per-row
  losses), then GEMMs that accumulate dL/dq, dL/dd, dL/dQ. Memory O(chunk·(N + Mq)) on top of O((B + N + Mq)·D),
  the chunk chosen from a memory budget. On the cpu backend the whole loop is one C++ call (``_slab_cpu``).
- tiled (Triton, fastcache/triton/contrastive.py): no block is ever held beyond one tile; a forward pass keeps
  per-row statistics, the backward recomputes the tiles. Memory O((B + N + Mq)·D).
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import trange

from fastcache import _backend
from fastcache.ops import contrastive_epilogue
from fastcache.ops._autograd_guard import check_real_device, refuse_double_backward, refuse_functorch

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
SIMILARITIES = ("cos", "dot")
MARGIN_STRATEGIES = ("absolute", "relative")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
MAX_SLAB_BYTES = 64 * 2**20  # similarity blocks per chunk at most (speed: larger chunks fall out of cache)
GEMM_WORKSPACE_BYTES = 16 * 2**20  # what the BLAS keeps for packing (measured: ~14 MiB for CPU torch.mm)
MIN_SLAB_ROWS = 256  # strategy auto on CUDA: a budget that holds fewer rows per chunk selects the tiled strategy
NORMALIZE_ROWS = 8192  # rows normalised (and their normalisation backward) per step when the operands keep their dtype
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, which sentence-transformers' cos_sim uses


@dataclass(frozen=True)
class ContrastiveOptions:
    """Options of the contrastive loss (validated on construction). See the module docstring for the maths."""

    scale: float = 20.0
    similarity: str = "cos"
    directions: tuple[str, ...] = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    offset: int = 0
    margin: float = 0.0
    margin_strategy: str = "absolute"

    def __post_init__(self):
        if isinstance(self.directions, str):
            raise ValueError(f"directions must be a tuple of direction names, got the string {self.directions!r}")
        object.__setattr__(self, "directions", tuple(self.directions))
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        unknown = [d for d in self.directions if d not in DIRECTIONS]
        if unknown:
            raise ValueError(f"directions: unknown {unknown}; valid directions are {DIRECTIONS}")
        if len(set(self.directions)) != len(self.directions):
            raise ValueError(f"directions must not repeat a direction, got {self.directions}")
        if "query_to_doc" not in self.directions:
            raise ValueError("directions must include 'query_to_doc' (it holds the positive pair)")
        if self.partition_mode not in PARTITION_MODES:
            raise ValueError(f"partition_mode must be one of {PARTITION_MODES}, got {self.partition_mode!r}")
        if self.partition_mode == "per_direction" and {"query_to_query", "doc_to_doc"} & set(self.directions):
            raise ValueError(
                "partition_mode='per_direction' needs every direction to contain the positive pair; "
                "'query_to_query' and 'doc_to_doc' do not: use partition_mode='joint'"
            )
        if self.hardness_mode not in HARDNESS_MODES:
            raise ValueError(f"hardness_mode must be one of {HARDNESS_MODES}, got {self.hardness_mode!r}")
        strength = self.hardness_strength
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
                or strength < 0:
            raise ValueError(f"hardness_strength must be a finite non-negative number, got {strength!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {self.offset!r}")
        if isinstance(self.margin, bool) or not isinstance(self.margin, (int, float)) or not math.isfinite(self.margin):
            raise ValueError(f"margin must be a finite number, got {self.margin!r}")
        if self.margin_strategy not in MARGIN_STRATEGIES:
            raise ValueError(f"margin_strategy must be one of {MARGIN_STRATEGIES}, got {self.margin_strategy!r}")

    @property
    def hardness(self) -> bool:
        """Whether the hardness penalty changes anything (a mode and a positive strength)."""
        return self.hardness_mode is not None and self.hardness_strength > 0


class ContrastiveLayout(NamedTuple):
    """Sizes of one call: B rows, P positives, C candidate columns (N = C·P), D dims, Mq query columns."""

    rows: int
    positives: int
    columns: int
    dim: int
    query_columns: int
    own_query_offset: int  # query column k = own_query_offset + i is row i's own query

    @property
    def candidates(self) -> int:
        return self.columns * self.positives


class ContrastiveLossAndGrad(NamedTuple):
    """The loss and dL/d(each embedding input), in the inputs' dtypes and shapes (None where not given)."""

    loss: Tensor
    grad_queries: Tensor
    grad_docs: Tensor
    grad_all_queries: Tensor | None


def _check_tensor(name: str, t, ndims: tuple[int, ...], finite: bool = True) -> None:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_real_device(name, t)
    if t.dim() not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): the batch needs at least one row and one dim")
    if finite:
        check_finite(**{name: t})


def check_finite(**tensors: Tensor | None) -> None:
    """A ValueError naming the first of ``tensors`` (None skipped) that holds a NaN or Inf."""
    for name, t in tensors.items():
        if t is not None and not all_finite(t):
            raise ValueError(f"{name} contains NaN or Inf")


def all_finite(t: Tensor) -> bool:
    """Whether every element of ``t`` is finite. A finite sum proves it (NaN and ±Inf propagate through a sum):
    one reduction and one sync, ~5x cheaper than torch.isfinite(t).all() on CPU. A non-finite sum may also be an
    overflow of finite values, so then the min and max decide (they propagate NaN; ±Inf shows in max/2 - min/2,
    which cannot overflow)."""
    if math.isfinite(t.sum().item()):
        return True
    lo, hi = torch.aminmax(t)
    return math.isfinite((hi.double() / 2 - lo.double() / 2).item())


def check_inputs(
    queries: Tensor,
    docs: Tensor,
    all_queries: Tensor | None,
    guide_queries: Tensor | None,
    guide_docs: Tensor | None,
    options: ContrastiveOptions,
    doc_ids: Tensor | None = None,
    finite: bool = True,
) -> ContrastiveLayout:
    """Validate the inputs against each other and the options; return the layout. ``finite=False`` leaves the
    NaN / Inf check of queries, docs and all_queries to the caller (the cpu slab's C++ pass makes it)."""
    _check_tensor("queries", queries, (2,), finite)
    _check_tensor("docs", docs, (2, 3), finite)
    rows, dim = queries.shape
    named = {"queries": queries, "docs": docs}
    if all_queries is not None:
        _check_tensor("all_queries", all_queries, (2,), finite)
        named["all_queries"] = all_queries
        if all_queries.size(1) != dim:
            raise ValueError(f"all_queries has {all_queries.size(1)} dims, queries have {dim}")
    if docs.size(-1) != dim:
        raise ValueError(f"docs have {docs.size(-1)} dims, queries have {dim}")
    if docs.dim() == 3:
        columns, positives = docs.shape[:2]
        if all_queries is not None and all_queries.size(0) != positives:
            raise ValueError(f"all_queries has {all_queries.size(0)} rows, docs have {positives} positives")
    else:
        positives = all_queries.size(0) if all_queries is not None else rows
        if docs.size(0) % positives:
            raise ValueError(
                f"docs has {docs.size(0)} rows, which is not a multiple of the {positives} positives "
                f"({'rows of all_queries' if all_queries is not None else 'queries'}); lay candidates out "
                "column-major (all positives, then each hard-negative column) or pass docs as [C, P, D]"
            )
        columns = docs.size(0) // positives
    if options.offset + rows > positives:
        raise ValueError(
            f"offset={options.offset} with {rows} queries needs {options.offset + rows} positives, docs have "
            f"{positives}"
        )
    guided = guide_queries is not None or guide_docs is not None
    if guided:
        if guide_queries is None or guide_docs is None:
            raise ValueError("guide_queries and guide_docs must be given together")
        _check_tensor("guide_queries", guide_queries, (2,))
        _check_tensor("guide_docs", guide_docs, (2, 3))
        named.update(guide_queries=guide_queries, guide_docs=guide_docs)
        if guide_queries.size(0) != rows:
            raise ValueError(f"guide_queries has {guide_queries.size(0)} rows, queries have {rows}")
        guide_layout = guide_docs.shape[:-1] if guide_docs.dim() == 3 else (guide_docs.size(0),)
        doc_layout = docs.shape[:-1] if docs.dim() == 3 else (docs.size(0),)
        if guide_layout != doc_layout or guide_docs.dim() != docs.dim():
            raise ValueError(f"guide_docs must be laid out like docs: {tuple(docs.shape[:-1])}, got "
                             f"{tuple(guide_docs.shape[:-1])}")
        if guide_docs.size(-1) != guide_queries.size(1):
            raise ValueError(f"guide_docs have {guide_docs.size(-1)} dims, guide_queries {guide_queries.size(1)}")
        if "doc_to_query" in options.directions:
            raise ValueError("directions: 'doc_to_query' has no guided (GIST) form; drop it or the guide")
        if all_queries is not None:
            raise ValueError("all_queries cannot be combined with a guide: the guided query_to_query block is "
                             "anchor-anchor over the local queries, as in GISTEmbedLoss")
    if doc_ids is not None:
        if not isinstance(doc_ids, Tensor) or doc_ids.dtype.is_floating_point or doc_ids.dtype.is_complex \
                or doc_ids.dtype == torch.bool:
            raise ValueError(f"doc_ids must be an integer tensor, got {getattr(doc_ids, 'dtype', type(doc_ids))}")
        if tuple(doc_ids.shape) != tuple(docs.shape[:-1]):
            raise ValueError(f"doc_ids must have one id per candidate, shape {tuple(docs.shape[:-1])}; got "
                             f"{tuple(doc_ids.shape)}")
        named["doc_ids"] = doc_ids
    devices = {name: t.device for name, t in named.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    dtypes = {name: t.dtype for name, t in named.items() if name in ("queries", "docs", "all_queries")}
    if len(set(dtypes.values())) > 1:
        raise ValueError(f"queries, docs and all_queries must share a dtype, got {dtypes}")
    query_columns = all_queries.size(0) if all_queries is not None else rows
    own_query_offset = options.offset if all_queries is not None else 0
    return ContrastiveLayout(rows, positives, columns, dim, query_columns, own_query_offset)


def _normalized(x: Tensor, dtype: torch.dtype, cosine: bool, native: bool = False) -> tuple[Tensor, Tensor | None]:
    """x in the compute dtype, L2-normalised per row when ``cosine`` (as F.normalize), and the divisors
    max(‖x‖, eps) [rows, 1]. At most one copy of x is made. ``native``: in one C++ pass (csrc/cpu/normalize.cpp;
    the cpu backend, CPU tensors)."""
    if not cosine:
        return x.to(dtype).contiguous(), None
    if native:
        return _backend.EXTENSION.l2_normalize_cpu(x, dtype, NORMALIZE_EPS)
    y = x.to(dtype, memory_format=torch.contiguous_format, copy=True)
    divisor = row_norms(y).clamp_min_(NORMALIZE_EPS)
    return y.div_(divisor), divisor


def row_norms(x: Tensor) -> Tensor:
    """‖x_i‖ per row [rows, 1], without overflow: the squares of x / max_j |x_ij|, then times that maximum (a
    row of 1e19s has a float32 norm; its squares do not). Cosine is scale-invariant, so huge rows must give the
    same loss as small ones, as the cpu backend's fp64 sums do."""
    largest = x.abs().amax(dim=1, keepdim=True).clamp_min_(torch.finfo(x.dtype).tiny)
    return torch.linalg.vector_norm(x / largest, dim=1, keepdim=True).mul_(largest)


def _normalized_backward_(grad: Tensor, normalized: Tensor, divisor: Tensor | None, native: bool = False) -> Tensor:
    """dL/dx from dL/dx̂ (overwriting ``grad``) for x̂ = x / max(‖x‖, eps) (``divisor``, from :func:`_normalized`):
    (g - x̂·(x̂ᵀg)) / ‖x‖, and g / eps where the norm is below eps. ``native``: in one C++ pass."""
    if divisor is None:
        return grad
    if native:
        return _backend.EXTENSION.l2_normalize_backward_cpu_(grad, normalized, divisor, NORMALIZE_EPS)
    radial = torch.linalg.vecdot(normalized, grad, dim=1).unsqueeze(1).mul_(divisor > NORMALIZE_EPS)
    return grad.addcmul_(normalized, radial, value=-1).div_(divisor)


def _normalized_in_own_dtype(x: Tensor, acc: torch.dtype, cosine: bool) -> tuple[Tensor, Tensor | None]:
    """x as a GEMM operand in its own dtype (the tiled kernels; the slab's low-precision GEMMs): contiguous,
    L2-normalised per row when ``cosine`` (in ``acc``, NORMALIZE_ROWS rows at a time so that the ``acc`` temporary
    stays small); and the row divisors max(‖x‖, eps) that ``_normalized_backward_`` takes."""
    if not cosine:
        return x.contiguous(), None
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    norms = torch.empty(x.size(0), 1, dtype=acc, device=x.device)
    for r0 in range(0, x.size(0), NORMALIZE_ROWS):
        y, norm = _normalized(x[r0:r0 + NORMALIZE_ROWS], acc, True)
        out[r0:r0 + NORMALIZE_ROWS] = y
        norms[r0:r0 + NORMALIZE_ROWS] = norm
    return out, norms


def _normalized_backward_in_chunks_(grad: Tensor, normalized: Tensor, norm: Tensor | None) -> Tensor:
    """``_normalized_backward_`` (in place on the ``acc`` gradient) NORMALIZE_ROWS rows at a time, the normalised
    rows widened to the gradient's dtype one chunk at a time."""
    if norm is not None:
        for r0 in range(0, grad.size(0), NORMALIZE_ROWS):
            rows = slice(r0, r0 + NORMALIZE_ROWS)
            _normalized_backward_(grad[rows], normalized[rows].to(grad.dtype), norm[rows])
    return grad


def guide_and_id_operands(guide_queries: Tensor | None, guide_docs: Tensor | None, doc_ids: Tensor | None,
                          dtype: torch.dtype) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """What every strategy takes from the guide and the ids: the guide embeddings L2-normalised in ``dtype`` (the
    guide's similarity is always cosine; docs flattened to rows), and the doc ids as one contiguous int64 row."""
    gq = gd = None
    if guide_queries is not None:
        gq, _ = _normalized(guide_queries, dtype, True)
        gd, _ = _normalized(guide_docs.reshape(-1, guide_docs.size(-1)), dtype, True)
    ids = None if doc_ids is None else doc_ids.reshape(-1).to(torch.int64).contiguous()
    return gq, gd, ids


def block_columns(layout: ContrastiveLayout, guided: bool) -> dict[str, int]:
    """Columns of each direction's similarity block: the candidates, or the query columns; doc_to_doc against the
    positives only when guided (GISTEmbedLoss)."""
    return {"query_to_doc": layout.candidates, "query_to_query": layout.query_columns,
            "doc_to_query": layout.query_columns,
            "doc_to_doc": layout.positives if guided else layout.candidates}


def guide_blocks(guides: dict[str, Tensor], gq: Tensor | None, gd: Tensor | None, r0: int, r1: int, offset: int,
                 positives: int) -> dict[str, Tensor]:
    """The guide's similarity blocks of rows r0 .. r1-1 (GISTEmbedLoss), written into the first rows of ``guides``
    (one buffer per guided direction; empty without a guide): query_to_doc gq·gdᵀ, query_to_query gq·gqᵀ
    (anchor-anchor), doc_to_doc p·gd[:P]ᵀ (positive-positive)."""
    out = {k: v[:r1 - r0] for k, v in guides.items()}
    if "query_to_doc" in out:
        torch.mm(gq[r0:r1], gd.T, out=out["query_to_doc"])
    if "query_to_query" in out:
        torch.mm(gq[r0:r1], gq.T, out=out["query_to_query"])
    if "doc_to_doc" in out:
        torch.mm(gd[offset + r0:offset + r1], gd[:positives].T, out=out["doc_to_doc"])
    return out


def chunk_rows(layout: ContrastiveLayout, options: ContrastiveOptions, gathered: bool, guide_dim: int, budget: int,
               itemsize: int, workspace_blocks: float = 1, cache_cap: bool = True) -> int:
    """Rows per chunk so that the slab workspace stays within ``budget`` bytes.

    The fixed part holds the normalised copies and the gradient accumulators of queries, docs and (when
    gathered) all_queries, the guide copies (O((B + N + Mq)·D)) and the GEMM library's own buffers. Each chunk row costs one value per block
    column (``workspace_blocks`` times for an epilogue that needs temporaries), plus the guide's blocks. With
    ``cache_cap`` (CPU) blocks are also kept under MAX_SLAB_BYTES, past which bigger chunks only fall out of
    cache; a GPU wants the tallest chunk the budget allows. At least one row; a
    budget that leaves fewer than 16 rows warns (slow).
    """
    n = layout.candidates
    mq = layout.query_columns
    width = block_columns(layout, guide_dim > 0)
    block_row = sum(width[d] for d in options.directions) * itemsize
    per_row = block_row * (workspace_blocks + (1 if guide_dim else 0))
    fixed = (2 * (layout.rows + n + (mq if gathered else 0)) * layout.dim + (layout.rows + n) * guide_dim) * itemsize
    fixed += GEMM_WORKSPACE_BYTES
    rows = min(layout.rows, max(1, int((budget - fixed) // per_row)))
    if cache_cap:
        rows = min(rows, max(16, MAX_SLAB_BYTES // block_row))
    if rows < min(16, layout.rows):
        warnings.warn(
            f"fastcache: memory_budget={budget} bytes leaves {rows} row(s) per chunk (fixed workspace {fixed} bytes, "
            f"{per_row} bytes per row); raise it (FASTCACHE_MEMORY_BUDGET) for speed", RuntimeWarning, stacklevel=4)
    return rows


def low_precision_gemms(x: Tensor) -> bool:
    """Whether the slab's GEMMs take ``x``'s own dtype: bf16/fp16 CUDA tensors, with a torch whose mm/addmm write
    fp32 results from bf16/fp16 operands (the ``out_dtype`` overloads: checked by a real call,
    :func:`out_dtype_gemm_failure`). Else they run in fp32."""
    return x.device.type == "cuda" and x.dtype in (torch.bfloat16, torch.float16) and \
        out_dtype_gemm_failure(x.device, x.dtype) is None


@functools.cache
def out_dtype_gemm_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when ``torch.mm(a, b, float32)`` and ``torch.addmm(acc, a, b, float32, out=acc)`` work for ``dtype``
    operands on ``device`` and give the right product (a 2×2 call, once per device and dtype), else why not; the
    reason is also given once as a warning (the slab then runs its GEMMs in fp32: slower, same results). Only
    recent PyTorch builds accept the overloads, and an overload can exist and still reject the call."""
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device)
        product = torch.mm(a, a, torch.float32)
        acc = torch.ones(2, 2, dtype=torch.float32, device=device)
        torch.addmm(acc, a, a, torch.float32, out=acc)
        expected = torch.tensor([[7.0, 10.0], [15.0, 22.0]], device=device)
        if product.dtype != torch.float32 or not torch.equal(product, expected) or not torch.equal(acc, expected + 1):
            raise RuntimeError(f"wrong result {product.tolist()}, {acc.tolist()}")
    except (RuntimeError, NotImplementedError, TypeError) as error:
        reason = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:200]}"
        warnings.warn(f"fastcache: the slab's GEMMs run in float32 for {dtype} inputs on {device}: this torch cannot "
                      f"write float32 products of {dtype} operands ({reason})", RuntimeWarning, stacklevel=2)
        return reason
    return None


LOW_PRECISION_GRAD_MAX = 2.0**14  # the largest |dL/ds| a 16-bit GEMM operand gets (fp16's largest value: 65504)


def operand_grad_scale(bound: float) -> float:
    """A power of two p with p·bound ≤ LOW_PRECISION_GRAD_MAX, for gradient entries bounded by ``bound``
    (|dL/ds| ≤ |scale|/B for the contrastive loss: |coef·p_ij| ≤ |scale|/B, and at the positive
    |coef·p - scale/B|).
    dL/ds becomes a bf16/fp16 GEMM operand as p·dL/ds and the fp32 products are divided by p (exact: a power of
    two). Unscaled, the negatives' entries, ~scale/(B·N) (2e-9 at B=65536, N=131072, scale 20), fall below fp16's
    smallest subnormal (6e-8) and their gradients vanish."""
    return 2.0 ** min(126, max(-126, math.floor(math.log2(LOW_PRECISION_GRAD_MAX / bound))))


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a·b, out in its own dtype (fp32 from bf16/fp16 operands: cuBLAS accumulates in fp32)."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        torch.mm(a, b, out.dtype, out=out)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a·b, acc in its own dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        torch.addmm(acc, a, b, acc.dtype, out=acc)


def _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options: ContrastiveOptions,
          layout: ContrastiveLayout, epilogue, need_grad: bool, chunk: int, progress: bool, native: bool):
    """Loss (compute dtype, 0-d) and, when ``need_grad``, fp32/fp64 gradients w.r.t. queries, docs, all_queries.
    ``native``: the normalisation and its backward in C++ (the cpu backend). With :func:`low_precision_gemms` the
    normalised embeddings and, for the gradient GEMMs, dL/ds keep the inputs' dtype (fp32 results: the blocks,
    the epilogue and the gradients stay fp32); otherwise everything is in the compute dtype."""
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    cosine = options.similarity == "cos"
    B, P, off = layout.rows, layout.positives, options.offset
    low = low_precision_gemms(queries)

    def operand(x: Tensor) -> tuple[Tensor, Tensor | None]:
        return _normalized_in_own_dtype(x, dtype, cosine) if low else _normalized(x, dtype, cosine, native)

    def operand_backward_(grad: Tensor, x: Tensor, divisor: Tensor | None) -> Tensor:
        return _normalized_backward_in_chunks_(grad, x, divisor) if low else \
            _normalized_backward_(grad, x, divisor, native)

    q, q_norm = operand(queries)
    d, d_norm = operand(docs.reshape(-1, layout.dim))
    gathered = all_queries is not None
    Q, Q_norm = operand(all_queries) if gathered else (q, q_norm)
    guided = guide_queries is not None
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, dtype)
    dirs = options.directions
    # doc_to_doc candidates: every document, or (guided, GISTEmbedLoss) the positives only
    dd_cols = d[:P] if guided else d
    widths = block_columns(layout, guided)
    blocks = {k: torch.empty(chunk, widths[k], dtype=dtype, device=q.device) for k in dirs}
    guide_dirs = [k for k in dirs if guided]
    guides = {k: torch.empty(chunk, widths[k], dtype=dtype, device=q.device) for k in guide_dirs}
    # dL/ds as the gradient GEMMs' operand: the blocks themselves, or their copies in the embeddings' dtype
    operands = {k: torch.empty(chunk, widths[k], dtype=q.dtype, device=q.device) for k in dirs} if low and need_grad \
        else blocks
    if need_grad:
        grad_q = torch.zeros(q.shape, dtype=dtype, device=q.device)
        grad_d = torch.zeros(d.shape, dtype=dtype, device=q.device)
        grad_Q = torch.zeros(Q.shape, dtype=dtype, device=q.device) if gathered else grad_q
    loss = torch.zeros((), dtype=dtype, device=q.device)
    grad_scale = operand_grad_scale(abs(options.scale) / B)
    # a tqdm bar costs ~0.2 ms per call even when disabled
    starts = trange(0, B, chunk, desc="contrastive loss", leave=False) if progress else range(0, B, chunk)
    for r0 in starts:
        r1 = min(r0 + chunk, B)
        qc, pc = q[r0:r1], d[off + r0:off + r1]
        out = {k: v[:r1 - r0] for k, v in blocks.items()}
        _mm_into(out["query_to_doc"], qc, d.T)
        if "query_to_query" in dirs:
            _mm_into(out["query_to_query"], qc, Q.T)
        if "doc_to_query" in dirs:
            _mm_into(out["doc_to_query"], pc, Q.T)
        if "doc_to_doc" in dirs:
            _mm_into(out["doc_to_doc"], pc, dd_cols.T)
        gout = guide_blocks(guides, gq, gd, r0, r1, off, P)
        loss += epilogue(out, gout, ids, r0, layout, options, need_grad).sum()
        if not need_grad:
            continue
        # out now holds dL/ds for each block; accumulate the similarity GEMMs' gradients (low: of grad_scale·dL/ds)
        g = {k: torch.mul(out[k], grad_scale, out=v[:r1 - r0]) if low else out[k] for k, v in operands.items()}
        _addmm_into(grad_q[r0:r1], g["query_to_doc"], d)
        _addmm_into(grad_d, g["query_to_doc"].T, qc)
        if "query_to_query" in dirs:
            _addmm_into(grad_q[r0:r1], g["query_to_query"], Q)
            _addmm_into(grad_Q, g["query_to_query"].T, qc)
        if "doc_to_query" in dirs:
            _addmm_into(grad_d[off + r0:off + r1], g["doc_to_query"], Q)
            _addmm_into(grad_Q, g["doc_to_query"].T, pc)
        if "doc_to_doc" in dirs:
            _addmm_into(grad_d[off + r0:off + r1], g["doc_to_doc"], dd_cols)
            _addmm_into(grad_d[:dd_cols.size(0)], g["doc_to_doc"].T, pc)
    loss = loss / B
    del blocks, guides, operands, out, gout  # free the slab before the normalisation backward
    if not need_grad:
        return loss, None, None, None
    if low:
        for grad in {id(t): t for t in (grad_q, grad_d, grad_Q)}.values():
            grad.div_(grad_scale)
    grad_queries = operand_backward_(grad_q, q, q_norm)
    grad_docs = operand_backward_(grad_d, d, d_norm).view(docs.shape)
    grad_all = operand_backward_(grad_Q, Q, Q_norm) if gathered else None
    return loss, grad_queries, grad_docs, grad_all


def _slab_cpu(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options: ContrastiveOptions,
              layout: ContrastiveLayout, need_grad: bool, chunk: int):
    """:func:`_slab` with the cpu epilogue in one C++ call (csrc/cpu/contrastive.cpp: contrastive_slab_cpu), which
    saves the Python round trip of its ~20 tensor operations: most of a small batch's time."""
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    gq, gd, ids = guide_and_id_operands(guide_queries, guide_docs, doc_ids, dtype)
    dirs = options.directions
    flat_docs = docs if docs.dim() == 2 else docs.reshape(-1, layout.dim)
    loss, grad_queries, grad_docs, grad_all = _backend.EXTENSION.contrastive_slab_cpu(
        queries, flat_docs, all_queries, gq, gd, ids, "query_to_query" in dirs, "doc_to_query" in dirs,
        "doc_to_doc" in dirs, options.similarity == "cos", NORMALIZE_EPS, layout.positives, options.offset,
        layout.own_query_offset, *contrastive_epilogue.compiled_options(options), chunk, need_grad)
    if grad_docs is not None and flat_docs is not docs:
        grad_docs = grad_docs.view(docs.shape)
    return loss, grad_queries, grad_docs, grad_all


def _strategy(layout, options, gathered: bool, guide_dim: int, device: torch.device, available: Mapping, backend,
              strategy, memory_budget, chunk_size) -> tuple[str, str]:
    """(strategy, backend) for this call.

    ``tiled`` runs the Triton kernels: backend ``triton`` (``auto`` means triton here; anything else is an
    error). ``auto``: ``slab`` on CPU; on CUDA, ``tiled`` when Triton can run, the backend allows it (auto or
    triton), no ``chunk_size`` is given and the memory budget holds fewer than MIN_SLAB_ROWS rows per chunk (nor
    the whole batch), else ``slab``."""
    requested = _backend.requested_strategy(strategy)
    asked = _backend.requested_backend(backend)
    if requested == "tiled":
        if asked not in ("auto", "triton"):
            raise RuntimeError(f"strategy 'tiled' runs Triton kernels: it needs backend 'triton', got {asked!r}")
        return "tiled", _backend.resolve_backend(device, available, "triton")
    name = _backend.resolve_backend(device, available, asked)
    if requested == "slab" or device.type == "cpu" or chunk_size is not None or asked not in ("auto", "triton") \
            or available["triton"] is not None:
        return "slab", name
    with warnings.catch_warnings():  # a short chunk is no warning here: it selects the tiled strategy
        warnings.simplefilter("ignore", RuntimeWarning)
        chunk = chunk_rows(layout, options, gathered, guide_dim, _backend.memory_budget(memory_budget), 4, 1,
                           cache_cap=False)
    if chunk < min(layout.rows, MIN_SLAB_ROWS):
        return "tiled", "triton"
    return "slab", name


def _run(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, need_grad, *, backend, strategy,
         memory_budget, chunk_size, show_progress_bar):
    layout = check_inputs(queries, docs, all_queries, guide_queries, guide_docs, options, doc_ids, finite=False)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    available = contrastive_epilogue.available(queries.device)
    guide_dim = 0 if guide_queries is None else guide_queries.size(1)
    strategy, name = _strategy(layout, options, all_queries is not None, guide_dim, queries.device, available,
                               backend, strategy, memory_budget, chunk_size)
    native = strategy == "slab" and name == "cpu" and not show_progress_bar  # one C++ call: _slab_cpu
    if not native:  # (the C++ call checks the embeddings it reads for NaN / Inf itself)
        check_finite(queries=queries, docs=docs, all_queries=all_queries)
    if strategy == "tiled":
        from fastcache.triton.contrastive import contrastive_tiled

        return contrastive_tiled(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout,
                                 need_grad)
    epilogue = contrastive_epilogue.EPILOGUES[name]
    if queries.device.type == "cuda" and _backend.requested_backend(backend) == "auto" and all(
            available[k] is None for k in contrastive_epilogue.GPU_EPILOGUES):
        epilogue = contrastive_epilogue.epilogue_fastest_gpu
    itemsize = 8 if queries.dtype == torch.float64 else 4
    if chunk_size is None:
        budget = _backend.memory_budget(memory_budget)
        # + half a block for dL/ds in bf16/fp16, the low-precision gradient GEMMs' operand
        workspace = contrastive_epilogue.WORKSPACE_BLOCKS[name] + (0.5 if low_precision_gemms(queries) else 0)
        chunk = chunk_rows(layout, options, all_queries is not None, guide_dim, budget, itemsize, workspace,
                           cache_cap=queries.device.type == "cpu")
    else:
        chunk = min(chunk_size, layout.rows)
    if native:
        return _slab_cpu(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, need_grad,
                         chunk)
    return _slab(queries, docs, all_queries, guide_queries, guide_docs, doc_ids, options, layout, epilogue,
                 need_grad, chunk, show_progress_bar, native=name == "cpu")


class PrecomputedGradLoss(torch.autograd.Function):
    """A loss whose forward pass also computes its gradients: ``run(need_grad)`` returns (loss, dL/dqueries,
    dL/ddocs, dL/dall_queries or None); backward scales them by the incoming gradient. Other inputs (guides, ids)
    are inside ``run`` and get no gradient. First-order only: a backward with ``create_graph=True`` raises.

    The gradients are kept in their inputs' dtypes; fp16 ones as p·g with p a power of two (``operand_grad_scale``
    of their largest entry), undone in backward after the incoming gradient is applied: a loss scale (AMP's
    GradScaler, 2^16 by default) then brings entries far below fp16's range (~2e-9 per negative at B=65536) back
    up instead of finding them flushed to 0."""

    @staticmethod
    def forward(ctx, run, queries, docs, all_queries):
        need_grad = any(ctx.needs_input_grad[1:])
        loss, gq, gd, gaq = run(need_grad)
        if need_grad:
            pairs = ((gq, queries), (gd, docs), (gaq, all_queries))
            largest = max((float(g.abs().max()) for g, x in pairs if g is not None and x.dtype == torch.float16),
                          default=0.0)
            ctx.grad_scale = operand_grad_scale(largest) if largest > 0 else 1.0
            ctx.save_for_backward(*(None if g is None else g.mul(ctx.grad_scale).to(x.dtype)
                                    if x.dtype == torch.float16 else g.to(x.dtype) for g, x in pairs))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_double_backward("fastcache's contrastive op")
        return (None, *(None if g is None else g * grad_loss.to(g.dtype) if g.dtype != torch.float16 else
                        (g.float() * (grad_loss.float() / ctx.grad_scale)).to(g.dtype) for g in ctx.saved_tensors))


def one_pass(run, queries: Tensor, docs: Tensor, all_queries: Tensor | None) -> ContrastiveLossAndGrad:
    """``run(True)`` without an autograd graph (what gradient caching consumes), the gradients cast to the
    dtypes of the inputs they belong to."""
    with torch.no_grad():
        loss, gq, gd, gaq = run(True)

    def like(grad: Tensor, x: Tensor) -> Tensor:
        return grad if grad.dtype == x.dtype else grad.to(x.dtype)

    return ContrastiveLossAndGrad(loss, like(gq, queries), like(gd, docs),
                                  None if gaq is None else like(gaq, all_queries))


_SETTINGS = ("backend", "strategy", "memory_budget", "chunk_size", "show_progress_bar")


@functools.lru_cache(maxsize=256)
def _validated_options(names: tuple, types: tuple, values: tuple) -> ContrastiveOptions:
    """ContrastiveOptions(names=values), validated once per distinct set (a loss passes the same options at every
    step). The types are part of the key: 1 == 1.0 == True, but only an int is a valid offset."""
    return ContrastiveOptions(**dict(zip(names, values)))


def _parse(kwargs: dict) -> tuple[ContrastiveOptions, dict]:
    """Split keyword arguments into validated options and run settings."""
    settings = {k: kwargs.pop(k, None) for k in _SETTINGS}
    settings["show_progress_bar"] = bool(settings["show_progress_bar"])
    unknown = kwargs.keys() - ContrastiveOptions.__dataclass_fields__.keys()
    if unknown:
        raise TypeError(f"unknown argument(s) {sorted(unknown)}; options are "
                        f"{list(ContrastiveOptions.__dataclass_fields__)} and settings {list(_SETTINGS)}")
    values = tuple(kwargs.values())
    try:
        return _validated_options(tuple(kwargs), tuple(map(type, values)), values), settings
    except TypeError:  # an unhashable value (e.g. directions as a list): validated without the cache
        return ContrastiveOptions(**kwargs), settings


def contrastive_loss(
    queries: Tensor,
    docs: Tensor,
    *,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> Tensor:
    """The in-batch contrastive loss of sentence-transformers' MultipleNegativesRankingLoss (and GISTEmbedLoss
    with ``guide_*``), differentiable w.r.t. ``queries``, ``docs`` and ``all_queries``.

    Args:
        queries: [B, D] the loss rows (this process's anchors).
        docs: [N, D] candidates laid out column-major, N = C·P (all P positives, then each hard-negative
            column), or [C, P, D]. The positive of row i is docs[offset + i].
        all_queries: [P, D] every query of the gathered batch (``all_queries[offset + i]`` is ``queries[i]``);
            the columns of query_to_query and doc_to_query. Default: the queries themselves (P = B). Not checked
            against ``queries``: the two are separate inputs with separate gradients (in DDP the gathered copy
            and the local rows are different tensors; gradcheck and finite differences perturb them one at a
            time), so an equality check would refuse legitimate calls. With gather_across_devices the drop-in
            losses compute the offset from the rank themselves.
        guide_queries, guide_docs: guide-model embeddings laid out like ``queries`` and ``docs``: GIST
            false-negative masking (see the module docstring). Never differentiated.
        doc_ids: an integer per candidate, laid out like ``docs`` without the last dimension; candidates that
            share the id of a row's positive (duplicates, e.g. the same text) are not its negatives.

    Options (keywords, see :class:`ContrastiveOptions`):
        scale=20.0: logit = scale · similarity (1 / temperature); any finite non-zero number. A negative scale
            ranks the least similar candidates first; masked candidates are left out of the softmax either way
            (their logit is -inf after scaling).
        similarity="cos": "cos" (cosine, as sentence-transformers' cos_sim) or "dot".
        directions=("query_to_doc",): subset of query_to_doc (required), query_to_query, doc_to_query,
            doc_to_doc.
        partition_mode="joint": "joint" (one softmax over every direction) or "per_direction" (mean of the
            per-direction log-partitions).
        hardness_mode=None, hardness_strength=0.0: add hardness_strength · stopgrad(s) to the query_to_doc logits
            of in-batch negatives ("in_batch_negatives"), own hard negatives ("hard_negatives") or every negative
            ("all_negatives").
        offset=0: column of row 0's positive among the positives (rank · B when gathered across devices).
        margin=0.0, margin_strategy="absolute": the guide's false-negative margin, "absolute" or "relative".

    Settings (keywords):
        backend=None: "auto", "cpu", "torch", "cuda" or "triton"; None reads ``FASTCACHE_BACKEND`` (default auto).
            On CUDA, auto with the slab strategy times the cuda and triton epilogues once per shape bucket, dtype
            and options, and keeps the faster. "triton" runs CPU tensors too under ``TRITON_INTERPRET=1``.
        strategy=None: "auto", "slab" or "tiled"; None reads ``FASTCACHE_STRATEGY`` (default auto). slab: row
            chunks of materialised similarity blocks (torch GEMMs + a fused epilogue); tiled: Triton kernels that
            never hold more than a tile (needs backend triton). auto: slab on CPU; on CUDA tiled when the memory
            budget holds fewer than MIN_SLAB_ROWS (256) rows per slab chunk (and fewer than B), else slab.
        memory_budget=None: workspace bytes (None reads ``FASTCACHE_MEMORY_BUDGET``, default 256 MiB); it sets
            the rows per chunk.
        chunk_size=None: rows per chunk, overriding the budget.
        show_progress_bar=False: a tqdm bar over the chunks.

    Returns: the mean loss, a 0-d float32 tensor (float64 for float64 inputs).
    """
    refuse_functorch("fastcache.contrastive_loss")
    options, settings = _parse(options)
    guides = [t.detach() if isinstance(t, Tensor) else t for t in (guide_queries, guide_docs)]

    def run(need_grad: bool):
        return _run(queries, docs, all_queries, *guides, doc_ids, options, need_grad, **settings)

    return PrecomputedGradLoss.apply(run, queries, docs, all_queries)


def contrastive_loss_and_grad(
    queries: Tensor,
    docs: Tensor,
    *,
    all_queries: Tensor | None = None,
    guide_queries: Tensor | None = None,
    guide_docs: Tensor | None = None,
    doc_ids: Tensor | None = None,
    **options,
) -> ContrastiveLossAndGrad:
    """:func:`contrastive_loss` and its gradients w.r.t. the embeddings in one pass, without an autograd graph
    (what gradient caching consumes). Same arguments; gradients come in the inputs' dtypes and shapes."""
    options, settings = _parse(options)
    inputs = [t.detach() if isinstance(t, Tensor) else t
              for t in (queries, docs, all_queries, guide_queries, guide_docs, doc_ids)]
    return one_pass(lambda need_grad: _run(*inputs, options, need_grad, **settings), queries, docs, all_queries)
