"""Host RAM of the streamed models at full size on a CPU: the DiT, the Llama text encoder and a whole generation.

Writes random-weight checkpoints of the real sizes in the real layouts once into a scratch folder outside the
repository (bfloat16 weights, streamed to disk tensor by tensor, so writing needs no more RAM than one tensor):

    FramePackI2V_HY/   the 13B DiT at the folder root: config.json, three shards and their index (about 25.7 GB)
    HunyuanVideo/      text_encoder/ (Llama 8B: four shards and their index, about 16 GB), text_encoder_2/ (CLIP-L),
                       tokenizer/ and tokenizer_2/ (small stand-ins: the weights are random anyway), vae/
    flux_redux_bfl/    image_encoder/ (SigLIP so400m) and feature_extractor/ (384 px)

then measures each part in a fresh process, with the files evicted from the page cache first (so the weights are
really read from disk): peak anonymous RSS (RssAnon: not the page cache of the mapped files), bytes read from
storage (/proc/self/io read_bytes), bytes the streamer copied, and the time.

    python -m bench.offload_host_memory --scratch /path/outside/the/repo [--parts dit,text,generate] [--delete]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 10 * 10**9  # about the official shards' size
DTYPE_NAMES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
PROMPT = "a cat walks on the grass in the sun, the camera pans over a city"


# --------------------------------------------------------------------------------------------------------------------
# Writing checkpoints without holding them


POOL_VALUES = 1 << 26  # 64 Mi random values per file, sliced for every matrix (drawing 21 billion would take hours)


def small_tensor(name: str, shape, seed: int) -> torch.Tensor:
    """A vector as framepack_engine.models.presets.randomize_weights_ draws it: norm weights near 1, small biases."""
    values = torch.randn(tuple(shape), generator=torch.Generator().manual_seed(seed))
    return values.mul_(0.1).add_(1.0) if "norm" in name and name.endswith("weight") else values.mul_(0.05)


def write_safetensors(path: Path, entries: list[tuple[str, tuple]], dtype: torch.dtype, seed: int) -> int:
    """One safetensors file of random tensors, written tensor by tensor (the header first, with every offset).

    Matrices are slices of one pool of N(0, 0.01^2) values at random offsets (0.01 is about 0.5 / sqrt(fan_in) at
    the models' widths): random weights at the cost of writing them."""
    header, offset = {}, 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    generator = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL_VALUES, generator=generator) * 0.01).to(dtype).view(torch.uint8).numpy()
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for index, (name, shape) in enumerate(entries):
            if len(shape) < 2:
                file.write(small_tensor(name, shape, seed + index).to(dtype).view(torch.uint8).numpy().tobytes())
                continue
            remaining = math.prod(shape) * dtype.itemsize
            start = int(torch.randint(0, POOL_VALUES, (), generator=generator)) * dtype.itemsize
            while remaining:
                piece = pool[start:start + remaining]
                file.write(memoryview(piece))
                remaining -= len(piece)
                start = 0
    return offset


def write_sharded(folder: Path, model: torch.nn.Module, dtype: torch.dtype, stem: str, index_name: str,
                  seed: int) -> int:
    """The model's state dict (shapes from a meta-device model) as shards `stem-0000i-of-0000n.safetensors` of about
    SHARD_BYTES each, plus `index_name` mapping every key to its shard."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]
    shards, current, size = [], [], 0
    for name, shape in entries:
        nbytes = math.prod(shape) * dtype.itemsize
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for number, shard in enumerate(shards, 1):
        file_name = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / file_name, shard, dtype, seed + 100_000 * number)
        weight_map.update({name: file_name for name, _ in shard})
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def write_checkpoints(scratch: Path, log) -> dict:
    """Every model of the official layout with random weights of the real sizes (skips what is already there)."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, \
        SiglipVisionModel

    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.models.footprints import OFFICIAL_CLIP, OFFICIAL_LLAMA, OFFICIAL_SIGLIP
    from framepack_engine.models.presets import FULL_DIT_CONFIG, tiny_clip_tokenizer, tiny_llama_tokenizer
    from framepack_engine.models.vae import HunyuanVideoVAE

    paths = {"transformer": scratch / "FramePackI2V_HY", "base": scratch / "HunyuanVideo",
             "image_encoder": scratch / "flux_redux_bfl"}
    done = scratch / "written.json"
    if done.exists():
        return {key: Path(value) for key, value in json.loads(done.read_text()).items()}
    dtype = torch.bfloat16
    start = time.perf_counter()

    log("writing the 13B DiT (about 25.7 GB)")
    dit = FramePackDiT.from_config(FULL_DIT_CONFIG, device="meta", dtype=dtype)
    write_sharded(paths["transformer"], dit, dtype, "diffusion_pytorch_model",
                  "diffusion_pytorch_model.safetensors.index.json", seed=1)
    (paths["transformer"] / "config.json").write_text(json.dumps(
        {"_class_name": "HunyuanVideoTransformer3DModelPacked", **FULL_DIT_CONFIG}, indent=2))

    log("writing Llama 8B (about 16 GB), CLIP-L and the VAE")
    base = paths["base"]
    with torch.device("meta"):
        llama_config = LlamaConfig(**OFFICIAL_LLAMA, torch_dtype="bfloat16")
        llama = LlamaModel(llama_config)
        clip_config = CLIPTextConfig(**OFFICIAL_CLIP, torch_dtype="bfloat16")
        clip = CLIPTextModel(clip_config)
        siglip_config = SiglipVisionConfig(**OFFICIAL_SIGLIP, torch_dtype="bfloat16")
        siglip = SiglipVisionModel(siglip_config)
    write_sharded(base / "text_encoder", llama, dtype, "model", "model.safetensors.index.json", seed=2)
    llama_config.architectures = ["LlamaModel"]
    llama_config.save_pretrained(base / "text_encoder")
    write_sharded(base / "text_encoder_2", clip, dtype, "model", "model.safetensors.index.json", seed=3)
    clip_config.architectures = ["CLIPTextModel"]
    clip_config.save_pretrained(base / "text_encoder_2")
    tiny_llama_tokenizer().save_pretrained(base / "tokenizer")
    tiny_clip_tokenizer().save_pretrained(base / "tokenizer_2")
    vae = HunyuanVideoVAE.from_config({}, device="meta")
    (base / "vae").mkdir(parents=True, exist_ok=True)
    write_safetensors(base / "vae" / "diffusion_pytorch_model.safetensors",
                      [(name, tuple(t.shape)) for name, t in vae.state_dict().items()], torch.float16, seed=4)
    (base / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLHunyuanVideo"}))

    log("writing SigLIP so400m")
    images = paths["image_encoder"]
    write_sharded(images / "image_encoder", siglip, dtype, "model", "model.safetensors.index.json", seed=5)
    siglip_config.architectures = ["SiglipVisionModel"]
    siglip_config.save_pretrained(images / "image_encoder")
    (images / "feature_extractor").mkdir(parents=True, exist_ok=True)
    (images / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor", "image_std": [0.5, 0.5, 0.5], "resample": 3,
        "rescale_factor": 1 / 255, "size": {"height": 384, "width": 384}}))
    done.write_text(json.dumps({key: str(value) for key, value in paths.items()}))
    log(f"written in {time.perf_counter() - start:.0f} s")
    return paths


# --------------------------------------------------------------------------------------------------------------------
# Measuring, in a fresh process per part


def evict(folder: Path) -> None:
    """Drops the folder's files from the page cache (POSIX_FADV_DONTNEED), so the run reads them from disk."""
    for path in Path(folder).rglob("*.safetensors"):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def read_bytes() -> int:
    with open("/proc/self/io") as file:
        return next(int(line.split()[1]) for line in file if line.startswith("read_bytes:"))


def measure_dit(paths: dict) -> dict:
    """One DiT call at a small latent size, every block streamed from the mapped shards."""
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.runtime.host_memory import AnonymousMemoryPeak
    from framepack_engine.runtime.placement import DiTPlacement
    from framepack_engine.runtime.planner import plan_memory
    from framepack_engine.models.footprints import engine_footprint

    evict(paths["transformer"])
    size, window, text_tokens, image_tokens = (64, 64), 1, 16, 16
    reads, start = read_bytes(), time.perf_counter()
    with AnonymousMemoryPeak() as peak:
        dit = FramePackDiT.from_pretrained(paths["transformer"], dtype=torch.bfloat16).eval()
        dit.set_output_precision(True)
        footprint = engine_footprint(dit)
        options = dict(device="cpu", size=size, latent_window_size=window, text_tokens=text_tokens,
                       image_tokens=image_tokens)
        smallest = plan_memory(footprint, 2**62, **options).minimum_budget_bytes
        plan = plan_memory(footprint, smallest, **options)
        placement = DiTPlacement(dit, plan, "cpu")
        loaded, load_reads = time.perf_counter(), read_bytes() - reads
        generator = torch.Generator().manual_seed(0)
        config = dit.config
        with torch.inference_mode():
            velocity = dit.velocity(
                torch.randn(1, config.in_channels, window, size[0] // 8, size[1] // 8, generator=generator),
                torch.tensor([900.0]), torch.randn(1, text_tokens, config.text_embed_dim, generator=generator), None,
                torch.randn(1, config.pooled_projection_dim, generator=generator), torch.tensor([10000.0]), None,
                None, torch.randn(1, image_tokens, config.image_proj_dim, generator=generator))
    stats = placement.streamer.stats
    return {"part": "dit", "checkpoint_bytes": sum(p.stat().st_size for p in paths["transformer"].glob("*.safetensors")),
            "rss_anon_start_bytes": peak.start_bytes, "rss_anon_peak_bytes": peak.peak_bytes,
            "read_bytes": read_bytes() - reads, "load_read_bytes": load_reads, "bytes_streamed": stats.bytes_streamed,
            "streamed_blocks": len(plan.streamed_blocks), "slots": plan.slots, "slot_bytes": plan.slot_bytes,
            "tokens": plan.tokens, "load_seconds": loaded - start, "forward_seconds": time.perf_counter() - loaded,
            "compute_waits": stats.compute_waits, "compute_wait_seconds": stats.compute_wait_seconds,
            "finite": bool(torch.isfinite(velocity).all())}


def measure_text(paths: dict) -> dict:
    """One prompt through Llama 8B (its layers streamed from the mapped shards) and CLIP-L, in float32 as the
    engine runs encoders on a CPU."""
    from framepack_engine.models.conditioning import TextEncoder
    from framepack_engine.runtime.host_memory import AnonymousMemoryPeak
    from framepack_engine.runtime.placement import Placement
    from framepack_engine.models.footprints import official_plan

    evict(paths["base"] / "text_encoder")
    reads, start = read_bytes(), time.perf_counter()
    with AnonymousMemoryPeak() as peak:
        encoder = TextEncoder.from_pretrained(paths["base"], device="cpu", dtype=None)
        plan, _ = official_plan("cpu", vram_budget_gb=8)
        plan = dataclasses.replace(plan, placements={"text_encoder": "stream"})
        placement = Placement(plan, "cpu", None, text_encoder=encoder, encoder_dtype=torch.float32)
        loaded = time.perf_counter()
        with torch.no_grad(), placement.use("text_encoder"):
            embedding = encoder.encode(PROMPT)
    streamer = placement._streamers["text_encoder"]
    files = list((paths["base"] / "text_encoder").glob("*.safetensors"))
    return {"part": "text", "checkpoint_bytes": sum(p.stat().st_size for p in files),
            "rss_anon_start_bytes": peak.start_bytes, "rss_anon_peak_bytes": peak.peak_bytes,
            "read_bytes": read_bytes() - reads, "bytes_streamed": streamer.stats.bytes_streamed,
            "prompt_tokens": embedding.tokens, "load_seconds": loaded - start,
            "encode_seconds": time.perf_counter() - loaded, "finite": bool(torch.isfinite(embedding.llama).all())}


def measure_generate(paths: dict) -> dict:
    """The whole path through the Engine: load under a 6 GB plan (the engine's encoders run in float32 on a CPU), then
    one section (one step) at 64 px."""
    from framepack_engine import Engine
    from framepack_engine.runtime.host_memory import AnonymousMemoryPeak

    for folder in paths.values():
        evict(folder)
    reads, start = read_bytes(), time.perf_counter()
    with AnonymousMemoryPeak() as peak:
        engine = Engine.from_pretrained(transformer=str(paths["transformer"]), base=str(paths["base"]),
                                        image_encoder=str(paths["image_encoder"]), device="cpu", vram_budget_gb=6,
                                        attention="sdpa")
        loaded = time.perf_counter()
        video = engine.generate(PROMPT, seconds=0.5, fps=8, steps=1, latent_window_size=1, resolution=64, seed=1)
    plan = engine.memory_plan
    return {"part": "generate", "rss_anon_start_bytes": peak.start_bytes, "rss_anon_peak_bytes": peak.peak_bytes,
            "read_bytes": read_bytes() - reads, "dit_bytes_streamed": engine.placement.dit.streamer.stats.bytes_streamed,
            "frames": int(video.frames.shape[0]), "load_seconds": loaded - start,
            "generate_seconds": time.perf_counter() - loaded, "plan": plan.lines()}


MEASURES = {"dit": measure_dit, "text": measure_text, "generate": measure_generate}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scratch", required=True, help="folder for the checkpoints (outside the repository)")
    parser.add_argument("--parts", default="dit,text,generate", help="what to measure: dit, text, generate")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the measuring processes")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--delete", action="store_true", help="delete the scratch folder afterwards")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: run one part in this process
    args = parser.parse_args(argv)
    scratch = Path(args.scratch).resolve()
    if Path(__file__).resolve().parents[1] in scratch.parents:
        parser.error("--scratch must be outside the repository")
    parts = args.parts.split(",")
    unknown = [part for part in parts if part not in MEASURES]
    if unknown:  # before hours of checkpoint writing
        parser.error(f"unknown part {unknown[0]!r} in --parts: choose from {', '.join(MEASURES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda message: print(f"[offload-host-memory] {message}", file=sys.stderr, flush=True)  # noqa: E731
    if args.measure:
        paths = {key: Path(value) for key, value in json.loads((scratch / "written.json").read_text()).items()}
        print(json.dumps(MEASURES[args.measure](paths)))
        return 0
    scratch.mkdir(parents=True, exist_ok=True)
    write_checkpoints(scratch, log)
    results, failed = [], []
    for part in parts:
        log(f"measuring {part}")
        command = [sys.executable, "-m", "bench.offload_host_memory", "--scratch", str(scratch), "--measure", part]
        if args.threads:
            command += ["--threads", str(args.threads)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
        if done.returncode:
            log(f"{part} failed (exit status {done.returncode}):\n{done.stderr[-4000:]}")
            failed.append(part)
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        log(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.delete:
        shutil.rmtree(scratch)
    if failed:  # a run with a failed part is not a measurement: scripts and CI must see it
        log(f"failed: {', '.join(failed)} ({len(results)} of {len(parts)} parts measured)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
