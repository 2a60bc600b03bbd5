"""The MaxSim Triton kernels (fastcache/triton/maxsim.py) compiled for sm_90 as token_max and token_grad launch
them at a representative ColBERT shape (B·Lq = 512·32, C = 1024, Ld = 128, D = 128), no GPU needed.

bench/maxsim_compile.py records the launches on meta tensors and binds them through Triton's launch path for
GPUTarget("cuda", 90, 32) in a process without the interpreter (bench/triton_compile.py's method and pieces).
What the interpreter cannot check: no register spills (ptxas -v, sm_90a), shared memory within sm_90's 227 KB,
every 16-bit dot a wgmma and no fp32 dot a TF32 one (input_precision="ieee"), no atomics (grad_docs is the
deterministic one-hot GEMM), and no 32-bit multiply of a kernel argument reaching a pointer offset (int64 offsets).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import maxsim_compile  # noqa: E402
import triton_compile  # noqa: E402

# dots per kernel, 16-bit and fp32 embeddings: the similarity tile; none in the gather; grad_docs' one-hot times
# the bf16 hi and lo parts of w·q (16-bit) or times the fp32 w·q
DOTS = {"_token_max_kernel": (1, 1), "_token_grad_queries_kernel": (0, 0), "_token_grad_docs_kernel": (2, 1)}


@pytest.fixture(scope="module")
def facts() -> list[dict]:
    return maxsim_compile.facts_in_subprocess()


def _name(row: dict) -> str:
    return f"{row['kernel']} {row['dtype']}"


def test_every_kernel_and_dtype_is_compiled(facts):
    assert sorted((r["kernel"], r["dtype"]) for r in facts) == sorted(
        (k, d) for k in maxsim_compile.KERNELS for d in maxsim_compile.DTYPES)
    grids = {(r["kernel"], r["dtype"]): r["grid"] for r in facts}
    assert grids["_token_max_kernel", "bf16"] == [512 * 32 // 128 * 1024 // 8]  # 128 query tokens × 8 documents
    assert grids["_token_grad_docs_kernel", "bf16"] == [1024, 1, 1]  # a program per document


def test_no_register_spills(facts):
    for r in facts:
        assert r["registers"] > 0 and r["spill_stores"] == r["spill_loads"] == 0, _name(r)


def test_shared_memory_fits_sm90(facts):
    for r in facts:
        assert r["shared"] <= triton_compile.SM90_SHARED_LIMIT, _name(r)


def test_16_bit_dots_are_wgmma_and_fp32_dots_are_not(facts):
    for r in facts:
        assert r["dots"] == DOTS[r["kernel"]][r["dtype"] == "fp32"], _name(r)
        assert r["wgmma_dots"] == (0 if r["dtype"] == "fp32" else r["dots"]), _name(r)


def test_no_atomics_and_no_32_bit_argument_products_in_addresses(facts):
    """The only 32-bit products that reach an address are block indices times a tile: those of token_max's 1-D
    grid depend on n_rows (the row block and document group of a program id, below B·Lq and C); every index is
    widened before it multiplies a stride (test_int64_check_flags_32_bit_offsets)."""
    for r in facts:
        assert r["atomics"] == 0, _name(r)
        assert [p for p in r["i32_address_products"] if set(p["args"]) - {"n_rows"}] == [], _name(r)


def test_int64_check_flags_32_bit_offsets(tmp_path):
    """The check above against the kernels with _token_offsets' int64 widenings taken out: every kernel is
    flagged, naming the token strides."""
    source = (ROOT / "fastcache" / "triton" / "maxsim.py").read_text()
    widened = "return (r // length).to(tl.int64) * stride_outer + (r % length).to(tl.int64) * stride_inner"
    assert widened in source
    narrow = tmp_path / "maxsim_int32.py"
    narrow.write_text(source.replace(widened, "return (r // length) * stride_outer + (r % length) * stride_inner"))
    rows = maxsim_compile.facts_in_subprocess("--module", str(narrow), "--dtypes", "bf16", "--no-ptxas")
    for r in rows:
        args = {a for p in r["i32_address_products"] for a in p["args"]} - {"n_rows"}
        assert {"n_query_tokens", "stride_wb", "stride_ib", "stride_qb", "stride_qmb"} & args, _name(r)
