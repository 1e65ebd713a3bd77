"""framepack_engine.generation.preview: the linear latent -> RGB preview (ComfyUI's HunyuanVideo factors, [-1, 1] mapped to 0..255)."""

import pytest
import torch
import torch.nn.functional as F

from framepack_engine.errors import FramePackError
from framepack_engine.generation.preview import (VAE_SCALING_FACTOR, LATENT_RGB_BIAS, LATENT_RGB_FACTORS,
                            latents_to_preview_rgb)


def test_factors_are_the_community_table():
    # spot values of ComfyUI's latent_formats.HunyuanVideo (also FramePack's vae_decode_fake)
    assert len(LATENT_RGB_FACTORS) == 16 and all(len(row) == 3 for row in LATENT_RGB_FACTORS)
    assert LATENT_RGB_FACTORS[0] == (-0.0395, -0.0331, 0.0445)
    assert LATENT_RGB_FACTORS[12] == (-0.2315, -0.1920, -0.1355)
    assert LATENT_RGB_FACTORS[15] == (0.0249, -0.0469, -0.1703)
    assert LATENT_RGB_BIAS == (0.0259, -0.0192, -0.0761)
    assert VAE_SCALING_FACTOR == 0.476986


def test_preview_is_the_linear_projection_of_each_latent_pixel():
    latents = torch.randn(2, 16, 3, 5, 7) * 2
    preview = latents_to_preview_rgb(latents, sample=1)
    assert preview.dtype == torch.uint8 and preview.shape == (3, 5, 7, 3) and preview.device.type == "cpu"
    # the same projection written as ComfyUI's previewer does it: a linear layer over channels
    weight = torch.tensor(LATENT_RGB_FACTORS).T
    rgb = F.linear(latents[1].movedim(0, -1), weight, torch.tensor(LATENT_RGB_BIAS))
    expected = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    assert torch.equal(preview, expected)
    # and one pixel by hand
    t, y, x = 2, 4, 6
    value = [sum(latents[1, c, t, y, x].item() * LATENT_RGB_FACTORS[c][k] for c in range(16)) + LATENT_RGB_BIAS[k]
             for k in range(3)]
    by_hand = [round((min(max(v, -1.0), 1.0) + 1) * 127.5) for v in value]
    assert [int(v) for v in preview[t, y, x]] == pytest.approx(by_hand, abs=1)


def test_zero_latents_give_the_bias_color_and_saturation_clamps():
    preview = latents_to_preview_rgb(torch.zeros(16, 1, 2, 2))
    assert preview[0, 0, 0].tolist() == [round((b + 1) * 127.5) for b in LATENT_RGB_BIAS]
    bright = torch.zeros(1, 16, 1, 1, 1)
    bright[0, 10] = 100.0  # channel 10 pushes every color up
    assert latents_to_preview_rgb(bright)[0, 0, 0].tolist() == [255, 255, 255]
    assert latents_to_preview_rgb(-bright)[0, 0, 0].tolist() == [0, 0, 0]


def test_unscaled_latents_are_scaled_first():
    unscaled = torch.randn(1, 16, 2, 3, 3) * 3
    assert torch.equal(latents_to_preview_rgb(unscaled, scaled=False),
                       latents_to_preview_rgb(unscaled * VAE_SCALING_FACTOR))
    assert not torch.equal(latents_to_preview_rgb(unscaled, scaled=False), latents_to_preview_rgb(unscaled))


def test_upscale_repeats_latent_pixels_and_bfloat16_works():
    latents = torch.randn(1, 16, 2, 3, 4)
    small = latents_to_preview_rgb(latents)
    large = latents_to_preview_rgb(latents, upscale=8)
    assert large.shape == (2, 24, 32, 3)
    assert torch.equal(large[:, ::8, ::8], small) and torch.equal(large[:, 7::8, 7::8], small)
    half = latents_to_preview_rgb(latents.bfloat16())
    assert (half.int() - latents_to_preview_rgb(latents.bfloat16().float()).int()).abs().max() == 0


def test_bad_inputs_raise():
    with pytest.raises(FramePackError, match="16, frames"):
        latents_to_preview_rgb(torch.randn(1, 4, 2, 3, 3))
    with pytest.raises(FramePackError, match="out of range"):
        latents_to_preview_rgb(torch.randn(1, 16, 2, 3, 3), sample=1)
    with pytest.raises(FramePackError, match="upscale"):
        latents_to_preview_rgb(torch.randn(1, 16, 2, 3, 3), upscale=0)
