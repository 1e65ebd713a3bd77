"""Video encoders: the default per container, checking a choice before any work, reproducible settings.

`check_encoder` resolves what the user asked for (codec None = the container's default), checks the codec, the
container, the pixel format and the quality setting, and really opens the encoder on a test frame in memory, so a
choice that cannot work fails in one sentence before any model loads. The settings it returns are what the
writers in `framepack_engine.media.video` open.

Reproducibility: with the settings below, encoding the same frames twice gives the same decoded frames (tested in
tests/test_encoders.py). The one encoder of ours that was not reproducible is libx264 on CPUs with AVX-512: its
AVX-512 code paths give different output from run to run (measured: every frame of a 61-frame clip differed, by up
to 75 levels; asm=0, mbtree=0 or asm=AVX2 make it repeatable). We cap it at AVX2, which on the development machine
was no slower (and mbtree=0 would cost about 20% in file size).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path

import numpy as np

from framepack_engine.errors import FramePackError

CONTAINERS = {".mp4": "mp4", ".mkv": "matroska", ".mov": "mov", ".webm": "webm", ".avi": "avi"}
# The encoder each container gets when the caller names none: H.264 plays everywhere; WebM holds only VP8/VP9/AV1.
DEFAULT_CODECS = {".mp4": "libx264", ".mkv": "libx264", ".mov": "libx264", ".avi": "libx264", ".webm": "libvpx-vp9"}
DEFAULT_CRF = 16
# Constant-rate-factor encoders and the crf values each accepts (lower is better quality, 0 is lossless for x264).
CRF_RANGES = {"libx264": (0, 51), "libx264rgb": (0, 51), "libx265": (0, 51), "libvpx-vp9": (0, 63),
              "libvpx": (4, 63), "libaom-av1": (0, 63), "libsvtav1": (0, 63)}
# Pixel formats chosen when the caller names none: what players expect from each encoder.
DEFAULT_PIXEL_FORMATS = {"ffv1": "yuv444p", "png": "rgb24", "prores_ks": "yuv422p10le", "prores": "yuv422p10le",
                         "libx264rgb": "rgb24"}
# Software encoders people pick for video, offered before FFmpeg's long tail.
COMMON_CODECS = ("libx264", "libx265", "libvpx-vp9", "libsvtav1", "libaom-av1", "ffv1", "prores_ks", "mpeg4")
HARDWARE_TAGS = ("nvenc", "qsv", "vaapi", "amf", "videotoolbox", "v4l2m2m", "_mf")
TEST_FRAME_SIZE = 256  # large enough for every hardware encoder's minimum size
PROBE_FRAMES = 3  # frames of the test encode (see _open_problem)

# The encoders' own log lines (x265 and SVT-AV1 print to stderr themselves, outside FFmpeg's logging, which PyAV
# keeps off). Their info and warning lines (banners, "disabling lookahead-slices", ...) would repeat for every
# section, so errors only by default, and nothing once `quiet_encoder_logs()` was called. SVT-AV1 reads its level
# from the SVT_LOG environment variable, once per process; a value the user set is kept.
_log_level = {"x265": "error", "svt": "1"}
_USER_SET_SVT_LOG = "SVT_LOG" in os.environ
if not _USER_SET_SVT_LOG:
    os.environ["SVT_LOG"] = _log_level["svt"]


def quiet_encoder_logs(quiet: bool = True) -> None:
    """Silence the encoders' own log lines (quiet), or let them print errors (the default), for later encodes.

    Call it before the first encode or `check_encoder`: SVT-AV1 reads its level once per process."""
    _log_level.update({"x265": "none", "svt": "0"} if quiet else {"x265": "error", "svt": "1"})
    if not _USER_SET_SVT_LOG:
        os.environ["SVT_LOG"] = _log_level["svt"]


@dataclass(frozen=True)
class EncoderSettings:
    """What one encode opens: the container format, the encoder, its pixel format and its options."""

    container: str
    codec: str
    pixel_format: str
    options: tuple[tuple[str, str], ...]

    def encoder_options(self) -> dict[str, str]:
        """The options with the log level current at the time of the call."""
        options = dict(self.options)
        if self.codec == "libx265":
            log_level = f"log-level={_log_level['x265']}"
            options["x265-params"] = _merge_params(log_level, _parse_params(options.get("x265-params")))
        return options


def container_for(path) -> str:
    """The FFmpeg format of a video file name, or a FramePackError naming the suffixes we write."""
    suffix = Path(path).suffix.lower()
    if suffix not in CONTAINERS:
        raise unknown_suffix(suffix)
    return CONTAINERS[suffix]


def unknown_suffix(suffix: str) -> FramePackError:
    return FramePackError(
        f"Unknown video file type {suffix!r}: use one of {', '.join(CONTAINERS)}, .png (frames) or .safetensors.")


def encoder_settings(path, codec: str | None = None, crf: int | None = DEFAULT_CRF, pixel_format: str | None = None,
                     options: dict | None = None) -> EncoderSettings:
    """Resolve and check a choice without opening the encoder (see `check_encoder`)."""
    import av

    suffix = Path(path).suffix.lower()
    container = container_for(path)
    if codec is None:
        codec = DEFAULT_CODECS[suffix]
    if not isinstance(codec, str) or not codec:
        raise FramePackError(f"The video encoder must be a name such as libx264, got {codec!r}: pass a codec name.")
    try:
        found = av.Codec(codec, "w")
    except Exception:
        found = None
    if found is None or found.type != "video":
        raise FramePackError(
            f"The video encoder {codec!r} is not available in this FFmpeg: choose one of "
            f"{_choices(suffix)}.")
    if not _container_accepts(container, codec):
        raise FramePackError(
            f"A {suffix} file cannot hold {codec} video: choose one of {_choices(suffix)} for {suffix}, "
            f"or another file type (.mkv holds almost any encoder).")
    pixel_format = _check_pixel_format(found, pixel_format)
    encoder_options = {str(key): str(value) for key, value in (options or {}).items()}
    if crf is not None and codec in CRF_RANGES:
        low, high = CRF_RANGES[codec]
        if isinstance(crf, bool) or not isinstance(crf, (int, float)) or not math.isfinite(crf) or crf != int(crf):
            raise FramePackError(f"crf must be a whole number, got {crf!r}: pass e.g. --crf {DEFAULT_CRF}.")
        if not low <= crf <= high:
            raise FramePackError(
                f"crf {crf} is outside {codec}'s range {low} to {high}: pass a value in it (lower is better "
                f"quality; the default is {DEFAULT_CRF}).")
        encoder_options.setdefault("crf", str(int(crf)))
    for key, value in _reproducible_options(codec, container).items():
        if key.endswith("-params"):
            encoder_options[key] = _merge_params(value, _parse_params(encoder_options.get(key)))
        else:
            encoder_options.setdefault(key, value)
    return EncoderSettings(container, codec, pixel_format, tuple(sorted(encoder_options.items())))


def check_encoder(path, codec: str | None = None, crf: int | None = DEFAULT_CRF, pixel_format: str | None = None,
                  options: dict | None = None, width: int = TEST_FRAME_SIZE,
                  height: int = TEST_FRAME_SIZE) -> EncoderSettings:
    """Check that a video can be written to `path` with these settings by encoding one test frame in memory.

    codec None means the container's default (`DEFAULT_CODECS`); pixel_format None the encoder's usual one; crf
    applies to the encoders in `CRF_RANGES` and is ignored by others. Returns the resolved settings; raises a
    one-sentence FramePackError naming the problem and the fix. Results are cached, so calling it again is free.
    """
    settings = encoder_settings(path, codec, crf, pixel_format, options)
    problem = _open_problem(settings, width - width % 2, height - height % 2)
    if problem:
        suffix = Path(path).suffix.lower()
        needs = "; it needs its GPU and driver" if _is_hardware(settings.codec) else ""
        raise FramePackError(
            f"The video encoder {settings.codec} does not start here with pixel format {settings.pixel_format} "
            f"({problem}{needs}): choose one of {_choices(suffix, exclude=settings.codec)} for {suffix}.")
    return settings


def available_codecs() -> list[str]:
    """Every video encoder that opens here (`usable_codecs` for Matroska, which holds almost any encoder); the
    encoders this FFmpeg was built with but that do not open (a hardware one without its GPU) are left out."""
    return usable_codecs("matroska")


@lru_cache(maxsize=None)
def usable_codecs(container: str = "matroska") -> list[str]:
    """Every encoder of the local FFmpeg that `container` can hold and that opens here, tried as a real encode opens
    it (with the options `encoder_settings` adds, e.g. no B-frames in AVI): working hardware ones first (fastest),
    then the common software ones, then the rest by name. Trying all of them takes about half a second, once per
    container. A name that only picks another encoder (h264 -> libx264) is left out."""
    names = [name for name in _video_encoders() if _codec(name).name == name]
    hardware = [name for name in names if _is_hardware(name)]
    common = [name for name in COMMON_CODECS if name in names]
    rest = [name for name in names if name not in hardware and name not in common]
    usable = []
    for name in hardware + common + rest:
        if not _container_accepts(container, name):
            continue
        options = tuple(sorted(_reproducible_options(name, container).items()))
        settings = EncoderSettings(container, name, _check_pixel_format(_codec(name), None), options)
        if not _open_problem(settings, TEST_FRAME_SIZE, TEST_FRAME_SIZE):
            usable.append(name)
    return usable


def open_video_stream(container, settings: EncoderSettings, fps, width: int, height: int):
    """Add the encoder's stream to an open PyAV output container."""
    stream = container.add_stream(settings.codec, rate=fps_fraction(fps))
    stream.width, stream.height = width, height
    stream.pix_fmt = settings.pixel_format
    stream.options = settings.encoder_options()
    return stream


def fps_fraction(fps) -> Fraction:
    return Fraction(fps).limit_denominator(1001)


# -- helpers ---------------------------------------------------------------------------------------------------


def _choices(suffix: str, exclude: str | None = None) -> str:
    names = [name for name in usable_codecs(CONTAINERS.get(suffix, "matroska")) if name != exclude]
    default = DEFAULT_CODECS.get(suffix)
    if default in names:
        names.remove(default)
        names.insert(0, default)
    return ", ".join(names) if names else "none (this FFmpeg has no working video encoder)"


@lru_cache(maxsize=None)
def _video_encoders() -> list[str]:
    import av

    names = []
    for name in sorted(av.codecs_available):
        codec = _codec(name)
        if codec is not None and codec.type == "video":
            names.append(name)
    return names


@lru_cache(maxsize=None)
def _codec(name: str):
    import av

    try:
        return av.Codec(name, "w")
    except Exception:
        return None


def _is_hardware(name: str) -> bool:
    return any(tag in name for tag in HARDWARE_TAGS)


@lru_cache(maxsize=None)
def _container_accepts(container: str, codec: str) -> bool:
    import av

    try:
        with av.open(io.BytesIO(), mode="w", format=container) as output:
            output.add_stream(codec, rate=30)
        return True
    except ValueError:
        return False
    except Exception:
        return True  # the stream was accepted; opening problems are `_open_problem`'s


def _check_pixel_format(codec, pixel_format: str | None) -> str:
    import av

    supported = [f.name for f in (codec.video_formats or [])]
    if pixel_format is None:
        preferred = DEFAULT_PIXEL_FORMATS.get(codec.name, "yuv420p")
        return preferred if preferred in supported or not supported else supported[0]
    try:
        av.VideoFormat(pixel_format)
    except Exception:
        raise FramePackError(
            f"{pixel_format!r} is not a pixel format FFmpeg knows: use e.g. yuv420p (the usual one) or yuv444p, "
            f"or drop --pixel-format.") from None
    if supported and pixel_format not in supported:
        raise FramePackError(
            f"{codec.name} cannot encode pixel format {pixel_format}: use one of {', '.join(supported[:10])}, "
            "or drop --pixel-format.")
    return pixel_format


@lru_cache(maxsize=None)
def _open_problem(settings: EncoderSettings, width: int, height: int) -> str | None:
    """None when the encoder opens and encodes a test frame into the container in memory, else FFmpeg's reason."""
    import av

    try:
        with av.open(io.BytesIO(), mode="w", format=settings.container) as output:
            stream = open_video_stream(output, settings, 30, width, height)
            y, x = np.mgrid[0:height, 0:width]
            # A few timed frames, as a real encode gives: libx265 in MP4 with a single frame fails now and then
            # (FFmpeg's "not yet implemented" when the header is written; about one open in three), so probing
            # with one frame left libx265 out of the offered encoders at random.
            for index in range(PROBE_FRAMES):
                picture = np.stack([(x + index) % 256, y % 256, (x + y) % 256], axis=-1).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
                frame.pts, frame.time_base = index, Fraction(1, 30)
                output.mux(stream.encode(frame))
            output.mux(stream.encode())
        return None
    except (av.FFmpegError, ValueError, OSError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        return str(reason).split(":")[0].strip() or type(error).__name__


def _reproducible_options(codec: str, container: str) -> dict[str, str]:
    """Options that make the encode repeatable (and, for VP9, usably fast), never overriding the caller's."""
    options = {}
    if codec in ("libx264", "libx264rgb") and _cpu_has_avx512():
        options["x264-params"] = "asm=AVX2"
    if codec == "libvpx-vp9":
        # b=0: constant quality from crf alone. libvpx's defaults (cpu-used 1, one row per thread) encode
        # 640x608 at about 3 frames/s on two cores; cpu-used 4 with row threading is ~3x faster, and repeatable.
        options.update({"b": "0", "cpu-used": "4", "row-mt": "1"})
    if container == "avi" and codec in ("libx264", "libx265"):
        options["bf"] = "0"  # AVI has no presentation timestamps: B-frame reordering would be guessed on playback
    return options


@lru_cache(maxsize=None)
def _cpu_has_avx512() -> bool:
    """True where x264 would pick its AVX-512 code (x86 CPUs with AVX-512F)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return "avx512f" in line.split()
    except OSError:
        pass
    try:
        import torch

        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    except Exception:
        return False


def _parse_params(text: str | None) -> dict[str, str]:
    """x264/x265 'key=value:key=value' parameters as a dict."""
    params = {}
    for item in (text or "").split(":"):
        if item:
            key, _, value = item.partition("=")
            params[key] = value
    return params


def _merge_params(text: str | None, overrides: dict[str, str]) -> str:
    params = {**_parse_params(text), **overrides}
    return ":".join(f"{key}={value}" if value else key for key, value in params.items())
