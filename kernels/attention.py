"""Packed joint attention: a flash-attention forward over `[image tokens | text tokens]` sequences.

Each sample's sequence is `[image tokens | text tokens]`; the first `rotary_length` tokens of q and k get the
rotary embedding (interleaved pairs, cos/sin repeated per pair). Keys at positions >= valid_lengths[b] are the
padded text of a shorter prompt: their tiles are never loaded, and the one tile that straddles the boundary is
masked.

The rotation is one memory-bound pass over q and k (`_rotate_kernel`: at the model's 19k tokens it reads and
writes about 0.5 GB, against 4.5 TFLOP of attention) before the attention kernel, which is then a plain flash-attention forward: one program per
(query block, batch * head), an online softmax in base 2 (the softmax scale is folded with log2(e) so the exponent
is a single exp2), float32 accumulation, unmasked key tiles up to the last valid one. Rotating inside the key loop
instead would keep float32 cos/sin tiles and a second, pair-swapped copy of K on every pipeline stage: compiled for
real GPUs (bench/kernel_resources.py) that needed 2.3-2.7x the shared memory and spilled registers.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from framepack_kernels.launch import dot_precision, interpreting, require_kernel_device, rope_launch_tables
from framepack_kernels.reference import packed_attention_reference  # noqa: F401 (re-exported beside the kernel)
from framepack_kernels.triton_helpers import head_rows, rotate_pairs, rounded_cast, tile_dot

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)


# --- autotuning -------------------------------------------------------------------------------------------------

def _candidate_configs():
    if interpreting():
        # The interpreter runs every program in Python: one small config keeps tests fast while still giving
        # several key tiles (full and masked) on 40-70 token sequences.
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=1)]
    configs = []
    for block_m in (64, 128):
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    configs.append(triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n},
                                                 num_warps=warps, num_stages=stages))
    # Unpipelined, the smallest footprint: only for what fits nothing else (head_dim 256 on a ~100 KB GPU).
    for warps in (4, 8):
        configs.append(triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=warps, num_stages=1))
    return configs


def _shared_memory_estimate(config, head_dim, element_size):
    """An upper bound on the shared memory the compiled kernel allocates (checked by tests/test_kernel_resources.py).

    Hopper keeps the q tile and num_stages k and v tiles in shared memory for its warpgroup MMAs; Ampere and Ada
    keep one k/v stage fewer but stage the probabilities p there.
    """
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    q_tile = block_m * head_dim * element_size
    kv_tiles = config.num_stages * 2 * block_n * head_dim * element_size
    p_tile = block_m * block_n * element_size
    return q_tile + kv_tiles + p_tile


def _tile_registers(config, head_dim):
    """32-bit registers per thread held by the float32 accumulator (BLOCK_M x head_dim) and scores (BLOCK_M x BLOCK_N)."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return block_m * (head_dim + block_n) / (32 * config.num_warps)


# The most registers per thread those tiles may take before ptxas spills (255 per thread in all), as measured by
# bench/kernel_resources.py at head_dim 128: Hopper's warpgroup MMAs read q and k from shared memory, while on
# Ampere and Ada the mma.sync operands of q, k and v need registers beside the tiles.
TILE_REGISTER_BUDGET_HOPPER = 128
TILE_REGISTER_BUDGET_AMPERE = 80


def _device_limits(device):
    """(major, minor, max shared memory per block in bytes) of the GPU that will run the kernel."""
    major, minor = torch.cuda.get_device_capability(device)
    properties = triton.runtime.driver.active.utils.get_device_properties(device.index or 0)
    return major, minor, properties["max_shared_mem"]


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs that fit this GPU's shared memory and registers and suit its architecture."""
    if interpreting() or not torch.cuda.is_available():
        return configs[:1]
    return kept_configs(configs, {**named_args, **kwargs}, *_device_limits(named_args["Q"].device))


def kept_configs(configs, named_args, major, minor, max_shared):
    """The pruning rule on its own: the configs kept for a GPU of compute capability major.minor.

    Every config kept at the model's shapes on sm_80 and sm_90 is compiled in CI (tests/test_kernel_resources.py),
    which asserts that it fits shared memory and spills no register.
    """
    head_dim = named_args["HEAD_DIM"]
    element_size = named_args["Q"].element_size()
    hopper = major >= 9
    register_budget = TILE_REGISTER_BUDGET_HOPPER if hopper else TILE_REGISTER_BUDGET_AMPERE
    kept = []
    for config in configs:
        block_m, block_n, stages = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_stages
        if _shared_memory_estimate(config, head_dim, element_size) > max_shared:
            continue
        if _tile_registers(config, head_dim) > register_budget:
            continue
        # A tall-skinny tile only adds key-loop iterations per loaded q tile.
        if block_m < block_n:
            continue
        # Eight warps need enough of a tile to share: at least a 64 x 64 tile's at head_dim 128.
        if config.num_warps == 8 and block_m * (head_dim + block_n) < 64 * (128 + 64):
            continue
        if stages == 1:  # the last resort below
            continue
        # Float32 runs each product as three TF32 products (launch.dot_precision): the split operands of p take
        # registers a wide key tile does not leave. At head_dim >= 64 every tile tried spills some (bench/RESULTS.md).
        if element_size == 4 and block_n > 32:
            continue
        if hopper:
            # Hopper: 228 KB of shared memory affords deep pipelines.
            if stages < 3:
                continue
        elif major == 8 and minor == 0:
            # A100 (sm_80): 164 KB of shared memory; a fourth stage only pays off for narrow key tiles.
            if stages < 3 or (stages > 3 and block_n > 32):
                continue
        elif stages > 3:
            # Ada (sm_89) and consumer Ampere (sm_86/87): ~100 KB of shared memory.
            continue
        kept.append(config)
    if hopper and any(c.kwargs["BLOCK_M"] == 128 for c in kept):
        # BLOCK_M = 128 feeds Hopper's warpgroup MMAs (64 rows per warpgroup).
        kept = [c for c in kept if c.kwargs["BLOCK_M"] == 128]
    if not kept:
        # The smallest footprint; of those, the one whose tiles leave the most registers free.
        kept = [min(configs, key=lambda c: (_shared_memory_estimate(c, head_dim, element_size),
                                            _tile_registers(c, head_dim)))]
    return kept


def _sequence_bucket(tokens: int) -> int:
    # Autotune once per power-of-two bucket of sequence length rather than once per exact length.
    return triton.next_power_of_2(max(tokens, 16))


# --- the kernels ----------------------------------------------------------------------------------------------

@triton.jit
def _rotate_kernel(
    X, RopeCos, RopeSin, Out,
    stride_x_batch, stride_x_token, stride_x_head, stride_rope_batch, stride_rope_token,
    total_rows, tokens, heads, rotary_length,
    HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    """Out = x with its rows below rotary_length rotated (float32, rounded once) and the rest copied."""
    rows, row_ok, batch, token, row_base = head_rows(total_rows, tokens, heads, stride_x_batch, stride_x_token,
                                                     stride_x_head, BLOCK_ROWS)
    dims = tl.arange(0, HEAD_DIM)
    x = tl.load(X + row_base + dims[None, :], mask=row_ok, other=0.0)
    partner = tl.load(X + row_base + (dims ^ 1)[None, :], mask=row_ok, other=0.0)
    rotated = rotate_pairs(x, partner, RopeCos, RopeSin, batch, token, row_ok, stride_rope_batch, stride_rope_token,
                           rotary_length, dims)
    tl.store(Out + rows[:, None] * HEAD_DIM + dims[None, :], rounded_cast(rotated, Out.dtype.element_ty, EMULATE_BF16),
             mask=row_ok)


@triton.jit
def _attend_key_range(accumulator, row_max, row_sum, q, k_base, v_base, k_tile_offsets, v_tile_offsets,
                      stride_k_token, stride_v_token, valid_length, key_start, key_end, scale_log2,
                      BLOCK_N: tl.constexpr, MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      EMULATE_BF16: tl.constexpr):
    for start in range(key_start, key_end, BLOCK_N):
        # 64-bit scalar offset to the tile, 32-bit offsets within it: no per-element 64-bit address math.
        k_tile = k_base + tl.cast(start, tl.int64) * stride_k_token + k_tile_offsets
        v_tile = v_base + tl.cast(start, tl.int64) * stride_v_token + v_tile_offsets
        if MASK_KEYS:
            key_ok = (start + tl.arange(0, BLOCK_N)) < valid_length
            k = tl.load(k_tile, mask=key_ok[:, None], other=0.0)
            v = tl.load(v_tile, mask=key_ok[:, None], other=0.0)
        else:
            k = tl.load(k_tile)
            v = tl.load(v_tile)
        scores = tile_dot(q, tl.trans(k), None, DOT_PRECISION, EMULATE_BF16) * scale_log2
        if MASK_KEYS:
            scores = tl.where(key_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        probabilities = tl.math.exp2(scores - new_max[:, None])
        correction = tl.math.exp2(row_max - new_max)
        row_sum = row_sum * correction + tl.sum(probabilities, 1)
        accumulator = accumulator * correction[:, None]
        accumulator = tile_dot(rounded_cast(probabilities, v.dtype, EMULATE_BF16), v, accumulator, DOT_PRECISION,
                               EMULATE_BF16)
        row_max = new_max
    return accumulator, row_max, row_sum


@triton.autotune(configs=_candidate_configs(), key=["sequence_bucket", "HEAD_DIM"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _packed_attention_kernel(
    Q, K, V, Out, ValidLengths,
    stride_q_batch, stride_q_token, stride_q_head,
    stride_k_batch, stride_k_token, stride_k_head,
    stride_v_batch, stride_v_token, stride_v_head,
    stride_o_batch, stride_o_token, stride_o_head,
    num_heads, num_tokens, scale_log2,
    sequence_bucket,
    HEAD_DIM: tl.constexpr, HAS_VALID_LENGTHS: tl.constexpr,
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
    block_start = query_block * BLOCK_M
    query_rows = tl.arange(0, BLOCK_M)
    row_ok = (block_start + query_rows < num_tokens)[:, None]
    q_base = Q + batch * stride_q_batch + head * stride_q_head + block_start.to(tl.int64) * stride_q_token
    out_ptrs = (Out + batch * stride_o_batch + head * stride_o_head + block_start.to(tl.int64) * stride_o_token
                + query_rows[:, None] * stride_o_token + dims[None, :])
    k_base = K + batch * stride_k_batch + head * stride_k_head
    v_base = V + batch * stride_v_batch + head * stride_v_head
    key_rows = tl.arange(0, BLOCK_N)
    k_tile_offsets = key_rows[:, None] * stride_k_token + dims[None, :]
    v_tile_offsets = key_rows[:, None] * stride_v_token + dims[None, :]

    if block_start < valid_length:
        q = tl.load(q_base + query_rows[:, None] * stride_q_token + dims[None, :], mask=row_ok, other=0.0)
        accumulator = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        full_valid_end = (valid_length // BLOCK_N) * BLOCK_N
        # Whole tiles of valid keys: no masks.
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, k_tile_offsets, v_tile_offsets,
            stride_k_token, stride_v_token, valid_length, 0, full_valid_end, scale_log2,
            BLOCK_N, False, DOT_PRECISION, EMULATE_BF16)
        # The last, partly valid tile: padded keys masked (and never loaded).
        accumulator, row_max, row_sum = _attend_key_range(
            accumulator, row_max, row_sum, q, k_base, v_base, k_tile_offsets, v_tile_offsets,
            stride_k_token, stride_v_token, valid_length, full_valid_end, valid_length, scale_log2,
            BLOCK_N, True, DOT_PRECISION, EMULATE_BF16)
        out = accumulator / row_sum[:, None]
        tl.store(out_ptrs, rounded_cast(out, Out.dtype.element_ty, EMULATE_BF16), mask=row_ok)
    else:
        # Every query of this block is padding: its output is unspecified, but zeros keep NaNs out of later layers.
        tl.store(out_ptrs, tl.zeros([BLOCK_M, HEAD_DIM], dtype=Out.dtype.element_ty), mask=row_ok)


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


def _emulate_bf16(dtype):
    return interpreting() and dtype == torch.bfloat16


def _rotate_leading_tokens(x, rope_cos, rope_sin, rotary_length):
    """A contiguous copy of x (batch, tokens, heads, head_dim) whose first rotary_length tokens are rotated."""
    batch, tokens, heads, head_dim = x.shape
    out = torch.empty((batch, tokens, heads, head_dim), dtype=x.dtype, device=x.device)
    rope_cos, rope_sin, stride_rope_batch, stride_rope_token = rope_launch_tables(rope_cos, rope_sin, True, x)
    total_rows = batch * tokens * heads
    # ~4K elements per program, as the other row kernels: enough work without spilling at head_dim 256.
    block_rows = max(1, min(triton.next_power_of_2(total_rows), 4096 // head_dim))
    _rotate_kernel[(triton.cdiv(total_rows, block_rows),)](
        x, rope_cos, rope_sin, out, x.stride(0), x.stride(1), x.stride(2), stride_rope_batch, stride_rope_token,
        total_rows, tokens, heads, rotary_length,
        HEAD_DIM=head_dim, BLOCK_ROWS=block_rows, EMULATE_BF16=_emulate_bf16(x.dtype), num_warps=4)
    return out


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

    if rope_cos is not None and rotary_length > 0:
        q, k = (_rotate_leading_tokens(t, rope_cos, rope_sin, rotary_length) for t in (q, k))
    if valid_lengths is not None:
        valid_lengths = valid_lengths.to(device=q.device, dtype=torch.int32).contiguous()

    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def grid(meta):
        return (triton.cdiv(tokens, meta["BLOCK_M"]), batch * heads)

    _packed_attention_kernel[grid](
        q, k, v, out, valid_lengths if valid_lengths is not None else q,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        heads, tokens, scale * 1.4426950408889634,
        _sequence_bucket(tokens),
        HEAD_DIM=head_dim, HAS_VALID_LENGTHS=valid_lengths is not None,
        DOT_PRECISION=dot_precision(q.dtype), EMULATE_BF16=_emulate_bf16(q.dtype),
    )
    return out
