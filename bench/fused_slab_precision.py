"""The error of the fused_slab strategy's 16-bit stored logits, on CPU through the Triton interpreter.

    python bench/fused_slab_precision.py            # ~1-2 minutes on 2 cores

For bf16 and fp16 embeddings at scale 20 and 50: the mean (over 4 seeded batches) relative error against the
float64 truth (the dense reference on the same 16-bit numbers cast to float64) of the loss and of each gradient,
for fused_slab (e = exp(logit - tile maximum) stored in the embeddings' dtype), tiled (nothing stored: its error
is the GEMM operands' alone) and the dense reference computed in the 16-bit dtype (what sentence-transformers
gives). Relative error: largest absolute difference over the truth's largest magnitude (tests/helpers.py).

Batch: B = 24 queries, N = 48 candidates (positives + one hard-negative column), D = 64, directions query_to_doc
alone and with doc_to_query (joint), cosine; positives = queries + noise·N(0, 1) per dim: noise 2 (the tests' default,
positive cosine ~0.45) and 1 (~0.7: a sharper softmax, whose small gradients magnify every rounding).

The Triton interpreter rounds float32 -> bfloat16 toward zero (its cast truncates the mantissa; its RTNE mode
mishandles the carry); a GPU rounds to nearest even. This script converts as the GPU does (torch's RTNE) so that
the figures are the GPU's; the tests keep the interpreter's truncation, which only makes them stricter.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

from fastcache import contrastive_loss_and_grad  # noqa: E402
from fastcache.reference import contrastive_loss_reference  # noqa: E402

SEEDS = (13, 14, 15, 16)
NOISES = (2.0, 1.0)
_convert_float = interpreter._convert_float


def _convert_float_as_gpu(values, input_dtype, output_dtype, rounding_mode):
    """float32 -> bfloat16 rounded to nearest even (as on a GPU); every other conversion as the interpreter's."""
    if input_dtype == tl.float32 and output_dtype == tl.bfloat16:
        bits = torch.from_numpy(np.ascontiguousarray(values).view(np.float32)).to(torch.bfloat16).view(torch.int16)
        return bits.numpy().view(np.uint16)
    return _convert_float(values, input_dtype, output_dtype, rounding_mode)


interpreter._convert_float = _convert_float_as_gpu
DIRECTIONS = (("query_to_doc",), ("query_to_doc", "doc_to_query"))
ABBREVIATIONS = {"query_to_doc": "qd", "doc_to_query": "dq"}


def batch(seed: int, dtype: torch.dtype, noise: float) -> dict:
    g = torch.Generator().manual_seed(seed)
    queries = torch.randn(24, 64, generator=g, dtype=torch.float64)
    docs = torch.cat([queries + noise * torch.randn(24, 64, generator=g, dtype=torch.float64),
                      torch.randn(24, 64, generator=g, dtype=torch.float64)])
    return {"queries": queries.to(dtype), "docs": docs.to(dtype)}


def reference(inputs: dict, scale: float, directions: tuple) -> list:
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    loss = contrastive_loss_reference(leaves["queries"], leaves["docs"], scale=scale, directions=directions)
    loss.backward()
    return [loss.detach(), leaves["queries"].grad, leaves["docs"].grad]


def ours(inputs: dict, scale: float, directions: tuple, strategy: str) -> list:
    out = contrastive_loss_and_grad(inputs["queries"], inputs["docs"], scale=scale, directions=directions,
                                    backend="triton", strategy=strategy)
    return [out.loss, out.grad_queries, out.grad_docs]


def relative_error(x: torch.Tensor, truth: torch.Tensor) -> float:
    return ((x.double() - truth).abs().max() / truth.abs().max()).item()


def main() -> int:
    names = ("loss", "dL/dqueries", "dL/ddocs")
    print("| directions | dtype | noise | scale | computed by | " + " | ".join(names) + " |")
    print("| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
    for directions, dtype, noise, scale in [(r, d, n, s) for r in DIRECTIONS for d in (torch.bfloat16, torch.float16)
                                            for n in NOISES for s in (20.0, 50.0)]:
        errors = {k: [0.0] * len(names) for k in ("fused_slab", "tiled", "reference")}
        for seed in SEEDS:
            inputs = batch(seed, dtype, noise)
            truth = reference({k: v.double() for k, v in inputs.items()}, scale, directions)
            runs = {who: ours(inputs, scale, directions, who) for who in ("fused_slab", "tiled")}
            runs["reference"] = reference(inputs, scale, directions)
            for who, values in runs.items():
                for i, (value, exact) in enumerate(zip(values, truth)):
                    errors[who][i] += relative_error(value, exact) / len(SEEDS)
        for who, values in errors.items():
            label = "+".join(ABBREVIATIONS[d] for d in directions)
            print(f"| {label} | {str(dtype).replace('torch.', '')} | {noise:g} | {scale:g} | {who} | "
                  + " | ".join(f"{v:.2e}" for v in values) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
