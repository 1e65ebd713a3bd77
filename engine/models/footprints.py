"""What each model needs, as plain numbers the planner reads (framepack_engine.runtime.planner knows no model class).

A `Footprint` holds each model's bytes (counted from its tensors, so quantized weights count as stored) and
`section_work`, which sizes one section of a request: the DiT's packed tokens and activations, and the VAE decode's
smallest working set. The official models' footprint is sized on the meta device (nothing is allocated).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass

import torch

from framepack_engine.runtime.devices import default_device
from framepack_engine.models.buckets import find_nearest_bucket
from framepack_engine.models.dit import DiTConfig
from framepack_engine.models.flops import PackedSequence, section_packed_sequence
from framepack_engine.official import (OFFICIAL_CLIP, OFFICIAL_LLAMA, OFFICIAL_SIGLIP, PROMPT_TEMPLATE_TOKENS,
                                       PROMPT_TOKEN_LIMIT, SIGLIP_IMAGE_TOKENS, VAE_SPATIAL_COMPRESSION)
from framepack_engine.runtime.host_memory import host_available_bytes
from framepack_engine.runtime.offload import slot_bytes, tensor_bytes
from framepack_engine.runtime.planner import (Component, Footprint, MemoryPlan, SectionWork, device_budget_bytes, plan_memory)

# The DiT's working set per packed token, fitted to the peak of live tensors measured (torch profiler, CPU) over
# several widths, MLP ratios and dtypes and rounded up (tests/test_memory.py keeps the fit honest): this many hidden
# vectors in the model's dtype besides one MLP vector, this many in float32 (norm and rotary temporaries), and this
# many float32 rotary tables per latent token.
ACTIVATION_HIDDEN_VECTORS = 6.5
ACTIVATION_FLOAT32_VECTORS = 6.0
ACTIVATION_ROTARY_TABLES = 2.5


def transformer_activation_bytes(tokens: int, hidden: int, intermediate: int, heads: int, kept_states: int,
                                 element_size: int) -> int:
    """An encoder's working set: the hidden states it returns, float32 temporaries of a layer, attention scores."""
    return (tokens * hidden * element_size * kept_states + tokens * (4 * hidden + 3 * intermediate) * 4
            + heads * tokens * tokens * 4)


def tensor_bytes_of(modules, dtype: torch.dtype | None = None) -> int:
    return sum(tensor_bytes(module, dtype) for module in modules)


def dit_footprint(dit, dtype: torch.dtype | None = None) -> tuple[Component, DiTConfig, int]:
    """The DiT's bytes from its tensors: the resident part (everything outside the blocks) and each block."""
    blocks, kept = dit.blocks, dit.modules_used_outside_blocks()  # kept: resident parts of the blocks
    component = Component("transformer", tensor_bytes(dit, dtype, skip=blocks) + tensor_bytes_of(kept, dtype),
                          tuple(tensor_bytes(block, dtype, skip=kept) for block in blocks),
                          block_slot_bytes=tuple(slot_bytes(block, dtype, kept) for block in blocks))
    return component, dit.config, (dtype or dit.compute_dtype).itemsize


def text_encoder_footprint(llama, clip, dtype: torch.dtype | None, prompt_tokens: int) -> Component:
    """Llama (its layers stream) and CLIP-L (moves whole): the part that stays while encoding is Llama's embedding
    and norm plus all of CLIP."""
    config = llama.config
    element_size = (dtype or next(llama.parameters()).dtype).itemsize
    activation = transformer_activation_bytes(prompt_tokens, config.hidden_size, config.intermediate_size,
                                              config.num_attention_heads, config.num_hidden_layers + 1, element_size)
    clip_bytes = tensor_bytes(clip, dtype) if clip is not None else 0
    return Component("text_encoder", tensor_bytes(llama, dtype, skip=[llama.layers]) + clip_bytes,
                     tuple(tensor_bytes(layer, dtype) for layer in llama.layers), activation,
                     tuple(slot_bytes(layer, dtype) for layer in llama.layers))


def image_encoder_footprint(model, dtype: torch.dtype | None) -> Component:
    config = model.config
    element_size = (dtype or next(model.parameters()).dtype).itemsize
    tokens = (config.image_size // config.patch_size) ** 2
    return Component("image_encoder", tensor_bytes(model, dtype), (),
                     transformer_activation_bytes(tokens, config.hidden_size, config.intermediate_size,
                                                  config.num_attention_heads, 2, element_size))


def engine_footprint(dit, text_encoder=None, image_encoder=None, vae=None,
                     encoder_dtype: torch.dtype | None = None) -> Footprint:
    """The footprint of loaded models (a FramePackDiT, and any of conditioning's TextEncoder / ImageEncoder and the
    HunyuanVideoVAE)."""
    component, config, element_size = dit_footprint(dit)
    text = image = vae_component = None
    if text_encoder is not None and getattr(text_encoder, "llama_model", None) is not None:
        prompt_tokens = text_encoder.max_prompt_tokens + text_encoder.crop_start
        text = text_encoder_footprint(text_encoder.llama_model, text_encoder.clip_model, encoder_dtype, prompt_tokens)
    if image_encoder is not None and getattr(image_encoder, "model", None) is not None:
        image = image_encoder_footprint(image_encoder.model, encoder_dtype)
    if vae is not None:
        vae_component = Component("vae", tensor_bytes(vae))
    return Footprint(component, DiTSectionWork(config, element_size, vae), text, image, vae_component)


@functools.lru_cache(maxsize=4)
def official_footprint(dtype: torch.dtype = torch.bfloat16, encoder_dtype: torch.dtype = torch.float16,
                       vae_dtype: torch.dtype = torch.float16) -> Footprint:
    """The official FramePack models (13B DiT, 8B Llama, CLIP-L, SigLIP so400m, HunyuanVideo VAE), sized from
    their configurations on the meta device: nothing is allocated."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, \
        SiglipVisionModel

    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.models.presets import FULL_DIT_CONFIG
    from framepack_engine.models.vae import HunyuanVideoVAE

    dit = FramePackDiT.from_config(FULL_DIT_CONFIG, device="meta", dtype=dtype)
    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig(**OFFICIAL_LLAMA))
        clip = CLIPTextModel(CLIPTextConfig(**OFFICIAL_CLIP))
        siglip = SiglipVisionModel(SiglipVisionConfig(**OFFICIAL_SIGLIP))
    vae = HunyuanVideoVAE.from_config({}, device="meta", dtype=vae_dtype)
    component, config, element_size = dit_footprint(dit)
    text = text_encoder_footprint(llama, clip, encoder_dtype, PROMPT_TOKEN_LIMIT + PROMPT_TEMPLATE_TOKENS)
    return Footprint(component, DiTSectionWork(config, element_size, vae), text,
                     image_encoder_footprint(siglip, encoder_dtype), Component("vae", tensor_bytes(vae)))


def section_sequence(config: DiTConfig, resolution: int = 640, latent_window_size: int = 9,
                     text_tokens: int = PROMPT_TOKEN_LIMIT, image_tokens: int = SIGLIP_IMAGE_TOKENS,
                     size: tuple[int, int] | None = None) -> PackedSequence:
    """The packed tokens of one section of `size` (height, width) pixels, by default the bucket of a square image
    at `resolution`, with the longest prompt the DiT receives."""
    height, width = size or find_nearest_bucket(resolution, resolution, resolution)
    return section_packed_sequence(config, latent_window_size, height // VAE_SPATIAL_COMPRESSION,
                                   width // VAE_SPATIAL_COMPRESSION, text_tokens, image_tokens)


@dataclass(frozen=True)
class DiTSectionWork:
    """`Footprint.section_work` for a DiT (and the VAE that decodes its sections): a request's section sized."""

    config: DiTConfig
    element_size: int  # bytes of the DiT's compute dtype
    vae_model: object | None = None  # a HunyuanVideoVAE (the meta device will do): its decode's working set

    def __call__(self, resolution: int = 640, latent_window_size: int = 9, size: tuple[int, int] | None = None,
                 text_tokens: int | None = None, image_tokens: int | None = None) -> SectionWork:
        sequence = section_sequence(self.config, resolution, latent_window_size,
                                    PROMPT_TOKEN_LIMIT if text_tokens is None else text_tokens,
                                    SIGLIP_IMAGE_TOKENS if image_tokens is None else image_tokens, size)
        vae_floor = 0
        if self.vae_model is not None:
            vae_floor = _smallest_vae_working_set(self.vae_model, decode_shape(self.vae_model, resolution,
                                                                               latent_window_size, size))
        return SectionWork(sequence.total_tokens, dit_activation_bytes(self.config, sequence, self.element_size),
                           vae_floor)


def dit_activation_bytes(config: DiTConfig, sequence: PackedSequence, element_size: int, batch: int = 1) -> int:
    """Peak bytes of the tensors one DiT call holds besides its weights (the plain glue path; fused kernels and
    flash attention hold less)."""
    per_token = (element_size * (ACTIVATION_HIDDEN_VECTORS * config.hidden_size + config.mlp_hidden_size)
                 + 4 * ACTIVATION_FLOAT32_VECTORS * config.hidden_size)
    rotary = 4 * ACTIVATION_ROTARY_TABLES * sequence.latent_tokens * config.attention_head_dim
    return int(batch * (sequence.total_tokens * per_token + rotary))


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def decode_shape(vae_model, resolution: int, latent_window_size: int,
                 size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The largest VAE decode of a section: twice the window plus the start frame (the official last section)."""
    height, width = size or find_nearest_bucket(resolution, resolution, resolution)
    channels = vae_model.config.latent_channels
    return (1, channels, 2 * latent_window_size + 1, height // VAE_SPATIAL_COMPRESSION,
            width // VAE_SPATIAL_COMPRESSION)


_VAE_FLOORS: dict = {}


def _smallest_vae_working_set(vae_model, shape: tuple[int, ...]) -> int:
    """The working set of the VAE's most tiled decode plan (its floor), remembered per config and shape."""
    key = (repr(vae_model.config), vae_model.dtype, shape)
    if key not in _VAE_FLOORS:
        with _quiet("framepack_engine.models.vae"):
            _VAE_FLOORS[key] = vae_model.plan_decode(shape, memory_budget_bytes=1).working_set_bytes
    return _VAE_FLOORS[key]


def vae_decode_plan(vae_model, plan: MemoryPlan):
    """The VAE's own plan (tiling, chunking, working set) for the memory plan's largest section decode under the
    plan's VAE budget."""
    with _quiet("framepack_engine.models.vae"):
        return vae_model.plan_decode(decode_shape(vae_model, plan.resolution, plan.latent_window_size, plan.size),
                                     memory_budget_bytes=max(int(plan.vae_budget_bytes), 1))


def official_plan(device=None, vram_budget_gb: float | None = None, memory_margin_gb: float = 1.0,
                  resolution: int = 640) -> tuple[MemoryPlan, str]:
    """The plan the official models would get on `device` (default: cuda when available), and what they are."""
    device = torch.device(device or default_device())
    # As framepack_engine.loading does: half-precision encoders and VAE on a GPU, float32 on a CPU.
    encoder_dtype = torch.float16 if device.type == "cuda" else torch.float32
    footprint = official_footprint(torch.bfloat16, encoder_dtype, encoder_dtype)
    plan = plan_memory(footprint, device_budget_bytes(device, vram_budget_gb, memory_margin_gb), device=device.type,
                       host_ram_bytes=host_available_bytes(), resolution=resolution)
    encoders = str(encoder_dtype).removeprefix("torch.")
    return plan, (f"the official models: FramePack's 13B DiT in bfloat16; Llama 8B, CLIP-L, SigLIP and the VAE "
                  f"in {encoders}")
