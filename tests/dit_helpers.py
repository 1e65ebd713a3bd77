"""Tiny FramePack transformer configs and random inputs in the official index layouts, shared by DiT tests."""

import math

import torch

TINY_CONFIG = {
    "_class_name": "HunyuanVideoTransformer3DModelPacked",
    "in_channels": 4,
    "out_channels": 4,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "num_single_layers": 2,
    "num_refiner_layers": 1,
    "mlp_ratio": 2.0,
    "patch_size": 2,
    "patch_size_t": 1,
    "qk_norm": "rms_norm",
    "guidance_embeds": True,
    "text_embed_dim": 24,
    "pooled_projection_dim": 12,
    "rope_theta": 256.0,
    "rope_axes_dim": [4, 6, 6],
    "has_image_proj": True,
    "image_proj_dim": 20,
    "has_clean_x_embedder": True,
}


def diffusers_config(config):
    """The same config for diffusers' class (which spells a few things its own way)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@torch.no_grad()
def randomize_weights_(model, seed=0, scale=1.0):
    """Random weights at a scale where every layer matters: N(0, scale/sqrt(fan_in)) for matrices, O(0.3) biases,
    norm weights around 1. Default initialisation leaves some paths negligible, which would hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in sorted(model.named_parameters()):
        values = torch.randn(parameter.shape, generator=generator, dtype=torch.float32)
        if parameter.ndim >= 2:
            fan_in = math.prod(parameter.shape[1:])
            values = values * scale / math.sqrt(fan_in)
        elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name or "norm1.weight" in name or "norm2.weight" in name:
            values = 1.0 + 0.2 * values
        else:
            values = 0.3 * values
        parameter.copy_(values.to(parameter.dtype))
    return model


def section_inputs(config, layout="bidirectional", batch=1, height=10, width=14, window=3, padding=1,
                   text_lengths=(7,), text_tokens=9, image_tokens=5, seed=0, dtype=torch.float32):
    """Random inputs of one section in the official index layout.

    bidirectional: indices split [1, padding*window, window, 1, 2, 16] = pre, blank, latent, post, 2x, 4x
    f1:            indices split [1, 16, 2, 1, window]                  = start, 4x, 2x, 1x, latent
    """
    g = torch.Generator().manual_seed(seed)
    c = config["in_channels"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if layout == "bidirectional":
        indices = torch.arange(1 + padding * window + window + 1 + 2 + 16)
        pre, _, latent, post, two, four = indices.split([1, padding * window, window, 1, 2, 16])
        clean = torch.cat([pre, post])
    elif layout == "f1":
        indices = torch.arange(1 + 16 + 2 + 1 + window)
        start, four, two, one, latent = indices.split([1, 16, 2, 1, window])
        clean = torch.cat([start, one])
    else:
        raise ValueError(layout)

    mask = torch.zeros(batch, text_tokens, dtype=torch.int64)
    for i, length in enumerate(text_lengths):
        mask[i, :length] = 1
    return dict(
        hidden_states=randn(batch, c, window, height, width),
        timestep=torch.rand(batch, generator=g) * 1000,
        encoder_hidden_states=randn(batch, text_tokens, config["text_embed_dim"]),
        encoder_attention_mask=mask,
        pooled_projections=randn(batch, config["pooled_projection_dim"]),
        guidance=torch.full((batch,), 10.0 * 1000),
        latent_indices=latent,
        clean_latents=randn(batch, c, 2, height, width),
        clean_latent_indices=clean,
        clean_latents_2x=randn(batch, c, 2, height, width),
        clean_latent_2x_indices=two,
        clean_latents_4x=randn(batch, c, 16, height, width),
        clean_latent_4x_indices=four,
        image_embeddings=randn(batch, image_tokens, config["image_proj_dim"]),
    )


def diffusers_kwargs(inputs):
    """Our (official) keyword names -> diffusers' names."""
    return dict(
        hidden_states=inputs["hidden_states"],
        timestep=inputs["timestep"],
        encoder_hidden_states=inputs["encoder_hidden_states"],
        encoder_attention_mask=inputs["encoder_attention_mask"],
        pooled_projections=inputs["pooled_projections"],
        image_embeds=inputs["image_embeddings"],
        indices_latents=inputs["latent_indices"],
        guidance=inputs["guidance"],
        latents_clean=inputs["clean_latents"],
        indices_latents_clean=inputs["clean_latent_indices"],
        latents_history_2x=inputs["clean_latents_2x"],
        indices_latents_history_2x=inputs["clean_latent_2x_indices"],
        latents_history_4x=inputs["clean_latents_4x"],
        indices_latents_history_4x=inputs["clean_latent_4x_indices"],
        return_dict=False,
    )
