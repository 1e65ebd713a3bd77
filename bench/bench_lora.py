"""What a live LoRA costs per DiT call, against the same LoRA fused (which costs nothing: the weights are merged).

    python -m bench.bench_lora                                   # the `small` preset's width, a few blocks, on a CPU
    python -m bench.bench_lora --device cuda --preset full --layers 20 --single-layers 40 --size 80

Random weights and a random rank-`--rank` LoRA on every linear layer of the blocks; each variant is timed on the same
inputs in the same run, and reported as a ratio to the fused one. On a CPU the clock is this process's CPU time
(a shared machine's other load then shifts the figures less); on a GPU, wall time after a synchronize.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from framepack_engine.models.dit import FramePackDiT
from framepack_engine.models.history import HistoryContext
from framepack_engine.runtime.lora import LoraSet
from framepack_engine.models.presets import DIT_PRESETS, randomize_weights_


def write_random_lora(path: Path, dit: FramePackDiT, rank: int, seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in dit.linear_layers().items():
        if "blocks." not in name:
            continue
        tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator)
        tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator)
    save_file(tensors, path)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_lora", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=sorted(DIT_PRESETS))
    parser.add_argument("--layers", type=int, default=2, help="double-stream blocks")
    parser.add_argument("--single-layers", type=int, default=4, help="single-stream blocks")
    parser.add_argument("--size", type=int, default=16, help="latent height and width (80 is the 640 bucket)")
    parser.add_argument("--frames", type=int, default=9, help="latent frames of the section")
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 otherwise")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    config = {**DIT_PRESETS[args.preset], "num_layers": args.layers, "num_single_layers": args.single_layers}
    generator = torch.Generator(device).manual_seed(0)
    dit = randomize_weights_(FramePackDiT.from_config(config, device=device, dtype=dtype).eval(), generator)
    latents = torch.randn(1, config["in_channels"], args.frames, args.size, args.size, device=device, dtype=dtype)
    text = torch.randn(1, 64, config["text_embed_dim"], device=device, dtype=dtype)
    pooled = torch.randn(1, config["pooled_projection_dim"], device=device, dtype=dtype)
    images = torch.randn(1, 16, config["image_proj_dim"], device=device, dtype=dtype)

    def call():
        with torch.no_grad():
            dit.velocity(latents, torch.tensor([500.0], device=device), text, None, pooled,
                         torch.tensor([10000.0], device=device), None, HistoryContext(), images)
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def timed() -> float:
        call()  # warm-up
        times = []
        for _ in range(args.repeats):
            start = clock()
            call()
            times.append(clock() - start)
        return statistics.median(times)

    results = {}
    with tempfile.TemporaryDirectory() as folder:
        first = write_random_lora(Path(folder) / "first.safetensors", dit, args.rank, 1)
        second = write_random_lora(Path(folder) / "second.safetensors", dit, args.rank, 2)
        loras = LoraSet(dit)
        loras.load(first, 0.5, mode="fused")
        results["fused (1 LoRA)"] = timed()
        loras.unload("first")
        loras.load(first, 0.5, mode="live")
        results["live, 1 LoRA"] = timed()
        loras.load(second, 0.5, mode="live")
        results["live, 2 LoRAs"] = timed()
    tokens = args.frames * (args.size // 2) ** 2
    print(f"{args.preset} width {config['num_attention_heads'] * config['attention_head_dim']}, "
          f"{args.layers}+{args.single_layers} blocks, {tokens} noisy tokens, rank {args.rank}, {dtype}, {device}, "
          f"{torch.get_num_threads()} threads")
    baseline = results["fused (1 LoRA)"]
    for label, seconds in results.items():
        print(f"  {label:16s} {seconds * 1000:9.1f} ms/call   x{seconds / baseline:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
