"""Packed joint attention with the rotary embedding fused into the tile loads, and its PyTorch reference.

Each sample's sequence is `[image tokens | text tokens]`; the first `rotary_length` tokens of q and k are rotated
(interleaved pairs, cos/sin repeated per pair) as their tiles are loaded, so no rotated copy of q or k is ever
written. Keys at positions >= valid_lengths[b] are the padded text of a shorter prompt: their tiles are never
loaded, and the one tile that straddles the boundary is masked.

The kernel is a flash-attention forward: one program per (query block, batch * head), an online softmax in base 2
(the softmax scale is folded with log2(e) so the exponent is a single exp2), float32 accumulation. The key loop is
split into ranges with `constexpr` flags so most tiles take the fast path: fully rotated and unmasked for image
tiles, unrotated and unmasked for text tiles, and only the boundary tiles pay for per-row checks.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels.launch import interpreting, require_kernel_device, rope_launch_tables
from kernels.reference import packed_attention_reference  # noqa: F401 (re-exported beside the kernel)
from kernels.triton_helpers import rounded_cast, tile_dot

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# --- autotuning -------------------------------------------------------------------------------------------------

def _candidate_configs():
    if interpreting():
        # The interpreter runs every program in Python: one small config keeps tests fast while still giving
        # several key tiles (full, straddling the rotary boundary, masked) on 40-70 token sequences.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                                 num_warps=warps, num_stages=stages))
    return configs


def _shared_memory_estimate(config, head_dim, element_size):
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    # The q tile stays resident; k and v tiles are multi-buffered by the software pipeline; p is staged once.
    q_tile = block_m * head_dim * element_size
    kv_tiles = max(config.num_stages - 1, 1) * 2 * block_n * head_dim * element_size
    p_tile = block_m * block_n * element_size
    return q_tile + kv_tiles + p_tile


def _device_limits(device):
    """(major, minor, max shared memory per block in bytes) of the GPU that will run the kernel."""
    major, minor = torch.cuda.get_device_capability(device)
    properties = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return major, minor, properties["max_shared_mem"]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit this GPU's shared memory and suit its architecture (Ampere, Ada, Hopper)."""
    if interpreting() or not torch.cuda.is_available():
        return configs[:1]
    head_dim = kwargs["HEAD_DIM"] if "HEAD_DIM" in kwargs else named_args["HEAD_DIM"]
    element_size = named_args["Q"].element_size()
    major, minor, max_shared = _device_limits(named_args["Q"].device)
    kept = []
    for config in configs:
        block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
        if _shared_memory_estimate(config, head_dim, element_size) > max_shared:
            continue
        # Scores of a 128x128 tile plus a 128-wide accumulator spill registers with only four warps.
        if block_m * block_n >= 128 * 128 and config.num_warps == 4:
            continue
        # Eight warps need a big tile to keep busy.
        if block_m * block_n < 128 * 64 and config.num_warps == 8:
            continue
        # A tall-skinny tile only adds key-loop iterations per loaded q tile.
        if block_m < block_n:
            continue
        # Without Hopper's register file tricks a 128-wide key tile at head_dim >= 128 spills.
        if head_dim >= 128 and block_n > 64 and major < 9:
            continue
        if head_dim >= 256 and block_n > 64:
            continue
        if major >= 9:
            # Hopper: BLOCK_M = 128 feeds its warpgroup MMAs; 228 KB of shared memory affords deep pipelines.
            if block_m != 128 or config.num_stages < 3:
                continue
        elif major == 8 and minor != 0:
            # Ada (sm_89) and consumer Ampere (sm_86/87): ~100 KB of shared memory, fewer registers per SM.
            if config.num_stages > 3 or block_n > 64:
                continue
        elif major == 8:
            # A100 (sm_80): 164 KB of shared memory; a fourth stage only pays off for narrow key tiles.
            if config.num_stages > 3 and block_n > 32:
                continue
        kept.append(config)
    if not kept:
        kept = [min(configs, key=lambda c: _shared_memory_estimate(c, head_dim, element_size))]
    return kept


def _sequence_bucket(tokens: int) -> int:
    # Autotune once per power-of-two bucket of sequence length rather than once per exact length.
    return triton.next_power_of_2(max(tokens, 16))


# --- the kernel ------------------------------------------------------------------------------------------------

@triton.jit
def _load_tile(base, stride_token, rows, row_limit, rope_cos, rope_sin, stride_rope_token, rotary_length, dims,
               ROTATE: tl.constexpr, ROTATE_EVERY_ROW: tl.constexpr, MASK_ROWS: tl.constexpr,
               EMULATE_BF16: tl.constexpr):
    """Load a (rows, head_dim) tile; with ROTATE, rotate its rows below rotary_length in float32 as it arrives.

    ROTATE_EVERY_ROW is the fast path for tiles known to lie wholly inside the rotary (image) range and the valid
    keys: no per-row checks at all.
    """
    row_offsets = rows.to(tl.int64)[:, None] * stride_token
    if MASK_ROWS:
        row_ok = rows < row_limit
        tile = tl.load(base + row_offsets + dims[None, :], mask=row_ok[:, None], other=0.0)
    else:
        tile = tl.load(base + row_offsets + dims[None, :])
    if ROTATE:
        # Element d pairs with d ^ 1; the pair rotates as (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin).
        partner_dims = dims ^ 1
        partner_sign = tl.where(dims % 2 == 0, -1.0, 1.0)
        rope_offsets = rows.to(tl.int64)[:, None] * stride_rope_token + dims[None, :]
        if ROTATE_EVERY_ROW:
            partner = tl.load(base + row_offsets + partner_dims[None, :])
            cos = tl.load(rope_cos + rope_offsets)
            sin = tl.load(rope_sin + rope_offsets)
        else:
            in_rotary = (rows < rotary_length)[:, None]
            partner = tl.load(base + row_offsets + partner_dims[None, :], mask=in_rotary, other=0.0)
            # cos = 1, sin = 0 outside the rotary range leaves text tokens exactly as they are.
            cos = tl.load(rope_cos + rope_offsets, mask=in_rotary, other=1.0)
            sin = tl.load(rope_sin + rope_offsets, mask=in_rotary, other=0.0)
        rotated = tile.to(tl.float32) * cos + partner.to(tl.float32) * partner_sign[None, :] * sin
        tile = rounded_cast(rotated, tile.dtype, EMULATE_BF16)
    return tile


@triton.jit
def _attend_key_range(accumulator, row_max, row_sum, q, k_base, v_base, stride_k_token, stride_v_token,
                      rope_cos, rope_sin, stride_rope_token, rotary_length, valid_length, key_start, key_end,
                      dims, scale_log2,
                      BLOCK_N: tl.constexpr, ROTATE: tl.constexpr, ROTATE_EVERY_ROW: tl.constexpr,
                      MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    for start in range(key_start, key_end, BLOCK_N):
        key_rows = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, stride_k_token, key_rows, valid_length, rope_cos, rope_sin, stride_rope_token,
                       rotary_length, dims, ROTATE, ROTATE_EVERY_ROW, MASK_KEYS, EMULATE_BF16)
        scores = tile_dot(q, tl.trans(k), None, DOT_PRECISION, EMULATE_BF16) * scale_log2
        if MASK_KEYS:
            scores = tl.where((key_rows < valid_length)[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probabilities = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, 1)
        v = _load_tile(v_base, stride_v_token, key_rows, valid_length, rope_cos, rope_sin, stride_rope_token,
                       rotary_length, dims, False, False, MASK_KEYS, EMULATE_BF16)
        accumulator = accumulator * correction[:, None]
        accumulator = tile_dot(rounded_cast(probabilities, v.dtype, EMULATE_BF16), v, accumulator, DOT_PRECISION,
                               EMULATE_BF16)
        row_max = new_max
    return accumulator, row_max, row_sum


@triton.autotune(configs=_candidate_configs(), key=["sequence_bucket", "HEAD_DIM", "ROTATE"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _packed_attention_kernel(
    Q, K, V, Out, RopeCos, RopeSin, ValidLengths,
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_token, stride_k_head,
    stride_v_batch, stride_v_token, stride_v_head,
    stride_o_batch, stride_o_token, stride_o_head,
    stride_rope_batch, stride_rope_token,
    num_heads, num_tokens, rotary_length, scale_log2,
    sequence_bucket,
    HEAD_DIM: tl.constexpr, ROTATE: tl.constexpr, HAS_VALID_LENGTHS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    query_block = tl.program_id(0)
    batch_head = tl.program_id(1)
    batch = (batch_head // num_heads).to(tl.int64)
    head = (batch_head % num_heads).to(tl.int64)
    if HAS_VALID_LENGTHS:
        valid_length = tl.minimum(tl.load(ValidLengths + batch).to(tl.int32), num_tokens)
    else:
        valid_length = num_tokens

    dims = tl.arange(0, HEAD_DIM)
    query_rows = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    q_base = Q + batch * stride_q_batch + head * stride_q_head
    k_base = K + batch * stride_k_batch + head * stride_k_head
    v_base = V + batch * stride_v_batch + head * stride_v_head
    out_ptrs = (Out + batch * stride_o_batch + head * stride_o_head
                + query_rows.to(tl.int64)[:, None] * stride_o_token + dims[None, :])
    cos_base = RopeCos + batch * stride_rope_batch
    sin_base = RopeSin + batch * stride_rope_batch
    store_mask = (query_rows < num_tokens)[:, None]

    if query_block * BLOCK_M < valid_length:
        q = _load_tile(q_base, stride_q_token, query_rows, num_tokens, cos_base, sin_base, stride_rope_token,
                       rotary_length, dims, ROTATE, False, True, EMULATE_BF16)
        accumulator = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)

        rotary_end = tl.minimum(rotary_length, valid_length)  # the host passes rotary_length 0 without ROTATE
        full_rotary_end = (rotary_end // BLOCK_N) * BLOCK_N
        full_valid_end = (valid_length // BLOCK_N) * BLOCK_N
        boundary_end = tl.minimum(tl.cdiv(rotary_end, BLOCK_N) * BLOCK_N, full_valid_end)
        boundary_end = tl.maximum(boundary_end, full_rotary_end)
        # Image tiles: every row rotated, no masks.
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, stride_k_token, stride_v_token, cos_base, sin_base,
            stride_rope_token, rotary_length, valid_length, 0, full_rotary_end, dims, scale_log2,
            BLOCK_N, ROTATE, True, False, DOT_PRECISION, EMULATE_BF16)
        # The tile that straddles the end of the image tokens: rotate row by row.
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, stride_k_token, stride_v_token, cos_base, sin_base,
            stride_rope_token, rotary_length, valid_length, full_rotary_end, boundary_end, dims, scale_log2,
            BLOCK_N, ROTATE, False, False, DOT_PRECISION, EMULATE_BF16)
        # Text tiles: no rotation, no masks.
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, stride_k_token, stride_v_token, cos_base, sin_base,
            stride_rope_token, rotary_length, valid_length, boundary_end, full_valid_end, dims, scale_log2,
            BLOCK_N, False, False, False, DOT_PRECISION, EMULATE_BF16)
        # The last, partly valid tile: mask the padded keys (and rotate row by row in case it holds image tokens).
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, stride_k_token, stride_v_token, cos_base, sin_base,
            stride_rope_token, rotary_length, valid_length, full_valid_end, valid_length, dims, scale_log2,
            BLOCK_N, ROTATE, False, True, DOT_PRECISION, EMULATE_BF16)

        out = accumulator / row_sum[:, None]
        tl.store(out_ptrs, rounded_cast(out, Out.dtype.element_ty, EMULATE_BF16), mask=store_mask)
    else:
        # Every query of this block is padding: its output is unspecified, but zeros keep NaNs out of later layers.
        tl.store(out_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=Out.dtype.element_ty), mask=store_mask)


def _check_inputs(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(
            f"packed_attention: q, k, v must share one (batch, tokens, heads, head_dim) shape, got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}; pass the packed sequence for all three.")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"packed_attention: q, k, v must share a dtype among float16, bfloat16, float32, got "
            f"{q.dtype}, {k.dtype}, {v.dtype}; cast them first.")
    batch, tokens, _, head_dim = q.shape
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"packed_attention: head_dim {head_dim} is not supported; use one of {SUPPORTED_HEAD_DIMS}.")
    if rope_cos is not None and rotary_length > 0:
        expected = (rotary_length, head_dim)
        for name, table in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
            if (table is None or table.dim() != 3 or tuple(table.shape[1:]) != expected
                    or table.shape[0] not in (1, batch)):
                raise ValueError(
                    f"packed_attention: {name} must have shape (batch or 1, {rotary_length}, {head_dim}), got "
                    f"{None if table is None else tuple(table.shape)}; build it for the image tokens only.")
        if rotary_length > tokens:
            raise ValueError(f"packed_attention: rotary_length {rotary_length} exceeds the {tokens} tokens of q.")
    if valid_lengths is not None and tuple(valid_lengths.shape) != (batch,):
        raise ValueError(
            f"packed_attention: valid_lengths must have shape ({batch},), got {tuple(valid_lengths.shape)}.")


def packed_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None, softmax_scale=None):
    """Joint attention over packed `[image | text]` sequences with RoPE fused into the loads.

    q, k, v: (batch, tokens, heads, head_dim), unrotated, float16/bfloat16/float32, head_dim a power of two 16-256.
    rope_cos, rope_sin: (batch or 1, rotary_length, head_dim) float32, cos/sin repeated per interleaved pair.
    valid_lengths: (batch,) integers; keys at positions >= valid_lengths[b] are never attended. None = all valid.
    Returns (batch, tokens, heads, head_dim) in q's dtype; rows at padded query positions are zeros when the whole
    query block is padding and otherwise unspecified.
    """
    _check_inputs(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths)
    require_kernel_device("packed_attention", q, k, v, rope_cos, rope_sin, valid_lengths)
    # The kernel addresses head_dim with unit stride; other strides are free (views of a fused qkv projection work).
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    batch, tokens, heads, head_dim = q.shape
    out = torch.empty((batch, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    if tokens == 0 or batch == 0:
        return out

    rotate = rope_cos is not None and rotary_length > 0
    rope_cos, rope_sin, stride_rope_batch, stride_rope_token = rope_launch_tables(rope_cos, rope_sin, rotate, q)
    rotary_length = rotary_length if rotate else 0
    if valid_lengths is not None:
        valid_lengths = valid_lengths.to(device=q.device, dtype=torch.int32).contiguous()

    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
    # fp32 inputs get true fp32 products (tf32 would miss the 1e-5 parity); half inputs use the tensor cores as-is.
    dot_precision = "ieee" if q.dtype == torch.float32 else "tf32"

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)

    _packed_attention_kernel[grid](
        q, k, v, out, rope_cos, rope_sin, valid_lengths if valid_lengths is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        stride_rope_batch, stride_rope_token,
        heads, tokens, rotary_length, scale * 1.4426950408889634,
        _sequence_bucket(tokens),
        HEAD_DIM=head_dim, ROTATE=rotate, HAS_VALID_LENGTHS=valid_lengths is not None,
        DOT_PRECISION=dot_precision, EMULATE_BF16=interpreting() and q.dtype == torch.bfloat16,
    )
    return out
