"""The interpreter workarounds: bfloat16 casts round to nearest even and bfloat16 dots are exact, as on a GPU."""

import pytest
import torch
import triton
import triton.language as tl

from framepack_kernels.triton_helpers import rounded_cast, tile_dot


@triton.jit
def _cast_kernel(x_pointer, out_pointer, count, BLOCK: tl.constexpr, EMULATE_BF16: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    values = tl.load(x_pointer + offsets, mask=offsets < count)
    tl.store(out_pointer + offsets, rounded_cast(values, tl.bfloat16, EMULATE_BF16), mask=offsets < count)


@triton.jit
def _dot_kernel(a_pointer, b_pointer, out_pointer, SIZE: tl.constexpr, EMULATE_BF16: tl.constexpr):
    rows = tl.arange(0, SIZE)[:, None] * SIZE + tl.arange(0, SIZE)[None, :]
    a = tl.load(a_pointer + rows)
    b = tl.load(b_pointer + rows)
    accumulator = tl.zeros((SIZE, SIZE), dtype=tl.float32)
    tl.store(out_pointer + rows, tile_dot(a, b, accumulator, "ieee", EMULATE_BF16))


def test_rounded_cast_rounds_to_nearest_even_like_torch():
    # Values just above and below bfloat16 rounding boundaries, where truncation would differ.
    x = torch.randn(64) * (1 + 2.0**-9)
    out = torch.empty(64, dtype=torch.bfloat16)
    _cast_kernel[(1,)](x, out, 64, BLOCK=64, EMULATE_BF16=True)
    torch.testing.assert_close(out, x.to(torch.bfloat16), rtol=0, atol=0)
    truncated = (x.view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert (truncated != x.to(torch.bfloat16)).any()  # the check can tell rounding from truncation


@pytest.mark.parametrize("size", [16, 32])
def test_bfloat16_dot_equals_float32_product_of_the_rounded_tiles(size):
    a = torch.randn(size, size).to(torch.bfloat16)
    b = torch.randn(size, size).to(torch.bfloat16)
    out = torch.empty(size, size)
    _dot_kernel[(1,)](a, b, out, SIZE=size, EMULATE_BF16=True)
    torch.testing.assert_close(out, a.float() @ b.float(), rtol=1e-5, atol=1e-5)
