"""Packaging lives in pyproject.toml; this file only adds the optional CUDA ops of csrc/.

They are built only on opt-in (FRAMEPACK_BUILD_CUDA=1) where nvcc and a CUDA build of PyTorch exist;
everywhere else the Triton/PyTorch twins of those ops are used.
"""

import os

from setuptools import setup


def cuda_extensions():
    if os.environ.get("FRAMEPACK_BUILD_CUDA") != "1":
        return {}, []
    from pathlib import Path

    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension

    if CUDA_HOME is None or torch.version.cuda is None:
        raise SystemExit("FRAMEPACK_BUILD_CUDA=1 needs nvcc and a CUDA build of PyTorch; unset it to use the Triton fallback.")
    sources = sorted(str(p) for p in Path("csrc").glob("*.cu")) + sorted(str(p) for p in Path("csrc").glob("*.cpp"))
    # Inside framepack_kernels (kernels/cuda_ops.py loads it), which never imports framepack_engine.
    extension = CUDAExtension("framepack_kernels._cuda_ops", sources, include_dirs=[str(Path("csrc").resolve())],
                              extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3"]})
    return {"build_ext": BuildExtension}, [extension]


command_classes, extensions = cuda_extensions()
setup(cmdclass=command_classes, ext_modules=extensions)
