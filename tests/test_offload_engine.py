"""The memory plan applied by `Engine.from_pretrained(vram_budget_gb=...)`: a streamed engine makes the resident
engine's video, encoders and the VAE visit the device in turn, and loading with streaming never reads the whole
checkpoint into anonymous memory."""

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_engine import Engine
from framepack_engine.models.dit import FramePackDiT
from framepack_engine.errors import FramePackError
from framepack_engine.runtime.planner import GiB
from framepack_engine.runtime.placement import Placement
from framepack_engine.models.presets import randomize_weights_
from tests.fixtures import (TINY_DIT_CONFIG, flux_redux_folder, framepack_transformer_folder,  # noqa: F401
                            hunyuan_video_base_folder, write_single_file_dit)

FAST = dict(steps=2, latent_window_size=2, fps=8, seconds=1, resolution=64)


def gradient_image(height=64, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3) % 256, (y * 2) % 256, np.full_like(x, 70)], -1).astype(np.uint8)


def load(transformer, base, images, **options):
    return Engine.from_pretrained(transformer=transformer, base=base, image_encoder=images, device="cpu",
                                  dtype=torch.float32, attention="sdpa", **options)


def test_streamed_engine_makes_the_resident_video(framepack_transformer_folder, hunyuan_video_base_folder,
                                                  flux_redux_folder):
    folders = (framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder)
    resident = load(*folders)
    assert not resident.memory_plan.streams and set(resident.memory_plan.placements.values()) == {"device"}
    expected = resident.generate("a cat walks", image=gradient_image(), **FAST)
    minimum = resident.memory_plan.minimum_budget_bytes
    resident.placement.close()

    streamed = load(*folders, vram_budget_gb=minimum / GiB)
    plan = streamed.memory_plan
    assert len(plan.streamed_blocks) == 4 and plan.peak_bytes <= plan.budget_bytes
    # Every model in turn (the smallest budget's arrangement): the Llama's layers stream through their own slots
    # while prompts are encoded, SigLIP and the VAE visit the device for their work.
    streamed.placement.close()
    plan = dataclasses.replace(plan, placements={"text_encoder": "stream", "image_encoder": "offload",
                                                 "vae": "offload"})
    streamed.placement = Placement(plan, "cpu", streamed.transformer, streamed.text_encoder, streamed.image_encoder,
                                   streamed.vae, torch.float32)
    video = streamed.generate("a cat walks", image=gradient_image(), **FAST)
    assert np.array_equal(video.frames, expected.frames)
    dit_streamer, llama_streamer = streamed.placement.streamer(), streamed.placement.streamer("text_encoder")
    assert dit_streamer.stats.bytes_streamed == FAST["steps"] * dit_streamer.streamed_bytes
    assert llama_streamer.stats.bytes_streamed == llama_streamer.streamed_bytes  # one prompt, one pass
    # Between phases the encoders and the VAE are back on the host, and the Llama's slots are given back.
    assert not any(streamed.placement.on_device(name) for name in ("text_encoder", "image_encoder", "vae"))
    assert not llama_streamer.allocated
    streamed.release_encoders()  # the placement lets go of released models
    assert streamed.placement.streamer("text_encoder") is None and streamed.placement.models["text_encoder"] is None


def test_a_section_larger_than_planned_gets_a_new_plan(framepack_transformer_folder, hunyuan_video_base_folder,
                                                       flux_redux_folder):
    engine = load(framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder)
    before = engine.memory_plan
    engine.placement.fit((1024, 1024), 9)
    assert engine.memory_plan.tokens > before.tokens and engine.memory_plan.size == (1024, 1024)
    with pytest.raises(Exception, match="smallest budget that works"):
        small = load(framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder,
                     vram_budget_gb=before.minimum_budget_bytes / GiB)
        small.placement.fit((1024, 1024), 9)


def test_an_impossible_budget_is_refused_before_anything_runs(framepack_transformer_folder,
                                                              hunyuan_video_base_folder, flux_redux_folder):
    from framepack_engine.runtime.planner import InsufficientMemoryError

    with pytest.raises(InsufficientMemoryError, match=r"too small .* smallest budget that works is \d+\.\d+ GB"):
        load(framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder, vram_budget_gb=0.001)


# A transformer of a few hundred MB whose inputs match the tiny fixture encoders and VAE.
LARGER_CONFIG = {**TINY_DIT_CONFIG, "num_attention_heads": 4, "attention_head_dim": 128,
                 "rope_axes_dim": [16, 56, 56], "num_layers": 16, "num_single_layers": 16}


def write_larger_transformer(folder: Path) -> tuple[Path, Path, int]:
    """The folder layout (config.json, two bf16 shards, index) and a ComfyUI-style single file of one DiT."""
    dit = FramePackDiT.from_config(LARGER_CONFIG, dtype=torch.bfloat16)
    randomize_weights_(dit, torch.Generator().manual_seed(0))
    state_dict = {key: value.contiguous() for key, value in dit.state_dict().items()}
    keys = sorted(state_dict)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    folder.mkdir(parents=True, exist_ok=True)
    for name, shard_keys in shards.items():
        save_file({key: state_dict[key] for key in shard_keys}, str(folder / name))
    weight_map = {key: name for name, shard_keys in shards.items() for key in shard_keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(LARGER_CONFIG))
    single = write_single_file_dit(folder.parent / "FramePack_larger_bf16.safetensors", state_dict,
                                   prefix="model.diffusion_model.")
    return folder, single, sum(tensor.nbytes for tensor in state_dict.values())


MEASURE = textwrap.dedent("""
    import gc, json, sys
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer, LlamaModel, PreTrainedTokenizerFast, SiglipVisionModel
    from framepack_engine import Engine
    from framepack_engine.runtime.planner import GiB
    from framepack_engine.runtime.host_memory import AnonymousMemoryPeak

    transformer, base, images = sys.argv[1:4]
    options = dict(transformer=transformer, base=base, image_encoder=images, device="cpu", attention="sdpa")
    probe = Engine.from_pretrained(**options)  # the resident plan says what the smallest budget is
    minimum = probe.memory_plan.minimum_budget_bytes
    probe.placement.close()
    del probe
    gc.collect()
    with AnonymousMemoryPeak(interval=0.002) as peak:
        engine = Engine.from_pretrained(vram_budget_gb=minimum / GiB, **options)
        engine.generate("a cat walks", seconds=1, fps=8, steps=1, latent_window_size=1, resolution=64)
    streamer = engine.placement.streamer()
    print(json.dumps({"grown": peak.peak_bytes - peak.start_bytes, "streamed": len(engine.memory_plan.streamed_blocks),
                      "bytes_streamed": streamer.stats.bytes_streamed, "per_pass": streamer.streamed_bytes}))
""")


@pytest.mark.parametrize("layout", ["folder", "single file"])
def test_loading_with_streaming_never_reads_the_checkpoint_into_anonymous_memory(
        layout, tmp_path_factory, hunyuan_video_base_folder, flux_redux_folder):
    root = tmp_path_factory.getbasetemp() / "larger_transformer"
    if not (root / "FramePack_larger_bf16.safetensors").exists():
        write_larger_transformer(root / "FramePackI2V_HY")
    folder, single = root / "FramePackI2V_HY", root / "FramePack_larger_bf16.safetensors"
    checkpoint_bytes = single.stat().st_size
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder if layout == "folder" else single), str(hunyuan_video_base_folder),
         str(flux_redux_folder)], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
        timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["streamed"] == 32 and measured["per_pass"] > 0.9 * checkpoint_bytes
    assert measured["bytes_streamed"] >= measured["per_pass"] and measured["bytes_streamed"] % measured["per_pass"] == 0
    # Two slots of one block each, activations and the small models: a fraction of the checkpoint.
    assert measured["grown"] < 0.5 * checkpoint_bytes, (measured, checkpoint_bytes)


def test_bench_compares_resident_and_streamed_on_the_same_weights(monkeypatch):
    from framepack_engine.commands.bench import BenchSettings, bench_memory_plan, parse_compare, run_benchmark
    from framepack_engine.runtime.offload import tensor_bytes
    from framepack_engine.models.presets import DIT_PRESETS

    # With one block of each kind two slots take as much as the blocks: give the tiny preset enough to stream.
    monkeypatch.setitem(DIT_PRESETS, "tiny", {**DIT_PRESETS["tiny"], "num_layers": 3, "num_single_layers": 3})
    settings = BenchSettings(preset="tiny", device="cpu", resolution=64, latent_window_size=2, steps=2, warmup=0,
                             matmul_size=64, prompt_tokens=5)
    meta = FramePackDiT.from_config(DIT_PRESETS["tiny"], device="meta", dtype=torch.float32)
    minimum = bench_memory_plan(meta, settings, torch.device("cpu")).minimum_budget_bytes
    compare = parse_compare(f"vram_budget_gb=none,{(minimum + 4096) / GiB!r}")
    assert compare[1][0] is None
    results = run_benchmark(settings, compare)
    resident, streamed = results["runs"]
    assert resident["bytes_streamed_per_step"] == 0 and not resident["memory_plan"]["streamed_blocks"]
    assert list(streamed["memory_plan"]["streamed_blocks"]) == list(range(6))
    kept = meta.modules_used_outside_blocks()
    assert streamed["bytes_streamed_per_step"] == sum(tensor_bytes(block, skip=kept) for block in meta.blocks)
    assert streamed["memory"]["host_rss_anon_peak_bytes"] > 0
    assert results["comparisons"][1]["output_relative_error_vs_reference"] == 0.0


def test_closing_a_streamed_engine_gives_its_slots_and_thread_back(framepack_transformer_folder,
                                                                   hunyuan_video_base_folder, flux_redux_folder):
    import threading

    folders = (framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder)
    with load(*folders) as resident:
        minimum = resident.memory_plan.minimum_budget_bytes
    with load(*folders, vram_budget_gb=minimum / GiB) as engine:
        streamer = engine.placement.streamer()
        engine.generate("a cat walks", image=gradient_image(), **FAST)
        assert any(thread.name == "block-streamer" and thread.is_alive() for thread in threading.enumerate())
    assert engine.placement is None and not streamer.allocated
    assert not any(thread.name == "block-streamer" and thread.is_alive() for thread in threading.enumerate())
    engine.close()  # twice is fine
    with pytest.raises(FramePackError, match="closed"):
        engine.generate("a cat walks", image=gradient_image(), **FAST)
