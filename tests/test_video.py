import json

import av
import numpy as np
import pytest
import torch
from safetensors import safe_open

from framepack_engine.errors import FramePackError
from framepack_engine.media.video import Video, available_codecs, encode_video


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
    monkeypatch.setattr("framepack_engine.media.video.os.access", lambda path, mode: False)
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
    from framepack_engine.media.video import as_uint8_frames

    converted = as_uint8_frames(pixels)
    assert converted.dtype == np.uint8 and converted.min() == 0 and converted.max() == 255
    assert video.fps == 30


def test_available_codecs_lists_libx264():
    assert "libx264" in available_codecs()


# ----------------------------------------------------------------------------------------------------------------
# SectionVideoWriter

import os  # noqa: E402
import stat  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

import framepack_engine.media.video as video_module  # noqa: E402
from framepack_engine.media.video import MAX_PENDING_SEGMENTS, SectionVideoWriter, check_output  # noqa: E402

SECTIONS = (13, 12, 12)  # a first section one frame longer, as the engine's


def numbered_frames(start, count, height=48, width=96):
    """Frame t shows t as a bright vertical bar at column 2t and a blue level of 6t: order mistakes show."""
    frames = np.full((count, height, width, 3), 40, np.uint8)
    for i in range(count):
        t = start + i
        frames[i, :, 2 * t % width: 2 * t % width + 2] = 250
        frames[i, :, :, 2] = (6 * t) % 256
    return frames


def section_pieces(direction, sections=SECTIONS):
    starts = np.cumsum((0,) + sections)
    pieces = [(int(starts[i]), sections[i]) for i in range(len(sections))]
    return pieces if direction == "forward" else pieces[::-1]


def frame_index(decoded):
    """The frame number each decoded frame shows, from its bar position."""
    return [int(np.argmax(frame[:, :, 0].mean(axis=0))) // 2 for frame in decoded]


def only_these_files(folder, *names):
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov", ".avi"])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_writer_keeps_a_complete_video_after_every_section(tmp_path, suffix, direction):
    path = tmp_path / f"out{suffix}"
    written = 0
    with SectionVideoWriter(path, 30, metadata={"seed": 5}, direction=direction) as writer:
        for start, count in section_pieces(direction):
            writer.write_segment(numbered_frames(start, count))
            assert writer.flush() == path
            written += count
            decoded, fps, _ = decode(path)  # playable after each section, with everything so far
            assert len(decoded) == written and writer.frames_written == written
            first = start if direction == "backward" else 0
            assert frame_index(decoded) == list(range(first, first + written))
    decoded, fps, metadata = decode(path)
    assert frame_index(decoded) == list(range(sum(SECTIONS)))
    assert np.abs(decoded.astype(int) - numbered_frames(0, sum(SECTIONS))).mean() < 6
    assert fps == pytest.approx(30)
    assert json.loads(metadata.get("comment") or metadata.get("COMMENT")) == {"seed": 5}
    only_these_files(tmp_path, path.name)  # no segment files left behind


@pytest.mark.parametrize("suffix, codec", [(".mkv", "libx265"), (".mp4", "libsvtav1"), (".mkv", "ffv1"),
                                          (".mov", "prores_ks"), (".avi", "mpeg4"), (".webm", "libsvtav1")])
def test_writer_joins_segments_of_other_encoders(tmp_path, suffix, codec):
    path = tmp_path / f"out{suffix}"
    with SectionVideoWriter(path, 30, codec=codec, crf=None, direction="backward") as writer:
        for start, count in section_pieces("backward"):
            writer.write_segment(numbered_frames(start, count))
    decoded = decode(path)[0]
    assert frame_index(decoded) == list(range(sum(SECTIONS)))
    assert np.abs(decoded.astype(int) - numbered_frames(0, sum(SECTIONS))).mean() < 8


@pytest.mark.parametrize("fps", [24, 30, 30000 / 1001, 12.5])
def test_joined_video_has_exact_timing(tmp_path, fps):
    path = tmp_path / "out.mp4"
    with SectionVideoWriter(path, fps) as writer:
        for start, count in section_pieces("backward"):
            writer.write_segment(numbered_frames(start, count))
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [float(frame.pts * frame.time_base) for frame in container.decode(stream)]
        assert stream.average_rate == Fraction(fps).limit_denominator(1001)
    expected = [index / fps for index in range(sum(SECTIONS))]
    assert np.allclose(times, expected, atol=1e-3)


class CountingStream:
    """Wraps an encoder stream and counts the frames it encodes."""

    encoded = 0

    def __init__(self, stream):
        self._stream = stream

    def encode(self, frame=None):
        if frame is not None:
            CountingStream.encoded += 1
        return self._stream.encode(frame)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def test_each_frame_is_encoded_once(tmp_path, monkeypatch):
    opened = video_module.open_video_stream
    monkeypatch.setattr(video_module, "open_video_stream", lambda *a, **k: CountingStream(opened(*a, **k)))
    CountingStream.encoded = 0
    sections = (13,) + (12,) * 7
    with SectionVideoWriter(tmp_path / "out.mkv", 30, direction="backward") as writer:
        for start, count in section_pieces("backward", sections):
            writer.write_segment(numbered_frames(start, count))
    assert CountingStream.encoded == sum(sections)
    assert len(decode(tmp_path / "out.mkv")[0]) == sum(sections)


def test_pending_segments_are_bounded(tmp_path, monkeypatch):
    """write_segment returns at once while the encoder keeps up, and waits once MAX_PENDING_SEGMENTS queue up."""
    release = threading.Event()
    encode_segment = video_module._VideoSink.add

    def slow_add(self, *args):
        release.wait()
        return encode_segment(self, *args)

    monkeypatch.setattr(video_module._VideoSink, "add", slow_add)
    writer = SectionVideoWriter(tmp_path / "out.mp4", 30)
    handed = []

    def produce():
        for start, count in section_pieces("forward", (4,) * 6):
            writer.write_segment(numbered_frames(start, count))
            handed.append(start)

    producer = threading.Thread(target=produce)
    producer.start()
    producer.join(timeout=1.5)
    # one segment in the encoder, MAX_PENDING_SEGMENTS queued, the next one waiting to be queued
    assert producer.is_alive() and len(handed) == 1 + MAX_PENDING_SEGMENTS
    release.set()
    producer.join()
    assert writer.close() == tmp_path / "out.mp4"
    assert frame_index(decode(tmp_path / "out.mp4")[0]) == list(range(24))


def wait_for_writer(writer):
    """Until the background thread has taken and finished every segment (joins included), without flush()."""
    while writer._queue.unfinished_tasks:
        time.sleep(0.01)


@pytest.mark.parametrize("suffix", [".mp4", ""])
def test_a_join_is_spaced_by_its_cost_so_the_total_stays_linear(tmp_path, monkeypatch, suffix):
    """Joins that cost more than the time between sections are spaced (JOIN_SPACING times their duration apart):
    the file lags a few sections, close() joins everything, and joins take a bounded share of the time."""
    sink = video_module._VideoSink if suffix else video_module._PngSink
    publish, joins = sink.publish, []

    def slow_publish(self):
        time.sleep(0.2)  # a join far costlier than the sections arriving every 20 ms
        joins.append(self.frames)
        publish(self)

    monkeypatch.setattr(sink, "publish", slow_publish)
    path = tmp_path / f"out{suffix}"
    pieces = section_pieces("forward", (4,) * 12)
    started = time.perf_counter()
    writer = SectionVideoWriter(path, 30)
    for start, count in pieces:
        writer.write_segment(numbered_frames(start, count))
        wait_for_writer(writer)
        time.sleep(0.02)
    lagging = writer.frames_written
    assert writer.close() == path
    elapsed = time.perf_counter() - started
    assert 2 <= len(joins) < len(pieces) // 2  # a join after every section would be 12 of them
    assert lagging < 48  # at the last section the file was behind, and close() caught it up
    assert 0.2 * len(joins) < elapsed / 1.5  # joins were spaced, not back to back
    if suffix:
        assert frame_index(decode(path)[0]) == list(range(48))
    else:
        assert len(list(path.glob("frame_*.png"))) == 48


def test_a_postponed_join_happens_when_it_comes_due_without_a_new_section(tmp_path, monkeypatch):
    publish = video_module._VideoSink.publish

    def slow_publish(self):  # a join that costs 0.2 s: the next is due 0.8 s after it ends
        time.sleep(0.2)
        publish(self)

    monkeypatch.setattr(video_module._VideoSink, "publish", slow_publish)
    path = tmp_path / "out.mp4"
    writer = SectionVideoWriter(path, 30)
    writer.write_segment(numbered_frames(0, 8))
    wait_for_writer(writer)
    writer.write_segment(numbered_frames(8, 8))  # arrives before the next join is due: postponed
    wait_for_writer(writer)
    assert writer.frames_written == 8
    deadline = time.monotonic() + 5
    while writer.frames_written < 16 and time.monotonic() < deadline:  # no new section, no flush
        time.sleep(0.05)
    assert writer.frames_written == 16 and len(decode(path)[0]) == 16
    writer.close()


def test_safetensors_keeps_the_sections_before_a_failure(tmp_path, monkeypatch):
    add, calls = video_module._SafetensorsSink.add, []

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return add(self, *args)

    monkeypatch.setattr(video_module._SafetensorsSink, "add", failing_add)
    path = tmp_path / "out.safetensors"
    with pytest.raises(FramePackError, match="out.safetensors holds 8 frames; check free disk space"):
        with SectionVideoWriter(path, 30) as writer:
            for start, count in section_pieces("forward", (4,) * 4):
                writer.write_segment(numbered_frames(start, count))
                wait_for_writer(writer)
    with safe_open(str(path), "pt") as handle:
        assert frame_index(handle.get_tensor("frames").numpy()) == list(range(8))
    only_these_files(tmp_path, path.name)


def test_sections_slower_than_their_join_are_each_joined_on_arrival(tmp_path, monkeypatch):
    publish, joins = video_module._VideoSink.publish, []
    monkeypatch.setattr(video_module._VideoSink, "publish", lambda self: (joins.append(1), publish(self)))
    monkeypatch.setattr(video_module, "JOIN_SPACING", 0.5)  # sections 0.1 s apart are always far enough apart
    path = tmp_path / "out.mp4"
    written = 0
    with SectionVideoWriter(path, 30) as writer:
        for start, count in section_pieces("forward", (4,) * 5):
            writer.write_segment(numbered_frames(start, count))
            written += count
            wait_for_writer(writer)
            assert writer.frames_written == written  # in the file without a flush
            assert len(decode(path)[0]) == written
            time.sleep(0.1)
    assert len(joins) == 5


@pytest.mark.parametrize("suffix", [".mp4", "", ".safetensors"])
def test_interruption_keeps_every_section_handed_over(tmp_path, suffix):
    path = tmp_path / f"out{suffix}"
    with pytest.raises(KeyboardInterrupt):
        with SectionVideoWriter(path, 30, direction="backward") as writer:
            pieces = section_pieces("backward")
            writer.write_segment(numbered_frames(*pieces[0]))
            writer.write_segment(numbered_frames(*pieces[1]))
            raise KeyboardInterrupt
    kept = pieces[1][0]
    expected = list(range(kept, sum(SECTIONS)))
    if suffix == ".mp4":
        assert frame_index(decode(path)[0]) == expected
    elif suffix == "":
        files = sorted(path.glob("frame_*.png"))
        assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(len(expected))]  # from 0, no gaps
        from PIL import Image
        assert frame_index([np.asarray(Image.open(f)) for f in files]) == expected
    else:
        with safe_open(str(path), "pt") as handle:
            assert frame_index(handle.get_tensor("frames").numpy()) == expected
    only_these_files(tmp_path, path.name)


def test_abort_drops_queued_segments_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    Video(numbered_frames(0, 5), fps=30).save(path)
    old = path.read_bytes()
    release = threading.Event()
    encode_segment = video_module._VideoSink.add
    monkeypatch.setattr(video_module._VideoSink, "add", lambda self, *a: (release.wait(), encode_segment(self, *a)))
    writer = SectionVideoWriter(path, 30)
    writer.write_segment(numbered_frames(0, 12))
    writer.write_segment(numbered_frames(12, 12))
    release.set()
    writer.abort()
    assert path.read_bytes() == old or len(decode(path)[0]) in (12, 24)  # never a broken or mixed file
    only_these_files(tmp_path, "out.mp4")


def test_existing_file_is_replaced_only_when_the_first_section_is_ready(tmp_path, monkeypatch):
    path = tmp_path / "out.mp4"
    Video(numbered_frames(0, 30), fps=30).save(path)
    with pytest.raises(FramePackError, match="'out.mp4' already exists: pass --overwrite"):
        check_output(path)
    assert check_output(path, overwrite=True).codec == "libx264"
    old = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with SectionVideoWriter(path, 30):
            raise KeyboardInterrupt  # before any section finished
    assert path.read_bytes() == old
    with SectionVideoWriter(path, 30) as writer:
        writer.write_segment(numbered_frames(0, 6))
        assert path.read_bytes() == old or len(decode(path)[0]) == 6
    assert len(decode(path)[0]) == 6


@pytest.mark.parametrize("flush_each", [True, False])
def test_failing_encoder_is_reported_and_keeps_earlier_sections(tmp_path, monkeypatch, flush_each):
    path = tmp_path / "out.mp4"
    encode_segment = video_module._VideoSink.add
    second_queued = threading.Event()
    calls = []

    def failing_add(self, *args):
        calls.append(1)
        if len(calls) == 1 and not flush_each:
            second_queued.wait(timeout=5)  # the join of the first is left for later, then the second fails
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return encode_segment(self, *args)

    monkeypatch.setattr(video_module._VideoSink, "add", failing_add)
    with pytest.raises(FramePackError, match="Writing 'out.mp4' failed .*No space left"):
        with SectionVideoWriter(path, 30) as writer:
            for start, count in section_pieces("forward", (6,) * 4):
                writer.write_segment(numbered_frames(start, count))
                if start == 6:
                    second_queued.set()
                if flush_each:
                    writer.flush()
    assert frame_index(decode(path)[0]) == list(range(6))
    only_these_files(tmp_path, "out.mp4")


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_png_folder_is_written_fresh_and_numbered_from_zero(tmp_path, direction):
    from PIL import Image

    folder = tmp_path / "frames"
    Video(numbered_frames(0, 50), fps=30).save(folder)  # an earlier, longer run
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(FramePackError, match="'frames' already holds frames: pass --overwrite"):
        check_output(folder)
    check_output(folder, overwrite=True)
    with SectionVideoWriter(folder, 30, metadata={"seed": 3}, direction=direction) as writer:
        written = 0
        for start, count in section_pieces(direction):
            writer.write_segment(numbered_frames(start, count))
            writer.flush()
            written += count
            files = sorted(folder.glob("frame_*.png"))
            assert [f.name for f in files] == [f"frame_{i:05d}.png" for i in range(written)]
    files = sorted(folder.glob("frame_*.png"))
    assert frame_index([np.asarray(Image.open(f)) for f in files]) == list(range(sum(SECTIONS)))
    np.testing.assert_array_equal(np.asarray(Image.open(files[7])), numbered_frames(7, 1)[0])
    assert json.loads((folder / "settings.json").read_text()) == {"seed": 3}
    assert (folder / "notes.txt").read_text() == "mine"  # only our own files are replaced
    only_these_files(tmp_path, "frames")


def test_safetensors_is_written_at_close_with_latents(tmp_path):
    path = tmp_path / "out.safetensors"
    latents = torch.randn(1, 16, 4, 6, 8)
    with SectionVideoWriter(path, 30, metadata={"seed": 9}, direction="backward") as writer:
        for start, count in section_pieces("backward"):
            writer.write_segment(numbered_frames(start, count), latents=latents[:, :, :2])
        writer.set_latents(latents)
    with safe_open(str(path), "pt") as handle:
        np.testing.assert_array_equal(handle.get_tensor("frames").numpy(), numbered_frames(0, sum(SECTIONS)))
        torch.testing.assert_close(handle.get_tensor("latents"), latents)
        assert json.loads(handle.metadata()["seed"]) == 9
    only_these_files(tmp_path, path.name)


@pytest.mark.parametrize("name", ["out.mp4", "out.webm", "out.safetensors", "frames"])
def test_every_output_gets_ordinary_permissions(tmp_path, name):
    latents = torch.randn(1, 16, 2, 6, 8)
    saved = Video(smooth_frames(count=3), fps=30, latents=latents, metadata={"seed": 1}).save(tmp_path / name)
    umask = os.umask(0)
    os.umask(umask)
    files = sorted(saved.iterdir()) if saved.is_dir() else [saved]
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o666 & ~umask for f in files)


def bad_writer_call(kind, tmp_path):
    if kind == "direction":
        return lambda: SectionVideoWriter(tmp_path / "a.mp4", 30, direction="sideways")
    if kind in ("fps zero", "fps nan", "fps inf", "fps text", "fps bool"):
        fps = {"fps zero": 0, "fps nan": float("nan"), "fps inf": float("inf"), "fps text": "30", "fps bool": True}
        return lambda: SectionVideoWriter(tmp_path / "a.mp4", fps[kind])
    if kind == "suffix":
        return lambda: SectionVideoWriter(tmp_path / "a.gif", 30)
    if kind == "codec for container":
        return lambda: SectionVideoWriter(tmp_path / "a.webm", 30, codec="libx264")
    if kind == "frame shape":
        return lambda: SectionVideoWriter(tmp_path / "a.mp4", 30).write_segment(np.zeros((3, 8, 8), np.uint8))

    def two_sizes():
        with SectionVideoWriter(tmp_path / "a.mp4", 30) as writer:
            writer.write_segment(numbered_frames(0, 2))
            writer.write_segment(numbered_frames(0, 2, height=32))
            writer.flush()
    return two_sizes


@pytest.mark.parametrize("kind, message", [
    ("direction", "direction must be 'forward' or 'backward', got 'sideways'"),
    ("fps zero", "fps must be a positive number, got 0"),
    ("fps nan", "fps must be a positive number, got nan"),
    ("fps inf", "fps must be a positive number, got inf"),
    ("fps text", "fps must be a positive number, got '30'"),
    ("fps bool", "fps must be a positive number, got True"),
    ("suffix", "Unknown video file type '.gif'"),
    ("codec for container", "A .webm file cannot hold libx264 video"),
    ("frame shape", "Frames must be uint8 of shape (frames, height, width, 3)"),
    ("size change", "Every segment must have the frame size of the first, 96x48, got 96x32"),
])
def test_bad_writer_inputs(tmp_path, kind, message):
    with pytest.raises(FramePackError) as raised:
        bad_writer_call(kind, tmp_path)()
    assert message in str(raised.value)


@pytest.mark.parametrize("make, name, message", [
    (lambda p: p.joinpath("out.mp4").mkdir(), "out.mp4", "'out.mp4' is a folder: give a file name"),
    (lambda p: p.joinpath("frames").write_text("x"), "frames", "'frames' is a file, not a folder for PNG frames"),
    (lambda p: p.joinpath("out.safetensors").write_text("x"), "out.safetensors", "already exists: pass --overwrite"),
    (lambda p: None, "out.gif", "Unknown video file type '.gif'"),
    (lambda p: None, "out.webm", None),  # works: the default codec follows the container
])
def test_check_output(tmp_path, make, name, message):
    make(tmp_path)
    if message is None:
        assert check_output(tmp_path / name).codec == "libvpx-vp9"
        return
    with pytest.raises(FramePackError) as raised:
        check_output(tmp_path / name)
    assert message in str(raised.value)
