"""Every Triton kernel compiled for sm_90 as the runtime launches it at the headline shape, no GPU needed.

bench/triton_compile.py runs the runtime's host code (contrastive_tiled, matryoshka_tiled, slab_epilogue,
contrastive_fused_slab) on meta tensors at B = 65536, N = 131072, D = 768 (bf16 and fp32 embeddings; configurations
mnrl, symmetric, gist), records each launch and binds it through Triton's own launch path (JITFunction.warmup: its
specialization of ints equal to 1, divisibility by 16 and pointer alignment) for GPUTarget("cuda", 90, 32), in a
process without the Triton interpreter. What the interpreter cannot check:

- ptxas (sm_90a): no register spills (every candidate configuration of the autotuned tiled kernels);
- shared memory within sm_90's 227 KB per block;
- every dot of 16-bit operands is a wgmma (ttng.warp_group_dot), fp32 dots are not (input_precision="ieee":
  no TF32, FMA dots);
- no atomic instruction (the gradients' sums run in a fixed order);
- int64 offsets: no 32-bit multiply reaches a pointer offset unless its operands depend only on arguments that
  keep it far below 2^31 (bench/triton_compile.py's BOUNDED_PRODUCT_ARGS), and the check flags the kernels once
  the .to(tl.int64) widenings are taken out (which is what the code before the fix compiled to).

Compiles are cached by Triton (~/.triton/cache): ~15 s warm, a few minutes cold on 2 busy cores.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import triton_compile  # noqa: E402

KERNELS = {"_slab_epilogue_kernel", "_tiled_logsumexp_kernel", "_tiled_partition_kernel", "_tiled_grad_kernel",
           "_matryoshka_logsumexp_kernel", "_matryoshka_grad_kernel", "_fused_logits_kernel", "_fused_grad_kernel"}
# wgmma per 16-bit dot: the fused_slab backward's dot takes dL/ds from registers, and Triton splits such a wgmma
# along K (its 64-wide reduction step into 4 of 16)
WGMMA_PER_DOT = {"_fused_grad_kernel": 4}
# ptxas spills (kernel, variant, dtype): bytes stored, loaded. The assertion is exact: a change that adds one
# updates this table.
KNOWN_SPILLS: dict = {}


@pytest.fixture(scope="module")
def all_facts() -> list[dict]:
    return triton_compile.facts_in_subprocess("--dtypes", "bf16", "fp32", "fp64")


@pytest.fixture(scope="module")
def facts(all_facts) -> list[dict]:
    """The variants that bf16 and fp32 embeddings launch."""
    return [r for r in all_facts if any(not b.endswith("/fp64") for b in r["launched_by"])]


@pytest.fixture(scope="module")
def fp64_facts(all_facts) -> list[dict]:
    """The variants that float64 embeddings launch (the correctness path)."""
    return [r for r in all_facts if any(b.endswith("/fp64") for b in r["launched_by"])]


def _name(row: dict) -> str:
    return f"{row['kernel']} {row['variant']} {row['dtype']} ({', '.join(sorted(set(row['launched_by'])))})"


def test_every_kernel_is_compiled_at_the_headline_shape(facts):
    """All eight kernels; the embedding kernels for both bf16 and fp32; the launches bound the real shape's ints."""
    assert {r["kernel"] for r in facts} == KERNELS
    for kernel in KERNELS - {"_slab_epilogue_kernel", "_tiled_partition_kernel"}:
        assert {r["dtype"] for r in facts if r["kernel"] == kernel} == {"bf16", "fp32"}, kernel
    launched = {b for r in facts for b in r["launched_by"]}
    for config in triton_compile.CONFIGS:
        strategies = set(triton_compile.strategies(config))
        for dtype in triton_compile.DTYPES:
            assert {f"{s}/{config}/{dtype}" for s in strategies - {"slab"}} <= launched
        assert ("slab" in strategies) == (f"slab/{config}/fp32" in launched)
    grads = [r for r in facts if r["kernel"] == "_tiled_grad_kernel"]
    # every candidate configuration: a backward program owns 128 or 64 (bf16) or 32 (fp32) rows
    assert {tuple(r["grid"]) for r in grads} >= {(n // own,) for n in (65536, 131072) for own in (128, 64, 32)}
    assert {r["variant"] for r in grads} >= {"qd rows filtered", "qd cols filtered"}


def test_no_register_spills(facts):
    """ptxas -v for sm_90a: 0 bytes spilled in every variant but KNOWN_SPILLS (exactly those, exactly that much)."""
    spills = {(r["kernel"], r["variant"], r["dtype"]): (r["spill_stores"], r["spill_loads"])
              for r in facts if r["spill_stores"] or r["spill_loads"]}
    assert spills == KNOWN_SPILLS
    assert all(r["registers"] > 0 for r in facts)


def test_shared_memory_fits_sm90(facts):
    for r in facts:
        assert r["shared"] <= triton_compile.SM90_SHARED_LIMIT, _name(r)


def test_16_bit_dots_are_wgmma(facts):
    """The bf16 path (WIDEN=False on a GPU) compiles its bf16 dots (the similarity tile, the gradient product)
    to wgmma; the guide's similarity tile is fp32 (the guide is normalised into fp32) and every fp32 dot is an
    FMA dot (input_precision="ieee"), so they are not."""
    for r in facts:
        split = WGMMA_PER_DOT.get(r["kernel"], 1)
        assert r["wgmma_dots"] == r["dots_16bit"] * split, _name(r)
        assert (r["wgmma_instructions"] > 0) == (r["wgmma_dots"] > 0), _name(r)
        if r["dtype"] == "bf16" and r["dots"]:
            assert r["wgmma_dots"] == (r["dots"] - (1 if "guided" in r["variant"] else 0)) * split > 0, _name(r)
        if r["dtype"] == "fp32":
            assert r["wgmma_dots"] == 0, _name(r)


def test_no_atomics(facts):
    for r in facts:
        assert r["atomics"] == 0, _name(r)


def test_no_32_bit_multiply_reaches_a_pointer_offset(facts):
    """int64 offsets: a row index times a row stride reaches 2^31 at the headline (131072 docs · 768 dims is
    2^26.6 per tensor, but 65536 rows · 131072 columns of a slab block is 2^33); the kernels widen the row index
    before the multiply, so the only 32-bit products left that reach an address are bounded ones."""
    for r in facts:
        assert r["unbounded_i32_address_products"] == [], _name(r)
    # the check sees the bounded ones (it would not be vacuous)
    seen = {a for r in facts for p in r["i32_address_products"] for a in p["args"]}
    assert {"stride_stats", "n_rows"} <= seen


_INT64_WIDENINGS = [
    (r"\.to\(tl\.int64\) \* ", " * "),  # rows[:, None].to(tl.int64) * stride, own[:, None].to(tl.int64) * ...
    (r"r64 = r\.to\(tl\.int64\)", "r64 = r"),  # the slab epilogue's rows of its positives
    (r"row = r\[:, None\]\.to\(tl\.int64\)", "row = r[:, None]"),  # the slab epilogue's tiles
    (r"tl\.cast\(([^,]+), tl\.int64\) \* ", r"(\1) * "),  # the fused slab's column tile times w's row stride
]


def test_fp64_kernels_compile_with_bounded_spills(fp64_facts):
    """float64, the correctness path: every kernel compiles for sm_90 (fp64 FMA dots), fits shared memory, has no
    atomics nor unbounded 32-bit address products, and spills at most 64 bytes (ptxas spills some at the headline
    specialization: the guided slab epilogue 40/48 bytes, the guided Matryoshka forward 48/44, a guided Matryoshka
    backward 24/16)."""
    assert {r["kernel"] for r in fp64_facts} == KERNELS
    for r in fp64_facts:
        assert r["spill_stores"] <= 64 and r["spill_loads"] <= 64, _name(r)
        assert r["shared"] <= triton_compile.SM90_SHARED_LIMIT and r["atomics"] == 0, _name(r)
        assert r["wgmma_dots"] == 0 and r["unbounded_i32_address_products"] == [], _name(r)


def test_int64_check_flags_the_kernels_with_32_bit_offsets(tmp_path):
    """The check of test_no_32_bit_multiply_reaches_a_pointer_offset against the kernels as they were before the
    fix: the modules with every .to(tl.int64) row widening taken out. Every kernel that addresses rows of an
    embedding, gradient or similarity block is flagged, naming the row stride."""
    files = {}
    for module in ("contrastive", "matryoshka", "contrastive_fused_slab"):
        source = (ROOT / "fastcache" / "triton" / f"{module}.py").read_text()
        for pattern, replacement in _INT64_WIDENINGS:
            source = re.sub(pattern, replacement, source)
        files[module] = tmp_path / f"{module}_int32.py"
        files[module].write_text(source)
    assert "tl.int64" not in files["contrastive"].read_text().replace("tl.program_id(0).to(tl.int64)", "")
    rows = triton_compile.facts_in_subprocess("--contrastive", str(files["contrastive"]), "--matryoshka",
                                              str(files["matryoshka"]), "--fused-slab",
                                              str(files["contrastive_fused_slab"]), "--configs", "mnrl", "gist",
                                              "--dtypes", "fp32", "--no-ptxas")  # fp32: with the slab epilogue
    strides = {"stride_r", "stride_c", "stride_gr", "stride_gc", "stride_out", "ld_qd", "ldg_qd", "stride_e",
               "stride_w"}
    flagged = set()
    for r in rows:
        args = {a for p in r["unbounded_i32_address_products"] for a in p["args"]}
        if r["kernel"] == "_tiled_partition_kernel":
            assert not args, _name(r)  # no row strides there
            continue
        assert args & strides, _name(r)
        flagged |= args & strides
    assert flagged >= strides
