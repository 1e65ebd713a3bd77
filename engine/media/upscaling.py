"""Upscaling frames in tiles, so that a model's activations stay under a byte bound whatever the frame size.

The model is any callable from (B, 3, h, w) in [0, 1] to (B, 3, h·scale, w·scale) with `scale` and
`bytes_per_pixel()` (framepack_engine.models.upscaler.Upscaler). Each tile is a core of the frame plus `overlap`
pixels of context on every side (clipped at the frame's edges); only the core of each upscaled tile is kept, so the
seams are cut where both neighbours saw the same context. Tiles as large as the bound allows mean fewer seams: a
frame that fits is upscaled whole.
"""

from __future__ import annotations

import math

import numpy as np
import torch

DEFAULT_TILE_BYTES = 1 << 30  # activations of one tile (Real-ESRGAN x4 in float32: 295-pixel tiles, x2plus: 416)
OVERLAP = 32  # context pixels around each tile's core: an ESRGAN's receptive field reaches about this far in practice
MIN_TILE = 64


def tile_size(model, max_bytes: int = DEFAULT_TILE_BYTES) -> int:
    """The side of the largest square tile (context included) whose activations stay under `max_bytes`, a multiple
    of the model's `multiple_of` (at least MIN_TILE)."""
    multiple = getattr(model, "multiple_of", 1) or 1
    side = int(math.sqrt(max_bytes / max(1, model.bytes_per_pixel())))
    return max(MIN_TILE, side - side % multiple)


def _spans(length: int, core: int, overlap: int):
    """(core start, core end, tile start, tile end) along one side."""
    for start in range(0, length, core):
        end = min(start + core, length)
        yield start, end, max(0, start - overlap), min(length, end + overlap)


def upscale_image(model, image: torch.Tensor, tile: int, overlap: int = OVERLAP) -> torch.Tensor:
    """float (1, 3, H, W) in [0, 1] -> float (1, 3, H·scale, W·scale), in tiles of at most `tile` pixels a side
    (context included); the whole image at once when it fits."""
    scale, (height, width) = model.scale, image.shape[-2:]
    if height <= tile and width <= tile:
        return model(image).cpu()
    core = max(1, tile - 2 * overlap)
    output = torch.empty((1, 3, height * scale, width * scale))
    for y0, y1, ty0, ty1 in _spans(height, core, overlap):
        for x0, x1, tx0, tx1 in _spans(width, core, overlap):
            made = model(image[..., ty0:ty1, tx0:tx1])
            output[..., y0 * scale:y1 * scale, x0 * scale:x1 * scale] = \
                made[..., (y0 - ty0) * scale:(y1 - ty0) * scale, (x0 - tx0) * scale:(x1 - tx0) * scale].cpu()
    return output


def upscale_frames(model, frames: np.ndarray, tile: int | None = None, overlap: int = OVERLAP,
                   max_bytes: int = DEFAULT_TILE_BYTES) -> np.ndarray:
    """uint8 (T, H, W, 3) -> uint8 (T, H·scale, W·scale, 3), each frame in tiles of at most `tile` pixels a side
    (default: the largest under `max_bytes`)."""
    tile = tile or tile_size(model, max_bytes)
    scale = model.scale
    count, height, width = frames.shape[:3]
    output = np.empty((count, height * scale, width * scale, 3), dtype=np.uint8)
    for index in range(count):
        image = torch.from_numpy(np.ascontiguousarray(frames[index])).permute(2, 0, 1)[None].float().div_(255)
        made = upscale_image(model, image, tile, overlap)[0]
        output[index] = made.mul(255).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return output
