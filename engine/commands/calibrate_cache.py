"""`framepack calibrate-cache`: one generation with every step computed, its MagCache ratios saved as JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from framepack_engine.commands.common import interruption_status, quiet_libraries
from framepack_engine.errors import FramePackError
from framepack_engine.generation.calibration import CalibrationRecorder, MagCacheCalibration
from framepack_engine.official import VAE_SPATIAL_COMPRESSION
from framepack_engine.pipeline import Engine
from framepack_engine.resolve import Request, resolve_models, resolve_request
from framepack_engine.settings import GenerationSettings, ModelSettings, add_flags, given_flags


def calibrate(engine, prompt: str = "", image=None, end_image=None, *, input_video=None, callback=None, cancel=None,
              request: Request | None = None, **options) -> MagCacheCalibration:
    """Runs a generation with every step computed and returns its MagCache calibration (save it with `.save`).
    Options: those of `Engine.generate` (steps, cfg, seconds, resolution, ...), without `cache`; or `request`, a
    framepack_engine.resolve.Request resolved before loading (the command's), alone."""
    settings = request.settings if request is not None else engine.settings(prompt, **options)
    if settings.cache is not None:
        raise FramePackError("A calibration runs without a step cache: leave cache unset.")
    recorder = CalibrationRecorder(settings.steps)
    bucket = None
    inputs = {"request": request} if request is not None else \
        {"prompt": prompt, "image": image, "end_image": end_image, "input_video": input_video, **options}
    for result in engine.stream(callback=callback, cancel=cancel, step_caches=recorder, **inputs):
        bucket = [size * VAE_SPATIAL_COMPRESSION for size in result.latents.shape[-2:]]
    random_weights = engine.name.startswith("preset:")
    note = ("Recorded on random weights (a preset): these ratios exercise MagCache's mechanics and say nothing of a "
            "real model." if random_weights else
            f"Recorded by framepack calibrate-cache on {engine.name}: valid for this model, bucket and step count.")
    return recorder.calibration(model=engine.name, variant=engine.variant, bucket=bucket,
                                latent_window_size=settings.latent_window_size, sampler=settings.sampler,
                                shift=settings.shift, cfg=settings.cfg, random_weights=random_weights, note=note)


CACHE_OPTIONS = ("cache", "cache_threshold", "magcache_k", "magcache_retention", "magcache_calibration")


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    """Adds `calibrate-cache` to the `framepack` sub-commands."""
    parser = subparsers.add_parser(
        "calibrate-cache", help="record MagCache's per-step magnitude ratios for a model (a small JSON)",
        description="Run one generation with every step computed and save the per-step ratios of the block stack's "
                    "residual magnitudes that MagCache needs, for this model, bucket and step count.")
    parser.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="the prompt (or use --prompt)")
    parser.add_argument("--image", help="start image (a typical input for the model)")
    parser.add_argument("--end-image", help="end image (bidirectional model only)")
    parser.add_argument("--out", required=True, help="the calibration to write, e.g. magcache.json")
    add_flags(parser.add_argument_group("generation"), GenerationSettings, skip=CACHE_OPTIONS)
    models = parser.add_argument_group("model")
    models.add_argument("--preset", choices=["tiny"], help="a random-weight model (tests the mechanics only)")
    add_flags(models, ModelSettings)
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(run=command_calibrate_cache)
    return parser


def command_calibrate_cache(args) -> int:
    prompt = args.prompt if args.prompt is not None else " ".join(args.prompt_words)
    options = given_flags(args, GenerationSettings, skip=("prompt", *CACHE_OPTIONS))
    settings = GenerationSettings.from_options(prompt=prompt, **options)
    model_settings = ModelSettings.from_options(**given_flags(args, ModelSettings))
    out = Path(args.out)
    if out.suffix.lower() != ".json" or not out.parent.is_dir():
        raise FramePackError(f"--out must be a .json file in an existing folder, got {out.name!r}: e.g. "
                             "--out magcache.json.")
    models = resolve_models(model_settings, args.preset, given=given_flags(args, ModelSettings))
    # The inputs read and checked (a missing or truncated image is one line) before the model loads, as generate does.
    request = resolve_request(settings, models.variant, image=args.image, end_image=args.end_image,
                              default_resolution=models.default_resolution)
    if args.quiet:
        quiet_libraries()

    def progress(info):
        if not args.quiet and info["i"] == info["total_steps"] - 1:
            print(f"[calibrate-cache] section {info['section'] + 1}/{info['sections']} recorded", file=sys.stderr)

    try:
        engine = Engine.from_resolved(models, request)
        calibration = calibrate(engine, request=request, callback=progress)
    except KeyboardInterrupt as interruption:
        print("\nInterrupted: no calibration was written.", file=sys.stderr)
        return interruption_status(interruption)
    calibration.save(out)
    ratios = ", ".join(f"{ratio:.3f}" for ratio in calibration.ratios["positive"])
    print(f"MagCache ratios over {calibration.sections} sections at {settings.steps} steps: {ratios}")
    if calibration.random_weights:
        print("note: random weights; these ratios test the mechanics only.")
    print(f"Saved {out.name}: use it with --cache magcache --magcache-calibration {out.name}")
    return 0
