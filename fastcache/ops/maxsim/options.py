"""The MaxSim op's options and input checks (the maths: fastcache/ops/maxsim/__init__.py).

:class:`MaxSimOptions` (validated on construction), :class:`MaxSimLayout` (the sizes of one call and the masks as
bool tensors, from :func:`check_inputs`), :func:`compute_dtype` (the one rule for the dtype every score and
gradient is computed in) and the upstream constants. Imports nothing of the op above it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastcache.ops._autograd_guard import check_real_device

DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# sentence-transformers' score of a document without any valid token (util/similarity.py _EMPTY_DOCUMENT_SCORE),
# before the division by the query's token count
EMPTY_DOCUMENT_SCORE = -1e9


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Scores, token maxima, weights and gradient accumulators: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class MaxSimOptions:
    """Options of the MaxSim contrastive loss (validated on construction). See the package docstring."""

    scale: float = 1.0
    length_normalize: bool = False
    offset: int = 0

    def __post_init__(self):
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) \
                or self.scale == 0:
            raise ValueError(f"scale must be a finite non-zero number, got {self.scale!r}")
        if not isinstance(self.length_normalize, bool):
            raise ValueError(f"length_normalize must be a bool, got {self.length_normalize!r}")
        if isinstance(self.offset, bool) or not isinstance(self.offset, int) or self.offset < 0:
            raise ValueError(f"offset must be a non-negative int (rank · B when gathered), got {self.offset!r}")


@dataclass(frozen=True)
class MaxSimLayout:
    """One call's sizes (queries [B, Lq, D], docs [G, N, Ld, D]) and its masks as bool tensors ([B, Lq] and
    [G·N, Ld], None where the argument was None: every token valid)."""

    B: int
    Lq: int
    D: int
    G: int
    N: int
    Ld: int
    query_mask: Tensor | None
    doc_mask: Tensor | None

    @property
    def columns(self) -> int:
        return self.G * self.N


def _check_embeddings(name: str, t, ndim: int, shape: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape}, got {type(t).__name__}")
    check_real_device(name, t)
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D {shape}, got shape {tuple(t.shape)}")
    if t.dtype not in DTYPES:
        raise ValueError(f"{name} must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _check_mask(name: str, mask, expected: tuple[int, ...], shape: str, device: torch.device) -> Tensor | None:
    """The mask as a bool tensor (None stays None); bool or 0/1 values, ``expected`` shape, on ``device``."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape} of bool or 0/1, got {type(mask).__name__}")
    check_real_device(name, mask)
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape {shape} = {expected}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} must be on the embeddings' device {device}, got {mask.device}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1 (got {mask.dtype} with other values)")
    return mask != 0


def check_inputs(queries: Tensor, docs: Tensor, query_mask, doc_mask, options: MaxSimOptions) -> MaxSimLayout:
    """The layout of a call, or a ValueError / TypeError naming the argument that is wrong."""
    _check_embeddings("queries", queries, 3, "[B, Lq, D]")
    _check_embeddings("docs", docs, 4, "[G, N, Ld, D]")
    if docs.dtype != queries.dtype:
        raise ValueError(f"docs must have the queries' dtype {queries.dtype}, got {docs.dtype}")
    if docs.device != queries.device:
        raise ValueError(f"docs must be on the queries' device {queries.device}, got {docs.device}")
    B, Lq, D = queries.shape
    G, N, Ld, Dd = docs.shape
    if Dd != D:
        raise ValueError(f"docs [G, N, Ld, D] must have the queries' embedding size D={D}, got {Dd}")
    if B == 0 or Lq == 0 or D == 0:
        raise ValueError(f"queries [B, Lq, D] must have B, Lq and D >= 1, got shape {tuple(queries.shape)}")
    if N == 0:
        raise ValueError(f"docs [G, N, Ld, D] must have N >= 1 documents per group, got shape {tuple(docs.shape)}")
    if options.offset + B > G:
        raise ValueError(f"offset + B must be at most G (the positive of query i is group offset + i): offset="
                         f"{options.offset}, B={B}, G={G}")
    q_mask = _check_mask("query_mask", query_mask, (B, Lq), "[B, Lq]", queries.device)
    d_mask = _check_mask("doc_mask", doc_mask, (G, N, Ld), "[G, N, Ld]", queries.device)
    return MaxSimLayout(B, Lq, D, G, N, Ld, q_mask, None if d_mask is None else d_mask.reshape(G * N, Ld))
