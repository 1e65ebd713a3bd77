"""Input images and videos: reading them, and fitting them to a resolution bucket as the official app does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engine.errors import FramePackError


def load_image(image, name: str = "image") -> np.ndarray:
    """uint8 (height, width, 3) RGB from a path, a PIL image, a numpy array or a (3, H, W)/(H, W, 3) tensor."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise FramePackError(f"The {name} file {path.name!r} does not exist: check the path.")
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except (UnidentifiedImageError, OSError):
            raise FramePackError(f"The {name} file {path.name!r} is not a readable image: use a PNG, JPEG or WebP.") from None
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.ndim == 3 and tensor.shape[0] == 3 and tensor.shape[-1] != 3:
            tensor = tensor.permute(1, 2, 0)
        if tensor.is_floating_point():
            tensor = ((tensor.clamp(-1, 1) + 1) * 127.5).round()
        image = tensor.to(torch.uint8).numpy()
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or image.dtype != np.uint8:
        raise FramePackError(
            f"The {name} must be an RGB image (height, width, 3) of uint8, got {image.dtype} {image.shape}.")
    return np.ascontiguousarray(image[:, :, :3])


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


def load_video_frames(video) -> tuple[np.ndarray, float]:
    """uint8 (frames, H, W, 3) and the frame rate, from a video file or an array of frames (fps then 30)."""
    if isinstance(video, (str, Path)):
        import av

        path = Path(video)
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
