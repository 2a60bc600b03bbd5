"""Triton kernels of the contrastive loss (the maths: fastcache/ops/contrastive/__init__.py's docstring).

One set of per-tile helpers (``_masked_logits``: scale, hardness penalty, self / own-column / guide / duplicate
masks; ``_online_logsumexp``; ``_softmax_grad``) serves two strategies:

- ``slab_epilogue``: the slab strategy's epilogue, with the contract of fastcache/ops/contrastive/epilogue.py: the
  similarity blocks of a row chunk (computed by torch.matmul) become dL/ds in place; returns per-row losses.
- the tiled strategy's kernels (launched by ``contrastive_tiled``, fastcache/ops/contrastive/tiled.py), which never
  hold more than a tile of any similarity block. For each enabled direction b, with rows R_b and columns C_b
  (query_to_doc: R = q, C = d; query_to_query: q, Q; doc_to_query: p = d[offset:offset+B], Q; doc_to_doc: p, d):

      forward   a row-parallel kernel: per row, the online log-sum-exp lse_b of the block's logits (and, for
                query_to_doc, the positive's logit); the log-partition (joint: logsumexp_b lse_b, per_direction:
                mean_b lse_b) and the loss follow on O(B) vectors.
      backward  G_b = dL/ds_b = coef_b·exp(logit - base_b) (- scale/B at the positive), recomputed tile by tile:
                a row-parallel kernel gives dR_b = G_b·C_b, a column-parallel kernel dC_b = G_bᵀ·R_b. A program
                owns OWN rows (columns) and sweeps the other side in passes of PASS (``_tiled_grad_kernel``):
                first each SWEPT-wide similarity tile of the pass is computed once over the full D and turned
                into G, stored to the program's scratch in the embeddings' dtype; then a GEMM of the scratch
                against the pass's swept embeddings, BLOCK_DO output dims at a time, accumulates in registers
                and adds to the program's own fp32 gradient rows once per pass (rows no other program touches, a
                fixed order: no atomics, deterministic gradients).

  The embeddings stay in their dtype and tl.dot accumulates in fp32 (fp64 for float64 inputs; fp32 inputs use
  full-precision products, not TF32). FLOPs per direction: forward 2·B·N·D, each backward kernel 2·B·N·D to
  recompute the similarities and 2·B·N·D for its product: 10·B·N·D (the slab: 6·B·N·D, keeping whole row chunks
  of the blocks instead; a guide adds 2·B·N·D_guide per kernel). L2 traffic of a backward kernel per logit (e
  bytes per embedding value): the similarity tile's strips e·D·(1/OWN + 1/SWEPT), the swept embeddings again
  e·D/OWN, the scratch e·(1 + D/BLOCK_DO), the fp32 gradient rows 8·D/PASS; 80 bytes with the first 16-bit
  configuration at D = 768 (the per-tile read-modify-write of the kernels before it: 108). bench/roofline.py
  projects it.
  Memory: the normalised copies (input dtype), the fp32 gradient accumulators, O(B) statistics, the backward's
  scratch of PASS values per owned row (e·PASS·max(B, N, Mq) bytes: 256 MiB at N = 131072, 16 bits) and
  temporaries of NORMALIZE_ROWS rows, i.e. O((B + N + Mq)·D).
  Launch configurations: FORWARD_CONFIGS and BACKWARD_CONFIGS by the embeddings' element size and guide, autotuned
  on a GPU (``_Tuned``); every one compiles for sm_90a without a register spill (bench/triton_compile.py; the
  facts: bench/README.md).

Kernels are decorated at import: set TRITON_INTERPRET=1 before importing this module to run them on CPU tensors.
This module imports only fastcache.kernel_codes: the host code that prepares the operands lives with the op.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from fastcache.kernel_codes import Hardness, Kind

# fastcache/kernel_codes.py's codes as Triton constants; the host code passes codes and coefficients from the op's
# kernel_params
QUERY_TO_DOC = tl.constexpr(int(Kind.QUERY_TO_DOC))
QUERY_TO_QUERY = tl.constexpr(int(Kind.QUERY_TO_QUERY))
DOC_TO_QUERY = tl.constexpr(int(Kind.DOC_TO_QUERY))
DOC_TO_DOC = tl.constexpr(int(Kind.DOC_TO_DOC))
IN_BATCH_NEGATIVES = tl.constexpr(int(Hardness.IN_BATCH_NEGATIVES))
HARD_NEGATIVES = tl.constexpr(int(Hardness.HARD_NEGATIVES))
ALL_NEGATIVES = tl.constexpr(int(Hardness.ALL_NEGATIVES))

# Scalars travel in a small tensor of the compute dtype (Python floats would reach the kernel as fp32). GRAD_SCALE:
# the power of two that dL/ds is multiplied by before it becomes a 16-bit dot operand (ops/contrastive/slab.py's
# operand_grad_scale); the gradient accumulators hold GRAD_SCALE·dL/dx until the host divides. FILTER_THRESHOLD: the
# gradient filter's |dL/ds| threshold (kernel_params' filter_threshold; 0: exact).
SCALE, ALPHA, MARGIN, COEF, POS_COEF, GRAD_SCALE, FILTER_THRESHOLD = (tl.constexpr(k) for k in range(7))

EPILOGUE_BLOCK_M, EPILOGUE_BLOCK_N, EPILOGUE_WARPS = 4, 256, 4  # sm_90: 40-62 registers unguided, 96 guided
# The tiled kernels' configurations (triton.Config: tile constexprs, warps, pipeline stages) by the embeddings'
# element size and the guide; _Tuned launches the best of a variant's list. Forward: BLOCK_M rows × BLOCK_N columns
# per tile, BLOCK_K dims per dot. Backward: a program owns OWN rows (columns), sweeps passes of PASS columns (rows)
# in tiles of SWEPT, BLOCK_K dims per similarity dot, BLOCK_DO output dims per product. Each one compiles for sm_90a
# without a register spill (bench/triton_compile.py, checked by tests/native/test_triton_compile.py; ptxas spills at
# the neighbours tried: backward 16 bits 128 × 128 tiles or 256 output dims, guided 64 similarity dims; fp32 64 × 64
# tiles filtered, 64 output dims unguided; forward guided 16 bits 64 × 128, fp32 64 × 64).
FORWARD_CONFIGS = {
    (2, False): [triton.Config(dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64), num_warps=8, num_stages=3),
                 triton.Config(dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64), num_warps=4, num_stages=3)],
    (2, True): [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64), num_warps=8, num_stages=3)],
    (4, False): [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_warps=8, num_stages=3)],
    (4, True): [triton.Config(dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=32), num_warps=8, num_stages=3)],
    **{(8, guided): [triton.Config(dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), num_warps=8, num_stages=3)]
       for guided in (False, True)},
}


def _backward(own: int, swept: int, passed: int, block_k: int, block_do: int, warps: int,
              stages: int) -> triton.Config:
    return triton.Config(dict(OWN=own, SWEPT=swept, PASS=passed, BLOCK_K=block_k, BLOCK_DO=block_do),
                         num_warps=warps, num_stages=stages)


BACKWARD_CONFIGS = {
    (2, False): [_backward(128, 64, 1024, 64, 64, 8, 3), _backward(64, 128, 1024, 64, 128, 8, 3)],
    (2, True): [_backward(64, 64, 1024, 32, 64, 8, 3)],
    (4, False): [_backward(32, 64, 256, 32, 32, 8, 3)],
    **{(size, True): [_backward(32, 64, 256, 32, 64, 8, 3)] for size in (4, 8)},
    (8, False): [_backward(32, 64, 256, 32, 64, 8, 3)],
}
PARTITION_BLOCK = 1024


# ---------------------------------------------------------------------------------------------------------------
# per-tile maths, shared by the slab epilogue and the tiled kernels
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives, scale, alpha,
                   KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr):
    """[M, N] similarities s of rows (positive column pos, own query column own_query, guide threshold, id of the
    positive: [M] each) and columns cols [N] -> logits: scale·s (+ alpha·s on the penalised query_to_doc
    columns), -inf where masked (own query / own columns, guide g > threshold, duplicates of the positive; never
    the positive) and past n_cols."""
    c = cols[None, :]
    p = pos[:, None]
    x = s * scale
    if KIND == QUERY_TO_DOC:
        if HARDNESS == IN_BATCH_NEGATIVES:
            x = tl.where(c % num_positives != p, x + alpha * s, x)
        elif HARDNESS == HARD_NEGATIVES:
            x = tl.where((c % num_positives == p) & (c >= num_positives), x + alpha * s, x)
        elif HARDNESS == ALL_NEGATIVES:
            x = tl.where(c != p, x + alpha * s, x)
    masked = c >= n_cols
    if GUIDED:
        by_guide = g > threshold[:, None]
        if KIND == QUERY_TO_DOC:
            by_guide = by_guide & (c != p)
        masked = masked | by_guide
    elif KIND == QUERY_TO_QUERY:
        masked = masked | (c == own_query[:, None])
    elif KIND == DOC_TO_DOC:
        masked = masked | (c % num_positives == p)
    if HAS_IDS:
        if KIND == QUERY_TO_DOC or KIND == DOC_TO_DOC:
            ids = tl.load(ids_ptr + cols, mask=cols < n_cols, other=0)
            duplicate = ids[None, :] == pos_ids[:, None]
            if KIND == QUERY_TO_DOC:
                duplicate = duplicate & (c != p)
            masked = masked | duplicate
    return tl.where(masked, float("-inf"), x)


@triton.jit
def _positions(i, ok, offset, own_query_offset, ids_ptr, HAS_IDS: tl.constexpr):
    """Rows i [M] (ok: inside the batch) -> positive column, own query column, id of the positive."""
    pos = tl.where(ok, offset + i, offset)
    own_query = own_query_offset + i
    pos_ids = pos
    if HAS_IDS:
        pos_ids = tl.load(ids_ptr + pos, mask=ok, other=0)
    return pos, own_query, pos_ids


@triton.jit
def _guide_threshold(guide_pos, margin, RELATIVE_MARGIN: tl.constexpr):
    """The guide's positive similarity minus the margin (absolute, or relative to its magnitude)."""
    if RELATIVE_MARGIN:
        threshold = guide_pos - tl.abs(guide_pos) * margin
    else:
        threshold = guide_pos - margin
    return threshold


@triton.jit
def _online_logsumexp(m, total, x):
    """One [M, N] tile into the running row maximum m and sum total of exp(x - m) (all -inf rows stay 0)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    total = total * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), 1)
    return m_new, total


@triton.jit
def _partition(m_qd, t_qd, m_qq, t_qq, m_dq, t_dq, m_dd, t_dd, pos_logit, coef, JOINT: tl.constexpr,
               NUM_BLOCKS: tl.constexpr):
    """Per row, from each block's maximum m_b and sum t_b of exp(logit - m_b) (an absent or fully masked block:
    -inf, 0): the loss and the factors f_b with dL/ds_b = f_b·exp(logit - m_b) (+ the positive's term).
    joint: log Z = M + log Σ_b t_b·exp(m_b - M), f_b = coef·exp(m_b - log Z); per_direction (query_to_doc and
    doc_to_query): log Z = mean_b (m_b + log t_b), f_b = coef / t_b. Kept as shift + small logarithm, so that
    log Z - logit_pos and exp(m_b - log Z) keep their precision when the logits are large."""
    if JOINT:
        top = tl.maximum(tl.maximum(m_qd, m_qq), tl.maximum(m_dq, m_dd))  # finite: the positive is never masked
        log_total = tl.log(t_qd * tl.exp(m_qd - top) + t_qq * tl.exp(m_qq - top) + t_dq * tl.exp(m_dq - top)
                           + t_dd * tl.exp(m_dd - top))
        loss = (top - pos_logit) + log_total
        f_qd = coef * tl.exp((m_qd - top) - log_total)
        f_qq = coef * tl.exp((m_qq - top) - log_total)
        f_dq = coef * tl.exp((m_dq - top) - log_total)
        f_dd = coef * tl.exp((m_dd - top) - log_total)
    else:
        loss = (m_qd - pos_logit) + tl.log(t_qd)
        f_qd = coef / t_qd
        f_qq = tl.zeros_like(f_qd)
        f_dq = tl.zeros_like(f_qd)
        f_dd = tl.zeros_like(f_qd)
        if NUM_BLOCKS == 2:
            loss = (loss + (m_dq - pos_logit) + tl.log(t_dq)) / 2
            f_dq = coef / t_dq
    return loss, f_qd, f_qq, f_dq, f_dd


@triton.jit
def _softmax_grad(x, m, factor, pos_coef, cols, pos, KIND: tl.constexpr):
    """dL/ds of a logit tile: factor·exp(x - m) (m: the block's row maximum; 0 where the whole block is masked),
    minus pos_coef = scale/B at the positive (query_to_doc)."""
    shift = tl.where(m == float("-inf"), 0.0, m)
    grad = factor[:, None] * tl.exp(x - shift[:, None])
    if KIND == QUERY_TO_DOC:
        grad = tl.where(cols[None, :] == pos[:, None], grad - pos_coef, grad)
    return grad


# ---------------------------------------------------------------------------------------------------------------
# slab epilogue
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _slab_tile_logits(s_ptr, ld, g_ptr, ldg, n_cols, c0, r, row_ok, pos, own_query, threshold, ids_ptr, pos_ids,
                      num_positives, scale, alpha, KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr,
                      HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr):
    cols = c0 + tl.arange(0, BLOCK_N)
    inside = row_ok[:, None] & (cols[None, :] < n_cols)
    row = r[:, None].to(tl.int64)  # a slab block may hold more than 2^31 values
    s = tl.load(s_ptr + row * ld + cols[None, :], mask=inside, other=0.0)
    g = s
    if GUIDED:
        g = tl.load(g_ptr + row * ldg + cols[None, :], mask=inside, other=0.0)
    x = _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives, scale, alpha,
                       KIND, HARDNESS, GUIDED, HAS_IDS)
    return x, cols, inside


@triton.jit
def _slab_block_logsumexp(s_ptr, ld, g_ptr, ldg, n_cols, r, row_ok, pos, own_query, threshold, ids_ptr, pos_ids,
                          num_positives, scale, alpha, KIND: tl.constexpr, HARDNESS: tl.constexpr,
                          GUIDED: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          ACC: tl.constexpr):
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M], ACC)
    for c0 in range(0, n_cols, BLOCK_N):  # roofline: slab.epilogue_lse_read (the block read once)
        x, cols, inside = _slab_tile_logits(s_ptr, ld, g_ptr, ldg, n_cols, c0, r, row_ok, pos, own_query, threshold,
                                            ids_ptr, pos_ids, num_positives, scale, alpha, KIND, HARDNESS, GUIDED,
                                            HAS_IDS, BLOCK_N)
        m, total = _online_logsumexp(m, total, x)
    return m, total


@triton.jit
def _slab_block_grad(s_ptr, ld, g_ptr, ldg, n_cols, r, row_ok, pos, own_query, threshold, ids_ptr, pos_ids,
                     num_positives, scale, alpha, m, factor, pos_coef, KIND: tl.constexpr, HARDNESS: tl.constexpr,
                     GUIDED: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_N: tl.constexpr):
    for c0 in range(0, n_cols, BLOCK_N):
        x, cols, inside = _slab_tile_logits(s_ptr, ld, g_ptr, ldg, n_cols, c0, r, row_ok, pos, own_query, threshold,
                                            ids_ptr, pos_ids, num_positives, scale, alpha, KIND, HARDNESS, GUIDED,
                                            HAS_IDS, BLOCK_N)
        grad = _softmax_grad(x, m, factor, pos_coef, cols, pos, KIND)
        # roofline: slab.epilogue_grad_rmw (read again above, dL/ds written over it)
        tl.store(s_ptr + r[:, None].to(tl.int64) * ld + cols[None, :], grad, mask=inside)


@triton.jit
def _slab_epilogue_kernel(qd_ptr, qq_ptr, dq_ptr, dd_ptr, gqd_ptr, gqq_ptr, gdd_ptr, ids_ptr, params_ptr, loss_ptr,
                          ld_qd, ld_qq, ld_dq, ld_dd, ldg_qd, ldg_qq, ldg_dd, n_qd, n_qq, n_dq, n_dd,
                          rows, row0, num_positives, offset, own_query_offset,
                          HAS_QQ: tl.constexpr, HAS_DQ: tl.constexpr, HAS_DD: tl.constexpr, GUIDED: tl.constexpr,
                          HAS_IDS: tl.constexpr, HARDNESS: tl.constexpr, RELATIVE_MARGIN: tl.constexpr,
                          JOINT: tl.constexpr, NUM_BLOCKS: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ACC: tl.constexpr):
    """Rows r of the chunk (global rows row0 + r): losses, and the blocks overwritten with dL/ds."""
    r = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < rows
    pos, own_query, pos_ids = _positions(row0 + r, row_ok, offset, own_query_offset, ids_ptr, HAS_IDS)
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    threshold = tl.zeros([BLOCK_M], ACC)
    r64 = r.to(tl.int64)  # a slab block may hold more than 2^31 values
    if GUIDED:
        guide_pos = tl.load(gqd_ptr + r64 * ldg_qd + pos, mask=row_ok, other=0.0)
        threshold = _guide_threshold(guide_pos, tl.load(params_ptr + MARGIN), RELATIVE_MARGIN)
    pos_logit = scale * tl.load(qd_ptr + r64 * ld_qd + pos, mask=row_ok, other=0.0)
    m_qd, t_qd = _slab_block_logsumexp(qd_ptr, ld_qd, gqd_ptr, ldg_qd, n_qd, r, row_ok, pos, own_query, threshold,
                                       ids_ptr, pos_ids, num_positives, scale, alpha, QUERY_TO_DOC, HARDNESS, GUIDED,
                                       HAS_IDS, BLOCK_M, BLOCK_N, ACC)
    absent = tl.full([BLOCK_M], float("-inf"), ACC)
    m_qq, t_qq, m_dq, t_dq, m_dd, t_dd = absent, t_qd * 0, absent, t_qd * 0, absent, t_qd * 0
    if HAS_QQ:
        m_qq, t_qq = _slab_block_logsumexp(qq_ptr, ld_qq, gqq_ptr, ldg_qq, n_qq, r, row_ok, pos, own_query,
                                           threshold, ids_ptr, pos_ids, num_positives, scale, alpha, QUERY_TO_QUERY,
                                           HARDNESS, GUIDED, HAS_IDS, BLOCK_M, BLOCK_N, ACC)
    if HAS_DQ:
        m_dq, t_dq = _slab_block_logsumexp(dq_ptr, ld_dq, qd_ptr, 0, n_dq, r, row_ok, pos, own_query, threshold,
                                           ids_ptr, pos_ids, num_positives, scale, alpha, DOC_TO_QUERY, HARDNESS,
                                           False, HAS_IDS, BLOCK_M, BLOCK_N, ACC)
    if HAS_DD:
        m_dd, t_dd = _slab_block_logsumexp(dd_ptr, ld_dd, gdd_ptr, ldg_dd, n_dd, r, row_ok, pos, own_query,
                                           threshold, ids_ptr, pos_ids, num_positives, scale, alpha, DOC_TO_DOC,
                                           HARDNESS, GUIDED, HAS_IDS, BLOCK_M, BLOCK_N, ACC)
    loss, f_qd, f_qq, f_dq, f_dd = _partition(m_qd, t_qd, m_qq, t_qq, m_dq, t_dq, m_dd, t_dd, pos_logit,
                                              tl.load(params_ptr + COEF), JOINT, NUM_BLOCKS)
    tl.store(loss_ptr + r, loss, mask=row_ok)
    if COMPUTE_GRAD:
        pos_coef = tl.load(params_ptr + POS_COEF)
        _slab_block_grad(qd_ptr, ld_qd, gqd_ptr, ldg_qd, n_qd, r, row_ok, pos, own_query, threshold, ids_ptr,
                         pos_ids, num_positives, scale, alpha, m_qd, f_qd, pos_coef, QUERY_TO_DOC, HARDNESS, GUIDED,
                         HAS_IDS, BLOCK_N)
        if HAS_QQ:
            _slab_block_grad(qq_ptr, ld_qq, gqq_ptr, ldg_qq, n_qq, r, row_ok, pos, own_query, threshold, ids_ptr,
                             pos_ids, num_positives, scale, alpha, m_qq, f_qq, pos_coef, QUERY_TO_QUERY, HARDNESS,
                             GUIDED, HAS_IDS, BLOCK_N)
        if HAS_DQ:
            _slab_block_grad(dq_ptr, ld_dq, qd_ptr, 0, n_dq, r, row_ok, pos, own_query, threshold, ids_ptr,
                             pos_ids, num_positives, scale, alpha, m_dq, f_dq, pos_coef, DOC_TO_QUERY, HARDNESS,
                             False, HAS_IDS, BLOCK_N)
        if HAS_DD:
            _slab_block_grad(dd_ptr, ld_dd, gdd_ptr, ldg_dd, n_dd, r, row_ok, pos, own_query, threshold, ids_ptr,
                             pos_ids, num_positives, scale, alpha, m_dd, f_dd, pos_coef, DOC_TO_DOC, HARDNESS,
                             GUIDED, HAS_IDS, BLOCK_N)


def _scalars(dtype: torch.dtype, device: torch.device, params, grad_scale: float = 1.0, weight: float = 1.0) -> Tensor:
    """The kernels' floating-point scalars (indexed by SCALE, ALPHA, MARGIN, COEF, POS_COEF, GRAD_SCALE,
    FILTER_THRESHOLD) from the op's KernelParams ``params`` (fastcache/ops/contrastive/options.py: kernel_params);
    ``weight`` multiplies the gradient coefficients and the filter threshold (a Matryoshka dim's weight)."""
    values = [params.scale, params.hardness_strength, params.margin, weight * params.coef, weight * params.pos_coef,
              grad_scale, weight * params.filter_threshold]
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


def _acc_type(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _Tuned:
    """A tiled kernel launched with the best of its variant's configurations: ``table[element size of r_ptr,
    GUIDED]`` (triton.Config), BLOCK_DO narrowed to what ``dim`` needs (at least 16, tl.dot's smallest). On a GPU
    triton.autotune times them at the first launch of each dim, variant (KEY) and set of dtypes, restoring the
    ``restore`` arguments after its timing runs; under the Triton interpreter the first one runs, untimed (fast,
    deterministic tests). ``kernel[grid](...)`` as for a plain kernel, the grid a function of the config."""

    KEY = ("dim", "KIND", "GUIDED", "HAS_IDS", "HARDNESS", "BY_COLUMNS", "WITH_DOC_TO_QUERY", "FILTER")

    def __init__(self, fn, table: dict, restore: tuple[str, ...] = ()):
        self.fn, self.table = fn, table
        every = [config for configs in table.values() for config in configs]
        self.tuner = None if isinstance(fn, InterpretedFunction) else triton.autotune(
            every, key=list(self.KEY), restore_value=list(restore),
            prune_configs_by={"early_config_prune": lambda _, named, **kwargs: self.configs({**named, **kwargs})})(fn)

    def configs(self, arguments: dict) -> list:
        """The candidate configurations of a launch (``arguments``: every argument by name)."""
        width = max(16, triton.next_power_of_2(arguments["dim"]))
        fitted = []
        for config in self.table[arguments["r_ptr"].element_size(), bool(arguments["GUIDED"])]:
            tiles = dict(config.kwargs)
            if "BLOCK_DO" in tiles:
                tiles["BLOCK_DO"] = min(tiles["BLOCK_DO"], width)
            fitted.append(triton.Config(tiles, num_warps=config.num_warps, num_stages=config.num_stages))
        return fitted

    def candidates(self, args: tuple, kwargs: dict) -> list[dict]:
        """The launch kwargs of each candidate configuration of a launch (for bench/triton_compile.py)."""
        named = {**dict(zip(self.fn.arg_names, args)), **kwargs}
        return [{**kwargs, **config.all_kwargs()} for config in self.configs(named)]

    def __getitem__(self, grid):
        if self.tuner is not None:
            return self.tuner[grid]

        def first(*args, **kwargs):
            config = self.configs({**dict(zip(self.fn.arg_names, args)), **kwargs})[0]
            return self.fn[grid](*args, **kwargs, **config.all_kwargs())
        return first


def slab_epilogue(blocks: dict[int, Tensor], guides: dict[int, Tensor], doc_ids: Tensor | None, params) -> Tensor:
    """The Triton slab epilogue (contract: fastcache/ops/contrastive/epilogue.py); float32/float64 blocks and guides
    keyed by their direction's code (Kind: QUERY_TO_DOC.value ...), the options as the op's KernelParams ``params``."""
    qd = blocks[QUERY_TO_DOC.value]
    for name, t in [*blocks.items(), *guides.items()]:
        if t.dtype != qd.dtype or t.size(0) != qd.size(0) or t.stride(1) != 1:
            raise ValueError(f"block {name} must be [{qd.size(0)}, columns] {qd.dtype}, contiguous along columns")
    rows = qd.size(0)
    scalars = _scalars(qd.dtype, qd.device, params)
    loss = torch.empty(rows, dtype=qd.dtype, device=qd.device)
    ordered = [blocks.get(k, qd) for k in (QUERY_TO_DOC.value, QUERY_TO_QUERY.value, DOC_TO_QUERY.value,
                                              DOC_TO_DOC.value)]
    guide_blocks = [guides.get(k, qd) for k in (QUERY_TO_DOC.value, QUERY_TO_QUERY.value, DOC_TO_DOC.value)]
    ids = doc_ids if doc_ids is not None else qd
    _slab_epilogue_kernel[(triton.cdiv(rows, EPILOGUE_BLOCK_M),)](
        *ordered, *guide_blocks, ids, scalars, loss,
        *(t.stride(0) for t in ordered), *(t.stride(0) for t in guide_blocks), *(t.size(1) for t in ordered),
        rows, params.row0, params.num_positives, params.offset, params.own_query_offset,
        HAS_QQ=QUERY_TO_QUERY.value in blocks, HAS_DQ=DOC_TO_QUERY.value in blocks,
        HAS_DD=DOC_TO_DOC.value in blocks,
        GUIDED=bool(guides), HAS_IDS=doc_ids is not None, HARDNESS=int(params.hardness_mode),
        RELATIVE_MARGIN=bool(params.margin_strategy), JOINT=params.joint,
        NUM_BLOCKS=len(blocks), COMPUTE_GRAD=params.compute_grad, BLOCK_M=EPILOGUE_BLOCK_M, BLOCK_N=EPILOGUE_BLOCK_N,
        ACC=_acc_type(qd.dtype), num_warps=EPILOGUE_WARPS)
    return loss


# ---------------------------------------------------------------------------------------------------------------
# tiled strategy
# ---------------------------------------------------------------------------------------------------------------

@triton.jit
def _dot(a, b, acc, WIDEN: tl.constexpr, ACC: tl.constexpr):
    """acc + a·b with full-precision fp32 products (no TF32). WIDEN: bfloat16 operands go through fp32, for the
    Triton interpreter, whose tl.dot multiplies bfloat16 bit patterns as integers (bf16 products are exact in
    fp32, so the result is the GPU's bf16 product with fp32 accumulation)."""
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)


@triton.jit
def _similarity_tile(a_ptr, b_ptr, stride_a, stride_b, rows, cols, n_rows, n_cols, dim, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """[M, N] tile of a·bᵀ (rows of a, rows of b), accumulated over dim in ACC."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    # roofline: gemm.product, tiled.tile_operand_l2 (both strips over all D), tiled.swept_operand_hbm (per wave)
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_a + k[None, :],
                    mask=(rows[:, None] < n_rows) & (k[None, :] < dim), other=0.0)
        b = tl.load(b_ptr + cols[None, :].to(tl.int64) * stride_b + k[:, None],
                    mask=(cols[None, :] < n_cols) & (k[:, None] < dim), other=0.0)
        acc = _dot(a, b, acc, WIDEN, ACC)
    return acc


@triton.jit
def _tile_logits(r_ptr, c_ptr, gr_ptr, gc_ptr, stride_r, stride_c, stride_gr, stride_gc, rows, cols, n_rows, n_cols,
                 dim, guide_dim, pos, own_query, threshold, ids_ptr, pos_ids, num_positives, scale, alpha,
                 KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
                 WIDEN: tl.constexpr):
    """The similarities and the logits of one [M, N] tile of a block, recomputed from the embeddings (and the
    guide's)."""
    s = _similarity_tile(r_ptr, c_ptr, stride_r, stride_c, rows, cols, n_rows, n_cols, dim, BLOCK_M, BLOCK_N,
                         BLOCK_K, ACC, WIDEN)
    g = s
    if GUIDED:
        g = _similarity_tile(gr_ptr, gc_ptr, stride_gr, stride_gc, rows, cols, n_rows, n_cols, guide_dim, BLOCK_M,
                             BLOCK_N, BLOCK_K, ACC, False)
    return s, _masked_logits(s, g, cols, n_cols, pos, own_query, threshold, ids_ptr, pos_ids, num_positives, scale,
                             alpha, KIND, HARDNESS, GUIDED, HAS_IDS)


@triton.jit
def _tile_rows(r0, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr, margin, HAS_IDS: tl.constexpr,
               GUIDED: tl.constexpr, RELATIVE_MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, ACC: tl.constexpr):
    """Rows r0 .. r0+BLOCK_M-1: indices, inside-the-batch mask, positive and own query columns, ids, threshold."""
    rows = r0 + tl.arange(0, BLOCK_M)
    ok = rows < n_rows
    pos, own_query, pos_ids = _positions(rows, ok, offset, own_query_offset, ids_ptr, HAS_IDS)
    threshold = tl.zeros([BLOCK_M], ACC)
    if GUIDED:
        threshold = _guide_threshold(tl.load(gpos_ptr + rows, mask=ok, other=0.0), margin, RELATIVE_MARGIN)
    return rows, ok, pos, own_query, pos_ids, threshold


@triton.jit
def _tiled_logsumexp_kernel(r_ptr, c_ptr, gr_ptr, gc_ptr, ids_ptr, gpos_ptr, params_ptr, stride_r, stride_c,
                            stride_gr, stride_gc, n_rows, n_cols, dim, guide_dim, num_positives, offset,
                            own_query_offset, max_ptr, total_ptr, pos_logit_ptr,
                            KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                            RELATIVE_MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr):
    """Forward, row-parallel: per row, the maximum and the sum of exp(logit - maximum) of one block's logits, and
    (query_to_doc) the positive's logit."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    rows, ok, pos, own_query, pos_ids, threshold = _tile_rows(
        tl.program_id(0) * BLOCK_M, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr,
        tl.load(params_ptr + MARGIN), HAS_IDS, GUIDED, RELATIVE_MARGIN, BLOCK_M, ACC)
    m = tl.full([BLOCK_M], float("-inf"), ACC)
    total = tl.zeros([BLOCK_M], ACC)
    pos_logit = tl.zeros([BLOCK_M], ACC)
    for c0 in range(0, n_cols, BLOCK_N):
        cols = c0 + tl.arange(0, BLOCK_N)
        s, x = _tile_logits(r_ptr, c_ptr, gr_ptr, gc_ptr, stride_r, stride_c, stride_gr, stride_gc, rows, cols,
                            n_rows, n_cols, dim, guide_dim, pos, own_query, threshold, ids_ptr, pos_ids,
                            num_positives, scale, alpha, KIND, HARDNESS, GUIDED, HAS_IDS, BLOCK_M, BLOCK_N, BLOCK_K,
                            ACC, WIDEN)
        m, total = _online_logsumexp(m, total, x)
        if KIND == QUERY_TO_DOC:
            pos_logit += tl.sum(tl.where(cols[None, :] == pos[:, None], x, 0.0), 1)
    tl.store(max_ptr + rows, m, mask=ok)
    tl.store(total_ptr + rows, total, mask=ok)
    if KIND == QUERY_TO_DOC:
        tl.store(pos_logit_ptr + rows, pos_logit, mask=ok)


_tiled_logsumexp_kernel = _Tuned(_tiled_logsumexp_kernel, FORWARD_CONFIGS)


@triton.jit
def _tiled_partition_kernel(max_ptr, total_ptr, pos_logit_ptr, params_ptr, loss_ptr, factor_ptr, n_rows,
                            JOINT: tl.constexpr, NUM_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """Per row, from the [4, B] block statistics (rows in Kind order): the loss and the [4, B] factors."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = rows < n_rows
    m_qd = tl.load(max_ptr + rows, mask=ok, other=0.0)
    t_qd = tl.load(total_ptr + rows, mask=ok, other=1.0)
    m_qq = tl.load(max_ptr + n_rows + rows, mask=ok, other=0.0)
    t_qq = tl.load(total_ptr + n_rows + rows, mask=ok, other=1.0)
    m_dq = tl.load(max_ptr + 2 * n_rows + rows, mask=ok, other=0.0)
    t_dq = tl.load(total_ptr + 2 * n_rows + rows, mask=ok, other=1.0)
    m_dd = tl.load(max_ptr + 3 * n_rows + rows, mask=ok, other=0.0)
    t_dd = tl.load(total_ptr + 3 * n_rows + rows, mask=ok, other=1.0)
    pos_logit = tl.load(pos_logit_ptr + rows, mask=ok, other=0.0)
    loss, f_qd, f_qq, f_dq, f_dd = _partition(m_qd, t_qd, m_qq, t_qq, m_dq, t_dq, m_dd, t_dd, pos_logit,
                                              tl.load(params_ptr + COEF), JOINT, NUM_BLOCKS)
    tl.store(loss_ptr + rows, loss, mask=ok)
    tl.store(factor_ptr + rows, f_qd, mask=ok)
    tl.store(factor_ptr + n_rows + rows, f_qq, mask=ok)
    tl.store(factor_ptr + 2 * n_rows + rows, f_dq, mask=ok)
    tl.store(factor_ptr + 3 * n_rows + rows, f_dd, mask=ok)


@triton.jit
def _sweep_tile(own0, start, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr, margin, HAS_IDS: tl.constexpr,
                GUIDED: tl.constexpr, RELATIVE_MARGIN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                ACC: tl.constexpr, BY_COLUMNS: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of a backward program at sweep position start: its own rows from own0 and
    columns from start (row-parallel), or rows from start and its own columns from own0 (BY_COLUMNS); the rows'
    positions, ids and guide thresholds as _tile_rows gives them, then the column indices."""
    if BY_COLUMNS:
        r0 = start
        c0 = own0
    else:
        r0 = own0
        c0 = start
    rows, ok, pos, own_query, pos_ids, threshold = _tile_rows(r0, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr,
                                                              margin, HAS_IDS, GUIDED, RELATIVE_MARGIN, BLOCK_M, ACC)
    return rows, ok, pos, own_query, pos_ids, threshold, c0 + tl.arange(0, BLOCK_N)


@triton.jit
def _doc_to_query_grad(s, rows_ok, cols, offset, n_rows, scale, dq_max_ptr, dq_factor_ptr):
    """doc_to_query's dL/ds laid onto a query_to_doc tile of similarities s: s_dq[i, k] = s_qd[k, offset + i], so
    G_dq[j - offset, k] at [k, j] (from doc_to_query's row maxima and factors), 0 off its B columns."""
    i = cols - offset
    partner = (i >= 0) & (i < n_rows)
    dq_max = tl.load(dq_max_ptr + i, mask=partner, other=0.0)
    dq_factor = tl.load(dq_factor_ptr + i, mask=partner, other=0.0)
    return tl.where(rows_ok[:, None] & partner[None, :], dq_factor[None, :] * tl.exp(scale * s - dq_max[None, :]),
                    0.0)


@triton.jit
def _tiled_grad_kernel(r_ptr, c_ptr, gr_ptr, gc_ptr, ids_ptr, gpos_ptr, params_ptr, stride_r, stride_c, stride_gr,
                       stride_gc, n_rows, n_cols, dim, guide_dim, num_positives, offset, own_query_offset, max_ptr,
                       factor_ptr, out_ptr, stride_out, dq_max_ptr, dq_factor_ptr, scratch_ptr, flags_ptr, counts_ptr,
                       stride_counts,
                       KIND: tl.constexpr, HARDNESS: tl.constexpr, GUIDED: tl.constexpr, HAS_IDS: tl.constexpr,
                       RELATIVE_MARGIN: tl.constexpr, ACC: tl.constexpr, WIDEN: tl.constexpr, BY_COLUMNS: tl.constexpr,
                       WITH_DOC_TO_QUERY: tl.constexpr, FILTER: tl.constexpr, OWN: tl.constexpr,
                       SWEPT: tl.constexpr, PASS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DO: tl.constexpr):
    """Backward of one block: program i owns OWN rows (columns, BY_COLUMNS) from i·OWN and sweeps the other side
    PASS at a time, in two phases per pass:

    1. G' = grad_scale·dL/ds of the pass's [OWN, PASS] tiles, SWEPT swept at a time, each similarity tile
       recomputed over the full D; stored in the embeddings' dtype (a power of two that keeps 16-bit entries above
       fp16's smallest subnormal; the host divides the sums by it) to the program's scratch, scratch_ptr +
       i·OWN·PASS (rows of PASS values, transposed BY_COLUMNS: the own side first).
    2. a GEMM of the scratch against the pass's swept embeddings, BLOCK_DO output dims at a time: an fp32
       [OWN, BLOCK_DO] accumulator in registers over the pass's PASS swept rows, then added to out[own, dims]
       once (a read-modify-write per pass, not per tile; rows no other program touches, a fixed order: no
       atomics, deterministic).

    WITH_DOC_TO_QUERY (query_to_doc when the query columns are the queries themselves): doc_to_query's gradient
    (_doc_to_query_grad) is added to G, which gives both of doc_to_query's gradients (dp = G_dq·q, dq = G_dqᵀ·p)
    in the same pass.

    FILTER (the gradient filter): a SWEPT tile whose largest |G| is below FILTER_THRESHOLD adds nothing (its
    product is skipped: its flag at flags_ptr + i·(PASS / SWEPT) is 0); the program stores its skipped and swept
    tile counts at counts_ptr[i] and counts_ptr[stride_counts + i]."""
    scale = tl.load(params_ptr + SCALE)
    alpha = tl.load(params_ptr + ALPHA)
    margin = tl.load(params_ptr + MARGIN)
    pos_coef = tl.load(params_ptr + POS_COEF)
    grad_scale = tl.load(params_ptr + GRAD_SCALE)
    if BY_COLUMNS:
        BLOCK_M: tl.constexpr = SWEPT
        BLOCK_N: tl.constexpr = OWN
        n_swept, n_own, e_ptr, stride_e = n_rows, n_cols, r_ptr, stride_r
    else:
        BLOCK_M: tl.constexpr = OWN
        BLOCK_N: tl.constexpr = SWEPT
        n_swept, n_own, e_ptr, stride_e = n_cols, n_rows, c_ptr, stride_c
    TILES: tl.constexpr = PASS // SWEPT
    program = tl.program_id(0)
    own0 = program * OWN
    own = own0 + tl.arange(0, OWN)
    swept_in_tile = tl.arange(0, SWEPT)
    scratch = scratch_ptr + program.to(tl.int64) * (OWN * PASS) + tl.arange(0, OWN)[:, None] * PASS
    flags = flags_ptr + program * TILES
    skipped = tl.full([], 0, tl.int32)
    tiles = tl.full([], 0, tl.int32)
    for p0 in range(0, n_swept, PASS):
        width = tl.minimum(PASS, n_swept - p0)
        for t0 in range(0, width, SWEPT):  # 1. the pass's G' into the scratch
            rows, ok, pos, own_query, pos_ids, threshold, cols = _sweep_tile(
                own0, p0 + t0, n_rows, offset, own_query_offset, ids_ptr, gpos_ptr, margin, HAS_IDS, GUIDED,
                RELATIVE_MARGIN, BLOCK_M, BLOCK_N, ACC, BY_COLUMNS)
            s, x = _tile_logits(r_ptr, c_ptr, gr_ptr, gc_ptr, stride_r, stride_c, stride_gr, stride_gc, rows, cols,
                                n_rows, n_cols, dim, guide_dim, pos, own_query, threshold, ids_ptr, pos_ids,
                                num_positives, scale, alpha, KIND, HARDNESS, GUIDED, HAS_IDS, BLOCK_M, BLOCK_N,
                                BLOCK_K, ACC, WIDEN)
            m = tl.load(max_ptr + rows, mask=ok, other=0.0)
            factor = tl.load(factor_ptr + rows, mask=ok, other=0.0)  # rows past the batch: R = 0, never stored
            grad = _softmax_grad(x, m, factor, pos_coef, cols, pos, KIND)
            if WITH_DOC_TO_QUERY:
                grad += _doc_to_query_grad(s, ok, cols, offset, n_rows, scale, dq_max_ptr, dq_factor_ptr)
            if FILTER:
                kept = tl.max(tl.abs(grad)) >= tl.load(params_ptr + FILTER_THRESHOLD)
                tl.store(flags + t0 // SWEPT, kept.to(tl.int32))
                skipped += tl.where(kept, 0, 1)
                tiles += 1
            g = (grad * grad_scale).to(e_ptr.dtype.element_ty)
            if BY_COLUMNS:
                g = tl.trans(g)
            # roofline: tiled.grad_scratch_l2 (stored once here, loaded once per BLOCK_DO dims below)
            tl.store(scratch + t0 + swept_in_tile[None, :], g)
        tl.debug_barrier()  # the scratch stores land before the loads below
        for o in range(0, dim, BLOCK_DO):  # 2. out[own, dims] += G'·E[pass, dims]
            dims = o + tl.arange(0, BLOCK_DO)
            dim_ok = dims < dim
            acc = tl.zeros([OWN, BLOCK_DO], ACC)
            for t0 in range(0, width, SWEPT):
                swept = p0 + t0 + swept_in_tile
                # roofline: gemm.product, tiled.product_operand_l2 (the swept embeddings again, once per pass)
                e = tl.load(e_ptr + swept[:, None].to(tl.int64) * stride_e + dims[None, :],
                            mask=(swept < n_swept)[:, None] & dim_ok[None, :], other=0.0)
                g = tl.load(scratch + t0 + swept_in_tile[None, :])
                if FILTER:
                    if tl.load(flags + t0 // SWEPT) != 0:
                        acc = _dot(g, e, acc, WIDEN, ACC)
                else:
                    acc = _dot(g, e, acc, WIDEN, ACC)
            out = out_ptr + own[:, None].to(tl.int64) * stride_out + dims[None, :]
            held = (own < n_own)[:, None] & dim_ok[None, :]
            # roofline: tiled.grad_rmw_per_pass (the own fp32 gradient rows read and written once per pass)
            tl.store(out, tl.load(out, mask=held, other=0.0) + acc, mask=held)
        tl.debug_barrier()  # this pass's scratch loads are done before the next pass's stores
    if FILTER:
        tl.store(counts_ptr + program, skipped)
        tl.store(counts_ptr + stride_counts + program, tiles)


_tiled_grad_kernel = _Tuned(_tiled_grad_kernel, BACKWARD_CONFIGS, restore=("out_ptr",))
