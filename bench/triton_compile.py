"""Compile-time facts of the Triton kernels for sm_90, without a GPU: registers, spills, shared memory, wgmma.

    python bench/triton_compile.py                        # markdown table on stdout (~1 minute on 2 cores cold)
    python bench/triton_compile.py --out facts.json       # the same, and every fact as JSON
    python bench/triton_compile.py --contrastive /tmp/old_contrastive.py --matryoshka /tmp/old_matryoshka.py
                                                          # another version of the kernel modules (e.g. git show)

Every kernel of fastcache/triton/contrastive.py, matryoshka.py and contrastive_fused_slab.py is compiled exactly as
the runtime launches it at the headline shape (B = 65536 queries, N = 131072 docs: the positives and one hard negative
each, D = 768; Matryoshka dims 768/512/256/128/64), bf16 and fp32 embeddings:

1. the runtime's own host code runs (``contrastive_tiled``, ``matryoshka_tiled``, ``slab_epilogue``,
   ``contrastive_fused_slab``) on meta tensors of the real shapes (no memory, no values), with each kernel object
   swapped for a recorder of its launches: the arguments, grid, constexprs, num_warps and num_stages are the ones
   the runtime computes. On a meta device WIDEN is False, as on a GPU (the bf16 operands go to tl.dot as they are).
2. each recorded launch goes through Triton's own launch path, ``JITFunction.warmup`` (the binder that
   ``JITFunction.run`` uses: ints equal to 1 become constants, ints divisible by 16 get the divisibility hint,
   ints ≥ 2^31 are i64, pointers 16-byte aligned get the alignment hint), with a stand-in driver whose current
   target is GPUTarget("cuda", 90, 32). A tensor reaches the binder as its dtype and a CUDA-like address: a
   512-byte aligned base (the caching allocator's) plus its storage offset in bytes, so a view such as
   ``maxima[kind]`` or ``params[k]`` is aligned exactly when it would be on the GPU.
3. per compiled variant (launches that bind to the same specialization compile once): shared memory
   (``metadata.shared``), ptxas -v's registers and spill bytes (the PTX through Triton's ptxas for sm_90a, its
   flags), the dots (TTIR ``tt.dot``) and how many became wgmma (TTGIR ``ttng.warp_group_dot``), the PTX's
   32-bit integer multiplies (``mul.lo.s32``, ``mad.lo.s32``, ``mul.wide.s32``: every one, layout index maths
   included; ``mul.wide.s32`` has a 64-bit result), atomics, and, from the TTIR, each 32-bit ``arith.muli`` whose
   result reaches the offset of a ``tt.addptr`` with the kernel arguments it depends on
   (:func:`i32_address_products`: what overflows once a row index times a row stride reaches 2^31).

Runtime configurations (each compiled for bf16 and fp32 embeddings):

    mnrl       query_to_doc, cosine, joint: the headline (CachedMultipleNegativesRankingLoss)
    symmetric  query_to_doc + doc_to_query (doc_to_query's gradient fused into query_to_doc's kernels), hardness
               all_negatives, doc_ids: the most demanding unguided kernels
    gist       query_to_doc + query_to_query + doc_to_doc with a guide (D_guide = 768, relative margin), hardness,
               doc_ids: the guided kernels (BACKWARD_CONFIGS' guided tiles)
    filtered   mnrl with the gradient filter (filter_eps = 2^-12, bf16's "auto"): the tiled strategy's filtered
               backward, the only strategy with a filter

A kernel autotuned at run time (fastcache.triton.contrastive._Tuned) is compiled once per candidate configuration
of each launch, with the grid that configuration gives.

The slab epilogue gets fp32 blocks (the slab's GEMMs write fp32 from bf16 operands), chunk rows as
``chunk_rows`` gives them for a 64 GiB budget (the whole batch: a 65536 × 131072 block, 2^33 values); the
fused_slab strategy's chunk comes from the same budget (its stored logits in the embeddings' dtype).

Importable: :func:`compile_facts` (in this process: the Triton interpreter must be off before triton is first
imported), :func:`facts_in_subprocess` (from anywhere, e.g. a test run under the interpreter),
:func:`i32_address_products`, :func:`markdown_table`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HEADLINE = dict(rows=65536, docs=131072, dim=768, guide_dim=768, dims=(768, 512, 256, 128, 64))
CONFIGS = {
    "mnrl": dict(directions=("query_to_doc",), guided=False, ids=False, hardness=False),
    "symmetric": dict(directions=("query_to_doc", "doc_to_query"), guided=False, ids=True, hardness=True),
    "gist": dict(directions=("query_to_doc", "query_to_query", "doc_to_doc"), guided=True, ids=True, hardness=True),
    "filtered": dict(directions=("query_to_doc",), guided=False, ids=False, hardness=False, filter_eps=2.0**-12),
}
DTYPES = ("bf16", "fp32")
SLAB_BUDGET = 64 * 2**30
SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KB)
# 32-bit address products whose kernel arguments keep them far below 2^31: a dim index k < K ≤ 8 (num_dims, the
# DIMS slots) times the stride of the Matryoshka statistics [K, 4, B] (stride_stats = 4·B), prefix-norm
# reciprocals and radial sums [K, n] (stride_ra, stride_cb, stride_radial = n ≤ N) or scalars [K, 6]
# (stride_params); a block index < 4 times n_rows (the partition's [4, B] statistics); (num_dims - 1)·BLOCK_M·BLOCK_N,
# one program's scratch (widened before it multiplies the program id). At most 8·4·131072 = 2^22 at the headline.
BOUNDED_PRODUCT_ARGS = frozenset({"num_dims", "stride_stats", "stride_ra", "stride_cb", "stride_radial",
                                  "stride_params", "n_rows"})


# ---------------------------------------------------------------------------------------------------------------
# the runtime's launches, recorded
# ---------------------------------------------------------------------------------------------------------------

def load_kernel_modules(contrastive: str | None = None, matryoshka: str | None = None, fused_slab: str | None = None):
    """fastcache.triton.contrastive, .matryoshka and .contrastive_fused_slab, or the versions in the given files
    (loaded under the same module names, so that a matryoshka file imports the contrastive file given with it)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("TRITON_INTERPRET=1: the kernels would be interpreter functions; run this in a process "
                           "without it (facts_in_subprocess)")
    modules = []
    for name, path in (("fastcache.triton.contrastive", contrastive), ("fastcache.triton.matryoshka", matryoshka),
                       ("fastcache.triton.contrastive_fused_slab", fused_slab)):
        if path is None:
            modules.append(importlib.import_module(name))
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        modules.append(module)
    return tuple(modules)


class _Recorder:
    """Stands in for a kernel object: ``kernel[grid](*args, **kwargs)`` records the launch instead of running it."""

    def __init__(self, fn, launches: list):
        self.fn, self.launches = fn, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.fn, grid, args, kwargs))


_KERNELS = {"contrastive": ("_slab_epilogue_kernel", "_tiled_logsumexp_kernel", "_tiled_partition_kernel",
                            "_tiled_grad_kernel"),
            "matryoshka": ("_matryoshka_logsumexp_kernel", "_matryoshka_grad_kernel", "_tiled_partition_kernel"),
            "fused_slab": ("_fused_logits_kernel", "_fused_grad_kernel")}


def _recorded(modules, run) -> list:
    """The launches ``run()`` makes, each kernel of both modules swapped for a _Recorder meanwhile; an autotuned
    kernel's launch (fastcache.triton.contrastive._Tuned) once per candidate configuration, with its grid."""
    launches = []
    saved = []
    for module, names in zip(modules, _KERNELS.values()):
        for name in names:
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(getattr(module, name), launches))
    try:
        run()
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
    expanded = []
    for fn, grid, args, kwargs in launches:
        if not hasattr(fn, "candidates"):
            expanded.append((fn, grid, args, kwargs))
            continue
        for config in fn.candidates(args, kwargs):
            meta = {**dict(zip(fn.fn.arg_names, args)), **config}
            expanded.append((fn.fn, grid(meta) if callable(grid) else grid, args, config))
    return expanded


def strategies(config: str) -> tuple[str, ...]:
    """The strategies a configuration runs: the gradient filter (filter_eps) is the tiled strategy's alone."""
    return ("tiled",) if CONFIGS[config].get("filter_eps") else ("tiled", "matryoshka", "slab", "fused_slab")


def runtime_launches(modules, config: str, dtype: str) -> list[tuple[str, object, tuple, tuple, dict]]:
    """(strategy, kernel, grid, args, kwargs) of every launch the runtime makes for one configuration and dtype at
    the headline shape: the tiled strategy of both ops (loss and gradients) and the slab epilogue."""
    import torch

    from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions
    from fastcache.ops.contrastive.options import KIND_CODES, kernel_params
    from fastcache.ops.contrastive import fused_slab as fused_slab_host
    from fastcache.ops.contrastive import tiled as contrastive_host
    from fastcache.ops.contrastive.slab import block_columns, chunk_rows
    from fastcache.ops.matryoshka import tiled as matryoshka_host

    contrastive = modules[0]
    c = CONFIGS[config]
    B, N, D, G = HEADLINE["rows"], HEADLINE["docs"], HEADLINE["dim"], HEADLINE["guide_dim"]
    meta = torch.device("meta")
    element = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}[dtype]
    queries = torch.empty(B, D, dtype=element, device=meta)
    docs = torch.empty(N, D, dtype=element, device=meta)
    guide_queries = torch.empty(B, G, dtype=element, device=meta) if c["guided"] else None
    guide_docs = torch.empty(N, G, dtype=element, device=meta) if c["guided"] else None
    doc_ids = torch.empty(N, dtype=torch.int64, device=meta) if c["ids"] else None
    options = ContrastiveOptions(directions=c["directions"], filter_eps=c.get("filter_eps"),
                                 hardness_mode="all_negatives" if c["hardness"] else None,
                                 hardness_strength=0.5 if c["hardness"] else 0.0,
                                 margin=0.1 if c["guided"] else 0.0,
                                 margin_strategy="relative" if c["guided"] else "absolute")
    # as check_inputs gives it (which takes no meta tensors): B rows, the B positives and one column of B hard
    # negatives, the queries themselves as query columns
    layout = ContrastiveLayout(rows=B, positives=B, columns=N // B, dim=D, query_columns=B, own_query_offset=0)
    dims = HEADLINE["dims"]
    weights = (1.0,) * len(dims)
    out = []

    def tiled():
        contrastive_host.contrastive_tiled(queries, docs, None, guide_queries, guide_docs, doc_ids, options, layout,
                                           True)

    def matryoshka_tiled():
        # segment_grad_scale reads the prefix norms' values (meta tensors have none); it only sets one float of
        # the params tensor, nothing that the compiled kernel depends on
        real = matryoshka_host.segment_grad_scale
        matryoshka_host.segment_grad_scale = lambda *args: 1.0
        try:
            matryoshka_host.matryoshka_tiled(queries, docs, None, guide_queries, guide_docs, doc_ids, options, layout,
                                             dims, weights, True)
        finally:
            matryoshka_host.segment_grad_scale = real

    def slab():
        guided = c["guided"]
        acc = torch.float64 if dtype == "fp64" else torch.float32
        chunk = chunk_rows(layout, options, False, G if guided else 0, SLAB_BUDGET, acc.itemsize, 1.5,
                           cache_cap=False)
        widths = block_columns(layout, guided)
        blocks = {k: torch.empty(chunk, widths[k], dtype=acc, device=meta) for k in c["directions"]}
        guides = {k: torch.empty(chunk, widths[k], dtype=acc, device=meta)
                  for k in c["directions"] if guided}
        contrastive.slab_epilogue({KIND_CODES[k]: v for k, v in blocks.items()},
                                  {KIND_CODES[k]: v for k, v in guides.items()}, doc_ids,
                                  kernel_params(options, layout, len(blocks)))

    def fused_slab():
        fused_slab_host.contrastive_fused_slab(queries, docs, None, guide_queries, guide_docs, doc_ids, options,
                                               layout, True, memory_budget=SLAB_BUDGET)

    for strategy, run in (("tiled", tiled), ("matryoshka", matryoshka_tiled), ("slab", slab),
                          ("fused_slab", fused_slab)):
        if strategy == "slab" and dtype == "bf16":
            continue  # the blocks are fp32 for bf16 and fp32 embeddings alike: one set of launches
        if strategy not in strategies(config):
            continue
        out += [(strategy, *launch) for launch in _recorded(modules, run)]
    return out


class _DeviceTensor:
    """What Triton's binder reads of a tensor (its dtype and data_ptr), at a CUDA-like address: a 512-byte aligned
    base (the caching allocator's) plus the storage offset in bytes."""

    def __init__(self, tensor, slot: int):
        self.dtype = tensor.dtype
        self._address = 512 * (slot + 1) + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


class _Sm90Driver:
    """The parts of Triton's active driver that JITFunction.warmup consults: the current target is sm_90."""

    def __init__(self):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", 90, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


# ---------------------------------------------------------------------------------------------------------------
# what the compiled kernel says
# ---------------------------------------------------------------------------------------------------------------

_SSA = re.compile(r"%([\w$.-]+)(?:#\d+)?")
_DEF = re.compile(r"^\s*%([\w$.-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_FOR = re.compile(r"scf\.for\s+%([\w$.-]+)\s*=\s*(.*?)(?:\s+iter_args\((.*?)\))?\s*(?:->.*)?:\s*i(?:32|64)\s*\{")
_ARG = re.compile(r"%([\w$.-]+)\s*=\s*(%[\w$.#-]+)")
# ops through which an integer value reaches a pointer offset
_INDEX_OPS = ("arith.", "tt.splat", "tt.broadcast", "tt.expand_dims", "tt.reshape", "tt.trans", "tt.join",
              "tt.make_range", "scf.for.iv")


def _type_of_result(rest: str) -> str:
    """The result type of an op line (after the last ' to ' / ' -> ' / ' : ')."""
    rest = rest.split(" loc(")[0]
    for sep in (" to ", " -> "):
        if sep in rest:
            return rest.rsplit(sep, 1)[1]
    return rest.rsplit(" : ", 1)[-1]


def _ttir_values(ttir: str):
    """The kernel's integer arguments and its SSA definitions as (value, op, operands, result type), values made
    unique per region (MLIR reuses a name in sibling regions, e.g. two inlined loops); a loop's induction variable
    is a definition 'scf.for.iv' whose operands are the loop bounds, its iter_args copies of their initial
    values."""
    lines = ttir.splitlines()
    header = next(i for i, line in enumerate(lines) if "tt.func public" in line)
    int_args = {f"0:{a}" for a in re.findall(r"%(\w+): i(?:32|64)\b", lines[header])}
    scopes = [0]
    counter = 0
    known: dict[tuple[int, str], str] = {(0, a[2:]): a for a in int_args}

    def resolve(name: str) -> str:
        for scope in reversed(scopes):
            if (scope, name) in known:
                return known[scope, name]
        return f"?:{name}"  # e.g. a reduce region's block argument

    def define(name: str) -> str:
        known[scopes[-1], name] = f"{scopes[-1]}:{name}"
        return known[scopes[-1], name]

    defs = []
    for line in lines[header + 1:]:
        code = line.split(" loc(")[0]
        opened, closed = code.count("{"), code.count("}")
        if code.strip().startswith("}") and closed:
            if len(scopes) == 1:
                break  # the function's end
            scopes.pop()  # '} else {' closes one region and opens the next below
            closed -= 1
        loop = _FOR.search(code)
        match = _DEF.match(code)
        if match:
            result, op, rest = match.groups()
            if op != "scf.for":
                operands = [resolve(v) for v in _SSA.findall(rest)]
                defs.append((define(result), op, operands, _type_of_result(rest)))
            else:
                define(result)
        for _ in range(opened - closed):
            counter += 1
            scopes.append(counter)
        for _ in range(closed - opened):
            if len(scopes) > 1:
                scopes.pop()
        if loop:  # the induction variable and iter_args live in the body's scope (just opened)
            iv, bounds, iter_args = loop.groups()
            outer = scopes[:-1]
            saved, scopes[:] = scopes[:], outer
            bound_values = [resolve(v) for v in _SSA.findall(bounds)]
            inits = [(name, resolve(init.lstrip("%"))) for name, init in _ARG.findall(iter_args or "")]
            scopes[:] = saved
            defs.append((define(iv), "scf.for.iv", bound_values, "i32"))
            for name, init in inits:
                defs.append((define(name), "scf.for.iter_arg", [init], ""))
    return int_args, defs


def i32_address_products(ttir: str) -> list[dict]:
    """The 32-bit integer multiplies of a TTIR kernel whose result reaches the offset operand of a ``tt.addptr``
    (through integer arithmetic, splats, broadcasts, reshapes and loop bounds), each with the integer kernel
    arguments its operands depend on (through any op; a loop's induction variable depends on the loop's bounds).
    The fixed code widens the row index first (``rows.to(tl.int64) * stride``: an ``arith.extsi`` then an i64
    ``arith.muli``), which is not listed."""
    int_args, defs = _ttir_values(ttir)
    depends: dict[str, set] = {a: {a.split(":", 1)[1]} for a in int_args}
    for value, op, operands, _ in defs:
        depends[value] = set().union(set(), *(depends.get(v, set()) for v in operands))
    # values that reach a pointer offset, from each tt.addptr's offset back through index ops (to a fixpoint)
    address = {operands[1] for _, op, operands, _ in defs if op == "tt.addptr" and len(operands) == 2}
    changed = True
    while changed:
        changed = False
        for value, op, operands, _ in defs:
            if value in address and op.startswith(_INDEX_OPS) and not set(operands) <= address:
                address |= set(operands)
                changed = True
    products = []
    for value, op, operands, rtype in defs:
        if op == "arith.muli" and value in address and re.search(r"(\bi32$)|(xi32>$)", rtype.strip()):
            products.append(dict(value=value.split(":", 1)[1],
                                 args=sorted(set().union(set(), *(depends.get(v, set()) for v in operands)))))
    return products


def _ptxas_report(ptx: str, enable_fp_fusion: bool) -> dict:
    """ptxas -v of the PTX for sm_90a with Triton's own flags: registers, spill stores and loads, stack frame."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as source:
        source.write(ptx)
    try:
        flags = ["-lineinfo", "-v"] + ([] if enable_fp_fusion else ["--fmad=false"])
        done = subprocess.run([get_ptxas(90).path, *flags, "--gpu-name=sm_90a", source.name, "-o", os.devnull],
                              capture_output=True, text=True, check=True)
    finally:
        os.unlink(source.name)
    log = done.stderr

    def number(pattern: str) -> int:
        found = re.findall(pattern, log)
        return int(found[-1]) if found else 0

    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_frame=number(r"(\d+) bytes stack frame"))


def _describe(kernel, strategy: str, config: str, dtype: str, grid, kwargs: dict) -> dict:
    """The launch's identity: kernel, strategy, config, dtype and the constexprs that pick the variant."""
    names = ("KIND", "GUIDED", "BY_COLUMNS", "WITH_DOC_TO_QUERY", "HAS_IDS", "HARDNESS", "JOINT", "NUM_BLOCKS",
             "COMPUTE_GRAD", "FILTER", "BLOCK_M", "BLOCK_N", "OWN", "SWEPT", "BLOCK_K", "BLOCK_DO", "DIMS", "BLOCK")
    kinds = {0: "qd", 1: "qq", 2: "dq", 3: "dd"}
    constexprs = {n: kwargs[n] for n in names if n in kwargs}
    tiles = "×".join(str(kwargs[n]) for n in ("BLOCK_M", "BLOCK_N", "OWN", "SWEPT", "BLOCK_K") if n in kwargs)
    if "BLOCK_DO" in kwargs:
        tiles += f", DO {kwargs['BLOCK_DO']}"
    if "BLOCK" in kwargs:
        tiles = str(kwargs["BLOCK"])
    variant = []
    if "KIND" in kwargs:
        variant.append(kinds[kwargs["KIND"]] + ("+dq" if kwargs.get("WITH_DOC_TO_QUERY") else ""))
    if "BY_COLUMNS" in kwargs:
        variant.append("cols" if kwargs["BY_COLUMNS"] else "rows")
    if kwargs.get("GUIDED"):
        variant.append("guided")
    if kwargs.get("FILTER"):
        variant.append("filtered")
    return dict(kernel=kernel.fn.__name__, strategy=strategy, config=config, dtype=dtype, variant=" ".join(variant),
                tiles=tiles, num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3),
                grid=list(grid), constexprs={k: (v if isinstance(v, (int, bool)) else str(v))
                                             for k, v in constexprs.items()})


def compile_facts(contrastive: str | None = None, matryoshka: str | None = None, configs=tuple(CONFIGS),
                  dtypes=DTYPES, ptxas: bool = True, fused_slab: str | None = None) -> list[dict]:
    """One dict per distinct compiled variant (see the module docstring). Needs TRITON_INTERPRET unset before
    triton is imported; installs a stand-in sm_90 driver as Triton's active driver for the rest of the process."""
    modules = load_kernel_modules(contrastive, matryoshka, fused_slab)
    import torch
    from triton.runtime.driver import driver

    driver.set_active(_Sm90Driver())
    variants: dict = {}
    order = []
    for config in configs:
        for dtype in dtypes:
            for strategy, fn, grid, args, kwargs in runtime_launches(modules, config, dtype):
                bound = [_DeviceTensor(a, i) if isinstance(a, torch.Tensor) else a for i, a in enumerate(args)]
                compiled = fn.warmup(*bound, grid=grid, **kwargs)
                key = (fn.__name__, compiled.hash)
                if key in variants:
                    variants[key]["launched_by"].append(f"{strategy}/{config}/{dtype}")
                    continue
                first = next(a for a in args if isinstance(a, torch.Tensor))
                facts = _describe(fn, strategy, config, str(first.dtype).replace("torch.", "").replace(
                    "bfloat16", "bf16").replace("float32", "fp32").replace("float64", "fp64"), grid, kwargs)
                asm = compiled.asm
                ptx = asm["ptx"]
                facts.update(
                    launched_by=[f"{strategy}/{config}/{dtype}"],
                    shared=compiled.metadata.shared,
                    dots=len(re.findall(r"= tt\.dot ", asm["ttir"])),
                    dots_16bit=len(re.findall(r"= tt\.dot .*: tensor<[^>]*x(?:bf16|f16)> \*", asm["ttir"])),
                    wgmma_dots=len(re.findall(r"ttng\.warp_group_dot ", asm["ttgir"])),
                    wgmma_instructions=len(re.findall(r"\bwgmma\.mma_async", ptx)),
                    mma_sync_instructions=len(re.findall(r"\bmma\.sync", ptx)),
                    ptx_mul_lo_s32=len(re.findall(r"\bmul\.lo\.s32\b", ptx)),
                    ptx_mad_lo_s32=len(re.findall(r"\bmad\.lo\.s32\b", ptx)),
                    ptx_mul_wide_s32=len(re.findall(r"\bmul\.wide\.s32\b", ptx)),
                    atomics=sum(bool(re.match(r"\s*(@!?%\w+\s+)?(atom|red)\.", line)) for line in ptx.splitlines()),
                    i32_address_products=i32_address_products(asm["ttir"]),
                    hash=compiled.hash,
                )
                facts["wgmma"] = facts["wgmma_dots"] > 0
                facts["unbounded_i32_address_products"] = [
                    p for p in facts["i32_address_products"] if set(p["args"]) - BOUNDED_PRODUCT_ARGS]
                facts["_ptx"] = ptx
                facts["_fp_fusion"] = compiled.metadata.enable_fp_fusion
                variants[key] = facts
                order.append(key)
    rows = [variants[k] for k in order]
    if ptxas:
        with ThreadPoolExecutor(max_workers=2) as pool:
            reports = list(pool.map(lambda r: _ptxas_report(r["_ptx"], r["_fp_fusion"]), rows))
        for row, report in zip(rows, reports):
            row.update(report)
    for row in rows:
        del row["_ptx"], row["_fp_fusion"]
    return rows


def facts_in_subprocess(*arguments: str, timeout: int = 900, script: Path = Path(__file__).resolve()) -> list[dict]:
    """The compile facts of ``script`` (this one, or another with the same ``--out``/``--quiet`` interface, such as
    bench/maxsim_compile.py) with ``arguments``, in a fresh Python without the Triton interpreter: usable from a
    process where TRITON_INTERPRET=1."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "facts.json"
        done = subprocess.run([sys.executable, str(script), *arguments, "--out", str(out), "--quiet"],
                              capture_output=True, text=True, env=env, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"bench/{script.name} failed ({done.returncode}):\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())["variants"]


def markdown_table(rows: list[dict]) -> str:
    """One line per compiled variant."""
    head = ("| kernel | variant | dtype | tiles (M×N×K) | warps, stages | registers | spills st/ld (B) | shared (B) "
            "| wgmma dots / dots | PTX mul.lo / mad.lo / mul.wide .s32 | i32 address products: unbounded / all "
            "| launched by |")
    lines = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]
    for r in rows:
        bounded_args = sorted({a for p in r["i32_address_products"] for a in p["args"]})
        lines.append(
            f"| {r['kernel']} | {r['variant'] or '-'} | {r['dtype']} | {r['tiles']} | {r['num_warps']}, "
            f"{r['num_stages']} | {r.get('registers', '?')} | {r.get('spill_stores', '?')}/{r.get('spill_loads', '?')} "
            f"| {r['shared']} | {r['wgmma_dots']}/{r['dots']} | {r['ptx_mul_lo_s32']}/{r['ptx_mad_lo_s32']}/"
            f"{r['ptx_mul_wide_s32']} | {len(r['unbounded_i32_address_products'])}/{len(r['i32_address_products'])}"
            f"{' (' + ', '.join(bounded_args) + ')' if bounded_args else ''} "
            f"| {', '.join(sorted(set(r['launched_by'])))} |")
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    """One line per kernel, embedding dtype and guidance: ranges over its variants (ptxas facts needed)."""
    groups: dict = {}
    for r in rows:
        guided = "guided" in r["variant"]
        groups.setdefault((r["kernel"], r["dtype"], guided), []).append(r)
    head = ("| kernel | dtype | guide | variants | registers | spills st/ld (B, max) | shared (B, max) "
            "| wgmma dots / dots | PTX mul.lo+mad.lo / mul.wide .s32 (max) | unbounded i32 address products |")
    lines = [head, "| " + " | ".join("---" for _ in range(head.count("|") - 1)) + " |"]

    def span(values) -> str:
        return f"{min(values)}" if min(values) == max(values) else f"{min(values)}–{max(values)}"

    order = ["_slab_epilogue_kernel", "_tiled_logsumexp_kernel", "_tiled_partition_kernel", "_tiled_grad_kernel",
             "_matryoshka_logsumexp_kernel", "_matryoshka_grad_kernel", "_fused_logits_kernel", "_fused_grad_kernel"]
    for (kernel, dtype, guided), group in sorted(groups.items(), key=lambda g: (
            order.index(g[0][0]) if g[0][0] in order else len(order), g[0][0], g[0][1], g[0][2])):
        lines.append(
            f"| {kernel} | {dtype} | {'yes' if guided else 'no'} | {len(group)} "
            f"| {span([r['registers'] for r in group])} "
            f"| {max(r['spill_stores'] for r in group)}/{max(r['spill_loads'] for r in group)} "
            f"| {max(r['shared'] for r in group)} | {span([r['wgmma_dots'] for r in group])}/"
            f"{span([r['dots'] for r in group])} | {max(r['ptx_mul_lo_s32'] + r['ptx_mad_lo_s32'] for r in group)}/"
            f"{max(r['ptx_mul_wide_s32'] for r in group)} "
            f"| {sum(len(r['unbounded_i32_address_products']) for r in group)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="write every fact as JSON to this file")
    parser.add_argument("--contrastive", help="compile this file as fastcache.triton.contrastive")
    parser.add_argument("--matryoshka", help="compile this file as fastcache.triton.matryoshka")
    parser.add_argument("--fused-slab", help="compile this file as fastcache.triton.contrastive_fused_slab")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=[*DTYPES, "fp64"],
                        help="embedding dtypes (default bf16 fp32; fp64, the correctness path, on request)")
    parser.add_argument("--no-ptxas", action="store_true", help="skip ptxas -v (no registers / spills)")
    parser.add_argument("--quiet", action="store_true", help="no table on stdout")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rows = compile_facts(args.contrastive, args.matryoshka, tuple(args.configs), tuple(args.dtypes),
                         ptxas=not args.no_ptxas, fused_slab=args.fused_slab)
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(markdown_table(rows))
        if not args.no_ptxas:
            print("\n" + summary_table(rows))
        print(f"\n{len(rows)} variants, {seconds:.0f} s")
    if args.out:
        import triton

        Path(args.out).write_text(json.dumps(dict(
            headline=HEADLINE, target="cuda sm_90 (GPUTarget('cuda', 90, 32); ptxas --gpu-name=sm_90a)",
            triton=triton.__version__, configs=CONFIGS, slab_budget=SLAB_BUDGET, seconds=seconds,
            contrastive=args.contrastive, matryoshka=args.matryoshka, fused_slab=args.fused_slab, variants=rows),
            indent=1, default=str))
    return 0


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: the kernels compile for the GPU
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
