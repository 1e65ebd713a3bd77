"""MagCache's ratios: how much the block stack's residual grows or shrinks from one step to the next.

MagCache decides from `ratios[t]` = mean over tokens of |residual t| / |residual t-1| (the residual is the block
stack's output minus its input image tokens, as framepack_engine.generation.step_cache keeps it). These ratios are a
property of a model and a step count (and its sigma schedule, hence the bucket) far more than of a prompt. They come
from one of two places:

- The MagCache authors' published ratios for FramePack (`published_ratios(variant)`): the `mag_ratios` of their
  MagCache4FramePack demos, for the bidirectional model and for F1 at 25 steps, shipped as magcache_ratios.json beside
  this module with their source (repository, files, commit). Other step counts take them nearest-interpolated as the
  demos do (`nearest_interpolation`); both guidance branches take the one series (the authors run cfg 1). They are
  what `generate(cache="magcache")` uses without a calibration.
- A calibration of your own: a generation runs with every step computed, each section's ratios are recorded per
  guidance branch, and their mean over sections is saved as a small JSON (`framepack calibrate-cache`, or
  `calibrate(engine, ...)` from Python) that `generate(cache="magcache", magcache_calibration=path)` loads; it wins
  over the published ratios. It is refused for another step count. A calibration recorded on a preset's random
  weights is marked `"random_weights": true`: it exercises the mechanics and says nothing of a real model.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch

from framepack_engine.errors import FramePackError, FramePackWarning
from framepack_engine.generation.step_cache import BRANCHES, StepCache, StepCaches
from framepack_engine.media.video import atomic_path

FORMAT = "framepack-magcache-calibration"
VERSION = 1
PUBLISHED_FORMAT = "framepack-magcache-published-ratios"
PUBLISHED_FILE = "magcache_ratios.json"  # in this package (pyproject.toml's package-data)


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

    subject = "The MagCache calibration was"  # how warnings name these ratios (a class attribute, not a field)

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
                f"{self.subject} recorded with {_describe(recorded, differ)}, this generation uses "
                f"{_describe(used, differ)}: its ratios may not fit; record one with these settings "
                f"(framepack calibrate-cache {flags})."), stacklevel=3)

    def warn_if_other_bucket(self, bucket: list[int]) -> None:
        """A FramePackWarning when the generation runs at another bucket (height, width) than the recorded one."""
        if self.bucket and list(self.bucket) != list(bucket):
            warnings.warn(FramePackWarning(
                f"{self.subject} recorded at {self.bucket[0]}x{self.bucket[1]}, this generation runs at "
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

        def real(value) -> bool:  # a finite JSON number (true/false are not numbers here)
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def whole(value, low: int) -> bool:
            return isinstance(value, int) and not isinstance(value, bool) and value >= low

        if not whole(steps, 1) or not isinstance(ratios, dict) or "positive" not in ratios or any(
                branch not in BRANCHES or not isinstance(series, list) or len(series) != steps
                or not all(real(ratio) and ratio > 0 for ratio in series)
                for branch, series in ratios.items()):
            raise FramePackError(f"{path.name!r} does not hold one positive ratio per step for each branch: {fix}.")
        # Every other field as calibrate-cache writes it, so a hand-edited file fails here, before any model loads.
        expected = {
            "bucket": ("null or [height, width] in pixels, two positive integers",
                       lambda v: v is None or (isinstance(v, list) and len(v) == 2 and all(whole(x, 1) for x in v))),
            "latent_window_size": ("null or a positive integer", lambda v: v is None or whole(v, 1)),
            "shift": ("null or a positive number", lambda v: v is None or (real(v) and v > 0)),
            "cfg": ("a number of at least 1", lambda v: real(v) and v >= 1),
            "sections": ("an integer of at least 0", lambda v: whole(v, 0)),
            "random_weights": ("true or false", lambda v: isinstance(v, bool)),
            **{name: ("a string", lambda v: isinstance(v, str)) for name in ("model", "variant", "sampler", "note",
                                                                              "created")},
        }
        for name, (meaning, valid) in expected.items():
            if name in values and not valid(values[name]):
                raise FramePackError(f"{path.name!r} has {name} {json.dumps(values[name])}, which must be {meaning}: "
                                     f"{fix}.")
        return cls(**values)


def nearest_interpolation(values, steps: int) -> list[float]:
    """`values` resampled to `steps` entries, each the nearest by index: entry i is values[round(i * (n - 1) /
    (steps - 1))] (halves rounded to even), and one step takes the last value; as the MagCache authors' demos fit
    their 25 ratios to another step count."""
    values = [float(value) for value in values]
    if steps == 1:
        return [values[-1]]
    scale = (len(values) - 1) / (steps - 1)
    return [values[round(index * scale)] for index in range(steps)]


@dataclass
class PublishedRatios(MagCacheCalibration):
    """The MagCache authors' published ratios for one FramePack variant, shipped with the engine: one series (they
    run cfg 1) that both guidance branches take, nearest-interpolated to other step counts as their demos do."""

    source: str = ""  # "Zehong-Ma/MagCache@<commit> <file>"

    subject = "The MagCache authors' published ratios were"

    def ratios_for(self, branch: str, steps: int) -> list[float]:
        series = self.ratios["positive"]
        return list(series) if steps == self.steps else nearest_interpolation(series, steps)

    def describe(self, steps: int) -> str:
        """Where the ratios of a `steps`-step generation come from (the stats' `magcache_ratios`)."""
        fitted = "" if steps == self.steps else f"; nearest-interpolated from {self.steps} to {steps} steps"
        return f"published:{self.variant} ({self.source}{fitted})"


@lru_cache(maxsize=1)
def _published_data() -> dict:
    data = json.loads(resources.files(__package__).joinpath(PUBLISHED_FILE).read_text())
    if data.get("format") != PUBLISHED_FORMAT:
        raise FramePackError(f"{PUBLISHED_FILE} in the installed engine is not {PUBLISHED_FORMAT}: reinstall it.")
    return data


def published_ratios(variant: str) -> PublishedRatios:
    """The MagCache authors' published ratios for a FramePack variant ("bidirectional" or "f1")."""
    data = _published_data()
    entry = data["variants"].get(variant)
    if entry is None:
        known = ", ".join(sorted(data["variants"]))
        raise FramePackError(f"No published MagCache ratios for the {variant!r} model (published: {known}): record "
                             "a calibration with framepack calibrate-cache and pass --magcache-calibration.")
    source, recorded = data["source"], data["recorded_with"]
    repository = source["repository"].removeprefix("https://github.com/")
    return PublishedRatios(
        steps=data["steps"], ratios={"positive": list(entry["ratios"])}, variant=variant,
        latent_window_size=recorded["latent_window_size"], sampler=recorded["sampler"], shift=recorded["shift"],
        cfg=recorded["cfg"], note=data["note"], created="",
        source=f"{repository}@{source['commit'][:7]} {entry['file']}")


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



def _describe(values: dict, names: list[str]) -> str:
    """'latent-window-size 5, sampler euler, shift from the token count' for the named settings."""
    return ", ".join(f"{name} {'from the token count' if values[name] is None else values[name]}" for name in names)


__all__ = ["CalibrationRecorder", "MagCacheCalibration", "MagnitudeRecorder", "PublishedRatios",
           "nearest_interpolation", "published_ratios"]
