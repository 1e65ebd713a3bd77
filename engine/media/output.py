"""Writing a generation as it streams: each frame encoded once, the file on disk complete after every section.

`SectionOutputFile` takes the `SectionResult`s of `Engine.stream` one by one and hands each section's finished frames
to a `SectionVideoWriter` (framepack_engine.media.video), which encodes them on a background thread (overlapping the
next section's sampling) and keeps at `path` a complete, playable file of every finished frame. The frames still to be crossfaded
with the next section are written only when the video ends: at the last section, or at `close()` after an
interruption (then as they are), so an interruption keeps everything finished. The command (`framepack generate`)
and the server write through it.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from framepack_engine.media.postprocess import PostProcess
from framepack_engine.media.video import DEFAULT_CRF, SectionVideoWriter

if TYPE_CHECKING:  # media knows no model or Engine: the results are read by their fields only
    from framepack_engine.pipeline import SectionResult


class SectionOutputFile:
    """The output file of one generation, fed section by section; the writer's side of the finishing protocol.

    `add` hands a finished section over (returns at once). `close(stop)` finishes the file: the last section's
    frames still pending a crossfade are written and everything handed over is encoded and joined, unless `stop`
    (an Event: the second Ctrl-C) is set first; then it keeps only what is durable (the segments already encoded)
    and drops the rest. `on_disk()` says exactly what the file holds afterwards, in sections and frames."""

    def __init__(self, path, fps: float, codec: str | None = None, crf: int | None = DEFAULT_CRF,
                 pixel_format: str | None = None, options: dict | None = None,
                 postprocess: PostProcess | None = None):
        self.path = Path(path)
        self.fps, self.codec, self.crf, self.pixel_format, self.options = fps, codec, crf, pixel_format, options
        # Interpolation and upscaling run on each section as it is handed over (fps: the output's frame rate).
        self.postprocess = postprocess if postprocess is not None and postprocess.active else None
        self._process = None  # the postprocess's function of segments, made for the video's direction
        self.recorded: dict | None = None  # settings recorded over the sections' own (set_postprocess)
        self.writer: SectionVideoWriter | None = None
        self.last: SectionResult | None = None
        self.frame_count = 0  # frames handed to the writer (it encodes them in the background)
        self.count = 0  # the video's sections
        self.sections = 0  # sections handed to the writer
        self._segments: list[tuple[int, bool]] = []  # (frames, a whole section) of each segment, as handed over

    def set_postprocess(self, postprocess: PostProcess | None, fps: float, recorded: dict | None = None) -> None:
        """Before the first section: the interpolation and upscaling to run on each section, the output's frame rate,
        and settings to record instead of the sections' own (the server's: file names, not its paths)."""
        self.postprocess = postprocess if postprocess is not None and postprocess.active else None
        self.fps, self.recorded = fps, recorded

    def add(self, result: SectionResult) -> None:
        """Hands one finished section's frames to the writer; returns at once (encoding runs in the background)."""
        if self.writer is None:
            metadata = {**result.metadata, **(self.recorded or {})}
            if self.postprocess is not None:
                metadata = {**metadata, **self.postprocess.describe()}
                self._process = self.postprocess.segments(result.direction)
            self.writer = SectionVideoWriter(self.path, self.fps, self.codec, self.crf, self.pixel_format, self.options,
                                             metadata=metadata, direction=result.direction)
        frames = result.frames if self._process is None else self._process(result.frames)
        self.writer.write_segment(frames, latents=result.latents)
        self.last, self.count = result, result.count
        self.sections += 1
        self.frame_count += len(frames)
        self._segments.append((len(frames), True))

    @property
    def published(self) -> Path | None:
        """The file's path once a section is in it (what an abort or a writer failure leaves), else None."""
        return None if self.writer is None else self.writer.published

    @property
    def frames_written(self) -> int:
        """Frames in the file now (`frame_count` counts those handed over, some maybe still being encoded)."""
        return 0 if self.writer is None else self.writer.frames_written

    def close(self, stop: threading.Event | None = None) -> Path | None:
        """Writes the frames still pending a crossfade (the video ends here), waits for the encoder and returns the
        file's path, or None when no section finished. When `stop` is set before that is done, it keeps only what
        is durable (see abort). After a writer failure (already reported) it returns what the failure left."""
        if self.writer is None:
            return None
        if self.writer.closed:
            return self.writer.published
        if stop is not None and stop.is_set():
            return self.abort()
        pending = self.last.pending_frames
        if len(pending) and self._process is not None:
            pending = self._process(pending)
        if len(pending) and self.writer.write_segment(pending, stop=stop):
            self.frame_count += len(pending)
            self._segments.append((len(pending), False))
        return self.writer.close(stop=stop)

    def abort(self) -> Path | None:
        """Stops at once, keeping what is durable: the segments already encoded are joined into the file (a copy of
        their packets), the rest is dropped. Returns the file's path when it holds something."""
        return None if self.writer is None else self.writer.abort()

    def on_disk(self) -> str:
        """Exactly what the file holds now: "NAME holds all N frames (S of S sections)", "NAME holds N frames (K of
        S sections)", or that nothing was written and why."""
        frames = self.frames_written
        if self.published is None or not frames:
            if not self.sections:
                return "nothing was written (no section had finished)"
            return (f"nothing was written ({self.sections} finished section{'s' if self.sections > 1 else ''} "
                    "had not been encoded yet)")
        whole, counted = 0, 0
        for length, section in self._segments:  # the file holds the first segments handed over
            if counted + length > frames:
                break
            counted += length
            whole += section
        everything = frames == self.frame_count and self.sections == self.count
        return (f"{self.published.name} holds {'all ' if everything else ''}{frames} frames ({whole} of "
                f"{self.count} sections)")
