"""Loading models: resolve a source -> read its safetensors (memory-mapped) -> transform -> place on the device.

`load_engine` assembles an Engine in those stages; the transform stage (`transform_dit`) is where LoRA adapters and
weight quantization act on the DiT's state dict and modules, before anything is placed on the device.


A source is one of
  - a Hugging Face repo id ("lllyasviel/FramePackI2V_HY"): found in the local HF cache; downloaded only when the
    network is allowed (no HF_HUB_OFFLINE, no `allow_download=False`), and then only the files the component needs;
  - a local folder in the diffusers / transformers layout: component subfolders (transformer/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/, vae/, feature_extractor/, image_encoder/) or, for the DiT, the model at
    the folder root (lllyasviel/FramePackI2V_HY keeps it there, hunyuanvideo-community/HunyuanVideo in transformer/);
  - a single `.safetensors` file for the DiT (ComfyUI-style): keys possibly prefixed (`model.diffusion_model.`,
    `diffusion_model.`), weights possibly fp8 with per-layer scales, and no config (it is inferred from shapes).

A model folder holds `config.json` and either one `*.safetensors` file or several shards listed by a
`*.safetensors.index.json`. Pickle checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from engine.errors import FramePackWarning, ModelSourceError
from kernels.reference import FP8_DTYPES, dequantize_reference

# Weight files we refuse to read: unpickling can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The folders of the diffusers / transformers layout, by component name.
COMPONENTS = (
    "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "feature_extractor",
    "image_encoder",
)

# The official app's precisions: the DiT in bf16, the text encoders, the image encoder and the VAE in fp16.
DEFAULT_DTYPES = {
    "transformer": torch.bfloat16,
    "text_encoder": torch.float16,
    "text_encoder_2": torch.float16,
    "image_encoder": torch.float16,
    "vae": torch.float16,
}

# Prefixes single-file releases put before the DiT's own keys (ComfyUI's full-model and diffusion-model exports).
_DIT_KEY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
# Keys that describe a quantization rather than hold a weight.
_SCALED_FP8_MARKER = "scaled_fp8"
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")

# Config entries a single file cannot show through its tensor shapes: the official FramePackI2V_HY values.
OFFICIAL_DIT_DEFAULTS = {
    "_class_name": "HunyuanVideoTransformer3DModelPacked",
    "qk_norm": "rms_norm",
    "rope_theta": 256.0,
    "rope_axes_dim": [16, 56, 56],
    "attention_head_dim": 128,
}

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def _pickle_refusal(name: str) -> ModelSourceError:
    return ModelSourceError(
        f"{name!r} is a pickle checkpoint, which we refuse to load (it can run code): "
        "convert it to .safetensors or use the safetensors release of the model.")


# ----------------------------------------------------------------------------------------------------------------------
# Resolving sources


def downloads_allowed(allow_download: bool | None = None) -> bool:
    """An explicit choice wins; otherwise downloads are allowed unless HF_HUB_OFFLINE is set."""
    if allow_download is not None:
        return allow_download
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return False
    # huggingface_hub reads the variable once at import; honour that reading too.
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE


def is_repo_id(source: str | Path) -> bool:
    """'owner/name' that is not an existing path: how we tell a repo id from a folder. When 'owner' is an existing
    local folder, 'owner/name' is a mistyped path, not a repo id (it must not send the user to the network)."""
    text = str(source)
    path = Path(text).expanduser()
    return (bool(_REPO_ID.match(text)) and not path.exists() and not path.parent.is_dir()
            and not text.endswith((".safetensors", ".sft")))


def resolve_component(source: str | Path, component: str, allow_download: bool | None = None,
                      cache_dir: str | Path | None = None, revision: str | None = None) -> Path:
    """The folder (or, for the DiT, possibly the single file) that holds `component` of `source`.

    The DiT is found in `transformer/` or, as lllyasviel/FramePackI2V_HY keeps it, at the root of the source.
    """
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
    display = str(source)
    if is_repo_id(source):
        # The DiT may sit at the repo root; any other component lives in its own folder.
        candidates = [component, ""] if component == "transformer" else [component]
        root = _repo_snapshot(display, candidates, allow_download, cache_dir, revision)
    else:
        root = _existing_local_path(source)
    if root.is_file():
        if component != "transformer":
            raise ModelSourceError(
                f"{display!r} is a single file, but the {component} comes from a folder: "
                "point at a folder in the diffusers layout (or its Hugging Face repo id) instead.")
        return root
    if (root / component).is_dir():
        return root / component
    if component == "transformer":
        if _is_model_folder(root):
            return root
        raise _not_a_transformer(display, root)
    raise ModelSourceError(
        f"{display!r} has no {component!r} folder: point at a folder in the diffusers layout that holds it "
        f"(such as a download of hunyuanvideo-community/HunyuanVideo), or at its Hugging Face repo id.")


def _not_a_transformer(display: str, root: Path) -> ModelSourceError:
    """Why a folder given as the transformer holds none, in the words of what it does hold."""
    if (root / "model_index.json").is_file():
        return ModelSourceError(
            f"{display!r} is a diffusers pipeline folder without a FramePack transformer: give it as --base, and "
            "--transformer the FramePack checkpoint (e.g. lllyasviel/FramePackI2V_HY).")
    pickles = [p.name for p in root.iterdir() if p.suffix in PICKLE_SUFFIXES] if root.is_dir() else []
    if pickles and not any(root.glob("*.safetensors")):
        return _pickle_refusal(pickles[0])
    if any(root.glob("*.safetensors")):
        return ModelSourceError(f"{display!r} has weights but no config.json: download the complete folder, or "
                                "give the single .safetensors file itself.")
    return ModelSourceError(
        f"{display!r} holds no transformer (no config.json and .safetensors weights, no 'transformer' folder): "
        "point at the FramePack checkpoint folder or file.")


def _is_model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _existing_local_path(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelSourceError(
            f"{str(source)!r} does not exist: check the path, or give a Hugging Face repo id such as "
            "'lllyasviel/FramePackI2V_HY'.")
    if path.is_file():
        _check_weights_file_name(path)
    return path


def _check_weights_file_name(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise _pickle_refusal(path.name)
    if path.suffix == ".gguf":
        raise ModelSourceError(
            f"{path.name!r} is a GGUF file, which we do not read: use a .safetensors release of the model.")
    if path.suffix not in (".safetensors", ".sft"):  # .sft: the short name some releases use
        raise ModelSourceError(
            f"{path.name!r} is not a .safetensors file: give a .safetensors file or a model folder.")


def _not_cached(repo_id: str, folder: str) -> ModelSourceError:
    include = f" --include '{folder}/*'" if folder else ""
    wanted = f"{folder + '/' if folder else 'the model'} of {repo_id!r}"
    return ModelSourceError(
        f"{repo_id!r} is not a local path, and {wanted} is not in the local Hugging Face cache while downloads are "
        f"off (HF_HUB_OFFLINE or allow_download=False): run `huggingface-cli download {repo_id}{include}` where the "
        "network is reachable, or allow downloads.")


def _cached_snapshot(repo_id: str, cache_dir, revision) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError):
        return None
    except (NotADirectoryError, PermissionError, OSError) as error:
        raise ModelSourceError(
            f"The Hugging Face cache cannot be read ({type(error).__name__}: {error.strerror or error}): point "
            "HF_HOME (or HF_HUB_CACHE) at a readable folder.") from None


def _has_folder(root: Path, folder: str) -> bool:
    if folder == "":
        return (root / "config.json").is_file()
    return (root / folder).is_dir()


def _check_cache_folder(cache_dir) -> None:
    """The Hugging Face cache must be (or be creatable as) a folder: say so rather than blame the network."""
    from huggingface_hub import constants

    folder = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    existing = next((path for path in [folder, *folder.parents] if path.exists()), None)
    if existing is not None and not existing.is_dir():
        raise ModelSourceError(
            f"The Hugging Face cache cannot be read: {existing.name!r} on the way to it is a file, not a folder: point "
            "HF_HOME (or HF_HUB_CACHE) at a folder.")


def _repo_snapshot(repo_id: str, folders: list[str] | None, allow_download, cache_dir, revision) -> Path:
    """The snapshot folder of `repo_id` holding the first of `folders` it has ("" = a model at the repo root);
    with folders=None any snapshot will do, and a download fetches the files at the repo root."""
    _check_cache_folder(cache_dir)
    snapshot = _cached_snapshot(repo_id, cache_dir, revision)
    if snapshot is not None and (folders is None or any(_has_folder(snapshot, folder) for folder in folders)):
        return snapshot
    if not downloads_allowed(allow_download):
        raise _not_cached(repo_id, folders[0] if folders else "")
    return _download(repo_id, folders or [""], cache_dir, revision)


def files_to_fetch(repo_files: list[str], folder: str) -> list[str]:
    """The files of one folder of a repo ("" = the root, without subfolders) worth downloading.

    Pickle weights are left out: we never load them, and repos that ship both formats would double the download.
    """
    if folder:
        chosen = [name for name in repo_files if name.startswith(folder.rstrip("/") + "/")]
    else:
        chosen = [name for name in repo_files if "/" not in name]
    skipped = PICKLE_SUFFIXES + (".msgpack", ".h5", ".onnx", ".gguf", ".ot")
    return [name for name in chosen if not name.endswith(skipped)]


def _unreachable(repo_id: str, error: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"{repo_id!r} is not a local path, and downloading it from Hugging Face failed ({type(error).__name__}): "
        f"check the path if you meant a folder; otherwise check the network, or run `huggingface-cli download "
        f"{repo_id}` where the network is reachable and run with --offline.")


def _download(repo_id: str, folders: list[str], cache_dir, revision) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=revision)
        for folder in folders:
            wanted = files_to_fetch(repo_files, folder)
            if any(name.endswith((".json", ".safetensors", ".txt", ".model")) for name in wanted):
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=wanted))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: catch it first
        raise ModelSourceError(
            f"{repo_id!r} is gated: accept its license on huggingface.co and log in with `huggingface-cli login`."
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"Hugging Face has no repo {repo_id!r} (or it is private): check the repo id, or log in with "
            "`huggingface-cli login` if it is private.") from None
    except (HfHubHTTPError, OSError) as error:
        raise _unreachable(repo_id, error) from None
    except Exception as error:  # the HTTP client's own errors (httpx/requests ConnectError, timeouts, ...)
        if type(error).__module__.split(".")[0] not in ("httpx", "httpcore", "requests", "urllib3", "huggingface_hub"):
            raise
        raise _unreachable(repo_id, error) from None
    shown = folders[0] + "/" if folders[0] else "model files at its root"
    raise ModelSourceError(
        f"The repo {repo_id!r} has no {shown}: check that it is the repo this component comes from.")


# ----------------------------------------------------------------------------------------------------------------------
# Reading safetensors


def _read_json_object(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelSourceError(f"The {what} {path.name!r} in {path.parent.name!r} is not valid JSON ({error}): "
                               "download the model folder again.") from None
    if not isinstance(value, dict):
        raise ModelSourceError(f"The {what} {path.name!r} in {path.parent.name!r} holds a {type(value).__name__}, "
                               "not a JSON object: download the model folder again.")
    return value


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelSourceError(f"No config.json in {Path(folder).name!r}: point at the model folder that holds it.")
    return _read_json_object(path, "config")


def safetensors_files(folder: str | Path) -> list[Path]:
    """The weight files of a model folder, in shard order."""
    folder = Path(folder)
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = _read_json_object(indexes[0], "shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise ModelSourceError(f"The shard index {indexes[0].name!r} has no valid weight_map: "
                                   "download the model folder again.")
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelSourceError(
                f"Shard {missing[0]!r} listed in {indexes[0].name} is missing: download the complete folder again.")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES] if folder.is_dir() else []
    if pickles:
        raise _pickle_refusal(pickles[0].name)
    raise ModelSourceError(f"No .safetensors weights in {folder.name!r}: point at the model folder that holds them.")


def _weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return safetensors_files(path)
    _check_weights_file_name(path)
    if not path.is_file():
        raise ModelSourceError(f"Weights file {path.name!r} does not exist: check the path.")
    return [path]


def _unreadable(file: Path, error: Exception) -> ModelSourceError:
    return ModelSourceError(f"{file.name!r} is not a readable safetensors file ({error}): download it again.")


class _Checkpoint:
    """The tensors of one or several safetensors files, read by key from memory-mapped handles."""

    def __init__(self, files: list[Path]):
        self._stack = contextlib.ExitStack()
        self.handles = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            try:
                handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
            except (SafetensorError, OSError, ValueError, RuntimeError) as error:
                self._stack.close()
                raise _unreadable(file, error) from None
            self.metadata.update(handle.metadata() or {})
            for key in handle.keys():
                self.handles[key] = (file, handle)

    def keys(self) -> list[str]:
        return list(self.handles)

    def keys_of(self, file: Path) -> list[str]:
        return [key for key, (owner, _) in self.handles.items() if owner == file]

    def shape(self, key: str) -> tuple[int, ...]:
        """A tensor's shape from the file header, without reading it."""
        return tuple(self.handles[key][1].get_slice(key).get_shape())

    def get(self, key: str) -> torch.Tensor:
        file, handle = self.handles[key]
        try:
            return handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise _unreadable(file, error) from None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (or of all files of a model folder, merged)."""
    with _Checkpoint(_weight_files(path)) as checkpoint:
        return dict(checkpoint.metadata)


def check_safetensors(path: str | Path) -> list[Path]:
    """Open every weight file of a folder (or one file) far enough to read its header; return the files.

    Run before handing a folder to transformers, so a truncated download gets our error and its fix.
    """
    files = _weight_files(path)
    with _Checkpoint(files):
        pass
    return files


def _is_scaled(keys) -> bool:
    return any(key.endswith(_WEIGHT_SCALE_SUFFIXES) or key.rsplit(".", 1)[-1] == _SCALED_FP8_MARKER for key in keys)


def _apply_scale(weight: torch.Tensor, scale: torch.Tensor, key: str) -> torch.Tensor:
    """weight.float() * scale, with a per-tensor scale or one per output channel."""
    scale = scale.float()
    if scale.numel() == 1:
        return weight.float() * scale.reshape(())
    if scale.numel() == weight.shape[0]:
        return weight.float() * scale.reshape((-1,) + (1,) * (weight.ndim - 1))
    raise ModelSourceError(
        f"The fp8 scale of {key!r} has {scale.numel()} values for a weight of shape {tuple(weight.shape)}: "
        "use a checkpoint with per-tensor or per-output-channel scales.")


def _iter_tensors(checkpoint: _Checkpoint, dtype: torch.dtype | None, rename=lambda key: key, keys=None):
    """(name, tensor) of the checkpoint's weights (of `keys` when given), renamed by `rename` (None drops a key),
    fp8 scales folded in when a dtype is asked for; the layers of a pre-quantized checkpoint (`framepack quantize`)
    come back dequantized then."""
    from engine.quant import QuantScheme

    all_keys = checkpoint.keys()
    key_set = set(all_keys)
    ours = dtype is not None and QuantScheme.from_metadata(checkpoint.metadata) is not None
    fold_scales = dtype is not None and not ours and _is_scaled(all_keys)
    for key in all_keys if keys is None else keys:
        if ours and key.endswith((".weight_scale", ".weight_zero")):
            continue
        if fold_scales and (key.endswith(_WEIGHT_SCALE_SUFFIXES + _DROPPED_SUFFIXES)
                            or key.rsplit(".", 1)[-1] == _SCALED_FP8_MARKER):
            continue
        name = rename(key)
        if name is None:
            continue
        tensor = checkpoint.get(key)
        layer = key[: -len(".weight")]
        if ours and key.endswith(".weight") and layer + ".weight_scale" in key_set:
            zero = checkpoint.get(layer + ".weight_zero") if layer + ".weight_zero" in key_set else None
            in_features = None if zero is None else _int4_in_features(checkpoint, layer)
            tensor = dequantize_reference(tensor, checkpoint.get(layer + ".weight_scale"), zero, in_features)
        elif fold_scales and key.endswith(".weight"):
            scale_key = next((layer + s for s in _WEIGHT_SCALE_SUFFIXES if layer + s in key_set), None)
            if scale_key is not None:
                tensor = _apply_scale(tensor, checkpoint.get(scale_key), key)
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        yield name, tensor


def _int4_in_features(checkpoint: _Checkpoint, layer: str) -> int:
    """An int4 layer's input width is not in its padded storage: the checkpoint records it beside the layer."""
    from engine.quant import INT4_WIDTHS_KEY

    widths = json.loads(checkpoint.metadata.get(INT4_WIDTHS_KEY, "{}"))
    packed = checkpoint.shape(layer + ".weight")
    return widths.get(layer, 2 * packed[1])


def _read(checkpoint: _Checkpoint, dtype: torch.dtype | None, rename=lambda key: key) -> dict[str, torch.Tensor]:
    """All weights, renamed by `rename` (None drops a key), fp8 scales folded in when a dtype is asked for."""
    return dict(_iter_tensors(checkpoint, dtype, rename))


def _read_keeping_quantized(checkpoint: _Checkpoint, dtype: torch.dtype, rename) -> tuple[dict, object]:
    """All weights renamed, quantized layers kept in their stored bytes (memory-mapped, never copied) and floats cast
    to `dtype`; returns (state dict, engine.quant.QuantScheme or None).

    A pre-quantized checkpoint of ours is taken as stored. In a community fp8 file (ComfyUI / kijai / musubi-tuner:
    e4m3 or e5m2 weights with a per-tensor or per-channel scale, or none), every 2-D fp8 weight becomes our fp8
    layout: the values as stored and a float32 scale per output channel; the scale keys, input scales and markers
    are dropped, and any other fp8 tensor is folded to `dtype` as before. (FramePackDiT.from_pretrained then folds
    the layers outside the blocks to `dtype` too: only the blocks' linears run quantized.)"""
    from engine.quant import QuantScheme

    scheme = ours = QuantScheme.from_metadata(checkpoint.metadata)
    keys = checkpoint.keys()
    key_set = set(keys)
    state_dict = {}
    for key in keys:
        name = rename(key)
        if name is None:
            continue
        if ours is not None:
            tensor = checkpoint.get(key)
            stored = key.endswith((".weight_scale", ".weight_zero")) or tensor.dtype in FP8_DTYPES
            state_dict[name] = tensor if stored or not tensor.is_floating_point() else tensor.to(dtype)
            continue
        if key.endswith(_WEIGHT_SCALE_SUFFIXES + _DROPPED_SUFFIXES) or key.rsplit(".", 1)[-1] == _SCALED_FP8_MARKER:
            continue
        tensor = checkpoint.get(key)
        layer = key[: -len(".weight")]
        scale_key = next((layer + s for s in _WEIGHT_SCALE_SUFFIXES if layer + s in key_set), None)
        if tensor.dtype in FP8_DTYPES and tensor.ndim == 2 and key.endswith(".weight"):
            scale = checkpoint.get(scale_key).float() if scale_key else torch.ones(1)
            if scale.numel() not in (1, tensor.shape[0]):
                _apply_scale(tensor, scale, key)  # raises the error naming the layout
            state_dict[name] = tensor
            state_dict[name[: -len("weight")] + "weight_scale"] = scale.reshape(-1).expand(tensor.shape[0]).clone()
            scheme = scheme or QuantScheme("fp8", modulation=True)
            continue
        if scale_key is not None and key.endswith(".weight"):
            tensor = _apply_scale(tensor, checkpoint.get(scale_key), key)
        state_dict[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return state_dict, scheme


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or model folder, memory-mapped; cast to `dtype` when given.

    With a dtype, fp8 weights stored with per-layer scales (ComfyUI's scaled fp8) come back multiplied by their
    scales and the scale keys are dropped; without one, every tensor is returned as stored.
    """
    with _Checkpoint(_weight_files(path)) as checkpoint:
        return _read(checkpoint, dtype)


# ----------------------------------------------------------------------------------------------------------------------
# The DiT


def _dit_prefix(keys: list[str]) -> str:
    for prefix in _DIT_KEY_PREFIXES:
        if any(key.startswith(prefix) for key in keys):
            return prefix
    return ""


def _check_dit_keys(keys: list[str], name: str) -> None:
    if any(key.startswith("double_blocks.") for key in keys):
        raise ModelSourceError(
            f"{name!r} uses the original HunyuanVideo key names (double_blocks.*), not the FramePack DiT's: use a "
            "FramePack checkpoint in the diffusers key layout (lllyasviel/FramePackI2V_HY or its single-file exports).")
    if "x_embedder.proj.weight" not in keys or not any(key.startswith("transformer_blocks.") for key in keys):
        raise ModelSourceError(
            f"{name!r} does not hold a FramePack DiT (no x_embedder / transformer_blocks weights): "
            "point at the FramePack transformer checkpoint.")


def load_dit_state_dict(path: str | Path, dtype: torch.dtype | None = torch.bfloat16,
                        keep_quantized: bool = False):
    """A DiT checkpoint (folder or single file) with the checkpoint's diffusers-style keys, cast to `dtype`.

    Single-file prefixes (`model.diffusion_model.`, `diffusion_model.`) are stripped and keys outside them (a VAE or
    text encoder bundled in the same file) left out; fp8 weights are multiplied by their scales before the cast, and
    the layers of a pre-quantized checkpoint dequantized. With `keep_quantized`, quantized layers stay in their
    stored bytes instead (engine.quant's layout) and the result is (state dict, QuantScheme or None).
    """
    files = _weight_files(path)
    dtype = dtype if dtype is not None else torch.bfloat16
    with _Checkpoint(files) as checkpoint:
        rename = _dit_rename(checkpoint.keys())
        if keep_quantized:
            state_dict, scheme = _read_keeping_quantized(checkpoint, dtype, rename)
        else:
            state_dict, scheme = _read(checkpoint, dtype, rename), None
    _check_dit_keys(list(state_dict), Path(path).name)
    return (state_dict, scheme) if keep_quantized else state_dict


def _dit_rename(keys: list[str]):
    prefix = _dit_prefix(keys)

    def rename(key: str) -> str | None:
        if not prefix:
            return key
        return key[len(prefix):] if key.startswith(prefix) else None

    return rename


def _block_count(keys, prefix: str) -> int:
    indices = {int(key[len(prefix):].split(".", 1)[0]) for key in keys
               if key.startswith(prefix) and key[len(prefix):].split(".", 1)[0].isdigit()}
    return max(indices) + 1 if indices else 0


def infer_dit_config(state_dict: dict[str, torch.Tensor]) -> dict:
    """The packed DiT's config.json as far as tensor shapes tell it; the official values for the rest.

    Heads come from the per-head q-norm width, layer counts from the block indices, the optional parts
    (clean_x_embedder, image_projection, guidance embedder) from the keys present.
    """
    keys = list(state_dict)
    _check_dit_keys(keys, "state dict")
    patch_weight = state_dict["x_embedder.proj.weight"]  # (inner, in_channels, patch_t, patch, patch)
    inner_dim, in_channels, patch_size_t, patch_size = (int(s) for s in patch_weight.shape[:4])
    norm_key = "transformer_blocks.0.attn.norm_q.weight"
    head_dim = int(state_dict[norm_key].shape[0]) if norm_key in state_dict else OFFICIAL_DIT_DEFAULTS[
        "attention_head_dim"]
    if inner_dim % head_dim:
        raise ModelSourceError(
            f"The DiT's width {inner_dim} is not a multiple of its head size {head_dim}: "
            "pass the checkpoint's config.json explicitly.")
    config = dict(OFFICIAL_DIT_DEFAULTS)
    config.update(
        in_channels=in_channels,
        out_channels=int(state_dict["proj_out.weight"].shape[0]) // (patch_size_t * patch_size * patch_size),
        num_attention_heads=inner_dim // head_dim,
        attention_head_dim=head_dim,
        num_layers=_block_count(keys, "transformer_blocks."),
        num_single_layers=_block_count(keys, "single_transformer_blocks."),
        num_refiner_layers=_block_count(keys, "context_embedder.token_refiner.refiner_blocks."),
        mlp_ratio=float(state_dict["transformer_blocks.0.ff.net.0.proj.weight"].shape[0]) / inner_dim,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state_dict,
        text_embed_dim=int(state_dict["context_embedder.proj_in.weight"].shape[1]),
        pooled_projection_dim=int(state_dict["time_text_embed.text_embedder.linear_1.weight"].shape[1]),
        has_image_proj="image_projection.up.weight" in state_dict,
        has_clean_x_embedder="clean_x_embedder.proj.weight" in state_dict,
    )
    if config["has_image_proj"]:
        config["image_proj_dim"] = int(state_dict["image_projection.up.weight"].shape[1])
    else:
        config["image_proj_dim"] = 1152
    if head_dim != OFFICIAL_DIT_DEFAULTS["attention_head_dim"]:
        # No tensor holds the rotary split: keep the official proportions of (16, 56, 56) at 128 (an eighth for
        # time), rounded so every axis is even.
        time_dim = 2 * round(head_dim / 16)
        if (head_dim - time_dim) // 2 % 2:
            time_dim += 2
        space_dim = (head_dim - time_dim) // 2
        if time_dim + 2 * space_dim != head_dim or space_dim <= 0:
            raise ModelSourceError(
                f"A single-file DiT with head size {head_dim} has no known rotary split: pass its config "
                "(rope_axes_dim) explicitly.")
        config["rope_axes_dim"] = [time_dim, space_dim, space_dim]
    return config


def load_dit_checkpoint(source: str | Path, dtype: torch.dtype = DEFAULT_DTYPES["transformer"],
                        config: dict | None = None, allow_download: bool | None = None,
                        cache_dir: str | Path | None = None, keep_quantized: bool = False) -> tuple[dict, dict]:
    """(config, state_dict) of the FramePack DiT from a repo id, a folder or a single .safetensors file.

    A folder's config.json is used as it is; a single file's config comes from `config`, else from a JSON "config"
    entry in its metadata, else from `infer_dit_config`. The state dict has the checkpoint's diffusers-style keys.
    With `keep_quantized`, quantized layers (a pre-quantized checkpoint, or a community fp8 file) stay quantized and
    the config gains a "quantization" entry (engine.quant.QuantScheme.as_dict()).
    """
    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    loaded = load_dit_state_dict(path, dtype, keep_quantized=keep_quantized)
    state_dict, scheme = loaded if keep_quantized else (loaded, None)
    if config is None:
        config = _dit_config(path, state_dict)
    config = dict(config)
    if scheme is not None:
        config["quantization"] = scheme.as_dict()
    return config, state_dict


def _dit_config(path: Path, state_dict) -> dict:
    if path.is_dir():
        return read_config(path)
    embedded = read_safetensors_metadata(path).get("config")
    return json.loads(embedded) if embedded else infer_dit_config(state_dict)


def read_dit_config(source, allow_download: bool | None = None, cache_dir=None) -> dict:
    """The DiT's config from a folder, a single file's metadata, or its tensor shapes (read from the header only)."""
    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    with _Checkpoint(_weight_files(path)) as checkpoint:
        rename = _dit_rename(checkpoint.keys())
        shapes = {rename(key): torch.empty(checkpoint.shape(key), device="meta") for key in checkpoint.keys()
                  if rename(key) is not None}
    return _dit_config(path, shapes)


@contextlib.contextmanager
def dit_source_shards(source, dtype: torch.dtype = DEFAULT_DTYPES["transformer"], allow_download=None,
                      cache_dir=None):
    """The weight files of a DiT source, for reading one at a time: a list of (file name, read) where read() yields
    (name, tensor) with the DiT's own keys, fp8 scales folded and floats cast to `dtype`. A pre-quantized checkpoint
    is refused: quantize from the full-precision one."""
    from engine.quant import METADATA_KEY

    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    files = _weight_files(path)
    with _Checkpoint(files) as checkpoint:
        if METADATA_KEY in checkpoint.metadata:
            raise ModelSourceError(
                f"{Path(path).name!r} is already quantized ({checkpoint.metadata[METADATA_KEY]}): quantize from the "
                "full-precision (bf16) checkpoint instead.")
        rename = _dit_rename(checkpoint.keys())
        _check_dit_keys([name for key in checkpoint.keys() if (name := rename(key)) is not None], Path(path).name)
        yield [(file.name, lambda file=file: _iter_tensors(checkpoint, dtype, rename, checkpoint.keys_of(file)))
               for file in files]


# ----------------------------------------------------------------------------------------------------------------------
# The transformers models (text encoders, image encoder)


def _dtype_argument(dtype: torch.dtype | None) -> dict:
    import transformers

    dtype = "auto" if dtype is None else dtype  # None: as stored (tensors stay memory-mapped)
    # transformers renamed `torch_dtype` to `dtype` in 4.56; older releases only know the first.
    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _load_transformers_model(model_class, folder: Path, dtype: torch.dtype, device, what: str):
    check_safetensors(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"No config.json in the {what} folder {folder.name!r}: download the complete folder.")
    try:
        model = model_class.from_pretrained(
            folder, use_safetensors=True, local_files_only=True, **_dtype_argument(dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise ModelSourceError(
            f"The {what} in {folder.name!r} could not be loaded ({type(error).__name__}: {error}): "
            "download the complete folder again.") from None
    return model.to(device).eval().requires_grad_(False)


def _load_tokenizer(tokenizer_class, folder: Path, what: str):
    try:
        return tokenizer_class.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError, AttributeError) as error:
        raise ModelSourceError(
            f"The {what} in {folder.name!r} could not be loaded ({type(error).__name__}: {error}): "
            "download the complete folder again.") from None


def load_llama_text_encoder(source: str | Path, dtype: torch.dtype | None = DEFAULT_DTYPES["text_encoder"],
                            device: str | torch.device = "cpu", allow_download: bool | None = None,
                            cache_dir: str | Path | None = None):
    """(LlamaModel, tokenizer) from the text_encoder/ and tokenizer/ folders of `source`.

    The tokenizer is loaded exactly as its tokenizer.json defines it (PreTrainedTokenizerFast): transformers 5's
    LlamaTokenizerFast rebuilds Llama 3's byte-level tokenizer as a sentencepiece-style one and would split words
    differently than the official app did.
    """
    from transformers import LlamaModel, PreTrainedTokenizerFast

    model_folder = resolve_component(source, "text_encoder", allow_download, cache_dir)
    tokenizer_folder = resolve_component(source, "tokenizer", allow_download, cache_dir)
    model = _load_transformers_model(LlamaModel, model_folder, dtype, device, "Llama text encoder")
    if not (tokenizer_folder / "tokenizer.json").is_file():
        raise ModelSourceError(
            f"No tokenizer.json in {tokenizer_folder.name!r}: download the complete tokenizer folder.")
    tokenizer = _load_tokenizer(PreTrainedTokenizerFast, tokenizer_folder, "Llama tokenizer")
    return model, tokenizer


def load_clip_text_encoder(source: str | Path, dtype: torch.dtype | None = DEFAULT_DTYPES["text_encoder_2"],
                           device: str | torch.device = "cpu", allow_download: bool | None = None,
                           cache_dir: str | Path | None = None):
    """(CLIPTextModel, CLIPTokenizer) from the text_encoder_2/ and tokenizer_2/ folders of `source`."""
    from transformers import CLIPTextModel, CLIPTokenizer

    model_folder = resolve_component(source, "text_encoder_2", allow_download, cache_dir)
    tokenizer_folder = resolve_component(source, "tokenizer_2", allow_download, cache_dir)
    model = _load_transformers_model(CLIPTextModel, model_folder, dtype, device, "CLIP text encoder")
    tokenizer = _load_tokenizer(CLIPTokenizer, tokenizer_folder, "CLIP tokenizer")
    return model, tokenizer


def load_siglip_image_encoder(source: str | Path, dtype: torch.dtype | None = DEFAULT_DTYPES["image_encoder"],
                              device: str | torch.device = "cpu", allow_download: bool | None = None,
                              cache_dir: str | Path | None = None):
    """(SiglipImageProcessor, SiglipVisionModel) from the feature_extractor/ and image_encoder/ folders of `source`.

    The PIL-backed processor is preferred where transformers has both: it is the one the official app ran.
    """
    import transformers
    from transformers import SiglipVisionModel

    processor_class = getattr(transformers, "SiglipImageProcessorPil", None) or transformers.SiglipImageProcessor
    processor_folder = resolve_component(source, "feature_extractor", allow_download, cache_dir)
    model_folder = resolve_component(source, "image_encoder", allow_download, cache_dir)
    if not (processor_folder / "preprocessor_config.json").is_file():
        raise ModelSourceError(
            f"No preprocessor_config.json in {processor_folder.name!r}: "
            "download the complete feature_extractor folder.")
    processor = _load_tokenizer(processor_class, processor_folder, "SigLIP image processor")
    model = _load_transformers_model(SiglipVisionModel, model_folder, dtype, device, "SigLIP image encoder")
    return processor, model


# ----------------------------------------------------------------------------------------------------------------------
# Assembling an engine: resolve -> read -> transform -> place


def guess_variant(transformer_source) -> str:
    """F1 and bidirectional checkpoints share one config; only the name tells them apart (FramePack_F1_I2V_HY...)."""
    name = Path(str(transformer_source)).name.lower().replace("-", "_")
    return "f1" if "f1" in name.split("_") or "_f1" in name else "bidirectional"


def transform_dit(dit, settings):
    """The stage between reading the DiT's weights and placing it: where LoRA merging and quantization act on it
    (in place, while its weights are still on the host). Fused LoRAs merge into the float weights before they are
    quantized; live ones wrap the layers after, so they run beside the quantized base. Returns the LoraSet.

    `settings.quantize` quantizes the blocks' linears (layers a checkpoint already stores quantized in another format
    are dequantized and quantized again); without it a quantized checkpoint stays as it is. Quantized layers use the
    Triton dequantizing matmul when fused kernels are on. Over quantized weights the LoraSet's default mode is live."""
    from engine.lora import LoraSet
    from engine.quant import QuantScheme, layers_to_quantize, quantize_dit, quantized_layers, set_quantized_kernels

    lora_mode = settings.lora_mode
    if lora_mode == "fused" and settings.lora and quantized_layers(dit):
        # A checkpoint stored quantized (community fp8, `framepack quantize`) has no float weights to merge into.
        warnings.warn(FramePackWarning(
            "The transformer's weights are stored quantized, so the LoRAs run live beside them (lora_mode='live') "
            "instead of being merged: load the bf16 checkpoint to merge them."), stacklevel=2)
        lora_mode = "live"
    loras = LoraSet(dit, default_mode=lora_mode)
    if lora_mode == "fused":  # into the float weights, before any quantization
        for path, strength in settings.lora or ():
            loras.load(path, strength)
    if settings.quantize is not None:
        scheme = QuantScheme(settings.quantize)
        if layers_to_quantize(dit, scheme):  # a checkpoint stored in this format keeps its memory-mapped layers
            loras.release_originals()  # quantized layers cannot take the originals back
            quantize_dit(dit, scheme)
    if quantized_layers(dit) and loras.default_mode == "fused":
        # The LoRAs loaded from now on (Engine.load_lora) have no float weights to merge into: they run live.
        loras.default_mode = "live"
    set_quantized_kernels(dit, settings.fused_kernels)
    if lora_mode == "live":  # around the layers as they will run, quantized or not
        for path, strength in settings.lora or ():
            loras.load(path, strength)
    return loras


def transform_text_encoder(text_encoder, settings) -> None:
    """`settings.quantize` quantizes the Llama text encoder's linears too (CLIP-L is small and stays as it is)."""
    from engine.quant import QuantScheme, quantize_llama

    if settings.quantize is not None and text_encoder.llama_model is not None:
        quantize_llama(text_encoder.llama_model, QuantScheme(settings.quantize))


def place_models(settings, device: torch.device, dit, text_encoder=None, image_encoder=None, vae=None,
                 encoder_dtype: torch.dtype | None = None):
    """The "place" stage: one memory plan (engine.memory) for every model, from `vram_budget_gb` or the free device
    memory minus `memory_margin_gb`, applied: what stays on the device, what streams, what visits in turn."""
    from engine.memory import Placement, device_budget_bytes, engine_footprint, host_available_bytes, plan_memory

    footprint = engine_footprint(dit, text_encoder, image_encoder, vae, encoder_dtype)
    budget = device_budget_bytes(device, settings.vram_budget_gb, settings.memory_margin_gb)
    host_ram = host_available_bytes()
    plan = plan_memory(footprint, budget, device=device.type, host_ram_bytes=host_ram)
    return Placement(plan, device, dit, text_encoder, image_encoder, vae, encoder_dtype, footprint, host_ram)


def load_engine(engine_class, settings, *, allow_download: bool | None = None, cache_dir=None,
                release_encoders: bool = False):
    """An Engine from checked engine.settings.ModelSettings: each component resolved (repo id through the HF cache,
    folder or single file), read from memory-mapped safetensors onto the host, transformed, then placed on the
    device as the memory plan says (a streamed block is never copied whole onto the device or into host RAM)."""
    from engine.conditioning import ImageEncoder, TextEncoder
    from engine.dit import FramePackDiT
    from engine.vae import HunyuanVideoVAE

    if allow_download is None and settings.offline:
        allow_download = False
    variant = guess_variant(settings.transformer) if settings.variant == "auto" else settings.variant
    device = torch.device(settings.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, settings.dtype)
    # Half-precision encoders as the official app, except on a CPU, where float16 kernels are slow or missing.
    encoder_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["text_encoder"]
    vae_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["vae"]

    if settings.fp8_compute:
        from engine.quant import check_fp8_compute_device

        check_fp8_compute_device(device)
    dit = FramePackDiT.from_pretrained(settings.transformer, dtype=dtype, device="cpu",
                                       allow_download=allow_download, cache_dir=cache_dir).eval()
    loras = transform_dit(dit, settings)
    if settings.fp8_compute:
        from engine.quant import set_fp8_compute

        set_fp8_compute(dit, True)
    dit.set_output_precision(float32=True)  # the official app's high-quality float32 output projection
    vae = HunyuanVideoVAE.from_pretrained(
        resolve_component(settings.base, "vae", allow_download=allow_download, cache_dir=cache_dir), dtype=vae_dtype,
        device="cpu")
    # The encoders are read as stored (memory-mapped) and quantized there if asked; they take encoder_dtype when
    # they move onto the device (quantized storage keeps its own).
    text_encoder = TextEncoder.from_pretrained(settings.base, device="cpu", dtype=None,
                                               allow_download=allow_download, cache_dir=cache_dir)
    if settings.quantize:
        transform_text_encoder(text_encoder, settings)
    images = ImageEncoder.from_pretrained(settings.image_encoder, device="cpu", dtype=None,
                                          allow_download=allow_download, cache_dir=cache_dir)
    placement = place_models(settings, device, dit, text_encoder, images, vae, encoder_dtype)
    dit.set_attention_backend(settings.attention)
    dit.set_fused_kernels(settings.fused_kernels)
    return engine_class(dit, vae, text_encoder, images, variant=variant, device=device, dtype=dtype,
                        name=str(Path(str(settings.transformer)).name), release_encoders=release_encoders,
                        loras=loras, placement=placement)
