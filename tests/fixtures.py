"""Tiny random checkpoints written in exactly the layouts users download, so loading is tested without a model hub.

Four sources, each as its Hugging Face repository lays it out:
  lllyasviel/FramePackI2V_HY           the packed DiT at the folder root: config.json + sharded safetensors + index
  hunyuanvideo-community/HunyuanVideo  text_encoder/ (Llama), tokenizer/ (tokenizer.json), text_encoder_2/ (CLIP-L),
                                       tokenizer_2/ (vocab.json + merges.txt), vae/
  lllyasviel/flux_redux_bfl            feature_extractor/ (SigLIP image processor), image_encoder/ (SigLIP vision)
  single-file DiT                      ComfyUI-style .safetensors: bf16, or fp8 with per-layer scales and a key prefix
plus `place_in_hf_cache`, which files a folder under a repo id in a Hugging Face cache layout.

The writers are plain functions; the session-scoped pytest fixtures at the bottom call them once per test session.
Use them with `from tests.fixtures import <fixture name>` in a test module, or `pytest_plugins = ["tests.fixtures"]`.
diffusers and transformers build the weights here: they are the oracles, never imported by engine/.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from framepack_engine.models.presets import randomize_weights_
from tests.utils import CHECKPOINT_DIT_CONFIG

# The HunyuanVideo prompt template's special tokens, in the ids order of Llama 3's tokenizer.
LLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<pad>",
]
# Llama 3's pre-tokenizer split: byte-level BPE applied to these pieces.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Words the tiny tokenizers learn merges for: the template's words and the prompts the tests use.
TOKENIZER_CORPUS = [
    "Describe the video by detailing the following aspects: 1. The main content and theme of the video.",
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects.",
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects.",
    "4. background environment, light, style and atmosphere.",
    "5. camera angles, movements, and transitions used in the video:",
    "system user assistant",
    "a cat walks on the grass, the camera pans left. a girl dances gracefully, clearly, with nice motion.",
    "ugly, blurry, low quality, static picture, a dog runs in the snow at night under the moon",
]

TINY_DIT_CONFIG = CHECKPOINT_DIT_CONFIG

TINY_LLAMA_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.2,
)
TINY_CLIP_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77,
    projection_dim=32, hidden_act="quick_gelu", initializer_range=0.2, initializer_factor=1.0,
    # eos 2 is CLIP-L's legacy setting: the pooled token is the one with the largest id (<|endoftext|>).
    bos_token_id=0, eos_token_id=2,
)
TINY_SIGLIP_CONFIG = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_channels=3, image_size=32,
    patch_size=8,
)
TINY_SIGLIP_PROCESSOR = {
    "do_convert_rgb": None,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "SiglipImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 32, "width": 32},
}
TINY_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
    norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4, mid_block_add_attention=True,
)


def _scale_weights_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Random weights large enough that every layer changes the output (default inits are near-identity)."""
    randomize_weights_(module, generator, scale=1.0, norm_spread=0.1, bias_scale=0.05)


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizers


def write_llama_tokenizer(folder: Path) -> Path:
    """A byte-level BPE tokenizer built like Llama 3's, saved as hunyuanvideo-community/HunyuanVideo's tokenizer/."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=LLAMA_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tokenizer.train_from_iterator(TOKENIZER_CORPUS * 4, trainer)
    begin = tokenizer.token_to_id("<|begin_of_text|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", begin)])

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    special = {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<pad>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": True, "legacy": True,
        "model_input_names": ["input_ids", "attention_mask"], "model_max_length": 1000000000000000019884624838656,
        "padding_side": "right", "tokenizer_class": "LlamaTokenizer", **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-printable-character table (a fixed public convention of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, [chr(c) for c in characters]))


def write_clip_tokenizer(folder: Path) -> Path:
    """A CLIP BPE vocabulary saved as the tokenizer_2/ folder (vocab.json + merges.txt, as the real one).

    The byte alphabet with and without the end-of-word mark </w>, merges that build the corpus words left to right,
    and the two special tokens last, so <|endoftext|> has the largest id as in CLIP.
    """
    import re

    alphabet = list(_bytes_to_unicode().values())
    vocab_tokens = alphabet + [character + "</w>" for character in alphabet]
    merges = []
    words = sorted({w for line in TOKENIZER_CORPUS for w in re.findall(r"[a-z]+", line.lower())})
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = (pieces[0], pieces[1])
            merged = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
            if merged not in vocab_tokens:
                vocab_tokens.append(merged)
            pieces = [merged] + pieces[2:]
    vocab_tokens += ["<|startoftext|>", "<|endoftext|>"]  # last, as in CLIP: <|endoftext|> has the largest id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab_tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {"do_lower_case": True, "errors": "replace", "model_max_length": 77, "tokenizer_class": "CLIPTokenizer",
              **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Whole repositories


def write_hunyuan_video_base(folder: Path, seed: int = 0) -> Path:
    """hunyuanvideo-community/HunyuanVideo without its transformer: text encoders, tokenizers and VAE."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    generator = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    llama_tokenizer_folder = write_llama_tokenizer(folder / "tokenizer")
    clip_tokenizer_folder = write_clip_tokenizer(folder / "tokenizer_2")

    llama_vocab = json.loads((llama_tokenizer_folder / "tokenizer.json").read_text())["model"]["vocab"]
    llama_config = LlamaConfig(
        vocab_size=len(llama_vocab), bos_token_id=llama_vocab["<|begin_of_text|>"],
        eos_token_id=llama_vocab["<|end_of_text|>"], pad_token_id=llama_vocab["<pad>"], **TINY_LLAMA_CONFIG)
    llama = LlamaModel(llama_config)
    _scale_weights_(llama, generator)
    llama.save_pretrained(folder / "text_encoder", safe_serialization=True)

    clip_vocab = json.loads((clip_tokenizer_folder / "vocab.json").read_text())
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_vocab), **TINY_CLIP_CONFIG))
    _scale_weights_(clip, generator)
    clip.save_pretrained(folder / "text_encoder_2", safe_serialization=True)

    write_tiny_vae(folder / "vae", seed=seed)
    model_index = {
        "_class_name": "HunyuanVideoPipeline", "_diffusers_version": "0.32.0.dev0",
        "text_encoder": ["transformers", "LlamaModel"], "text_encoder_2": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "LlamaTokenizerFast"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder


def write_tiny_vae(folder: Path, seed: int = 0) -> Path:
    """The vae/ folder: diffusers' AutoencoderKLHunyuanVideo at a tiny width, fp16 weights like the release."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    vae = AutoencoderKLHunyuanVideo(**TINY_VAE_CONFIG)
    vae.to(torch.float16).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def write_flux_redux(folder: Path, seed: int = 0) -> Path:
    """lllyasviel/flux_redux_bfl: feature_extractor/ (SigLIP image processor) and image_encoder/ (SigLIP vision)."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    generator = torch.Generator().manual_seed(seed)
    folder = Path(folder)
    (folder / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (folder / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(TINY_SIGLIP_PROCESSOR, indent=2))
    model = SiglipVisionModel(SiglipVisionConfig(**TINY_SIGLIP_CONFIG))
    _scale_weights_(model, generator)
    model.save_pretrained(folder / "image_encoder", safe_serialization=True)
    return folder


def tiny_dit_model(config: dict | None = None, seed: int = 0):
    """diffusers' port of the packed DiT built from an official-style config (the oracle for keys and shapes)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    config = dict(TINY_DIT_CONFIG if config is None else config)
    kwargs = {key: value for key, value in config.items() if not key.startswith("_")}
    kwargs["rope_axes_dim"] = tuple(kwargs["rope_axes_dim"])
    torch.manual_seed(seed)
    model = HunyuanVideoFramepackTransformer3DModel(**kwargs)
    _scale_weights_(model, torch.Generator().manual_seed(seed))
    return model


def write_framepack_transformer(folder: Path, config: dict | None = None, seed: int = 0,
                               max_shard_size: str = "500KB") -> Path:
    """lllyasviel/FramePackI2V_HY: the DiT at the folder root, bf16 shards plus an index, the official config.json."""
    config = dict(TINY_DIT_CONFIG if config is None else config)
    model = tiny_dit_model(config, seed=seed).to(torch.bfloat16)
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=max_shard_size)
    # The official config is the packed class's: its own class name and no diffusers-only keys.
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return folder


# ----------------------------------------------------------------------------------------------------------------------
# Single files


def quantize_fp8_per_tensor(weight: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's scaled fp8: weight ~= stored.float() * scale with one float32 scale per tensor (amax to fp8 max)."""
    scale = weight.float().abs().max().clamp_min(1e-12) / torch.finfo(fp8_dtype).max
    stored = (weight.float() / scale).to(fp8_dtype)
    return stored, scale.reshape(1).float()


def is_quantized_layer(key: str, tensor: torch.Tensor) -> bool:
    # Scaled-fp8 releases quantize the big matmul weights of the blocks and keep embedders, norms and biases in bf16.
    in_blocks = key.startswith(("transformer_blocks.", "single_transformer_blocks.", "context_embedder.token_refiner."))
    return in_blocks and key.endswith(".weight") and tensor.ndim == 2


def write_single_file_dit(path: Path, state_dict: dict[str, torch.Tensor], fp8: torch.dtype | None = None,
                          scaled: bool = True, prefix: str = "", scale_style: str = "scale_weight",
                          metadata: dict | None = None) -> Path:
    """A ComfyUI-style single .safetensors DiT.

    fp8=None writes the tensors as they are (bf16 releases). With fp8 (torch.float8_e4m3fn / float8_e5m2) the block
    weights are stored in fp8; `scaled` adds per-layer scales: scale_style "scale_weight" is ComfyUI's older
    convention (`<prefix>scaled_fp8` marker whose dtype names the format, `<layer>.scale_weight`, and a unit
    `<layer>.scale_input`), "weight_scale" the newer one (`<layer>.weight_scale` plus `_quantization_metadata`).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers = {}
    for key, tensor in state_dict.items():
        if fp8 is not None and is_quantized_layer(key, tensor):
            layer = key[: -len(".weight")]
            if scaled:
                stored, scale = quantize_fp8_per_tensor(tensor, fp8)
                tensors[prefix + key] = stored
                if scale_style == "scale_weight":
                    tensors[prefix + layer + ".scale_weight"] = scale
                    tensors[prefix + layer + ".scale_input"] = torch.ones(1)
                else:
                    tensors[prefix + layer + ".weight_scale"] = scale.reshape(())
                    layers[prefix + layer] = {"format": str(fp8).removeprefix("torch.")}
            else:
                tensors[prefix + key] = tensor.to(fp8)
        else:
            tensors[prefix + key] = tensor.contiguous()
    metadata = dict(metadata or {})
    if fp8 is not None and scaled:
        if scale_style == "scale_weight":
            tensors[prefix + "scaled_fp8"] = torch.zeros(0, dtype=fp8)
        else:
            metadata["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata or None)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Hugging Face cache


def place_in_hf_cache(folder: Path, repo_id: str, cache_dir: Path) -> Path:
    """File `folder` under `repo_id` in a Hugging Face hub cache (models--owner--name/snapshots/<hash>, refs/main).

    Returns the snapshot folder. huggingface_hub finds it offline through refs/main, as it finds a real download.
    """
    owner, name = repo_id.split("/")
    repo_folder = Path(cache_dir) / f"models--{owner}--{name}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo_folder / "snapshots" / commit
    if snapshot.exists():
        shutil.rmtree(snapshot)
    shutil.copytree(folder, snapshot)
    (repo_folder / "refs").mkdir(parents=True, exist_ok=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


# ----------------------------------------------------------------------------------------------------------------------
# pytest fixtures (session scope: each is written once per test session)


@pytest.fixture(scope="session")
def framepack_transformer_folder(tmp_path_factory) -> Path:
    """lllyasviel/FramePackI2V_HY layout with TINY_DIT_CONFIG (bf16 shards at the root)."""
    return write_framepack_transformer(tmp_path_factory.mktemp("FramePackI2V_HY"))


@pytest.fixture(scope="session")
def hunyuan_video_base_folder(tmp_path_factory) -> Path:
    """hunyuanvideo-community/HunyuanVideo layout: text_encoder, tokenizer, text_encoder_2, tokenizer_2, vae."""
    return write_hunyuan_video_base(tmp_path_factory.mktemp("HunyuanVideo"))


@pytest.fixture(scope="session")
def flux_redux_folder(tmp_path_factory) -> Path:
    """lllyasviel/flux_redux_bfl layout: feature_extractor and image_encoder."""
    return write_flux_redux(tmp_path_factory.mktemp("flux_redux_bfl"))


@pytest.fixture(scope="session")
def single_file_dit_bf16(tmp_path_factory) -> Path:
    """The tiny DiT as one bf16 .safetensors file with the checkpoint's own keys (Kijai's FramePackI2V_HY_bf16)."""
    state_dict = tiny_dit_model().to(torch.bfloat16).state_dict()
    return write_single_file_dit(tmp_path_factory.mktemp("single_file") / "FramePackI2V_HY_bf16.safetensors",
                                 state_dict)


@pytest.fixture(scope="session")
def single_file_dit_fp8_scaled(tmp_path_factory) -> Path:
    """The same weights as single_file_dit_bf16, block weights in float8_e4m3fn with ComfyUI scales, keys prefixed
    `model.diffusion_model.`."""
    state_dict = tiny_dit_model().to(torch.bfloat16).state_dict()
    return write_single_file_dit(
        tmp_path_factory.mktemp("single_file") / "FramePackI2V_HY_fp8_e4m3fn_scaled.safetensors", state_dict,
        fp8=torch.float8_e4m3fn, scaled=True, prefix="model.diffusion_model.")


@pytest.fixture(scope="session")
def hf_cache_dir(tmp_path_factory, framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder) -> Path:
    """A Hugging Face hub cache holding the three tiny repositories under their real repo ids."""
    cache_dir = tmp_path_factory.mktemp("hf_cache")
    place_in_hf_cache(framepack_transformer_folder, "lllyasviel/FramePackI2V_HY", cache_dir)
    place_in_hf_cache(hunyuan_video_base_folder, "hunyuanvideo-community/HunyuanVideo", cache_dir)
    place_in_hf_cache(flux_redux_folder, "lllyasviel/flux_redux_bfl", cache_dir)
    return cache_dir
