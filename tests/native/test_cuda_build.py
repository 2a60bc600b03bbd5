"""The CUDA sources build without a GPU: every csrc/cuda/*.cu file compiles with nvcc for sm_80 and sm_90, and the
CUDA torch binding compiles against the installed (CPU) torch and links with the kernels into a loadable module.

The GPU itself is exercised by tests/contrastive/test_contrastive_cuda.py in bench/gpu_suite.sh. Without nvcc these tests
skip with the reason, except in CI (``CI=true``), where nvcc is part of the environment and its absence fails.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CUDA_DIR = REPO / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
KERNEL_FILES = CU_FILES + sorted(CUDA_DIR.glob("*.cuh"))  # what nvcc compiles: no torch header anywhere
BINDING_FILES = sorted(CUDA_DIR.glob("*.cpp"))
ARCHS = ("80", "90")
TORCH_HEADER = re.compile(r'^\s*#\s*include\s*[<"](torch|ATen|c10)/', re.MULTILINE)
CUDA_TORCH_HEADER = re.compile(r'^\s*#\s*include\s*[<"](c10/cuda|ATen/cuda)/', re.MULTILINE)


def _cuda_home() -> Path | None:
    """The CUDA toolkit's root as nvcc itself reports it (``TOP`` of a dry run: right also when the nvcc on the
    PATH is a wrapper script), from the nvcc on the PATH or in CUDA_HOME / CUDA_PATH."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    candidates = [shutil.which("nvcc"), *(str(Path(h) / "bin" / "nvcc") for h in homes if h)]
    nvcc = next((c for c in candidates if c and Path(c).exists()), None)
    if nvcc is None:
        return None
    dry_run = subprocess.run([nvcc, "--dryrun", "-c", str(CU_FILES[0])], capture_output=True, text=True)
    top = re.search(r"^#\$ TOP=(.+)$", dry_run.stderr + dry_run.stdout, re.MULTILINE)
    return Path(top.group(1).strip()).resolve() if top else Path(nvcc).resolve().parent.parent


@pytest.fixture(scope="module")
def cuda_home() -> Path:
    home = _cuda_home()
    if home is None:
        reason = "nvcc not found (neither on PATH nor in CUDA_HOME)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but {reason}: CI must compile every .cu file")
        pytest.skip(reason)
    return home


def _nvcc_compile(cuda_home: Path, source: Path, output: Path) -> subprocess.CompletedProcess:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    command = [str(cuda_home / "bin" / "nvcc"), "-c", "-std=c++17", "-O3", *gencode, "-Xcompiler", "-fPIC,-Wall",
               str(source), "-o", str(output)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def kernel_objects(cuda_home, tmp_path_factory) -> dict[Path, Path]:
    """Every .cu file compiled once, for sm_80 and sm_90 (asserted to succeed without a warning)."""
    folder = tmp_path_factory.mktemp("cuda_objects")
    objects = {}
    for source in CU_FILES:
        output = folder / (source.stem + ".o")
        result = _nvcc_compile(cuda_home, source, output)
        assert result.returncode == 0, f"nvcc failed on {source.name}:\n{result.stderr}"
        assert "warning" not in result.stderr.lower(), f"nvcc warned on {source.name}:\n{result.stderr}"
        objects[source] = output
    return objects


def test_there_are_cuda_sources():
    assert CU_FILES, "no csrc/cuda/*.cu file"
    assert BINDING_FILES, "no csrc/cuda/*.cpp binding"


@pytest.mark.parametrize("source", KERNEL_FILES, ids=lambda p: p.name)
def test_cu_file_is_torch_free(source):
    """The kernels include no torch header: they compile with nvcc alone, where torch has no CUDA."""
    assert not TORCH_HEADER.search(source.read_text()), f"{source.name} includes a torch header"


@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm80_and_sm90(source, kernel_objects, cuda_home):
    obj = kernel_objects[source]
    assert obj.stat().st_size > 0
    cuobjdump = cuda_home / "bin" / "cuobjdump"
    if cuobjdump.exists():  # the object holds machine code for both architectures
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True).stdout
        for arch in ARCHS:
            assert f"sm_{arch}" in listing, f"no sm_{arch} code in {obj.name}:\n{listing}"


@pytest.mark.parametrize("source", BINDING_FILES, ids=lambda p: p.name)
def test_binding_includes_no_cuda_torch_header(source):
    """The binding takes the stream as an integer, so it needs no c10/cuda or ATen/cuda header (absent from CPU
    builds of torch)."""
    assert not CUDA_TORCH_HEADER.search(source.read_text()), f"{source.name} includes a c10/cuda or ATen/cuda header"


def test_extension_with_cuda_builds_and_loads(kernel_objects, cuda_home, tmp_path_factory):
    """csrc/binding.cpp with FASTCACHE_WITH_CUDA, the CPU kernels and the CUDA binding, compiled against the
    installed torch and linked with the nvcc objects and the CUDA runtime, load as a module whose
    contrastive_epilogue_cuda and ranking ops (lambda_loss_cuda, plistmle_cuda, listnet_cuda) take their CPU twins'
    arguments plus the stream, and check devices."""
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    libs = (cuda_home / "lib64", cuda_home / "targets" / "x86_64-linux" / "lib", cuda_home / "lib")
    lib = next((p for p in libs if (p / "libcudart.so").exists()), None)
    assert lib is not None, f"no libcudart.so under {cuda_home}"
    sources = [REPO / "csrc" / "binding.cpp", *sorted((REPO / "csrc" / "cpu").glob("*.cpp")), *BINDING_FILES]
    module = cpp_extension.load(
        name="fastcache_cuda_build_check",
        sources=[str(s) for s in sources],
        extra_cflags=["-O0", "-std=c++17", "-fopenmp", "-DFASTCACHE_WITH_CUDA"],
        extra_ldflags=[*map(str, kernel_objects.values()), f"-L{lib}", f"-Wl,-rpath,{lib}", "-lcudart", "-fopenmp"],
        build_directory=str(tmp_path_factory.mktemp("cuda_extension")),
        verbose=False,
    )

    def arguments(function) -> list[str]:  # pybind11's signature line: name(arg0: type, ...) -> return
        signature = function.__doc__.splitlines()[0]
        return re.findall(r"arg\d+: ([^,)]+)", signature)

    cpu, cuda = arguments(module.contrastive_epilogue_cpu), arguments(module.contrastive_epilogue_cuda)
    assert len(cpu) == 9 and cuda[:-1] == cpu and "int" in cuda[-1].lower()  # 8 blocks, the KernelParams
    blocks = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="query_to_doc must be a CUDA tensor"):
        module.contrastive_epilogue_cuda(blocks, None, None, None, None, None, None, None,
                                         (0, 2, 8, 0, 0, 20.0, 0.0, 0.0, 0, 0, True, True, 10.0, 10.0, 0.0), 0)
    for op in ("lambda_loss", "plistmle", "listnet"):  # the ranking ops: the CPU arguments plus the stream
        cpu, cuda = arguments(getattr(module, f"{op}_cpu")), arguments(getattr(module, f"{op}_cuda"))
        assert cuda[:-1] == cpu and "int" in cuda[-1].lower(), (op, cpu, cuda)
    lists = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="lambda_loss_cuda: logits must be a CUDA tensor"):
        module.lambda_loss_cuda(lists, lists, lists > 0, 4, 10.0, 0, 1.0, 1e-10, True, True, 0)
