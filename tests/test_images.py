"""framepack_engine.media.images.load_image: orientation, bit depth, transparency and range conventions, and clear errors.

Every fixture is generated here; the expected pixels are computed independently of the loader (numpy rotations,
bit-depth arithmetic, alpha blending by hand).
"""

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_engine.errors import FramePackError
from framepack_engine.media.images import ALPHA_BACKGROUND, load_image, load_video_frames


def corner_image(height=20, width=40):
    """An RGB image whose four corners differ, so any rotation or flip shows."""
    image = np.zeros((height, width, 3), np.uint8)
    image[: height // 2, : width // 2] = (255, 0, 0)
    image[: height // 2, width // 2:] = (0, 255, 0)
    image[height // 2:, : width // 2] = (0, 0, 255)
    image[height // 2:, width // 2:] = (255, 255, 0)
    return image


def png_bytes(width, height, bit_depth, color_type, rows: bytes) -> bytes:
    """A PNG written by hand (PIL cannot write 16-bit RGB, nor a header that lies about the size)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


# EXIF orientation tag value -> the numpy transform that makes the stored pixels upright
ORIENTATIONS = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
@pytest.mark.parametrize("file_format", ["PNG", "JPEG"])
def test_exif_orientation_is_applied(tmp_path, orientation, file_format):
    stored = corner_image()
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo.{file_format.lower()}"
    Image.fromarray(stored).save(path, format=file_format, exif=exif.tobytes(), **(
        {"quality": 100, "subsampling": 0} if file_format == "JPEG" else {}))
    expected = ORIENTATIONS[orientation](stored)
    for source in (path, Image.open(path)):
        loaded = load_image(source)
        assert loaded.shape == expected.shape
        assert np.abs(loaded.astype(int) - expected).max() <= (40 if file_format == "JPEG" else 0)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    values = (np.arange(32 * 48).reshape(32, 48) * 42).astype(np.uint16)
    path = tmp_path / "depth.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == "I;16"
    expected = np.round(values / 257).astype(np.uint8)
    np.testing.assert_array_equal(load_image(path), np.repeat(expected[:, :, None], 3, axis=2))


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_16_bit_pil_modes(mode):
    values = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    raw = values.astype(">u2" if mode == "I;16B" else "<u2").tobytes()
    image = Image.frombytes(mode, (30, 20), raw)
    np.testing.assert_array_equal(load_image(image)[:, :, 1], np.round(values / 257).astype(np.uint8))


def test_16_bit_rgb_png_keeps_its_levels(tmp_path):
    generator = np.random.default_rng(0)
    values = generator.integers(0, 65536, (12, 20, 3)).astype(">u2")
    rows = b"".join(b"\x00" + row.tobytes() for row in values)
    path = tmp_path / "rgb48.png"
    path.write_bytes(png_bytes(20, 12, 16, 2, rows))
    # PIL keeps the high byte (truncation); within one level of the exact scaling
    assert np.abs(load_image(path).astype(int) - np.round(values / 257)).max() <= 1


@pytest.mark.parametrize("label, values, expected", [
    ("32-bit integer holding 16-bit data", np.array([[0, 1000, 65535]], np.int32), np.array([[0, 4, 255]])),
    ("32-bit integer beyond 16 bits", np.array([[0, 2 ** 30, 2 ** 31 - 1]], np.int32), np.array([[0, 128, 255]])),
    ("float in [0, 1]", np.array([[0.0, 0.25, 1.0]], np.float32), np.array([[0, 64, 255]])),
])
def test_tiff_integer_and_float_modes(tmp_path, label, values, expected):
    path = tmp_path / "image.tiff"
    Image.fromarray(np.repeat(values, 4, axis=0)).save(path)
    assert Image.open(path).mode in ("I", "F"), label
    np.testing.assert_array_equal(load_image(path)[0, :, 0], expected[0], err_msg=label)


def composite(rgb, alpha):
    blended = rgb * (alpha / 255) + ALPHA_BACKGROUND * (1 - alpha / 255)
    return np.round(blended).astype(np.uint8)


def test_rgba_is_composited_onto_the_background(tmp_path):
    rgb = corner_image()
    alpha = np.zeros(rgb.shape[:2], np.uint8)
    alpha[:, 10:20] = 128
    alpha[:, 20:] = 255
    path = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([rgb, alpha])).save(path)
    loaded = load_image(path)
    np.testing.assert_array_equal(loaded, composite(rgb.astype(float), alpha[:, :, None].astype(float)))
    assert (loaded[:, :10] == ALPHA_BACKGROUND).all()  # the red under transparent pixels does not show


def test_gray_alpha_and_palette_transparency(tmp_path):
    gray = np.tile(np.arange(0, 240, 8, dtype=np.uint8), (6, 1))
    alpha = np.tile(np.array([0, 255, 100], np.uint8), (6, 10))
    path = tmp_path / "la.png"
    Image.fromarray(np.dstack([gray, alpha]), mode="LA").save(path)
    expected = composite(gray[:, :, None].astype(float), alpha[:, :, None].astype(float))
    np.testing.assert_array_equal(load_image(path), np.repeat(expected, 3, axis=2))

    palette = Image.new("P", (4, 2))
    palette.putpalette([200, 10, 10, 10, 200, 10] + [0] * 762)
    palette.putdata([0, 1, 0, 1, 1, 0, 1, 0])
    path = tmp_path / "palette.png"
    palette.save(path, transparency=0)  # index 0 (red) is transparent
    loaded = load_image(path)
    assert (loaded.reshape(-1, 3)[[0, 2, 5, 7]] == ALPHA_BACKGROUND).all()
    assert (loaded.reshape(-1, 3)[[1, 3, 4, 6]] == (10, 200, 10)).all()


@pytest.mark.parametrize("layout", ["CHW", "HWC", "1CHW"])
def test_float_tensors_are_zero_to_one(layout):
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(3, 16, 24, generator=generator)
    expected = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    given = {"CHW": image, "HWC": image.permute(1, 2, 0), "1CHW": image[None]}[layout]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an image in range warns about nothing
        np.testing.assert_array_equal(load_image(given), expected)


@pytest.mark.parametrize("label, image, hint", [
    ("minus one to one", torch.rand(3, 8, 8) * 2 - 1, "(image + 1) / 2"),
    ("zero to 255 floats", torch.rand(3, 8, 8) * 255, "image / 255"),
    ("numpy float64 beyond one", np.random.default_rng(0).random((8, 8, 3)) * 4, "image / 255"),
])
def test_floats_outside_zero_to_one_warn(label, image, hint):
    with pytest.warns(UserWarning, match="start image") as caught:
        loaded = load_image(image, "start image")
    assert hint in str(caught[0].message), label
    assert loaded.dtype == np.uint8 and loaded.shape == (8, 8, 3)


def test_integer_arrays_and_other_layouts():
    levels = np.arange(24, dtype=np.int64).reshape(4, 6) * 10
    np.testing.assert_array_equal(load_image(levels), np.repeat(levels[:, :, None], 3, axis=2).astype(np.uint8))
    sixteen = np.full((4, 6, 3), 65535, np.uint16)
    assert (load_image(sixteen) == 255).all()
    mask = np.eye(4, dtype=bool)
    assert load_image(mask)[0, 0, 0] == 255 and load_image(mask)[0, 1, 0] == 0
    rgba = np.zeros((4, 4, 4), np.uint8)
    assert (load_image(rgba) == ALPHA_BACKGROUND).all()  # fully transparent
    assert load_image(torch.zeros(1, 5, 7)).shape == (5, 7, 3)


def huge_png(path, width, height):
    path.write_bytes(png_bytes(width, height, 8, 2, b""))


def write_bad(kind, tmp_path):
    """A path or object for each kind of bad input."""
    if kind == "folder":
        (tmp_path / "pictures").mkdir()
        return tmp_path / "pictures"
    if kind == "missing":
        return tmp_path / "missing.png"
    if kind == "not an image":
        (tmp_path / "notes.png").write_text("not an image at all")
        return tmp_path / "notes.png"
    if kind == "truncated":
        Image.fromarray(corner_image()).save(tmp_path / "cut.png")
        data = (tmp_path / "cut.png").read_bytes()
        (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
        return tmp_path / "cut.png"
    if kind == "header claims 20000x20000":
        huge_png(tmp_path / "bomb.png", 20000, 20000)
        return tmp_path / "bomb.png"
    if kind == "header claims 10000x10000":
        huge_png(tmp_path / "large.png", 10000, 10000)
        return tmp_path / "large.png"
    return {
        "a list": [[0, 1], [2, 3]],
        "video-shaped array": np.zeros((5, 8, 8, 3), np.uint8),
        "five channels": np.zeros((8, 8, 5), np.uint8),
        "empty array": np.zeros((0, 8, 3), np.uint8),
        "one dimension": np.zeros(12, np.uint8),
        "int32 beyond 255": np.full((4, 4, 3), 300, np.int32),
        "negative integers": np.full((4, 4, 3), -1, np.int16),
        "complex": np.zeros((4, 4, 3), np.complex64),
        "NaN floats": torch.full((3, 4, 4), float("nan")),
        "infinite floats": np.full((4, 4, 3), np.inf, np.float32),
    }[kind]


@pytest.mark.parametrize("kind, message", [
    ("folder", "is a folder, not an image file"),
    ("missing", "does not exist"),
    ("not an image", "not a readable image"),
    ("truncated", "not a readable image"),
    ("header claims 20000x20000", "20000x20000 pixels, over the 89,478,485-pixel limit"),
    ("header claims 10000x10000", "10000x10000 pixels, over the 89,478,485-pixel limit"),
    ("a list", "must be a file path, a PIL image, a numpy array or a torch tensor"),
    ("video-shaped array", "must be an image of shape"),
    ("five channels", "must be an image of shape"),
    ("empty array", "must be an image of shape"),
    ("one dimension", "must be an image of shape"),
    ("int32 beyond 255", "integer images must hold 0..255"),
    ("negative integers", "integer images must hold 0..255"),
    ("complex", "not an image type"),
    ("NaN floats", "NaN or infinite"),
    ("infinite floats", "NaN or infinite"),
])
def test_bad_images_raise_one_sentence_naming_the_input(tmp_path, kind, message):
    bad = write_bad(kind, tmp_path)
    with pytest.raises(FramePackError) as raised:
        load_image(bad, "end image")
    text = str(raised.value)
    assert message in text and "end image" in text and "\n" not in text, (kind, text)
    if isinstance(bad, Path):
        assert repr(bad.name) in text, (kind, text)


def test_video_path_that_is_a_folder(tmp_path):
    with pytest.raises(FramePackError, match="is a folder"):
        load_video_frames(tmp_path)
