// Test support: the CUDA epilogue kernel (csrc/cuda/contrastive_epilogue_kernel.cuh) and its torch binding
// (csrc/cuda/contrastive_epilogue_torch.cpp, accepting CPU tensors here) compiled for the host, with CUDA's built-in
// names emulated by std::threads, so that the maths is checked on machines without a GPU
// (tests/test_cuda_host_emulation.py). One std::thread per CUDA thread; a thread block's rows run one after another;
// __syncthreads is a barrier of the block's threads and __shfl_xor_sync exchanges through a per-block buffer between
// two barriers (valid because the kernel calls it uniformly, with every lane of every warp).
#include <torch/extension.h>

#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

using std::exp;
using std::fabs;
using std::log;

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};

namespace emulation {

class Barrier {
 public:
  void reset(int count) { count_ = count, waiting_ = 0; }
  void wait() {
    std::unique_lock<std::mutex> lock(mutex_);
    const int64_t generation = generation_;
    if (++waiting_ == count_) {
      waiting_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != generation; });
    }
  }

 private:
  std::mutex mutex_;
  std::condition_variable cv_;
  int count_ = 0, waiting_ = 0;
  int64_t generation_ = 0;
};

Barrier barrier;
constexpr int kMaxEmulatedThreads = 1024;

}  // namespace emulation

thread_local EmulatedDim3 threadIdx, blockIdx;
EmulatedDim3 blockDim;

inline void __syncthreads() { emulation::barrier.wait(); }

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask) {
  static T exchange[emulation::kMaxEmulatedThreads];
  exchange[threadIdx.x] = value;
  emulation::barrier.wait();
  const T other = exchange[threadIdx.x ^ lane_mask];
  emulation::barrier.wait();
  return other;
}

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

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
const char* launch_on_host(const EpilogueBlock<T>* blocks, int num_blocks, const EpilogueParams& params, T* loss) {
  Blocks<T> all{};
  all.count = num_blocks;
  for (int k = 0; k < num_blocks; ++k) all.b[k] = blocks[k];
  blockDim.x = static_cast<unsigned>(emulated_threads);
  emulation::barrier.reset(emulated_threads);
  for (int64_t r = 0; r < params.rows; ++r) {
    std::vector<std::thread> block;
    for (int t = 0; t < emulated_threads; ++t) {
      block.emplace_back([&, r, t] {
        blockIdx.x = static_cast<unsigned>(r);
        threadIdx.x = static_cast<unsigned>(t);
        contrastive_epilogue_kernel<T>(all, params, loss);
      });
    }
    for (auto& thread : block) thread.join();
  }
  return nullptr;
}

}  // namespace

const char* contrastive_epilogue_f32(const EpilogueBlock<float>* blocks, int num_blocks, const EpilogueParams& params,
                                     float* loss, int, CUstream_st*) {
  return launch_on_host(blocks, num_blocks, params, loss);
}

const char* contrastive_epilogue_f64(const EpilogueBlock<double>* blocks, int num_blocks,
                                     const EpilogueParams& params, double* loss, int, CUstream_st*) {
  return launch_on_host(blocks, num_blocks, params, loss);
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
