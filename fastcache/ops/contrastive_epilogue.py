"""The slab epilogue of the contrastive loss: similarity blocks of a row chunk -> dL/ds in place, per-row losses.

Every backend implements the same contract (the maths is in fastcache/ops/contrastive.py's docstring):

    epilogue(blocks, guides, row0, layout, options, compute_grad) -> loss_rows [c]

``blocks`` maps each enabled direction to its raw similarity block [c, columns] of rows row0 .. row0+c-1 (compute
dtype, overwritten with dL/ds = scale·dL/dlogit when ``compute_grad``); ``guides`` maps directions to the guide's
similarity blocks (empty without a guide). L is the mean over the layout's B rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastcache import _backend

_HARDNESS_CODES = {None: 0, "in_batch_negatives": 1, "hard_negatives": 2, "all_negatives": 3}
_MARGIN_CODES = {"absolute": 0, "relative": 1}


def _guide_threshold(guide_qd: Tensor, pos: Tensor, options) -> Tensor:
    """Per row: the guide's positive similarity minus the margin (absolute, or relative to its magnitude)."""
    g = guide_qd.gather(1, pos[:, None])
    return g - options.margin if options.margin_strategy == "absolute" else g - g.abs() * options.margin


def _hardness_mask(columns: int, pos: Tensor, positives: int, mode: str) -> Tensor:
    """[c, N] True where the hardness penalty applies: by column, relative to each row's positive ``pos``."""
    j = torch.arange(columns, device=pos.device)[None, :]
    own = (j % positives) == pos[:, None]
    if mode == "in_batch_negatives":
        return ~own
    if mode == "hard_negatives":
        return own & (j >= positives)
    return j != pos[:, None]  # all_negatives


def _logits(kind: str, s: Tensor, g: Tensor | None, threshold: Tensor | None, pos: Tensor, own_query: Tensor,
            layout, options) -> Tensor:
    """One block's logits: scaled, hardness-penalised (query_to_doc), masked to -inf."""
    logits = s * options.scale
    j = torch.arange(s.size(1), device=s.device)[None, :]
    if kind == "query_to_doc":
        if options.hardness:
            penalised = _hardness_mask(s.size(1), pos, layout.positives, options.hardness_mode)
            logits = logits + options.hardness_strength * s * penalised
        mask = (g > threshold) & (j != pos[:, None]) if g is not None else None
    elif kind == "query_to_query":
        mask = g > threshold if g is not None else j == own_query[:, None]
    elif kind == "doc_to_doc":
        mask = g > threshold if g is not None else (j % layout.positives) == pos[:, None]
    else:  # doc_to_query
        mask = None
    return logits if mask is None else logits.masked_fill(mask, float("-inf"))


def epilogue_torch(blocks: dict[str, Tensor], guides: dict[str, Tensor], row0: int, layout, options,
                   compute_grad: bool) -> Tensor:
    """Pure-PyTorch epilogue (any device, any float dtype)."""
    qd = blocks["query_to_doc"]
    rows = torch.arange(row0, row0 + qd.size(0), device=qd.device)
    pos = options.offset + rows
    own_query = layout.own_query_offset + rows
    threshold = _guide_threshold(guides["query_to_doc"], pos, options) if guides else None
    logits = {k: _logits(k, s, guides.get(k), threshold, pos, own_query, layout, options) for k, s in blocks.items()}
    if options.partition_mode == "joint":  # one log-partition over every block, the same for each block
        joint = torch.logsumexp(torch.cat(list(logits.values()), dim=1), dim=1)
        base = {k: joint for k in logits}
        log_partition = joint
    else:  # each block's own log-partition, averaged
        base = {k: torch.logsumexp(x, dim=1) for k, x in logits.items()}
        log_partition = torch.stack(list(base.values()), dim=1).mean(dim=1)
    loss_rows = log_partition - logits["query_to_doc"].gather(1, pos[:, None]).squeeze(1)
    if compute_grad:
        coef = options.scale / layout.rows / (1 if options.partition_mode == "joint" else len(blocks))
        for k, x in logits.items():
            blocks[k].copy_(torch.exp(x - base[k][:, None]) * coef)
        qd[torch.arange(qd.size(0), device=qd.device), pos] -= options.scale / layout.rows
    return loss_rows


def epilogue_cpu(blocks: dict[str, Tensor], guides: dict[str, Tensor], row0: int, layout, options,
                 compute_grad: bool) -> Tensor:
    """The compiled C++ epilogue (csrc/cpu/contrastive.cpp); CPU float32/float64 blocks."""
    return _backend.EXTENSION.contrastive_epilogue_cpu(
        blocks["query_to_doc"], blocks.get("query_to_query"), blocks.get("doc_to_query"), blocks.get("doc_to_doc"),
        guides.get("query_to_doc"), guides.get("query_to_query"), guides.get("doc_to_doc"),
        row0, layout.rows, layout.positives, options.offset, layout.own_query_offset, float(options.scale),
        _HARDNESS_CODES[options.hardness_mode] if options.hardness else 0, float(options.hardness_strength),
        options.partition_mode == "joint", _MARGIN_CODES[options.margin_strategy], float(options.margin),
        compute_grad)


EPILOGUES = {"cpu": epilogue_cpu, "torch": epilogue_torch}


def available(device: torch.device) -> dict[str, str | None]:
    """Backends of this op and, for each, None when it can run on ``device`` or the reason it cannot."""
    gpu_reason = "GPU kernels for the contrastive op are not part of this build yet"
    return {
        "cpu": _backend.cpu_kernel_status(device),
        "torch": None,
        "cuda": gpu_reason,
        "triton": gpu_reason,
    }
