"""The `framepack` command: the tiny preset end to end, info, and one-line errors with a non-zero exit."""

import av
import numpy as np
import pytest
from PIL import Image

from engine.cli import main

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]


def frame_count(path):
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_generate_tiny_writes_a_video(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    assert main(["generate", "a cat walks", "--seconds", "2", "--out", str(out), *FAST]) == 0
    assert frame_count(out) == 4 * (2 * 2 + 1) - 3
    printed = capsys.readouterr().out
    assert "random weights" in printed and "Saved" in printed


def test_generate_image_to_video_f1_to_png_frames(tmp_path):
    image = tmp_path / "start.png"
    Image.fromarray(np.full((48, 80, 3), 120, np.uint8)).save(image)
    out = tmp_path / "frames"
    assert main(["generate", "--prompt", "x", "--image", str(image), "--variant", "f1", "--seconds", "1",
                 "--out", str(out), *FAST]) == 0
    assert len(list(out.glob("frame_*.png"))) == 4 * 3 - 3


@pytest.mark.parametrize("extra,message", [
    (["--image", "missing.png"], "does not exist"),
    (["--seconds", "0"], "seconds must be a finite number in (0, 3600]"),
    (["--codec", "not-a-codec"], "not available"),
    (["--variant", "f1", "--image", "{image}", "--end-image", "{image}"], "bidirectional"),
    (["--quantize", "int8"], "not available"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, extra, message):
    image = tmp_path / "start.png"
    Image.fromarray(np.full((48, 80, 3), 120, np.uint8)).save(image)
    extra = [argument.replace("{image}", str(image)) for argument in extra]
    code = main(["generate", "x", "--seconds", "1", "--out", str(tmp_path / "v.mp4"), *FAST[:-1], *extra, "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]
    assert not (tmp_path / "v.mp4").exists()


def test_unwritable_output_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    code = main(["generate", "x", "--seconds", "1", "--out", str(tmp_path / "file" / "v.mp4"), *FAST])
    assert code == 2 and "--out" in capsys.readouterr().err


def test_info(capsys):
    assert main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "attention backends" in printed and "sdpa" in printed and "libx264" in printed
