"""Assembling an Engine from its sources: resolve -> read -> transform -> place.

The sources are resolved and read by framepack_engine.runtime.sources (which knows no model class), each model built
by its own module under framepack_engine.models, transformed here (LoRA adapters and weight quantization act on the
DiT while its weights are still on the host) and placed by one memory plan (framepack_engine.runtime.placement).
"""

from __future__ import annotations

import warnings

import torch

from framepack_engine.errors import FramePackWarning, Option
from framepack_engine.models.buckets import REFERENCE_RESOLUTION
from framepack_engine.models.checkpoints import DEFAULT_DTYPES
from framepack_engine.models.conditioning import ImageEncoder, TextEncoder
from framepack_engine.models.dit import FramePackDiT
from framepack_engine.models.footprints import engine_footprint
from framepack_engine.models.vae import HunyuanVideoVAE
from framepack_engine.runtime.host_memory import host_available_bytes
from framepack_engine.runtime.lora import LoraSet
from framepack_engine.runtime.placement import Placement
from framepack_engine.runtime.planner import device_budget_bytes, plan_memory
from framepack_engine.runtime.quant import (QuantScheme, check_fp8_compute_device, layers_to_quantize, quantize_dit,
                                            quantize_llama, quantized_layers, set_fp8_compute, set_quantized_kernels)
from framepack_engine.runtime.sources import resolve_component


def transform_dit(dit, settings):
    """The stage between reading the DiT's weights and placing it: where LoRA merging and quantization act on it
    (in place, while its weights are still on the host). Fused LoRAs merge into the float weights before they are
    quantized; live ones wrap the layers after, so they run beside the quantized base. Returns the LoraSet.

    `settings.quantize` quantizes the blocks' linears (layers a checkpoint already stores quantized in another format
    are dequantized and quantized again); without it a quantized checkpoint stays as it is. Quantized layers use the
    Triton dequantizing matmul when fused kernels are on. Over quantized weights the LoraSet's default mode is live."""
    lora_mode = settings.lora_mode
    if lora_mode == "fused" and settings.lora and quantized_layers(dit):
        # A checkpoint stored quantized (community fp8, `framepack quantize`) has no float weights to merge into.
        warnings.warn(FramePackWarning(
            "The transformer's weights are stored quantized, so the LoRAs run live beside them (",
            Option("lora_mode", "live"), ") instead of being merged: load the bf16 checkpoint to merge them."),
            stacklevel=2)
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
    if settings.quantize is not None and text_encoder.llama_model is not None:
        quantize_llama(text_encoder.llama_model, QuantScheme(settings.quantize))


def place_models(settings, device: torch.device, dit, text_encoder=None, image_encoder=None, vae=None,
                 encoder_dtype: torch.dtype | None = None, request=None,
                 default_resolution: int = REFERENCE_RESOLUTION) -> Placement:
    """The "place" stage: one memory plan for every model, from `vram_budget_gb` or the free device memory minus
    `memory_margin_gb`, made for `request`'s section (its bucket and latent window; without a request, a square
    section at `default_resolution`), and applied: what stays on the device, what streams, what visits in turn."""
    footprint = engine_footprint(dit, text_encoder, image_encoder, vae, encoder_dtype)
    budget = device_budget_bytes(device, settings.vram_budget_gb, settings.memory_margin_gb)
    host_ram = host_available_bytes()
    section = ({"resolution": request.resolution, "size": request.size,
                "latent_window_size": request.settings.latent_window_size} if request is not None
               else {"resolution": default_resolution})
    plan = plan_memory(footprint, budget, device=device.type, host_ram_bytes=host_ram, **section)
    return Placement(plan, device, dit, text_encoder, image_encoder, vae, encoder_dtype, footprint, host_ram)


def load_engine(engine_class, models, request=None, *, allow_download: bool | None = None, cache_dir=None,
                release_encoders: bool = False):
    """An Engine from resolved model options (framepack_engine.resolve.ResolvedModels): each component resolved
    (repo id through the HF cache, folder or single file), read from memory-mapped safetensors onto the host,
    transformed, then placed on the device as the memory plan for `request` says (a streamed block is never copied
    whole onto the device or into host RAM)."""
    settings, device, dtype = models.settings, models.device, models.dtype
    if allow_download is None and settings.offline:
        allow_download = False
    # Half-precision encoders as the official app, except on a CPU, where float16 kernels are slow or missing.
    encoder_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["text_encoder"]
    vae_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["vae"]

    if settings.fp8_compute:
        check_fp8_compute_device(device)
    dit = FramePackDiT.from_pretrained(settings.transformer, dtype=dtype, device="cpu",
                                       allow_download=allow_download, cache_dir=cache_dir).eval()
    loras = transform_dit(dit, settings)
    if settings.fp8_compute:
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
    placement = place_models(settings, device, dit, text_encoder, images, vae, encoder_dtype, request=request)
    dit.set_attention_backend(settings.attention)
    dit.set_fused_kernels(settings.fused_kernels)
    dit.set_compiled_blocks(settings.compile)
    return engine_class(dit, vae, text_encoder, images, variant=models.variant, device=device, dtype=dtype,
                        name=models.name, release_encoders=release_encoders, loras=loras, placement=placement)
