"""Assembling an Engine from the sources users hold: repo ids, local folders, single .safetensors files."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import FramePackError


def guess_variant(transformer_source) -> str:
    """F1 and bidirectional checkpoints share one config; only the name tells them apart (FramePack_F1_I2V_HY...)."""
    name = Path(str(transformer_source)).name.lower().replace("-", "_")
    return "f1" if "f1" in name.split("_") or "_f1" in name else "bidirectional"


def load_engine_components(engine_class, *, transformer, base, image_encoder, variant="auto", device=None,
                           dtype=torch.bfloat16, vram_budget_gb=None, quantize=None, attention="auto",
                           allow_download=True, cache_dir=None, fused_kernels=False):
    from engine.conditioning import ImageEncoder, TextEncoder
    from engine.dit import FramePackDiT
    from engine.loading import DEFAULT_DTYPES, resolve_component
    from engine.vae import HunyuanVideoVAE

    if quantize:
        raise FramePackError(f"Weight quantization ({quantize!r}) is not available in this version: leave quantize unset.")
    if variant not in ("auto", "bidirectional", "f1"):
        raise FramePackError(f"Unknown variant {variant!r}: choose 'auto', 'bidirectional' or 'f1'.")
    variant = guess_variant(transformer) if variant == "auto" else variant
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Half-precision encoders as the official app, except on a CPU, where float16 kernels are slow or missing.
    encoder_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["text_encoder"]
    vae_dtype = torch.float32 if device.type == "cpu" else DEFAULT_DTYPES["vae"]

    dit = FramePackDiT.from_pretrained(transformer, dtype=dtype, device=device, allow_download=allow_download,
                                       cache_dir=cache_dir).eval()
    dit.set_output_precision(float32=True)  # the official app's high-quality float32 output projection
    dit.set_attention_backend(attention)
    dit.set_fused_kernels(fused_kernels)
    vae = HunyuanVideoVAE.from_pretrained(
        resolve_component(base, "vae", allow_download=allow_download, cache_dir=cache_dir), dtype=vae_dtype,
        device=device)
    if vram_budget_gb is not None:
        vae.memory_budget_bytes = int(vram_budget_gb * 2**30)
    text_encoder = TextEncoder.from_pretrained(base, device=device, dtype=encoder_dtype,
                                               allow_download=allow_download, cache_dir=cache_dir)
    images = ImageEncoder.from_pretrained(image_encoder, device=device, dtype=encoder_dtype,
                                          allow_download=allow_download, cache_dir=cache_dir)
    return engine_class(dit, vae, text_encoder, images, variant=variant, device=device, dtype=dtype,
                        name=str(Path(str(transformer)).name))
