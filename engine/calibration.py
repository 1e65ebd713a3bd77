"""MagCache calibration: how much the block stack's residual grows or shrinks from one step to the next.

MagCache decides from `ratios[t]` = mean over tokens of |residual t| / |residual t-1| (the residual is the block
stack's output minus its input image tokens, as engine.step_cache keeps it). These ratios are a property of a model,
a step count (and its sigma schedule, hence the bucket) far more than of a prompt, so they are recorded once: a
generation runs with every step computed, each section's ratios are recorded per guidance branch, and their mean
over sections is saved as a small JSON (`framepack calibrate-cache`, or `calibrate(engine, ...)` from Python) that
`generate(cache="magcache", magcache_calibration=path)` loads.

No calibration ships with the engine: none has been recorded on the real weights yet. A calibration recorded on a
preset's random weights is marked `"random_weights": true`: it exercises the mechanics and says nothing of a real
model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.buckets import VAE_SPATIAL_COMPRESSION
from engine.errors import FramePackError, FramePackWarning
from engine.step_cache import BRANCHES, StepCache, StepCaches
from engine.video import atomic_path

FORMAT = "framepack-magcache-calibration"
VERSION = 1


@dataclass
class MagCacheCalibration:
    """Per-step magnitude ratios for a model, bucket and step count; `ratios[branch][0]` is 1 (no earlier step)."""

    steps: int
    ratios: dict[str, list[float]]  # "positive", and "negative" when recorded with cfg > 1
    model: str = ""
    variant: str = ""
    bucket: list[int] | None = None  # [height, width] in pixels
    latent_window_size: int | None = None
    sampler: str = ""
    shift: float | None = None  # the fixed flux shift; None: from the token count
    cfg: float = 1.0
    sections: int = 0  # sections averaged
    random_weights: bool = False
    note: str = ""
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%d"))

    def ratios_for(self, branch: str, steps: int) -> list[float]:
        """The ratios of a guidance branch for a generation of `steps` steps, or a FramePackError with the fix."""
        if steps != self.steps:
            raise FramePackError(f"The MagCache calibration was recorded for {self.steps} steps, this generation has "
                                 f"{steps}: calibrate for {steps} steps (framepack calibrate-cache --steps {steps}).")
        if branch not in self.ratios:
            raise FramePackError(f"The MagCache calibration has no ratios for the {branch} guidance branch (it was "
                                 "recorded with cfg 1): calibrate with the cfg you generate with.")
        return self.ratios[branch]

    def warn_if_recorded_otherwise(self, latent_window_size: int, sampler: str, shift: float | None) -> None:
        """A FramePackWarning when the generation's window, sampler or shift differ from the recorded ones: each
        changes the step-to-step residual magnitudes the ratios describe."""
        if self.latent_window_size is None:  # not recorded by calibrate-cache: no settings to compare
            return
        recorded = {"latent-window-size": self.latent_window_size, "sampler": self.sampler, "shift": self.shift}
        used = {"latent-window-size": latent_window_size, "sampler": sampler, "shift": shift}
        differ = [name for name in recorded if recorded[name] != used[name]]
        if differ:
            flags = " ".join(f"--{name} {used[name]}" if used[name] is not None else f"without --{name}"
                             for name in differ)
            warnings.warn(FramePackWarning(
                f"The MagCache calibration was recorded with {_describe(recorded, differ)}, this generation uses "
                f"{_describe(used, differ)}: its ratios may not fit; record one with these settings "
                f"(framepack calibrate-cache {flags})."), stacklevel=3)

    def warn_if_other_bucket(self, bucket: list[int]) -> None:
        """A FramePackWarning when the generation runs at another bucket (height, width) than the recorded one."""
        if self.bucket and list(self.bucket) != list(bucket):
            warnings.warn(FramePackWarning(
                f"The MagCache calibration was recorded at {self.bucket[0]}x{self.bucket[1]}, this generation runs at "
                f"{bucket[0]}x{bucket[1]}: its ratios may not fit; record one at this size with framepack "
                "calibrate-cache (the same image and resolution)."), stacklevel=3)

    def as_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    def save(self, path) -> Path:
        """Written whole or not at all (a temporary file renamed into place)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise FramePackError(f"A MagCache calibration is saved as .json, got {path.name!r}: name it e.g. "
                                 "magcache.json.")
        if not path.parent.is_dir():
            raise FramePackError(f"The folder of {path.name!r} does not exist: create it or pick another path.")
        with atomic_path(path) as temporary:
            temporary.write_text(json.dumps(self.as_json(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path) -> "MagCacheCalibration":
        path = Path(path)
        fix = "record one with framepack calibrate-cache --out magcache.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FramePackError(f"The MagCache calibration {path.name!r} does not exist: {fix}.") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FramePackError(
                f"The MagCache calibration {path.name!r} is not readable JSON ({error}): {fix}.") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise FramePackError(f"{path.name!r} is not a MagCache calibration (no \"format\": \"{FORMAT}\"): {fix}.")
        if data.get("version") != VERSION:
            raise FramePackError(f"{path.name!r} is a version {data.get('version')!r} calibration, this engine reads "
                                 f"version {VERSION}: {fix}.")
        known = set(cls.__dataclass_fields__)
        values = {key: value for key, value in data.items() if key in known}
        steps, ratios = values.get("steps"), values.get("ratios")
        if not isinstance(steps, int) or steps < 1 or not isinstance(ratios, dict) or "positive" not in ratios or any(
                branch not in BRANCHES or not isinstance(series, list) or len(series) != steps
                or not all(isinstance(ratio, (int, float)) and ratio > 0 for ratio in series)
                for branch, series in ratios.items()):
            raise FramePackError(f"{path.name!r} does not hold one positive ratio per step for each branch: {fix}.")
        return cls(**values)


class MagnitudeRecorder(StepCache):
    """Computes every step and records each step's residual magnitude relative to the previous step's. The ratios
    stay on the device until the section is finished (no host read per step)."""

    def __init__(self, steps: int, sink: list):
        super().__init__(steps)
        self.sink = sink  # receives this section's ratios (a list of floats, step 0 = 1) when it is finished
        self.previous_norms = None
        self.ratios: list[torch.Tensor] = []

    def after_computed_step(self, residual: torch.Tensor) -> None:
        norms = residual.float().norm(dim=-1)  # per token
        if self.previous_norms is not None:
            self.ratios.append((norms / self.previous_norms).mean())
        self.previous_norms = norms
        self.residual = None  # a recorder never skips, so it keeps no residual

    def release(self) -> None:
        super().release()
        if self.ratios:
            self.sink.append([1.0] + torch.stack(self.ratios).tolist())
        self.ratios, self.previous_norms = [], None


class CalibrationRecorder(StepCaches):
    """`run_sections`' make_step_cache for a calibration run: every step computed, ratios recorded per branch."""

    def __init__(self, steps: int):
        self.steps = steps
        self.recorded: dict[str, list[list[float]]] = {}
        super().__init__(lambda branch: MagnitudeRecorder(steps, self.recorded.setdefault(branch, [])))

    def calibration(self, **description) -> MagCacheCalibration:
        """The mean ratio per step over the finished sections; description: MagCacheCalibration's other fields."""
        complete = {branch: [series for series in recorded if len(series) == self.steps]
                    for branch, recorded in self.recorded.items()}
        if not complete.get("positive"):
            raise FramePackError("No section finished its steps, so nothing was calibrated: let the run finish.")
        ratios = {branch: [round(sum(values) / len(values), 6) for values in zip(*series)]
                  for branch, series in complete.items() if series}
        return MagCacheCalibration(steps=self.steps, ratios=ratios, sections=len(complete["positive"]),
                                   **description)


def calibrate(engine, prompt: str, image=None, end_image=None, *, input_video=None, callback=None, cancel=None,
              **options) -> MagCacheCalibration:
    """Runs a generation with every step computed and returns its MagCache calibration (save it with `.save`).
    Options: those of `Engine.generate` (steps, cfg, seconds, resolution, ...), without `cache`."""
    settings = engine.settings(prompt, **options)
    if settings.cache is not None:
        raise FramePackError("A calibration runs without a step cache: leave cache unset.")
    recorder = CalibrationRecorder(settings.steps)
    bucket = None
    for result in engine.stream(prompt, image=image, end_image=end_image, input_video=input_video,
                                callback=callback, cancel=cancel, step_caches=recorder, **options):
        bucket = [size * VAE_SPATIAL_COMPRESSION for size in result.latents.shape[-2:]]
    random_weights = engine.name.startswith("preset:")
    note = ("Recorded on random weights (a preset): these ratios exercise MagCache's mechanics and say nothing of a "
            "real model." if random_weights else
            f"Recorded by framepack calibrate-cache on {engine.name}: valid for this model, bucket and step count.")
    return recorder.calibration(model=engine.name, variant=engine.variant, bucket=bucket,
                                latent_window_size=settings.latent_window_size, sampler=settings.sampler,
                                shift=settings.shift, cfg=settings.cfg, random_weights=random_weights, note=note)


def _describe(values: dict, names: list[str]) -> str:
    """'latent-window-size 5, sampler euler, shift from the token count' for the named settings."""
    return ", ".join(f"{name} {'from the token count' if values[name] is None else values[name]}" for name in names)


# The command ---------------------------------------------------------------------------------------------------------

CACHE_OPTIONS = ("cache", "cache_threshold", "magcache_k", "magcache_retention", "magcache_calibration")


def add_calibrate_command(subparsers) -> argparse.ArgumentParser:
    """Adds `calibrate-cache` to the `framepack` sub-commands."""
    from engine.settings import GenerationSettings, ModelSettings, add_flags

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
    from engine.cli import _quiet_libraries
    from engine.loading import guess_variant
    from engine.pipeline import Engine, check_inputs_for_variant
    from engine.settings import GenerationSettings, ModelSettings, given_flags

    prompt = args.prompt if args.prompt is not None else " ".join(args.prompt_words)
    options = given_flags(args, GenerationSettings, skip=("prompt", *CACHE_OPTIONS))
    settings = GenerationSettings.from_options(prompt=prompt, **options)
    model_settings = ModelSettings.from_options(**given_flags(args, ModelSettings))
    out = Path(args.out)
    if out.suffix.lower() != ".json" or not out.parent.is_dir():
        raise FramePackError(f"--out must be a .json file in an existing folder, got {out.name!r}: e.g. "
                             "--out magcache.json.")
    variant = model_settings.variant
    if variant == "auto":
        variant = "bidirectional" if args.preset else guess_variant(model_settings.transformer)
    check_inputs_for_variant(variant, args.image, args.end_image, None)
    if args.quiet:
        _quiet_libraries()

    def progress(info):
        if not args.quiet and info["i"] == info["total_steps"] - 1:
            print(f"[calibrate-cache] section {info['section'] + 1}/{info['sections']} recorded", file=sys.stderr)

    try:
        if args.preset:
            device = model_settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
            engine = Engine.from_preset(args.preset, variant=variant, device=device)
        else:
            engine = Engine.from_pretrained(**model_settings.as_dict())
        calibration = calibrate(engine, prompt, image=args.image, end_image=args.end_image, callback=progress,
                                **options)
    except KeyboardInterrupt:
        print("\nInterrupted: no calibration was written.", file=sys.stderr)
        return 130
    calibration.save(out)
    ratios = ", ".join(f"{ratio:.3f}" for ratio in calibration.ratios["positive"])
    print(f"MagCache ratios over {calibration.sections} sections at {settings.steps} steps: {ratios}")
    if calibration.random_weights:
        print("note: random weights; these ratios test the mechanics only.")
    print(f"Saved {out.name}: use it with --cache magcache --magcache-calibration {out.name}")
    return 0


__all__ = ["CalibrationRecorder", "MagCacheCalibration", "MagnitudeRecorder", "add_calibrate_command", "calibrate",
           "command_calibrate_cache"]
