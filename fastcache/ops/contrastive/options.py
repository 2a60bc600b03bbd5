"""The contrastive op's options and input checks (the maths: fastcache/ops/contrastive/__init__.py).

:class:`ContrastiveOptions` (validated on construction), :class:`ContrastiveLayout` (the sizes of one call, from
:func:`check_inputs`), :class:`ContrastiveLossAndGrad` (what the one-pass entry points return), the NaN / Inf checks,
:func:`parse_arguments`, which splits a public function's keywords into options and run settings, and
:func:`kernel_params`, the options as every epilogue kernel takes them (csrc/contrastive_params.h's struct, its codes
and derived coefficients). Imports nothing of the op above it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastcache.kernel_codes import Hardness, Kind, MarginStrategy
from fastcache.ops._autograd_guard import check_real_device

DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
PARTITION_MODES = ("joint", "per_direction")
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
SIMILARITIES = ("cos", "dot")
MARGIN_STRATEGIES = ("absolute", "relative")
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# the codes as plain ints, looked up by option value (torch.compile traces the op's forward: dict lookups of ints
# trace, IntEnum's metaclass lookups recurse in dynamo)
KIND_CODES = {name: int(Kind[name.upper()]) for name in DIRECTIONS}
HARDNESS_CODES = {mode: int(Hardness[mode.upper()] if mode else Hardness.NONE) for mode in HARDNESS_MODES}
MARGIN_CODES = {strategy: int(MarginStrategy[strategy.upper()]) for strategy in MARGIN_STRATEGIES}


def auto_filter_eps(dtype: torch.dtype) -> float:
    """filter_eps="auto" for inputs of ``dtype``: torch.finfo(dtype).eps / 32, as Cut Cross-Entropy's "auto"
    (apple/ml-cross-entropy, cut_cross_entropy/utils.py, _handle_eps): 2^-12 for bfloat16, 2^-15 for float16,
    2^-28 for float32, 2^-57 for float64."""
    return torch.finfo(dtype).eps / 32


@dataclass(frozen=True)
class ContrastiveOptions:
    """Options of the contrastive loss (validated on construction). See the module docstring for the maths.

    ``filter_eps`` (None, "auto" or a positive number) skips the backward products of every tile whose entries all
    have |dL/ds| < filter_eps·|scale|/B, i.e. |dloss_i/dlogit_ij| < filter_eps in the units of a row's own loss
    (softmax minus one-hot, Cut Cross-Entropy's filter; per_direction: divided by the number of blocks). None:
    exact. The bound it allows is in fastcache/ops/contrastive/__init__.py's docstring."""

    scale: float = 20.0
    similarity: str = "cos"
    directions: tuple[str, ...] = ("query_to_doc",)
    partition_mode: str = "joint"
    hardness_mode: str | None = None
    hardness_strength: float = 0.0
    offset: int = 0
    margin: float = 0.0
    margin_strategy: str = "absolute"
    filter_eps: float | str | None = None

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
        eps = self.filter_eps
        if eps is not None and eps != "auto" and (isinstance(eps, bool) or not isinstance(eps, (int, float))
                                                  or not math.isfinite(eps) or eps <= 0):
            raise ValueError(f"filter_eps must be None, 'auto' or a finite positive number, got {eps!r}")

    def for_dtype(self, dtype: torch.dtype) -> ContrastiveOptions:
        """These options with filter_eps="auto" replaced by its value for inputs of ``dtype``
        (:func:`auto_filter_eps`); the options themselves otherwise."""
        if self.filter_eps != "auto":
            return self
        return dataclasses.replace(self, filter_eps=auto_filter_eps(dtype))

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



class KernelParams(NamedTuple):
    """The options of one epilogue call as every kernel takes them: csrc/contrastive_params.h's ContrastiveParams,
    field for field in its order (the C++ bindings take this tuple as one argument), also read by the torch and
    Triton epilogues. Built only by :func:`kernel_params`."""

    row0: int
    batch_size: int
    num_positives: int
    offset: int
    own_query_offset: int
    scale: float
    hardness_strength: float  # 0.0 unless options.hardness
    margin: float
    hardness_mode: Hardness  # Hardness.NONE unless options.hardness
    margin_strategy: MarginStrategy
    joint: bool
    compute_grad: bool
    coef: float  # dL/ds = coef·exp(logit - log_partition) ...
    pos_coef: float  # ... - pos_coef at the positive
    filter_threshold: float  # skip the gradient products of a tile whose max |dL/ds| is below it (0.0: exact)


def kernel_params(options: ContrastiveOptions, layout: ContrastiveLayout, num_blocks: int, row0: int = 0,
                  compute_grad: bool = True) -> KernelParams:
    """The one encoding of ``options`` for the kernels, with every derived coefficient: for rows row0.. of a batch
    of layout.rows rows and ``num_blocks`` similarity blocks (the enabled directions),
    coef = scale/B/(1 if joint else num_blocks) and pos_coef = scale/B (each computed as scale·(1/B) first);
    filter_threshold = filter_eps·|pos_coef| (0.0 without filter_eps; "auto" must be resolved first:
    ContrastiveOptions.for_dtype)."""
    joint = options.partition_mode == "joint"
    pos_coef = float(options.scale) * (1.0 / layout.rows)
    if options.filter_eps == "auto":
        raise RuntimeError("kernel_params: filter_eps='auto' is resolved by ContrastiveOptions.for_dtype first")
    return KernelParams(
        row0, layout.rows, layout.positives, options.offset, layout.own_query_offset, float(options.scale),
        float(options.hardness_strength) if options.hardness else 0.0, float(options.margin),
        HARDNESS_CODES[options.hardness_mode if options.hardness else None],
        MARGIN_CODES[options.margin_strategy], joint, bool(compute_grad),
        pos_coef / (1 if joint else num_blocks), pos_coef,
        float(options.filter_eps) * abs(pos_coef) if options.filter_eps else 0.0)


_SETTINGS = ("backend", "strategy", "memory_budget", "chunk_size", "show_progress_bar")


@functools.lru_cache(maxsize=256)
def _validated_options(names: tuple, types: tuple, values: tuple) -> ContrastiveOptions:
    """ContrastiveOptions(names=values), validated once per distinct set (a loss passes the same options at every
    step). The types are part of the key: 1 == 1.0 == True, but only an int is a valid offset."""
    return ContrastiveOptions(**dict(zip(names, values)))


def parse_arguments(kwargs: dict) -> tuple[ContrastiveOptions, dict]:
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

