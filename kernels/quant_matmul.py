"""Dequantizing matmuls: x @ w.T + bias with w stored as fp8, int8 or grouped int4, dequantized tile by tile.

One Triton GEMM serves every format: each K tile of the weight is loaded in its stored bytes, decoded in registers
and fed to `tl.dot` in the activations' dtype, so the float weight never exists in memory. fp8 and int8 carry one
scale per output channel, applied once to the accumulator after the K loop (the decoded values are exact in bf16);
int4 carries a scale and a zero point per group of K, applied while decoding. fp8 bytes are decoded by bit
arithmetic (e4m3 -> fp16 is a shift and a 2^8 rescale), so the kernel needs no fp8 support from the GPU or the
interpreter. The storage layouts and the eager reference are in kernels/reference.py.

`fp8_scaled_matmul` is the other fp8 path: activations quantized to e4m3 per token and both operands multiplied on
the fp8 tensor cores by `torch._scaled_mm` (Ada, Hopper), trading activation precision for matmul speed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from framepack_kernels.launch import interpreting, require_kernel_device
from framepack_kernels.reference import (FP8_E4M3_MAX, INT4_GROUP_SIZES, dequantize_reference,  # noqa: F401 (re-exported)
                               fp8_scaled_matmul_reference, quantize_activations_fp8_reference,
                               quantized_matmul_reference, weight_format)
from framepack_kernels.triton_helpers import rounded_cast

# The kernel's FORMAT constant per storage dtype.
_FORMATS = {torch.float8_e4m3fn: 0, torch.float8_e5m2: 1, torch.int8: 2, torch.uint8: 3}
_INT4 = 3


def _configs():
    if interpreting():
        # Few, wide tiles: the interpreter pays per program and per tile op on top of the per-element work.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 1024, "BLOCK_K": k}, num_warps=4, num_stages=1)
                for k in (256, 128, 64, 32)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in ((16, 128, 128, 4, 4), (32, 128, 128, 4, 4), (64, 128, 64, 4, 4),
                                  (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
                                  (16, 128, 32, 4, 4), (64, 128, 32, 4, 4), (128, 128, 32, 8, 3))]


def _prune(configs, named_args, **kwargs):
    # An int4 K tile must lie inside one group (its scale and zero are loaded once per tile).
    group_size = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 1))
    fitting = [c for c in configs if kwargs.get("FORMAT") != _INT4 or group_size % c.kwargs["BLOCK_K"] == 0
               and c.kwargs["BLOCK_K"] >= 32]
    if interpreting() or not torch.cuda.is_available():
        return fitting[:1]
    rows = named_args["rows"]
    # Small row counts (the text encoder, a short prompt) only waste work on tall tiles.
    kept = [c for c in fitting if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(rows))]
    return kept or fitting[:1]


@triton.autotune(configs=_configs(), key=["rows_bucket", "out_features", "in_features", "FORMAT", "GROUP_SIZE"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _quantized_matmul_kernel(
    X, W, Scale, Zero, Bias, Out,
    rows, rows_bucket, out_features, in_features,
    stride_x_row, stride_w_out, stride_scale_out, stride_out_row,
    FORMAT: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    out = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = row < rows
    out_ok = out < out_features
    row64 = row.to(tl.int64)
    out64 = out.to(tl.int64)
    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, in_features, BLOCK_K):
        if FORMAT == 3:
            # Each byte holds K positions 2j (low nibble) and 2j + 1 (high): the even and odd activation columns
            # each meet one nibble tile. BLOCK_K divides the group size (see _prune), so the tile shares one group.
            byte = k_start // 2 + tl.arange(0, BLOCK_K // 2)
            even_ok = 2 * byte < in_features
            odd_ok = 2 * byte + 1 < in_features
            x_even = tl.load(X + row64[:, None] * stride_x_row + 2 * byte[None, :],
                             mask=row_ok[:, None] & even_ok[None, :], other=0.0)
            x_odd = tl.load(X + row64[:, None] * stride_x_row + 2 * byte[None, :] + 1,
                            mask=row_ok[:, None] & odd_ok[None, :], other=0.0)
            packed = tl.load(W + out64[None, :] * stride_w_out + byte[:, None],
                             mask=even_ok[:, None] & out_ok[None, :], other=0)
            group = k_start // GROUP_SIZE
            scale = tl.load(Scale + out64 * stride_scale_out + group, mask=out_ok, other=0.0).to(tl.float32)
            zero = tl.load(Zero + out64 * stride_scale_out + group, mask=out_ok, other=0.0).to(tl.float32)
            low = ((packed & 0xF).to(tl.float32) - zero[None, :]) * scale[None, :]
            high = ((packed >> 4).to(tl.float32) - zero[None, :]) * scale[None, :]
            # Helpers are inlined by hand: in the interpreter a jit-function call costs more than a tile op.
            if EMULATE_BF16:
                low = rounded_cast(low, X.dtype.element_ty, EMULATE_BF16).to(tl.float32)
                high = rounded_cast(high, X.dtype.element_ty, EMULATE_BF16).to(tl.float32)
                accumulator = tl.dot(x_even.to(tl.float32), low, accumulator, input_precision="ieee")
                accumulator = tl.dot(x_odd.to(tl.float32), high, accumulator, input_precision="ieee")
            else:
                accumulator = tl.dot(x_even, low.to(X.dtype.element_ty), accumulator, input_precision=DOT_PRECISION)
                accumulator = tl.dot(x_odd, high.to(X.dtype.element_ty), accumulator, input_precision=DOT_PRECISION)
        else:
            k = k_start + tl.arange(0, BLOCK_K)
            k_ok = k < in_features
            x = tl.load(X + row64[:, None] * stride_x_row + k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            raw = tl.load(W + out64[None, :] * stride_w_out + k[:, None], mask=k_ok[:, None] & out_ok[None, :],
                          other=0)
            if FORMAT == 0:  # e4m3 -> fp16: sign to the sign bit, exponent and mantissa shifted under it; fp16's
                # exponent bias is 8 higher, hence the 2^8.
                bits = raw.to(tl.uint16)
                weight = (((bits & 0x80) << 8) | ((bits & 0x7F) << 7)).to(tl.float16, bitcast=True).to(tl.float32)
                weight = weight * 256.0
            elif FORMAT == 1:  # e5m2 is the top byte of an fp16
                weight = (raw.to(tl.uint16) << 8).to(tl.float16, bitcast=True).to(tl.float32)
            else:
                weight = raw.to(tl.float32)
            # The decoded values are exact in the activations' dtype; the scale is applied after the loop.
            if EMULATE_BF16:
                accumulator = tl.dot(x.to(tl.float32), weight, accumulator, input_precision="ieee")
            else:
                accumulator = tl.dot(x, weight.to(X.dtype.element_ty), accumulator, input_precision=DOT_PRECISION)
    if FORMAT != 3:
        accumulator *= tl.load(Scale + out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        accumulator += tl.load(Bias + out, mask=out_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + row64[:, None] * stride_out_row + out64[None, :],
             rounded_cast(accumulator, Out.dtype.element_ty, EMULATE_BF16), mask=row_ok[:, None] & out_ok[None, :])


def quantized_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., in_features) @ dequantized(weight).T + bias, in x's dtype; see kernels/reference.py for the layouts.

    The same result as `quantized_matmul_reference` up to summation order (the scale of fp8 and int8 is applied to
    the float32 accumulator rather than to each weight)."""
    if weight.dtype not in _FORMATS:
        raise ValueError(f"quantized_matmul: {weight.dtype} is not a quantized weight dtype ({weight_format.__doc__})")
    require_kernel_device("quantized_matmul", x, weight, scale, zero, bias)
    format_id = _FORMATS[weight.dtype]
    in_features = x.shape[-1]
    out_features = weight.shape[0]
    if format_id == _INT4:
        group_size = 2 * weight.shape[1] // scale.shape[1]
        if group_size not in INT4_GROUP_SIZES or group_size * scale.shape[1] != 2 * weight.shape[1]:
            raise ValueError(f"quantized_matmul: int4 group size {group_size} is not one of {INT4_GROUP_SIZES}.")
        if zero is None or zero.shape != scale.shape or 2 * weight.shape[1] < in_features:
            raise ValueError("quantized_matmul: int4 needs a zero point shaped like its scale and "
                             f"{-(-in_features // 2)} or more bytes per row, got {tuple(weight.shape)}.")
        scale, zero = scale.contiguous(), zero.contiguous()
    else:
        group_size = 1
        if weight.shape[1] != in_features or scale.shape != (out_features,):
            raise ValueError(f"quantized_matmul: weight {tuple(weight.shape)} and scale {tuple(scale.shape)} do not "
                             f"fit activations with {in_features} features.")
        if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            weight = weight.view(torch.uint8)  # decoded from its bits in the kernel
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    rows_x = x.reshape(-1, in_features)
    if rows_x.stride(-1) != 1:
        rows_x = rows_x.contiguous()
    rows = rows_x.shape[0]
    out = torch.empty((rows, out_features), device=x.device, dtype=x.dtype)
    if rows == 0:
        return out.reshape(*x.shape[:-1], out_features)

    def grid(meta):
        return (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))

    _quantized_matmul_kernel[grid](
        rows_x, weight, scale, zero if zero is not None else scale, bias if bias is not None else scale, out,
        rows, min(triton.next_power_of_2(rows), 4096), out_features, in_features,
        rows_x.stride(0), weight.stride(0), scale.stride(0), out.stride(0),
        FORMAT=format_id, GROUP_SIZE=group_size, HAS_BIAS=bias is not None,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        EMULATE_BF16=interpreting() and x.dtype == torch.bfloat16,
    )
    return out.reshape(*x.shape[:-1], out_features)


# --- fp8 compute -------------------------------------------------------------------------------------------------

def quantize_activations_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, features) -> e4m3 values and float32 per-row scales (rows, 1)."""
    return quantize_activations_fp8_reference(x)


def fp8_scaled_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ (weight * scale).T + bias on the fp8 tensor cores: x quantized to e4m3 per token, `torch._scaled_mm` with
    row-wise scales, the result in x's dtype. weight: float8_e4m3fn (out_features, in_features); scale: (out,)."""
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8_scaled_matmul: the weight must be float8_e4m3fn, got {weight.dtype}.")
    rows_x = x.reshape(-1, x.shape[-1])
    rows = rows_x.shape[0]
    # cuBLASLt's fp8 GEMM wants every dimension a multiple of 16: pad the token rows (features already are).
    padded_rows = -(-rows // 16) * 16
    if padded_rows != rows:
        rows_x = F.pad(rows_x, (0, 0, 0, padded_rows - rows))
    values, token_scale = quantize_activations_fp8(rows_x)
    out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    out = torch._scaled_mm(values, weight.t(), scale_a=token_scale,
                           scale_b=scale.float().reshape(1, -1), out_dtype=out_dtype)
    out = out[:rows]
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
