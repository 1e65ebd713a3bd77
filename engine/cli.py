"""The `framepack` command: generate a video, show what this machine offers.

A user mistake prints one line naming the problem and the fix and exits with status 2, never a traceback.
Ctrl-C during generation stops at the next step and keeps (and saves) every finished section.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from engine.errors import FramePackError

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def add_generate_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="the prompt (or use --prompt)")
    parser.add_argument("--prompt", help="what happens in the video")
    parser.add_argument("--negative-prompt", default="", help="used only when --cfg > 1")
    parser.add_argument("--image", help="start image (image-to-video); none = text-to-video from a black frame")
    parser.add_argument("--end-image", help="end image (first-last-frame video; bidirectional model only)")
    parser.add_argument("--input-video", help="a video to extend (F1 model only)")
    parser.add_argument("--seconds", type=float, default=5.0, help="video length (default 5)")
    parser.add_argument("--fps", type=float, default=30.0, help="frame rate (default 30)")
    parser.add_argument("--seed", type=int, default=31337)
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per section (default 25)")
    parser.add_argument("--distilled-guidance", type=float, default=10.0, help="distilled guidance scale (default 10)")
    parser.add_argument("--cfg", type=float, default=1.0, help="real classifier-free guidance; 1 = off (default)")
    parser.add_argument("--guidance-rescale", type=float, default=0.0)
    parser.add_argument("--latent-window-size", type=int, default=9, help="latent frames per section (default 9)")
    parser.add_argument("--resolution", type=int, default=None, help="bucket resolution (default 640; tiny preset 64)")
    parser.add_argument("--width", type=int, help="text-to-video width before bucketing")
    parser.add_argument("--height", type=int, help="text-to-video height before bucketing")
    parser.add_argument("--sampler", default="unipc", choices=["unipc", "unipc_bh2", "euler"])
    parser.add_argument("--shift", type=float, help="fixed flux shift (default: from the token count)")
    parser.add_argument("--cache", choices=["teacache", "magcache"], help="step caching (not available yet)")
    parser.add_argument("--cache-threshold", type=float)
    parser.add_argument("--section-prompts", help="suffixes, one per line (or '|'), or timestamped '[0s: ...] [2s: ...]'")
    parser.add_argument("--init-strength", type=float, default=1.0, help="start image strength; < 1 mixes in noise")
    parser.add_argument("--end-strength", type=float, default=1.0, help="end image strength")
    parser.add_argument("--vision-strength", type=float, default=1.0, help="scale of the SigLIP image conditioning")
    parser.add_argument("--preset", choices=["tiny"], help="a random-weight model built in memory (its video is noise)")
    parser.add_argument("--transformer", default="lllyasviel/FramePackI2V_HY", help="repo id, folder or .safetensors")
    parser.add_argument("--base", default="hunyuanvideo-community/HunyuanVideo", help="text encoders, tokenizers, VAE")
    parser.add_argument("--image-encoder", default="lllyasviel/flux_redux_bfl", help="SigLIP feature extractor + encoder")
    parser.add_argument("--variant", default="auto", choices=["auto", "bidirectional", "f1"])
    parser.add_argument("--offline", action="store_true", help="never download; use the local Hugging Face cache only")
    parser.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "triton", "flash", "xformers", "sage"])
    parser.add_argument("--fused-kernels", action="store_true",
                        help="run the DiT's norms, modulation and patchify as Triton kernels (CUDA)")
    parser.add_argument("--vram-budget-gb", type=float, help="memory budget for VAE tiling (GB)")
    parser.add_argument("--quantize", help="weight quantization (not available yet)")
    parser.add_argument("--out", help="output: .mp4/.webm/.mkv/.mov, .safetensors, or a folder for PNG frames")
    parser.add_argument("--codec", default="libx264", help="video encoder (default libx264; see framepack info)")
    parser.add_argument("--crf", type=int, default=16, help="quality for x264/x265/vp9/av1 (default 16)")
    parser.add_argument("--pixel-format", help="e.g. yuv420p (default), yuv444p")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _section_prompts(text):
    if not text:
        return None
    if "[" in text:
        return text
    return [part.strip() for part in text.replace("|", "\n").splitlines() if part.strip()]


def _default_out(mode: str, seed: int) -> Path:
    return Path("outputs") / f"framepack_{mode}_{seed}_{time.strftime('%Y%m%d-%H%M%S')}.mp4"


def command_generate(args) -> int:
    import torch

    from engine.pipeline import Engine, GenerationCancelled
    from engine.video import Video, check_output

    prompt = args.prompt if args.prompt is not None else " ".join(args.prompt_words)
    if args.quantize:
        raise FramePackError("Weight quantization is not available in this version: drop --quantize.")
    mode = "flf2v" if args.end_image else ("extend" if args.input_video else ("i2v" if args.image else "t2v"))
    out = Path(args.out) if args.out else _default_out(mode, args.seed)
    check_output(out, args.codec)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    variant = "bidirectional" if args.variant == "auto" and args.preset else args.variant
    if args.preset:
        engine = Engine.from_preset(args.preset, variant=variant, device=device)
    else:
        engine = Engine.from_pretrained(
            transformer=args.transformer, base=args.base, image_encoder=args.image_encoder, variant=variant,
            device=device, dtype=getattr(torch, DTYPES[args.dtype]), vram_budget_gb=args.vram_budget_gb,
            attention=args.attention, allow_download=not args.offline, fused_kernels=args.fused_kernels)

    cancel = threading.Event()
    progress = _Progress(enabled=not args.quiet)

    options = dict(
        negative_prompt=args.negative_prompt, seconds=args.seconds, fps=args.fps, seed=args.seed, steps=args.steps,
        distilled_guidance=args.distilled_guidance, cfg=args.cfg, guidance_rescale=args.guidance_rescale,
        latent_window_size=args.latent_window_size, resolution=args.resolution, width=args.width, height=args.height,
        sampler=args.sampler, shift=args.shift, cache=args.cache, cache_threshold=args.cache_threshold,
        section_prompts=_section_prompts(args.section_prompts), init_strength=args.init_strength,
        end_strength=args.end_strength, vision_strength=args.vision_strength, input_video=args.input_video,
        callback=progress.step, cancel=cancel)

    saved = None
    try:
        for section in engine.stream(prompt, image=args.image, end_image=args.end_image, **options):
            progress.section_done(section)
            # Each finished section is written at once (atomically), so an interruption loses nothing finished.
            video = Video(section.frames, fps=args.fps, metadata=engine._metadata(section.stats["settings"]),
                          latents=section.latents)
            saved = video.save(out, codec=args.codec, crf=args.crf, pixel_format=args.pixel_format)
    except KeyboardInterrupt:
        cancel.set()
        print("\nInterrupted: the finished sections are saved." if saved else "\nInterrupted before a section finished.",
              file=sys.stderr)
        return 130
    except GenerationCancelled:
        pass
    finally:
        progress.close()
    if saved is None:
        raise FramePackError("No section finished, so nothing was written.")
    print(f"Saved {saved}")
    return 0


class _Progress:
    """Progress bars: one over sections, one over the steps of the current section."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.sections = None
        self.steps = None

    def step(self, info: dict):
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.sections is None:
            self.sections = tqdm(total=info["sections"], desc="sections", unit="section", position=0)
        if self.steps is None or info["i"] == 0:
            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(total=info["total_steps"], desc=f"section {info['section'] + 1}", unit="step",
                              position=1, leave=False)
        self.steps.update(1)

    def section_done(self, section):
        if self.sections is not None:
            self.sections.update(1)
            self.sections.set_postfix(seconds=f"{section.stats['seconds']:.1f}", frames=len(section.frames))

    def close(self):
        for bar in (self.steps, self.sections):
            if bar is not None:
                bar.close()


def command_info(args) -> int:
    import platform

    import torch

    from engine import __version__
    from engine.attention import BACKEND_NAMES, available_backends, resolve_backend
    from engine.video import available_codecs

    print(f"framepack-engine {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for package in ("triton", "transformers", "safetensors", "av", "flash_attn", "sageattention", "xformers"):
        try:
            module = __import__(package)
            print(f"  {package}: {getattr(module, '__version__', 'installed')}")
        except Exception:
            print(f"  {package}: not installed")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            print(f"device cuda:{index}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, "
                  f"compute {properties.major}.{properties.minor}, bf16 {torch.cuda.is_bf16_supported()}")
        device = "cuda"
    else:
        print("device: cpu (no CUDA device found)")
        device = "cpu"
    print(f"attention backends usable here: {', '.join(available_backends(device))} "
          f"(auto -> {resolve_backend('auto', device).name}; all: {', '.join(BACKEND_NAMES)})")
    print(f"video encoders: {', '.join(available_codecs()[:16])}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="framepack", description="FramePack video generation engine")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate a video")
    add_generate_arguments(generate)
    generate.set_defaults(run=command_generate)
    info = commands.add_parser("info", help="device, attention backends, versions")
    info.set_defaults(run=command_info)
    from engine.benchmark import add_bench_command

    add_bench_command(commands)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except FramePackError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
