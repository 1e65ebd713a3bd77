"""Reading weights and configs from disk: safetensors only, memory-mapped.

A model folder holds `config.json` and either one `*.safetensors` file or several shards listed by a
`*.safetensors.index.json` (the diffusers / transformers layouts).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from engine.errors import ModelSourceError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"No config.json in {Path(folder).name!r}: point at the model folder that holds it.")
    return json.loads(path.read_text())


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder, in shard order."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = json.loads(indexes[0].read_text())["weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelSourceError(
                f"Shard {missing[0]!r} listed in {indexes[0].name} is missing: download the complete folder again.")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickles:
        raise ModelSourceError(
            f"{pickles[0].name!r} is a pickle checkpoint, which we refuse to load (it can run code): "
            "convert it to .safetensors or use the safetensors release of the model.")
    raise ModelSourceError(f"No .safetensors weights in {folder.name!r}: point at the model folder that holds them.")


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or model folder, memory-mapped; cast to `dtype` when given."""
    path = Path(path)
    if path.suffix in _PICKLE_SUFFIXES:
        raise ModelSourceError(
            f"{path.name!r} is a pickle checkpoint, which we refuse to load (it can run code): "
            "convert it to .safetensors or use the safetensors release of the model.")
    files = safetensors_files(path) if path.is_dir() else [path]
    state_dict = {}
    for file in files:
        if not file.is_file():
            raise ModelSourceError(f"Weights file {file.name!r} does not exist: check the path.")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():
                    tensor = handle.get_tensor(key)
                    state_dict[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except (OSError, ValueError, RuntimeError) as error:
            if isinstance(error, ModelSourceError):
                raise
            raise ModelSourceError(
                f"{file.name!r} is not a readable safetensors file ({error}): download it again.") from None
    return state_dict
