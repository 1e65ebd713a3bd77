"""Frame interpolation over a video or a stream of segments: N-1 frames made between each pair of neighbours.

The model is any object with `frames_between(first, second, timesteps)` (framepack_engine.models.rife.RIFE) and,
for batching, `bytes_per_pair(height, width)`. Pairs (with each of their moments) run in batches whose activations
stay under `max_batch_bytes`. A **scene cut** is never blended: where two neighbours differ by more than
`SCENE_CUT_THRESHOLD` (the mean absolute difference of their grey levels, 0 to 1, over 4x4-pixel averages), the
frames between them repeat the earlier one (the cut then falls on the later frame, as it was).

`SegmentInterpolator` takes a video as the section writer hands it over, segment by segment, forward (each after the
earlier ones) or backward (each before them): it remembers the frame at the edge of what it has given out, so the
pair across each join is interpolated too, and a video interpolated segment by segment equals the whole video
interpolated once (n·(T−1)+1 frames); each segment costs only its own pairs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from framepack_engine.errors import FramePackError

# Mean absolute grey-level difference (0 to 1) above which two neighbours are a scene cut, not motion. FramePack's
# fastest motion moves neighbours at 30 fps by a few hundredths; a cut to another scene moves them by 0.2 or more.
SCENE_CUT_THRESHOLD = 0.15
DEFAULT_BATCH_BYTES = 1 << 30  # activations of one batch of pairs (a few pairs at 640x608, RIFE in float32)


def _to_unit(frames: np.ndarray) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float (T, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float().div_(255)


def _to_uint8(frames: torch.Tensor) -> np.ndarray:
    return frames.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def scene_cuts(frames: np.ndarray, threshold: float = SCENE_CUT_THRESHOLD) -> np.ndarray:
    """For each neighbouring pair of uint8 frames (T, H, W, 3), whether it is a scene cut: (T-1,) bools."""
    if len(frames) < 2:
        return np.zeros(0, dtype=bool)
    grey = _to_unit(frames).mean(dim=1, keepdim=True)
    small = F.avg_pool2d(grey, 4, ceil_mode=True) if min(grey.shape[-2:]) >= 8 else grey
    difference = (small[1:] - small[:-1]).abs().mean(dim=(1, 2, 3))
    return (difference > threshold).numpy()


def interpolate_frames(model, frames: np.ndarray, n: int, max_batch_bytes: int = DEFAULT_BATCH_BYTES,
                       threshold: float = SCENE_CUT_THRESHOLD) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (n·(T−1)+1, H, W, 3): each pair with n−1 frames between, at moments k/n."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FramePackError(f"Frames to interpolate must be uint8 (frames, height, width, 3), got {frames.dtype} "
                             f"{frames.shape}.")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FramePackError(f"interpolate must be an integer of 1 or more (frames per interval), got {n!r}.")
    if n == 1 or len(frames) < 2:
        return frames
    pairs, height, width = len(frames) - 1, frames.shape[1], frames.shape[2]
    cuts = scene_cuts(frames, threshold)
    output = np.empty((n * pairs + 1, height, width, 3), dtype=np.uint8)
    output[::n] = frames
    # Every (pair, moment) the model makes; a cut's in-between frames hold the earlier frame instead.
    jobs = [(pair, k) for pair in range(pairs) if not cuts[pair] for k in range(1, n)]
    for pair in np.flatnonzero(cuts):
        output[pair * n + 1:pair * n + n] = frames[pair]
    batch = max(1, int(max_batch_bytes // max(1, model.bytes_per_pair(height, width))))
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        index = np.array([pair for pair, _ in chunk])
        moments = torch.tensor([k / n for _, k in chunk])
        made = model.frames_between(_to_unit(frames[index]), _to_unit(frames[index + 1]), moments)
        output[[pair * n + k for pair, k in chunk]] = _to_uint8(made)
    return output


class SegmentInterpolator:
    """Interpolates a video handed over in segments (see the module doc); `add(frames)` returns the frames to
    write for that segment, in video order, to go after (forward) or before (backward) those given out so far."""

    def __init__(self, model, n: int, direction: str = "forward", max_batch_bytes: int = DEFAULT_BATCH_BYTES,
                 threshold: float = SCENE_CUT_THRESHOLD):
        if direction not in ("forward", "backward"):
            raise FramePackError(f"direction must be 'forward' or 'backward', got {direction!r}.")
        self.model, self.n, self.direction = model, n, direction
        self.max_batch_bytes, self.threshold = max_batch_bytes, threshold
        self.edge: np.ndarray | None = None  # the given-out frame next to where the next segment goes

    def add(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        if len(frames) == 0:
            return frames
        forward = self.direction == "forward"
        if self.edge is None:
            joined, drop = frames, None
        else:  # the pair across the join: the edge frame is already out, so it is dropped again
            joined = np.concatenate([self.edge[None], frames] if forward else [frames, self.edge[None]])
            drop = slice(1, None) if forward else slice(None, -1)
        self.edge = frames[-1] if forward else frames[0]
        made = interpolate_frames(self.model, joined, self.n, self.max_batch_bytes, self.threshold)
        return made if drop is None else made[drop]
