"""Resolution buckets: the output sizes FramePack generates at, and the one nearest an input's aspect ratio.

The model was trained on a fixed set of 14 sizes around 640x640 (the official ``bucket_options[640]``, kept below
exactly). Other target resolutions use the same aspect ratios, scaled:

    bucket at resolution R = each 640 bucket (h, w) scaled by R / 640, each side rounded to the nearest multiple
    of 16 (halves round up, never below 16), repeated sizes dropped.

So every bucket is a multiple of 16 (the VAE's 8x times the DiT's 2x2 patch), the area stays near R^2, and buckets
keep the official order: from widest (height < width) to tallest.
"""

from __future__ import annotations

import functools
import math

from framepack_engine.errors import FramePackError

REFERENCE_RESOLUTION = 640
# Pixels per latent along height and width (the VAE's downsampling): a bucket is a whole number of latents.
BUCKET_MULTIPLE = 16

# (height, width) of the official table for 640, widest first.
OFFICIAL_BUCKETS_640 = (
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
)


def _round_to_multiple(value: float) -> int:
    return max(BUCKET_MULTIPLE, BUCKET_MULTIPLE * math.floor(value / BUCKET_MULTIPLE + 0.5))


def bucket_options(resolution: int = REFERENCE_RESOLUTION) -> tuple[tuple[int, int], ...]:
    """The ``(height, width)`` buckets for a target resolution, widest first (the official table for 640)."""
    # Checked before the cache, which would take 640.0 for 640.
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < BUCKET_MULTIPLE:
        raise FramePackError(f"resolution must be an integer of at least {BUCKET_MULTIPLE}, got {resolution!r}; "
                             f"the model was trained at {REFERENCE_RESOLUTION}.")
    return _scaled_buckets(resolution)


@functools.lru_cache(maxsize=None)
def _scaled_buckets(resolution: int) -> tuple[tuple[int, int], ...]:
    if resolution == REFERENCE_RESOLUTION:
        return OFFICIAL_BUCKETS_640
    scale = resolution / REFERENCE_RESOLUTION
    buckets = []
    for height, width in OFFICIAL_BUCKETS_640:
        bucket = (_round_to_multiple(height * scale), _round_to_multiple(width * scale))
        if not buckets or buckets[-1] != bucket:  # rounding is monotone, so repeats are neighbours
            buckets.append(bucket)
    return tuple(buckets)


def find_nearest_bucket(height: int, width: int, resolution: int = REFERENCE_RESOLUTION) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest ``height : width`` (minimising ``|height * w - width * h|`` as the
    official does; on a tie the later, taller bucket wins)."""
    if not height > 0 or not width > 0:
        raise FramePackError(f"image size must be positive, got {height}x{width}; pass a non-empty image.")
    best, best_metric = None, math.inf
    for bucket_height, bucket_width in bucket_options(resolution):
        metric = abs(height * bucket_width - width * bucket_height)
        if metric <= best_metric:
            best, best_metric = (bucket_height, bucket_width), metric
    return best
