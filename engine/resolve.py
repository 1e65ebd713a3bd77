"""The resolve step: a request (command flags, API keywords or a server job) becomes one resolved, validated value.

Every decision is made here once, before any model loads, and every layer below reads it instead of deciding again:

    resolve_models(ModelSettings, preset)       -> ResolvedModels: variant, device, dtype, the preset's honoured options
    resolve_request(GenerationSettings, ...)    -> Request: mode, inputs read, bucket, section and frame counts,
                                                   the step cache with its MagCache ratios (a calibration file
                                                   read once, else the authors' published ones for the variant)

`framepack generate`, `framepack calibrate-cache`, the server's jobs and `Engine.stream` all go through these.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from framepack_engine.errors import FramePackError, Option, FramePackWarning
from framepack_engine.generation import sections
from framepack_engine.generation.calibration import MagCacheCalibration, published_ratios
from framepack_engine.generation.keyframes import check_latent_paddings, read_keyframes
from framepack_engine.generation.one_frame import OneFrameInputs, read_one_frame_inputs
from framepack_engine.generation.prompts import seconds_per_section, section_prompt_texts
from framepack_engine.generation.step_cache import BRANCHES, StepCaches
from framepack_engine.media.images import load_image, load_video_frames
from framepack_engine.models.buckets import REFERENCE_RESOLUTION, find_nearest_bucket
from framepack_engine.models.checkpoints import guess_variant
from framepack_engine.models.presets import TINY_RESOLUTION
from framepack_engine.runtime.devices import default_device
from framepack_engine.settings import GenerationSettings, ModelSettings

# What a preset (random weights built in memory) cannot take: it has no checkpoint to read and its own dtype.
PRESET_REFUSED = {"transformer": "--transformer", "base": "--base", "image_encoder": "--image-encoder",
                  "dtype": "--dtype", "fp8_compute": "--fp8-compute"}


@dataclass(frozen=True)
class ResolvedModels:
    """The model side of a request, decided once: what `Engine.from_resolved` builds."""

    settings: ModelSettings
    variant: str  # "bidirectional" or "f1"
    device: torch.device
    dtype: torch.dtype
    preset: str | None = None

    @property
    def name(self) -> str:
        return f"preset:{self.preset}" if self.preset else Path(str(self.settings.transformer)).name

    @property
    def default_resolution(self) -> int:
        """The resolution a request without one gets: the preset's own, else the official bucket table's."""
        return TINY_RESOLUTION if self.preset else REFERENCE_RESOLUTION


def resolve_models(settings: ModelSettings, preset: str | None = None, given=()) -> ResolvedModels:
    """The variant ("auto" reads F1 in the transformer's name; a preset is bidirectional unless asked), the device
    (cuda when available) and the dtype. `given`: the option names the user set (a preset refuses those it cannot
    honour, with one line, instead of ignoring them)."""
    if preset:
        # The preset's own dtype (float32) is no contradiction: the commands name it to be explicit.
        refused = [PRESET_REFUSED[name] for name in given if name in PRESET_REFUSED
                   and not (name == "dtype" and settings.dtype == "float32")]
        if refused:
            raise FramePackError(f"{', '.join(refused)} cannot be used with --preset {preset} (its random weights are "
                                 f"built in memory): drop {refused[0]}, or drop --preset to load a checkpoint.")
        variant = "bidirectional" if settings.variant == "auto" else settings.variant
        dtype = torch.float32
    else:
        variant = guess_variant(settings.transformer) if settings.variant == "auto" else settings.variant
        dtype = getattr(torch, settings.dtype)
    return ResolvedModels(settings, variant, torch.device(settings.device or default_device()), dtype, preset)


def generation_mode(image, end_image, input_video) -> str:
    """t2v, i2v, flf2v or extend: the mode follows the inputs."""
    if input_video is not None:
        return "extend"
    if end_image is not None:
        return "flf2v"
    return "i2v" if image is not None else "t2v"


def check_inputs_for_variant(variant: str, image, end_image, input_video) -> None:
    """The input combinations a model can take; checked before anything loads."""
    if end_image is not None and image is None:
        raise FramePackError("An end image needs a start image too: pass ", Option("image", ...), " with ",
                             Option("end_image", ...), ".")
    if end_image is not None and variant != "bidirectional":
        raise FramePackError("End images need the bidirectional model (FramePackI2V_HY): drop ", Option("end_image"),
                             " or load that model (", Option("variant", "bidirectional"), ").")
    if input_video is not None and variant != "f1":
        raise FramePackError("Video extension needs the F1 model (FramePack_F1_I2V_HY): load it with ",
                             Option("variant", "f1"), ".")


@dataclass
class Request:
    """One generation, resolved: its checked settings, its inputs read, its frame size (the bucket), its section and
    frame counts, and its step cache's ratios. `Engine.stream(request=...)` runs it as it is."""

    settings: GenerationSettings
    variant: str
    mode: str
    resolution: int
    size: tuple[int, int]  # (height, width) pixels: the bucket every frame is fitted to
    section_count: int
    start_image: np.ndarray | None = None  # uint8 (H, W, 3) as read, before fitting to the bucket
    end_image: np.ndarray | None = None
    input_video: np.ndarray | None = None  # uint8 (T, H, W, 3)
    keyframes: dict[int, np.ndarray] = field(default_factory=dict)  # section (video order) -> its keyframe, as read
    one_frame: OneFrameInputs | None = None  # a one-frame run's control images, masks and indices
    controls_metadata: dict = field(default_factory=dict)  # what the output records of keyframes and controls
    magcache_calibration: MagCacheCalibration | None = field(default=None, repr=False)  # or published
    magcache_ratios_source: str | None = None  # where MagCache's ratios came from (each section's stats say it)
    prompts: list[str] = field(default_factory=list)  # each section's prompt, in video order
    input_names: dict[str, str] = field(default_factory=dict)  # image, end_image, input_video: file names given

    @property
    def latent_frames(self) -> int:
        return sections.latent_frame_count(self.section_count, self.settings.latent_window_size)

    @property
    def pixel_frames(self) -> int:
        return sections.pixel_frame_count(self.latent_frames)

    def step_caches(self, model: str | None = None) -> StepCaches | None:
        """Fresh step caches of this request (None without `cache`), from the ratios read when it was resolved."""
        settings = self.settings
        if settings.cache is None:
            return None
        if settings.cache == "teacache":
            return StepCaches.teacache(settings.steps, settings.cache_threshold)
        calibration = self.magcache_calibration
        if model is not None and calibration.model and calibration.model != model:
            warnings.warn(f"The MagCache calibration was recorded for {calibration.model!r}, this model is {model!r}: "
                          "its ratios may not fit; calibrate this model with framepack calibrate-cache.",
                          FramePackWarning, stacklevel=2)
        return StepCaches.magcache(settings.steps, calibration, settings.cache_threshold, settings.magcache_k,
                                   settings.magcache_retention, self.branches, self.magcache_ratios_source)

    @property
    def branches(self) -> tuple[str, ...]:
        return BRANCHES if self.settings.cfg != 1 else BRANCHES[:1]


def _read(value, read):
    """An input given as a path is read; an array is taken as it is."""
    if value is None:
        return None
    return read(value)


def _file_names(**inputs) -> dict[str, str]:
    """The file name (never its folders) of each input given as a path, for the output's metadata."""
    return {name: Path(value).name for name, value in inputs.items() if isinstance(value, (str, os.PathLike))}


def section_prompts(settings: GenerationSettings, count: int) -> list[str]:
    """Each of the `count` sections' prompt in video order, from the main prompt and `section_prompts`
    (framepack_engine.generation.prompts: the one parser; an entry no section would use is refused here)."""
    return section_prompt_texts(settings.section_prompts, settings.prompt, count,
                                seconds_per_section(settings.latent_window_size, settings.fps), range(count))


def resolve_request(settings: GenerationSettings, variant: str, *, image=None, end_image=None, input_video=None,
                    keyframes=None, control_images=None, control_masks=None,
                    default_resolution: int = REFERENCE_RESOLUTION) -> Request:
    """Everything a generation decides before any model work: the inputs the variant can take, read and checked;
    the bucket (nearest the start image's aspect ratio, or `width` x `height` for text to video) at the settings'
    resolution or the model's default; the section count; the MagCache ratios, read and fitted to the steps."""
    check_inputs_for_variant(variant, image, end_image, input_video)
    mode = generation_mode(image, end_image, input_video)
    start_image = _read(image, lambda value: load_image(value, "start image"))
    end = _read(end_image, lambda value: load_image(value, "end image"))
    video_frames = _read(input_video, lambda value: load_video_frames(value)[0])
    if video_frames is not None:
        start_image = video_frames[0]
    resolution = settings.resolution or default_resolution
    if start_image is not None:
        height, width = start_image.shape[:2]
    else:
        height, width = settings.height or resolution, settings.width or resolution
    size = find_nearest_bucket(height, width, resolution=resolution)
    count = sections.section_count(settings.seconds, settings.fps, settings.latent_window_size)
    # Keyframes and one-frame controls (framepack_engine.generation.keyframes / one_frame): read once, checked here.
    one_frame = read_one_frame_inputs(settings, variant, start_image, control_images, control_masks,
                                      end_image=end_image, input_video=input_video)
    if one_frame is not None:
        mode, count = "one_frame", 1
    check_latent_paddings(settings.latent_paddings, count, variant)
    keyframe_images, keyframe_names = read_keyframes(keyframes, count, variant, settings.one_frame)
    request = Request(settings, variant, mode, resolution, size, count, start_image, end, video_frames,
                      prompts=section_prompts(settings, count), input_names=_file_names(
                          image=image, end_image=end_image, input_video=input_video))
    request.keyframes, request.one_frame = keyframe_images, one_frame
    request.controls_metadata = {**({"keyframes": keyframe_names} if keyframe_names else {}),
                                 **(one_frame.names if one_frame is not None else {})}
    if settings.cache == "magcache":
        # A calibration of the user's wins; without one, the authors' published ratios for this variant. The file is
        # small: read once and fitted to this generation now, before any model loads.
        if settings.magcache_calibration is not None:
            calibration = MagCacheCalibration.load(settings.magcache_calibration)
            source = f"calibration:{Path(settings.magcache_calibration).name}"  # the name only, never the folders
        else:
            calibration = published_ratios(variant)
            source = calibration.describe(settings.steps)
        for branch in request.branches:
            calibration.ratios_for(branch, settings.steps)
        calibration.warn_if_recorded_otherwise(settings.latent_window_size, settings.sampler, settings.shift)
        calibration.warn_if_other_bucket(list(size))
        request.magcache_calibration, request.magcache_ratios_source = calibration, source
    return request
