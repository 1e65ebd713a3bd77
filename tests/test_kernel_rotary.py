"""The rotary oracle every attention path rotates against, checked against complex multiplication."""

import torch

from framepack_kernels.rotary import rotate_interleaved_pairs, rotate_leading_tokens


def test_rotation_is_complex_multiplication_of_interleaved_pairs():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)
    angles = torch.randn(1, 5, 4, dtype=torch.float64)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    sin = angles.sin().repeat_interleave(2, dim=-1)
    expected = torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
                                  * torch.polar(torch.ones_like(angles), angles)[:, :, None]).flatten(-2)
    # The oracle works in float32 whatever the input, as the official model does.
    torch.testing.assert_close(rotate_interleaved_pairs(x, cos, sin), expected, rtol=0, atol=1e-6)


def test_rotation_keeps_norms_and_only_touches_leading_tokens():
    x = torch.randn(1, 7, 2, 6)
    angles = torch.randn(1, 4, 3)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    out = rotate_leading_tokens(x, cos, sin, rotary_length=4)
    torch.testing.assert_close(out[:, 4:], x[:, 4:], rtol=0, atol=0)
    torch.testing.assert_close(out[:, :4].norm(dim=-1), x[:, :4].norm(dim=-1))
    assert (out[:, :4] - x[:, :4]).abs().max() > 1e-2
    assert rotate_leading_tokens(x, None, None, 0) is x


def test_half_precision_rotates_in_float32_and_rounds_once():
    x = torch.randn(1, 3, 1, 4).to(torch.bfloat16)
    angles = torch.randn(1, 3, 2)
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    out = rotate_interleaved_pairs(x, cos, sin)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, rotate_interleaved_pairs(x.float(), cos, sin).to(torch.bfloat16), rtol=0, atol=0)
