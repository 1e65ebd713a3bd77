"""The resolve step: a request becomes one resolved value before any model loads, and nothing downstream decides
again. Covers the bugs the layering left: the memory plan made at 640 whatever the request, and a preset that
silently ignored model flags."""


import numpy as np
import pytest
import torch
from safetensors import safe_open

from framepack_engine import Engine
from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.models.footprints import engine_footprint
from framepack_engine.resolve import resolve_models, resolve_request
from framepack_engine.runtime.planner import GiB, plan_memory
from framepack_engine.settings import GenerationSettings, ModelSettings
from tests.fixtures import (flux_redux_folder, framepack_transformer_folder,  # noqa: F401 (pytest fixtures)
                            hunyuan_video_base_folder)

FAST = ["--steps", "2", "--latent-window-size", "2", "--seconds", "1", "--fps", "8"]


def test_models_are_resolved_once():
    models = resolve_models(ModelSettings.from_options(transformer="someone/FramePack_F1_I2V_HY_20250503",
                                                       device="cpu"))
    assert (models.variant, models.device, models.dtype) == ("f1", torch.device("cpu"), torch.bfloat16)
    assert models.name == "FramePack_F1_I2V_HY_20250503" and models.default_resolution == 640
    preset = resolve_models(ModelSettings.from_options(variant="f1"), "tiny", given={"variant"})
    assert (preset.variant, preset.dtype, preset.name, preset.default_resolution) == (
        "f1", torch.float32, "preset:tiny", 64)


def test_a_request_is_resolved_once(tmp_path):
    image = np.zeros((48, 80, 3), np.uint8)
    request = resolve_request(GenerationSettings.from_options(prompt="a cat", seconds=2, fps=8, latent_window_size=2),
                              "bidirectional", image=image, default_resolution=64)
    assert request.mode == "i2v" and request.size == (48, 80) and request.resolution == 64
    assert request.section_count == 2 and request.latent_frames == 5 and request.pixel_frames == 17
    with pytest.raises(FramePackError, match="End images need the bidirectional model"):
        resolve_request(GenerationSettings.from_options(prompt="x"), "f1", image=image, end_image=image)


def test_a_magcache_calibration_is_read_once_before_loading(tmp_path, monkeypatch):
    from framepack_engine.generation import calibration as calibration_module
    from framepack_engine.generation.calibration import MagCacheCalibration

    path = tmp_path / "magcache.json"
    MagCacheCalibration(steps=4, ratios={"positive": [1.0, 0.99, 0.98, 0.97]}, sections=1, model="m",
                        variant="bidirectional", bucket=[64, 64], latent_window_size=2, sampler="unipc").save(path)
    reads = []
    load = MagCacheCalibration.load.__func__
    monkeypatch.setattr(calibration_module.MagCacheCalibration, "load",
                        classmethod(lambda cls, p: reads.append(p) or load(cls, p)))
    settings = GenerationSettings.from_options(prompt="x", steps=4, latent_window_size=2, cache="magcache",
                                               magcache_calibration=str(path))
    request = resolve_request(settings, "bidirectional", default_resolution=64)
    assert len(reads) == 1
    first, second = request.step_caches(), request.step_caches()
    assert first is not second and len(reads) == 1  # fresh caches per generation, the file read once
    bad = GenerationSettings.from_options(prompt="x", steps=5, latent_window_size=2, cache="magcache",
                                          magcache_calibration=str(path))
    assert bad.steps == 5  # the settings alone do not read the file: the resolve step does, before any model loads
    with pytest.raises(FramePackError):
        resolve_request(bad, "bidirectional", default_resolution=64, image=None)


def test_a_preset_refuses_the_model_flags_it_cannot_honour(tmp_path, capsys):
    for flags in (["--transformer", "someone/model"], ["--base", "x"], ["--dtype", "bfloat16"]):
        assert main(["generate", "a cat", "--preset", "tiny", *flags, "--out", str(tmp_path / "a.mp4")]) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and flags[0] in error and "--preset tiny" in error
    assert not (tmp_path / "a.mp4").exists()


def test_a_preset_plans_its_models_under_a_budget(tmp_path, capsys):
    """--vram-budget-gb with --preset plans the preset's models (it used to run with no plan at all)."""
    assert main(["generate", "a cat", "--preset", "tiny", "--device", "cpu", "--vram-budget-gb", "0.000001", *FAST,
                 "--out", str(tmp_path / "a.safetensors")]) == 2
    error = capsys.readouterr().err.strip()
    assert "too small" in error and "at least" in error and error.count("\n") == 0
    engine = Engine.from_settings(ModelSettings.from_options(vram_budget_gb=1.0, device="cpu", variant="f1"), "tiny",
                                  given={"vram_budget_gb", "device", "variant"})
    assert engine.variant == "f1" and engine.memory_plan is not None
    assert engine.memory_plan.resolution == 64  # the preset's own resolution, not 640
    engine.close()


def test_the_memory_plan_is_made_for_the_requests_resolution(tmp_path, capsys, framepack_transformer_folder,
                                                              hunyuan_video_base_folder, flux_redux_folder):
    """A budget that fits a 64-pixel section but not a 640 one: the command plans for the request and runs (it was
    refused, at resolution 640, whatever --resolution said)."""
    sources = dict(transformer=str(framepack_transformer_folder), base=str(hunyuan_video_base_folder),
                   image_encoder=str(flux_redux_folder), device="cpu", dtype="float32")
    probe = Engine.from_pretrained(**sources)
    footprint = engine_footprint(probe.transformer, probe.text_encoder, probe.image_encoder, probe.vae,
                                 torch.float32)
    at_640 = plan_memory(footprint, 2**50, device="cpu", resolution=640).minimum_budget_bytes
    at_64 = plan_memory(footprint, 2**50, device="cpu", resolution=64, latent_window_size=2).minimum_budget_bytes
    probe.close()
    assert at_64 < at_640
    budget_gb = (at_64 + (at_640 - at_64) / 4) / GiB
    out = tmp_path / "a.safetensors"
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in sources.items()]
    assert main(["generate", "a cat", *flags, "--resolution", "64", "--vram-budget-gb", f"{budget_gb:.6f}", *FAST,
                 "--out", str(out)]) == 0, capsys.readouterr().err
    with safe_open(out, "pt") as file:
        assert file.get_tensor("frames").shape[1:3] == (64, 64)
    with pytest.raises(FramePackError, match="resolution 640"):
        Engine.from_pretrained(vram_budget_gb=budget_gb, **sources)  # without a request: the default resolution


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_the_planner_counts_the_tokens_the_dit_receives(variant):
    """The plan's tokens per section equal the sequence the DiT's blocks attend over in a real forward: the text
    given padded to DIT_TEXT_PADDED_TOKENS with a mask (as the official app does) reaches the blocks cropped to its
    valid tokens, and a prompt never yields more than PROMPT_TOKEN_LIMIT of them."""
    from framepack_engine.generation.sections import initial_history, plan_sections
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.models.footprints import DiTSectionWork
    from framepack_engine.models.presets import TINY_DIT_CONFIG
    from framepack_engine.official import DIT_TEXT_PADDED_TOKENS, PROMPT_TOKEN_LIMIT, VAE_SPATIAL_COMPRESSION

    config, window, size, text_tokens, image_tokens = TINY_DIT_CONFIG, 3, (48, 80), 7, 5
    latent_height, latent_width = (side // VAE_SPATIAL_COMPRESSION for side in size)
    model = FramePackDiT.from_config(config).eval()
    section = plan_sections(variant, 3, window)[1]
    start = torch.randn(1, config["in_channels"], 1, latent_height, latent_width)
    context = section.history_context(torch.randn_like(initial_history(variant, start)), start)
    mask = torch.zeros(1, DIT_TEXT_PADDED_TOKENS, dtype=torch.int64)
    mask[:, :text_tokens] = 1
    seen = []
    attention = model._attention

    def recording(q, k, v, *args, **kwargs):
        seen.append(q.shape[1])
        return attention(q, k, v, *args, **kwargs)

    model._attention = recording
    with torch.no_grad():
        model(hidden_states=torch.randn(1, config["in_channels"], window, latent_height, latent_width),
              timestep=torch.tensor([700.0]),
              encoder_hidden_states=torch.randn(1, DIT_TEXT_PADDED_TOKENS, config["text_embed_dim"]),
              encoder_attention_mask=mask, pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
              guidance=torch.tensor([10000.0]), latent_indices=section.latent_indices,
              image_embeddings=torch.randn(1, image_tokens, config["image_proj_dim"]), **context.official_kwargs())
    work = DiTSectionWork(model.config, 4)(latent_window_size=window, size=size, text_tokens=text_tokens,
                                           image_tokens=image_tokens)
    assert set(seen) == {work.tokens}
    assert plan_memory(engine_footprint(model), 2**40, device="cpu", latent_window_size=window, size=size,
                       text_tokens=text_tokens, image_tokens=image_tokens).tokens == work.tokens
    text_encoder = Engine.from_preset("tiny").text_encoder
    assert text_encoder.encode("a cat walks on the grass " * 200).tokens == PROMPT_TOKEN_LIMIT
