"""Row normalisation of the contrastive op's operands (cosine similarity) and its backward, shared by both
strategies and by the Matryoshka op: x̂ = x / max(‖x‖, eps) as torch.nn.functional.normalize, in one copy; in the
operands' own dtype NORMALIZE_ROWS rows at a time; and the guide and id operands every strategy takes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcache import _backend

NORMALIZE_ROWS = 8192  # rows normalised (and their normalisation backward) per step when the operands keep their dtype
NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default, which sentence-transformers' cos_sim uses


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
    # roofline: norm.forward (x read, the copy written; the acc temporaries of NORMALIZE_ROWS rows stay in L2)
    for r0 in range(0, x.size(0), NORMALIZE_ROWS):
        y, norm = _normalized(x[r0:r0 + NORMALIZE_ROWS], acc, True)
        out[r0:r0 + NORMALIZE_ROWS] = y
        norms[r0:r0 + NORMALIZE_ROWS] = norm
    return out, norms


def _normalized_backward_in_chunks_(grad: Tensor, normalized: Tensor, norm: Tensor | None) -> Tensor:
    """``_normalized_backward_`` (in place on the ``acc`` gradient) NORMALIZE_ROWS rows at a time, the normalised
    rows widened to the gradient's dtype one chunk at a time."""
    if norm is not None:  # roofline: norm.backward (the gradient in place, the normalised rows read)
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

