// Test support: the CUDA epilogue kernel (csrc/cuda/contrastive_epilogue_kernel.cuh) compiled for the host, with
// CUDA's built-in names emulated by std::threads, so that its maths is checked on machines without a GPU
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

namespace {

namespace kernel = fastcache::cuda;

template <typename T>
kernel::EpilogueBlock<T> host_block(const std::optional<at::Tensor>& s, const std::optional<at::Tensor>& guide,
                                    const int64_t* ids, int kind) {
  kernel::EpilogueBlock<T> b{};
  b.s = s->data_ptr<T>();
  b.ld = s->stride(0);
  b.columns = s->size(1);
  b.kind = kind;
  b.ids = ids;
  if (guide) {
    b.guide = guide->data_ptr<T>();
    b.guide_ld = guide->stride(0);
  }
  return b;
}

// The kernel on CPU tensors, ``threads`` emulated CUDA threads per row; the binding's arguments without the stream.
// No argument checks (tests/test_contrastive_cuda.py checks the real binding's): the tests pass valid blocks.
at::Tensor emulate(at::Tensor query_to_doc, std::optional<at::Tensor> query_to_query,
                   std::optional<at::Tensor> doc_to_query, std::optional<at::Tensor> doc_to_doc,
                   std::optional<at::Tensor> guide_query_to_doc, std::optional<at::Tensor> guide_query_to_query,
                   std::optional<at::Tensor> guide_doc_to_doc, std::optional<at::Tensor> doc_ids, int64_t row0,
                   int64_t batch_size, int64_t num_positives, int64_t offset, int64_t own_query_offset, double scale,
                   int64_t hardness_mode, double hardness_strength, bool joint, int64_t margin_strategy,
                   double margin, bool compute_grad, int64_t threads) {
  TORCH_CHECK(threads % 32 == 0 && threads <= emulation::kMaxEmulatedThreads, "threads: a multiple of 32");
  const int64_t rows = query_to_doc.size(0);
  at::Tensor loss = at::empty({rows}, query_to_doc.options());
  const int64_t* ids = doc_ids ? doc_ids->data_ptr<int64_t>() : nullptr;
  kernel::EpilogueParams params{rows, row0, batch_size, num_positives, offset, own_query_offset, scale,
                                hardness_strength, margin, static_cast<int>(hardness_mode),
                                static_cast<int>(margin_strategy), joint, compute_grad};
  auto run = [&](auto zero) {
    using T = decltype(zero);
    kernel::Blocks<T> blocks{};
    blocks.b[blocks.count++] = host_block<T>(query_to_doc, guide_query_to_doc, ids, kernel::kQueryToDoc);
    if (query_to_query)
      blocks.b[blocks.count++] = host_block<T>(query_to_query, guide_query_to_query, nullptr, kernel::kQueryToQuery);
    if (doc_to_query) blocks.b[blocks.count++] = host_block<T>(doc_to_query, std::nullopt, nullptr, kernel::kDocToQuery);
    if (doc_to_doc) blocks.b[blocks.count++] = host_block<T>(doc_to_doc, guide_doc_to_doc, ids, kernel::kDocToDoc);
    blockDim.x = static_cast<unsigned>(threads);
    emulation::barrier.reset(static_cast<int>(threads));
    for (int64_t r = 0; r < rows; ++r) {
      std::vector<std::thread> block;
      for (int64_t t = 0; t < threads; ++t) {
        block.emplace_back([&, r, t] {
          blockIdx.x = static_cast<unsigned>(r);
          threadIdx.x = static_cast<unsigned>(t);
          kernel::contrastive_epilogue_kernel<T>(blocks, params, loss.data_ptr<T>());
        });
      }
      for (auto& thread : block) thread.join();
    }
  };
  if (query_to_doc.scalar_type() == at::kFloat) {
    run(0.0f);
  } else {
    run(0.0);
  }
  return loss;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("contrastive_epilogue_emulated", &emulate,
        "the CUDA epilogue kernel on CPU tensors, CUDA threads emulated (test support)");
}
