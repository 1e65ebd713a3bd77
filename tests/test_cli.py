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
    (["--quantize", "int8", "--fp8-compute"], "pass quantize='fp8'"),
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


def test_ctrl_c_while_loading_is_one_line(monkeypatch, capsys, tmp_path):
    from engine.pipeline import Engine

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "from_preset", interrupted)
    code = main(["generate", "x", "--seconds", "1", "--out", str(tmp_path / "v.mp4"), *FAST])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 130 and error == ["Interrupted while loading the model: nothing was written."]
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("signal_name,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_mid_generation_keeps_the_finished_sections(tmp_path, signal_name, code):
    """The command in its own process, stopped once its first section is on disk: the file stays a playable
    video of at least that section, with no temporary files beside it."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "video.mp4"
    environment = {**os.environ, "PYTHONPATH": os.getcwd()}
    process = subprocess.Popen(
        [sys.executable, "-m", "engine.cli", "generate", "x", "--seconds", "30", "--out", str(out), *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 240
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert out.exists(), process.communicate()[1]
    process.send_signal(getattr(signal, signal_name))
    _, error = process.communicate(timeout=120)
    assert process.returncode == code, error
    assert "Interrupted: the finished sections are saved." in error and "Traceback" not in error
    assert frame_count(out) >= 4 * 2 + 1  # at least the first section's frames
    assert [path.name for path in tmp_path.iterdir()] == ["video.mp4"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"an earlier video")
    code = main(["generate", "x", "--seconds", "1", "--out", str(out), *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier video"
    assert main(["generate", "x", "--seconds", "1", "--out", str(out), "--overwrite", *FAST]) == 0
    assert frame_count(out) == 4 * 3 - 3
