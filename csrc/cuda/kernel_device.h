// What the thin torch bindings of the CUDA kernels share: where their tensors must live.
#pragma once
#include <ATen/ATen.h>

namespace fastcache {

// tests/contrastive/cuda_host_emulation.cpp and tests/ranking/ranking_host_emulation.cpp compile the bindings with the launchers run on
// the host, on CPU tensors.
#ifdef FASTCACHE_CUDA_HOST_EMULATION
constexpr bool kHostEmulation = true;
#else
constexpr bool kHostEmulation = false;
#endif

// Whether t is where the kernels run: a CUDA device (the CPU under host emulation).
inline bool on_kernel_device(const at::Tensor& t) {
  return kHostEmulation ? t.device().is_cpu() : t.device().is_cuda();
}

}  // namespace fastcache
