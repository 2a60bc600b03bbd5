"""The slab epilogue of the contrastive loss: similarity blocks of a row chunk -> dL/ds in place, per-row losses.

Every backend implements the same contract (the maths is in fastcache/ops/contrastive/__init__.py's docstring):

    epilogue(blocks, guides, doc_ids, row0, layout, options, compute_grad) -> loss_rows [c]

``blocks`` maps each enabled direction to its raw similarity block [c, columns] of rows row0 .. row0+c-1 (compute
dtype, overwritten with dL/ds = scale·dL/dlogit when ``compute_grad``); ``guides`` maps directions to the guide's
similarity blocks (empty without a guide); ``doc_ids`` is None or an int64 id per candidate (duplicates of a
row's positive are masked in query_to_doc and doc_to_doc). L is the mean over the layout's B rows.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from types import MappingProxyType

import torch
from torch import Tensor

from fastcache import _backend
from fastcache.ops.contrastive.options import KIND_CODES, kernel_params


def _guide_threshold(guide_qd: Tensor, pos: Tensor, options) -> Tensor:
    """Per row: the guide's positive similarity minus the margin (absolute, or relative to its magnitude)."""
    g = guide_qd.gather(1, pos[:, None])
    return g - options.margin if options.margin_strategy == "absolute" else g - g.abs() * options.margin


def _own_columns(pos: Tensor, positives: int, columns: int) -> Tensor:
    """[c, columns // P] the columns pos + k·P of each row: its positive (k = 0) and its own hard negatives."""
    return pos[:, None] + positives * torch.arange(columns // positives, device=pos.device)[None, :]


def _logits_(kind: str, s: Tensor, g: Tensor | None, threshold: Tensor | None, doc_ids: Tensor | None, pos: Tensor,
             own_query: Tensor, layout, options) -> None:
    """Turn one block of similarities into logits in place: scaled, hardness-penalised (query_to_doc), masked."""
    ninf = float("-inf")
    rows = torch.arange(s.size(0), device=s.device)
    if kind == "query_to_doc" and options.hardness:
        own = _own_columns(pos, layout.positives, s.size(1))
        raw = s.gather(1, own)
        plain, penalised = options.scale, options.scale + options.hardness_strength
        own_factor = torch.full_like(raw, plain)
        if options.hardness_mode == "hard_negatives":
            s.mul_(plain)
            own_factor[:, 1:] = penalised
        else:  # in_batch_negatives penalise every other row's columns; all_negatives also the own hard negatives
            s.mul_(penalised)
            if options.hardness_mode == "all_negatives":
                own_factor[:, 1:] = penalised
        s.scatter_(1, own, raw * own_factor)
    else:
        s.mul_(options.scale)
    if g is not None:
        keep = s[rows, pos] if kind == "query_to_doc" else None
        s.masked_fill_(g > threshold, ninf)
        if keep is not None:  # the positive is never masked
            s[rows, pos] = keep
    elif kind == "query_to_query":
        s[rows, own_query] = ninf
    elif kind == "doc_to_doc":
        s.scatter_(1, _own_columns(pos, layout.positives, s.size(1)), ninf)
    if doc_ids is not None and kind in ("query_to_doc", "doc_to_doc"):
        keep = s[rows, pos] if kind == "query_to_doc" else None
        s.masked_fill_(doc_ids[None, :s.size(1)] == doc_ids[pos][:, None], ninf)
        if keep is not None:  # the positive is no duplicate of itself
            s[rows, pos] = keep


def _logsumexp(blocks: list[Tensor]) -> Tensor:
    """Row log-sum-exp over several blocks jointly, one block-sized temporary at a time (-inf when all masked)."""
    m = torch.stack([x.amax(dim=1) for x in blocks]).amax(dim=0)
    shift = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    total = sum(torch.exp(x - shift[:, None]).sum(dim=1) for x in blocks)
    return shift + torch.log(total)


def epilogue_torch(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int, layout,
                   options, compute_grad: bool) -> Tensor:
    """Pure-PyTorch epilogue (any device, any float dtype), in place but for one block-sized temporary."""
    qd = blocks["query_to_doc"]
    rows = torch.arange(row0, row0 + qd.size(0), device=qd.device)
    pos = options.offset + rows
    own_query = layout.own_query_offset + rows
    threshold = _guide_threshold(guides["query_to_doc"], pos, options) if guides else None
    for k, s in blocks.items():
        _logits_(k, s, guides.get(k), threshold, doc_ids, pos, own_query, layout, options)
    if options.partition_mode == "joint":  # one log-partition over every block, the same for each block
        joint = _logsumexp(list(blocks.values()))
        base = {k: joint for k in blocks}
        log_partition = joint
    else:  # each block's own log-partition, averaged
        base = {k: _logsumexp([x]) for k, x in blocks.items()}
        log_partition = torch.stack(list(base.values()), dim=1).mean(dim=1)
    loss_rows = log_partition - qd.gather(1, pos[:, None]).squeeze(1)
    if compute_grad:
        params = kernel_params(options, layout, len(blocks), row0, compute_grad)
        for k, x in blocks.items():  # a fully masked block has base -inf: its gradient is 0
            finite_base = torch.where(torch.isinf(base[k]), torch.zeros_like(base[k]), base[k])
            x.sub_(finite_base[:, None]).exp_().mul_(params.coef)
        qd[torch.arange(qd.size(0), device=qd.device), pos] -= params.pos_coef
    return loss_rows


def _compiled_arguments(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int,
                        layout, options, compute_grad: bool) -> tuple:
    """The arguments of the compiled epilogues (csrc: contrastive_epilogue_cpu, and _cuda plus a stream)."""
    return (
        blocks["query_to_doc"], blocks.get("query_to_query"), blocks.get("doc_to_query"), blocks.get("doc_to_doc"),
        guides.get("query_to_doc"), guides.get("query_to_query"), guides.get("doc_to_doc"), doc_ids,
        kernel_params(options, layout, len(blocks), row0, compute_grad))


def epilogue_cpu(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int, layout,
                 options, compute_grad: bool) -> Tensor:
    """The compiled C++ epilogue (csrc/cpu/contrastive.cpp); CPU float32/float64 blocks."""
    return _backend.EXTENSION.contrastive_epilogue_cpu(
        *_compiled_arguments(blocks, guides, doc_ids, row0, layout, options, compute_grad))


def epilogue_cuda(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int, layout,
                  options, compute_grad: bool) -> Tensor:
    """The compiled CUDA epilogue (csrc/cuda), on the current stream of the blocks' device."""
    stream = torch.cuda.current_stream(blocks["query_to_doc"].device).cuda_stream
    return _backend.EXTENSION.contrastive_epilogue_cuda(
        *_compiled_arguments(blocks, guides, doc_ids, row0, layout, options, compute_grad), stream)


def epilogue_triton(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int, layout,
                    options, compute_grad: bool) -> Tensor:
    """The Triton epilogue (fastcache/triton/contrastive.py): CUDA tensors, or CPU ones under TRITON_INTERPRET=1."""
    from fastcache.triton.contrastive import slab_epilogue

    return slab_epilogue({KIND_CODES[k]: v for k, v in blocks.items()}, {KIND_CODES[k]: v for k, v in guides.items()},
                         doc_ids, kernel_params(options, layout, len(blocks), row0, compute_grad))


EPILOGUES = {"cpu": epilogue_cpu, "torch": epilogue_torch, "cuda": epilogue_cuda, "triton": epilogue_triton}
# Block-sized buffers each epilogue needs per chunk, the blocks themselves included (for the memory budget).
WORKSPACE_BLOCKS = {"cpu": 1, "torch": 2, "cuda": 1, "triton": 1}
# The GPU epilogues that backend "auto" times against each other (slab strategy on CUDA).
GPU_EPILOGUES = ("cuda", "triton")
_FASTEST: dict[tuple, str] = {}


def available(device: torch.device) -> Mapping[str, str | None]:
    """Backends of this op and, for each, None when it can run on ``device`` or the reason it cannot (read-only:
    the answer only changes with ``TRITON_INTERPRET``, so it is worked out once per device and value)."""
    return _available(device, os.environ.get("TRITON_INTERPRET"))


@functools.lru_cache(maxsize=64)
def _available(device: torch.device, triton_interpret: str | None) -> Mapping[str, str | None]:
    return MappingProxyType({
        "cpu": _backend.cpu_kernel_status(device),
        "torch": None,
        "cuda": _backend.cuda_kernel_status(device, "contrastive_epilogue_cuda"),
        "triton": _backend.triton_kernel_status(device),
    })


def _pow2_bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cuda_seconds(name: str, run) -> float:
    """Seconds of one call of ``run`` (the epilogue ``name``) on the current CUDA stream, by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def fastest(names: tuple[str, ...], blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None,
            row0: int, layout, options, compute_grad: bool, seconds=_cuda_seconds) -> str:
    """The fastest of the epilogues ``names`` for blocks like these, cached per shape bucket (rows and columns of
    each block rounded up to powers of two), dtype, guide / ids presence and options. On the first call of a
    bucket each candidate runs once to warm up (and compile), then once timed by ``seconds(name, run)``, each time
    on fresh copies of the blocks (the epilogues work in place)."""
    key = (names, tuple((k, _pow2_bucket(v.size(0)), _pow2_bucket(v.size(1))) for k, v in blocks.items()),
           blocks["query_to_doc"].dtype, bool(guides), doc_ids is not None, options, compute_grad)
    if key not in _FASTEST:
        timings = {}
        for name in names:
            for timed in (False, True):
                copies = {k: v.clone() for k, v in blocks.items()}

                def run(name=name, copies=copies):
                    EPILOGUES[name](copies, guides, doc_ids, row0, layout, options, compute_grad)

                if timed:
                    timings[name] = seconds(name, run)
                else:
                    run()
        _FASTEST[key] = min(timings, key=timings.get)
    return _FASTEST[key]


def epilogue_fastest_gpu(blocks: dict[str, Tensor], guides: dict[str, Tensor], doc_ids: Tensor | None, row0: int,
                         layout, options, compute_grad: bool) -> Tensor:
    """Backend "auto" on CUDA: the faster of the CUDA and Triton epilogues for this shape (see ``fastest``)."""
    name = fastest(GPU_EPILOGUES, blocks, guides, doc_ids, row0, layout, options, compute_grad)
    return EPILOGUES[name](blocks, guides, doc_ids, row0, layout, options, compute_grad)
