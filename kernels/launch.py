"""Launch settings shared by the kernels: computed from the shape, and kept tiny when Triton is interpreting on CPU."""

from __future__ import annotations

import os

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (tests set TRITON_INTERPRET=1 before importing)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require_kernel_device(op_name: str, *tensors: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors (or CPU tensors under the interpreter): say so before Triton fails obscurely."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(
            f"{op_name}: all tensors must be on one device, got {sorted(map(str, devices))}; move them first.")
    device = devices.pop()
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{op_name} is a Triton kernel and needs CUDA tensors (got {device.type}); "
            "use the plain PyTorch path on this device, or set TRITON_INTERPRET=1 to run it slowly on CPU.")


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for tiles of `dtype`.

    Half-precision tiles go to the tensor cores as they are. Float32 tiles need float32-accurate products (the
    tests hold float32 to 1e-5): on a GPU, three TF32 tensor-core products per product ("tf32x3", error ~2**-22);
    plain float32 FMA products ("ieee") would hold whole operand rows per thread and spill registers. The
    interpreter multiplies in exact float32 either way.
    """
    if dtype != torch.float32:
        return "tf32"
    return "ieee" if interpreting() else "tf32x3"


def row_launch_settings(columns: int) -> tuple[int, int]:
    """Block size and warp count for a kernel that holds one whole row of `columns` elements in registers."""
    block = triton.next_power_of_2(columns)
    if block > 65536:
        raise ValueError(f"rows of {columns} elements are too long for a one-row-per-program kernel (at most 65536).")
    if block >= 32768:
        warps = 32
    elif block >= 8192:
        warps = 16
    elif block >= 2048:
        warps = 8
    else:
        warps = 4
    return block, warps



def rope_launch_tables(rope_cos, rope_sin, rotate: bool, placeholder: torch.Tensor):
    """(cos, sin, batch stride, token stride) for a kernel that rotates rows with per-pair cos/sin tables.

    Tables become float32 and contiguous; a single row of tables (batch 1) is broadcast with a zero batch stride.
    Without rotation the kernel never reads them: `placeholder` stands in so the launch still gets pointers.
    """
    if not rotate:
        return placeholder, placeholder, 0, 0
    rope_cos = rope_cos.to(torch.float32).contiguous()
    rope_sin = rope_sin.to(torch.float32).contiguous()
    return rope_cos, rope_sin, rope_cos.stride(0) if rope_cos.shape[0] > 1 else 0, rope_cos.stride(1)
