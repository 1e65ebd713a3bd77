"""Reading each model's checkpoint: the FramePack DiT (folder, or a single file with its config inferred from the
tensor shapes) and the transformers models (Llama, CLIP-L, SigLIP), through framepack_engine.runtime.sources."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from framepack_engine.errors import ModelSourceError
from framepack_engine.official import OFFICIAL_DIT_CONFIG
from framepack_engine.runtime.sources import (Checkpoint, check_finite, check_safetensors, iter_tensors,
                                              read_config, read_safetensors_metadata, read_tensors,
                                              read_tensors_keeping_quantized, resolve_component, weight_files,
                                              weight_shapes)
from framepack_engine.runtime.quanto import check_quantization_config


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


# Config entries a single file cannot show through its tensor shapes: the official FramePackI2V_HY values.
OFFICIAL_DIT_DEFAULTS = {key: OFFICIAL_DIT_CONFIG[key]
                         for key in ("_class_name", "qk_norm", "rope_theta", "rope_axes_dim", "attention_head_dim")}


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
    stored bytes instead (framepack_engine.runtime.quant's layout) and the result is (state dict, QuantScheme or None).
    """
    files = weight_files(path)
    dtype = dtype if dtype is not None else torch.bfloat16
    with Checkpoint(files) as checkpoint:
        rename = _dit_rename(checkpoint.keys())
        if keep_quantized:
            state_dict, scheme = read_tensors_keeping_quantized(checkpoint, dtype, rename)
        else:
            state_dict, scheme = read_tensors(checkpoint, dtype, rename), None
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


def _shape_of(shapes: dict, key: str, dims: int, name: str) -> tuple[int, ...]:
    """The shape of `key` (a tensor or a shape), checked to have `dims` dimensions: a key or shape a single file
    lacks is one line naming the file and what was expected, never a KeyError."""
    if key not in shapes:
        raise ModelSourceError(
            f"{name!r} has no {key!r}, which a FramePack DiT in the diffusers key layout holds: point at the FramePack "
            "transformer checkpoint, or give its config.json beside it in a folder.")
    value = shapes[key]
    shape = tuple(int(s) for s in (value.shape if hasattr(value, "shape") else value))
    if len(shape) != dims or not all(shape):
        raise ModelSourceError(
            f"{name!r} holds {key!r} of shape {shape}, where a FramePack DiT has a {dims}-D weight: point at the "
            "FramePack transformer checkpoint.")
    return shape


def infer_dit_config(state_dict: dict, name: str = "state dict") -> dict:
    """The packed DiT's config.json as far as tensor shapes tell it; the official values for the rest.

    Takes tensors or shapes by key (`name` is the file's, for messages). Heads come from the per-head q-norm width,
    layer counts from the block indices, the optional parts (clean_x_embedder, image_projection, guidance embedder)
    from the keys present.
    """
    keys = list(state_dict)
    _check_dit_keys(keys, name)

    def shape(key: str, dims: int = 2) -> tuple[int, ...]:
        return _shape_of(state_dict, key, dims, name)

    # (inner, in_channels, patch_t, patch, patch)
    inner_dim, in_channels, patch_size_t, patch_size = shape("x_embedder.proj.weight", 5)[:4]
    norm_key = "transformer_blocks.0.attn.norm_q.weight"
    head_dim = shape(norm_key, 1)[0] if norm_key in state_dict else OFFICIAL_DIT_DEFAULTS["attention_head_dim"]
    if inner_dim % head_dim:
        raise ModelSourceError(
            f"The DiT's width {inner_dim} is not a multiple of its head size {head_dim}: "
            "pass the checkpoint's config.json explicitly.")
    config = dict(OFFICIAL_DIT_DEFAULTS)
    config.update(
        in_channels=in_channels,
        out_channels=shape("proj_out.weight")[0] // (patch_size_t * patch_size * patch_size),
        num_attention_heads=inner_dim // head_dim,
        attention_head_dim=head_dim,
        num_layers=_block_count(keys, "transformer_blocks."),
        num_single_layers=_block_count(keys, "single_transformer_blocks."),
        num_refiner_layers=_block_count(keys, "context_embedder.token_refiner.refiner_blocks."),
        mlp_ratio=float(shape("transformer_blocks.0.ff.net.0.proj.weight")[0]) / inner_dim,
        patch_size=patch_size,
        patch_size_t=patch_size_t,
        guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state_dict,
        text_embed_dim=shape("context_embedder.proj_in.weight")[1],
        pooled_projection_dim=shape("time_text_embed.text_embedder.linear_1.weight")[1],
        has_image_proj="image_projection.up.weight" in state_dict,
        has_clean_x_embedder="clean_x_embedder.proj.weight" in state_dict,
    )
    if config["has_image_proj"]:
        config["image_proj_dim"] = shape("image_projection.up.weight")[1]
    else:
        config["image_proj_dim"] = OFFICIAL_DIT_CONFIG["image_proj_dim"]
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
    the config gains a "quantization" entry (framepack_engine.runtime.quant.QuantScheme.as_dict()).
    """
    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    if path.is_dir() and config is None:  # a method we do not read is refused before any weight is
        check_quantization_config(read_config(path), path.name)
    loaded = load_dit_state_dict(path, dtype, keep_quantized=keep_quantized)
    state_dict, scheme = loaded if keep_quantized else (loaded, None)
    if config is None:  # from the headers: a layer kept quantized no longer has its float weight's shape
        config = read_dit_config(path)
    config = dict(config)
    if scheme is not None:
        config["quantization"] = scheme.as_dict()
    return config, state_dict


def _dit_config(path: Path, state_dict) -> dict:
    """A folder's config.json (its quantization_config checked), a single file's embedded config, or the config
    inferred from its tensors (or their shapes)."""
    if path.is_dir():
        config = read_config(path)
        check_quantization_config(config, path.name)
        return config
    embedded = read_safetensors_metadata(path).get("config")
    if not embedded:
        return infer_dit_config(state_dict, path.name)
    try:
        config = json.loads(embedded)
    except ValueError:
        config = None
    if not isinstance(config, dict):
        raise ModelSourceError(f"{path.name!r} carries a \"config\" metadata entry that is not a JSON object: write "
                               "the file again, or give its config.json beside it in a folder.")
    return config


def read_dit_config(source, allow_download: bool | None = None, cache_dir=None) -> dict:
    """The DiT's config from a folder, a single file's metadata, or its tensor shapes (read from the header only;
    an optimum-quanto layer by the float weight it stands for)."""
    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    with Checkpoint(weight_files(path)) as checkpoint:
        shapes = weight_shapes(checkpoint, _dit_rename(checkpoint.keys()))
    return _dit_config(path, shapes)


@contextlib.contextmanager
def dit_source_shards(source, dtype: torch.dtype = DEFAULT_DTYPES["transformer"], allow_download=None,
                      cache_dir=None):
    """The weight files of a DiT source, for reading one at a time: a list of (file name, read) where read() yields
    (name, tensor) with the DiT's own keys, fp8 scales folded and floats cast to `dtype`. A pre-quantized checkpoint
    is refused: quantize from the full-precision one."""
    from framepack_engine.runtime.quant import METADATA_KEY

    path = resolve_component(source, "transformer", allow_download=allow_download, cache_dir=cache_dir)
    files = weight_files(path)
    with Checkpoint(files) as checkpoint:
        if METADATA_KEY in checkpoint.metadata:
            raise ModelSourceError(
                f"{Path(path).name!r} is already quantized ({checkpoint.metadata[METADATA_KEY]}): quantize from the "
                "full-precision (bf16) checkpoint instead.")
        rename = _dit_rename(checkpoint.keys())
        _check_dit_keys([name for key in checkpoint.keys() if (name := rename(key)) is not None], Path(path).name)
        yield [(file.name, lambda file=file: iter_tensors(checkpoint, dtype, rename, checkpoint.keys_of(file)))
               for file in files]


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
    model = model.to(device).eval().requires_grad_(False)
    for name, weight in model.named_parameters():  # on the device (buffers such as masks may hold -inf by design)
        check_finite(weight, name, f"The {what} in {folder.name!r}")
    return model


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


def guess_variant(transformer_source) -> str:
    """F1 and bidirectional checkpoints share one config; only the name tells them apart (FramePack_F1_I2V_HY...)."""
    name = Path(str(transformer_source)).name.lower().replace("-", "_")
    return "f1" if "f1" in name.split("_") or "_f1" in name else "bidirectional"
