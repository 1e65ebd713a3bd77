"""framepack_engine.media.codecs: container defaults, choices checked by opening the encoder, reproducible encodes, quiet logs."""

import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from framepack_engine.media import codecs as encoders
from framepack_engine.media.codecs import (CONTAINERS, DEFAULT_CODECS, available_codecs, check_encoder, quiet_encoder_logs,
                             usable_codecs)
from framepack_engine.errors import FramePackError
from framepack_engine.media.video import SectionVideoWriter, encode_video


REPOSITORY = Path(__file__).resolve().parents[1]


def textured_frames(count=20, height=128, width=160, seed=0):
    """Gradients with grain. At this size libx264's AVX-512 code gives a different file on every run (checked
    below), which a plain gradient does not show."""
    generator = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    return np.asarray([np.stack([(x * 2 + t * 5 + generator.integers(0, 30, (height, width))) % 256, (y * 3 + t) % 256,
                                 (x + y + t * 7) % 256], -1) for t in range(count)], np.uint8)


def decode(path):
    with av.open(str(path)) as container:
        return np.asarray([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def nvenc_opens() -> bool:
    return "h264_nvenc" in usable_codecs("mp4")


@pytest.mark.parametrize("path, codec, crf, pixel_format, message", [
    ("x.webm", "libx264", 16, None, "A .webm file cannot hold libx264 video: choose one of libvpx-vp9"),
    ("x.mp4", "libx264", -5, None, "crf -5 is outside libx264's range 0 to 51"),
    ("x.mp4", "libx264", 52, None, "crf 52 is outside libx264's range 0 to 51"),
    ("x.webm", None, 64, None, "crf 64 is outside libvpx-vp9's range 0 to 63"),
    ("x.mp4", "libx264", 16.5, None, "crf must be a whole number, got 16.5"),
    ("x.mp4", "libx264", "high", None, "crf must be a whole number, got 'high'"),
    ("x.mp4", "libx264", 16, "rgb24", "libx264 cannot encode pixel format rgb24: use one of yuv420p"),
    ("x.mp4", "libx264", 16, "yuv999p", "'yuv999p' is not a pixel format FFmpeg knows"),
    ("x.mp4", "no-such-codec", 16, None, "The video encoder 'no-such-codec' is not available"),
    ("x.mp4", "aac", 16, None, "The video encoder 'aac' is not available"),  # an audio encoder
    ("x.mp4", 264, 16, None, "The video encoder must be a name such as libx264, got 264"),
    ("x.gif", None, 16, None, "Unknown video file type '.gif'"),
])
def test_bad_encoder_choices_are_one_sentence_naming_the_input(path, codec, crf, pixel_format, message):
    with pytest.raises(FramePackError) as raised:
        check_encoder(path, codec, crf, pixel_format)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_hardware_encoder_that_cannot_start_fails_before_any_work():
    if nvenc_opens():  # a machine with NVENC: the choice works and is offered
        assert check_encoder("x.mp4", "h264_nvenc").codec == "h264_nvenc"
        return
    with pytest.raises(FramePackError) as raised:
        check_encoder("x.mp4", "h264_nvenc")
    text = str(raised.value)
    assert "h264_nvenc does not start here" in text and "it needs its GPU and driver" in text
    offered = text.split("choose one of ")[1].split(" for ")[0].split(", ")
    assert offered[0] == "libx264" and "h264_nvenc" not in offered


def test_offered_encoders_really_open():
    for suffix in CONTAINERS:
        offered = usable_codecs(CONTAINERS[suffix])
        assert DEFAULT_CODECS[suffix] in offered
        for codec in offered:
            assert check_encoder(f"x{suffix}", codec).codec == codec
    # every encoder of this FFmpeg is tried, not only the common ones (libvpx, VP8, is in none of our tables)
    assert "libvpx" in usable_codecs("matroska") and "libvpx" in usable_codecs("webm")


def test_only_encoders_that_open_are_listed(capsys):
    """`framepack info` listed FFmpeg's whole catalogue (a64multi, alias_pix, av1_amf, ...): now only what opens."""
    from framepack_engine.commands.main import main

    listed = available_codecs()
    assert listed == usable_codecs("matroska") and len(listed) == len(set(listed))
    not_opening = [name for name in encoders._video_encoders()
                   if encoders._codec(name).name == name and name not in listed]
    assert not_opening  # this FFmpeg has encoders that do not open on a test frame here (a64multi needs 320x200)
    for name in listed:  # each one really opens
        assert check_encoder("x.mkv", name).codec == name
    assert main(["info"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("video encoders"))
    assert line.split(": ", 1)[1].split(", ") == listed  # all of them, nothing cut off, nothing else
    assert not set(not_opening) & set(line.split(": ", 1)[1].split(", "))


@pytest.mark.parametrize("suffix", list(CONTAINERS))
def test_the_codec_error_lists_every_encoder_that_works(suffix):
    with pytest.raises(FramePackError) as raised:
        check_encoder(f"x{suffix}", "no-such-codec")
    offered = str(raised.value).split("choose one of ")[1].rstrip(".").split(", ")
    assert offered[0] == DEFAULT_CODECS[suffix]
    assert sorted(offered) == sorted(usable_codecs(CONTAINERS[suffix]))  # every one: it stopped at 8 before
    if suffix in (".mp4", ".mkv", ".mov"):
        assert "libx265" in offered


def test_the_codec_error_keeps_software_encoders_after_many_hardware_ones(monkeypatch):
    """A machine with many working hardware encoders (listed first) still offers libx265 (it was cut off)."""
    hardware = [f"{codec}_nvenc" for codec in ("h264", "hevc", "av1")] + [f"{codec}_vaapi" for codec in
                                                                            ("h264", "hevc", "av1", "vp9", "mjpeg")]
    working = hardware + usable_codecs("mp4")
    monkeypatch.setattr(encoders, "usable_codecs", lambda container="matroska": working)
    offered = encoders._choices(".mp4").split(", ")
    assert offered[0] == "libx264" and "libx265" in offered and sorted(offered) == sorted(set(working))


@pytest.mark.parametrize("suffix", list(CONTAINERS))
def test_each_container_default_writes_a_playable_file(tmp_path, suffix):
    frames = textured_frames(count=5, height=48, width=64)
    settings = check_encoder(f"x{suffix}")
    assert settings.codec == DEFAULT_CODECS[suffix]
    path = encode_video(frames, tmp_path / f"out{suffix}", fps=24)
    decoded = decode(path)
    assert decoded.shape == frames.shape


@pytest.mark.parametrize("path, codec, pixel_format", [
    ("x.mov", "prores_ks", "yuv422p10le"),  # failed before: yuv420p was forced on it
    ("x.mkv", "ffv1", "yuv444p"),
    ("x.mkv", "libx265", "yuv420p"),
    ("x.webm", "libsvtav1", "yuv420p"),
])
def test_pixel_format_follows_the_encoder(tmp_path, path, codec, pixel_format):
    assert check_encoder(path, codec).pixel_format == pixel_format
    frames = textured_frames(count=3, height=32, width=48)
    decoded = decode(encode_video(frames, tmp_path / path, fps=30, codec=codec))
    assert decoded.shape == frames.shape


@pytest.fixture
def dirty_heap(monkeypatch):
    """Fill freed memory with random bytes on the writer's thread before each segment is encoded.

    libx264's AVX-512 code reads memory it never wrote, so its output depends on what the heap held before: in a
    real run (models loaded, sections decoded) that differs from run to run. A fresh test process has a clean
    heap and would hide the problem; this makes every encode see different leftovers, as real runs do.
    """
    import framepack_engine.media.video as video

    encode_segment = video._VideoSink.add
    seeds = iter(range(1 << 30))

    def add(self, *args, **kwargs):
        generator = np.random.default_rng(next(seeds))
        leftovers = [os.urandom(int(size)) for size in generator.integers(1 << 8, 1 << 17, 300)]
        del leftovers
        return encode_segment(self, *args, **kwargs)

    monkeypatch.setattr(video._VideoSink, "add", add)


def write_sections(path, frames, options=None, direction="forward"):
    pieces = [frames[:8], frames[8:15], frames[15:]]
    with SectionVideoWriter(path, 30, options=options, direction=direction) as writer:
        for piece in pieces if direction == "forward" else pieces[::-1]:
            writer.write_segment(piece)
    return decode(path)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov", ".avi"])
def test_two_runs_decode_to_identical_frames(tmp_path, dirty_heap, suffix):
    frames = textured_frames()
    direction = "backward" if suffix == ".mkv" else "forward"
    first, second, third = (write_sections(tmp_path / f"run{index}{suffix}", frames, direction=direction)
                            for index in range(3))
    assert len(first) == 20 and np.abs(first.astype(int) - frames).mean() < 12  # the video, in order
    np.testing.assert_array_equal(first, second)
    np.testing.assert_array_equal(first, third)


def test_reproducibility_check_can_fail(tmp_path, dirty_heap):
    """With x264's own CPU detection (AVX-512 code on such CPUs) the same frames decode differently."""
    if not encoders._cpu_has_avx512():
        pytest.skip("this CPU has no AVX-512: libx264 is repeatable here without our setting")
    assert dict(check_encoder("x.mp4").options)["x264-params"] == "asm=AVX2"
    frames = textured_frames()
    runs = [write_sections(tmp_path / f"run{index}.mp4", frames, {"x264-params": "asm=auto"}) for index in range(3)]
    assert any(not np.array_equal(runs[0], other) for other in runs[1:])


def test_caller_options_win_over_ours():
    settings = check_encoder("x.mp4", options={"x264-params": "asm=AVX2:keyint=30", "preset": "veryfast"})
    options = dict(settings.options)
    assert options["preset"] == "veryfast" and "keyint=30" in options["x264-params"]
    assert dict(check_encoder("x.webm", options={"cpu-used": "8"}).options)["cpu-used"] == "8"


LOG_RUN = """
import sys
from framepack_engine.media import codecs as encoders
from framepack_engine.media.video import encode_video
from tests.test_encoders import textured_frames
level = sys.argv[2]
if level == "quiet":
    encoders.quiet_encoder_logs()
elif level == "info":  # the encoders' own default, to show the check below can fail
    encoders._log_level.update({"x265": "info", "svt": "3"})
    encoders.os.environ["SVT_LOG"] = "3"
frames = textured_frames(count=3, height=64, width=64)
for codec in ("libx265", "libsvtav1"):
    encode_video(frames, sys.argv[1] + "/" + codec + ".mkv", fps=30, codec=codec, crf=30)
"""


def encoder_log(tmp_path, level):
    """What the encoders print in a fresh process (SVT-AV1 reads its log level once per process)."""
    environment = {key: value for key, value in os.environ.items() if key != "SVT_LOG"}
    environment["PYTHONPATH"] = str(REPOSITORY)
    done = subprocess.run([sys.executable, "-c", LOG_RUN, str(tmp_path), level], env=environment, cwd=REPOSITORY,
                          capture_output=True, text=True, check=True)
    return done.stderr


def test_encoder_logs_are_errors_only_and_silent_when_quiet(tmp_path):
    assert encoder_log(tmp_path, "quiet") == ""
    default = encoder_log(tmp_path, "default")
    assert "x265 [info]" not in default and "Svt[info]" not in default  # no banner per section
    loud = encoder_log(tmp_path, "info")
    assert "x265 [info]" in loud and "Svt[info]" in loud

