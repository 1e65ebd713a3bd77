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
