"""Input images and videos: reading them, and fitting them to a resolution bucket as the official app does."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from framepack_engine.errors import FramePackError, FramePackWarning


# Transparent pixels are composited onto white, as browsers and image viewers show a transparent PNG on a light page;
# the colours stored under fully transparent pixels are arbitrary (often black or leftovers) and must not show.
ALPHA_BACKGROUND = 255
# Float values this far outside [0, 1] are rounding noise (resampling overshoot), not a different range convention.
FLOAT_RANGE_SLACK = 1e-3


def load_image(image, name: str = "image") -> np.ndarray:
    """uint8 (height, width, 3) RGB from a path, a PIL image, a numpy array or a torch tensor.

    Conventions (the README's "Input images"):
      * files and PIL images are turned upright by their EXIF orientation, as photo viewers show them;
      * transparency (RGBA, LA, palette with transparency, or a 4th / 2nd channel in arrays) is composited onto
        white (`ALPHA_BACKGROUND`);
      * integer pixels keep their bit depth: uint8 as is, 16-bit (PIL I;16*, numpy uint16) scaled by 255/65535,
        PIL 32-bit integer images (mode I) as 16-bit when every value fits in 16 bits, else by 255/(2**31 - 1)
        (negative values black); other numpy integer types must hold 0..255;
      * float pixels (PIL mode F, numpy floats, torch float tensors) are in [0, 1], the PIL / torchvision
        `to_tensor` convention; values outside it are clipped with a warning naming the likely range;
      * arrays and tensors are (H, W), (H, W, C) or (C, H, W) with C in 1, 2, 3, 4, with an optional leading
        batch dimension of 1.
    """
    return _to_rgb_uint8(_read_array(image, name), name)


def _read_array(image, name: str) -> np.ndarray:
    """Any accepted image as (H, W, C) numpy of its own type, upright, alpha kept."""
    from PIL import Image

    if isinstance(image, (str, Path, Image.Image)):
        array = _open_image_file(Path(image), name) if isinstance(image, (str, Path)) else _pil_to_array(image)
        return array[:, :, None] if array.ndim == 2 else array  # grayscale (L) images have no channel axis
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        return _channels_last((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy(), name)
    if isinstance(image, np.ndarray):
        return _channels_last(image, name)
    raise FramePackError(
        f"The {name} must be a file path, a PIL image, a numpy array or a torch tensor, "
        f"got {type(image).__name__}: pass one of those.")


def load_image_with_alpha(image, name: str = "image") -> tuple[np.ndarray, np.ndarray | None]:
    """`load_image`'s RGB and the image's transparency as float32 (height, width) in [0, 1] (1 = opaque), or None
    when it has none; read once. One-frame control images use the transparency as their latent mask."""
    array = _read_array(image, name)
    alpha = np.ascontiguousarray(_to_unit_range(array[:, :, -1:], name)[:, :, 0]) if array.shape[2] in (2, 4) else None
    return _to_rgb_uint8(array, name), alpha


def load_mask(mask, name: str = "mask") -> np.ndarray:
    """A mask image as float32 (height, width) in [0, 1]: its luminance (white keeps, black drops), read as
    `load_image` reads images."""
    rgb = load_image(mask, name).astype(np.float32) / 255
    return np.ascontiguousarray(rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32))  # ITU-R 601, PIL's "L"


def resize_and_center_crop_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """A float mask (H, W) in [0, 1] fitted to the bucket exactly as its image is (`resize_and_center_crop`)."""
    levels = np.round(np.clip(mask, 0, 1) * 255).astype(np.uint8)
    return resize_and_center_crop(levels, width, height).astype(np.float32) / 255


def _open_image_file(path: Path, name: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    if path.is_dir():
        raise FramePackError(f"The {name} path {path.name!r} is a folder, not an image file: pass the image file itself.")
    if not path.is_file():
        raise FramePackError(f"The {name} file {path.name!r} does not exist: check the path.")
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL warns above its pixel limit and refuses above twice it: both get the one message below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                width, height = opened.size
                if limit is not None and width * height > limit:
                    raise _too_large(path, name, width, height, limit)
                return _pil_to_array(opened)
    except Image.DecompressionBombError:
        width, height = _header_size(path)
        raise _too_large(path, name, width, height, limit) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise FramePackError(
            f"The {name} file {path.name!r} is not a readable image: use a PNG, JPEG, WebP or TIFF.") from None


def _header_size(path: Path) -> tuple[int, int]:
    """The size an image file's header claims, read with PIL's pixel limit lifted (no pixels are decoded)."""
    from PIL import Image

    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(path) as opened:
            return opened.size
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _too_large(path: Path, name: str, width: int, height: int, limit: int) -> FramePackError:
    return FramePackError(
        f"The {name} file {path.name!r} is {width}x{height} pixels, over the {limit:,}-pixel limit on input images "
        "(a guard against decompression bombs): downscale it first; the video is made at about 640x640.")


def _pil_to_array(image) -> np.ndarray:
    """A PIL image as (H, W, C) numpy, upright, keeping its bit depth and alpha for `_to_rgb_uint8`."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode.startswith("I;16"):
        return np.asarray(image).astype(np.uint16)[:, :, None]
    if mode == "I":  # 32-bit signed; most such files hold 16-bit data
        values = np.asarray(image)
        if values.min() >= 0 and values.max() <= 0xFFFF:
            return values.astype(np.uint16)[:, :, None]
        return (values.astype(np.float64) / np.iinfo(np.int32).max).clip(0, 1)[:, :, None]
    if mode == "F":
        return np.asarray(image, dtype=np.float32)[:, :, None]
    if mode in ("RGBA", "LA", "RGB", "L") and "transparency" not in image.info:
        return np.asarray(image)
    if mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in image.info:
        return np.asarray(image.convert("RGBA"))
    return np.asarray(image.convert("RGB"))  # 1, P, CMYK, YCbCr, LAB, HSV


def _channels_last(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W), optionally with a leading batch of 1 -> (H, W, C)."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim == 3 and array.shape[0] in (1, 2, 3, 4) and array.shape[2] not in (1, 2, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.ndim != 3 or array.shape[2] not in (1, 2, 3, 4) or 0 in array.shape:
        raise FramePackError(
            f"The {name} must be an image of shape (height, width, 3), (3, height, width) or (height, width), "
            f"got shape {tuple(array.shape)}: pass a single RGB or grayscale image.")
    return array


def _to_rgb_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """(H, W, C) of any supported dtype -> uint8 (H, W, 3), alpha composited onto the background."""
    if array.dtype == np.uint8 and array.shape[2] in (1, 3):
        return np.ascontiguousarray(np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array)
    levels = _to_unit_range(array, name)  # float32 in [0, 1]
    channels = levels.shape[2]
    if channels in (2, 4):
        alpha = levels[:, :, -1:]
        levels = levels[:, :, :-1] * alpha + (ALPHA_BACKGROUND / 255) * (1 - alpha)
    if levels.shape[2] == 1:
        levels = np.repeat(levels, 3, axis=2)
    return np.ascontiguousarray(np.round(levels * 255).astype(np.uint8))


def _to_unit_range(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 0xFFFF
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise FramePackError(
                f"The {name} is {array.dtype} with values {low}..{high}: integer images must hold 0..255 "
                "(or be uint16 for 16-bit images); convert it to uint8.")
        return array.astype(np.float32) / 255
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float32)
        if not np.isfinite(values).all():
            raise FramePackError(f"The {name} has NaN or infinite values: pass finite pixel values in [0, 1].")
        low, high = float(values.min()), float(values.max())
        if low < -FLOAT_RANGE_SLACK:
            warnings.warn(
                f"The {name} has float values down to {low:.3g}: float images are read as [0, 1], so values below "
                "0 become black; for an image in [-1, 1] pass (image + 1) / 2.", FramePackWarning, stacklevel=4)
        elif high > 1 + FLOAT_RANGE_SLACK:
            warnings.warn(
                f"The {name} has float values up to {high:.3g}: float images are read as [0, 1], so values above "
                "1 become white; for an image in 0..255 pass image / 255.", FramePackWarning, stacklevel=4)
        return np.clip(values, 0, 1)
    raise FramePackError(
        f"The {name} has pixel type {array.dtype}, which is not an image type: use uint8, uint16 or floats in [0, 1].")


def resize_and_center_crop(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Scale (Lanczos) so the image covers width x height, then crop the middle: the official preprocessing."""
    from PIL import Image

    original_height, original_width = image.shape[:2]
    if (original_width, original_height) == (width, height):
        return image
    scale = max(width / original_width, height / original_height)
    resized = Image.fromarray(image).resize(
        (round(original_width * scale), round(original_height * scale)), Image.LANCZOS)
    left = (resized.width - width) / 2
    top = (resized.height - height) / 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))


def image_to_pixels(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (1, 3, 1, H, W) in [-1, 1], the VAE's input for one frame."""
    return (torch.tensor(image).float() / 127.5 - 1).permute(2, 0, 1)[None, :, None]


def pixels_to_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Float pixels in [-1, 1] -> uint8, rounded to nearest (the official app truncates; rounding is unbiased),
    computed where the pixels are."""
    return ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def load_video_frames(video) -> tuple[np.ndarray, float]:
    """uint8 (frames, H, W, 3) and the frame rate, from a video file or an array of frames (fps then 30)."""
    if isinstance(video, (str, Path)):
        import av

        path = Path(video)
        if path.is_dir():
            raise FramePackError(f"The input video path {path.name!r} is a folder: pass the video file itself.")
        if not path.is_file():
            raise FramePackError(f"The input video {path.name!r} does not exist: check the path.")
        try:
            with av.open(str(path)) as container:
                stream = container.streams.video[0]
                frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
                fps = float(stream.average_rate or 30)
        except (av.FFmpegError, IndexError):
            raise FramePackError(f"The input video {path.name!r} is not a readable video: use an mp4, webm or mkv.") from None
        if not frames:
            raise FramePackError(f"The input video {path.name!r} has no frames.")
        return np.asarray(frames), fps
    frames = np.asarray(video.cpu() if isinstance(video, torch.Tensor) else video)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FramePackError(f"An input video must be uint8 frames (frames, height, width, 3), got {frames.dtype} {frames.shape}.")
    return frames, 30.0
