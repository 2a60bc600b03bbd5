"""Builds fastcache's compiled extension ``fastcache._C``.

Always the C++ CPU kernels (csrc/cpu); the CUDA kernels (csrc/cuda) only where torch has CUDA and nvcc exists.
Environment switches:
  FASTCACHE_BUILD_EXT=0     build no extension (pure Python; fastcache falls back to its PyTorch backend)
  FASTCACHE_BUILD_CUDA=auto build the CUDA kernels when torch has CUDA and nvcc is found (default)
  FASTCACHE_BUILD_CUDA=1    require the CUDA kernels (fail if they cannot be built)
  FASTCACHE_BUILD_CUDA=0    never build the CUDA kernels
"""

import glob
import os

from setuptools import setup


def _extensions():
    if os.environ.get("FASTCACHE_BUILD_EXT", "1") == "0":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cuda_switch = os.environ.get("FASTCACHE_BUILD_CUDA", "auto")
    if cuda_switch not in ("auto", "0", "1"):
        raise ValueError(f"FASTCACHE_BUILD_CUDA must be auto, 0 or 1, got {cuda_switch!r}")
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    if cuda_switch == "1" and not cuda_possible:
        raise RuntimeError(
            "FASTCACHE_BUILD_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={CUDA_HOME}"
        )
    with_cuda = cuda_switch != "0" and cuda_possible and bool(cuda_sources)

    sources = ["csrc/binding.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-std=c++17", "-fopenmp"] + os.environ.get("FASTCACHE_CXXFLAGS", "").split()
    if with_cuda:
        ext = CUDAExtension(
            "fastcache._C",
            sources + cuda_sources + sorted(glob.glob("csrc/cuda/*.cpp")),
            define_macros=[("FASTCACHE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("fastcache._C", sources, extra_compile_args=cxx_flags, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
