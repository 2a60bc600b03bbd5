// Fused softmax-gradient epilogue of the contrastive loss on CUDA: the launcher (contrastive_epilogue.h's API).
// The kernel and its maths (those of csrc/cpu/contrastive.cpp) are in contrastive_epilogue_kernel.cuh.
#include "contrastive_epilogue.h"

#include <cuda_runtime.h>

#include <cstdint>

#include "contrastive_epilogue_kernel.cuh"

namespace fastcache {
namespace cuda {
namespace {

int threads_for(int64_t columns) {
  int threads = 128;
  while (threads < kMaxThreads && columns > 2 * kUnroll * static_cast<int64_t>(threads)) threads *= 2;
  return threads;
}

template <typename T>
const char* launch(const EpilogueBlock<T>* blocks, int num_blocks, int64_t rows, const ContrastiveParams& params,
                   T* loss, int device, CUstream_st* stream) {
  if (num_blocks < 1 || num_blocks > kMaxBlocks) return "contrastive_epilogue: num_blocks must be 1 to 4";
  if (rows == 0) return nullptr;
  Blocks<T> all{};
  all.count = num_blocks;
  int64_t columns = 0;
  for (int k = 0; k < num_blocks; ++k) {
    if (blocks[k].columns < 1 || blocks[k].columns > INT32_MAX) return "contrastive_epilogue: 1 to 2^31-1 columns";
    all.b[k] = blocks[k];
    columns += blocks[k].columns;
  }
  if (params.num_positives < 1 || params.num_positives > INT32_MAX)
    return "contrastive_epilogue: num_positives must be 1 to 2^31-1";
  int previous = -1;
  cudaError_t error = cudaGetDevice(&previous);
  if (error == cudaSuccess && previous != device) error = cudaSetDevice(device);
  if (error == cudaSuccess) {
    contrastive_epilogue_kernel<T><<<static_cast<unsigned>(rows), threads_for(columns), 0, stream>>>(
        all, params, loss);
    error = cudaGetLastError();
  }
  if (previous >= 0 && previous != device) {
    const cudaError_t restore = cudaSetDevice(previous);
    if (error == cudaSuccess) error = restore;
  }
  return error == cudaSuccess ? nullptr : cudaGetErrorString(error);
}

}  // namespace

const char* contrastive_epilogue_f32(const EpilogueBlock<float>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, float* loss, int device, CUstream_st* stream) {
  return launch(blocks, num_blocks, rows, params, loss, device, stream);
}

const char* contrastive_epilogue_f64(const EpilogueBlock<double>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, double* loss, int device, CUstream_st* stream) {
  return launch(blocks, num_blocks, rows, params, loss, device, stream);
}

}  // namespace cuda
}  // namespace fastcache
