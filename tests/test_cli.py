"""The `framepack` command: the tiny preset end to end, info, and one-line errors with a non-zero exit."""

import av
import numpy as np
import pytest
from PIL import Image

from framepack_engine.commands.main import main

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
    (["--quantize", "int8", "--fp8-compute"], "pass --quantize fp8"),
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
    from framepack_engine.pipeline import Engine

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
        [sys.executable, "-m", "framepack_engine.commands.main", "generate", "x", "--seconds", "30", "--out", str(out), *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    deadline = time.monotonic() + 240
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert out.exists(), process.communicate()[1]
    process.send_signal(getattr(signal, signal_name))
    _, error = process.communicate(timeout=120)
    assert process.returncode == code, error
    assert "Traceback" not in error
    assert frame_count(out) >= 4 * 2 + 1  # at least the first section's frames
    assert_says_what_the_file_holds(error, out)
    assert [path.name for path in tmp_path.iterdir()] == ["video.mp4"]


def assert_says_what_the_file_holds(stderr: str, out):
    """The command's last words after an interruption: one line, and the frames it names are the file's."""
    import re

    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    said = re.fullmatch(rf"Interrupted: {re.escape(out.name)} holds (all )?(\d+) frames \((\d+) of (\d+) sections\)\.",
                        lines[0])
    if said is None:
        assert lines[0].startswith("Interrupted: nothing was written"), lines[0]
        assert not out.exists()
        return None
    assert frame_count(out) == int(said.group(2)), lines[0]
    return said


def test_existing_output_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "video.mp4"
    out.write_bytes(b"an earlier video")
    code = main(["generate", "x", "--seconds", "1", "--out", str(out), *FAST])
    assert code == 2 and "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"an earlier video"
    assert main(["generate", "x", "--seconds", "1", "--out", str(out), "--overwrite", *FAST]) == 0
    assert frame_count(out) == 4 * 3 - 3


# The command around a fake engine: what it does when the writer fails or a signal comes while the file is finished.

def fake_section(index, count, height=48, width=64, direction="forward"):
    import torch

    from framepack_engine.pipeline import SectionResult

    frames = np.full((5, height, width, 3), 40 * index, np.uint8)
    pending = frames[:2] if index < count - 1 else frames[:0]
    return SectionResult(index, count, index, frames, pending, direction, torch.zeros(1), {"seconds": 0.1},
                         {"fps": 8})


def use_fake_engine(monkeypatch, sections):
    from framepack_engine.pipeline import Engine

    class FakeEngine:
        def postprocess(self, settings):
            return None  # no interpolation or upscaling asked for

        def stream(self, prompt="", **options):
            yield from sections()

    monkeypatch.setattr(Engine, "from_preset", classmethod(lambda cls, *a, **k: FakeEngine()))


def test_a_writer_failure_mid_run_is_reported_as_itself(tmp_path, monkeypatch, capsys):
    def sections():
        import time

        yield fake_section(0, 4)
        yield fake_section(1, 4, height=32)  # another frame size: the writer's thread fails on it
        time.sleep(1.0)
        yield fake_section(2, 4)  # handing this one over raises the writer's error
        yield fake_section(3, 4)

    use_fake_engine(monkeypatch, sections)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 2
    error = capsys.readouterr().err
    assert "frame size" in error and "closed" not in error and "Traceback" not in error
    assert frame_count(out) == 5  # the first section is kept
    assert [path.name for path in tmp_path.iterdir()] == ["video.mp4"]


def test_a_signal_while_the_file_is_finished_keeps_it_and_says_so(tmp_path, monkeypatch, capsys):
    import os
    import signal
    import time

    import framepack_engine.media.video as video

    def sections():
        for index in range(3):
            yield fake_section(index, 3)
            time.sleep(0.3)

    use_fake_engine(monkeypatch, sections)
    wait = video.SectionVideoWriter._wait

    def terminated_while_waiting(self, *args):  # the generation is over; SIGTERM comes while close() waits for the
        os.kill(os.getpid(), signal.SIGTERM)     # encoder
        time.sleep(0.2)
        return wait(self, *args)

    monkeypatch.setattr(video.SectionVideoWriter, "_wait", terminated_while_waiting)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 143
    # The signal came while the file was finished: the finish completes, every frame handed over is in it.
    said = assert_says_what_the_file_holds(capsys.readouterr().err, out)
    assert said.group(1) == "all " and frame_count(out) == 15 and said.group(3, 4) == ("3", "3")
    assert signal.getsignal(signal.SIGTERM) is handler  # the command puts the previous handler back
