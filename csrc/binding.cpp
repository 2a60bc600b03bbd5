// The only file that knows both torch and the kernels: Python bindings of fastcache._C.
#include <torch/extension.h>

#include "cpu/contrastive.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastcache compiled kernels";
  m.def("contrastive_epilogue_cpu", &fastcache::contrastive_epilogue_cpu,
        "Fused contrastive softmax-gradient epilogue on CPU (in place, returns per-row losses)");
}
