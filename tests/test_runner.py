"""The section runner is the one loop: the benchmark runs it, the DiT is reached only through its seams, prompt work
happens before the first section, and nothing outside engine/dit.py touches the DiT's insides."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from framepack_engine import Engine, FramePackError
from framepack_engine.commands import bench as benchmark
from framepack_engine.generation import runner
from framepack_engine.models.dit import FramePackDiT
from framepack_engine.models.presets import TINY_DIT_CONFIG
from framepack_engine.generation.sections import initial_history, plan_sections

FAST = dict(steps=2, latent_window_size=2, fps=8)


class VelocityCalls:
    """Records every FramePackDiT.velocity call (what the DiT is asked, not how)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = FramePackDiT.velocity

        def recording(dit, latents, timestep, text, text_mask=None, *args, **kwargs):
            self.calls.append({"latents": tuple(latents.shape), "text_mask": text_mask, "text": tuple(text.shape)})
            return real(dit, latents, timestep, text, text_mask, *args, **kwargs)

        monkeypatch.setattr(FramePackDiT, "velocity", recording)


def test_benchmark_runs_the_engines_section_loop(monkeypatch):
    loops = []
    real_run_sections = runner.run_sections

    def counting_run_sections(*args, **kwargs):
        loops.append(len(args[1]))  # the plan's length
        return real_run_sections(*args, **kwargs)

    monkeypatch.setattr(benchmark, "run_sections", counting_run_sections)
    recorded = VelocityCalls(monkeypatch)
    settings = benchmark.BenchSettings(preset="tiny", device="cpu", resolution=64, latent_window_size=2, steps=3,
                                       sections=(2,), warmup=1, prompt_tokens=5, matmul_size=16)
    results = benchmark.run_benchmark(settings)
    # The warm-up (one section of `warmup` steps) and the timed plan both go through the runner.
    assert loops == [1, 2]
    assert len(recorded.calls) == 1 + 2 * 3
    assert [len(section["step_seconds"]) for section in results["runs"][0]["sections"]] == [3, 3]
    # As the engine hands it over: the prompt's valid tokens only and no mask, so no step copies lengths to the host.
    assert all(call["text_mask"] is None and call["text"][1] == 5 for call in recorded.calls)


def test_engine_calls_the_dit_like_the_benchmark(monkeypatch):
    recorded = VelocityCalls(monkeypatch)
    engine = Engine.from_preset("tiny", variant="f1")
    engine.generate("a cat", seconds=2, **FAST)
    assert len(recorded.calls) == 2 * 2  # two sections of two steps, cfg 1: one call per step
    assert all(call["text_mask"] is None for call in recorded.calls)
    assert {call["latents"] for call in recorded.calls} == {(1, 16, 2, 8, 8)}


def test_prompt_work_happens_before_the_first_section_and_encoders_can_go(monkeypatch):
    engine = Engine.from_preset("tiny", variant="bidirectional")
    engine.release_encoders_after_use = True
    events = []
    real_encode = engine.text_encoder.encode

    def encode(prompt):
        events.append(("encode", prompt))
        return real_encode(prompt)

    monkeypatch.setattr(engine.text_encoder, "encode", encode)
    engine.generate("a cat", seconds=3, section_prompts=["walks", "sits", "runs"], cfg=2.0,
                    negative_prompt="blurry", callback=lambda info: events.append(("step", info["section"])),
                    **FAST)
    first_step = events.index(("step", 0))
    assert {prompt for kind, prompt in events[:first_step]} == {"a cat walks", "a cat sits", "a cat runs", "blurry"}
    assert all(kind == "step" for kind, _ in events[first_step:])
    # Released after the prompt work: the same prompts still work (cached), a new one is a clear error.
    assert not engine.text_encoder.loaded and not engine.image_encoder.loaded
    engine.generate("a cat", seconds=3, section_prompts=["walks", "sits", "runs"], cfg=2.0, negative_prompt="blurry",
                    **FAST)
    with pytest.raises(FramePackError, match="released"):
        engine.generate("a dog", seconds=1, **FAST)


def test_step_cache_seam_gets_one_policy_per_section_and_branch():
    engine = Engine.from_preset("tiny", variant="f1")
    made = []

    class CountingPolicy:
        def __init__(self, section, branch):
            self.key, self.calls = (section.index, branch), 0
            made.append(self)

        def run_blocks(self, dit, tokens):
            self.calls += 1
            return dit.run_blocks(tokens)

    plan = plan_sections("f1", 2, 2)
    inputs, _ = engine._encode_inputs(engine.settings("x", cfg=2.0, **FAST), plan, np.zeros((64, 64, 3), np.uint8),
                                      None, torch.Generator().manual_seed(0))
    history = initial_history("f1", inputs.start_latent)
    outputs = list(runner.run_sections(
        engine.transformer, plan, inputs, runner.SamplingOptions(steps=3, latent_window_size=2, cfg=2.0),
        torch.Generator().manual_seed(0), history, device="cpu", dtype=torch.float32,
        make_step_cache=CountingPolicy))
    assert len(outputs) == 2
    assert [policy.key for policy in made] == [(0, "positive"), (0, "negative"), (1, "positive"), (1, "negative")]
    assert all(policy.calls == 3 for policy in made)


def test_head_runs_the_norm_in_the_model_dtype_and_the_projection_in_float32():
    from framepack_engine.models.presets import randomize_weights_

    dit = randomize_weights_(FramePackDiT.from_config(TINY_DIT_CONFIG, dtype=torch.bfloat16),
                             torch.Generator().manual_seed(0)).eval()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(1, 16, 2, 8, 8, generator=generator)
    text = torch.randn(1, 5, TINY_DIT_CONFIG["text_embed_dim"], generator=generator)
    pooled = torch.randn(1, TINY_DIT_CONFIG["pooled_projection_dim"], generator=generator)
    images = torch.randn(1, 3, TINY_DIT_CONFIG["image_proj_dim"], generator=generator)
    with torch.no_grad():
        tokens = dit.embed(latents, torch.tensor([500.0]), text, None, pooled, torch.tensor([10000.0]),
                           image_embeddings=images)
        image = dit.run_blocks(tokens)
        plain = dit.head(image, tokens)
        dit.set_output_precision(float32=True)
        assert dit.fp32_output and dit.proj_out.weight.dtype == torch.float32
        high = dit.head(image, tokens)
        # The official: norm_out in bf16, then the float32 projection of its (bf16) output.
        normed = dit.norm_out(image[:, -tokens.noisy_tokens:], tokens.conditioning)
        assert normed.dtype == torch.bfloat16
        expected = torch.nn.functional.linear(normed.float(), dit.proj_out.weight, dit.proj_out.bias)
    assert high.dtype == torch.float32 and plain.dtype == torch.bfloat16
    np.testing.assert_array_equal(high.flatten().numpy(), expected.reshape(1, 2, 4, 4, 16, 1, 2, 2).permute(
        0, 4, 1, 5, 2, 6, 3, 7).reshape(1, 16, 2, 8, 8).flatten().numpy())
    assert (high - plain.float()).abs().max() > 0  # the float32 projection does change the result


def test_nothing_outside_the_dit_touches_its_submodules():
    """The DiT's submodules are reached only inside engine/models/dit.py, so any can be swapped (quantized, LoRA, streamed)."""
    names = {name for name, _ in FramePackDiT.from_config(TINY_DIT_CONFIG, device="meta").named_children()}
    pattern = re.compile(r"\.(" + "|".join(sorted(names)) + r")\b")
    offenders = []
    for path in sorted(Path(__file__).resolve().parents[1].joinpath("engine").rglob("*.py")):
        if path.name == "dit.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith("#"):
                offenders.append(f"{path.name}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)
