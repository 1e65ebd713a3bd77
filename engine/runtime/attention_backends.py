"""The fast attention backends registered lazily by framepack_engine.runtime.attention: our Triton kernel and three libraries.

All share framepack_engine.runtime.attention's signature `(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0,
valid_lengths=None) -> out` over packed `[image | text]` sequences (batch, tokens, heads, head_dim).

- triton: framepack_kernels.attention.packed_attention rotates the image tokens as it loads its tiles and skips padded keys.
- flash / sage / xformers: these libraries cannot rotate, so q and k are rotated first (with
  kernels/rotary.py); padding is removed by packing each sample's valid tokens into one varlen sequence described by
  cu_seqlens, and the outputs are scattered back, zeros at padded positions. They take half precision only:
  float32 inputs run in bfloat16 and come back as float32.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple

import torch

from framepack_kernels.rotary import rotate_leading_tokens
from framepack_engine.errors import BackendUnavailableError, Option

HALF_DTYPES = (torch.float16, torch.bfloat16)


def triton_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
    from framepack_kernels.attention import packed_attention

    return packed_attention(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths)


# --- varlen packing ---------------------------------------------------------------------------------------------

class VarlenLayout(NamedTuple):
    """Where each sample's valid tokens sit in a packed (total, heads, head_dim) sequence."""
    cu_seqlens: torch.Tensor        # (batch + 1,) int32 on the device: start of each sample, then the total
    lengths: list[int]              # valid tokens per sample (host ints, for the APIs that want lists)
    max_seqlen: int
    valid_mask: torch.Tensor | None  # (batch, tokens) bool; None when every token is valid
    batch: int
    tokens: int


def varlen_layout(valid_lengths, batch: int, tokens: int, device) -> VarlenLayout:
    """The cu_seqlens description of a batch where sample b keeps its first valid_lengths[b] tokens."""
    if valid_lengths is None:
        lengths = [tokens] * batch
        valid_mask = None
    else:
        # The varlen APIs take host-side lengths (max_seqlen, xformers' lists): one small device-to-host copy.
        lengths = [min(max(int(n), 0), tokens) for n in valid_lengths.tolist()]
        positions = torch.arange(tokens, device=device)
        limits = torch.tensor(lengths, device=device)
        valid_mask = positions[None, :] < limits[:, None]
        if all(n == tokens for n in lengths):
            valid_mask = None
    starts = [0]
    for n in lengths:
        starts.append(starts[-1] + n)
    cu_seqlens = torch.tensor(starts, dtype=torch.int32, device=device)
    return VarlenLayout(cu_seqlens, lengths, max(lengths, default=0), valid_mask, batch, tokens)


def pack_valid_tokens(x: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """(batch, tokens, heads, head_dim) -> (total valid, heads, head_dim), samples one after another."""
    if layout.valid_mask is None:
        return x.reshape(layout.batch * layout.tokens, *x.shape[2:])
    return x[layout.valid_mask]


def unpack_valid_tokens(packed: torch.Tensor, layout: VarlenLayout) -> torch.Tensor:
    """Inverse of pack_valid_tokens; padded positions get zeros."""
    if layout.valid_mask is None:
        return packed.reshape(layout.batch, layout.tokens, *packed.shape[1:])
    out = packed.new_zeros((layout.batch, layout.tokens, *packed.shape[1:]))
    out[layout.valid_mask] = packed
    return out


def _rotated_half_precision(q, k, v, rope_cos, rope_sin, rotary_length):
    q = rotate_leading_tokens(q, rope_cos, rope_sin, rotary_length)
    k = rotate_leading_tokens(k, rope_cos, rope_sin, rotary_length)
    dtype = q.dtype if q.dtype in HALF_DTYPES else torch.bfloat16
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _import(module: str, backend: str, hint: str):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise BackendUnavailableError(
            f"Attention backend {backend!r} needs {module} ({error}): {hint}, or use ", Option("attention", "sdpa"),
            ".") from error


# --- library wrappers -------------------------------------------------------------------------------------------

def _varlen_attention(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths, attend):
    """Rotate, pack each sample's valid tokens into one varlen sequence, `attend(q, k, v, layout)`, unpack."""
    out_dtype = q.dtype
    q, k, v = _rotated_half_precision(q, k, v, rope_cos, rope_sin, rotary_length)
    layout = varlen_layout(valid_lengths, q.shape[0], q.shape[1], q.device)
    out = attend(*(pack_valid_tokens(t, layout).contiguous() for t in (q, k, v)), layout)
    return unpack_valid_tokens(out, layout).to(out_dtype)


def flash_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
    """FlashAttention 2's flash_attn_varlen_func over each sample's valid tokens."""
    flash_attn = _import("flash_attn", "flash", "pip install flash-attn --no-build-isolation")

    def attend(q, k, v, layout):
        out = flash_attn.flash_attn_varlen_func(
            q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
            dropout_p=0.0, softmax_scale=None, causal=False)
        return out[0] if isinstance(out, tuple) else out  # some builds return (out, softmax_lse)

    return _varlen_attention(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths, attend)


def sage_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
    """SageAttention's sageattn_varlen (8-bit QK^T) over each sample's valid tokens."""
    sageattention = _import("sageattention", "sage", "pip install sageattention")

    def attend(q, k, v, layout):
        return sageattention.sageattn_varlen(
            q, k, v, layout.cu_seqlens, layout.cu_seqlens, layout.max_seqlen, layout.max_seqlen,
            is_causal=False, sm_scale=q.shape[-1] ** -0.5)

    return _varlen_attention(q, k, v, rope_cos, rope_sin, rotary_length, valid_lengths, attend)


def xformers_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
    """xFormers' memory_efficient_attention; padding removed with a BlockDiagonalMask over the packed samples."""
    xformers_ops = _import("xformers.ops", "xformers", "pip install xformers")
    out_dtype = q.dtype
    q, k, v = _rotated_half_precision(q, k, v, rope_cos, rope_sin, rotary_length)
    batch, tokens = q.shape[:2]
    if valid_lengths is None:
        # No padding: xFormers' (batch, tokens, heads, head_dim) layout is ours already.
        return xformers_ops.memory_efficient_attention(q, k, v).to(out_dtype)
    layout = varlen_layout(valid_lengths, batch, tokens, q.device)
    mask = xformers_ops.fmha.attn_bias.BlockDiagonalMask.from_seqlens(q_seqlen=layout.lengths, kv_seqlen=layout.lengths)
    # All samples become one batch-1 sequence; the block-diagonal mask keeps them from attending to each other.
    packed = [pack_valid_tokens(t, layout).unsqueeze(0) for t in (q, k, v)]
    out = xformers_ops.memory_efficient_attention(packed[0], packed[1], packed[2], attn_bias=mask)
    return unpack_valid_tokens(out.squeeze(0), layout).to(out_dtype)
