"""The DiT's memory-bound glue, fused: LayerNorm + adaLN modulation, gated residual, and RMSNorm + RoPE.

Each op reads its inputs once and writes its output once, computing in float32 and rounding once at the end; the
`_reference` beside it is the eager PyTorch the DiT runs without kernels, and the tests' oracle.

Shapes follow the DiT: hidden states x (batch, tokens, channels), per-sample modulation vectors (batch, channels)
(views such as one chunk of the adaLN projection are fine: only their last dim must be contiguous), and q/k
(batch, tokens, heads, head_dim) for the per-head RMSNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from framepack_kernels.launch import interpreting, require_kernel_device, rope_launch_tables, row_launch_settings
from framepack_kernels.reference import (LAYER_NORM_EPS, RMS_NORM_EPS, gated_residual_layer_norm_modulate_reference,  # noqa: F401
                               gated_residual_reference, layer_norm_modulate_reference, rms_norm_rotary_reference)
from framepack_kernels.triton_helpers import head_rows, rotate_pairs, rounded_cast

# --- kernels ----------------------------------------------------------------------------------------------------

@triton.jit
def _modulated_layer_norm_row(x, column_ok, channels, shift, scale, eps):
    """LayerNorm of one float32 row (masked columns hold 0), then * (1 + scale) + shift."""
    mean = tl.sum(x, axis=0) / channels
    centered = tl.where(column_ok, x - mean, 0.0)
    variance = tl.sum(centered * centered, axis=0) / channels
    return centered * tl.math.rsqrt(variance + eps) * (1.0 + scale) + shift


@triton.jit
def _layer_norm_modulate_kernel(
    X, Shift, Scale, Out,
    stride_x_batch, stride_x_token, stride_shift_batch, stride_scale_batch,
    tokens, channels, eps,
    BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    batch = (row // tokens).to(tl.int64)
    token = (row % tokens).to(tl.int64)
    columns = tl.arange(0, BLOCK_C)
    column_ok = columns < channels
    x = tl.load(X + batch * stride_x_batch + token * stride_x_token + columns, mask=column_ok, other=0.0)
    shift = tl.load(Shift + batch * stride_shift_batch + columns, mask=column_ok, other=0.0).to(tl.float32)
    scale = tl.load(Scale + batch * stride_scale_batch + columns, mask=column_ok, other=0.0).to(tl.float32)
    out = _modulated_layer_norm_row(x.to(tl.float32), column_ok, channels, shift, scale, eps)
    tl.store(Out + row.to(tl.int64) * channels + columns, rounded_cast(out, Out.dtype.element_ty, EMULATE_BF16),
             mask=column_ok)


@triton.jit
def _gated_residual_kernel(
    X, Gate, Y, Out,
    stride_x_batch, stride_x_token, stride_gate_batch, stride_y_batch, stride_y_token,
    tokens, channels,
    BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    batch = (row // tokens).to(tl.int64)
    token = (row % tokens).to(tl.int64)
    columns = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    column_ok = columns < channels
    x = tl.load(X + batch * stride_x_batch + token * stride_x_token + columns, mask=column_ok, other=0.0)
    gate = tl.load(Gate + batch * stride_gate_batch + columns, mask=column_ok, other=0.0)
    y = tl.load(Y + batch * stride_y_batch + token * stride_y_token + columns, mask=column_ok, other=0.0)
    out = x.to(tl.float32) + gate.to(tl.float32) * y.to(tl.float32)
    tl.store(Out + row.to(tl.int64) * channels + columns, rounded_cast(out, Out.dtype.element_ty, EMULATE_BF16),
             mask=column_ok)


@triton.jit
def _gated_residual_layer_norm_modulate_kernel(
    X, Gate, Y, Shift, Scale, ResidualOut, NormOut,
    stride_x_batch, stride_x_token, stride_gate_batch, stride_y_batch, stride_y_token,
    stride_shift_batch, stride_scale_batch,
    tokens, channels, eps,
    BLOCK_C: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    row = tl.program_id(0)
    batch = (row // tokens).to(tl.int64)
    token = (row % tokens).to(tl.int64)
    columns = tl.arange(0, BLOCK_C)
    column_ok = columns < channels
    x = tl.load(X + batch * stride_x_batch + token * stride_x_token + columns, mask=column_ok, other=0.0)
    gate = tl.load(Gate + batch * stride_gate_batch + columns, mask=column_ok, other=0.0)
    y = tl.load(Y + batch * stride_y_batch + token * stride_y_token + columns, mask=column_ok, other=0.0)
    residual = rounded_cast(x.to(tl.float32) + gate.to(tl.float32) * y.to(tl.float32),
                            ResidualOut.dtype.element_ty, EMULATE_BF16)
    out_offsets = row.to(tl.int64) * channels + columns
    tl.store(ResidualOut + out_offsets, residual, mask=column_ok)
    # Normalize the residual as stored (rounded to its dtype), exactly what an unfused LayerNorm would read back.
    shift = tl.load(Shift + batch * stride_shift_batch + columns, mask=column_ok, other=0.0).to(tl.float32)
    scale = tl.load(Scale + batch * stride_scale_batch + columns, mask=column_ok, other=0.0).to(tl.float32)
    out = _modulated_layer_norm_row(residual.to(tl.float32), column_ok, channels, shift, scale, eps)
    tl.store(NormOut + out_offsets, rounded_cast(out, NormOut.dtype.element_ty, EMULATE_BF16), mask=column_ok)


@triton.jit
def _weighted_rms(x, inverse_rms, weight, dtype: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
                  EMULATE_BF16: tl.constexpr):
    """x * inverse_rms * weight rounded to dtype, optionally rounding x * inverse_rms first."""
    normalized = x * inverse_rms[:, None]
    if ROUND_BEFORE_WEIGHT:
        normalized = rounded_cast(normalized, dtype, EMULATE_BF16).to(tl.float32)
    return rounded_cast(normalized * weight[None, :], dtype, EMULATE_BF16)


@triton.jit
def _rms_norm_rotary_kernel(
    X, Weight, RopeCos, RopeSin, Out,
    stride_x_batch, stride_x_token, stride_x_head, stride_rope_batch, stride_rope_token,
    total_rows, tokens, heads, rotary_length, eps,
    HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, ROTATE: tl.constexpr, ROUND_BEFORE_WEIGHT: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    # A row is one head of one token; a program normalizes BLOCK_ROWS of them.
    rows, row_ok, batch, token, row_base = head_rows(total_rows, tokens, heads, stride_x_batch, stride_x_token,
                                                     stride_x_head, BLOCK_ROWS)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + row_base + dims[None, :], mask=row_ok, other=0.0).to(tl.float32)
    inverse_rms = tl.math.rsqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    weight = tl.load(Weight + dims).to(tl.float32)
    # Round to the input dtype before rotating: the unfused model stores the normalized q/k, then rotates them.
    normalized = _weighted_rms(x, inverse_rms, weight, Out.dtype.element_ty, ROUND_BEFORE_WEIGHT, EMULATE_BF16)
    if ROTATE:
        partner_dims = dims ^ 1
        x_partner = tl.load(X + row_base + partner_dims[None, :], mask=row_ok, other=0.0).to(tl.float32)
        weight_partner = tl.load(Weight + partner_dims).to(tl.float32)
        normalized_partner = _weighted_rms(x_partner, inverse_rms, weight_partner, Out.dtype.element_ty,
                                           ROUND_BEFORE_WEIGHT, EMULATE_BF16)
        rotated = rotate_pairs(normalized, normalized_partner, RopeCos, RopeSin, batch, token, row_ok,
                               stride_rope_batch, stride_rope_token, rotary_length, dims)
        normalized = rounded_cast(rotated, Out.dtype.element_ty, EMULATE_BF16)
    tl.store(Out + rows[:, None] * HEAD_DIM + dims[None, :], normalized, mask=row_ok)


# --- wrappers ---------------------------------------------------------------------------------------------------

def _emulate_bf16(dtype):
    return interpreting() and dtype == torch.bfloat16


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_hidden_and_vectors(op_name, x, vectors):
    if x.dim() != 3:
        raise ValueError(f"{op_name}: x must be (batch, tokens, channels), got shape {tuple(x.shape)}.")
    batch, _, channels = x.shape
    for name, vector in vectors.items():
        if vector.shape != (batch, channels):
            raise ValueError(
                f"{op_name}: {name} must be (batch, channels) = ({batch}, {channels}), got {tuple(vector.shape)}; "
                "pass one modulation vector per sample.")


def layer_norm_modulate(x, shift, scale, eps=LAYER_NORM_EPS):
    """LayerNorm (no affine) over the last dim of x (batch, tokens, channels), * (1 + scale) + shift; x's dtype."""
    _check_hidden_and_vectors("layer_norm_modulate", x, {"shift": shift, "scale": scale})
    require_kernel_device("layer_norm_modulate", x, shift, scale)
    x, shift, scale = map(_last_dim_contiguous, (x, shift, scale))
    batch, tokens, channels = x.shape
    out = torch.empty((batch, tokens, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block, warps = row_launch_settings(channels)
    _layer_norm_modulate_kernel[(batch * tokens,)](
        x, shift, scale, out, x.stride(0), x.stride(1), shift.stride(0), scale.stride(0),
        tokens, channels, eps, BLOCK_C=block, EMULATE_BF16=_emulate_bf16(x.dtype), num_warps=warps)
    return out


def gated_residual(x, gate, y):
    """x + gate[:, None] * y for x, y (batch, tokens, channels) and gate (batch, channels); x's dtype."""
    _check_hidden_and_vectors("gated_residual", x, {"gate": gate})
    if y.shape != x.shape:
        raise ValueError(f"gated_residual: y must match x's shape {tuple(x.shape)}, got {tuple(y.shape)}.")
    require_kernel_device("gated_residual", x, gate, y)
    x, gate, y = map(_last_dim_contiguous, (x, gate, y))
    batch, tokens, channels = x.shape
    out = torch.empty((batch, tokens, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block = min(triton.next_power_of_2(channels), 1024)
    grid = (batch * tokens, triton.cdiv(channels, block))
    _gated_residual_kernel[grid](
        x, gate, y, out, x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1),
        tokens, channels, BLOCK_C=block, EMULATE_BF16=_emulate_bf16(x.dtype), num_warps=4)
    return out


def gated_residual_layer_norm_modulate(x, gate, y, shift, scale, eps=LAYER_NORM_EPS):
    """(x + gate * y, layer_norm_modulate(x + gate * y, shift, scale)) in one pass over the row."""
    _check_hidden_and_vectors("gated_residual_layer_norm_modulate", x, {"gate": gate, "shift": shift, "scale": scale})
    if y.shape != x.shape:
        raise ValueError(
            f"gated_residual_layer_norm_modulate: y must match x's shape {tuple(x.shape)}, got {tuple(y.shape)}.")
    require_kernel_device("gated_residual_layer_norm_modulate", x, gate, y, shift, scale)
    x, gate, y, shift, scale = map(_last_dim_contiguous, (x, gate, y, shift, scale))
    batch, tokens, channels = x.shape
    residual = torch.empty((batch, tokens, channels), dtype=x.dtype, device=x.device)
    normalized = torch.empty_like(residual)
    if residual.numel() == 0:
        return residual, normalized
    block, warps = row_launch_settings(channels)
    _gated_residual_layer_norm_modulate_kernel[(batch * tokens,)](
        x, gate, y, shift, scale, residual, normalized,
        x.stride(0), x.stride(1), gate.stride(0), y.stride(0), y.stride(1), shift.stride(0), scale.stride(0),
        tokens, channels, eps, BLOCK_C=block, EMULATE_BF16=_emulate_bf16(x.dtype), num_warps=warps)
    return residual, normalized


def rms_norm_rotary(x, weight, eps=RMS_NORM_EPS, rope_cos=None, rope_sin=None, rotary_length=0,
                    round_before_weight=False):
    """Per-head RMSNorm of x (batch, tokens, heads, head_dim) times weight (head_dim,), then RoPE on the image tokens.

    rope_cos/rope_sin: (batch or 1, rotary_length, head_dim) float32, cos/sin repeated per interleaved pair; None
    (or rotary_length 0) gives the plain RMSNorm. round_before_weight: see rms_norm_rotary_reference. Returns a
    contiguous tensor in x's dtype.
    """
    if x.dim() != 4:
        raise ValueError(f"rms_norm_rotary: x must be (batch, tokens, heads, head_dim), got shape {tuple(x.shape)}.")
    batch, tokens, heads, head_dim = x.shape
    if weight.shape != (head_dim,):
        raise ValueError(f"rms_norm_rotary: weight must be ({head_dim},), got {tuple(weight.shape)}.")
    if head_dim & (head_dim - 1) or head_dim % 2:
        raise ValueError(f"rms_norm_rotary: head_dim must be an even power of two, got {head_dim}.")
    rotate = rope_cos is not None and rotary_length > 0
    if rotate:
        if rotary_length > tokens:
            raise ValueError(f"rms_norm_rotary: rotary_length {rotary_length} exceeds the {tokens} tokens of x.")
        for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if (table is None or table.dim() != 3 or tuple(table.shape[1:]) != (rotary_length, head_dim)
                    or table.shape[0] not in (1, batch)):
                raise ValueError(
                    f"rms_norm_rotary: {name} must be (batch or 1, {rotary_length}, {head_dim}), got "
                    f"{None if table is None else tuple(table.shape)}.")
    require_kernel_device("rms_norm_rotary", x, weight, rope_cos if rotate else None, rope_sin if rotate else None)
    x = _last_dim_contiguous(x)
    weight = weight.contiguous()
    out = torch.empty((batch, tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    rope_cos, rope_sin, stride_rope_batch, stride_rope_token = rope_launch_tables(rope_cos, rope_sin, rotate, weight)
    rotary_length = rotary_length if rotate else 0
    total_rows = batch * tokens * heads
    # ~2K elements per program: enough work per program without spilling registers at head_dim 128.
    block_rows = max(1, min(triton.next_power_of_2(total_rows), 2048 // head_dim))
    _rms_norm_rotary_kernel[(triton.cdiv(total_rows, block_rows),)](
        x, weight, rope_cos, rope_sin, out,
        x.stride(0), x.stride(1), x.stride(2), stride_rope_batch, stride_rope_token,
        total_rows, tokens, heads, rotary_length, eps,
        HEAD_DIM=head_dim, BLOCK_ROWS=block_rows, ROTATE=rotate, ROUND_BEFORE_WEIGHT=round_before_weight,
        EMULATE_BF16=_emulate_bf16(x.dtype),
        num_warps=4)
    return out
