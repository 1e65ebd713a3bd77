"""What happens to frames between the engine and the file: RIFE interpolation, then upscaling.

`PostProcess` holds the loaded models (any objects of the shapes framepack_engine.media.interpolation and
framepack_engine.media.upscaling take). `segments(direction)` gives the function the section writer
(framepack_engine.media.output.SectionOutputFile) runs on each segment as it is handed over, so the cost stays
linear in the length and the pairs across section joins are interpolated too; `apply(frames)` does a whole video.
Both give the same frames (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from framepack_engine.media.interpolation import DEFAULT_BATCH_BYTES, SegmentInterpolator, interpolate_frames
from framepack_engine.media.upscaling import DEFAULT_TILE_BYTES, upscale_frames


@dataclass
class PostProcess:
    rife: object | None = None  # framepack_engine.models.rife.RIFE
    interpolate: int = 1  # frames per interval
    upscaler: object | None = None  # framepack_engine.models.upscaler.Upscaler
    batch_bytes: int = DEFAULT_BATCH_BYTES  # activations of one batch of frame pairs
    tile_bytes: int = DEFAULT_TILE_BYTES  # activations of one upscaled tile

    @property
    def active(self) -> bool:
        return (self.rife is not None and self.interpolate > 1) or self.upscaler is not None

    def _upscale(self, frames: np.ndarray) -> np.ndarray:
        if self.upscaler is None or not len(frames):
            return frames
        return upscale_frames(self.upscaler, frames, max_bytes=self.tile_bytes)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """A whole video: interpolated, then upscaled."""
        if self.rife is not None and self.interpolate > 1:
            frames = interpolate_frames(self.rife, frames, self.interpolate, self.batch_bytes)
        return self._upscale(frames)

    def segments(self, direction: str = "forward") -> Callable[[np.ndarray], np.ndarray]:
        """A function from each segment (in the writer's `direction`) to the frames to write for it."""
        interpolator = (SegmentInterpolator(self.rife, self.interpolate, direction, self.batch_bytes)
                        if self.rife is not None and self.interpolate > 1 else None)
        return lambda frames: self._upscale(interpolator.add(frames) if interpolator else frames)

    def describe(self) -> dict:
        """What the output's metadata records of it."""
        described = {}
        if self.rife is not None and self.interpolate > 1:
            described["interpolation"] = {"model": "RIFE", "weights": self.rife.name, "frames_per_interval":
                                          self.interpolate}
        if self.upscaler is not None:
            described["upscaler"] = self.upscaler.describe()
        return described
