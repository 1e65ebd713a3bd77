"""Writing a generation as it streams: the file on disk is a complete video of every finished section.

`SectionOutputFile` takes the `SectionResult`s of `Engine.stream` one by one and, after each, leaves at `path` a
complete file of the video so far (the frames made final plus the pending ones), written atomically; so an
interruption keeps every finished section. The command (`framepack generate`) and the server write through it.
"""

from __future__ import annotations

from pathlib import Path

from engine.pipeline import FrameCollector, SectionResult
from engine.video import Video


class SectionOutputFile:
    def __init__(self, path, fps: float, codec: str = "libx264", crf: int | None = 16,
                 pixel_format: str | None = None):
        self.path = Path(path)
        self.fps, self.codec, self.crf, self.pixel_format = fps, codec, crf, pixel_format
        self.collector = FrameCollector()
        self.saved: Path | None = None
        self.frame_count = 0

    def add(self, result: SectionResult) -> Path:
        """Takes one finished section; returns the path of the complete file of everything so far."""
        self.collector.add(result)
        frames = self.collector.frames()
        self.frame_count = len(frames)
        video = Video(frames, fps=self.fps, metadata=result.metadata, latents=result.latents)
        self.saved = video.save(self.path, codec=self.codec, crf=self.crf, pixel_format=self.pixel_format)
        return self.saved
