"""The CUDA epilogue kernel's maths without a GPU: csrc/cuda/contrastive_epilogue_kernel.cuh and its binding
compiled for the host with CUDA's thread names emulated (tests/contrastive/cuda_host_emulation.cpp: one std::thread per CUDA
thread, barriers for __syncthreads and __shfl_xor_sync), against the pure-PyTorch epilogue on the same blocks: every direction set,
partition and hardness mode, guides with both margin strategies, duplicate ids, gathered offsets, NaN-padded
blocks, fully masked blocks, float32 and float64, several thread-block sizes (one warp, several warps, a row
shorter than the block). The real kernel on a GPU: tests/contrastive/test_contrastive_cuda.py."""

from __future__ import annotations


import pytest
import torch

from fastcache.ops.contrastive import epilogue as contrastive_epilogue
from fastcache.ops.contrastive import ContrastiveOptions
from helpers import load_host_emulation
from test_contrastive_cuda import DD, DIRECTION_SETS, DQ, HARDNESS_MODES, QD, QQ, _case, _compare

# (gathered, ids, NaN-padded, compute_grad): a spread of the 16 combinations (each thread is a real std::thread)
VARIANTS = [(False, False, False, True), (True, True, True, True), (True, False, True, False),
            (False, True, False, True)]


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """The emulated kernel as an epilogue (the contract of fastcache.ops.contrastive.epilogue), ``threads`` CUDA
    threads per row."""
    module = load_host_emulation("contrastive/cuda_host_emulation.cpp", tmp_path_factory.mktemp("cuda_host_emulation"))

    def epilogue_with(threads: int):
        def epilogue(blocks, guides, doc_ids, row0, layout, options, compute_grad):
            arguments = contrastive_epilogue._compiled_arguments(blocks, guides, doc_ids, row0, layout, options,
                                                                 compute_grad)
            module.set_threads(threads)
            return module.contrastive_epilogue_cuda(*arguments, 0)  # stream 0: unused on the host
        return epilogue

    return epilogue_with


# per_direction needs every direction to hold the positive: not with query_to_query or doc_to_doc
LAYOUTS = [(d, p) for d in DIRECTION_SETS for p in ("joint", "per_direction")
           if p == "joint" or not {QQ, DD} & set(d)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("directions,partition_mode", LAYOUTS,
                         ids=lambda v: v if isinstance(v, str) else "+".join(x[0] + x[-3] for x in v))
def test_every_option(emulated, dtype, directions, partition_mode):
    for hardness_mode in HARDNESS_MODES:
        for gathered, ids, pad, compute_grad in VARIANTS:
            options = ContrastiveOptions(scale=20.0, directions=directions, partition_mode=partition_mode,
                                         hardness_mode=hardness_mode, hardness_strength=2.5 if hardness_mode else 0.0,
                                         offset=3 if gathered else 0)
            data = _case(3, 5, 11, 17 if gathered else 11, 3, options, guided=False, ids=ids, gathered=gathered,
                         seed=1, device="cpu")
            _compare(*data[:3], 5, data[3], options, dtype, pad, compute_grad, epilogue=emulated(64))


@pytest.mark.parametrize("directions", [(QD,), (QD, QQ, DD)], ids=str)
@pytest.mark.parametrize("margin_strategy", ["absolute", "relative"])
def test_guided(emulated, directions, margin_strategy):
    for hardness_mode, ids, pad in [(None, False, False), ("all_negatives", True, True)]:
        options = ContrastiveOptions(scale=20.0, directions=directions, margin=0.1, margin_strategy=margin_strategy,
                                     hardness_mode=hardness_mode, hardness_strength=1.5 if hardness_mode else 0.0)
        data = _case(3, 2, 9, 9, 2, options, guided=True, ids=ids, gathered=False, seed=2, device="cpu")
        _compare(*data[:3], 2, data[3], options, torch.float32, pad, True, epilogue=emulated(64))


# (chunk, rows, positives, columns, threads): one column and one warp; everything masked in doc_to_doc; a row
# longer than threads × unroll (several passes of the unrolled loop); fewer columns than threads
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 32), (1, 1, 1, 4, 64), (2, 3, 700, 2, 64), (3, 3, 5, 2, 128)],
                         ids=str)
def test_shapes_and_block_sizes(emulated, shape):
    chunk, rows, positives, columns, threads = shape
    options = ContrastiveOptions(scale=7.0, directions=(QD, QQ, DQ, DD), hardness_mode="hard_negatives",
                                 hardness_strength=1.0, offset=positives - rows)
    data = _case(chunk, rows - chunk, rows, positives, columns, options, guided=False, ids=True,
                 gathered=positives != rows, seed=3, device="cpu")
    _compare(*data[:3], rows - chunk, data[3], options, torch.float64, True, True, epilogue=emulated(threads))
