"""The eager PyTorch references of every kernel in kernels/: the DiT's plain path and the kernels' test oracle.

This module never imports Triton, so the engine runs its plain path (and the tests check the kernels against it) on
machines where Triton is absent. Each kernel module re-exports the reference beside its kernel.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from framepack_kernels.rotary import rotate_leading_tokens



def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """How far a fast path is from its reference: the largest absolute difference over the largest magnitude of the
    expected tensor (float64)."""
    actual, expected = actual.detach().double(), expected.detach().double().to(actual.device)
    if actual.shape != expected.shape:
        raise ValueError(f"relative_error: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}")
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def random_rope_tables(batch: int, tokens: int, head_dim: int, device="cpu"):
    """cos/sin tables (batch, tokens, head_dim) of random angles, each repeated for its interleaved pair as the DiT
    builds them: inputs for testing and timing the rotary kernels."""
    angles = torch.rand(batch, tokens, head_dim // 2, device=device) * 2 * math.pi
    return angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)


# --- norms and modulation -----------------------------------------------------------------------------------------

LAYER_NORM_EPS = 1e-6
RMS_NORM_EPS = 1e-6


def layer_norm_modulate_reference(x, shift, scale, eps=LAYER_NORM_EPS):
    """LayerNorm without affine over channels, then x * (1 + scale) + shift per sample, in x's dtype."""
    normalized = F.layer_norm(x, (x.shape[-1],), eps=eps)
    return (normalized * (1 + scale[:, None]) + shift[:, None]).to(x.dtype)


def gated_residual_reference(x, gate, y):
    """x + gate * y with the gate broadcast over tokens, in x's dtype."""
    return (x + gate[:, None] * y).to(x.dtype)


def gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale, eps=LAYER_NORM_EPS):
    """The residual update and the next sub-block's modulated norm: returns (x + gate * y, its modulated norm)."""
    residual = gated_residual_reference(x, gate, y)
    return residual, layer_norm_modulate_reference(residual, shift, scale, eps)


def rms_norm_rotary_reference(x, weight, eps=RMS_NORM_EPS, rope_cos=None, rope_sin=None, rotary_length=0,
                              round_before_weight=False):
    """Per-head RMSNorm computed in float32, then RoPE on the image tokens; the result in x's dtype.

    round_before_weight: round the normalized value to x's dtype before multiplying by the weight (and round the
    product again), as diffusers' and the official HunyuanVideo RMSNorm do with half-precision weights.
    """
    normalized = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    if round_before_weight:
        normalized = normalized.to(x.dtype) * weight
    else:
        normalized = normalized * weight.float()
    return rotate_leading_tokens(normalized.to(x.dtype), rope_cos, rope_sin, rotary_length)


# --- packed attention ---------------------------------------------------------------------------------------------

def packed_attention_reference(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None,
                               softmax_scale=None):
    """Plain PyTorch: rotate the image tokens of q and k, mask padded keys, softmax in float32; out in q's dtype."""
    q = rotate_leading_tokens(q, rope_cos, rope_sin, rotary_length)
    k = rotate_leading_tokens(k, rope_cos, rope_sin, rotary_length)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale
    if valid_lengths is not None:
        key_positions = torch.arange(k.shape[1], device=k.device)
        key_is_valid = key_positions[None, :] < valid_lengths.to(k.device)[:, None]
        scores = scores.masked_fill(~key_is_valid[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, v.float()).to(q.dtype)

# --- packed patchify ----------------------------------------------------------------------------------------------

# The noisy latents' patch size; RoPE tables are given on this grid and pooled by (group kernel / this) per group.
BASE_PATCH_SIZE = (1, 2, 2)
GROUP_NAMES = ("clean_4x", "clean_2x", "clean", "noisy")  # packing order


class PatchGroup(NamedTuple):
    """One latent group and its patch embedding.

    latents: (batch, channels, frames, height, width). weight: Conv3d weight (inner, channels, kt, kh, kw), the
    kernel also being the stride; bias: (inner,) or None. rope_cos/rope_sin (optional): the group's RoPE table on
    the base patch grid, (batch or 1, frames // 1, height // 2, width // 2, head_dim), cos/sin repeated per pair.
    """
    latents: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None
    rope_cos: torch.Tensor | None = None
    rope_sin: torch.Tensor | None = None


class PackedPatches(NamedTuple):
    """tokens (batch, total, inner); rope_cos/rope_sin (batch or 1, total, head_dim) float32 or None;
    group_lengths: tokens per sample of each group in packing order (clean_4x, clean_2x, clean, noisy), 0 if absent."""
    tokens: torch.Tensor
    rope_cos: torch.Tensor | None
    rope_sin: torch.Tensor | None
    group_lengths: tuple[int, int, int, int]


def patch_kernel_size(weight):
    return tuple(weight.shape[2:])


def token_grid(latents, kernel):
    # Replicate padding up to a multiple of the kernel: a partial patch at the end becomes one more token.
    return tuple(-(-size // k) for size, k in zip(latents.shape[2:], kernel))


def rope_pool(kernel):
    return tuple(k // base for k, base in zip(kernel, BASE_PATCH_SIZE))


def replicate_pad_to_multiple(x, kernel):
    """Pad the last three dims of a 5-D tensor at their end, repeating the edge, up to a multiple of `kernel`."""
    pad_t, pad_h, pad_w = ((-size) % k for size, k in zip(x.shape[2:], kernel))
    if pad_t or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")
    return x


def patch_tokens(latents, kernel, convolve):
    """Replicate-pad (batch, channels, t, h, w) to a multiple of `kernel`, convolve (kernel = stride: a Conv3d
    module, or F.conv3d with the weights bound) and flatten to tokens (batch, t * h * w, inner) in (t, h, w) order."""
    return convolve(replicate_pad_to_multiple(latents, kernel)).flatten(2).transpose(1, 2)


def pooled_rope_table(table, kernel):
    """A RoPE table on the base patch grid (batch, frames, rows, columns, head_dim) -> one float32 row per token of
    a group with patch `kernel` (batch, tokens, head_dim): replicate-padded and averaged over each patch."""
    pool = rope_pool(kernel)
    grid = table.float().permute(0, 4, 1, 2, 3)
    if pool != (1, 1, 1):
        grid = F.avg_pool3d(replicate_pad_to_multiple(grid, pool), pool, stride=pool)
    return grid.flatten(2).transpose(1, 2)


def _reference_group(group: PatchGroup, dtype):
    kernel = patch_kernel_size(group.weight)
    bias = group.bias.to(dtype) if group.bias is not None else None
    tokens = patch_tokens(group.latents.to(dtype), kernel,
                          lambda x: F.conv3d(x, group.weight.to(dtype), bias, stride=kernel))
    if group.rope_cos is None:
        return tokens, None, None
    return tokens, pooled_rope_table(group.rope_cos, kernel), pooled_rope_table(group.rope_sin, kernel)


def packed_patchify_reference(noisy=None, clean=None, clean_2x=None, clean_4x=None) -> PackedPatches:
    """Plain PyTorch: per group pad + conv3d + flatten (+ pad + avg_pool3d of its RoPE table), then cat."""
    groups = check_patch_groups(noisy, clean, clean_2x, clean_4x)
    dtype = patch_output_dtype(groups)
    pieces = [_reference_group(g, dtype) if g is not None else None for g in groups]
    present = [p for p in pieces if p is not None]
    tokens = torch.cat([p[0] for p in present], dim=1)
    lengths = tuple(p[0].shape[1] if p is not None else 0 for p in pieces)
    if present[0][1] is None:
        return PackedPatches(tokens, None, None, lengths)
    batch = max(p[1].shape[0] for p in present)
    rope_cos = torch.cat([p[1].expand(batch, -1, -1) for p in present], dim=1)
    rope_sin = torch.cat([p[2].expand(batch, -1, -1) for p in present], dim=1)
    return PackedPatches(tokens, rope_cos, rope_sin, lengths)


def patch_output_dtype(groups):
    dtypes = {g.weight.dtype for g in groups if g is not None}
    if len(dtypes) != 1:
        raise ValueError(
            f"packed_patchify: all patch-embedding weights must share one dtype, got {sorted(map(str, dtypes))}.")
    return dtypes.pop()


def check_patch_groups(noisy, clean, clean_2x, clean_4x):
    groups = (clean_4x, clean_2x, clean, noisy)  # packing order
    present = [(name, g) for name, g in zip(GROUP_NAMES, groups) if g is not None]
    if not present:
        raise ValueError("packed_patchify: every latent group is None; pass at least the noisy latents.")
    batch = present[0][1].latents.shape[0]
    with_rope = [g.rope_cos is not None for _, g in present]
    if any(with_rope) and not all(with_rope):
        raise ValueError("packed_patchify: give RoPE tables for every present group or for none of them.")
    inner = present[0][1].weight.shape[0]
    for name, group in present:
        latents, weight = group.latents, group.weight
        if latents.dim() != 5 or weight.dim() != 5 or latents.shape[1] != weight.shape[1]:
            raise ValueError(
                f"packed_patchify: {name} latents (batch, channels, frames, height, width) and Conv3d weight "
                f"(inner, channels, kt, kh, kw) disagree: {tuple(latents.shape)} vs {tuple(weight.shape)}.")
        if latents.shape[0] != batch or weight.shape[0] != inner:
            raise ValueError(
                f"packed_patchify: {name} has batch {latents.shape[0]} and inner {weight.shape[0]}, but the first "
                f"group has {batch} and {inner}; all groups must share them.")
        if group.bias is not None and group.bias.shape != (inner,):
            raise ValueError(f"packed_patchify: {name} bias must be ({inner},), got {tuple(group.bias.shape)}.")
        kernel = patch_kernel_size(weight)
        if any(k % base for k, base in zip(kernel, BASE_PATCH_SIZE)):
            raise ValueError(
                f"packed_patchify: {name} kernel {kernel} is not a multiple of the base patch {BASE_PATCH_SIZE}.")
        if group.rope_cos is not None:
            fine_grid = tuple(size // base for size, base in zip(latents.shape[2:], BASE_PATCH_SIZE))
            for table_name, table in (("rope_cos", group.rope_cos), ("rope_sin", group.rope_sin)):
                if (table is None or table.dim() != 5 or tuple(table.shape[1:4]) != fine_grid
                        or table.shape[0] not in (1, batch) or table.shape != group.rope_cos.shape):
                    raise ValueError(
                        f"packed_patchify: {name} {table_name} must be (batch or 1, {fine_grid[0]}, {fine_grid[1]}, "
                        f"{fine_grid[2]}, head_dim) on the base patch grid, got "
                        f"{None if table is None else tuple(table.shape)}.")
            pooled_grid = tuple(-(-size // p) for size, p in zip(fine_grid, rope_pool(kernel)))
            if pooled_grid != token_grid(latents, kernel):
                raise ValueError(
                    f"packed_patchify: {name} latents of size {tuple(latents.shape[2:])} give a token grid "
                    f"{token_grid(latents, kernel)} but a RoPE grid {pooled_grid}; use heights and widths "
                    f"divisible by {BASE_PATCH_SIZE[1]}.")
    head_dims = {g.rope_cos.shape[-1] for _, g in present if g.rope_cos is not None}
    if len(head_dims) > 1:
        raise ValueError(f"packed_patchify: RoPE tables disagree on head_dim: {sorted(head_dims)}.")
    return groups


# --- weight-only quantized matmuls --------------------------------------------------------------------------------
#
# A quantized linear weight (out_features, in_features) is stored as one of
#   fp8   float8_e4m3fn (or float8_e5m2) values and a float32 scale per output channel: w = q * scale[n]
#   int8  int8 values in [-127, 127] and a float32 scale per output channel:         w = q * scale[n]
#   int4  uint8 bytes of two 4-bit values in [0, 15] along the input dimension (element 2j in the low nibble,
#         2j + 1 in the high one), the input dimension padded to a multiple of the group size; a scale and a zero
#         point per (output channel, group):                                        w = (q - zero[n, g]) * scale[n, g]
# The storage dtype says which (float8 -> fp8, int8 -> int8, uint8 -> int4); the int4 group size is the padded input
# width over the number of groups, so a weight's tensors describe it completely.

FP8_E4M3_MAX = 448.0
INT8_MAX = 127
INT4_MAX = 15
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
# int4 group sizes: powers of two, so a kernel's K tile never straddles two groups.
INT4_GROUP_SIZES = (32, 64, 128, 256)


def weight_format(weight: torch.Tensor) -> str:
    """'fp8', 'int8' or 'int4', from the storage dtype of a quantized weight."""
    if weight.dtype in FP8_DTYPES:
        return "fp8"
    if weight.dtype == torch.int8:
        return "int8"
    if weight.dtype == torch.uint8:
        return "int4"
    raise ValueError(f"{weight.dtype} is not a quantized weight dtype (float8, int8, or uint8 for packed int4).")


def pack_int4(values: torch.Tensor) -> torch.Tensor:
    """(rows, even columns) integers in [0, 15] -> (rows, columns / 2) uint8, element 2j in the low nibble."""
    values = values.to(torch.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: (rows, bytes) uint8 -> (rows, 2 * bytes) uint8 in [0, 15]."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def int4_group_size(packed: torch.Tensor, scale: torch.Tensor) -> int:
    return 2 * packed.shape[1] // scale.shape[1]


def dequantize_reference(weight, scale, zero=None, in_features=None, dtype=torch.float32) -> torch.Tensor:
    """The float weight (out_features, in_features) a quantized one stands for, computed in float32, in `dtype`."""
    format_name = weight_format(weight)
    if format_name in ("fp8", "int8"):
        return (weight.float() * scale.float()[:, None]).to(dtype)
    groups = scale.shape[1]
    values = unpack_int4(weight).float().reshape(weight.shape[0], groups, -1)
    dequantized = ((values - zero.float()[:, :, None]) * scale.float()[:, :, None]).reshape(weight.shape[0], -1)
    return dequantized[:, :in_features].to(dtype)


def quantized_matmul_reference(x, weight, scale, zero=None, bias=None) -> torch.Tensor:
    """x @ w.T + bias with w the dequantized weight rounded to x's dtype: the plain path of a quantized linear."""
    dequantized = dequantize_reference(weight, scale, zero, x.shape[-1], x.dtype)
    return F.linear(x, dequantized, None if bias is None else bias.to(x.dtype))


def quantize_activations_fp8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (row) fp8 e4m3 quantization of activations (rows, features): (values, float32 scales (rows, 1))."""
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_E4M3_MAX
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


def fp8_scaled_matmul_reference(x, weight, scale, bias=None) -> torch.Tensor:
    """The fp8 compute path in plain float32: activations quantized to e4m3 per token, multiplied by the e4m3 weight,
    rescaled by both scales (+ bias); the result in x's dtype. x: (..., in_features)."""
    rows = x.reshape(-1, x.shape[-1])
    values, token_scale = quantize_activations_fp8_reference(rows)
    out = (values.float() @ weight.float().t()) * token_scale * scale.float()[None, :]
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])
