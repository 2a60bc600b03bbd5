"""fastcache: fused kernels for contrastive, Matryoshka and learning-to-rank losses (sentence-transformers drop-in).

Public API: :func:`contrastive_loss`, :func:`contrastive_loss_and_grad`, :func:`maxsim_contrastive_loss`,
:func:`maxsim_contrastive_loss_and_grad`, :func:`info`, the drop-in losses in
:mod:`fastcache.losses`, and :func:`patch_sentence_transformers` (with its undo).
"""

from __future__ import annotations

import warnings

from fastcache import _backend
from fastcache.patch import patch_sentence_transformers, unpatch_sentence_transformers
from fastcache.ops.contrastive import (
    ContrastiveLossAndGrad,
    ContrastiveOptions,
    contrastive_loss,
    contrastive_loss_and_grad,
)
from fastcache.ops.maxsim import MaxSimLossAndGrad, maxsim_contrastive_loss, maxsim_contrastive_loss_and_grad

__version__ = "0.1.0"
__all__ = [
    "ContrastiveLossAndGrad",
    "ContrastiveOptions",
    "MaxSimLossAndGrad",
    "contrastive_loss",
    "contrastive_loss_and_grad",
    "info",
    "maxsim_contrastive_loss",
    "maxsim_contrastive_loss_and_grad",
    "patch_sentence_transformers",
    "unpatch_sentence_transformers",
]

if _backend.EXTENSION is None:
    warnings.warn(
        f"fastcache: the compiled extension is not available ({_backend.EXTENSION_ERROR}); CPU tensors use the "
        "pure-PyTorch backend (same results, slower). Rebuild with `pip install --no-build-isolation -e .`.",
        RuntimeWarning,
        stacklevel=2,
    )


def info() -> dict:
    """What was built and what will run: versions, compiled kernels, and for each op the backend each device gets
    (``runs``) and whether each of its backends can run there (``available``: "yes" or why not)."""
    import os

    import torch

    from fastcache.ops.contrastive import epilogue as contrastive_epilogue
    from fastcache.ops.maxsim import primitives as maxsim_primitives

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])

    def backends(available) -> dict:
        found = {}
        for device in devices:
            backends_here = available(device)
            try:
                chosen = _backend.resolve_backend(device, backends_here)
            except (RuntimeError, ValueError) as error:
                chosen = f"error: {error}"
            found[device.type] = {"runs": chosen, "available": {k: v or "yes" for k, v in backends_here.items()}}
        return found

    return {
        "fastcache": __version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _backend.triton_version(),
        "extension": "built" if _backend.EXTENSION is not None else f"missing ({_backend.EXTENSION_ERROR})",
        "cuda_kernels": bool(_backend.EXTENSION is not None and getattr(_backend.EXTENSION, "has_cuda", False)),
        "FASTCACHE_BACKEND": os.environ.get("FASTCACHE_BACKEND", "auto"),
        "memory_budget_bytes": _backend.memory_budget(),
        "contrastive_loss": backends(contrastive_epilogue.available),
        "maxsim_contrastive_loss": backends(maxsim_primitives.available),
    }
