"""The optional CUDA C++ glue ops of csrc/ and their fallbacks.

`framepack_kernels._cuda_ops` is built only on opt-in (`FRAMEPACK_BUILD_CUDA=1 pip install -e . --no-build-isolation` on a
machine with nvcc and a CUDA build of PyTorch). Importing it registers torch.ops.framepack.*. The `*_fused`
functions below use it for CUDA tensors when it is there, and otherwise fall back silently to the Triton twins of
kernels/norm.py (CUDA tensors) or to the eager references (anything else). The twins are also the compiled ops'
test oracle.
"""

from __future__ import annotations

import functools
import importlib

import torch

from framepack_kernels import norm
from framepack_kernels.launch import interpreting

EXTENSION_MODULE = "framepack_kernels._cuda_ops"
BUILD_HINT = "build it with FRAMEPACK_BUILD_CUDA=1 pip install -e . --no-build-isolation (needs nvcc and CUDA PyTorch)"
_SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_CHANNELS = 12288  # csrc/norm_modulate.h: kMaxChannels


@functools.lru_cache(maxsize=1)
def cuda_ops_available() -> bool:
    """True when the compiled extension imports and its ops are registered."""
    try:
        importlib.import_module(EXTENSION_MODULE)
    except ImportError:
        return False
    return hasattr(torch.ops, "framepack") and hasattr(torch.ops.framepack, "layer_norm_modulate")


def _require_cuda_ops():
    if not cuda_ops_available():
        raise RuntimeError(f"The CUDA glue ops ({EXTENSION_MODULE}) are not built: {BUILD_HINT}.")


def layer_norm_modulate_cuda(x, shift, scale, eps=norm.LAYER_NORM_EPS):
    """The compiled op; raises if it was not built. Same contract as framepack_kernels.norm.layer_norm_modulate."""
    _require_cuda_ops()
    return torch.ops.framepack.layer_norm_modulate(x, shift, scale, eps)


def gated_residual_cuda(x, gate, y):
    _require_cuda_ops()
    return torch.ops.framepack.gated_residual(x, gate, y)


def gated_residual_layer_norm_modulate_cuda(x, gate, y, shift, scale, eps=norm.LAYER_NORM_EPS):
    _require_cuda_ops()
    return tuple(torch.ops.framepack.gated_residual_layer_norm_modulate(x, gate, y, shift, scale, eps))


def _compiled_op_fits(x, *others):
    """The compiled ops take CUDA tensors of one supported dtype with unit channel stride and <= 12288 channels."""
    if not (x.is_cuda and cuda_ops_available()):
        return False
    tensors = (x, *others)
    return (x.dtype in _SUPPORTED_DTYPES and all(t.dtype == x.dtype and t.stride(-1) == 1 for t in tensors)
            and x.dim() == 3 and x.shape[-1] <= _MAX_CHANNELS)


def _triton_fits(x):
    return x.is_cuda or interpreting()


def layer_norm_modulate_fused(x, shift, scale, eps=norm.LAYER_NORM_EPS):
    """LayerNorm + modulation by the fastest available path: compiled CUDA op, Triton kernel, or eager PyTorch."""
    if _compiled_op_fits(x, shift, scale):
        return layer_norm_modulate_cuda(x, shift, scale, eps)
    if _triton_fits(x):
        return norm.layer_norm_modulate(x, shift, scale, eps)
    return norm.layer_norm_modulate_reference(x, shift, scale, eps)


def gated_residual_fused(x, gate, y):
    if _compiled_op_fits(x, gate, y) and y.shape == x.shape:
        return gated_residual_cuda(x, gate, y)
    if _triton_fits(x):
        return norm.gated_residual(x, gate, y)
    return norm.gated_residual_reference(x, gate, y)


def gated_residual_layer_norm_modulate_fused(x, gate, y, shift, scale, eps=norm.LAYER_NORM_EPS):
    if _compiled_op_fits(x, gate, y, shift, scale) and y.shape == x.shape:
        return gated_residual_layer_norm_modulate_cuda(x, gate, y, shift, scale, eps)
    if _triton_fits(x):
        return norm.gated_residual_layer_norm_modulate(x, gate, y, shift, scale, eps)
    return norm.gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale, eps)
