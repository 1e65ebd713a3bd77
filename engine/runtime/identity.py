"""What a model source is, cheaply, for an output's metadata: the Hub revision of a repo id, or a fingerprint of local
weights.

Hashing a 30 GB checkpoint at every run would cost minutes, so:
  - a repo id is named by the commit of the cached snapshot it was read from (the Hub's own content address);
  - a local file or folder by a fingerprint: sha256 over each safetensors file's name, size, whole header (names,
    dtypes, shapes, offsets, metadata) and 16 samples of 64 KiB spread evenly over its data. It reads about 1 MiB
    per file, and two checkpoints with the same shapes (a fine-tune and its base) still differ, since training
    moves nearly every weight. It is not the file's sha256sum;
  - a LoRA (small, and read whole anyway) by the sha256 of the whole file, the hash model sites list.
Only names go into metadata, never the machine's folders.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from framepack_engine.runtime.sources import is_repo_id, resolve_component

SAMPLES = 16
SAMPLE_BYTES = 1 << 16
_SNAPSHOT = re.compile(r"^[0-9a-f]{40}$")


def weights_sha256(path: str | Path) -> str:
    """The sha256 of a weights file read whole in 1 MiB pieces (a folder: of its .safetensors files in turn)."""
    path = Path(path)
    digest = hashlib.sha256()
    for file_path in [path] if path.is_file() else sorted(path.rglob("*.safetensors")):
        with open(file_path, "rb") as file:
            for piece in iter(lambda: file.read(1 << 20), b""):
                digest.update(piece)
    return digest.hexdigest()


def fingerprint(path: str | Path) -> str:
    """sha256 over each safetensors file's name (within a folder), size, header and 16 evenly spread 64 KiB samples
    of its data; `path` is one file or a folder (every .safetensors file under it)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(path.rglob("*.safetensors"))
    digest = hashlib.sha256()
    for file_path in files:
        size = file_path.stat().st_size
        name = file_path.name if file_path == path else file_path.relative_to(path).as_posix()
        digest.update(f"{name}\0{size}\0".encode())
        with open(file_path, "rb") as file:
            header_end = 8 + min(int.from_bytes(file.read(8), "little"), max(size - 8, 0))
            digest.update(file.read(header_end - 8))
            data = size - header_end
            for index in range(SAMPLES if data else 0):
                file.seek(header_end + (data - min(data, SAMPLE_BYTES)) * index // (SAMPLES - 1))
                digest.update(file.read(SAMPLE_BYTES))
    return digest.hexdigest()


# The component whose folder names a repo's snapshot, for each model source option.
_COMPONENTS = {"transformer": "transformer", "base": "vae", "image_encoder": "image_encoder"}


def source_identity(option: str, source: str, cache_dir=None) -> dict:
    """{"repo": id, "revision": commit} for a repo id (the cached snapshot's; never the network), or {"name": the
    file or folder's name, "fingerprint": ...} for a local path. option: transformer, base or image_encoder."""
    if is_repo_id(source):
        folder = resolve_component(source, _COMPONENTS[option], allow_download=False, cache_dir=cache_dir)
        snapshot = next((part for part in reversed(folder.parts) if _SNAPSHOT.match(part)), None)
        return {"repo": source, "revision": snapshot}
    path = Path(source).expanduser()
    return {"name": path.name, "fingerprint": fingerprint(path)}
