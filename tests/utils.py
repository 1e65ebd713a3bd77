"""The one set of test helpers: tolerances and relative error, random weights, the tiny DiT configs, section inputs in
the official index layouts, and their translation to diffusers' keyword names."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from framepack_engine.models import presets
from framepack_kernels.reference import relative_error

# Tolerances of the project: float32 parity at 1e-5 relative, half precision at 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}

# The DiT tests' tiny config: the tiny preset's, on the 4 latent channels of the test VAE, with two blocks of each kind
# (so block order matters) and condition widths that differ from each other (so a swapped projection fails).
TINY_CONFIG = {
    "_class_name": "HunyuanVideoTransformer3DModelPacked",
    **presets.TINY_DIT_CONFIG,
    "in_channels": 4, "out_channels": 4, "num_layers": 2, "num_single_layers": 2,
    "text_embed_dim": 24, "pooled_projection_dim": 12, "image_proj_dim": 20,
}
# The test checkpoints (tests/fixtures.py) as the official config.json writes them, at head_dim 32 with the official
# split of the rotary dims (1/8 time, 7/16 each spatial axis, as (16, 56, 56) at head_dim 128) and the MLP ratio 4.
CHECKPOINT_DIT_CONFIG = {
    **TINY_CONFIG, "_diffusers_version": "0.33.0.dev0", "attention_head_dim": 32, "rope_axes_dim": [4, 14, 14],
    "mlp_ratio": 4.0, "num_refiner_layers": 1, "text_embed_dim": 32, "pooled_projection_dim": 32,
    "image_proj_dim": 32,
}


def assert_relative_error(actual, expected, tolerance, name="output"):
    """relative_error (largest absolute difference over the largest expected magnitude) within `tolerance`, or a
    report naming the worst element."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    error = relative_error(actual, expected)
    if not error <= tolerance:
        difference = (actual.detach().double() - expected.detach().double()).abs()
        worst = torch.unravel_index(difference.argmax(), difference.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tolerance:.1e}; worst at index {worst}: "
            f"actual {actual[worst].item():.6g} vs expected {expected[worst].item():.6g}"
        )
    return error


def randomize_weights_(model, seed=0, scale=1.0, norm_spread=0.2, bias_scale=0.3):
    """framepack_engine.models.presets.randomize_weights_ from a seed, at a scale where every layer of a tiny model matters."""
    return presets.randomize_weights_(model, torch.Generator().manual_seed(seed), scale, norm_spread, bias_scale)


def diffusers_config(config):
    """The same config for diffusers' class (which spells a few things its own way)."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


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


class DitSpy:
    """Records what the DiT is called with: per call, the noisy latents and their indices, the clean context (per
    scale: latents and indices), the SigLIP tokens; the call itself goes through unchanged."""

    def __init__(self, engine, monkeypatch):
        self.calls = []
        velocity = engine.transformer.velocity

        def spy(latents, timestep, text, text_mask=None, pooled_text=None, guidance=None, latent_indices=None,
                history=None, image_embeddings=None, step_cache=None):
            self.calls.append({"latents": latents.clone(), "latent_indices": latent_indices.clone(),
                               "history": {item.scale.name: (item.latents.clone(), item.indices.clone())
                                           for item in history.scales},
                               "image_embeddings": image_embeddings.clone()})
            return velocity(latents, timestep, text, text_mask, pooled_text, guidance, latent_indices, history,
                            image_embeddings, step_cache)

        monkeypatch.setattr(engine.transformer, "velocity", spy)

    def first_call_of_each_section(self, steps):
        return self.calls[::steps]


# A DiT checkpoint loaded in a process of its own, which reports how much its peak memory (VmHWM: file pages included)
# and its private memory (RssAnon) grew, how many layers stayed quantized, the bytes of int4 layers (held repacked in
# private memory) and of the linears outside the blocks (folded to float).
_LOAD_MEMORY_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.runtime.quant import quantized_layers
    import framepack_engine.loading, huggingface_hub, safetensors.torch  # imported before measuring: their memory is not the load's

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    peak, anonymous = status("VmHWM"), status("RssAnon")
    model = FramePackDiT.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
    layers = quantized_layers(model)
    repacked = sum(t.numel() * t.element_size() for layer in layers for t in layer.stored_tensors()
                   if layer.format == "int4")
    folded = sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, torch.nn.Linear))
    print(json.dumps({"peak_increase": status("VmHWM") - peak, "anonymous_increase": status("RssAnon") - anonymous,
                      "quantized": len(layers), "repacked": repacked, "folded": folded}))
""")


def measure_dit_load(path) -> dict:
    """What loading the DiT checkpoint at `path` (bf16) costs in memory, measured in a fresh process (Linux)."""
    result = subprocess.run([sys.executable, "-c", _LOAD_MEMORY_SCRIPT, str(path)], capture_output=True, text=True,
                            check=True, cwd=str(Path(__file__).parents[1]))
    return json.loads(result.stdout.strip().splitlines()[-1])
