"""Nothing lost on a signal: the finishing protocol of the command and the output writer.

A signal stops the engine at once but never a section being handed to the writer nor the file being finished; a
second one makes the finish keep only what is durable (the segments already encoded, which are joined); every
interruption exits 130 (SIGINT) or 143 (SIGTERM) with one line saying exactly what the file holds; a Ctrl-C during
the imports is that one line too; and what a killed run leaves beside --out is removed by the next run."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from framepack_engine.commands.main import main
from tests.test_cli import assert_says_what_the_file_holds, fake_section, frame_count, use_fake_engine

REPO = Path(__file__).resolve().parents[1]
FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]
# One thread: the tiny preset's tensors are too small to share, and the test machine is small.
ENVIRONMENT = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def start(out: Path, *extra: str, seconds: int = 30) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "framepack_engine.commands.main", "generate", "x", "--seconds", str(seconds),
         "--out", str(out), *FAST, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT, cwd=REPO)


def wait_for_file(process: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not out.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert out.exists(), process.communicate()[1]


def finish(process: subprocess.Popen, timeout: float = 120) -> str:
    try:
        _, error = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return error


@pytest.mark.parametrize("signal_name,code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_a_signal_during_the_imports_is_one_line(tmp_path, signal_name, code):
    """The signal is sent when the command first imports torch (a second or so after the start): one line, the
    status of the signal, nothing written."""
    script = ("import builtins, os, signal, sys\n"
              "real = builtins.__import__\n"
              "def hooked(name, *args, **kwargs):\n"
              "    if name == 'torch' and not hooked.sent:\n"
              f"        hooked.sent = True; os.kill(os.getpid(), signal.{signal_name})\n"
              "    return real(name, *args, **kwargs)\n"
              "hooked.sent = False\n"
              "builtins.__import__ = hooked\n"
              "from framepack_engine.commands.main import main\n"
              "sys.exit(main())\n")
    out = tmp_path / "video.mp4"
    process = subprocess.Popen([sys.executable, "-c", script, "generate", "x", "--out", str(out), *FAST],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT, cwd=REPO)
    error = finish(process)
    assert process.returncode == code, error
    assert error.strip() == "Interrupted before the command started: nothing was done."
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("delay", [0.02, 0.15, 0.4])
def test_two_ctrl_c_are_130_and_one_line_that_matches_the_file(tmp_path, delay):
    out = tmp_path / "video.mp4"
    process = start(out)
    wait_for_file(process, out)
    process.send_signal(signal.SIGINT)
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    error = finish(process)
    assert process.returncode == 130, error
    assert "Traceback" not in error and "Exception ignored" not in error
    assert assert_says_what_the_file_holds(error, out) is not None  # the first section was on disk: it stays
    assert [path.name for path in tmp_path.iterdir()] == ["video.mp4"]


def test_a_killed_run_leaves_parts_that_the_next_run_removes(tmp_path):
    out = tmp_path / "video.mp4"
    process = start(out)
    wait_for_file(process, out)
    process.kill()
    process.wait(30)
    left = sorted(path.name for path in tmp_path.iterdir() if path.name != "video.mp4")
    assert left and all(name.startswith(".video.mp4.") for name in left)  # the writer's parts (and maybe a temp)
    (tmp_path / "other.mp4.abcdefgh.parts").mkdir()  # another output's name: not ours to remove
    assert main(["generate", "x", "--seconds", "1", "--out", str(out), "--overwrite", *FAST]) == 0
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other.mp4.abcdefgh.parts", "video.mp4"]


# In the command's own process, around a fake engine: where exactly each signal lands is set by the test.

def slow_encoder(monkeypatch, seconds: float):
    """Each segment takes `seconds` to encode, and joins are postponed as long as nothing forces one."""
    import framepack_engine.media.video as video

    add = video._VideoSink.add
    monkeypatch.setattr(video._VideoSink, "add", lambda self, *a: (time.sleep(seconds), add(self, *a))[1])
    monkeypatch.setattr(video, "JOIN_SPACING", 1e9)


def test_ctrl_c_after_two_sections_then_again_while_finishing_keeps_what_was_encoded(tmp_path, monkeypatch,
                                                                                       capsys):
    """The probe's case: no file at all and "Interrupted before a section finished", although two sections were
    finished. Now the encoded segments are joined (even a postponed join) and the line says what the file holds."""
    import framepack_engine.media.video as video

    encoded = threading.Event()
    wait = video.SectionVideoWriter._wait

    def sections():
        yield fake_section(0, 6)
        yield fake_section(1, 6)
        assert encoded.wait(30)  # the first segment is encoded (its join postponed), the second being encoded
        os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C: the engine stops here
        time.sleep(5)
        yield fake_section(2, 6)

    def second_ctrl_c_while_waiting(self, *args):  # the file is being finished: the second Ctrl-C
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.1)
        return wait(self, *args)

    slow_encoder(monkeypatch, 0.5)
    add = video._VideoSink.add
    monkeypatch.setattr(video._VideoSink, "add", lambda self, *a: (add(self, *a), encoded.set()))
    monkeypatch.setattr(video.SectionVideoWriter, "_wait", second_ctrl_c_while_waiting)
    use_fake_engine(monkeypatch, sections)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 130
    said = assert_says_what_the_file_holds(capsys.readouterr().err, out)
    assert said is not None and frame_count(out) >= 5  # at least the section that was encoded
    assert said.group(4) == "6" and [path.name for path in tmp_path.iterdir()] == ["video.mp4"]


def test_one_ctrl_c_while_finishing_completes_the_finish(tmp_path, monkeypatch, capsys):
    """SIGINT after the last section, while its segment is still being encoded: the file gets every frame."""
    import framepack_engine.media.video as video

    wait = video.SectionVideoWriter._wait

    def interrupted_while_waiting(self, *args):
        os.kill(os.getpid(), signal.SIGINT)
        return wait(self, *args)

    def sections():
        for index in range(4):
            yield fake_section(index, 4)

    slow_encoder(monkeypatch, 0.3)
    monkeypatch.setattr(video.SectionVideoWriter, "_wait", interrupted_while_waiting)
    use_fake_engine(monkeypatch, sections)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 130
    said = assert_says_what_the_file_holds(capsys.readouterr().err, out)
    assert said.group(1) == "all " and frame_count(out) == 20 and said.group(3, 4) == ("4", "4")


def test_a_signal_while_a_section_is_handed_over_does_not_split_it(tmp_path, monkeypatch, capsys):
    """SIGTERM lands inside SectionOutputFile.add: the section is handed over whole (with its pending frames), the
    run stops after it and the file holds it."""
    from framepack_engine.media.output import SectionOutputFile

    add = SectionOutputFile.add

    def terminated_inside(self, result):
        if result.index == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        add(self, result)

    def sections():
        for index in range(4):
            yield fake_section(index, 4)

    monkeypatch.setattr(SectionOutputFile, "add", terminated_inside)
    use_fake_engine(monkeypatch, sections)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 143
    said = assert_says_what_the_file_holds(capsys.readouterr().err, out)
    # two sections of 5 frames and the 2 frames the second left pending
    assert frame_count(out) == 12 and said.group(3, 4) == ("2", "4")


def test_a_full_disk_says_nothing_was_written(tmp_path, monkeypatch, capsys):
    """The writer fails on its first segment: the message must not claim that finished sections were kept."""
    import framepack_engine.media.video as video

    def disk_full(self, *args):
        raise OSError(28, "No space left on device")

    def sections():
        import time

        yield fake_section(0, 3)
        time.sleep(0.5)
        yield fake_section(1, 3)
        yield fake_section(2, 3)

    monkeypatch.setattr(video._VideoSink, "add", disk_full)
    use_fake_engine(monkeypatch, sections)
    out = tmp_path / "video.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "No space left on device" in error[0] and "nothing was written" in error[0], error
    assert "kept" not in error[0]
    assert not list(tmp_path.iterdir())


# The writer itself.

def test_abort_joins_the_segments_already_encoded_and_drops_the_rest(tmp_path, monkeypatch):
    import framepack_engine.media.video as video
    from framepack_engine.media.video import SectionVideoWriter

    slow_encoder(monkeypatch, 0.0)
    encoded = []
    add = video._VideoSink.add
    release = threading.Event()

    def encode(self, frames, *args):
        if encoded:  # the second segment waits: it is being encoded when the abort comes
            release.wait(30)
        add(self, frames, *args)
        encoded.append(len(frames))

    monkeypatch.setattr(video._VideoSink, "add", encode)
    path = tmp_path / "out.mp4"
    writer = SectionVideoWriter(path, 8)
    writer.write_segment(np.full((5, 32, 48, 3), 10, np.uint8))
    writer.write_segment(np.full((7, 32, 48, 3), 90, np.uint8))
    deadline = time.monotonic() + 30
    while not encoded and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not path.exists()  # encoded, its join postponed
    threading.Timer(0.2, release.set).start()
    assert writer.abort() == path
    assert frame_count(path) == writer.frames_written == 5
    assert [entry.name for entry in tmp_path.iterdir()] == ["out.mp4"]


@pytest.mark.parametrize("name,shown", [("video.mp4", "video.mp4"), ("frames.png", "frames"),
                                        ("out.safetensors", "out.safetensors")])
def test_on_disk_names_what_holds_the_frames(tmp_path, name, shown):
    from framepack_engine.media.output import SectionOutputFile

    output = SectionOutputFile(tmp_path / name, 8)
    assert output.on_disk() == "nothing was written (no section had finished)"
    output.add(fake_section(0, 3))
    output.add(fake_section(1, 3))
    output.close()
    # two sections of 5 frames and the second one's 2 pending frames; the third section never came
    assert output.on_disk() == f"{shown} holds 12 frames (2 of 3 sections)"
    complete = SectionOutputFile(tmp_path / f"complete_{name}", 8)
    for index in range(2):
        complete.add(fake_section(index, 2))
    complete.close()
    assert complete.on_disk() == f"complete_{shown} holds all 10 frames (2 of 2 sections)"
