"""csrc/: compile checks with this machine's toolchain, the Python loader's fallbacks, and (GPU) the op vs its twin.

The CUDA file holds only the kernels and their launchers (no PyTorch headers), so nvcc compiles it standalone for
Ampere and Hopper. The PyTorch binding is syntax-checked with the host compiler against torch's headers; a CPU
build of torch lacks one generated CUDA header (c10/cuda/impl/cuda_cmake_macros.h), which the test supplies in a
temporary folder with the single define a CUDA build has there.
"""

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from framepack_kernels import cuda_ops, norm
from tests.utils import TOLERANCE, assert_relative_error

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CUDA_SOURCES = sorted(CSRC.glob("*.cu"))
CPP_SOURCES = sorted(CSRC.glob("*.cpp"))


def nvcc_or_skip():
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH: install the CUDA toolkit to compile-check csrc/")
    return nvcc


def cuda_include_dir(nvcc):
    """The CUDA toolkit's include folder: from CUDA_HOME/CUDA_PATH, next to nvcc, or the usual install place."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), CUDA_HOME,
             str(Path(nvcc).resolve().parents[1]), "/usr/local/cuda"]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


def test_csrc_has_sources():
    assert [p.name for p in CUDA_SOURCES] == ["norm_modulate.cu"]
    assert [p.name for p in CPP_SOURCES] == ["ops.cpp"]


# The opt-in shared memory per block of each architecture CI compiles for (CUDA programming guide).
MAX_SHARED_BYTES = {"sm_80": 166912, "sm_90": 232448}


@pytest.fixture(scope="module", params=sorted(MAX_SHARED_BYTES))
def compiled(request, tmp_path_factory):
    """(arch, nvcc's output) of compiling csrc's CUDA source for an architecture, with ptxas -v."""
    nvcc = nvcc_or_skip()
    out = tmp_path_factory.mktemp(request.param) / "out.o"
    result = subprocess.run(
        [nvcc, "-c", str(CUDA_SOURCES[0]), "-o", str(out), f"-arch={request.param}", "-std=c++20", "-O3",
         "-Xcompiler", "-Wall", "-Xptxas", "-v", "-I", str(CSRC)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert out.stat().st_size > 0
    return request.param, result.stderr


def test_cuda_kernels_compile(compiled):
    _, log = compiled
    assert "warning" not in log.lower(), log[-4000:]


def test_widest_rows_fit_shared_memory(compiled):
    # The row kernels keep a row of up to kMaxChannels floats in dynamic shared memory beside their static scratch.
    arch, log = compiled
    header = (CSRC / "norm_modulate.h").read_text()
    max_channels = int(re.search(r"kMaxChannels = (\d+);", header)[1])
    assert max_channels == cuda_ops._MAX_CHANNELS
    static = [int(n) for n in re.findall(r"Used \d+ registers.*?(\d+) bytes smem", log)]
    assert static, log[-4000:]
    widest = max_channels * 4 + max(static)
    assert widest <= MAX_SHARED_BYTES[arch]
    # Over the 48 KB every kernel gets by default, the launchers must opt in to more.
    source = CUDA_SOURCES[0].read_text()
    if widest > 48 * 1024:
        dynamic_launches = source.count("shared_bytes, stream>>>")
        opt_ins = len(re.findall(r"allow_dynamic_shared\(\w+<T>, shared_bytes\)", source))
        assert dynamic_launches == opt_ins == 2
        assert "cudaFuncAttributeMaxDynamicSharedMemorySize" in source


@pytest.mark.parametrize("source", CPP_SOURCES, ids=lambda p: p.name)
def test_torch_binding_compiles(tmp_path, source):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler on PATH to check the PyTorch binding")
    nvcc = nvcc_or_skip()
    cuda_include = cuda_include_dir(nvcc)
    if cuda_include is None:
        pytest.skip("the CUDA toolkit's include folder was not found (set CUDA_HOME)")
    from torch.utils.cpp_extension import include_paths

    torch_includes = include_paths()
    stub = tmp_path / "stub"
    generated = Path(torch_includes[0]) / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    if not generated.exists():
        header = stub / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
        header.parent.mkdir(parents=True)
        header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*torch_includes, sysconfig.get_paths()["include"], str(cuda_include), str(stub), str(CSRC)]
    result = subprocess.run(
        [compiler, "-fsyntax-only", "-std=c++20", "-Wall", str(source), *(f"-I{p}" for p in includes)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


def test_loader_falls_back_without_the_extension(monkeypatch):
    monkeypatch.setitem(sys.modules, cuda_ops.EXTENSION_MODULE, None)  # importing it now raises ImportError
    cuda_ops.cuda_ops_available.cache_clear()
    try:
        assert not cuda_ops.cuda_ops_available()
        x = torch.randn(2, 5, 96)
        y = torch.randn(2, 5, 96)
        shift, scale, gate = torch.randn(2, 3 * 96).chunk(3, dim=1)
        with pytest.raises(RuntimeError, match="FRAMEPACK_BUILD_CUDA=1"):
            cuda_ops.layer_norm_modulate_cuda(x, shift, scale)
        # Under the interpreter the fallback is the Triton twin; without it (a plain CPU run), the reference.
        for interpret in ("1", "0"):
            monkeypatch.setenv("TRITON_INTERPRET", interpret)
            assert_relative_error(cuda_ops.layer_norm_modulate_fused(x, shift, scale),
                                  norm.layer_norm_modulate_reference(x, shift, scale), 1e-5)
            assert_relative_error(cuda_ops.gated_residual_fused(x, gate, y),
                                  norm.gated_residual_reference(x, gate, y), 1e-5)
            residual, normalized = cuda_ops.gated_residual_layer_norm_modulate_fused(x, gate, y, shift, scale)
            expected = norm.gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale)
            assert_relative_error(residual, expected[0], 1e-5)
            assert_relative_error(normalized, expected[1], 1e-5)
    finally:
        cuda_ops.cuda_ops_available.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("channels", [97, 3072, cuda_ops._MAX_CHANNELS])
def test_compiled_ops_match_triton_twins(dtype, channels):
    if not cuda_ops.cuda_ops_available():
        pytest.skip(f"{cuda_ops.EXTENSION_MODULE} is not built: {cuda_ops.BUILD_HINT}")
    x = (torch.randn(2, 37, channels, device="cuda") * 2 + 0.5).to(dtype)
    y = torch.randn(2, 37, channels, device="cuda").to(dtype)
    shift, scale, gate = (torch.randn(2, 3 * channels, device="cuda") * 0.5).to(dtype).chunk(3, dim=1)
    tolerance = TOLERANCE[dtype]
    assert_relative_error(cuda_ops.layer_norm_modulate_cuda(x, shift, scale),
                          norm.layer_norm_modulate(x, shift, scale), tolerance)
    assert_relative_error(cuda_ops.gated_residual_cuda(x, gate, y), norm.gated_residual(x, gate, y), tolerance)
    residual, normalized = cuda_ops.gated_residual_layer_norm_modulate_cuda(x, gate, y, shift, scale)
    twin_residual, twin_normalized = norm.gated_residual_layer_norm_modulate(x, gate, y, shift, scale)
    assert_relative_error(residual, twin_residual, tolerance)
    assert_relative_error(normalized, twin_normalized, tolerance)
    # And both against the eager oracle.
    assert_relative_error(normalized, norm.gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale)[1],
                          tolerance)
