"""Video output: a writer that encodes each frame once, on a background thread, as sections finish.

`SectionVideoWriter` takes the frames each section finishes (in video order within the segment) and keeps `path`
a complete file of everything handed over so far:
  * video containers: each segment is encoded once, its packets kept in a hidden file beside `path`, and all
    segments are then joined into `path` by remuxing (packets copied, never re-encoded). Each join rewrites the
    file, but copying compressed packets is cheap next to encoding them (bench/RESULTS.md), and segments that
    arrive while the encoder is busy are joined together;
  * PNG folders: each frame is written once; frames are renamed into place, numbered from 0 without gaps after
    every segment (the backward direction shifts the earlier names up, a rename per frame);
  * .safetensors: segments are kept as raw uint8 files beside the destination and the file (frames and the
    latest latents) is written once, at `flush()` / `close()`, which an interrupted run also reaches.
A join's cost grows with the video (it rewrites the file, or renames the earlier PNG frames), so joins are spaced
to take at most a fifth of the writer's time (`JOIN_SPACING`): while sections take longer than that to make, which is
always the case in practice, every section is joined as it arrives; in a very long or very fast run `path` may lag a
few sections behind, and `flush()` / `close()` always join everything. The total cost stays linear in the length.
Every file reaches its name by an atomic rename, so a crash never leaves a half-written file under the name the
user asked for; an existing file is replaced only when the first segment is ready (`check_output` refuses an
existing one unless `overwrite=True`, the command's --overwrite).
"""

from __future__ import annotations

import io
import json
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framepack_engine.media.codecs import (CONTAINERS, DEFAULT_CRF, EncoderSettings, available_codecs, check_encoder,  # noqa: F401
                             encoder_settings, fps_fraction, open_video_stream, quiet_encoder_logs, unknown_suffix)
from framepack_engine.errors import FramePackError, Option
from framepack_engine.media.images import pixels_to_uint8
from framepack_engine.media.metadata import PNG_CHUNK, SAFETENSORS_KEY

VIDEO_SUFFIXES = CONTAINERS
FRAME_NAME = re.compile(r"frame_(\d+)\.png")
# Segments waiting for the background thread. A section hands over one segment, so pixels in memory are bounded
# by this many sections plus the one being encoded; write_segment waits when it is full.
MAX_PENDING_SEGMENTS = 2
# A join waits until the time since the last one is at least this many times that join's duration: joins then take
# at most 1 / (1 + JOIN_SPACING) of the writer's time however long the video grows.
JOIN_SPACING = 4.0
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                       torch.uint8: "U8", torch.int8: "I8", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL"}


def output_kind(path) -> str:
    """"video", "png" (a folder of frames: no suffix or .png) or "safetensors", from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix in CONTAINERS:
        return "video"
    if suffix in ("", ".png"):
        return "png"
    if suffix == ".safetensors":
        return "safetensors"
    raise unknown_suffix(suffix)


def png_folder(path) -> Path:
    path = Path(path)
    return path.with_suffix("") if path.suffix.lower() == ".png" else path


def check_output(path, codec: str | None = None, crf: int | None = DEFAULT_CRF, pixel_format: str | None = None,
                 options: dict | None = None, overwrite: bool = False, width: int | None = None,
                 height: int | None = None) -> EncoderSettings | None:
    """Everything about an output that can be checked before any model loads; raises a one-line FramePackError.

    The file type from the suffix; for video files the encoder, container, pixel format and crf, opened on a test
    frame (`check_encoder`; width/height: the video's size when known); that the destination folder is writable;
    and that nothing would be lost: an existing file, or a folder already holding frames, needs overwrite=True
    (the writer then replaces it only when the first segment is ready). Returns the encoder settings for video
    files, None for PNG folders and .safetensors.
    """
    path = Path(path)
    kind = output_kind(path)
    settings = None
    if kind == "video":
        size = {"width": width, "height": height} if width and height else {}
        settings = check_encoder(path, codec, crf, pixel_format, options, **size)
    destination = png_folder(path) if kind == "png" else path
    if kind == "png":
        if destination.exists() and not destination.is_dir():
            raise FramePackError(f"The output {destination.name!r} is a file, not a folder for PNG frames: "
                                 "choose another --out path.")
        old_frames = destination.is_dir() and any(_frame_files(destination))
        if old_frames and not overwrite:
            raise FramePackError(
                f"The folder {destination.name!r} already holds frames: pass --overwrite to replace them (they are "
                "removed when the first section is written), or choose another --out folder.")
    elif destination.is_dir():
        raise FramePackError(f"The output {destination.name!r} is a folder: give a file name such as "
                             f"{destination.name}/video.mp4, or a folder without a suffix for PNG frames.")
    elif destination.exists() and not overwrite:
        raise FramePackError(
            f"The output {destination.name!r} already exists: pass --overwrite to replace it (it is replaced only "
            "once the first section is written), or choose another --out path.")
    folder = destination if kind == "png" else destination.parent
    _check_folder(next((p for p in [folder, *folder.parents] if p.exists()), Path(".")))
    return settings


def _check_folder(folder: Path) -> None:
    """An existing output folder must be a folder and writable."""
    if not folder.is_dir():
        raise FramePackError(f"The output folder {folder.name!r} is a file: choose another --out path.")
    if not os.access(folder, os.W_OK):
        raise FramePackError(f"The output folder {folder.name!r} is not writable: choose a writable --out path.")


def _make_folder(folder: Path) -> None:
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            raise FramePackError(f"Cannot create the output folder {folder.name!r}: choose a writable --out path.") from None
    _check_folder(folder)


def _read_umask() -> int:
    # Setting the umask is the only portable way to read it; done once, at import, since the set-and-restore
    # would briefly make files other threads create world-writable.
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def _ordinary_permissions(path) -> None:
    """mkstemp makes files private (0600); give results the permissions a plain open() would have."""
    os.chmod(path, 0o666 & ~_UMASK)


def _leftover_name(destination: Path) -> re.Pattern:
    # mkstemp/mkdtemp names: the prefix, 8 random characters of [a-z0-9_], the suffix
    return re.compile(rf"\.{re.escape(destination.name)}\.[a-z0-9_]{{8}}(\.parts|{re.escape(destination.suffix)})")


def remove_leftovers(destination) -> list[str]:
    """Removes what a killed run left beside `destination`: its writer's parts folder (".NAME.xxxxxxxx.parts") and
    the temporary file of an atomic publish (".NAME.xxxxxxxx.SUFFIX"), named after the same destination; the run
    that writes `destination` next calls it (one run writes an output at a time). Returns the names removed."""
    destination = Path(destination)
    pattern, removed = _leftover_name(destination), []
    try:
        candidates = list(destination.parent.iterdir())
    except OSError:
        return removed
    for path in candidates:
        if not pattern.fullmatch(path.name):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


@contextmanager
def atomic_path(destination: Path):
    """A temporary path beside `destination`, renamed onto it when the block succeeds and removed when it fails."""
    destination = Path(destination)
    _make_folder(destination.parent)
    # Named after the whole destination name, as the writers' parts folders are: one pattern finds every leftover.
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=destination.suffix,
                                         dir=destination.parent)
    try:
        os.close(handle)
        _ordinary_permissions(temporary)
        yield Path(temporary)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def as_uint8_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from uint8 arrays/tensors, or from float pixels in [-1, 1] shaped (T, H, W, 3)."""
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            frames = pixels_to_uint8(frames)
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or 0 in frames.shape[1:]:
        raise FramePackError(f"Frames must be uint8 of shape (frames, height, width, 3), got {frames.dtype} {frames.shape}.")
    return frames


# ----------------------------------------------------------------------------------------------------------------
# The writer


class SectionVideoWriter:
    """Writes a video segment by segment as sections finish; `path`'s suffix picks the output (see module doc).

    write_segment(frames) hands over the frames one section finished, uint8 (T, H, W, 3) in video order; with
    direction "backward" (the bidirectional model generates the end of the video first) each segment goes before
    the ones already written. It returns at once: encoding runs on a background thread (overlapping the next
    section's sampling) and waits only when `MAX_PENDING_SEGMENTS` segments are queued. The writer keeps the array
    until it is encoded, so hand over an array you will not modify. After each segment is encoded `path` is a
    complete file of everything so far (.safetensors: at flush).

    flush() waits for the background work and returns `path` (None while nothing was written). close() flushes,
    removes the temporary files and returns `path`. abort() keeps what is durable and drops the rest: the segments
    already encoded (their packets are on disk) are joined into `path`, the one being encoded and those still queued
    are dropped, and the temporary files removed. close(stop=event) finishes everything unless `event` is set before
    it is done, and then aborts: the finishing protocol (framepack_engine.commands.common.Signals) sets it on a
    second Ctrl-C. As a context manager it closes on leaving, also when an exception (Ctrl-C included) leaves the
    block, so every segment handed over is kept, unless the writer itself failed, in which case it aborts.
    """

    def __init__(self, path, fps: float, codec: str | None = None, crf: int | None = DEFAULT_CRF,
                 pixel_format: str | None = None, options: dict | None = None, metadata: dict | None = None,
                 direction: str = "forward"):
        if direction not in ("forward", "backward"):
            raise FramePackError(f"direction must be 'forward' or 'backward', got {direction!r}.")
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise FramePackError(f"fps must be a positive number, got {fps!r}: pass e.g. ", Option("fps", 30), ".")
        self.path = Path(path)
        self.fps = fps
        self.direction = direction
        self.metadata = dict(metadata or {})
        kind = output_kind(self.path)
        if kind == "video":
            settings = encoder_settings(self.path, codec, crf, pixel_format, options)
            self._sink = _VideoSink(self.path, settings, fps, self.metadata)
        elif kind == "png":
            self._sink = _PngSink(png_folder(self.path), self.metadata)
        else:
            self._sink = _SafetensorsSink(self.path, self.metadata)
        self._queue: queue.Queue = queue.Queue(maxsize=MAX_PENDING_SEGMENTS)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._closed = False
        self._cleaned = False  # the temporary files are gone: nothing can be joined any more
        self._join_lock = threading.Lock()  # joins run on the worker, or on the caller's thread in flush()

    # -- the caller's side -------------------------------------------------------------------------------------

    def write_segment(self, frames, latents: torch.Tensor | None = None, stop: threading.Event | None = None
                      ) -> bool:
        """Queue one segment of frames (uint8 (T, H, W, 3), or float in [-1, 1]); `latents`: the latents of the
        whole video so far, kept (the latest wins) for .safetensors output and ignored by the others. Returns True,
        or False when `stop` was set while it waited for room in the queue (the segment is then not handed over)."""
        self._raise_if_failed()
        if self._closed:
            raise FramePackError("This writer is closed: create a new SectionVideoWriter to write again.")
        frames = as_uint8_frames(frames)
        if latents is not None:
            self.set_latents(latents)
        if len(frames) == 0:
            return True
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="video-writer", daemon=True)
            self._thread.start()
        while True:  # a bounded wait, so Ctrl-C is noticed and a failed worker does not block us forever
            if stop is not None and stop.is_set():
                return False
            try:
                self._queue.put(frames, timeout=0.2)
                return True
            except queue.Full:
                self._raise_if_failed()

    def set_latents(self, latents: torch.Tensor) -> None:
        """The latents of the whole video so far, for .safetensors output (ignored by the others): a host copy is
        kept, so the caller's tensor (on any device) is free to change or go."""
        if isinstance(self._sink, _SafetensorsSink):
            self._sink.latents = latents.detach().to("cpu", copy=True)

    def flush(self) -> Path | None:
        """Wait until everything handed over is in `path`; returns it, or None if nothing was written yet."""
        self._wait()
        self._raise_if_failed()
        try:
            self._join()  # every segment is encoded: what is left is the join the worker may have postponed
        except Exception as error:
            self._error = error
            self._raise_if_failed()
        return self._sink.published

    @property
    def published(self) -> Path | None:
        """`path` once something is in it (what an abort or a failure leaves there), else None."""
        return self._sink.published

    @property
    def closed(self) -> bool:
        """True after close(), abort() or a failure: the writer takes no more segments."""
        return self._closed

    def close(self, stop: threading.Event | None = None) -> Path | None:
        """Flush, stop the background thread and remove the temporary files; returns `path` (None when nothing was
        written). When `stop` is set before everything is encoded, it aborts instead (see abort). Safe to call
        twice."""
        if self._closed:
            return self._sink.published
        try:
            if not self._wait(stop):
                return self.abort()
            published = self.flush()
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self._stop_thread()
        self._cleanup()
        return published

    def abort(self) -> Path | None:
        """Keeps what is durable, at once: drops the queued segments and the one being encoded, joins into `path`
        the segments already encoded (a join copies packets: no encoding), and removes the temporary files.
        Returns `path` when it holds something, else None."""
        self._closed = True
        if self._cleaned:
            return self._sink.published
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
                self._queue.task_done()
            except queue.Empty:
                break
        self._stop_thread()
        self._publish_what_was_encoded()
        self._cleanup()
        return self._sink.published

    def _cleanup(self) -> None:
        self._cleaned = True
        self._sink.cleanup()

    @property
    def frames_written(self) -> int:
        """Frames in `path` now, as its last join left it."""
        return self._sink.published_frames

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is None:
            self.close()
        elif self._error is not None:
            self.abort()
        else:
            try:
                self.close()  # keep every segment handed over before the interruption or error
            except BaseException:
                self.abort()  # a second Ctrl-C while finishing: give up on what is queued
        return False

    def _wait(self, stop: threading.Event | None = None) -> bool:
        """Until every segment handed over is encoded (or the writer failed); False when `stop` was set first."""
        if self._thread is None:
            return True
        while self._queue.unfinished_tasks and self._error is None and self._thread.is_alive():
            if stop is not None and stop.is_set():
                return False
            with self._queue.all_tasks_done:
                self._queue.all_tasks_done.wait(timeout=0.2)
        return True

    def _stop_thread(self):
        if self._thread is not None and self._thread.is_alive():
            self._stop.set()
            try:
                self._queue.put_nowait(None)
            except queue.Full:
                pass
            self._thread.join()

    def _raise_if_failed(self):
        if self._error is not None:
            error, self._error = self._error, None
            self._closed = True
            self._stop_thread()
            self._cleanup()
            if isinstance(error, FramePackError):
                raise error
            raise FramePackError(f"Writing {self.path.name!r} failed ({error}): {self.on_disk()}; check free disk "
                                 "space and the encoder settings.") from error

    def on_disk(self) -> str:
        """What `path` holds now, in words: "NAME holds N frames" or "nothing was written"."""
        if self._sink.published is None or not self._sink.published_frames:
            return "nothing was written"
        return f"{self._sink.published.name} holds {self._sink.published_frames} frames"

    # -- the background thread ---------------------------------------------------------------------------------

    def _join(self):
        with self._join_lock:
            if self._sink.unpublished():
                self._sink.join()

    def _publish_what_was_encoded(self):
        """After a failure, still join the segments encoded before it (a join may have been left for later)."""
        try:
            self._join()
        except Exception:
            pass  # the first error is the one to report

    def _next_segment(self):
        """The next queued segment; None to stop; `_JOIN_DUE` when a postponed join comes due while none arrives."""
        if not (self._sink.joins_in_background and self._sink.unpublished()):
            return self._queue.get()
        try:
            return self._queue.get(timeout=self._sink.seconds_until_join_is_due())
        except queue.Empty:
            return _JOIN_DUE

    def _work(self):
        while not self._stop.is_set():
            frames = self._next_segment()
            if frames is _JOIN_DUE:
                try:
                    self._join()
                except BaseException as error:  # reported to the caller at its next call
                    self._error = error
                continue
            try:
                if frames is None:
                    return
                if self._error is None:
                    self._sink.add(frames, self.direction == "backward", self._stop)
                    # Join when nothing else waits (a segment already queued will join this one with it) and when
                    # the last join was long enough ago (JOIN_SPACING); else when it comes due (_next_segment).
                    caught_up = self._queue.qsize() == 0
                    if (caught_up and not self._stop.is_set() and self._sink.joins_in_background
                            and self._sink.join_is_due()):
                        self._join()
            except BaseException as error:  # reported to the caller at its next call
                self._error = error
                self._publish_what_was_encoded()
            finally:
                del frames
                self._queue.task_done()


@dataclass
class _Segment:
    path: Path
    frames: int
    # video segments: (display position, keyframe, size in bytes) of each packet, in decoding order
    packets: list = field(default_factory=list)

    @property
    def reorder_delay(self) -> int:
        """How many packets a frame can come before its display position (B-frames)."""
        return max((order - position for order, (position, _, _) in enumerate(self.packets)), default=0)


_JOIN_DUE = object()


class _Sink:
    """Where segments go. `add` runs on the writer's thread; `publish` makes `destination` current."""

    joins_in_background = True  # joined as segments arrive; else only at flush() / close()

    def __init__(self, destination: Path, metadata: dict):
        self.destination = destination
        self.metadata = metadata
        self.segments: list[_Segment] = []  # in video order
        self.parts: Path | None = None
        self.published: Path | None = None
        self.published_frames = 0  # frames in `destination`, as the last join left it
        self.latents: torch.Tensor | None = None
        self.frames = 0
        self.shape: tuple | None = None
        self.joined_at = 0.0  # time.perf_counter() at the end of the last join
        self.join_seconds = 0.0  # how long it took

    def parts_folder(self) -> Path:
        if self.parts is None:
            _make_folder(self.destination.parent)
            remove_leftovers(self.destination)  # a killed run's, named after the same destination
            self.parts = Path(tempfile.mkdtemp(prefix=f".{self.destination.name}.", suffix=".parts",
                                               dir=self.destination.parent))
        return self.parts

    def check_shape(self, frames: np.ndarray):
        if self.shape is None:
            self.shape = frames.shape[1:]
        elif frames.shape[1:] != self.shape:
            raise FramePackError(f"Every segment must have the frame size of the first, {self.shape[1]}x"
                                 f"{self.shape[0]}, got {frames.shape[2]}x{frames.shape[1]}.")

    def unpublished(self) -> bool:
        return sum(segment.frames for segment in self.segments) != self.frames

    def join(self):
        """publish(), timed for join_is_due."""
        started = time.perf_counter()
        self.publish()
        if self.published is not None:
            self.published_frames = self.frames
        self.joined_at = time.perf_counter()
        self.join_seconds = self.joined_at - started

    def seconds_until_join_is_due(self) -> float:
        return max(0.0, self.joined_at + JOIN_SPACING * self.join_seconds - time.perf_counter())

    def join_is_due(self) -> bool:
        return self.seconds_until_join_is_due() == 0.0

    def place(self, segment: _Segment, backward: bool):
        if backward:
            self.segments.insert(0, segment)
        else:
            self.segments.append(segment)

    def cleanup(self):
        if self.parts is not None:
            shutil.rmtree(self.parts, ignore_errors=True)
            self.parts = None


class _VideoSink(_Sink):
    """Each segment's packets, as the encoder gave them, are kept in a raw file beside the destination, in decoding
    order, with their timestamps in a list; publishing muxes them all into a new container. The first segment is
    also written as a normal file and kept open: its stream carries the codec parameters every segment shares,
    and the encoder's headers (extradata, checked equal for every segment) go with it."""

    def __init__(self, destination: Path, settings: EncoderSettings, fps: float, metadata: dict):
        super().__init__(destination, metadata)
        self.settings = settings
        self.fps = fps
        self.count = 0
        self.template = None

    def add(self, frames: np.ndarray, backward: bool, stop: threading.Event):
        import av

        self.check_shape(frames)
        height, width = frames.shape[1] - frames.shape[1] % 2, frames.shape[2] - frames.shape[2] % 2
        rate = fps_fraction(self.fps)
        parts = self.parts_folder()
        segment = _Segment(parts / f"segment_{self.count:05d}.packets", len(frames))
        template = parts / f"template{self.destination.suffix}" if self.template is None else None
        self.count += 1
        # The encoder runs inside a container of the output's format, as a plain encode would (the format decides
        # whether headers go out of band); only the first segment's container is kept.
        with av.open(str(template) if template else io.BytesIO(), mode="w", format=self.settings.container) as scratch, \
                open(segment.path, "wb") as data:
            stream = open_video_stream(scratch, self.settings, self.fps, width, height)

            def keep(packets):
                for packet in packets:
                    position = round(packet.pts * packet.time_base * rate)  # before mux, which rescales it
                    data.write(memoryview(packet))
                    segment.packets.append((position, packet.is_keyframe, packet.size))
                scratch.mux(packets)

            for index, frame in enumerate(frames):
                if stop.is_set():
                    return
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
                picture.pts, picture.time_base = index, 1 / rate
                keep(stream.encode(picture))
            keep(stream.encode())
            headers = stream.codec_context.extradata
        first = min(position for position, _, _ in segment.packets)
        segment.packets = [(position - first, keyframe, size) for position, keyframe, size in segment.packets]
        if sorted(position for position, _, _ in segment.packets) != list(range(len(frames))):
            raise RuntimeError(f"{self.settings.codec} did not give one packet per frame")
        if template:
            self.template, self.headers = av.open(str(template)), headers
        elif headers != self.headers:
            raise RuntimeError(f"{self.settings.codec} gave each segment different stream headers")
        self.place(segment, backward)

    def publish(self):
        """Join the segments, in video order, into `destination` by copying their packets."""
        import av

        rate = fps_fraction(self.fps)
        delay = max(segment.reorder_delay for segment in self.segments)
        with atomic_path(self.destination) as temporary:
            with av.open(str(temporary), mode="w", format=self.settings.container) as output:
                if self.metadata:
                    # "comment" is the one free-text tag every container keeps; the settings travel in it as JSON.
                    output.metadata["comment"] = json.dumps(self.metadata)
                stream = output.add_stream_from_template(self.template.streams.video[0], opaque=True)
                # the headers as the encoder gave them, with packets as it gave them: the muxer converts both as
                # in a plain encode (H.264 in MP4: start codes to length prefixes)
                stream.codec_context.extradata = self.headers
                stream.codec_context.framerate = rate  # the frame rate containers record
                offset = 0
                for segment in self.segments:
                    data, start = memoryview(segment.path.read_bytes()), 0
                    for order, (position, keyframe, size) in enumerate(segment.packets):
                        packet = av.Packet(data[start:start + size])
                        start += size
                        # timestamps in frames: presentation from the encoder, decoding order made monotonic
                        # across segments with the largest reordering delay of any segment
                        packet.pts, packet.dts = offset + position, offset + order - delay
                        packet.time_base, packet.duration, packet.is_keyframe = 1 / rate, 1, keyframe
                        packet.stream = stream
                        output.mux(packet)
                    offset += segment.frames
        self.frames = offset
        self.published = self.destination

    def cleanup(self):
        if self.template is not None:
            self.template.close()
            self.template = None
        super().cleanup()


class _PngSink(_Sink):
    def __init__(self, destination: Path, metadata: dict):
        super().__init__(destination, metadata)
        self.pending: list[tuple[_Segment, bool]] = []  # written to the parts folder, not yet in the destination

    def unpublished(self) -> bool:
        return bool(self.pending)

    def text_chunk(self):
        """Each frame carries the metadata in a text chunk too (framepack_engine.media.metadata reads it back)."""
        if not self.metadata:
            return None
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_itxt(PNG_CHUNK, json.dumps(self.metadata))
        return info

    def add(self, frames: np.ndarray, backward: bool, stop: threading.Event):
        from PIL import Image

        self.check_shape(frames)
        folder = Path(tempfile.mkdtemp(prefix="segment_", dir=self.parts_folder()))
        text_chunk = self.text_chunk()
        for index, frame in enumerate(frames):
            if stop.is_set():
                return
            Image.fromarray(frame).save(folder / _frame_name(index), format="PNG", pnginfo=text_chunk)
        self.pending.append((_Segment(folder, len(frames)), backward))

    def publish(self):
        """Move new frames into the folder, keeping the names contiguous from frame_00000.png."""
        folder = self.destination
        if self.published is None:  # the first segment: the folder is written fresh
            _make_folder(folder)
            for stale in _frame_files(folder):
                stale.unlink()
            (folder / "settings.json").unlink(missing_ok=True)
            if self.metadata:
                with atomic_path(folder / "settings.json") as temporary:
                    temporary.write_text(json.dumps(self.metadata, indent=2))
            self.published = folder
        for segment, backward in self.pending:
            start = self.frames
            if backward:  # the new frames come first: shift the others up, last first
                for index in reversed(range(self.frames)):
                    os.replace(folder / _frame_name(index), folder / _frame_name(index + segment.frames))
                start = 0
            for index in range(segment.frames):
                staged = segment.path / _frame_name(index)
                _ordinary_permissions(staged)
                os.replace(staged, folder / _frame_name(start + index))
            shutil.rmtree(segment.path, ignore_errors=True)
            self.frames += segment.frames
        self.pending = []


def _frame_name(index: int) -> str:
    return f"frame_{index:05d}.png"


def _frame_files(folder: Path):
    return (path for path in folder.iterdir() if FRAME_NAME.fullmatch(path.name))


class _SafetensorsSink(_Sink):
    # Each write copies every frame so far, and the latents change with every section: written at flush() / close()
    # (which an interruption or a failure also reaches), never in the background.
    joins_in_background = False

    def unpublished(self) -> bool:
        return bool(self.segments) or self.latents is not None

    def add(self, frames: np.ndarray, backward: bool, stop: threading.Event):
        self.check_shape(frames)
        path = self.parts_folder() / f"segment_{len(self.segments):05d}.u8"
        frames.tofile(path)
        self.place(_Segment(path, len(frames)), backward)
        self.frames += len(frames)

    def publish(self):
        """Write frames (uint8 T, H, W, 3) and latents as one safetensors file, streaming the frames from disk."""
        if not self.segments and self.latents is None:
            return
        tensors, offset = {}, 0
        if self.segments:
            size = self.frames * int(np.prod(self.shape))
            tensors["frames"] = {"dtype": "U8", "shape": [self.frames, *self.shape], "data_offsets": [0, size]}
            offset = size
        latents = None
        if self.latents is not None:
            latents = self.latents.contiguous()
            if latents.dtype not in _SAFETENSORS_DTYPES:
                raise FramePackError(f"Latents of type {latents.dtype} cannot go in a safetensors file: pass float32.")
            size = latents.numel() * latents.element_size()
            tensors["latents"] = {"dtype": _SAFETENSORS_DTYPES[latents.dtype], "shape": list(latents.shape),
                                  "data_offsets": [offset, offset + size]}
        text_metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.metadata.items()}
        if text_metadata:  # and all of it as one JSON, which keeps each value's type (metadata.read_metadata)
            text_metadata[SAFETENSORS_KEY] = json.dumps(self.metadata)
        header = json.dumps({"__metadata__": text_metadata, **tensors} if text_metadata else tensors,
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
        with atomic_path(self.destination) as temporary:
            with open(temporary, "wb") as file:
                file.write(len(header).to_bytes(8, "little"))
                file.write(header)
                for segment in self.segments:
                    with open(segment.path, "rb") as part:
                        shutil.copyfileobj(part, file, 1 << 22)
                if latents is not None:
                    file.write(latents.view(torch.uint8).numpy().tobytes() if latents.numel() else b"")
        self.published = self.destination


# ----------------------------------------------------------------------------------------------------------------
# Whole videos


def encode_video(frames, path, fps: float, codec: str | None = None, crf: int | None = DEFAULT_CRF,
                 pixel_format: str | None = None, options: dict | None = None, metadata: dict | None = None) -> Path:
    """All frames at once into a video file (codec None: the container's default)."""
    if output_kind(path) != "video":
        raise FramePackError(f"encode_video writes video files ({', '.join(CONTAINERS)}), not {Path(path).name!r}: "
                             "use Video(frames, fps).save(path) for PNG frames or .safetensors.")
    with SectionVideoWriter(path, fps, codec, crf, pixel_format, options, metadata) as writer:
        writer.write_segment(frames)
    return Path(path)


def write_png_frames(frames, folder, metadata: dict | None = None) -> Path:
    """One PNG per frame (frame_00000.png, ...) in `folder`, written fresh, plus settings.json when metadata is given."""
    with SectionVideoWriter(png_folder(folder), 1, metadata=metadata) as writer:
        writer.write_segment(frames)
    return png_folder(folder)


def write_safetensors(path, frames=None, latents=None, metadata: dict | None = None) -> Path:
    """Frames (uint8 T,H,W,3) and/or latents in one safetensors file; settings as string metadata."""
    if frames is None and latents is None:
        raise FramePackError("Nothing to save: pass frames or latents.")
    with SectionVideoWriter(path, 1, metadata=metadata) as writer:
        if latents is not None:
            writer.set_latents(latents)
        if frames is not None:
            writer.write_segment(frames)
    return Path(path)


@dataclass
class Video:
    """A generated video: uint8 frames (T, H, W, 3), its frame rate, and what it took to make."""

    frames: np.ndarray
    fps: float
    stats: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None

    def interpolate(self, n: int, model, max_batch_bytes: int | None = None) -> "Video":
        """This video with n-1 frames made between each pair by `model` (framepack_engine.load_rife(path)): n·(T−1)+1
        frames at n times the frame rate; a scene cut is held, not blended (framepack_engine.media.interpolation)."""
        from framepack_engine.media.interpolation import DEFAULT_BATCH_BYTES, interpolate_frames

        frames = interpolate_frames(model, self.frames, n, max_batch_bytes or DEFAULT_BATCH_BYTES)
        metadata = {**self.metadata, "interpolation": {"model": "RIFE", "weights": getattr(model, "name", None),
                                                       "frames_per_interval": n}}
        return Video(frames, self.fps * n, dict(self.stats), metadata, self.latents)

    def upscale(self, model, max_tile_bytes: int | None = None) -> "Video":
        """This video upscaled by `model` (framepack_engine.load_upscaler(path)) in tiles under a byte bound."""
        from framepack_engine.media.upscaling import DEFAULT_TILE_BYTES, upscale_frames

        frames = upscale_frames(model, self.frames, max_bytes=max_tile_bytes or DEFAULT_TILE_BYTES)
        metadata = {**self.metadata, "upscaler": model.describe()} if hasattr(model, "describe") else self.metadata
        return Video(frames, self.fps, dict(self.stats), metadata, self.latents)

    def save(self, path, codec: str | None = None, crf: int | None = DEFAULT_CRF, pixel_format: str | None = None,
             options: dict | None = None) -> Path:
        """By suffix: a video container (.mp4, .webm, .mkv, .mov, .avi; codec None: the container's default),
        `.safetensors` (frames and latents), or a folder / `.png` path for one PNG per frame. An existing file
        is replaced."""
        path = Path(path)
        with SectionVideoWriter(path, self.fps, codec, crf, pixel_format, options, self.metadata) as writer:
            writer.write_segment(self.frames, self.latents)
        return png_folder(path) if output_kind(path) == "png" else path
