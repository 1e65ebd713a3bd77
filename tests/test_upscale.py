"""Upscaling through spandrel: a random-weight ESRGAN built by spandrel's own architecture class, saved as the files
users hold (.safetensors, .pth), scales frames by its factor; tiles under a byte bound equal the whole frame; the
command runs it after interpolation; a missing spandrel is one line."""

import json
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.models.buckets import find_nearest_bucket
from framepack_engine.models.presets import TINY_RESOLUTION
from framepack_engine.media.upscaling import tile_size, upscale_frames, upscale_image
from framepack_engine.models.upscaler import import_spandrel, load_upscaler
from tests.oracles import import_oracle

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]


@pytest.fixture(scope="module")
def esrgan_state():
    """ESRGAN x2 (spandrel's RRDBNet, old-arch keys as ESRGAN files have them) with random weights: one block of 16
    filters (the mechanics need no more), biases random too."""
    spandrel = import_oracle("spandrel")
    from spandrel.architectures.ESRGAN import ESRGAN

    assert spandrel.__version__ == "0.4.2"
    torch.manual_seed(0)
    net = ESRGAN(in_nc=3, out_nc=3, num_filters=16, num_blocks=1, scale=2)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.05)
    return {key: value.contiguous() for key, value in net.state_dict().items()}


@pytest.fixture(scope="module")
def esrgan_file(esrgan_state, tmp_path_factory):
    path = tmp_path_factory.mktemp("esrgan") / "esrgan_x2.safetensors"
    save_file(esrgan_state, str(path))
    return path


@pytest.fixture(scope="module")
def upscaler(esrgan_file):
    return load_upscaler(esrgan_file)


def random_frames(count, height, width, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(count, height, width, 3, generator=generator) * 255).round().to(torch.uint8).numpy()


def test_frames_are_scaled_by_the_models_factor(upscaler, esrgan_state, tmp_path):
    assert (upscaler.scale, upscaler.architecture) == (2, "ESRGAN")
    frames = random_frames(2, 40, 56)
    made = upscale_frames(upscaler, frames)
    assert made.shape == (2, 80, 112, 3)
    # the model itself, by spandrel's call: what the engine wrote
    image = torch.from_numpy(frames[1]).permute(2, 0, 1)[None].float() / 255
    expected = (upscaler.descriptor(image)[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)
    assert np.array_equal(made[1], expected.numpy())
    # a .pth pickle (read with weights_only=True) is the same model
    torch.save(esrgan_state, tmp_path / "esrgan_x2.pth")
    assert np.array_equal(upscale_frames(load_upscaler(tmp_path / "esrgan_x2.pth"), frames), made)


def test_tiled_equals_untiled(upscaler):
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(1, 3, 56, 72, generator=generator)
    whole = upscale_image(upscaler, image, tile=128)
    tiled = upscale_image(upscaler, image, tile=64, overlap=20)  # 24-pixel cores: 3 x 3 tiles
    assert tiled.shape == whole.shape == (1, 3, 112, 144)
    assert (tiled - whole).abs().max() < 1e-3
    # the tile from a byte bound: smaller bounds, smaller tiles (never below 64 pixels)
    assert tile_size(upscaler, 1 << 30) > tile_size(upscaler, 1 << 26) >= 64
    frames = random_frames(1, 56, 72, seed=2)
    bounded = upscale_frames(upscaler, frames, max_bytes=1 << 20, overlap=20)
    assert np.abs(bounded.astype(int) - upscale_frames(upscaler, frames, tile=128)).max() <= 1


def test_the_command_upscales_after_interpolation(esrgan_file, tmp_path):
    from framepack_engine.models.rife import IFNet

    save_file(IFNet(widths=(16, 8), features=4, depth=1).state_dict(), str(tmp_path / "rife.safetensors"))
    made = tmp_path / "made.safetensors"
    assert main(["generate", "a cat", "--seconds", "1", "--out", str(made), "--interpolate", "2", "--rife-model",
                 str(tmp_path / "rife.safetensors"), "--upscale", str(esrgan_file), *FAST]) == 0
    # 9 frames of the tiny preset's text-to-video bucket: 17 frames after interpolation, each twice the size
    height, width = find_nearest_bucket(TINY_RESOLUTION, TINY_RESOLUTION, resolution=TINY_RESOLUTION)
    assert load_file(str(made))["frames"].shape == (2 * 9 - 1, 2 * height, 2 * width, 3)
    from safetensors import safe_open

    with safe_open(str(made), "pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["upscaler"]) == {"name": "esrgan_x2.safetensors", "architecture": "ESRGAN",
                                                "scale": 2}


def test_video_upscale(upscaler):
    from framepack_engine.media.video import Video

    video = Video(random_frames(2, 24, 32), 30.0).upscale(upscaler)
    assert video.frames.shape == (2, 48, 64, 3) and video.metadata["upscaler"]["scale"] == 2


def test_a_missing_spandrel_is_one_line(monkeypatch, esrgan_file, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # as if not installed
    with pytest.raises(FramePackError, match=r'needs spandrel, which is not installed: pip install "framepack-'
                                             r'engine\[upscale\]"'):
        import_spandrel()
    assert main(["generate", "x", "--out", str(tmp_path / "v.mp4"), "--upscale", str(esrgan_file), *FAST]) == 2
    error = capsys.readouterr().err
    assert "framepack-engine[upscale]" in error and error.count("\n") == 1


@pytest.mark.parametrize("name, message", [
    ("missing.pth", "'missing.pth' does not exist"),
    ("model.ckpt", "is not a .safetensors or .pth file"),
])
def test_bad_upscaler_paths_are_one_line_before_loading(tmp_path, capsys, name, message):
    assert main(["generate", "x", "--out", str(tmp_path / "v.mp4"), "--upscale", str(tmp_path / name), *FAST]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
