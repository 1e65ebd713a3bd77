"""One image as the output: what a one-frame run writes (framepack_engine.generation.one_frame).

`--out` picks the format by its suffix, among those PIL writes (.png, .jpg, .webp, .tif, .bmp, ...). The settings go
into the file as JSON: a PNG text chunk named `framepack` (and a JPEG's comment); `read_still_metadata` reads them
back. Like the videos, the file reaches its name by an atomic rename, and an existing file is replaced only with
`overwrite`.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from framepack_engine.errors import FramePackError, Option
from framepack_engine.media.metadata import PNG_CHUNK  # the text chunk holding the settings, as a video's PNG frames
from framepack_engine.media.video import _ordinary_permissions
DEFAULT_SUFFIX = ".png"


def image_format(path) -> str:
    """PIL's format name for the output's suffix; anything PIL cannot write is refused with one line."""
    from PIL import Image

    suffix = Path(path).suffix.lower()
    name = Image.registered_extensions().get(suffix)
    if name is None or name not in Image.SAVE:
        writable = sorted(s for s, f in Image.registered_extensions().items() if f in Image.SAVE
                          and s in (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp"))
        raise FramePackError(f"A one-frame run writes one image, and {Path(path).name!r} is not a name of an image "
                             f"format to write: end ", Option("out"), f" with {', '.join(writable)}.")
    return name


def check_still_output(path, overwrite: bool = False) -> None:
    """Before any model loads: the suffix names an image format, the folder exists, and no file is in the way."""
    path = Path(path)
    image_format(path)
    if path.is_dir():
        raise FramePackError(f"{path.name!r} is a folder: a one-frame run writes one image; give a file name for ",
                             Option("out"), ".")
    if path.exists() and not overwrite:
        raise FramePackError(f"{path.name!r} exists already: pass ", Option("overwrite"), " to replace it, or "
                             "choose another name.")
    if not path.parent.is_dir():
        raise FramePackError(f"The folder of {path.name!r} does not exist: create it first.")


def write_still(path, image: np.ndarray, metadata: dict | None = None) -> Path:
    """Writes uint8 (H, W, 3) `image` to `path` in the format its suffix names, with `metadata` as JSON (PNG text
    chunk `framepack`, JPEG comment); atomically (a temporary file beside it, then renamed)."""
    from PIL import Image, PngImagePlugin

    path = Path(path)
    kind = image_format(path)
    options = {}
    text = json.dumps(metadata) if metadata else None
    if text and kind == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_itxt(PNG_CHUNK, text)  # iTXt: UTF-8, so prompts in any language survive
        options["pnginfo"] = info
    elif text and kind == "JPEG":
        options["comment"] = text.encode()
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(handle)
    try:
        Image.fromarray(np.ascontiguousarray(image)).save(temporary, format=kind, **options)
        _ordinary_permissions(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def read_still_metadata(path) -> dict:
    """The settings an image written by `write_still` records ({} when it holds none)."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get(PNG_CHUNK) if image.format == "PNG" else image.info.get("comment")
    if not text:
        return {}
    return json.loads(text.decode() if isinstance(text, bytes) else text)


@dataclass
class Still:
    """One generated image (what `Engine.generate_image` returns)."""

    image: np.ndarray  # uint8 (H, W, 3)
    metadata: dict = field(default_factory=dict)
    latent: object = None  # the generated latent (1, channels, 1, h, w)
    stats: dict = field(default_factory=dict)

    def save(self, path) -> Path:
        """Writes the image (format by suffix) with its settings; replaces an existing file."""
        return write_still(path, self.image, self.metadata)

    def to_pil(self):
        from PIL import Image

        return Image.fromarray(self.image)


class StillOutputFile:
    """The output of a one-frame run for the command and the server: `SectionOutputFile`'s protocol (add, close,
    abort, on_disk) over one image, written when its one section is handed over."""

    def __init__(self, path):
        self.path = Path(path)
        self.published: Path | None = None
        self.frame_count = 0
        self.sections = 0
        self.postprocess, self.recorded = None, None

    def set_postprocess(self, postprocess, fps: float | None = None, recorded: dict | None = None) -> None:
        """`SectionOutputFile.set_postprocess` for one image: the upscaler (a framepack_engine.media.postprocess
        PostProcess; one image has nothing to interpolate) and settings to record instead of the run's own."""
        self.postprocess = postprocess if postprocess is not None and postprocess.active else None
        self.recorded = recorded

    @property
    def frames_written(self) -> int:
        return 1 if self.published is not None else 0

    def add(self, result) -> None:
        frames = result.frames if len(result.frames) else result.pending_frames
        metadata = {**result.metadata, **(self.recorded or {})}
        if self.postprocess is not None:
            frames, metadata = self.postprocess.apply(frames[-1:]), {**metadata, **self.postprocess.describe()}
        self.published = write_still(self.path, frames[-1], metadata)
        self.frame_count, self.sections = 1, 1

    def close(self, stop: threading.Event | None = None) -> Path | None:
        return self.published

    def abort(self) -> Path | None:
        return self.published

    def on_disk(self) -> str:
        if self.published is None:
            return "nothing was written (the image had not finished)"
        return f"{self.published.name} holds the image"
