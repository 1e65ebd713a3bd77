"""Our section loop against diffusers' HunyuanVideoFramepackPipeline where the two coincide: the Euler scheduler,
inverted anti-drifting (bidirectional) sampling, the same section count, with and without an end image.

Differences in semantics found, and how the comparison handles them:
- diffusers draws the start/end image latents from the VAE posterior with the shared generator (and ignores its
  `last_image_latents` argument); we use the posterior mean, so a seed reproduces a video. The test hands diffusers
  our latents, which also keeps the two noise streams aligned.
- diffusers resizes the [0, 1] float image inside the SigLIP processor; the official app (and we) hand it the uint8
  image. The test hands diffusers our image embedding, so only the loops are compared.
- With an end image diffusers computes the average of the start and end image embeddings and then hands the DiT
  the start embedding alone (the average is never used). We blend them by their strengths (equal strengths: the
  average), as the community FLF2V apps do and as the end image is meant to steer the video. The test hands
  diffusers the blend as its image embedding.
- diffusers counts sections as ceil(num_frames / (4 * (window - 1) + 1)); the official app (and we) as
  round(seconds * fps / (4 * window)). The test picks settings where both give two sections.
"""

import numpy as np
import pytest
import torch
from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                       HunyuanVideoFramepackPipeline, HunyuanVideoFramepackTransformer3DModel)
from PIL import Image

from framepack_engine import Engine
from tests.fixtures import flux_redux_folder, framepack_transformer_folder, hunyuan_video_base_folder  # noqa: F401
from tests.utils import assert_relative_error, relative_error

WINDOW, STEPS, SEED = 2, 3, 7


@pytest.fixture(scope="module")
def engines(framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder):
    ours = Engine.from_pretrained(transformer=framepack_transformer_folder, base=hunyuan_video_base_folder,
                                  image_encoder=flux_redux_folder, device="cpu", dtype=torch.float32,
                                  attention="sdpa")
    ours.transformer.set_output_precision(float32=False)  # diffusers' port has no float32 output option
    theirs = HunyuanVideoFramepackPipeline(
        transformer=HunyuanVideoFramepackTransformer3DModel.from_pretrained(
            framepack_transformer_folder, torch_dtype=torch.float32),
        vae=AutoencoderKLHunyuanVideo.from_pretrained(hunyuan_video_base_folder / "vae", torch_dtype=torch.float32),
        scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
        text_encoder=ours.text_encoder.llama_model, tokenizer=ours.text_encoder.llama_tokenizer,
        text_encoder_2=ours.text_encoder.clip_model, tokenizer_2=ours.text_encoder.clip_tokenizer,
        image_encoder=ours.image_encoder.model, feature_extractor=ours.image_encoder.processor)
    theirs.set_progress_bar_config(disable=True)
    return ours, theirs


def picture(shift):
    y, x = np.mgrid[0:64, 0:64]
    return np.stack([(x * 3 + shift) % 256, (y * 4) % 256, np.full_like(x, 60 + shift % 100)], -1).astype(np.uint8)


def run_diffusers(ours, theirs, prompt, start, end):
    embedding = ours.encode_prompt(prompt)
    image_latents = [ours.encode_latent(start)] + ([ours.encode_latent(end)] if end is not None else [])
    image_embeds = [ours.encode_image_embedding(start)]
    if end is not None:
        blend = (image_embeds[0] + ours.encode_image_embedding(end)) / 2
        image_embeds = [blend, blend]
    theirs.prepare_image_latents = lambda *args, **kwargs: image_latents.pop(0)
    theirs.encode_image = lambda *args, **kwargs: image_embeds.pop(0)
    output = theirs(
        image=Image.fromarray(start), last_image=Image.fromarray(end) if end is not None else None,
        prompt_embeds=embedding.llama, pooled_prompt_embeds=embedding.clip_pooled,
        prompt_attention_mask=torch.ones(embedding.llama.shape[:2]), height=64, width=64,
        num_frames=2 * (4 * (WINDOW - 1) + 1), latent_window_size=WINDOW, num_inference_steps=STEPS,
        guidance_scale=10.0, generator=torch.Generator().manual_seed(SEED), output_type="latent")
    return output.frames[-1]


@pytest.mark.parametrize("with_end_image", [False, True])
def test_bidirectional_euler_loop_matches_diffusers(engines, with_end_image):
    ours, theirs = engines
    start, end = picture(0), (picture(90) if with_end_image else None)
    video = ours.generate("a cat walks", image=start, end_image=end, seconds=2, fps=8, seed=SEED, steps=STEPS,
                          latent_window_size=WINDOW, sampler="euler", resolution=64)
    expected = run_diffusers(ours, theirs, "a cat walks", start, end)
    assert video.latents.shape == expected.shape == (1, 4, 2 * WINDOW + 1, 8, 8)
    assert_relative_error(video.latents, expected, 1e-5, "final latent history")
    assert len(video.frames) == 4 * expected.shape[2] - 3


def test_comparison_can_fail(engines):
    ours, theirs = engines
    start = picture(0)
    expected = run_diffusers(ours, theirs, "a cat walks", start, None)
    other_seed = ours.generate("a cat walks", image=start, seconds=2, fps=8, seed=SEED + 1, steps=STEPS,
                               latent_window_size=WINDOW, sampler="euler", resolution=64)
    assert relative_error(other_seed.latents, expected) > 1e-2
