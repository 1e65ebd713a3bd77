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


import torch
import triton
import triton.language as tl

from framepack_kernels.launch import dot_precision, interpreting, require_kernel_device
from framepack_kernels.reference import (BASE_PATCH_SIZE, GROUP_NAMES, PackedPatches, PatchGroup,  # noqa: F401 (re-exported)
                               check_patch_groups, packed_patchify_reference, patch_kernel_size, patch_output_dtype,
                               rope_pool, token_grid)
from framepack_kernels.triton_helpers import rounded_cast, tile_dot


# --- kernels ----------------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) that spill no register on sm_80 and sm_90 at the model's shapes
# (bench/kernel_resources.py --all; bench/RESULTS.md). Half precision: at most 64 float32 accumulator registers per
# thread (128x128 tiles with four warps, or 128x256 with eight, hold 128 and spill). Float32 runs every product as
# three TF32 products (launch.dot_precision), whose split operands take three times the registers: one small tile
# (64x128 already spills 32 B on sm_80).
_HALF_TILES = ((128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 256, 32, 8, 3), (64, 64, 64, 4, 4),
               (128, 128, 128, 8, 2))
_FLOAT32_TILES = ((64, 64, 32, 8, 3),)


def _tile(config):
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps,
            config.num_stages)


def _gemm_configs():
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps,
                          num_stages=stages)
            for block_m, block_n, block_k, warps, stages in _HALF_TILES + _FLOAT32_TILES]


def _prune_gemm_configs(configs, named_args, **kwargs):
    if interpreting() or not torch.cuda.is_available():
        return configs[:1]
    device = named_args["Weight"].device
    max_shared = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"]
    major, minor = torch.cuda.get_device_capability(device)
    return kept_gemm_configs(configs, {**named_args, **kwargs}, major, minor, max_shared)


def kept_gemm_configs(configs, named_args, major, minor, max_shared):
    """The pruning rule on its own: the configs kept for a GPU of compute capability major.minor."""
    reduction = named_args["reduction"]
    element_size = named_args["Weight"].element_size()
    tiles = _FLOAT32_TILES if element_size == 4 else _HALF_TILES
    kept = []
    for config in configs:
        block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
        if _tile(config) not in tiles:
            continue
        # The noisy and clean groups reduce over only channels * 4 = 64: a wide K tile would be mostly padding.
        if block_k > max(32, triton.next_power_of_2(reduction)):
            continue
        if _shared_memory_estimate(config, element_size) > max_shared:
            continue
        # A 128-wide K tile of gathered latents needs registers that Ampere and Ada, without Hopper's
        # shared-memory MMA operands, do not have: it spills there.
        if block_k > 64 and major < 9:
            continue
        kept.append(config)
    return kept or [min(configs, key=lambda c: _shared_memory_estimate(c, element_size))]


def _shared_memory_estimate(config, element_size):
    """An upper bound: every pipeline stage holds one gathered latent tile and one weight tile."""
    block_m, block_n, block_k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * (block_m + block_n) * block_k * element_size


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
    batch = rows // tokens_per_sample
    token = rows % tokens_per_sample
    # The token's patch origin in the latents, in (t, h, w) row-major order as conv3d + flatten gives.
    patch_t = (token // (grid_h * grid_w)) * KERNEL_T
    patch_h = ((token // grid_w) % grid_h) * KERNEL_H
    patch_w = (token % grid_w) * KERNEL_W
    # Addresses: a 64-bit offset per row to its sample, 32-bit offsets within the sample (the host checks they
    # fit). Full 64-bit offsets per gathered element cost enough registers to spill.
    sample_base = Latents + batch.to(tl.int64) * stride_l_batch
    outputs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    output_ok = outputs < inner
    weight_base = Weight + outputs[None, :] * stride_w_out

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
        offsets = (channel * stride_l_channel)[None, :] + t * stride_l_frame + h * stride_l_row + w * stride_l_column
        patches = tl.load(sample_base[:, None] + offsets, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        weights = tl.load(weight_base + ks[:, None], mask=k_ok[:, None] & output_ok[None, :], other=0.0)
        if CAST_LATENTS:
            patches = rounded_cast(patches.to(tl.float32), weights.dtype, EMULATE_BF16)
        accumulator = tile_dot(patches, weights, accumulator, DOT_PRECISION, EMULATE_BF16)

    if HAS_BIAS:
        accumulator += tl.load(Bias + outputs, mask=output_ok, other=0.0).to(tl.float32)[None, :]
    out_ptrs = (Out + batch.to(tl.int64)[:, None] * stride_o_batch
                + (token_offset + token).to(tl.int64)[:, None] * stride_o_token + outputs[None, :])
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
    # A loop, not unrolled: 64 cells of the 4x group unrolled keep every load in flight at once and spill.
    for cell in range(POOL_T * POOL_H * POOL_W):
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

def packed_patchify(noisy: PatchGroup | None = None, clean: PatchGroup | None = None,
                    clean_2x: PatchGroup | None = None, clean_4x: PatchGroup | None = None) -> PackedPatches:
    """Patch-embed the present groups into one packed (batch, total, inner) sequence: clean_4x, clean_2x, clean, noisy.

    Each group's tokens are in (t, h, w) row-major order, as conv3d + flatten gives; the latents are replicate-
    padded at the end of T/H/W to a multiple of the group's kernel. With RoPE tables, also returns each token's
    cos/sin row (2x/4x groups: the base-grid table replicate-padded and average-pooled to the group's grid).
    Output dtype: the weights'; latents of another dtype are cast as they are loaded.
    """
    groups = check_patch_groups(noisy, clean, clean_2x, clean_4x)
    present = [g for g in groups if g is not None]
    tensors = [t for g in present for t in g if t is not None]
    require_kernel_device("packed_patchify", *tensors)
    dtype = patch_output_dtype(groups)
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
    grid_t, grid_h, grid_w = token_grid(group.latents, patch_kernel_size(group.weight))
    return grid_t * grid_h * grid_w


def _launch_patch_embed(group, tokens, token_offset, length, emulate_bf16):
    latents, weight = group.latents, group.weight
    kernel = patch_kernel_size(weight)
    _, grid_h, grid_w = token_grid(latents, kernel)
    batch, _, frames, height, width = latents.shape
    inner = weight.shape[0]
    # (inner, channels, kt, kh, kw) -> (inner, channels * kt * kh * kw): a view for the usual contiguous weight.
    weight = weight.reshape(inner, -1)
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    reduction = weight.shape[1]
    # The kernel addresses within one sample's latents, and within the weight, with 32-bit offsets.
    sample_extent = sum((size - 1) * stride for size, stride in zip(latents.shape[1:], latents.stride()[1:]))
    weight_extent = (inner - 1) * weight.stride(0) + reduction
    if max(sample_extent, weight_extent, batch * length) >= 2**31:
        raise ValueError(
            f"packed_patchify: latents {tuple(latents.shape)} (strides {latents.stride()}) or weight "
            f"{tuple(weight.shape)} span 2**31 elements or more per sample: split the batch or pass contiguous "
            "latents.")
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
        DOT_PRECISION=dot_precision(tokens.dtype), EMULATE_BF16=emulate_bf16,
    )


def _launch_pooled_rope(group, rope_cos, rope_sin, token_offset, length):
    kernel = patch_kernel_size(group.weight)
    pool = rope_pool(kernel)
    _, grid_h, grid_w = token_grid(group.latents, kernel)
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
