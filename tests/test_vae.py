"""framepack_engine.models.vae.HunyuanVideoVAE against diffusers' AutoencoderKLHunyuanVideo, on random tiny configs with the real
structure (8x spatial / 4x temporal causal levels, group norms, mid-block causal attention).

Bounds stated here:
  * float32 encode (posterior mean) and decode: relative error <= 1e-5 against diffusers (untiled).
  * The exact memory paths (frame-chunked convolutions with fused norm/upsampling, in-place residuals, frame-wise
    attention, batch slicing): <= 1e-5 against the unchunked result.
  * Tiling: with equal tile settings our tiled encode/decode equals diffusers' tiled encode/decode to <= 1e-5, so
    our tiled output is exactly as close to the untiled one as diffusers' is. Tiled vs untiled itself, with random
    weights (the worst case: every tap of every kernel matters, so the receptive field outgrows the overlap, and
    each tile normalizes with its own group statistics), 16-latent tiles overlapping by 8 on a 24x24 latent:
    max relative error <= 0.2, mean relative error <= 0.15 (measured 0.133 / 0.106).
  * bfloat16: single blocks <= 1e-2 against diffusers' blocks in bfloat16. Whole model: rounding accumulates over
    ~25 layers, so both implementations land 1-3% (max relative) from the float32 oracle; ours is asserted within
    1.5x of diffusers' own bfloat16 error and under 5e-2.
  * Memory: the analytic working-set estimate bounds the live tensors measured by a dispatch-level tracker (on CPU
    and, at full channel widths, on the meta device). The 640x640, 37-frame section decode at full widths in
    bfloat16, planned for a 6 GB device: printed by `test_640x640_section_decode_fits_6GB`.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo
from diffusers.utils import logging as diffusers_logging
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from framepack_engine.errors import FramePackError, ModelSourceError
from framepack_engine.models.vae import HunyuanVideoVAE, Tiling, VAEConfig, decode_tiling
from tests.utils import TOLERANCE, assert_relative_error, randomize_weights_, relative_error

diffusers_logging.set_verbosity_error()  # its advice on casting with .to() is about its own loader
FLOAT32 = TOLERANCE[torch.float32]
BFLOAT16 = TOLERANCE[torch.bfloat16]


def with_block_types(config: dict) -> dict:
    levels = len(config["block_out_channels"])
    return {"down_block_types": ("HunyuanVideoDownBlock3D",) * levels,
            "up_block_types": ("HunyuanVideoUpBlock3D",) * levels, **config}


CONFIGS = {
    "4-levels-attention": dict(block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=4),
    "2-layers-no-attention-8-latents": dict(
        block_out_channels=(16, 16, 32, 32), layers_per_block=2, norm_num_groups=8, latent_channels=8,
        mid_block_add_attention=False),
    "5-levels-4-latents": dict(block_out_channels=(8, 8, 16, 16, 16), layers_per_block=1, norm_num_groups=4,
                               latent_channels=4, scaling_factor=0.5),
}
MAIN = "4-levels-attention"
FULL_CONFIG = {  # hunyuanvideo-community/HunyuanVideo, subfolder vae
    "_class_name": "AutoencoderKLHunyuanVideo", "_diffusers_version": "0.32.0.dev0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512], "down_block_types": ["HunyuanVideoDownBlock3D"] * 4,
    "in_channels": 3, "latent_channels": 16, "layers_per_block": 2, "mid_block_add_attention": True,
    "norm_num_groups": 32, "out_channels": 3, "scaling_factor": 0.476986, "spatial_compression_ratio": 8,
    "temporal_compression_ratio": 4, "up_block_types": ["HunyuanVideoUpBlock3D"] * 4,
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Weights with unit gain per layer and norms/biases away from their identity values, so every layer shows."""
    randomize_weights_(model, seed, scale=1.0, norm_spread=0.2, bias_scale=0.2)


def reference_model(config: dict, seed: int = 0) -> AutoencoderKLHunyuanVideo:
    model = AutoencoderKLHunyuanVideo(**with_block_types(config)).eval()
    # The oracle is the model's exact maths: diffusers' frame-wise tiling (on by default) is compared separately.
    model.use_framewise_encoding = model.use_framewise_decoding = False
    randomize_(model, seed)
    return model


def our_model(reference: AutoencoderKLHunyuanVideo, dtype=None) -> HunyuanVideoVAE:
    model = HunyuanVideoVAE.from_config(dict(reference.config))
    state = reference.state_dict()
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()} if dtype else state)
    return model


_PAIRS = {}


def pair(name: str):
    """(diffusers model, our model) with the same random weights, built once per config."""
    if name not in _PAIRS:
        reference = reference_model(CONFIGS[name])
        _PAIRS[name] = reference, our_model(reference)
    return _PAIRS[name]


def random_pixels(batch, frames, height, width, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


def random_latents(channels, batch, frames, height, width, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, frames, height, width, generator=generator)


def diffusers_mean(reference, pixels):
    with torch.no_grad():
        return reference.encode(pixels).latent_dist.mode()


def diffusers_decode(reference, latents):
    with torch.no_grad():
        return reference.decode(latents).sample


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of the storages that ops create while active (views and in-place results reuse theirs).

    Sees every tensor an op returns, so it measures the working set at op boundaries; it does not see buffers a
    kernel allocates and frees inside itself (cuDNN workspaces), which the budget's headroom absorbs.
    """

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._storages = {}

    def _freed(self, key, size):
        self.live -= size
        self._storages.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or in-place result of a tensor made before tracking (a weight, say) allocates nothing
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage._cdata
                if key not in self._storages and key not in inputs:
                    size = storage.nbytes()
                    self._storages[key] = weakref.ref(storage, lambda _, k=key, s=size: self._freed(k, s))
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out


# ----------------------------------------------------------------------------------------------------------------
# Structure and loading


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_matches_diffusers(name):
    reference, ours = pair(name)
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected


def test_full_config_builds_on_meta_with_the_checkpoint_keys():
    ours = HunyuanVideoVAE.from_config(FULL_CONFIG)  # `_class_name` and `_diffusers_version` are ignored
    assert all(p.is_meta for p in ours.parameters())
    assert ours.scaling_factor == 0.476986
    with torch.device("meta"):
        reference = AutoencoderKLHunyuanVideo(**{k: v for k, v in FULL_CONFIG.items() if not k.startswith("_")})
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_load_state_dict_adopts_weights_into_a_meta_model():
    reference, _ = pair(MAIN)
    ours = HunyuanVideoVAE.from_config(dict(reference.config))
    ours.load_state_dict(reference.state_dict())
    assert not any(p.is_meta for p in ours.parameters())
    assert torch.equal(ours.decoder.conv_in.conv.weight, reference.decoder.conv_in.conv.weight)


def test_from_pretrained_loads_a_diffusers_save_pretrained_folder(tmp_path):
    reference = reference_model({**CONFIGS[MAIN], "scaling_factor": 0.3125}, seed=5)
    reference.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    latents = random_latents(16, 1, 3, 4, 5)
    expected = diffusers_decode(reference, latents)

    ours = HunyuanVideoVAE.from_pretrained(tmp_path, dtype=torch.float32)
    assert ours.scaling_factor == 0.3125 and ours.dtype == torch.float32
    assert_relative_error(ours.decode(latents), expected, FLOAT32, "decode after from_pretrained")

    half = HunyuanVideoVAE.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_from_pretrained_rejects_a_folder_of_other_weights(tmp_path):
    reference = reference_model(CONFIGS[MAIN])
    reference.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text().replace('"layers_per_block": 1', '"layers_per_block": 2')
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ModelSourceError, match="vae"):
        HunyuanVideoVAE.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(config.replace('"layers_per_block": 2', '"layers_per_block": 1')
                                          .replace('"latent_channels": 16', '"latent_channels": 8'))
    with pytest.raises(ModelSourceError, match="other sizes"):
        HunyuanVideoVAE.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# Float32 parity


@pytest.mark.parametrize("name", list(CONFIGS))
def test_encode_matches_diffusers(name):
    reference, ours = pair(name)
    pixels = random_pixels(2, 9, 32, 24)
    expected = diffusers_mean(reference, pixels)
    assert_relative_error(ours.encode(pixels), expected, FLOAT32, "posterior mean")
    single = random_pixels(1, 1, 16, 32, seed=3)  # an image: one frame
    assert_relative_error(ours.encode(single), diffusers_mean(reference, single), FLOAT32, "image posterior mean")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decode_matches_diffusers(name):
    reference, ours = pair(name)
    latents = random_latents(reference.config.latent_channels, 2, 3, 4, 3)
    expected = diffusers_decode(reference, latents)
    decoded = ours.decode(latents)
    assert decoded.shape == (2, 3, 9, 32, 24)
    assert_relative_error(decoded, expected, FLOAT32, "decoded pixels")
    single = random_latents(reference.config.latent_channels, 1, 1, 3, 4, seed=3)  # one latent frame: an image
    assert_relative_error(ours.decode(single), diffusers_decode(reference, single), FLOAT32, "decoded image")


def test_sampling_is_deterministic_and_matches_diffusers():
    reference, ours = pair(MAIN)
    pixels = random_pixels(1, 5, 16, 16)
    first = ours.encode(pixels, sample=True, generator=torch.Generator().manual_seed(7))
    again = ours.encode(pixels, sample=True, generator=torch.Generator().manual_seed(7))
    other = ours.encode(pixels, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    mean = ours.encode(pixels)
    assert relative_error(other, first) > 1e-3 and relative_error(first, mean) > 1e-3
    with torch.no_grad():
        expected = reference.encode(pixels).latent_dist.sample(generator=torch.Generator().manual_seed(7))
    assert_relative_error(first, expected, FLOAT32, "posterior draw")


def _perturbed(model: HunyuanVideoVAE, name: str, seed: int = 11) -> HunyuanVideoVAE:
    state = {k: v.clone() for k, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(seed)
    state[name] += 0.1 * state[name].abs().mean() * torch.randn(state[name].shape, generator=generator)
    perturbed = HunyuanVideoVAE.from_config(model.config)
    perturbed.load_state_dict(state)
    return perturbed


ENCODER_PARAMETERS = [
    "encoder.conv_in.conv.weight", "encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight",
    "encoder.down_blocks.1.downsamplers.0.conv.conv.weight", "encoder.down_blocks.3.resnets.0.norm1.weight",
    "encoder.mid_block.attentions.0.to_k.weight", "encoder.mid_block.attentions.0.group_norm.bias",
    "encoder.conv_norm_out.weight", "quant_conv.weight",
]
DECODER_PARAMETERS = [
    "post_quant_conv.weight", "decoder.mid_block.attentions.0.to_q.weight",
    "decoder.mid_block.attentions.0.to_out.0.weight", "decoder.up_blocks.0.upsamplers.0.conv.conv.weight",
    "decoder.up_blocks.1.upsamplers.0.conv.conv.weight", "decoder.up_blocks.2.resnets.0.conv_shortcut.conv.weight",
    "decoder.up_blocks.3.resnets.1.norm2.bias", "decoder.conv_out.conv.bias",
]


def test_parity_tests_can_fail():
    """A 10% change to any one layer, or to one input element, moves the result far beyond the tolerance."""
    reference, ours = pair(MAIN)
    pixels = random_pixels(1, 5, 16, 16)
    latents = random_latents(16, 1, 2, 3, 3)
    expected_mean, expected_pixels = diffusers_mean(reference, pixels), diffusers_decode(reference, latents)
    floor = 100 * FLOAT32

    for name in ENCODER_PARAMETERS:
        assert relative_error(_perturbed(ours, name).encode(pixels), expected_mean) > floor, name
    for name in DECODER_PARAMETERS:
        assert relative_error(_perturbed(ours, name).decode(latents), expected_pixels) > floor, name

    nudged_pixels = pixels.clone()
    nudged_pixels[0, 1, 4, 7, 9] += 0.5  # one pixel of the last frame
    assert relative_error(ours.encode(nudged_pixels), expected_mean) > floor
    nudged_latents = latents.clone()
    nudged_latents[0, 3, 1, 2, 0] += 0.5
    assert relative_error(ours.decode(nudged_latents), expected_pixels) > floor


# ----------------------------------------------------------------------------------------------------------------
# bfloat16


def test_bfloat16_blocks_match_diffusers():
    reference, _ = pair(MAIN)
    reference_half = reference_model(CONFIGS[MAIN]).to(torch.bfloat16)
    ours_half = our_model(reference, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(4)

    def check(ours_block, reference_block, channels, shape, label):
        x = torch.randn(1, channels, *shape, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            expected = reference_block(x)
            if expected.dim() == 3:  # diffusers' attention works on (B, L, C) tokens
                expected = expected.transpose(1, 2).reshape(x.shape)
            actual = ours_block(x.clone(), 1 << 30)
        assert_relative_error(actual, expected, BFLOAT16, label)

    check(ours_half.decoder.up_blocks[2].resnets[0], reference_half.decoder.up_blocks[2].resnets[0], 32,
          (5, 16, 16), "resnet with shortcut")
    check(ours_half.decoder.up_blocks[1].upsamplers[0], reference_half.decoder.up_blocks[1].upsamplers[0], 32,
          (3, 8, 8), "time + space upsampler")
    check(ours_half.encoder.down_blocks[1].downsamplers[0], reference_half.encoder.down_blocks[1].downsamplers[0],
          16, (9, 16, 16), "time + space downsampler")

    # diffusers' mid attention expects (B, L, C) tokens and a causal mask; call it as its mid block does
    attention_ours, attention_reference = (m.decoder.mid_block.attentions[0] for m in (ours_half, reference_half))
    frames, height, width = 3, 4, 4

    def reference_attention(x):
        from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask
        tokens = x.permute(0, 2, 3, 4, 1).flatten(1, 3)
        mask = prepare_causal_attention_mask(frames, height * width, x.dtype, x.device, batch_size=1)
        out = attention_reference(tokens, attention_mask=mask)
        return out.unflatten(1, (frames, height, width)).permute(0, 4, 1, 2, 3)

    check(attention_ours, reference_attention, 32, (frames, height, width), "causal mid attention")


def test_bfloat16_model_error_is_no_worse_than_diffusers():
    reference, _ = pair(MAIN)
    reference_half = reference_model(CONFIGS[MAIN]).to(torch.bfloat16)
    ours_half = our_model(reference, dtype=torch.bfloat16)
    latents = random_latents(16, 1, 3, 4, 4)
    pixels = random_pixels(1, 5, 32, 32)
    oracle_pixels, oracle_mean = diffusers_decode(reference, latents), diffusers_mean(reference, pixels)

    ours_error = relative_error(ours_half.decode(latents), oracle_pixels)
    diffusers_error = relative_error(diffusers_decode(reference_half, latents.bfloat16()), oracle_pixels)
    assert ours_error <= max(1.5 * diffusers_error, BFLOAT16) and ours_error <= 5e-2, (ours_error, diffusers_error)

    ours_error = relative_error(ours_half.encode(pixels), oracle_mean)
    diffusers_error = relative_error(diffusers_mean(reference_half, pixels.bfloat16()), oracle_mean)
    assert ours_error <= max(1.5 * diffusers_error, BFLOAT16) and ours_error <= 5e-2, (ours_error, diffusers_error)


# ----------------------------------------------------------------------------------------------------------------
# Memory paths


def test_chunking_and_batch_slicing_are_exact():
    """A tiny budget forces one-frame conv chunks (in-place residuals run last-to-first), query-row attention
    chunks and one sample per pass; the result must not move."""
    reference, ours = pair(MAIN)
    latents = random_latents(16, 2, 3, 4, 3)
    expected = diffusers_decode(reference, latents)
    plan = ours.plan_decode(latents.shape, "untiled", memory_budget_bytes=40_000)
    assert plan.tiling is None and plan.batch_size == 1 and plan.chunk_bytes <= 10_000
    assert_relative_error(ours.decode(latents, "untiled", memory_budget_bytes=40_000), expected, FLOAT32,
                          "chunked decode")

    pixels = random_pixels(2, 9, 32, 24)
    expected = diffusers_mean(reference, pixels)
    assert_relative_error(ours.encode(pixels, tiling="untiled", memory_budget_bytes=40_000), expected, FLOAT32,
                          "chunked encode")


def test_tiling_reproduces_diffusers_tiling():
    reference, ours = pair(MAIN)
    diffusers_tiled = reference_model(CONFIGS[MAIN])
    diffusers_tiled.use_framewise_encoding = diffusers_tiled.use_framewise_decoding = True  # its default
    # temporal tiles as diffusers runs by default: 4 latent frames every 3
    latents = random_latents(16, 1, 10, 3, 4)
    expected = diffusers_decode(diffusers_tiled, latents)
    assert_relative_error(ours.decode(latents, tiling=Tiling.like_diffusers(spatial=False)), expected, FLOAT32,
                          "diffusers' temporal tiling")
    # spatial tiles too, sized for tiny inputs (uneven strides, edge tiles cut at the border)
    diffusers_tiled.enable_tiling(tile_sample_min_height=32, tile_sample_min_width=32,
                                  tile_sample_stride_height=24, tile_sample_stride_width=16)
    tiling = Tiling(tile_height=4, tile_width=4, stride_height=3, stride_width=2, tile_frames=4, stride_frames=3)
    latents = random_latents(16, 1, 6, 7, 9)
    assert_relative_error(ours.decode(latents, tiling=tiling), diffusers_decode(diffusers_tiled, latents), FLOAT32,
                          "diffusers' spatial + temporal tiled decode")
    pixels = random_pixels(1, 21, 56, 72)
    assert_relative_error(ours.encode(pixels, tiling=tiling), diffusers_mean(diffusers_tiled, pixels), FLOAT32,
                          "diffusers' spatial + temporal tiled encode")


def framewise_reference(config_name: str, spatial_tiling: bool) -> AutoencoderKLHunyuanVideo:
    """diffusers' VAE decoding as the official app gets it from diffusers 0.33: frame-wise decoding on (its
    default) with 16-frame tiles every 12 frames, plus enable_tiling() (256-pixel tiles every 192) when asked."""
    model = reference_model(CONFIGS[config_name])
    model.use_framewise_decoding = True
    model.tile_sample_min_num_frames, model.tile_sample_stride_num_frames = 16, 12
    if spatial_tiling:
        model.enable_tiling(tile_sample_min_height=256, tile_sample_min_width=256, tile_sample_stride_height=192,
                            tile_sample_stride_width=192)
    return model


def test_official_decode_matches_diffusers_framewise_decode():
    _, ours = pair(MAIN)
    reference = framewise_reference(MAIN, spatial_tiling=False)
    latents = random_latents(16, 1, 10, 3, 4)  # 10 latent frames: temporal tiles start at 0, 3, 6 and 9
    official = ours.decode(latents, tiling=decode_tiling("official"))
    assert_relative_error(official, diffusers_decode(reference, latents), FLOAT32, "official (frame-wise) decode")
    # the switch matters: the exact decode differs, frame 0 included (the first tile blends into the second)
    exact = ours.decode(latents, tiling=decode_tiling("exact"))
    assert relative_error(official, exact) > 0.05 and relative_error(official[:, :, 9:], exact[:, :, 9:]) > 0.05
    # up to 4 latent frames diffusers does not tile, nor do we
    short = latents[:, :, :4]
    torch.testing.assert_close(ours.decode(short, tiling="official"), ours.decode(short, tiling="untiled"),
                               rtol=0, atol=0)


def test_official_decode_adds_diffusers_spatial_tiles_when_memory_asks():
    """The plan adds diffusers' enable_tiling() tiles when the temporal tiles alone do not fit. That our spatial
    tiles inside temporal ones equal diffusers' is test_tiling_reproduces_diffusers_tiling's (at tile sizes a CPU
    decodes in seconds: a real 256-pixel tile takes minutes here); this checks the sizes are diffusers' defaults."""
    reference, ours = pair(MAIN)
    diffusers_tiled = framewise_reference(MAIN, spatial_tiling=True)
    spatial, temporal = reference.spatial_compression_ratio, reference.temporal_compression_ratio
    assert Tiling.like_diffusers() == Tiling(
        diffusers_tiled.tile_sample_min_height // spatial, diffusers_tiled.tile_sample_min_width // spatial,
        diffusers_tiled.tile_sample_stride_height // spatial, diffusers_tiled.tile_sample_stride_width // spatial,
        diffusers_tiled.tile_sample_min_num_frames // temporal, diffusers_tiled.tile_sample_stride_num_frames // temporal)

    shape = (1, 16, 6, 34, 36)  # 272x288 pixels: 2x2 of diffusers' 256-pixel tiles, 2 tiles in time
    # the least each plan can hold (one-frame convolution chunks)
    temporal_only = ours.working_set_bytes(shape, Tiling.like_diffusers(spatial=False), 1, chunk_bytes=1)
    with_spatial = ours.working_set_bytes(shape, Tiling.like_diffusers(), 1, chunk_bytes=1)
    assert with_spatial < temporal_only
    tight = ours.plan_decode(shape, "official", memory_budget_bytes=(with_spatial + temporal_only) // 2)
    assert tight.tiling == Tiling.like_diffusers()
    roomy = ours.plan_decode(shape, "official", memory_budget_bytes=4 * temporal_only)
    assert roomy.tiling == Tiling.like_diffusers(spatial=False)
    # past what diffusers does, smaller spatial tiles (still diffusers' temporal ones) rather than running out
    tighter = ours.plan_decode(shape, "official", memory_budget_bytes=with_spatial * 9 // 10)
    assert tighter.tiling.tile_height < 32 and (tighter.tiling.tile_frames, tighter.tiling.stride_frames) == (4, 3)


@pytest.mark.parametrize("value", ["Official", "tiled", "", None])
def test_vae_decode_setting_names_the_choices(value):
    with pytest.raises(FramePackError, match="use 'exact' .* or 'official'"):
        decode_tiling(value)


def test_tiled_decode_stays_close_to_untiled():
    _, ours = pair(MAIN)
    latents = random_latents(16, 1, 2, 24, 24)
    untiled = ours.decode(latents, tiling="untiled")
    tiled = ours.decode(latents, tiling=Tiling(16, 16, 8, 8))
    max_error = relative_error(tiled, untiled)
    mean_error = ((tiled - untiled).abs().mean() / untiled.abs().mean()).item()
    assert max_error <= 0.2 and mean_error <= 0.15, (max_error, mean_error)
    # a tile as large as the frame is no tiling at all
    assert torch.equal(ours.decode(latents, tiling=Tiling(24, 24, 24, 24)), untiled)


def test_auto_plan_follows_the_budget():
    _, ours = pair(MAIN)
    shape = (2, 16, 3, 24, 24)
    # the least an untiled decode can hold: one-frame conv chunks, one sample at a time
    one_sample = ours.working_set_bytes(shape, None, 1, chunk_bytes=1)
    both_samples = ours.working_set_bytes(shape, None, 2, chunk_bytes=1)
    assert one_sample < both_samples

    roomy = ours.plan_decode(shape, memory_budget_bytes=4 * both_samples)
    assert roomy.tiling is None and roomy.batch_size == 2
    between = (one_sample + both_samples) // 2
    sliced = ours.plan_decode(shape, memory_budget_bytes=between)
    assert sliced.tiling is None and sliced.batch_size == 1 and sliced.working_set_bytes <= between
    tight = ours.plan_decode(shape, memory_budget_bytes=one_sample // 2)  # only tiles fit
    assert tight.tiling is not None and tight.working_set_bytes <= one_sample // 2

    forced = ours.plan_decode(shape, tiling="tiled")
    assert forced.tiling is not None and forced.tiling.tile_height < 24
    ours.memory_budget_bytes = one_sample // 2
    try:
        assert ours.plan_decode(shape) == tight
    finally:
        ours.memory_budget_bytes = None
    assert ours.memory_budget() == 8 << 30  # the CPU default


@pytest.mark.parametrize("label, tiling, budget, batch", [
    ("untiled", "untiled", None, 2),
    ("chunked, sliced", "untiled", 150_000, 2),
    ("tiled", Tiling(8, 8, 6, 6), None, 2),
    ("tiled in time", Tiling(6, 6, 5, 4, 2, 1), None, 1),
])
def test_estimate_bounds_live_tensors_on_cpu(label, tiling, budget, batch):
    _, ours = pair(MAIN)
    shape = (batch, 16, 4, 12, 10)
    plan = ours.plan_decode(shape, tiling, memory_budget_bytes=budget)
    with LiveTensorBytes() as tracker:
        latents = torch.randn(shape)
        ours.decode(latents, tiling, memory_budget_bytes=budget)
    assert tracker.peak <= plan.working_set_bytes <= 1.2 * tracker.peak, (label, tracker.peak, plan)

    pixel_shape = (batch, 3, 9, 48, 40)
    plan = ours.plan_encode(pixel_shape, tiling, memory_budget_bytes=budget)
    with LiveTensorBytes() as tracker:
        ours.encode(torch.rand(pixel_shape) * 2 - 1, tiling=tiling, memory_budget_bytes=budget)
    assert tracker.peak <= plan.working_set_bytes <= 1.2 * tracker.peak, (label, tracker.peak, plan)


def test_640x640_section_decode_fits_6GB():
    """A 37-frame 640x640 section (10 latent frames of 80x80) at the checkpoint's widths, in bfloat16."""
    vae = HunyuanVideoVAE.from_config(FULL_CONFIG, dtype=torch.bfloat16)
    shape = (1, 16, 10, 80, 80)
    device_bytes = 6 * 10**9
    weights = vae.weight_bytes("decoder") + vae.weight_bytes("post_quant_conv")
    plan = vae.plan_decode(shape, memory_budget_bytes=device_bytes - weights)
    untiled = vae.plan_decode(shape, "untiled", memory_budget_bytes=device_bytes - weights)
    assert untiled.working_set_bytes > device_bytes  # so the plan must tile
    assert plan.tiling is not None and plan.working_set_bytes + weights <= device_bytes

    # run that plan on the meta device (shapes only) and measure what the forward pass really holds
    with LiveTensorBytes() as tracker:
        latents = torch.empty(shape, device="meta", dtype=torch.bfloat16)
        pixels = vae.decode(latents, plan.tiling, memory_budget_bytes=device_bytes - weights)
    assert pixels.shape == (1, 3, 37, 640, 640)
    assert 0.9 * plan.working_set_bytes <= tracker.peak <= plan.working_set_bytes
    print(f"\n640x640x37 bf16 decode for a 6 GB device: tiles {plan.tiling.tile_height}x{plan.tiling.tile_width} "
          f"latents (stride {plan.tiling.stride_height}), conv chunks <= {plan.chunk_bytes / 1e9:.2f} GB; "
          f"working set estimated {plan.working_set_bytes / 1e9:.2f} GB, measured {tracker.peak / 1e9:.2f} GB, "
          f"+ {weights / 1e9:.2f} GB decoder weights; untiled would need {untiled.working_set_bytes / 1e9:.1f} GB")


@pytest.mark.gpu
def test_cuda_peak_memory_follows_the_estimate():
    vae = HunyuanVideoVAE.from_config(FULL_CONFIG, device="cuda", dtype=torch.bfloat16)
    shape = (1, 16, 10, 40, 40)
    budget = 2 * 10**9
    plan = vae.plan_decode(shape, memory_budget_bytes=budget)
    latents = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    vae.decode(latents, plan.tiling, memory_budget_bytes=budget)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before + latents.numel() * latents.element_size()
    # cuDNN workspaces come on top of the tensors the estimate counts
    assert peak <= 1.15 * plan.working_set_bytes + (256 << 20), (peak, plan)


# ----------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_raise_one_sentence_errors():
    _, ours = pair(MAIN)
    with pytest.raises(FramePackError, match="batch, 3, frames"):
        ours.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(FramePackError, match="multiples of 8"):
        ours.encode(torch.rand(1, 3, 1, 30, 32))
    with pytest.raises(FramePackError, match="batch, 16, frames"):
        ours.decode(torch.rand(1, 4, 2, 4, 4))
    with pytest.raises(FramePackError, match="tiling="):
        ours.decode(torch.rand(1, 16, 2, 4, 4), tiling="sometimes")
    with pytest.raises(FramePackError, match="stride"):
        Tiling(8, 8, 9, 9)
    with pytest.raises(FramePackError, match="temporal_compression_ratio"):
        VAEConfig.from_dict({**FULL_CONFIG, "temporal_compression_ratio": 8})
    with pytest.raises(FramePackError, match="down_block_types"):
        VAEConfig.from_dict({**FULL_CONFIG, "down_block_types": ["DownBlock2D"] * 4})
