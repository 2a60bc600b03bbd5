"""Compile-time facts of the MaxSim Triton kernels (fastcache/triton/maxsim.py) for sm_90, without a GPU.

    python bench/maxsim_compile.py                 # markdown table on stdout
    python bench/maxsim_compile.py --out facts.json
    python bench/maxsim_compile.py --module /tmp/old_maxsim.py   # another version of the module (e.g. git show)

bench/triton_compile.py's method, its pieces reused: ``token_max`` and ``token_grad`` run on meta tensors of a
representative ColBERT shape (B·Lq = 512·32 query tokens, C = 1024 documents of Ld = 128 tokens, D = 128), each
kernel swapped for a recorder of its launches; each launch is bound through Triton's own launch path
(``JITFunction.warmup``, CUDA-like tensor addresses) for GPUTarget("cuda", 90, 32). Per compiled variant:
registers and spill bytes (ptxas -v, sm_90a), shared memory, dots and how many became wgmma, atomics, and the
32-bit multiplies that reach a pointer offset (triton_compile.i32_address_products). Embeddings bf16, fp16 and fp32.

Importable: :func:`maxsim_compile_facts` (TRITON_INTERPRET must be off before triton is imported),
:func:`facts_in_subprocess` (from anywhere, e.g. a test run under the interpreter).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_compile  # noqa: E402

SHAPE = dict(batch=512, query_tokens=32, docs=1024, doc_tokens=128, dim=128)
DTYPES = ("bf16", "fp16", "fp32")
KERNELS = ("_token_max_kernel", "_token_grad_queries_kernel", "_token_grad_docs_kernel")


def load_module(path: str | None = None):
    """fastcache.triton.maxsim, or the version in the file ``path`` (loaded under the same name)."""
    if path is None:
        return importlib.import_module("fastcache.triton.maxsim")
    spec = importlib.util.spec_from_file_location("fastcache.triton.maxsim", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastcache.triton.maxsim"] = module
    spec.loader.exec_module(module)
    return module


def runtime_launches(maxsim, dtype: str) -> list[tuple]:
    """(kernel, grid, args, kwargs) of every launch the module's token_max and token_grad make at SHAPE (meta
    tensors; the index range check, which reads values, is skipped)."""
    import torch

    element = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    B, Lq, C, Ld, D = SHAPE.values()
    meta = torch.device("meta")
    queries = torch.empty(B, Lq, D, dtype=element, device=meta)
    docs = torch.empty(C, Ld, D, dtype=element, device=meta)
    launches = []
    saved = {name: getattr(maxsim, name) for name in KERNELS}
    check = maxsim._check_index_range
    try:
        for name, fn in saved.items():
            setattr(maxsim, name, triton_compile._Recorder(fn, launches))
        maxsim._check_index_range = lambda *args: None
        _, index = maxsim.token_max(queries, torch.empty(B, Lq, dtype=torch.bool, device=meta), docs,
                                    torch.empty(C, Ld, dtype=torch.bool, device=meta))
        maxsim.token_grad(torch.empty(B, Lq, C, device=meta), index, queries, docs)
    finally:
        for name, fn in saved.items():
            setattr(maxsim, name, fn)
        maxsim._check_index_range = check
    return launches


def maxsim_compile_facts(dtypes=DTYPES, ptxas: bool = True, module: str | None = None) -> list[dict]:
    """One dict per kernel and dtype (of fastcache.triton.maxsim, or the file ``module``). Needs TRITON_INTERPRET
    unset before triton is imported."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: run this in a process without it (facts_in_subprocess)")
    maxsim = load_module(module)
    import torch
    from triton.runtime.driver import driver

    driver.set_active(triton_compile._Sm90Driver())
    rows = []
    for dtype in dtypes:
        for fn, grid, args, kwargs in runtime_launches(maxsim, dtype):
            bound = [triton_compile._DeviceTensor(a, i) if isinstance(a, torch.Tensor) else a
                     for i, a in enumerate(args)]
            compiled = fn.warmup(*bound, grid=grid, **kwargs)
            asm = compiled.asm
            products = triton_compile.i32_address_products(asm["ttir"])
            row = dict(kernel=fn.fn.__name__, dtype=dtype, grid=list(grid),
                       constexprs={k: v for k, v in kwargs.items() if k.isupper()},
                       num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3),
                       shared=compiled.metadata.shared, dots=len(re.findall(r"= tt\.dot ", asm["ttir"])),
                       wgmma_dots=len(re.findall(r"ttng\.warp_group_dot ", asm["ttgir"])),
                       atomics=sum(bool(re.match(r"\s*(@!?%\w+\s+)?(atom|red)\.", line))
                                   for line in asm["ptx"].splitlines()),
                       i32_address_products=products)
            if ptxas:
                row.update(triton_compile._ptxas_report(asm["ptx"], compiled.metadata.enable_fp_fusion))
            rows.append(row)
    return rows


def facts_in_subprocess(*arguments: str, timeout: int = 900) -> list[dict]:
    """maxsim_compile_facts in a fresh Python without the Triton interpreter."""
    return triton_compile.facts_in_subprocess(*arguments, timeout=timeout, script=Path(__file__).resolve())


def markdown_table(rows: list[dict]) -> str:
    head = ("| kernel | dtype | tiles | warps, stages | grid | registers | spills st/ld (B) | shared (B) "
            "| wgmma dots / dots | i32 address products |")
    lines = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]
    for r in rows:
        tiles = ", ".join(f"{k} {v}" for k, v in r["constexprs"].items() if k.startswith(("BLOCK", "DOCS")))
        lines.append(f"| {r['kernel']} | {r['dtype']} | {tiles} | {r['num_warps']}, {r['num_stages']} | {r['grid']} "
                     f"| {r.get('registers', '?')} | {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} "
                     f"| {r['shared']} | {r['wgmma_dots']}/{r['dots']} | {len(r['i32_address_products'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write every fact as JSON to this file")
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--module", help="compile this file as fastcache.triton.maxsim")
    parser.add_argument("--no-ptxas", action="store_true", help="skip ptxas -v (no registers / spills)")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = parser.parse_args(argv)
    rows = maxsim_compile_facts(tuple(args.dtypes), ptxas=not args.no_ptxas, module=args.module)
    if not args.quiet:
        print(markdown_table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(shape=SHAPE, variants=rows), indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels compile for the GPU
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
