"""Writing a generation as it streams: each frame encoded once, the file on disk complete after every section.

`SectionOutputFile` takes the `SectionResult`s of `Engine.stream` one by one and hands each section's finished frames
to a `SectionVideoWriter` (framepack_engine.media.video), which encodes them on a background thread (overlapping the
next section's sampling) and keeps at `path` a complete, playable file of every finished frame. The frames still to be crossfaded
with the next section are written only when the video ends: at the last section, or at `close()` after an
interruption (then as they are), so an interruption keeps everything finished. The command (`framepack generate`)
and the server write through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from framepack_engine.media.video import DEFAULT_CRF, SectionVideoWriter

if TYPE_CHECKING:  # media knows no model or Engine: the results are read by their fields only
    from framepack_engine.pipeline import SectionResult


class SectionOutputFile:
    def __init__(self, path, fps: float, codec: str | None = None, crf: int | None = DEFAULT_CRF,
                 pixel_format: str | None = None, options: dict | None = None):
        self.path = Path(path)
        self.fps, self.codec, self.crf, self.pixel_format, self.options = fps, codec, crf, pixel_format, options
        self.writer: SectionVideoWriter | None = None
        self.last: SectionResult | None = None
        self.frame_count = 0  # frames handed to the writer (it encodes them in the background)

    def add(self, result: SectionResult) -> None:
        """Hands one finished section's frames to the writer; returns at once (encoding runs in the background)."""
        if self.writer is None:
            self.writer = SectionVideoWriter(self.path, self.fps, self.codec, self.crf, self.pixel_format, self.options,
                                             metadata=result.metadata, direction=result.direction)
        self.writer.write_segment(result.frames, latents=result.latents)
        self.last = result
        self.frame_count += len(result.frames)

    @property
    def published(self) -> Path | None:
        """The file's path once a section is in it (what an abort or a writer failure leaves), else None."""
        return None if self.writer is None else self.writer.published

    @property
    def frames_written(self) -> int:
        """Frames in the file now (`frame_count` counts those handed over, some maybe still being encoded)."""
        return 0 if self.writer is None else self.writer.frames_written

    def close(self) -> Path | None:
        """Writes the frames still pending a crossfade (the video ends here), waits for the encoder and returns the
        file's path, or None when no section finished. After a writer failure (already reported) it returns what
        the failure left."""
        if self.writer is None:
            return None
        if self.writer.closed:
            return self.writer.published
        if len(self.last.pending_frames):
            self.writer.write_segment(self.last.pending_frames)
            self.frame_count += len(self.last.pending_frames)
        return self.writer.close()

    def abort(self) -> None:
        """Stops at once, keeping at `path` what the writer had already published."""
        if self.writer is not None:
            self.writer.abort()
