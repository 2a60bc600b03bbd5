// Test support: CUDA's built-in names emulated on the host, so that a torch-free kernel header (csrc/cuda/*.cuh)
// compiles as plain C++ and its kernels run on CPU data (tests/contrastive/cuda_host_emulation.cpp, the contrastive epilogue;
// tests/ranking/ranking_host_emulation.cpp, the ranking losses). One std::thread per CUDA thread; a grid's thread blocks
// run one after another (emulation::run_grid). __syncthreads is a barrier of the block's threads;
// __shfl_xor_sync exchanges through a per-block buffer between two block barriers (valid where the kernel calls it
// with every lane of every warp), __shfl_down_sync and __shfl_up_sync through such a buffer between two barriers of
// the warp (valid where every lane of the warp calls it); atomicAdd holds one lock. Include this before the kernel
// header, in one translation unit per test module.
#pragma once
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <vector>

using std::exp;
using std::exp2;
using std::fabs;
using std::fmax;
using std::fmin;
using std::isfinite;
using std::isinf;
using std::log;
using std::log1p;
using std::log2;
using std::max;
using std::min;

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

constexpr int kMaxEmulatedThreads = 1024;
constexpr int kWarpSize = 32;
inline Barrier barrier;                                          // the running block's threads
inline Barrier warp_barriers[kMaxEmulatedThreads / kWarpSize];  // each warp's threads
inline std::mutex atomic_lock;

}  // namespace emulation

inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim;

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

namespace emulation {

// The value that lane (the caller's lane + offset) of the caller's warp passes; the caller's own value where that lane
// is outside the warp (as __shfl_down_sync / __shfl_up_sync do).
template <typename T>
T warp_shuffle_by(T value, int offset) {
  static T exchange[kMaxEmulatedThreads];
  Barrier& warp = warp_barriers[threadIdx.x / kWarpSize];
  exchange[threadIdx.x] = value;
  warp.wait();
  const int source = static_cast<int>(threadIdx.x % kWarpSize) + offset;
  const T other = source >= 0 && source < kWarpSize ? exchange[threadIdx.x + offset] : value;
  warp.wait();
  return other;
}

}  // namespace emulation

template <typename T>
T __shfl_down_sync(unsigned, T value, unsigned delta) {
  return emulation::warp_shuffle_by(value, static_cast<int>(delta));
}

template <typename T>
T __shfl_up_sync(unsigned, T value, unsigned delta) {
  return emulation::warp_shuffle_by(value, -static_cast<int>(delta));
}

template <typename T>
T atomicAdd(T* address, T value) {
  std::lock_guard<std::mutex> lock(emulation::atomic_lock);
  const T old = *address;
  *address = old + value;
  return old;
}

inline float __expf(float x) { return std::exp(x); }

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(...)

namespace emulation {

// Runs body() as `blocks` thread blocks of `threads` std::threads each (threads: a multiple of the warp size up to
// kMaxEmulatedThreads), setting blockIdx, threadIdx and blockDim as CUDA would.
template <typename Body>
void run_grid(int64_t blocks, int threads, Body body) {
  blockDim.x = static_cast<unsigned>(threads);
  barrier.reset(threads);
  for (auto& warp : warp_barriers) warp.reset(kWarpSize);
  for (int64_t b = 0; b < blocks; ++b) {
    std::vector<std::thread> block;
    for (int t = 0; t < threads; ++t) {
      block.emplace_back([&, b, t] {
        blockIdx.x = static_cast<unsigned>(b);
        threadIdx.x = static_cast<unsigned>(t);
        body();
      });
    }
    for (auto& thread : block) thread.join();
  }
}

}  // namespace emulation
