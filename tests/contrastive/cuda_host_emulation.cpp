// Test support: the CUDA epilogue kernel (csrc/cuda/contrastive_epilogue_kernel.cuh) and its torch binding
// (csrc/cuda/contrastive_epilogue_torch.cpp, accepting CPU tensors here) compiled for the host, with CUDA's built-in
// names emulated by std::threads (cuda_host_emulation.h), so that the maths is checked on machines without a GPU
// (tests/contrastive/test_cuda_host_emulation.py). A thread block per row, the rows one after another.
#include <torch/extension.h>

#include "cuda_host_emulation.h"
#include "params_binding.h"  // the one conversion of Python's KernelParams into ContrastiveParams

#include "cuda/contrastive_epilogue_kernel.cuh"
// the binding itself, its device check turned to CPU tensors: it calls the launchers defined below
#define FASTCACHE_CUDA_HOST_EMULATION
#include "cuda/contrastive_epilogue_torch.cpp"

namespace fastcache {
namespace cuda {
namespace {

// The launcher API of contrastive_epilogue.h, run on the host: each row's thread block as `threads` std::threads.
int emulated_threads = 64;

template <typename T>
const char* launch_on_host(const EpilogueBlock<T>* blocks, int num_blocks, int64_t rows,
                           const ContrastiveParams& params, T* loss) {
  Blocks<T> all{};
  all.count = num_blocks;
  for (int k = 0; k < num_blocks; ++k) all.b[k] = blocks[k];
  emulation::run_grid(rows, emulated_threads, [&] { contrastive_epilogue_kernel<T>(all, params, loss); });
  return nullptr;
}

}  // namespace

const char* contrastive_epilogue_f32(const EpilogueBlock<float>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, float* loss, int, CUstream_st*) {
  return launch_on_host(blocks, num_blocks, rows, params, loss);
}

const char* contrastive_epilogue_f64(const EpilogueBlock<double>* blocks, int num_blocks, int64_t rows,
                                     const ContrastiveParams& params, double* loss, int, CUstream_st*) {
  return launch_on_host(blocks, num_blocks, rows, params, loss);
}

}  // namespace cuda
}  // namespace fastcache

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("contrastive_epilogue_cuda", &fastcache::contrastive_epilogue_cuda,
        "the binding of csrc/cuda on CPU tensors, its kernel run on emulated CUDA threads (test support)");
  m.def("set_threads", [](int threads) {
    TORCH_CHECK(threads >= 32 && threads % 32 == 0 && threads <= emulation::kMaxEmulatedThreads,
                "threads must be a multiple of 32 up to ", emulation::kMaxEmulatedThreads);
    fastcache::cuda::emulated_threads = threads;
  }, "CUDA threads per row (per thread block) of the following calls");
}
