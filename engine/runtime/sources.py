"""Model sources: resolve a source (repo id, folder, file) -> read its safetensors, memory-mapped.

Knows no model class: framepack_engine.models.checkpoints reads each model's weights through it, and
framepack_engine.loading assembles an Engine (resolve -> read -> transform -> place).


A source is one of
  - a Hugging Face repo id ("lllyasviel/FramePackI2V_HY"): found in the local HF cache; downloaded only when the
    network is allowed (no HF_HUB_OFFLINE, no `allow_download=False`), and then only the files the component needs;
  - a local folder in the diffusers / transformers layout: component subfolders (transformer/, text_encoder/,
    text_encoder_2/, tokenizer/, tokenizer_2/, vae/, feature_extractor/, image_encoder/) or, for the DiT, the model at
    the folder root (lllyasviel/FramePackI2V_HY keeps it there, hunyuanvideo-community/HunyuanVideo in transformer/);
  - a single `.safetensors` file for the DiT (ComfyUI-style): keys possibly prefixed (`model.diffusion_model.`,
    `diffusion_model.`), weights possibly fp8 with per-layer scales or in optimum-quanto's layout
    (framepack_engine.runtime.quanto), and no config (it is inferred from shapes).

A model folder holds `config.json` and either one `*.safetensors` file or several shards listed by a
`*.safetensors.index.json`. Pickle checkpoints are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import urllib.parse
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from framepack_engine.errors import ModelSourceError
from framepack_engine.runtime.host_memory import release_freed_host_memory
from framepack_kernels.reference import FP8_DTYPES, dequantize_reference, weight_format

# Weight files we refuse to read: unpickling can run code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# The folders of the diffusers / transformers layout, by component name.
COMPONENTS = (
    "transformer", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "feature_extractor",
    "image_encoder",
)


# Keys that describe a quantization rather than hold a weight.
_SCALED_FP8_MARKER = "scaled_fp8"
_WEIGHT_SCALE_SUFFIXES = (".scale_weight", ".weight_scale")
_DROPPED_SUFFIXES = (".scale_input", ".input_scale", ".comfy_quant")


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
        f"off (HF_HUB_OFFLINE or allow_download=False): run `hf download {repo_id}{include}` where the network "
        "is reachable, or allow downloads.")


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


def _connection_failure(error: BaseException) -> BaseException | None:
    """The failure to reach the Hub inside `error`: itself or an error in its cause chain that is an OSError
    (ConnectionError, a name that does not resolve, a refused connection, a proxy's socket error) or a TimeoutError.
    Classified by what the error is, never by the module its class lives in: HTTP clients come and go under
    huggingface_hub (requests, httpx, httpx2), their errors carry the socket's error as their cause."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (OSError, TimeoutError)):
            return error
        error = error.__cause__ or error.__context__
    return None


def _describe_failure(error: BaseException) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return f"HTTP {status} from the Hub"
    cause = _connection_failure(error) or error
    if isinstance(cause, socket.gaierror):
        return "the Hub's host name does not resolve: no DNS or no network"
    if isinstance(cause, ConnectionRefusedError):
        return "the connection was refused"
    if isinstance(cause, TimeoutError):
        return "the connection timed out"
    return f"{type(cause).__name__}: {str(cause).splitlines()[0][:120] if str(cause) else 'no network'}"


def _unreachable(repo_id: str, error: BaseException) -> ModelSourceError:
    return ModelSourceError(
        f"{repo_id!r} is not a local path, and Hugging Face could not be reached to download it "
        f"({_describe_failure(error)}): check the path if you meant a folder; otherwise run `hf download {repo_id}` "
        "where the network is reachable, then run with --offline (or HF_HUB_OFFLINE=1).")


def _check_hub_resolves(repo_id: str) -> None:
    """Fails at once when the Hub's host does not resolve (no DNS, no network), instead of after the HTTP client's
    retries."""
    from huggingface_hub import constants

    host = urllib.parse.urlparse(constants.ENDPOINT).hostname
    if not host:
        return
    try:
        socket.getaddrinfo(host, 443, type=socket.SOCK_STREAM)
    except OSError as error:  # socket.gaierror
        raise _unreachable(repo_id, error) from None


def _download(repo_id: str, folders: list[str], cache_dir, revision) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    _check_hub_resolves(repo_id)
    try:
        repo_files = HfApi().list_repo_files(repo_id, revision=revision)
        for folder in folders:
            wanted = files_to_fetch(repo_files, folder)
            if any(name.endswith((".json", ".safetensors", ".txt", ".model")) for name in wanted):
                return Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=wanted))
    except GatedRepoError:  # a subclass of RepositoryNotFoundError: catch it first
        raise ModelSourceError(
            f"{repo_id!r} is gated: accept its license on huggingface.co and log in with `hf auth login`."
        ) from None
    except RepositoryNotFoundError:
        raise ModelSourceError(
            f"Hugging Face has no repo {repo_id!r} (or it is private): check the repo id, or log in with "
            "`hf auth login` if it is private.") from None
    except Exception as error:
        if not isinstance(error, HfHubHTTPError) and _connection_failure(error) is None:
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


def weight_files(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_dir():
        return safetensors_files(path)
    _check_weights_file_name(path)
    if not path.is_file():
        raise ModelSourceError(f"Weights file {path.name!r} does not exist: check the path.")
    return [path]


_FINITE_CHECK_PIECE = 1 << 16  # elements: a 64 KiB mask at a time


def check_finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """`tensor`, or a ModelSourceError naming it when it holds NaN or an infinity (a damaged file, or weights saved
    from a diverged run would otherwise make a black video at exit 0). Run on every tensor as it is read, where it
    is (on the device when it is there), in small pieces; only a tensor that holds one is counted whole."""
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return tensor
    # In small pieces, each looked at in place: a float32 sum of a whole half-precision tensor converts it whole
    # first, and such layer-sized temporaries raise the anonymous memory that streaming from the mapped file avoids.
    if all(bool(torch.isfinite(part if part.element_size() > 1 else part.float()).all())  # fp8: no isfinite
           for part in tensor.reshape(-1).split(_FINITE_CHECK_PIECE)):
        return tensor
    bad = sum(int((~torch.isfinite(part.float())).sum()) for part in tensor.reshape(-1).split(1 << 24))
    if bad:
        raise ModelSourceError(
            f"{where}: the tensor {name!r} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} (of "
            f"{tensor.numel()}): the file is damaged or was saved from a training run that diverged; download it "
            "again or use another.")
    return tensor


def _unreadable(file: Path, error: Exception) -> ModelSourceError:
    return ModelSourceError(f"{file.name!r} is not a readable safetensors file ({error}): download it again.")


class Checkpoint:
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
        """The tensor `key`, memory-mapped; one holding NaN or an infinity is refused (check_finite)."""
        file, handle = self.handles[key]
        try:
            tensor = handle.get_tensor(key)
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise _unreadable(file, error) from None
        return check_finite(tensor, key, repr(file.name))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stack.close()


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (or of all files of a model folder, merged)."""
    with Checkpoint(weight_files(path)) as checkpoint:
        return dict(checkpoint.metadata)


def check_safetensors(path: str | Path) -> list[Path]:
    """Open every weight file of a folder (or one file) far enough to read its header; return the files.

    Run before handing a folder to transformers, so a truncated download gets our error and its fix.
    """
    files = weight_files(path)
    with Checkpoint(files):
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


def iter_tensors(checkpoint: Checkpoint, dtype: torch.dtype | None, rename=lambda key: key, keys=None):
    """(name, tensor) of the checkpoint's weights (of `keys` when given), renamed by `rename` (None drops a key),
    fp8 scales folded in when a dtype is asked for; the layers of a pre-quantized checkpoint (`framepack quantize`)
    come back dequantized then."""
    from framepack_engine.runtime import quanto
    from framepack_engine.runtime.quant import QuantScheme

    all_keys = checkpoint.keys()
    key_set = set(all_keys)
    if dtype is not None and quanto.is_quanto(all_keys):
        yield from _iter_quanto_dequantized(checkpoint, dtype, rename, all_keys if keys is None else keys)
        return
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


def _iter_quanto_dequantized(checkpoint: Checkpoint, dtype: torch.dtype, rename, keys):
    """An optimum-quanto checkpoint's weights with its quantized layers dequantized to `dtype` (one at a time)."""
    from framepack_engine.runtime import quanto

    layers = quanto.describe_layers(checkpoint)
    owner = {key: layer for layer in layers.values() for key in layer.keys}
    for key in keys:
        layer = owner.get(key)
        if layer is not None and key != layer.keys[0]:
            continue  # a scale, shift or activation scale: part of the weight its values key yields
        name = rename(key if layer is None else layer.name + ".weight")
        if name is None:
            continue
        if layer is not None:
            yield name, quanto.dequantized_weight(checkpoint, layer, dtype)
            continue
        tensor = checkpoint.get(key)
        yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def weight_shapes(checkpoint: Checkpoint, rename=lambda key: key) -> dict[str, tuple[int, ...]]:
    """Every weight's shape from the file headers (nothing read), renamed by `rename`: an optimum-quanto layer
    appears as the float weight it stands for."""
    from framepack_engine.runtime import quanto

    layers = quanto.describe_layers(checkpoint) if quanto.is_quanto(checkpoint.keys()) else {}
    hidden = {key for layer in layers.values() for key in layer.keys}
    shapes = {key: checkpoint.shape(key) for key in checkpoint.keys() if key not in hidden}
    shapes.update(quanto.weight_shapes(layers))
    return {name: shape for key, shape in shapes.items() if (name := rename(key)) is not None}


def _int4_in_features(checkpoint: Checkpoint, layer: str) -> int:
    """An int4 layer's input width is not in its padded storage: the checkpoint records it beside the layer."""
    from framepack_engine.runtime.quant import INT4_WIDTHS_KEY

    widths = json.loads(checkpoint.metadata.get(INT4_WIDTHS_KEY, "{}"))
    packed = checkpoint.shape(layer + ".weight")
    return widths.get(layer, 2 * packed[1])


def read_tensors(checkpoint: Checkpoint, dtype: torch.dtype | None, rename=lambda key: key) -> dict[str, torch.Tensor]:
    """All weights, renamed by `rename` (None drops a key), fp8 scales folded in when a dtype is asked for."""
    return dict(iter_tensors(checkpoint, dtype, rename))


def read_tensors_keeping_quantized(checkpoint: Checkpoint, dtype: torch.dtype, rename) -> tuple[dict, object]:
    """All weights renamed, quantized layers kept in their stored bytes (memory-mapped, never copied) and floats cast
    to `dtype`; returns (state dict, framepack_engine.runtime.quant.QuantScheme or None).

    A pre-quantized checkpoint of ours is taken as stored. In a community fp8 file (ComfyUI / kijai / musubi-tuner:
    e4m3 or e5m2 weights with a per-tensor or per-channel scale, or none), every 2-D fp8 weight becomes our fp8
    layout: the values as stored and a float32 scale per output channel; the scale keys, input scales and markers
    are dropped, and any other fp8 tensor is folded to `dtype` as before. (FramePackDiT.from_pretrained then folds
    the layers outside the blocks to `dtype` too: only the blocks' linears run quantized.)"""
    from framepack_engine.runtime import quanto
    from framepack_engine.runtime.quant import QuantScheme

    if quanto.is_quanto(checkpoint.keys()):
        return _read_quanto_keeping_quantized(checkpoint, dtype, rename)
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


def _read_quanto_keeping_quantized(checkpoint: Checkpoint, dtype: torch.dtype, rename) -> tuple[dict, object]:
    """An optimum-quanto checkpoint in our layouts, layer by layer (framepack_engine.runtime.quanto says what is
    converted and how exactly): int8 and fp8 values stay memory-mapped, 4-bit ones are repacked; a layer ours cannot
    hold is dequantized to `dtype`. The scheme names the format (and group size) most layers take; each layer's own
    is read off its storage when it is built (framepack_engine.runtime.quant.build_quantized_layers)."""
    from framepack_engine.runtime import quanto
    from framepack_engine.runtime.quant import QuantScheme

    layers = quanto.describe_layers(checkpoint)
    owner = {key: layer for layer in layers.values() for key in layer.keys}
    state_dict, formats = {}, []
    for key in checkpoint.keys():
        layer = owner.get(key)
        if layer is None:
            if (name := rename(key)) is not None:
                tensor = checkpoint.get(key)
                state_dict[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
            continue
        name = rename(layer.name + ".weight")
        if key != layer.keys[0] or name is None:
            continue
        stored = quanto.stored_tensors(checkpoint, layer)
        if stored is None:
            state_dict[name] = quanto.dequantized_weight(checkpoint, layer, dtype)
            continue
        for suffix, tensor in stored.items():
            state_dict[name[: -len("weight")] + suffix] = tensor
        formats.append((weight_format(stored["weight"]), quanto.int4_group_size(layer) if layer.packed else None))
        release_freed_host_memory()
    release_freed_host_memory()  # the repacking's per-layer temporaries, which glibc would keep
    if not formats:
        return state_dict, None
    return state_dict, QuantScheme(*max(set(formats), key=formats.count))


def load_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file or model folder, memory-mapped; cast to `dtype` when given.

    With a dtype, fp8 weights stored with per-layer scales (ComfyUI's scaled fp8) come back multiplied by their
    scales and the scale keys are dropped; without one, every tensor is returned as stored.
    """
    with Checkpoint(weight_files(path)) as checkpoint:
        return read_tensors(checkpoint, dtype)
