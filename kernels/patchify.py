"""FramePack's multi-kernel patchify, fused: every latent group patch-embedded straight into the packed sequence.

FramePack feeds the DiT one token sequence built from up to four latent groups, each cut into patches by its own
Conv3d (kernel = stride): the 4x-compressed history (4, 8, 8), the 2x history (2, 4, 4), the clean 1x latents
(1, 2, 2) and the noisy latents (1, 2, 2), packed in that order. Unfused, that is pad + conv3d + flatten +
transpose + cat per group, and the same again for each group's RoPE table (padded, then average-pooled down to the
coarser grid).

Here each group is one GEMM, tokens x (channels * kt * kh * kw) by that x inner, whose A operand is gathered from
the latents as it is loaded (replicate padding becomes a clamp of the index), and whose rows are written directly
into the group's slice of the packed output. A second small kernel gathers, pools and writes each token's RoPE
cos/sin row the same way. Nothing is padded, concatenated or copied in memory.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.launch import interpreting, require_kernel_device
from kernels.triton_helpers import rounded_cast, tile_dot

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


def _kernel_size(weight):
    return tuple(weight.shape[2:])


def _token_grid(latents, kernel):
    # Replicate padding up to a multiple of the kernel: a partial patch at the end becomes one more token.
    return tuple(-(-size // k) for size, k in zip(latents.shape[2:], kernel))


def _rope_pool(kernel):
    return tuple(k // base for k, base in zip(kernel, BASE_PATCH_SIZE))


def _replicate_pad_to_multiple(x, kernel):
    """Pad the last three dims of a 5-D tensor at their end, repeating the edge, up to a multiple of `kernel`."""
    pad_t, pad_h, pad_w = ((-size) % k for size, k in zip(x.shape[2:], kernel))
    if pad_t or pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h, 0, pad_t), mode="replicate")
    return x


# --- reference --------------------------------------------------------------------------------------------------

def _reference_group(group: PatchGroup, dtype):
    kernel = _kernel_size(group.weight)
    latents = _replicate_pad_to_multiple(group.latents.to(dtype), kernel)
    bias = group.bias.to(dtype) if group.bias is not None else None
    tokens = F.conv3d(latents, group.weight.to(dtype), bias, stride=kernel).flatten(2).transpose(1, 2)
    if group.rope_cos is None:
        return tokens, None, None
    pool = _rope_pool(kernel)
    pooled = []
    for table in (group.rope_cos, group.rope_sin):
        grid = _replicate_pad_to_multiple(table.float().permute(0, 4, 1, 2, 3), pool)
        pooled.append(F.avg_pool3d(grid, pool, stride=pool).flatten(2).transpose(1, 2))
    return tokens, pooled[0], pooled[1]


def packed_patchify_reference(noisy=None, clean=None, clean_2x=None, clean_4x=None) -> PackedPatches:
    """Plain PyTorch: per group pad + conv3d + flatten (+ pad + avg_pool3d of its RoPE table), then cat."""
    groups = _check_groups(noisy, clean, clean_2x, clean_4x)
    dtype = _output_dtype(groups)
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


# --- kernels ----------------------------------------------------------------------------------------------------

def _gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    configs = []
    for block_m, block_n, block_k, warps, stages in (
        (128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 4, 3),
        (128, 256, 64, 8, 3), (64, 64, 64, 4, 4), (128, 128, 128, 8, 2), (64, 256, 32, 8, 3),
    ):
        configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k},
                                     num_warps=warps, num_stages=stages))
    return configs


def _prune_gemm_configs(configs, named_args, **kwargs):
    if interpreting() or not torch.cuda.is_available():
        return configs[:1]
    reduction = named_args["reduction"]
    device = named_args["Weight"].device
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    element_size = named_args["Weight"].element_size()
    kept = []
    for config in configs:
        block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        # The noisy and clean groups reduce over only channels * 4 = 64: a wide K tile would be mostly padding.
        if block_k > max(32, triton.next_power_of_2(reduction)):
            continue
        shared = config.num_stages * (block_m + block_n) * block_k * element_size
        if shared > max_shared:
            continue
        kept.append(config)
    return kept or configs[-3:-2]


@triton.autotune(configs=_gemm_configs(), key=["reduction", "inner", "KERNEL_T", "KERNEL_H", "KERNEL_W"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def _patch_embed_kernel(
    Latents, Weight, Bias, Out,
    stride_l_batch, stride_l_channel, stride_l_frame, stride_l_row, stride_l_column,
    stride_w_out, stride_o_batch, stride_o_token,
    token_offset, tokens_per_sample, total_rows, frames, height, width, grid_h, grid_w, inner, reduction,
    KERNEL_T: tl.constexpr, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    CAST_LATENTS: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < total_rows
    rows = rows.to(tl.int64)
    batch = rows // tokens_per_sample
    token = rows % tokens_per_sample
    # The token's patch origin in the latents, in (t, h, w) row-major order as conv3d + flatten gives.
    patch_t = (token // (grid_h * grid_w)) * KERNEL_T
    patch_h = ((token // grid_w) % grid_h) * KERNEL_H
    patch_w = (token % grid_w) * KERNEL_W
    row_base = batch * stride_l_batch
    outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    output_ok = outputs < inner

    accumulator = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, reduction, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_ok = ks < reduction
        # Reduction index -> (channel, dt, dh, dw) in the Conv3d weight's order.
        channel = ks // (KERNEL_T * KERNEL_H * KERNEL_W)
        offset_t = (ks // (KERNEL_H * KERNEL_W)) % KERNEL_T
        offset_h = (ks // KERNEL_W) % KERNEL_H
        offset_w = ks % KERNEL_W
        # Replicate padding: a patch running past the end reads the last frame / row / column again.
        t = tl.minimum(patch_t[:, None] + offset_t[None, :], frames - 1)
        h = tl.minimum(patch_h[:, None] + offset_h[None, :], height - 1)
        w = tl.minimum(patch_w[:, None] + offset_w[None, :], width - 1)
        latent_ptrs = (Latents + row_base[:, None] + channel[None, :].to(tl.int64) * stride_l_channel
                       + t * stride_l_frame + h * stride_l_row + w * stride_l_column)
        patches = tl.load(latent_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        weights = tl.load(Weight + outputs[None, :].to(tl.int64) * stride_w_out + ks[:, None],
                          mask=k_ok[:, None] & output_ok[None, :], other=0.0)
        if CAST_LATENTS:
            patches = rounded_cast(patches.to(tl.float32), weights.dtype, EMULATE_BF16)
        accumulator = tile_dot(patches, weights, accumulator, DOT_PRECISION, EMULATE_BF16)

    if HAS_BIAS:
        accumulator += tl.load(Bias + outputs, mask=output_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (Out + batch[:, None] * stride_o_batch + (token_offset + token)[:, None] * stride_o_token
                + outputs[None, :])
    tl.store(out_ptrs, rounded_cast(accumulator, Out.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & output_ok[None, :])


@triton.jit
def _pooled_rope_kernel(
    Cos, Sin, OutCos, OutSin,
    stride_table_batch, stride_table_frame, stride_table_row, stride_table_column,
    stride_out_batch, stride_out_token,
    token_offset, tokens_per_sample, total_rows, fine_t, fine_h, fine_w, grid_h, grid_w,
    POOL_T: tl.constexpr, POOL_H: tl.constexpr, POOL_W: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = (rows < total_rows)[:, None]
    rows = rows.to(tl.int64)
    batch = rows // tokens_per_sample
    token = rows % tokens_per_sample
    origin_t = (token // (grid_h * grid_w)) * POOL_T
    origin_h = ((token // grid_w) % grid_h) * POOL_H
    origin_w = (token % grid_w) * POOL_W
    dims = tl.arange(0, HEAD_DIM)
    cos_sum = tl.zeros([BLOCK_ROWS, HEAD_DIM], dtype=tl.float32)
    sin_sum = tl.zeros([BLOCK_ROWS, HEAD_DIM], dtype=tl.float32)
    # Average pooling over the token's cell of the base grid, edge cells repeated as replicate padding does.
    for cell in tl.static_range(POOL_T * POOL_H * POOL_W):
        t = tl.minimum(origin_t + cell // (POOL_H * POOL_W), fine_t - 1)
        h = tl.minimum(origin_h + (cell // POOL_W) % POOL_H, fine_h - 1)
        w = tl.minimum(origin_w + cell % POOL_W, fine_w - 1)
        offsets = (batch * stride_table_batch + t * stride_table_frame + h * stride_table_row
                   + w * stride_table_column)[:, None] + dims[None, :]
        cos_sum += tl.load(Cos + offsets, mask=row_ok, other=0.0)
        sin_sum += tl.load(Sin + offsets, mask=row_ok, other=0.0)
    out_offsets = (batch * stride_out_batch + (token_offset + token) * stride_out_token)[:, None] + dims[None, :]
    cells = POOL_T * POOL_H * POOL_W
    tl.store(OutCos + out_offsets, cos_sum / cells, mask=row_ok)
    tl.store(OutSin + out_offsets, sin_sum / cells, mask=row_ok)


# --- wrapper ----------------------------------------------------------------------------------------------------

def _output_dtype(groups):
    dtypes = {g.weight.dtype for g in groups if g is not None}
    if len(dtypes) != 1:
        raise ValueError(
            f"packed_patchify: all patch-embedding weights must share one dtype, got {sorted(map(str, dtypes))}.")
    return dtypes.pop()


def _check_groups(noisy, clean, clean_2x, clean_4x):
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
        kernel = _kernel_size(weight)
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
            pooled_grid = tuple(-(-size // p) for size, p in zip(fine_grid, _rope_pool(kernel)))
            if pooled_grid != _token_grid(latents, kernel):
                raise ValueError(
                    f"packed_patchify: {name} latents of size {tuple(latents.shape[2:])} give a token grid "
                    f"{_token_grid(latents, kernel)} but a RoPE grid {pooled_grid}; use heights and widths "
                    f"divisible by {BASE_PATCH_SIZE[1]}.")
    head_dims = {g.rope_cos.shape[-1] for _, g in present if g.rope_cos is not None}
    if len(head_dims) > 1:
        raise ValueError(f"packed_patchify: RoPE tables disagree on head_dim: {sorted(head_dims)}.")
    return groups


def packed_patchify(noisy: PatchGroup | None = None, clean: PatchGroup | None = None,
                    clean_2x: PatchGroup | None = None, clean_4x: PatchGroup | None = None) -> PackedPatches:
    """Patch-embed the present groups into one packed (batch, total, inner) sequence: clean_4x, clean_2x, clean, noisy.

    Each group's tokens are in (t, h, w) row-major order, as conv3d + flatten gives; the latents are replicate-
    padded at the end of T/H/W to a multiple of the group's kernel. With RoPE tables, also returns each token's
    cos/sin row (2x/4x groups: the base-grid table replicate-padded and average-pooled to the group's grid).
    Output dtype: the weights'; latents of another dtype are cast as they are loaded.
    """
    groups = _check_groups(noisy, clean, clean_2x, clean_4x)
    present = [g for g in groups if g is not None]
    tensors = [t for g in present for t in g if t is not None]
    require_kernel_device("packed_patchify", *tensors)
    dtype = _output_dtype(groups)
    batch = present[0].latents.shape[0]
    inner = present[0].weight.shape[0]
    device = present[0].latents.device
    lengths = tuple(0 if g is None else _grid_size(g) for g in groups)
    total = sum(lengths)
    tokens = torch.empty((batch, total, inner), dtype=dtype, device=device)
    with_rope = present[0].rope_cos is not None
    rope_cos = rope_sin = None
    if with_rope:
        rope_batch = max(g.rope_cos.shape[0] for g in present)
        head_dim = present[0].rope_cos.shape[-1]
        if head_dim & (head_dim - 1):
            raise ValueError(f"packed_patchify: RoPE head_dim must be a power of two, got {head_dim}.")
        rope_cos = torch.empty((rope_batch, total, head_dim), dtype=torch.float32, device=device)
        rope_sin = torch.empty_like(rope_cos)
    if total == 0 or batch == 0:
        return PackedPatches(tokens, rope_cos, rope_sin, lengths)

    emulate_bf16 = interpreting() and dtype == torch.bfloat16
    token_offset = 0
    for group, length in zip(groups, lengths):
        if group is None:
            continue
        _launch_patch_embed(group, tokens, token_offset, length, emulate_bf16)
        if with_rope:
            _launch_pooled_rope(group, rope_cos, rope_sin, token_offset, length)
        token_offset += length
    return PackedPatches(tokens, rope_cos, rope_sin, lengths)


def _grid_size(group):
    grid_t, grid_h, grid_w = _token_grid(group.latents, _kernel_size(group.weight))
    return grid_t * grid_h * grid_w


def _launch_patch_embed(group, tokens, token_offset, length, emulate_bf16):
    latents, weight = group.latents, group.weight
    kernel = _kernel_size(weight)
    _, grid_h, grid_w = _token_grid(latents, kernel)
    batch, _, frames, height, width = latents.shape
    inner = weight.shape[0]
    # (inner, channels, kt, kh, kw) -> (inner, channels * kt * kh * kw): a view for the usual contiguous weight.
    weight = weight.reshape(inner, -1)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    reduction = weight.shape[1]
    bias = group.bias if group.bias is not None else weight
    total_rows = batch * length

    def grid(meta):
        return (triton.cdiv(total_rows, meta["BLOCK_M"]), triton.cdiv(inner, meta["BLOCK_N"]))

    _patch_embed_kernel[grid](
        latents, weight, bias, tokens,
        *latents.stride(), weight.stride(0), tokens.stride(0), tokens.stride(1),
        token_offset, length, total_rows, frames, height, width, grid_h, grid_w, inner, reduction,
        KERNEL_T=kernel[0], KERNEL_H=kernel[1], KERNEL_W=kernel[2], HAS_BIAS=group.bias is not None,
        CAST_LATENTS=latents.dtype != tokens.dtype,
        DOT_PRECISION="ieee" if tokens.dtype == torch.float32 else "tf32", EMULATE_BF16=emulate_bf16,
    )


def _launch_pooled_rope(group, rope_cos, rope_sin, token_offset, length):
    kernel = _kernel_size(group.weight)
    pool = _rope_pool(kernel)
    _, grid_h, grid_w = _token_grid(group.latents, kernel)
    cos = group.rope_cos.to(torch.float32)
    sin = group.rope_sin.to(torch.float32)
    if cos.stride() != sin.stride() or cos.stride(-1) != 1:
        cos, sin = cos.contiguous(), sin.contiguous()
    out_batch, _, head_dim = rope_cos.shape
    table_batch_stride = cos.stride(0) if cos.shape[0] > 1 else 0
    _, fine_t, fine_h, fine_w, _ = cos.shape
    total_rows = out_batch * length
    block_rows = max(1, min(triton.next_power_of_2(total_rows), 4096 // head_dim))
    _pooled_rope_kernel[(triton.cdiv(total_rows, block_rows),)](
        cos, sin, rope_cos, rope_sin,
        table_batch_stride, cos.stride(1), cos.stride(2), cos.stride(3),
        rope_cos.stride(0), rope_cos.stride(1),
        token_offset, length, total_rows, fine_t, fine_h, fine_w, grid_h, grid_w,
        POOL_T=pool[0], POOL_H=pool[1], POOL_W=pool[2], HEAD_DIM=head_dim, BLOCK_ROWS=block_rows, num_warps=4,
    )
