"""Reading back the metadata the writers (framepack_engine.media.video) record with every output.

Where it travels: a video container's `comment` tag (JSON), each PNG frame's `framepack` text chunk and the PNG
folder's `settings.json`, and a `.safetensors` header's `metadata` entry (JSON; its other entries hold the same values
one by one, as text). `read_metadata` finds it in any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from framepack_engine.errors import FramePackError
from framepack_engine.media.codecs import CONTAINERS

PNG_CHUNK = "framepack"  # the text chunk of each PNG frame
SETTINGS_FILE = "settings.json"  # beside PNG frames
SAFETENSORS_KEY = "metadata"  # the whole metadata as JSON in a .safetensors header


def read_metadata(path) -> dict | None:
    """The recorded metadata of an output (a video, a PNG frame or folder, a settings.json, a .safetensors file),
    None when it has none; a missing or unreadable file is one line."""
    path = Path(path)
    if not path.exists():
        raise FramePackError(f"{path.name!r} does not exist: give the video, PNG frame or folder, settings.json or "
                             ".safetensors file to read the settings from.")
    suffix = path.suffix.lower()
    try:
        if path.is_dir():
            return _json(path / SETTINGS_FILE) if (path / SETTINGS_FILE).is_file() else None
        if suffix == ".json":
            return _json(path)
        if suffix == ".png":
            return _png(path)
        if suffix in (".safetensors", ".sft"):
            return _safetensors(path)
        if suffix in CONTAINERS:
            return _video(path)
    except (OSError, ValueError) as error:
        raise FramePackError(f"{path.name!r} cannot be read ({type(error).__name__}): give a file framepack generate "
                             "wrote.") from None
    raise FramePackError(f"{path.name!r} is not an output framepack generate writes: give a video "
                         f"({', '.join(CONTAINERS)}), a PNG frame or folder, settings.json or a .safetensors file.")


def _parsed(text) -> dict | None:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _json(path: Path) -> dict | None:
    return _parsed(path.read_text(encoding="utf-8", errors="replace"))


def _png(path: Path) -> dict | None:
    from PIL import Image

    with Image.open(path) as image:
        recorded = _parsed(image.text.get(PNG_CHUNK)) if hasattr(image, "text") else None
    if recorded is None and (path.parent / SETTINGS_FILE).is_file():  # a frame written before frames had the chunk
        recorded = _json(path.parent / SETTINGS_FILE)
    return recorded


def _safetensors(path: Path) -> dict | None:
    with open(path, "rb") as file:
        length = int.from_bytes(file.read(8), "little")
        if not 0 < length <= path.stat().st_size - 8:
            raise ValueError("not a safetensors file")
        header = json.loads(file.read(length))
    return _parsed((header.get("__metadata__") or {}).get(SAFETENSORS_KEY))


def _video(path: Path) -> dict | None:
    import av

    try:
        with av.open(str(path)) as container:  # Matroska (.mkv, .webm) keeps tag names upper-case
            tags = {name.lower(): value for name, value in container.metadata.items()}
        return _parsed(tags.get("comment"))
    except av.FFmpegError as error:
        raise ValueError(str(error)) from None
