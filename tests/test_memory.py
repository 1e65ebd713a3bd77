"""The memory planner (engine/memory.py): plans for the full 13B config fit their budgets by their own accounting, the
activation estimate holds against measured peaks, an impossible budget names the smallest one that works."""

import dataclasses
import re

import pytest
import torch

from framepack_engine.models.dit import FramePackDiT
from framepack_engine.runtime.planner import HOST_BASELINE_BYTES, GiB, InsufficientMemoryError, plan_memory
from framepack_engine.models.footprints import dit_activation_bytes, dit_footprint, engine_footprint, official_footprint, section_sequence
from framepack_engine.runtime.offload import owned_tensors
from framepack_engine.models.presets import DIT_PRESETS, TINY_DIT_CONFIG, randomize_weights_

BUDGETS_GB = (6, 8, 12, 24, 80)


@pytest.fixture(scope="module")
def official():
    return official_footprint()


def test_the_plan_reserves_the_slots_the_streamer_allocates(official):
    """Slots as large as the largest streamed block: where only single blocks stream (the larger double blocks
    resident), single-block sized."""
    from framepack_engine.runtime.offload import BlockStreamer
    from framepack_engine.models.presets import FULL_DIT_CONFIG

    dit = FramePackDiT.from_config(FULL_DIT_CONFIG, device="meta", dtype=torch.bfloat16)
    doubles = len(dit.transformer_blocks)
    plans = [plan_memory(official, budget * GiB, host_ram_bytes=64 * GiB) for budget in (12, 16, 20, 24)]
    assert any(min(plan.streamed_blocks) >= doubles for plan in plans)  # the case where the sizes differ
    for plan in plans:
        streamer = BlockStreamer(dit.blocks, "meta", plan.streamed_blocks, prefetch=plan.prefetch,
                                 keep=dit.modules_used_outside_blocks(), allocate=False)
        assert (streamer.slot_count, streamer.slot_bytes) == (plan.slots, plan.slot_bytes)
        streamer.close()


def test_pinned_host_memory_is_counted_as_torch_allocates_it(official):
    """Every pinned buffer is rounded up to a power of two by torch's caching host allocator: the plan's host RAM
    holds the rounded per-block buffers BlockStreamer pins (and the Llama's staging buffers)."""
    from framepack_engine.runtime.offload import BlockStreamer
    from framepack_engine.models.presets import FULL_DIT_CONFIG

    def rounded(nbytes):
        return 1 << (nbytes - 1).bit_length()

    dit = FramePackDiT.from_config(FULL_DIT_CONFIG, device="meta", dtype=torch.bfloat16)
    plan = plan_memory(official, 12 * GiB, host_ram_bytes=64 * GiB)
    assert plan.source == "pinned" and plan.placements["text_encoder"] == "stream"
    streamer = BlockStreamer(dit.blocks, "meta", plan.streamed_blocks, prefetch=plan.prefetch,
                             keep=dit.modules_used_outside_blocks(), allocate=False)
    pinned = sum(rounded(layout.size) for layout in streamer.layouts)
    streamer.close()
    assert plan.host_bytes >= HOST_BASELINE_BYTES["cuda"] + pinned + 2 * rounded(plan.text_encoder_slot_bytes)


@pytest.mark.parametrize("host_ram_gb", [None, 8, 64])
def test_full_model_plans_fit_their_budgets(official, host_ram_gb):
    host = None if host_ram_gb is None else host_ram_gb * GiB
    plans = [plan_memory(official, budget * GiB, host_ram_bytes=host) for budget in BUDGETS_GB]
    blocks = official.dit.block_bytes
    assert len(blocks) == 60
    for budget, plan in zip(BUDGETS_GB, plans):
        assert plan.peak_bytes <= budget * GiB and set(plan.phase_bytes) == {"text", "image", "vae", "sampling"}
        assert sorted(plan.resident_blocks + plan.streamed_blocks) == list(range(60))
        assert plan.bytes_streamed_per_step == sum(blocks[i] for i in plan.streamed_blocks)
        # The plan's own accounting of the sampling phase, rebuilt from its parts.
        assert plan.phase_bytes["sampling"] >= (official.dit.other_bytes + sum(blocks[i] for i in plan.resident_blocks)
                                                + plan.slots * plan.slot_bytes + plan.dit_activation_bytes)
        assert plan.vae_budget_bytes > 0 and plan.minimum_budget_bytes <= budget * GiB
        if plan.streams:
            largest_streamed = max(blocks[i] for i in plan.streamed_blocks)
            assert plan.slots == plan.prefetch + 1 and largest_streamed <= plan.slot_bytes < largest_streamed + 2**20
    # More memory never streams more, and 80 GB holds everything.
    streamed = [plan.bytes_streamed_per_step for plan in plans]
    assert streamed == sorted(streamed, reverse=True) and streamed[0] > 20 * GiB
    assert not plans[-1].streams and set(plans[-1].placements.values()) == {"device"}
    assert plans[0].placements == {"text_encoder": "stream", "image_encoder": "offload", "vae": "offload"}
    # Pinned copies only where the host RAM can hold them; else the mapped file, with a second block in flight.
    sources = [plan.source for plan in plans]
    if host_ram_gb is None:
        assert sources == ["mmap"] * 4 + ["none"]
    elif host_ram_gb == 64:
        assert sources == ["pinned"] * 4 + ["none"] and plans[0].host_bytes > plans[0].bytes_streamed_per_step
    else:  # the 14 single blocks streamed at 24 GB would pin 7 GB (power-of-two allocations): too much of 8 GB
        assert sources == ["mmap"] * 4 + ["none"] and plans[0].prefetch == 2
        assert plans[0].weight_source == "disk" and all(plan.host_bytes <= 0.8 * host for plan in plans)


def test_an_impossible_budget_names_the_smallest_that_works(official):
    with pytest.raises(InsufficientMemoryError, match=r"smallest budget that works is 4\.\d GB") as raised:
        plan_memory(official, 3 * GiB)
    minimum = raised.value.minimum_bytes
    assert plan_memory(official, minimum).peak_bytes <= minimum
    with pytest.raises(InsufficientMemoryError):
        plan_memory(official, minimum - 2**20)
    # A larger section needs more: at 960 the floor rises.
    with pytest.raises(InsufficientMemoryError) as larger:
        plan_memory(official, minimum, resolution=960)
    assert larger.value.minimum_bytes > minimum


def test_plans_count_the_bytes_of_the_actual_tensors(official):
    """Quantized blocks (half the bytes) plan as what they are: more of them stay resident."""
    halved = dataclasses.replace(official, dit=dataclasses.replace(
        official.dit, block_bytes=tuple(b // 2 for b in official.dit.block_bytes)))
    bf16, quantized = plan_memory(official, 12 * GiB), plan_memory(halved, 12 * GiB)
    assert len(quantized.resident_blocks) > len(bf16.resident_blocks)
    dit = FramePackDiT.from_config(TINY_DIT_CONFIG, device="meta", dtype=torch.bfloat16)
    component, _, _ = dit_footprint(dit)
    kept = dit.modules_used_outside_blocks()  # TeaCache's modulation of block 0 stays on the device
    assert component.block_bytes[0] == sum(t.nbytes for t in owned_tensors(dit.blocks[0], kept))
    assert component.block_bytes[1] == sum(t.nbytes for t in owned_tensors(dit.blocks[1]))
    assert component.weight_bytes == sum(t.nbytes for t in owned_tensors(dit))


def measured_peak_bytes(function) -> int:
    """Peak bytes of tensors alive at once while `function` runs (CPU allocations, torch profiler)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        function()
    live = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        live += size if action == Action.CREATE else -size if action == Action.DESTROY else 0
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("heads,mlp_ratio,dtype,side", [(2, 4.0, torch.bfloat16, 24), (4, 2.0, torch.float32, 16),
                                                        (8, 4.0, torch.bfloat16, 12)])
def test_activation_estimate_holds_against_the_measured_peak(heads, mlp_ratio, dtype, side):
    config = {**DIT_PRESETS["small"], "num_attention_heads": heads, "mlp_ratio": mlp_ratio, "num_layers": 1,
              "num_single_layers": 1, "text_embed_dim": 64, "image_proj_dim": 32, "pooled_projection_dim": 16}
    dit = randomize_weights_(FramePackDiT.from_config(config, dtype=dtype), torch.Generator().manual_seed(0)).eval()
    generator = torch.Generator().manual_seed(1)
    window, text_tokens, image_tokens = 9, 60, 30
    latents = torch.randn(1, 16, window, side, side, generator=generator)
    text = torch.randn(1, text_tokens, 64, generator=generator)
    pooled = torch.randn(1, 16, generator=generator)
    image = torch.randn(1, image_tokens, 32, generator=generator)
    with torch.no_grad():
        peak = measured_peak_bytes(lambda: dit.velocity(latents, torch.tensor([500.0]), text, None, pooled,
                                                        torch.tensor([10000.0]), None, None, image))
    sequence = section_sequence(dit.config, latent_window_size=window, text_tokens=text_tokens,
                                image_tokens=image_tokens, size=(8 * side, 8 * side))
    sequence = dataclasses.replace(sequence, clean_1x_tokens=0, clean_2x_tokens=0, clean_4x_tokens=0)
    estimate = dit_activation_bytes(dit.config, sequence, dtype.itemsize)
    assert peak <= estimate <= 1.3 * peak


def test_placement_holds_what_the_plan_says():
    """On a small model streamed on the CPU: the slots allocated and the bytes moved are the plan's."""
    from framepack_engine.commands.bench import random_dit
    from framepack_engine.runtime.placement import DiTPlacement

    dit = random_dit({**TINY_DIT_CONFIG, "num_layers": 3, "num_single_layers": 4}, torch.device("cpu"),
                     torch.float32)
    component, _, _ = dit_footprint(dit)
    footprint = engine_footprint(dit)
    unlimited = plan_memory(footprint, 2**40, device="cpu", resolution=64)
    assert not unlimited.streams
    budget = unlimited.minimum_budget_bytes + component.block_bytes[0] + 1
    plan = plan_memory(footprint, budget, device="cpu", resolution=64)
    assert plan.streams and plan.resident_blocks and plan.peak_bytes <= budget
    placement = DiTPlacement(dit, plan, "cpu")
    try:
        assert placement.streamer.slot_memory_bytes == plan.slots * plan.slot_bytes
        assert placement.streamer.streamed_bytes == plan.bytes_streamed_per_step
    finally:
        placement.close()


def test_info_prints_the_plan_and_refuses_an_impossible_budget(capsys):
    from framepack_engine.commands.main import main

    assert main(["info", "--plan", "--vram-budget-gb", "6", "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for cuda: budget 6.00 GB" in out and "blocks through" in out and "per step" in out
    assert out.count("memory plan for") == 1 and "models: the official models" in out
    assert "expected host RAM" in out and "text encoder: stream" in out and "VAE tiling budget" in out
    assert main(["info", "--plan", "--vram-budget-gb", "3", "--device", "cuda"]) == 2
    assert re.search(r"the smallest budget that works is 4\.\d GB", capsys.readouterr().err)
    assert main(["info", "--plan", "--vram-budget-gb", "-1"]) == 2
    assert "--vram-budget-gb must be" in capsys.readouterr().err
