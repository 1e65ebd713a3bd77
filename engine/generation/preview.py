"""Per-step previews: a linear map from HunyuanVideo latents straight to RGB, with no VAE involved.

The 16x3 factors and the bias are the ones community previewers use for HunyuanVideo latents (ComfyUI's
`latent_formats.HunyuanVideo`; FramePack's demo copies them into `vae_decode_fake`). They were fitted on *scaled*
latents, the DiT's working space (VAE latents x scaling_factor), and give RGB in [-1, 1], the VAE's pixel range.

FramePack's demo clamps that same projection to [0, 1] instead, which blacks out every negative value; we map
[-1, 1] to [0, 255] as ComfyUI does, so mid-gray stays mid-gray.
"""

from __future__ import annotations

import torch

from framepack_engine.official import VAE_SCALING_FACTOR
from framepack_engine.errors import FramePackError
from framepack_engine.media.images import pixels_to_uint8

# HunyuanVideo VAE's config value; latents the DiT works on are the VAE's latents times this.

# Row c: the (R, G, B) contribution of latent channel c.
LATENT_RGB_FACTORS = (
    (-0.0395, -0.0331, 0.0445),
    (0.0696, 0.0795, 0.0518),
    (0.0135, -0.0945, -0.0282),
    (0.0108, -0.0250, -0.0765),
    (-0.0209, 0.0032, 0.0224),
    (-0.0804, -0.0254, -0.0639),
    (-0.0991, 0.0271, -0.0669),
    (-0.0646, -0.0422, -0.0400),
    (-0.0696, -0.0595, -0.0894),
    (-0.0799, -0.0208, -0.0375),
    (0.1166, 0.1627, 0.0962),
    (0.1165, 0.0432, 0.0407),
    (-0.2315, -0.1920, -0.1355),
    (-0.0270, 0.0401, -0.0821),
    (-0.0616, -0.0997, -0.0727),
    (0.0249, -0.0469, -0.1703),
)
LATENT_RGB_BIAS = (0.0259, -0.0192, -0.0761)


def latents_to_preview_rgb(latents: torch.Tensor, *, scaled: bool = True,
                           scaling_factor: float = VAE_SCALING_FACTOR, sample: int = 0,
                           upscale: int = 1) -> torch.Tensor:
    """A cheap RGB preview of one sample of HunyuanVideo latents: uint8 (T, H, W, 3) on the CPU.

    latents: (B, 16, T, H, W) or (16, T, H, W). scaled: True for the DiT's latents (VAE latents x scaling_factor,
    what the sampler holds); False for the VAE's own (unscaled) latents, which are scaled here first.
    upscale: repeat each latent pixel this many times per side (8 gives the video's pixel size).
    """
    if latents.dim() == 4:
        latents = latents.unsqueeze(0)
    if latents.dim() != 5 or latents.shape[1] != len(LATENT_RGB_FACTORS):
        raise FramePackError(
            f"Preview needs HunyuanVideo latents (batch, 16, frames, height, width), got {tuple(latents.shape)}: "
            "pass the sampler's latents for one section.")
    if not 0 <= sample < latents.shape[0]:
        raise FramePackError(f"Preview sample {sample} is out of range for a batch of {latents.shape[0]}: "
                             f"choose 0..{latents.shape[0] - 1}.")
    if upscale < 1:
        raise FramePackError(f"Preview upscale {upscale} must be a positive integer: use 1 for latent size.")
    # One sample's latents are small; the projection runs where they live, and only the uint8 result moves.
    frames = latents[sample].float()
    if not scaled:
        frames = frames * scaling_factor
    factors = torch.tensor(LATENT_RGB_FACTORS, device=frames.device)
    bias = torch.tensor(LATENT_RGB_BIAS, device=frames.device)
    rgb = torch.einsum("cthw,cr->thwr", frames, factors) + bias
    pixels = pixels_to_uint8(rgb)
    if upscale > 1:
        pixels = pixels.repeat_interleave(upscale, dim=1).repeat_interleave(upscale, dim=2)
    return pixels.cpu()
