"""Video output: encoding through PyAV, PNG frames, safetensors of frames or latents.

Every file is written to a temporary name beside its destination and renamed into place, so a crash or a
cancelled run never leaves a half-written file under the name the user asked for.
"""

from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.errors import FramePackError

VIDEO_SUFFIXES = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}
# Pixel formats chosen when the caller names none: what players expect from each encoder.
DEFAULT_PIXEL_FORMAT = {"libx264": "yuv420p", "libx265": "yuv420p", "libvpx-vp9": "yuv420p", "libaom-av1": "yuv420p",
                        "h264_nvenc": "yuv420p", "hevc_nvenc": "yuv420p", "mpeg4": "yuv420p", "ffv1": "yuv444p",
                        "png": "rgb24"}
# Software encoders people pick for video, listed before FFmpeg's long tail of others.
COMMON_CODECS = ("libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1", "ffv1", "mpeg4", "prores_ks")
# Encoders that take a constant-rate-factor quality setting.
CRF_CODECS = {"libx264", "libx265", "libvpx-vp9", "libaom-av1", "libsvtav1"}


def available_codecs() -> list[str]:
    """Video encoders the local FFmpeg (through PyAV) offers; hardware ones first, as they are fastest."""
    import av

    names = []
    for name in sorted(av.codecs_available):
        try:
            codec = av.Codec(name, "w")
        except Exception:
            continue
        if codec.type == "video":
            names.append(name)
    hardware = [n for n in names if any(tag in n for tag in ("nvenc", "qsv", "vaapi", "amf", "videotoolbox"))]
    common = [n for n in COMMON_CODECS if n in names]
    return hardware + common + [n for n in names if n not in hardware and n not in common]


def _check_folder(folder: Path) -> None:
    """An existing output folder must be a folder and writable."""
    if not folder.is_dir():
        raise FramePackError(f"The output folder {folder.name!r} is a file: choose another --out path.")
    if not os.access(folder, os.W_OK):
        raise FramePackError(f"The output folder {folder.name!r} is not writable: choose a writable --out path.")


def _unknown_suffix(suffix: str) -> FramePackError:
    return FramePackError(
        f"Unknown video file type {suffix!r}: use one of {', '.join(VIDEO_SUFFIXES)}, .png (frames) or .safetensors.")


@contextmanager
def atomic_path(destination: Path):
    """A temporary path beside `destination`, renamed onto it when the block succeeds and removed when it fails."""
    destination = Path(destination)
    folder = destination.parent
    if not folder.exists():
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            raise FramePackError(f"Cannot create the output folder {folder.name!r}: choose a writable --out path.") from None
    _check_folder(folder)
    handle, temporary = tempfile.mkstemp(prefix=f".{destination.stem}.", suffix=destination.suffix, dir=folder)
    os.close(handle)
    # mkstemp makes the file private (0600); give the result the permissions a plain open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)
    try:
        yield Path(temporary)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def as_uint8_frames(frames) -> np.ndarray:
    """(T, H, W, 3) uint8 from uint8 arrays/tensors, or from float pixels in [-1, 1] shaped (T, H, W, 3)."""
    if isinstance(frames, torch.Tensor):
        if frames.is_floating_point():
            frames = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        frames = frames.cpu().numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise FramePackError(f"Frames must be uint8 of shape (frames, height, width, 3), got {frames.dtype} {frames.shape}.")
    return frames


def check_codec(codec: str) -> None:
    import av

    try:
        av.Codec(codec, "w")
    except Exception:
        raise FramePackError(
            f"The video encoder {codec!r} is not available in this FFmpeg: choose one of "
            f"{', '.join(available_codecs()[:12])}, ...") from None


def check_output(path, codec: str = "libx264") -> None:
    """Fail before any work is done if `path` could not be written with `codec`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in VIDEO_SUFFIXES:
        check_codec(codec)
    elif suffix not in ("", ".png", ".safetensors"):
        raise _unknown_suffix(suffix)
    folder = path if suffix in ("", ".png") else path.parent
    _check_folder(next((p for p in [folder, *folder.parents] if p.exists()), Path(".")))


def encode_video(frames, path, fps: float, codec: str = "libx264", crf: int | None = 16,
                 pixel_format: str | None = None, options: dict | None = None, metadata: dict | None = None) -> Path:
    import av

    frames = as_uint8_frames(frames)
    path = Path(path)
    container_format = VIDEO_SUFFIXES.get(path.suffix.lower())
    if container_format is None:
        raise _unknown_suffix(path.suffix)
    check_codec(codec)
    height, width = frames.shape[1:3]
    encoder_options = {str(k): str(v) for k, v in (options or {}).items()}
    if crf is not None and codec in CRF_CODECS:
        encoder_options.setdefault("crf", str(int(crf)))
    if codec == "libvpx-vp9":
        encoder_options.setdefault("b", "0")  # constant quality mode: crf alone, no bitrate cap

    with atomic_path(path) as temporary:
        with av.open(str(temporary), mode="w", format=container_format) as container:
            if metadata:
                # "comment" is the one free-text tag every container keeps; the settings travel in it as JSON.
                container.metadata["comment"] = json.dumps(metadata)
            stream = container.add_stream(codec, rate=_fps_fraction(fps))
            stream.width, stream.height = width - width % 2, height - height % 2
            stream.pix_fmt = pixel_format or DEFAULT_PIXEL_FORMAT.get(codec, "yuv420p")
            stream.options = encoder_options
            for frame in frames:
                picture = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[: stream.height, : stream.width]), format="rgb24")
                container.mux(stream.encode(picture))
            container.mux(stream.encode())
    return path


def _fps_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)


def write_png_frames(frames, folder, metadata: dict | None = None) -> Path:
    """One PNG per frame (frame_00000.png, ...) in `folder`, plus settings.json when metadata is given."""
    from PIL import Image

    frames = as_uint8_frames(frames)
    folder = Path(folder)
    for index, frame in enumerate(frames):
        with atomic_path(folder / f"frame_{index:05d}.png") as temporary:
            Image.fromarray(frame).save(temporary, format="PNG")
    if metadata:
        with atomic_path(folder / "settings.json") as temporary:
            temporary.write_text(json.dumps(metadata, indent=2))
    return folder


def write_safetensors(path, frames=None, latents=None, metadata: dict | None = None) -> Path:
    """Frames (uint8 T,H,W,3) and/or latents in one safetensors file; settings as string metadata."""
    from safetensors.torch import save_file

    tensors = {}
    if frames is not None:
        tensors["frames"] = torch.from_numpy(as_uint8_frames(frames).copy())
    if latents is not None:
        tensors["latents"] = latents.detach().cpu().contiguous()
    if not tensors:
        raise FramePackError("Nothing to save: pass frames or latents.")
    text_metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    with atomic_path(Path(path)) as temporary:
        save_file(tensors, str(temporary), metadata=text_metadata)
    return Path(path)


@dataclass
class Video:
    """A generated video: uint8 frames (T, H, W, 3), its frame rate, and what it took to make."""

    frames: np.ndarray
    fps: float
    stats: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    latents: torch.Tensor | None = None

    def save(self, path, codec: str = "libx264", crf: int | None = 16, pixel_format: str | None = None,
             options: dict | None = None) -> Path:
        """By suffix: a video container (.mp4, .webm, .mkv, .mov, .avi), `.safetensors` (frames and latents), or
        a folder / `.png` path for one PNG per frame."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return write_safetensors(path, self.frames, self.latents, self.metadata)
        if suffix == ".png" or suffix == "":
            return write_png_frames(self.frames, path.with_suffix("") if suffix else path, self.metadata)
        return encode_video(self.frames, path, self.fps, codec, crf, pixel_format, options, self.metadata)
