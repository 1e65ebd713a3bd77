import json

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.errors import FramePackError
from engine.video import Video, available_codecs, encode_video


def smooth_frames(count=9, height=48, width=64):
    """A moving gradient: compressible, so a decoded frame can be compared with the original."""
    y, x = np.mgrid[0:height, 0:width]
    frames = [np.stack([(x * 4 + t * 8) % 256, (y * 5) % 256, np.full_like(x, 40 + t * 10)], -1) for t in range(count)]
    return np.asarray(frames, dtype=np.uint8)


def decode(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return np.asarray(frames), float(stream.average_rate), dict(container.metadata)


@pytest.mark.parametrize("suffix,codec", [(".mp4", "libx264"), (".webm", "libvpx-vp9"), (".mkv", "ffv1")])
def test_encode_round_trip(tmp_path, suffix, codec):
    frames = smooth_frames()
    video = Video(frames, fps=30, metadata={"seed": 31337, "prompt": "a cat"})
    path = video.save(tmp_path / f"out{suffix}", codec=codec, crf=10)
    decoded, fps, metadata = decode(path)
    assert decoded.shape == frames.shape
    assert fps == pytest.approx(30)
    # Lossy codecs at high quality stay within a few levels on a smooth image; ffv1 is lossless up to yuv444 rounding.
    assert np.abs(decoded.astype(int) - frames.astype(int)).mean() < 6
    comment = metadata.get("comment") or metadata.get("COMMENT")
    assert json.loads(comment) == {"seed": 31337, "prompt": "a cat"}


def test_saved_files_get_ordinary_permissions(tmp_path):
    import os
    import stat

    path = Video(smooth_frames(count=2), fps=30).save(tmp_path / "out.mp4")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_unknown_codec_is_a_clear_error_and_leaves_nothing(tmp_path):
    with pytest.raises(FramePackError, match="not available"):
        Video(smooth_frames(), fps=30).save(tmp_path / "out.mp4", codec="no-such-codec")
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_leaves_no_partial_file(tmp_path):
    with pytest.raises(Exception):
        # Odd-sized frames in a codec that cannot take the pixel format requested.
        encode_video(smooth_frames(), tmp_path / "out.mp4", fps=30, codec="libx264", pixel_format="not-a-format")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_folder_is_a_clear_error(tmp_path, monkeypatch):
    # Tests may run as root, who can write anywhere: pretend the permission check says no.
    monkeypatch.setattr("engine.video.os.access", lambda path, mode: False)
    folder = tmp_path / "locked"
    folder.mkdir()
    with pytest.raises(FramePackError, match="not writable"):
        Video(smooth_frames(), fps=30).save(folder / "out.mp4")


def test_output_path_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FramePackError, match="output folder"):
        Video(smooth_frames(), fps=30).save(tmp_path / "a_file" / "out.mp4")


def test_unknown_suffix_is_a_clear_error(tmp_path):
    with pytest.raises(FramePackError, match="Unknown video file type"):
        Video(smooth_frames(), fps=30).save(tmp_path / "out.xyz")


def test_png_frames(tmp_path):
    from PIL import Image

    frames = smooth_frames(count=3)
    Video(frames, fps=24, metadata={"seed": 1}).save(tmp_path / "frames")
    files = sorted((tmp_path / "frames").glob("frame_*.png"))
    assert len(files) == 3
    np.testing.assert_array_equal(np.asarray(Image.open(files[2])), frames[2])
    assert json.loads((tmp_path / "frames" / "settings.json").read_text()) == {"seed": 1}


def test_safetensors_of_frames_and_latents(tmp_path):
    frames = smooth_frames(count=5)
    latents = torch.randn(1, 16, 2, 6, 8)
    Video(frames, fps=30, latents=latents, metadata={"seed": 7}).save(tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        np.testing.assert_array_equal(handle.get_tensor("frames").numpy(), frames)
        torch.testing.assert_close(handle.get_tensor("latents"), latents)
        assert json.loads(handle.metadata()["seed"]) == 7


def test_float_frames_are_converted_from_minus_one_to_one(tmp_path):
    pixels = torch.linspace(-1, 1, 4 * 8 * 8 * 3).reshape(4, 8, 8, 3)
    video = Video(frames=np.zeros((1, 1, 1, 3), np.uint8), fps=30)
    from engine.video import as_uint8_frames

    converted = as_uint8_frames(pixels)
    assert converted.dtype == np.uint8 and converted.min() == 0 and converted.max() == 255
    assert video.fps == 30


def test_available_codecs_lists_libx264():
    assert "libx264" in available_codecs()
