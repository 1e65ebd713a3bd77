"""Small `triton.jit` helpers shared by the kernels.

Two of them exist only because Triton's CPU interpreter (how the tests run the kernels) differs from the GPU on
bfloat16: it truncates float32 -> bfloat16 instead of rounding to nearest even, and it multiplies bfloat16 tiles
in `tl.dot` as raw 16-bit integers. The `EMULATE_BF16` flag is False on a GPU, so the compiled code is the plain one.
"""

import triton
import triton.language as tl


@triton.jit
def rounded_cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Cast float32 x to `dtype` rounding to nearest even, as the GPU does, also under the interpreter."""
    if EMULATE_BF16:
        # Round the float32 bit pattern to its top 16 bits (ties to even); the truncating cast below is then exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def tile_dot(a, b, accumulator, DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """a @ b (+ accumulator) in float32; half-precision tiles go to the tensor cores as they are."""
    if EMULATE_BF16:
        # The tiles already hold values rounded to the input dtype, so a float32 product equals the tensor cores'.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), accumulator, input_precision="ieee")
    return tl.dot(a, b, accumulator, input_precision=DOT_PRECISION)


@triton.jit
def head_rows(total_rows, tokens, heads, stride_batch, stride_token, stride_head, BLOCK_ROWS: tl.constexpr):
    """The rows of a (batch, tokens, heads, head_dim) tensor this program handles, a row being one head of one
    token: (rows int64, row_ok (BLOCK_ROWS, 1), batch, token, each row's element offset (BLOCK_ROWS, 1))."""
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = (rows < total_rows)[:, None]
    rows = rows.to(tl.int64)
    batch = rows // (tokens * heads)
    token = (rows // heads) % tokens
    head = rows % heads
    return rows, row_ok, batch, token, (batch * stride_batch + token * stride_token + head * stride_head)[:, None]


@triton.jit
def rotate_pairs(x, partner, RopeCos, RopeSin, batch, token, row_ok, stride_rope_batch, stride_rope_token,
                 rotary_length, dims):
    """RoPE in float32 on rows below rotary_length: element d pairs with partner = element d ^ 1, and the pair turns
    as (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin). cos = 1, sin = 0 past the rotary range leaves text tokens
    exactly as they are."""
    partner_sign = tl.where(dims % 2 == 0, -1.0, 1.0)
    in_rotary = row_ok & (token < rotary_length)[:, None]
    rope_offsets = (batch * stride_rope_batch + token * stride_rope_token)[:, None] + dims[None, :]
    cos = tl.load(RopeCos + rope_offsets, mask=in_rotary, other=1.0)
    sin = tl.load(RopeSin + rope_offsets, mask=in_rotary, other=0.0)
    return x.to(tl.float32) * cos + partner.to(tl.float32) * partner_sign[None, :] * sin
