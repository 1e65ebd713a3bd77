"""kernels/reference.py: the plain path and every kernel's oracle, checked against independent formulations.

The references are what the Triton kernels are tested against, so they are tested here against other ways of
computing the same thing (torch's own layer norm, SDPA with a mask, convolution, bit arithmetic) rather than
against themselves. The module must also stay importable without Triton, since the plain path runs on machines
that lack it."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from framepack_kernels import reference
from tests.utils import relative_error


def test_importing_the_references_does_not_import_triton():
    code = "import sys, framepack_kernels.reference; print('triton' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


def test_relative_error_is_max_difference_over_max_reference():
    expected = torch.tensor([1.0, -4.0, 2.0])
    actual = torch.tensor([1.5, -4.0, 1.0])
    assert reference.relative_error(actual, expected) == pytest.approx(1.0 / 4.0)
    assert reference.relative_error(expected, expected) == 0.0


def test_layer_norm_modulate_matches_torch_layer_norm():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 7, 16, generator=generator) * 3 + 1
    shift, scale = torch.randn(2, 16, generator=generator), torch.randn(2, 16, generator=generator)
    expected = F.layer_norm(x, (16,), eps=reference.LAYER_NORM_EPS) * (1 + scale[:, None]) + shift[:, None]
    assert relative_error(reference.layer_norm_modulate_reference(x, shift, scale), expected) < 1e-5


def test_gated_residual_then_modulate_is_the_two_steps_in_turn():
    generator = torch.Generator().manual_seed(1)
    x, y = torch.randn(2, 5, 8, generator=generator), torch.randn(2, 5, 8, generator=generator)
    gate, shift, scale = (torch.randn(2, 8, generator=generator) for _ in range(3))
    residual, modulated = reference.gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale)
    torch.testing.assert_close(residual, x + gate[:, None] * y)
    torch.testing.assert_close(modulated, reference.layer_norm_modulate_reference(residual, shift, scale))


def test_rms_norm_without_rotary_is_the_textbook_formula():
    generator = torch.Generator().manual_seed(2)
    x, weight = torch.randn(2, 6, 3, 16, generator=generator) * 2, torch.rand(16, generator=generator) + 0.5
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + reference.RMS_NORM_EPS) * weight
    assert relative_error(reference.rms_norm_rotary_reference(x, weight), expected) < 1e-5


def test_packed_attention_matches_masked_sdpa():
    generator = torch.Generator().manual_seed(3)
    batch, tokens, heads, head_dim = 2, 9, 2, 8
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(3))
    valid_lengths = torch.tensor([9, 5])
    mask = torch.arange(tokens)[None, :] < valid_lengths[:, None]  # keys past the valid length are padding
    expected = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask[:, None, None, :]).transpose(1, 2)
    actual = reference.packed_attention_reference(q, k, v, valid_lengths=valid_lengths)
    assert relative_error(actual, expected) < 1e-5


def test_packed_attention_rotates_only_the_leading_tokens():
    generator = torch.Generator().manual_seed(4)
    batch, tokens, heads, head_dim, rotary_length = 1, 6, 2, 8, 4
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, generator=generator) for _ in range(3))
    rope_cos, rope_sin = reference.random_rope_tables(batch, rotary_length, head_dim)
    rotated_q = reference.rotate_leading_tokens(q, rope_cos, rope_sin, rotary_length)
    rotated_k = reference.rotate_leading_tokens(k, rope_cos, rope_sin, rotary_length)
    torch.testing.assert_close(rotated_q[:, rotary_length:], q[:, rotary_length:])  # text tokens untouched
    assert not torch.allclose(rotated_q[:, :rotary_length], q[:, :rotary_length])
    expected = reference.packed_attention_reference(rotated_q, rotated_k, v)
    actual = reference.packed_attention_reference(q, k, v, rope_cos, rope_sin, rotary_length)
    torch.testing.assert_close(actual, expected)


def test_patch_tokens_are_a_strided_convolution_of_the_padded_latents():
    generator = torch.Generator().manual_seed(5)
    latents = torch.randn(1, 4, 3, 5, 7, generator=generator)  # odd sizes: replicate padding to the kernel
    weight, bias = torch.randn(6, 4, 1, 2, 2, generator=generator), torch.randn(6, generator=generator)
    tokens = reference.patch_tokens(latents, (1, 2, 2), lambda x: F.conv3d(x, weight, bias, stride=(1, 2, 2)))
    assert tokens.shape == (1, 3 * 3 * 4, 6)
    padded = F.pad(latents, (0, 1, 0, 1, 0, 0), mode="replicate")
    first = (padded[0, :, 0, 0:2, 0:2] * weight[:, :, 0]).sum((1, 2, 3)) + bias  # token (frame 0, row 0, col 0)
    torch.testing.assert_close(tokens[0, 0], first)
    last = (padded[0, :, 2, 4:6, 6:8] * weight[:, :, 0]).sum((1, 2, 3)) + bias
    torch.testing.assert_close(tokens[0, -1], last)


def test_int4_packing_puts_even_elements_in_the_low_nibble_and_round_trips():
    values = torch.randint(0, 16, (3, 10), generator=torch.Generator().manual_seed(6))
    packed = reference.pack_int4(values)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5)
    assert torch.equal(packed & 0xF, values[:, 0::2].to(torch.uint8))
    assert torch.equal(packed >> 4, values[:, 1::2].to(torch.uint8))
    assert torch.equal(reference.unpack_int4(packed), values.to(torch.uint8))


def test_dequantize_int4_applies_each_groups_scale_and_zero_point():
    generator = torch.Generator().manual_seed(7)
    out_features, in_features, group = 2, 60, 32  # 60 inputs padded to two groups of 32
    values = torch.randint(0, 16, (out_features, 64), generator=generator)
    scale, zero = torch.rand(out_features, 2, generator=generator) + 0.1, torch.rand(out_features, 2) * 15
    weight = reference.dequantize_reference(reference.pack_int4(values), scale, zero, in_features)
    assert weight.shape == (out_features, in_features)
    expected = (values[1, 40].float() - zero[1, 1]) * scale[1, 1]  # input 40 is in the second group
    assert weight[1, 40].item() == pytest.approx(expected.item())
    assert reference.int4_group_size(reference.pack_int4(values), scale) == group
