"""Resolution buckets: the official 640 table, the official nearest-bucket rule, and the scaling rule's properties."""

import random

import pytest

from framepack_engine.models.buckets import bucket_options, find_nearest_bucket
from framepack_engine.errors import FramePackError

# bucket_options[640] of the official diffusers_helper/bucket_tools.py, (height, width).
OFFICIAL_640 = [
    (416, 960), (448, 864), (480, 832), (512, 768), (544, 704), (576, 672), (608, 640),
    (640, 608), (672, 576), (704, 544), (768, 512), (832, 480), (864, 448), (960, 416),
]


def nearest_oracle(height, width, table):
    """The official search: smallest |h * w_b - w * h_b|, a later bucket winning ties."""
    metrics = [abs(height * w - width * h) for h, w in table]
    best = min(metrics)
    return table[len(metrics) - 1 - metrics[::-1].index(best)]


def scaled_oracle(resolution):
    """The documented rule in integer arithmetic: side * R / 640 to the nearest multiple of 16, halves up."""
    table = []
    for h, w in OFFICIAL_640:
        bucket = tuple(max(16, 16 * ((2 * side * resolution + 640 * 16) // (2 * 640 * 16))) for side in (h, w))
        if bucket not in table:
            table.append(bucket)
    return table


def test_official_640_table():
    assert list(bucket_options(640)) == OFFICIAL_640
    assert list(bucket_options()) == OFFICIAL_640


def test_find_nearest_bucket_matches_official_search():
    rng = random.Random(0)
    sizes = [(1080, 1920), (1920, 1080), (512, 512), (640, 640), (1, 1000), (1000, 1), (768, 1024), (333, 777)]
    sizes += [(rng.randint(16, 4000), rng.randint(16, 4000)) for _ in range(300)]
    for height, width in sizes:
        assert find_nearest_bucket(height, width) == nearest_oracle(height, width, OFFICIAL_640), (height, width)
        for resolution in (384, 512, 960):
            expected = nearest_oracle(height, width, scaled_oracle(resolution))
            assert find_nearest_bucket(height, width, resolution) == expected


def test_find_nearest_bucket_known_cases():
    assert find_nearest_bucket(1080, 1920) == (480, 832)   # 16:9 landscape
    assert find_nearest_bucket(1920, 1080) == (832, 480)
    assert find_nearest_bucket(608, 640) == (608, 640)     # a bucket maps to itself
    # A square ties between 608x640 and 640x608; the official keeps the later one.
    assert find_nearest_bucket(512, 512) == (640, 608)


@pytest.mark.parametrize("resolution", [256, 320, 384, 480, 512, 544, 720, 768, 960, 1024, 1280])
def test_scaled_buckets_properties(resolution):
    buckets = bucket_options(resolution)
    assert list(buckets) == scaled_oracle(resolution)
    assert len(buckets) == len(OFFICIAL_640)
    for (h, w), (h640, w640) in zip(buckets, OFFICIAL_640):
        assert h % 16 == 0 and w % 16 == 0
        assert 0.88 <= h * w / resolution ** 2 <= 1.02, (h, w)
        # Same shape as the official bucket, up to rounding each side by at most 8 pixels.
        assert abs(h - h640 * resolution / 640) <= 8 and abs(w - w640 * resolution / 640) <= 8
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios), "widest to tallest, no repeats"


@pytest.mark.parametrize("resolution", [16, 48, 64, 100, 128])
def test_small_resolutions_stay_valid(resolution):
    buckets = bucket_options(resolution)
    assert buckets and all(h % 16 == 0 and w % 16 == 0 and h >= 16 and w >= 16 for h, w in buckets)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios) and len(set(ratios)) == len(ratios)
    assert list(buckets) == scaled_oracle(resolution)


@pytest.mark.parametrize("resolution", [0, 8, -640, 640.0, "640", True])
def test_bad_resolution(resolution):
    with pytest.raises(FramePackError):
        bucket_options(resolution)


def test_bad_image_size():
    with pytest.raises(FramePackError):
        find_nearest_bucket(0, 640)
