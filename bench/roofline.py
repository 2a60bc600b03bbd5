"""Roofline model of the contrastive loss stage on a GPU (issue 19): FLOPs and HBM bytes of every strategy, kernel
by kernel, and the time they project at a given GEMM rate and memory bandwidth.

    python bench/roofline.py                          # the headline shape (B=65536, N=131072, D=768, bf16), H100+H200
    python bench/roofline.py --json                   # the same as JSON
    python bench/roofline.py --B 16384 --N 16384 --D 384 --dtype float32 --machine H100
    python bench/roofline.py --mm-tflops 700 --bandwidth 2.9         # other machine figures (TFLOP/s, TB/s)
    python bench/roofline.py --gpu-bench OUTDIR/gpu_bench.json       # that run's mm rate and copy bandwidth, and
                                                                     # each of its rows: projected next to measured

The model. One loss stage: B query rows against N candidate columns of D dims (one direction, query_to_doc, as in
bench/gpu_bench.py), e bytes per embedding value (2 for bf16/fp16, 4 for fp32). Each strategy is a list of kernels;
each kernel is a list of TERMS, the table below: one definition per term, an amount per logit (B·N of them) or per
embedding row (B + N of them), and a source. A term caused by fastcache's code carries the same name in a
``# roofline: <term>`` (``// roofline:`` in C++) comment next to the line that causes it; tests/app/test_roofline.py
checks that every tag names a term of the table and that every such term is tagged in its source file.

    projected time = Σ_kernels [ max(FLOPs / mm rate, HBM bytes / bandwidth) + launches · LAUNCH_S ]

The maximum within a kernel (a kernel streams its bytes while its tensor cores work: cuBLAS and Triton GEMMs write
their output tiles while the next tiles' products run, a memory-bound epilogue does almost no arithmetic), the sum
over kernels (kernels on one stream run one after another). This is the roofline's lower bound on time: a kernel
that reaches neither limit (narrow tiles, low occupancy, stalls on a read-modify-write) is slower than projected,
and the GPU suite's rows, projection next to measurement, show by how much. ``no_overlap_ms`` adds instead of taking
the maximum: the upper bound if nothing overlapped (the issue's own estimate of the slab was of that kind).

FLOPs count the tensor-core products only (2·D per logit per product); exponentials and the elementwise work are
in the bytes. The mm rate is the machine's bf16/fp16 dense rate (torch.mm 8192³, measured in the same run by the
GPU suite); fp32 inputs use the datasheet's FP32 rate (no TF32: fastcache and the references multiply fp32 in full
precision). HBM bytes count reads and writes, as the bandwidth figure (a device-to-device copy) does. The L2 column
is traffic that the tiled kernels move through L2 and not HBM (tiles re-read by every program that sweeps them):
not in the projection unless ``--l2-bandwidth`` gives an L2 rate (no figure measured in this project).

The designs of issue 19 not built yet (slab v2, tiled v2) are modelled from the issue's text: their rows say
"design". The peers are modelled from their published designs; what each assumes is in its terms' text.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: fastcache itself

HEADLINE = {"B": 65536, "N": 131072, "D": 768, "dtype": "bfloat16"}
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
SLAB_BUDGET = 4 * 2**30  # memory_budget of the GPU suite's slab cases (bench/gpu_bench.py imports it from here)
LAUNCH_S = 5e-6  # one kernel launch from PyTorch (dispatch + launch; assumed, typical of eager PyTorch on a GPU)
V2_TILE = 128  # issue 19's tile width for slab v2's Triton GEMMs and tiled v2's kernels
PEER_TILE = 128  # the tile assumed for the peers' fused kernels (CCE, Inf-CL): their largest published config


@dataclass(frozen=True)
class Machine:
    """A GPU's figures: ``mm_tflops`` the bf16/fp16 dense GEMM rate (torch.mm 8192³), ``bandwidth_tbs`` a
    device-to-device copy's rate counting read and write, ``fp32_tflops`` the datasheet FP32 rate (no TF32), ``sms``
    the streaming multiprocessors, ``l2_tbs`` an L2 rate (None: L2 traffic is not projected)."""

    name: str
    mm_tflops: float
    bandwidth_tbs: float
    fp32_tflops: float
    sms: int
    l2_tbs: float | None = None


# issue 19's figures (measured on the machines this project may use); FP32 and SMs: NVIDIA's H100/H200 SXM datasheets
MACHINES = {"H100": Machine("H100", 798.0, 3.0, 67.0, 132), "H200": Machine("H200", 788.0, 4.3, 67.0, 132)}


@dataclass(frozen=True)
class Shape:
    """A loss stage and the strategy parameters the terms read: ``chunk`` the slab's rows per chunk (None: what
    fastcache picks at SLAB_BUDGET), ``dims`` the Matryoshka dims K, ``filter_hit_rate`` the share of Cut
    Cross-Entropy's backward tiles that filter_eps skips, ``grad_split`` the slices of D that tiled v2's backward
    recomputes each similarity tile for (1: the gradient rows kept on chip), ``mini_batch`` sentence-transformers'
    mini-batch rows."""

    B: int
    N: int
    D: int
    dtype: str = "bfloat16"
    chunk: int | None = None
    dims: int = 1
    filter_hit_rate: float = 0.9
    grad_split: int = 1
    mini_batch: int = 32

    @property
    def e(self) -> int:
        """Bytes per embedding value."""
        return ITEMSIZE[self.dtype]

    @property
    def low(self) -> bool:
        """16-bit operands: the slab's GEMMs take them with fp32 results, dL/ds is cast to them."""
        return self.e < 4

    @property
    def logits(self) -> int:
        return self.B * self.N

    @property
    def rows(self) -> int:
        return self.B + self.N


# ---------------------------------------------------------------------------------------------------------------
# the terms: one definition each (amount(shape, **kernel parameters) per logit or per embedding row)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Term:
    kind: str  # "flop", "hbm" (bytes) or "l2" (bytes moved through L2, not HBM)
    per: str  # "logit" (B·N) or "row" (B + N embedding rows)
    amount: Callable[..., float]
    what: str
    sources: tuple[str, ...]  # the files whose code causes it (tagged there), or where the design comes from


def _swept_hbm(s: Shape, own: int, machine: Machine, occupancy: int = 1) -> float:
    """Bytes per logit of reading the swept embeddings from HBM once per wave of resident programs, each owning
    ``own`` rows (programs in a wave sweep in step and share the swept tiles through L2)."""
    return s.e * s.D / (machine.sms * occupancy * own)


SLAB = ("fastcache/ops/contrastive/slab.py",)
EPILOGUES = ("csrc/cuda/contrastive_epilogue_kernel.cuh", "fastcache/triton/contrastive.py")
TILED = ("fastcache/triton/contrastive.py",)
NORMALIZE = ("fastcache/ops/contrastive/normalize.py",)
MATRYOSHKA_SLAB, MATRYOSHKA_TILED = ("fastcache/ops/matryoshka/slab.py",), ("fastcache/triton/matryoshka.py",)
ISSUE = ("design (issue 19)",)
TERMS: dict[str, Term] = {
    "gemm.product": Term("flop", "logit", lambda s, **k: 2 * s.D,
                         "one product over D: 2·D FLOPs per logit (similarity, or a gradient GEMM)", SLAB),
    "gemm.operand_read": Term("hbm", "logit", lambda s, rows, **k: s.e * s.D * (1 / rows + 1 / s.N),
                              "a GEMM of `rows` rows against all N columns reads both operands once", SLAB),
    "slab.gemm_out_fp32": Term("hbm", "logit", lambda s, **k: 4, "the similarity GEMM writes the fp32 block", SLAB),
    "slab.epilogue_lse_read": Term("hbm", "logit", lambda s, **k: 4,
                                   "the epilogue's first pass reads the block (row max and sum-exp)",
                                   EPILOGUES),
    "slab.epilogue_grad_rmw": Term("hbm", "logit", lambda s, **k: 8,
                                   "the epilogue's second pass reads the block and writes dL/ds over it",
                                   EPILOGUES),
    "slab.grad_cast": Term("hbm", "logit", lambda s, **k: 4 + s.e if s.low else 0,
                           "dL/ds, fp32, read and written as a scaled 16-bit GEMM operand", SLAB),
    "slab.grad_operand_read": Term("hbm", "logit", lambda s, **k: s.e if s.low else 4,
                                   "a gradient GEMM reads dL/ds (16-bit copy, or the fp32 block)", SLAB),
    "slab.grad_rows_rmw": Term("hbm", "logit", lambda s, **k: 8 * s.D / s.N,
                               "dQ[chunk] += G·D: the chunk's fp32 gradient rows read and written once", SLAB),
    "slab.grad_cols_rmw": Term("hbm", "logit", lambda s, rows, **k: 8 * s.D / rows,
                               "dD += Gᵀ·Q[chunk]: all N fp32 gradient rows read and written once per chunk", SLAB),
    "norm.forward": Term("hbm", "row", lambda s, **k: 2 * s.e * s.D,
                         "normalisation: each embedding row read and written once (normalised copy)", NORMALIZE),
    "norm.backward": Term("hbm", "row", lambda s, **k: (8 + s.e) * s.D,
                          "normalisation backward: the fp32 gradient read and written in place, the row read",
                          NORMALIZE),
    "grad.autograd_output": Term("hbm", "row", lambda s, **k: (4 + 3 * s.e) * s.D,
                                 "the autograd Function keeps the gradients in the inputs' dtype (4 + e) and scales "
                                 "them by the incoming gradient (2e)", ("fastcache/ops/contrastive/autograd.py",)),
    "grad.zero_unscale": Term("hbm", "row", lambda s, **k: 12 * s.D,
                              "fp32 gradient accumulators zeroed (4 B), then divided by the operand scale (8 B)", SLAB),
    "tiled.tile_operand_l2": Term("l2", "logit", lambda s, own, swept, **k: s.e * s.D * (1 / own + 1 / swept),
                                  "a similarity tile loads its own rows' and swept columns' strips over all D",
                                  TILED),
    "tiled.swept_operand_hbm": Term("hbm", "logit", lambda s, own, machine, **k: _swept_hbm(s, own, machine),
                                    "the swept embeddings from HBM once per wave (one program per SM)",
                                    TILED),
    "tiled.product_operand_l2": Term("l2", "logit", lambda s, own, **k: s.e * s.D / own,
                                     "the backward product reads the swept tile's embeddings again", TILED),
    "tiled.grad_scratch_l2": Term("l2", "logit", lambda s, block_do, stores=1, **k:
                                  s.e * (stores + math.ceil(s.D / block_do)),
                                  "the gradient operand (e bytes) stored to the program's scratch (`stores` times: "
                                  "Matryoshka's M_k) and loaded once per block_do output dims by the pass's GEMMs",
                                  (*TILED, *MATRYOSHKA_TILED)),
    "tiled.grad_rmw_per_pass": Term("l2", "logit", lambda s, passed, **k: 8 * s.D / passed,
                                    "the program's own fp32 gradient rows read and written once per pass of `passed` "
                                    "swept rows", (*TILED, *MATRYOSHKA_TILED)),
    "slab_v2.logits_store": Term("hbm", "logit", lambda s, **k: s.e,
                                 "the similarity GEMM's epilogue stores the logits once, in the operand dtype", ISSUE),
    "slab_v2.logits_load": Term("hbm", "logit", lambda s, **k: s.e,
                                "a backward GEMM loads the stored logits and makes dL/ds on load", ISSUE),
    "slab_v2.lse_partials": Term("hbm", "logit", lambda s, **k: 16 / V2_TILE,
                                 "(max, sum-exp) fp32 per row and column tile, written and merged", ISSUE),
    "matryoshka_slab.segment_accumulate": Term("hbm", "logit", lambda s, **k: 8,
                                               "a segment GEMM adds into the fp32 prefix product (read + write)",
                                               MATRYOSHKA_SLAB),
    "matryoshka_slab.cos_scale": Term("hbm", "logit", lambda s, **k: 16,
                                      "s_k = a_k ⊙ R_k ⊙ b_k: two elementwise passes over the fp32 block",
                                      MATRYOSHKA_SLAB),
    "matryoshka_slab.grad_weight": Term("hbm", "logit", lambda s, **k: 8,
                                        "g' = w·a ⊙ g in place (read + write)", MATRYOSHKA_SLAB),
    "matryoshka_slab.radial_sums": Term("hbm", "logit", lambda s, **k: 20,
                                        "t = g' ⊙ R (12 B), then its row and column sums (8 B)", MATRYOSHKA_SLAB),
    "matryoshka_slab.segment_total": Term("hbm", "logit", lambda s, **k: 12,
                                          "A_k = A_{k-1} + G_k ⊙ b_k (the first: 8 B, counted as 12)",
                                          MATRYOSHKA_SLAB),
    "matryoshka_slab.grad_cast": Term("hbm", "logit", lambda s, **k: 12 + s.e if s.low else 0,
                                      "A_k·scale (fp32 temporary, 8 B), then its 16-bit copy (4 + e B)",
                                      MATRYOSHKA_SLAB),
    "matryoshka_tiled.scratch_l2": Term("l2", "logit", lambda s, **k: 8 * (s.dims - 1),
                                        "each H_k but the last stored to and loaded from the per-program scratch",
                                        MATRYOSHKA_TILED),
    "liger.logits_write": Term("hbm", "logit", lambda s, **k: s.e,
                               "Liger: the chunk's GEMM writes the logits in the input dtype", ("peer: liger-kernel",)),
    "liger.cross_entropy": Term("hbm", "logit", lambda s, **k: 3 * s.e,
                                "Liger: its cross-entropy kernel reads each row twice, writes dL/ds over it",
                                ("peer: liger-kernel",)),
    "liger.grad_operand_read": Term("hbm", "logit", lambda s, **k: s.e, "Liger: a gradient GEMM reads dL/ds",
                                    ("peer: liger-kernel",)),
    "liger.grad_weight_rmw": Term("hbm", "logit", lambda s, rows, **k: 2 * s.e * s.D / rows,
                                  "Liger: the N×D weight gradient (input dtype) read and written once per chunk",
                                  ("peer: liger-kernel",)),
    "cce.grad_atomics_l2": Term("l2", "logit", lambda s, **k: 8 * s.D * 2 / PEER_TILE,
                                "CCE: fp32 atomic adds of a backward tile's dE and dC rows (read + write in L2)",
                                ("peer: cut-cross-entropy",)),
    "st.score_passes": Term("hbm", "logit", lambda s, **k: 14 * s.e,
                            "sentence-transformers: the mini-batch's score matrix written by the GEMM, scaled, "
                            "concatenated, logsumexp'd, and their backward (~14 passes of e bytes)",
                            ("peer: sentence-transformers",)),
    "st.candidate_passes": Term("hbm", "logit", lambda s, **k: 13 * s.e * s.D / s.mini_batch,
                                "sentence-transformers: per mini-batch all N candidates normalised (2), read by 3 "
                                "GEMMs, their gradient written (1), normalisation backward (4), added to the "
                                "leaves' gradients (3): 13 passes of N·D·e", ("peer: sentence-transformers",)),
}


# ---------------------------------------------------------------------------------------------------------------
# the strategies: kernels as (term, count, parameters)
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Kernel:
    name: str
    terms: tuple  # (term name, count, {parameter: value}) each
    launches: float = 1


def _gpu_chunk(s: Shape, workspace_blocks: float, cache_cap: bool = False, itemsize: int = 4) -> int:
    """Rows per chunk that fastcache.ops.contrastive.slab.chunk_rows gives at SLAB_BUDGET (a GPU run: fp32 blocks,
    ``workspace_blocks`` of them per chunk row)."""
    from fastcache.ops.contrastive import ContrastiveLayout, ContrastiveOptions
    from fastcache.ops.contrastive.slab import chunk_rows

    layout = ContrastiveLayout(s.B, s.N, 1, s.D, s.B, 0)  # N candidates (how they split into columns: no matter)
    return chunk_rows(layout, ContrastiveOptions(), False, 0, SLAB_BUDGET, itemsize, workspace_blocks,
                      cache_cap=cache_cap)


def slab_chunk(s: Shape) -> int:
    """The contrastive slab's rows per chunk on a GPU (fastcache/ops/contrastive/slab.py slab_rows: the epilogue's
    workspace block, half a block more for the 16-bit dL/ds)."""
    from fastcache.ops.contrastive.epilogue import WORKSPACE_BLOCKS

    return s.chunk or _gpu_chunk(s, WORKSPACE_BLOCKS["cuda"] + (0.5 if s.low else 0))


def _norm_kernels(s: Shape, launches: float) -> list[Kernel]:
    return [Kernel("normalise", (("norm.forward", 1, {}),), launches),
            Kernel("normalisation backward", (("norm.backward", 1, {}),), launches),
            Kernel("gradients to the inputs' dtype", (("grad.autograd_output", 1, {}),), 4)]


def slab_v1(s: Shape, machine: Machine) -> list[Kernel]:
    """fastcache's slab (cuBLAS GEMMs into fp32 chunk×N blocks, the epilogue, the 16-bit cast, two gradient GEMMs).
    The CUDA and the Triton epilogue move the same bytes (two reads and a write per logit)."""
    c = slab_chunk(s)
    chunks = math.ceil(s.B / c)
    return _norm_kernels(s, 4) + [
        Kernel("similarity GEMM", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                   ("slab.gemm_out_fp32", 1, {})), chunks),
        Kernel("epilogue", (("slab.epilogue_lse_read", 1, {}), ("slab.epilogue_grad_rmw", 1, {})), chunks),
        Kernel("dL/ds cast", (("slab.grad_cast", 1, {}),), chunks if s.low else 0),
        Kernel("gradient GEMM rows", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                      ("slab.grad_operand_read", 1, {}), ("slab.grad_rows_rmw", 1, {})), chunks),
        Kernel("gradient GEMM columns", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                         ("slab.grad_operand_read", 1, {}), ("slab.grad_cols_rmw", 1, {"rows": c})), chunks),
        Kernel("zero, unscale", (("grad.zero_unscale", 1, {}),), 4),
    ]


def slab_v2(s: Shape, machine: Machine) -> list[Kernel]:
    """Issue 19's slab v2 (design): Triton GEMMs whose epilogue reduces tiles to (max, sum-exp) partials and stores
    the logits once in the operand dtype; the backward GEMMs make dL/ds on load from them and the row LSE; chunks
    as today's budget rule gives for e-byte blocks."""
    c = s.chunk or _gpu_chunk(s, 1, itemsize=s.e)
    chunks = math.ceil(s.B / c)
    return _norm_kernels(s, 4) + [
        Kernel("similarity GEMM + LSE partials", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                                  ("slab_v2.logits_store", 1, {}), ("slab_v2.lse_partials", 1, {})),
               2 * chunks),
        Kernel("gradient GEMM rows (dL/ds on load)", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                                      ("slab_v2.logits_load", 1, {}),
                                                      ("slab.grad_rows_rmw", 1, {})), chunks),
        Kernel("gradient GEMM columns (dL/ds on load)", (("gemm.product", 1, {}),
                                                         ("gemm.operand_read", 1, {"rows": c}),
                                                         ("slab_v2.logits_load", 1, {}),
                                                         ("slab.grad_cols_rmw", 1, {"rows": c})), chunks),
        Kernel("zero, unscale", (("grad.zero_unscale", 1, {}),), 4),
    ]


def _tiled(s: Shape, machine: Machine, forward: tuple[int, int], backward: tuple[int, int], recompute: int,
           gradient: tuple = ()) -> list[Kernel]:
    """Tiled kernels: a forward sweep (tiles own × swept), then per side a backward sweep that recomputes each
    similarity tile ``recompute`` times and multiplies it by the swept embeddings once, plus the ``gradient`` terms
    (how the backward accumulates its gradient rows; none: on chip)."""
    fo, fs = forward
    bo, bs = backward
    sweep = {"machine": machine}
    fwd = Kernel("forward (row LSE)", (("gemm.product", 1, {}), ("tiled.tile_operand_l2", 1, {"own": fo, "swept": fs}),
                                       ("tiled.swept_operand_hbm", 1, {"own": fo, **sweep})), 2)
    grad_terms = (("gemm.product", recompute + 1, {}), ("tiled.tile_operand_l2", recompute, {"own": bo, "swept": bs}),
                  ("tiled.product_operand_l2", 1, {"own": bo}),
                  ("tiled.swept_operand_hbm", recompute + 1, {"own": bo, **sweep}), *gradient)
    return _norm_kernels(s, 4) + [fwd, Kernel("backward rows", grad_terms), Kernel("backward columns", grad_terms),
                                  Kernel("zero, unscale", (("grad.zero_unscale", 1, {}),), 4)]


def tiled_v2_built(s: Shape, machine: Machine) -> list[Kernel]:
    """fastcache's tiled Triton kernels (fastcache/triton/contrastive.py), each kernel's first configuration without
    a guide: the backward's programs store dL/ds of a pass of PASS swept rows to their scratch, then multiply it
    by the pass's swept embeddings BLOCK_DO dims at a time, adding to their own gradient rows once per pass."""
    from fastcache.triton.contrastive import BACKWARD_CONFIGS, FORWARD_CONFIGS

    forward = FORWARD_CONFIGS[s.e, False][0].kwargs
    grad = BACKWARD_CONFIGS[s.e, False][0].kwargs
    block_do = min(grad["BLOCK_DO"], max(16, 2 ** math.ceil(math.log2(s.D))))
    return _tiled(s, machine, (forward["BLOCK_M"], forward["BLOCK_N"]), (grad["OWN"], grad["SWEPT"]), 1,
                  (("tiled.grad_scratch_l2", 1, {"block_do": block_do}),
                   ("tiled.grad_rmw_per_pass", 1, {"passed": grad["PASS"]})))


def tiled_v2(s: Shape, machine: Machine) -> list[Kernel]:
    """Issue 19's tiled v2 (design): 128-wide tiles, pipelined; the gradient kept on chip (grad_split = 1) or split
    over D in grad_split slices, each recomputing the similarity tile."""
    tile = (V2_TILE, V2_TILE)
    return _tiled(s, machine, tile, tile, s.grad_split)


def matryoshka_slab(s: Shape, machine: Machine) -> list[Kernel]:
    """fastcache's Matryoshka slab on CUDA (fastcache/ops/matryoshka/slab.py _per_dim_chunk), K = s.dims: segment
    GEMMs into the running fp32 prefix product, per dim the cosine scaling, the epilogue, the weight and radial
    sums; per segment the gradient total, its 16-bit copy and two segment GEMMs."""
    K = s.dims
    # slab_rows' blocks on CUDA: prefix product, K gradient blocks, the radial temporary, the epilogue's workspace
    # (+ half a block of 16-bit total)
    c = s.chunk or _gpu_chunk(s, K + 2 + (0.5 if s.low else 0))
    chunks = math.ceil(s.B / c)
    return _norm_kernels(s, 4 * K) + [
        Kernel("segment GEMMs", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                                 ("slab.gemm_out_fp32", 1, {}), ("matryoshka_slab.segment_accumulate", K - 1, {})),
               K * chunks),
        Kernel("cosine scaling", (("matryoshka_slab.cos_scale", K, {}),), 2 * K * chunks),
        Kernel("epilogue", (("slab.epilogue_lse_read", K, {}), ("slab.epilogue_grad_rmw", K, {})), K * chunks),
        Kernel("weight, radial sums", (("matryoshka_slab.grad_weight", K, {}), ("matryoshka_slab.radial_sums", K, {})),
               5 * K * chunks),
        Kernel("segment totals, cast", (("matryoshka_slab.segment_total", K, {}),
                                        ("matryoshka_slab.grad_cast", K, {})), 3 * K * chunks),
        Kernel("segment gradient GEMMs", (("gemm.product", 2, {}), ("gemm.operand_read", 2, {"rows": c}),
                                          ("slab.grad_operand_read", 2 * K, {}), ("slab.grad_rows_rmw", 1, {}),
                                          ("slab.grad_cols_rmw", 1, {"rows": c})), 2 * K * chunks),
        Kernel("zero, unscale", (("grad.zero_unscale", 1, {}),), 4),
    ]


def matryoshka_tiled(s: Shape, machine: Machine) -> list[Kernel]:
    """fastcache's Matryoshka tiled kernels (fastcache/triton/matryoshka.py), each kernel's first configuration
    without a guide: the contrastive tiled kernels' passes at D = d_1, every dim from one sweep over D, plus the
    backward's tile scratch of the H_k and its pass scratch of the K M_k."""
    from fastcache.triton.matryoshka import BACKWARD_CONFIGS, FORWARD_CONFIGS

    forward = FORWARD_CONFIGS[s.e, False][0].kwargs
    grad = BACKWARD_CONFIGS[s.e, False][0].kwargs
    block_do = min(grad["BLOCK_DO"], max(16, 2 ** math.ceil(math.log2(s.D))))
    return _tiled(s, machine, (forward["BLOCK_M"], forward["BLOCK_N"]), (grad["OWN"], grad["SWEPT"]), 1,
                  (("matryoshka_tiled.scratch_l2", 1, {}),
                   ("tiled.grad_scratch_l2", 1, {"block_do": block_do, "stores": s.dims}),
                   ("tiled.grad_rmw_per_pass", 1, {"passed": grad["PASS"]})))


def liger(s: Shape, machine: Machine) -> list[Kernel]:
    """Liger's fused linear cross-entropy: row chunks of next_pow2(ceil(B / ceil(N / D))) (512 at the headline),
    bf16 logits, its cross-entropy kernel, two gradient GEMMs (the weight gradient accumulated in the input dtype)."""
    c = min(s.B, 2 ** math.ceil(math.log2(math.ceil(s.B / math.ceil(s.N / s.D)))))
    chunks = math.ceil(s.B / c)
    return _norm_kernels(s, 6) + [
        Kernel("logits GEMM", (("gemm.product", 1, {}), ("gemm.operand_read", 1, {"rows": c}),
                               ("liger.logits_write", 1, {})), chunks),
        Kernel("cross-entropy", (("liger.cross_entropy", 1, {}),), chunks),
        Kernel("gradient GEMMs", (("gemm.product", 2, {}), ("gemm.operand_read", 2, {"rows": c}),
                                  ("liger.grad_operand_read", 2, {}), ("liger.grad_weight_rmw", 1, {"rows": c})),
               2 * chunks),
    ]


def _fused_peer(s: Shape, machine: Machine, gradient_products: float, backward_kernels: int,
                extra: tuple = ()) -> list[Kernel]:
    """A peer with a fused forward LSE kernel and backward kernels that recompute the logits (CCE, Inf-CL),
    PEER_TILE-square tiles: the operands through L2, the swept side from HBM once per wave."""
    tiles = {"own": PEER_TILE, "swept": PEER_TILE}
    sweep = {"own": PEER_TILE, "machine": machine}
    fwd = Kernel("forward LSE", (("gemm.product", 1, {}), ("tiled.tile_operand_l2", 1, tiles),
                                 ("tiled.swept_operand_hbm", 1, sweep)))
    bwd = Kernel("backward", (("gemm.product", 1 + gradient_products / backward_kernels, {}),
                              ("tiled.tile_operand_l2", 1, tiles), ("tiled.swept_operand_hbm", 2, sweep), *extra))
    return _norm_kernels(s, 6) + [fwd] + [bwd] * backward_kernels


def cce(s: Shape, machine: Machine) -> list[Kernel]:
    """Cut Cross-Entropy with filter_eps (its default "high"): one backward kernel recomputes each logit tile and
    skips the dE/dC products of tiles whose softmax entries all fall below bf16 resolution (share
    ``filter_hit_rate``, a parameter: the model does not know the data); fp32 atomics for the rest."""
    kept = 1 - s.filter_hit_rate
    return _fused_peer(s, machine, 2 * kept, 1, (("cce.grad_atomics_l2", kept, {}),))


def cce_exact(s: Shape, machine: Machine) -> list[Kernel]:
    """Cut Cross-Entropy with filter_eps=None: every backward tile's products (8·B·N·D FLOPs in all)."""
    return cce(replace(s, filter_hit_rate=0.0), machine)


def inf_cl(s: Shape, machine: Machine) -> list[Kernel]:
    """Inf-CL: a forward LSE kernel and two backward kernels (queries' and keys' gradients), each recomputing the
    logits: 10·B·N·D FLOPs, like tiled v2's design (its ring over devices does nothing on one GPU)."""
    return _fused_peer(s, machine, 2, 2)


def st_cached(s: Shape, machine: Machine) -> list[Kernel]:
    """sentence-transformers' CachedMultipleNegativesRankingLoss.calculate_loss (with_backward): per mini-batch
    of ``mini_batch`` rows, cos_sim against all N candidates (normalising them again), the scaled score matrix,
    logsumexp, and autograd's backward of all of it; ~30 PyTorch kernels per mini-batch."""
    batches = math.ceil(s.B / s.mini_batch)
    return [Kernel("score GEMMs", (("gemm.product", 3, {}),), 3 * batches),
            Kernel("score elementwise", (("st.score_passes", 1, {}),), 12 * batches),
            Kernel("candidate passes", (("st.candidate_passes", 1, {}),), 15 * batches)]


# name -> (label, its kernels, the Shape fields it fixes); a name is bench/gpu_bench.py's case name where the suite
# measures the strategy (its rows are projected by that name)
STRATEGIES: dict[str, tuple[str, Callable[[Shape, Machine], list[Kernel]], dict]] = {
    "fastcache_slab_cuda": ("slab v1, CUDA epilogue", slab_v1, {}),
    "fastcache_slab_triton": ("slab v1, Triton epilogue", slab_v1, {}),
    "fastcache_tiled": ("tiled v2 as built (Triton)", tiled_v2_built, {}),
    "slab_v2_design": ("slab v2 (design)", slab_v2, {}),
    "fastcache_fused_slab": ("slab v2 as built: strategy fused_slab", slab_v2, {}),
    "tiled_v2_design": ("tiled v2 (design, gradient on chip)", tiled_v2, {}),
    "matryoshka_slab_cuda": ("Matryoshka slab, 5 dims", matryoshka_slab, {"dims": 5}),
    "matryoshka_slab_cuda_1dim": ("Matryoshka slab, 1 dim", matryoshka_slab, {"dims": 1}),
    "matryoshka_tiled": ("Matryoshka tiled, 5 dims", matryoshka_tiled, {"dims": 5}),
    "matryoshka_tiled_1dim": ("Matryoshka tiled, 1 dim", matryoshka_tiled, {"dims": 1}),
    "liger_flce": ("Liger fused linear CE", liger, {}),
    "cut_cross_entropy": ("Cut Cross-Entropy, filter_eps (hit rate {hit:.0%})", cce, {}),
    "cut_cross_entropy_exact": ("Cut Cross-Entropy, filter_eps=None", cce_exact, {}),
    "inf_cl": ("Inf-CL", inf_cl, {}),
    "st_cached_mbs32": ("sentence-transformers CachedMNRL (mbs 32)", st_cached, {"mini_batch": 32}),
}


# ---------------------------------------------------------------------------------------------------------------
# projection
# ---------------------------------------------------------------------------------------------------------------

def kernel_totals(kernel: Kernel, s: Shape, machine: Machine) -> dict[str, float]:
    """FLOPs, HBM and L2 bytes of one kernel (summed over its launches)."""
    totals = {"flop": 0.0, "hbm": 0.0, "l2": 0.0}
    for name, count, params in kernel.terms:
        term = TERMS[name]
        per = s.logits if term.per == "logit" else s.rows
        args = {"machine": machine, **params}
        totals[term.kind] += count * per * term.amount(s, **args)
    return totals


def mm_rate(s: Shape, machine: Machine) -> float:
    """FLOP/s of the products at this dtype."""
    return 1e12 * (machine.mm_tflops if s.low else machine.fp32_tflops)


def project(strategy: str, s: Shape, machine: Machine, overrides: dict | None = None) -> dict:
    """The projection of one strategy at shape ``s`` on ``machine`` (the strategy's own parameters, then
    ``overrides``, replace the shape's): totals, per-kernel times, projected ms."""
    label, build, fixed = STRATEGIES[strategy]
    s = replace(s, **{**fixed, **(overrides or {})})
    rate, bandwidth = mm_rate(s, machine), machine.bandwidth_tbs * 1e12
    kernels, seconds, serial = [], 0.0, 0.0
    totals = {"flop": 0.0, "hbm": 0.0, "l2": 0.0}
    for kernel in build(s, machine):
        t = kernel_totals(kernel, s, machine)
        limits = [t["flop"] / rate, t["hbm"] / bandwidth]
        if machine.l2_tbs:
            limits.append(t["l2"] / (machine.l2_tbs * 1e12))
        launch = kernel.launches * LAUNCH_S
        seconds += max(limits) + launch
        serial += sum(limits) + launch
        for k in totals:
            totals[k] += t[k]
        kernels.append({"kernel": kernel.name, "launches": kernel.launches, **t,
                        "ms": (max(limits) + launch) * 1e3,
                        "bound": ("compute", "memory", "l2")[limits.index(max(limits))] if max(limits) else "launch"})
    useful = 6 * s.B * s.N * s.D
    return {"strategy": strategy, "label": label.format(hit=s.filter_hit_rate), "machine": machine.name,
            "B": s.B, "N": s.N, "D": s.D, "dtype": s.dtype, "dims": s.dims,
            "mm_tflops": rate / 1e12, "bandwidth_tbs": machine.bandwidth_tbs,
            "flop": totals["flop"], "hbm_bytes": totals["hbm"], "l2_bytes": totals["l2"],
            "hbm_bytes_per_logit": totals["hbm"] / s.logits, "l2_bytes_per_logit": totals["l2"] / s.logits,
            "projected_ms": seconds * 1e3, "no_overlap_ms": serial * 1e3,
            "tflops": useful / seconds / 1e12, "ratio_to_mm": useful / seconds / rate, "kernels": kernels}


def machine_for(gpu_name: str | None, mm_tflops: float | None = None, bandwidth_tbs: float | None = None) -> Machine:
    """The MACHINES entry whose name is in ``gpu_name`` (H100 if none), with the given figures in place of its own."""
    base = next((m for key, m in MACHINES.items() if gpu_name and key in gpu_name), MACHINES["H100"])
    return replace(base, mm_tflops=mm_tflops or base.mm_tflops, bandwidth_tbs=bandwidth_tbs or base.bandwidth_tbs)


def measured_figures(rows: list[dict], mm_tflops: float | None, gpu_name: str | None) -> tuple[Machine, str]:
    """The machine of a GPU suite run (bench/gpu_bench.py's rows): its GPU's MACHINES entry with the run's own
    torch.mm rate and, when the run timed the epilogue benchmark's device-to-device copy, that copy's bandwidth
    (the widest block's); and where the figures came from."""
    copies = [r for r in rows if r.get("case") == "epilogue_copy" and r.get("gbps")]
    widest = max(copies, key=lambda r: r["N"], default=None)
    bandwidth = widest["gbps"] / 1e3 if widest else None
    machine = machine_for(gpu_name, mm_tflops, bandwidth)
    source = (f"{machine.name}: mm rate {'of the same run' if mm_tflops else 'from the table'}, bandwidth "
              f"{'of the same run (device-to-device copy)' if bandwidth else 'from the table'}")
    return machine, source


def project_row(row: dict, machine: Machine) -> dict | None:
    """The projection of one gpu_bench row (its case and shape; Matryoshka rows at their own dims), None for a case
    the model does not cover."""
    if row.get("case") not in STRATEGIES or not row.get("D"):
        return None
    overrides = {"dims": len(row["dims"])} if row.get("dims") else {}
    return project(row["case"], Shape(row["B"], row["N"], row["D"], row.get("dtype") or "bfloat16"), machine,
                   overrides)


# ---------------------------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------------------------

def table(projections: list[dict]) -> str:
    lines = [("| machine | strategy | TFLOP | HBM GB | HBM B/logit | L2 B/logit | projected ms | no-overlap ms | "
              "TFLOP/s (6·B·N·D) | % of mm |"), "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for p in projections:
        lines.append(f"| {p['machine']} | {p['label']} | {p['flop'] / 1e12:.1f} | {p['hbm_bytes'] / 1e9:.0f} | "
                     f"{p['hbm_bytes_per_logit']:.1f} | {p['l2_bytes_per_logit']:.0f} | {p['projected_ms']:.1f} | "
                     f"{p['no_overlap_ms']:.1f} | {p['tflops']:.0f} | {p['ratio_to_mm']:.0%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=HEADLINE["B"])
    parser.add_argument("--N", type=int, default=HEADLINE["N"])
    parser.add_argument("--D", type=int, default=HEADLINE["D"])
    parser.add_argument("--dtype", choices=sorted(ITEMSIZE), default=HEADLINE["dtype"])
    parser.add_argument("--machine", nargs="+", choices=sorted(MACHINES), default=sorted(MACHINES))
    parser.add_argument("--mm-tflops", type=float, help="the bf16 GEMM rate (TFLOP/s) in place of the machine's")
    parser.add_argument("--bandwidth", type=float, help="HBM bandwidth (TB/s, read + write) in place of the machine's")
    parser.add_argument("--l2-bandwidth", type=float, help="an L2 rate (TB/s): L2 traffic becomes a third limit")
    parser.add_argument("--chunk", type=int, help="the slabs' rows per chunk (default: what fastcache picks)")
    parser.add_argument("--filter-hit-rate", type=float, default=Shape.filter_hit_rate,
                        help="share of Cut Cross-Entropy's backward tiles that filter_eps skips (default 0.9)")
    parser.add_argument("--grad-split", type=int, default=Shape.grad_split,
                        help="tiled v2: slices of D its backward recomputes each tile for (default 1: on chip)")
    parser.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    parser.add_argument("--gpu-bench", type=Path, help="a gpu_bench.json: its machine figures, and its rows "
                                                       "projected next to their measured times")
    parser.add_argument("--kernels", action="store_true", help="also each strategy's kernels")
    parser.add_argument("--json", action="store_true", help="JSON on stdout instead of the markdown table")
    args = parser.parse_args(argv)
    if args.filter_hit_rate < 0 or args.filter_hit_rate > 1:
        parser.error(f"--filter-hit-rate must be in [0, 1], got {args.filter_hit_rate}")
    shape = Shape(args.B, args.N, args.D, args.dtype, chunk=args.chunk, filter_hit_rate=args.filter_hit_rate,
                  grad_split=args.grad_split)
    if args.gpu_bench:
        report = json.loads(args.gpu_bench.read_text())
        base, source = measured_figures(report.get("rows", []), report.get("mm_tflops"),
                                        report.get("machine", {}).get("gpu"))
        machines = [base]
    else:
        machines, source = [MACHINES[m] for m in args.machine], "table"
    machines = [replace(m, mm_tflops=args.mm_tflops or m.mm_tflops, bandwidth_tbs=args.bandwidth or m.bandwidth_tbs,
                        l2_tbs=args.l2_bandwidth) for m in machines]
    projections = [project(name, shape, m) for m in machines for name in args.strategies]
    compared = []
    if args.gpu_bench:
        for row in report.get("rows", []):
            p = project_row(row, machines[0]) if row.get("status") == "ok" else None
            if p:
                compared.append({"case": row["case"], "B": row["B"], "N": row["N"], "D": row["D"],
                                 "dtype": row["dtype"], "measured_ms": row["min_s"] * 1e3,
                                 "projected_ms": p["projected_ms"]})
    if args.json:
        print(json.dumps({"machines": [asdict(m) for m in machines], "figures": source, "launch_s": LAUNCH_S,
                          "projections": projections, "measured": compared}, indent=2))
        return 0
    print(f"B={shape.B} N={shape.N} D={shape.D} {shape.dtype}; machine figures: {source}; "
          + "; ".join(f"{m.name} {m.mm_tflops:.0f} TFLOP/s, {m.bandwidth_tbs:.2f} TB/s" for m in machines) + "\n")
    print(table(projections))
    if args.kernels:
        for p in projections:
            print(f"\n{p['machine']} {p['label']}:")
            for k in p["kernels"]:
                print(f"  {k['kernel']}: {k['flop'] / 1e12:.2f} TFLOP, {k['hbm'] / 1e9:.1f} GB, {k['ms']:.2f} ms "
                      f"({k['bound']})")
    if compared:
        print("\n| case | B | N | D | dtype | measured ms | projected ms | measured ÷ projected |\n"
              "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
        for c in compared:
            print(f"| {c['case']} | {c['B']} | {c['N']} | {c['D']} | {c['dtype']} | {c['measured_ms']:.1f} | "
                  f"{c['projected_ms']:.1f} | {c['measured_ms'] / c['projected_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
