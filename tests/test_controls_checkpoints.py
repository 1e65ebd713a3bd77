"""Keyframes and one-frame inference on the test checkpoints (tests/fixtures.py: the DiT, the Llama/CLIP base with its
VAE, SigLIP), loaded as real checkpoints are: resident, and streamed by the memory planner at its smallest budget,
which must make the same image and the same video."""

import numpy as np
import torch

from framepack_engine import Engine
from framepack_engine.runtime.planner import GiB
from tests.fixtures import flux_redux_folder, framepack_transformer_folder, hunyuan_video_base_folder  # noqa: F401

FAST = dict(steps=2, latent_window_size=2, fps=8, resolution=64)


def picture(shift=0, height=64, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3 + shift) % 256, (y * 2) % 256, np.full_like(x, 70)], -1).astype(np.uint8)


def load(folders, **options):
    transformer, base, images = folders
    return Engine.from_pretrained(transformer=transformer, base=base, image_encoder=images, device="cpu",
                                  dtype=torch.float32, attention="sdpa", **options)


def test_one_frame_and_keyframes_on_the_checkpoints_resident_and_streamed(
        framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder):
    folders = (framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder)
    mask = np.zeros((64, 64), np.uint8)
    mask[:, :32] = 255

    def run(engine):
        still = engine.generate_image("a dress", picture(), control_images=[picture(), picture(shift=90)],
                                      control_masks=[None, mask], control_index=[0, 10], target_index=5, seed=3,
                                      **FAST)
        video = engine.generate("a cat", image=picture(), keyframes={1: picture(shift=40)}, seconds=2, seed=3,
                                **FAST)
        return still, video

    resident = load(folders)
    still, video = run(resident)
    assert still.image.shape == (64, 64, 3) and video.metadata["keyframes"] == {"1": None}
    minimum = resident.memory_plan.minimum_budget_bytes
    resident.close()
    streamed = load(folders, vram_budget_gb=minimum / GiB)
    assert streamed.memory_plan.streams
    streamed_still, streamed_video = run(streamed)
    streamed.close()
    np.testing.assert_array_equal(streamed_still.image, still.image)
    np.testing.assert_array_equal(streamed_video.frames, video.frames)
