"""Time the MaxSim Triton primitives (fastcache/triton/maxsim.py) against the bare GEMM and the torch backend.

    python bench/maxsim_kernels.py                       # H100: B·Lq = 512·32, C = 1024, Ld = 128, D = 128, bf16
    python bench/maxsim_kernels.py --dtype fp32 --docs 256
    TRITON_INTERPRET=1 python bench/maxsim_kernels.py --smoke   # CPU, tiny shape: the script runs (no timing value)

Cases, timed interleaved (the harness's time_cases; minimum of --repeats runs, each ending in a device sync):

    gemm              torch.mm of the [B·Lq, D] query tokens by the [D, C·Ld] document tokens in the inputs' dtype:
                      the 2·B·Lq·C·Ld·D FLOPs every primitive does (token_max once, token_grad's one-hot grad_docs
                      GEMM twice for 16-bit inputs), i.e. the limit
    token_max         Triton, then the torch backend (fastcache.ops.maxsim.primitives.token_max_torch)
    token_grad        Triton, then the torch backend, on token_max's index and random weights

Each line: seconds, TFLOP/s of 2·B·Lq·C·Ld·D, and the time over the GEMM's. Masks: ~10% padding tokens on both sides.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from fastcache.app.harness import Case, RunOutput, time_cases  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _synced(fn):
    def run() -> RunOutput:
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return RunOutput(grads=out)
    return run


def cases(batch: int, query_tokens: int, docs: int, doc_tokens: int, dim: int, dtype: torch.dtype,
          device: torch.device) -> list[Case]:
    from fastcache.ops.maxsim.primitives import token_grad_torch, token_max_torch
    from fastcache.triton.maxsim import token_grad, token_max

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, query_tokens, dim, generator=g, device=device).to(dtype)
    d = torch.randn(docs, doc_tokens, dim, generator=g, device=device).to(dtype)
    query_mask = torch.rand(batch, query_tokens, generator=g, device=device) > 0.1
    doc_mask = torch.rand(docs, doc_tokens, generator=g, device=device) > 0.1
    _, index = token_max(q, query_mask, d, doc_mask)
    weights = torch.randn(batch, query_tokens, docs, generator=g, device=device)
    q_rows, d_rows = q.view(-1, dim), d.view(-1, dim)
    return [
        Case("gemm", _synced(lambda: (torch.mm(q_rows, d_rows.T),))),
        Case("token_max triton", _synced(lambda: token_max(q, query_mask, d, doc_mask))),
        Case("token_max torch", _synced(lambda: token_max_torch(q, query_mask, d, doc_mask))),
        Case("token_grad triton", _synced(lambda: token_grad(weights, index, q, d))),
        Case("token_grad torch", _synced(lambda: token_grad_torch(weights, index, q, d))),
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--query-tokens", type=int, default=32)
    parser.add_argument("--docs", type=int, default=1024)
    parser.add_argument("--doc-tokens", type=int, default=128)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny shape on CPU through the Triton interpreter")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke needs TRITON_INTERPRET=1 (set before the first import of triton)")
        args.batch, args.query_tokens, args.docs, args.doc_tokens, args.dim, args.repeats = 2, 5, 3, 7, 16, 1
        device = torch.device("cpu")
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no CUDA device: run with --smoke under TRITON_INTERPRET=1")
    shape = (args.batch, args.query_tokens, args.docs, args.doc_tokens, args.dim)
    flops = 2 * args.batch * args.query_tokens * args.docs * args.doc_tokens * args.dim
    runs = cases(*shape, DTYPES[args.dtype], device)
    timed = time_cases(runs, repeats=args.repeats)
    gemm = timed[0][0].min_s
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (Triton interpreter)"
    print(f"MaxSim primitives, B·Lq = {args.batch}·{args.query_tokens}, C = {args.docs}, Ld = {args.doc_tokens}, "
          f"D = {args.dim}, {args.dtype}, {device_name}: min of {args.repeats} runs")
    print("| case | seconds | TFLOP/s of 2·B·Lq·C·Ld·D | / gemm |\n| --- | --- | --- | --- |")
    for case, (timing, _) in zip(runs, timed):
        print(f"| {case.name} | {timing.min_s:.4g} | {flops / timing.min_s / 1e12:.3g} | {timing.min_s / gemm:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
