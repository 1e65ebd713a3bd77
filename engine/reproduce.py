"""Reproducing a video from its file: what an output records of the models and inputs, and reading it back.

Every output's metadata (Engine.metadata) holds the generation options, and from here:
  model_options     the ModelSettings that decide the frames (not where they ran: device, memory budget, offline),
                    local paths by their name only (metadata never carries the machine's folders)
  model_sources     each model's identity: a repo id's cached revision, a local file's fingerprint
                    (framepack_engine.runtime.identity), or the preset
  attention_backend the backend "auto" (or the option) chose
  inputs            each input's file name and the sha256 of its pixels as read
`framepack generate --settings-from FILE` reads them back (`recorded_options`), lets the flags given on the same
command win, refuses before loading what it cannot reproduce (a local model whose path is not recorded, a missing
input image), and warns in one line where this run's models or inputs differ from the recorded ones.
Both sides go through the option tables of framepack_engine.settings, so a new option is recorded and read back
without a change here.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from framepack_engine.errors import FramePackError, FramePackWarning
from framepack_engine.media.metadata import read_metadata
from framepack_engine.resolve import PRESET_REFUSED, Request, ResolvedModels
from framepack_engine.runtime.identity import source_identity
from framepack_engine.runtime.sources import is_repo_id
from framepack_engine.settings import GenerationSettings, ModelSettings

MACHINE_OPTIONS = ("device", "vram_budget_gb", "memory_margin_gb", "offline")  # where it ran, not what it made
SOURCE_OPTIONS = ("transformer", "base", "image_encoder")
INPUTS = {"image": "start image", "end_image": "end image", "input_video": "input video"}
ENGINE_NAME = "framepack-engine"


# --------------------------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------------------------


def record_models(models: ResolvedModels, cache_dir=None) -> dict:
    """model_options and model_sources of resolved model options, for every output the engine writes."""
    settings = models.settings
    options = {}
    for item in ModelSettings.options():
        value = getattr(settings, item.name)
        if item.name in MACHINE_OPTIONS or value is None or (models.preset and item.name in PRESET_REFUSED):
            continue
        if item.name in SOURCE_OPTIONS and not is_repo_id(value):
            value = Path(value).name
        elif item.name == "lora":
            value = [[Path(path).name, strength] for path, strength in value]
        options[item.name] = value
    options["variant"] = models.variant  # as resolved: "auto" read it from a name that may change
    if models.preset:
        return {"model_options": {"preset": models.preset, **options}, "model_sources": {"preset": models.preset}}
    sources = {name: source_identity(name, getattr(settings, name), cache_dir) for name in SOURCE_OPTIONS}
    return {"model_options": options, "model_sources": sources}


def pixels_sha256(pixels: np.ndarray) -> str:
    """The sha256 of an input's uint8 pixels as read, with their shape (a re-saved file with the same pixels is the
    same input)."""
    digest = hashlib.sha256(repr(tuple(pixels.shape)).encode())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return digest.hexdigest()


def record_request(request: Request) -> dict:
    """What a resolved request adds: its inputs (name, pixel hash) and MagCache's ratios source."""
    record = {}
    inputs = {}
    for name, pixels in (("image", request.start_image if request.input_video is None else None),
                         ("end_image", request.end_image), ("input_video", request.input_video)):
        if pixels is not None:
            inputs[name] = {"pixels_sha256": pixels_sha256(pixels)}
            if name in request.input_names:
                inputs[name]["name"] = request.input_names[name]
    if inputs:
        record["inputs"] = inputs
    if request.magcache_ratios_source:
        record["magcache_ratios"] = request.magcache_ratios_source
    return record


# --------------------------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------------------------


def read_recorded(path) -> dict:
    """The metadata framepack-engine wrote into `path` (a video's comment, a PNG frame's text chunk, a PNG folder's
    or any settings.json, a .safetensors header), or one line saying the file holds none."""
    recorded = read_metadata(path)
    if not isinstance(recorded, dict) or recorded.get("engine") != ENGINE_NAME:
        raise FramePackError(f"{Path(path).name!r} holds no framepack-engine settings: give --settings-from a video, "
                             "PNG frame or folder, settings.json or .safetensors that framepack generate wrote.")
    return recorded


def recorded_options(recorded: dict, generation_flags: dict, model_flags: dict, preset_flag: str | None
                     ) -> tuple[dict, dict, str | None]:
    """(generation options, model options, preset) for a run that reproduces `recorded`, the flags given on the
    command line winning. Model options this version does not know are left out with one warning (other keys are
    the rest of the record); a local model whose path is not recorded must be given again (one line, before
    loading)."""
    generation_names = {item.name for item in GenerationSettings.options()}
    generation = {name: value for name, value in recorded.items() if name in generation_names}
    recorded_models = dict(recorded.get("model_options") or {})
    preset = recorded_models.pop("preset", None)
    if preset_flag:  # the preset asked for: what it cannot take is left out
        preset = preset_flag
        recorded_models = {name: value for name, value in recorded_models.items() if name not in PRESET_REFUSED}
    elif any(name in model_flags for name in SOURCE_OPTIONS):  # a checkpoint asked for instead of the preset
        preset = None
    model_names = {item.name for item in ModelSettings.options()}
    unknown = sorted(name for name in recorded_models if name not in model_names)
    if unknown:
        warnings.warn(FramePackWarning(f"The file records model options this version does not know, left out: "
                                       f"{', '.join(unknown)}."), stacklevel=2)
    models = {name: value for name, value in recorded_models.items()
              if name in model_names and name not in MACHINE_OPTIONS and name != "lora"}
    sources = recorded.get("model_sources") or {}
    for name in SOURCE_OPTIONS:
        if name in models and name not in model_flags and "repo" not in sources.get(name, {"repo": None}):
            raise FramePackError(f"The file was made with the local {name.replace('_', ' ')} {models[name]!r}, whose "
                                 f"folder is not recorded: pass it with --{name.replace('_', '-')} PATH.")
    return {**generation, **generation_flags}, {**models, **model_flags}, preset


def check_recorded_inputs(recorded: dict, given: dict) -> None:
    """Each input the recorded video was made from must be given again (its folder is not recorded): one line.
    `given`: image, end_image, input_video, keyframes, control_images and control_masks as this run has them."""
    for name, record in (recorded.get("inputs") or {}).items():
        if name in INPUTS and given.get(name) is None:
            shown = f" {record['name']!r}" if record.get("name") else ""
            raise FramePackError(f"The file was made from the {INPUTS[name]}{shown}: pass it with "
                                 f"--{name.replace('_', '-')} PATH (or give another one to change it).")
    keyframes = recorded.get("keyframes")  # {SPEC: file name}, as the resolve step records them
    if isinstance(keyframes, dict) and keyframes and not given.get("keyframes"):
        named = " ".join(f"--keyframe {spec}:{name}" for spec, name in keyframes.items())
        raise FramePackError(f"The file was made with keyframes ({named}): pass each with --keyframe SPEC:PATH.")
    for name, flag in (("control_images", "--control-image"), ("control_masks", "--control-mask")):
        # the one-frame run's control images and masks, by file name ("IMAGE" for one given as an array)
        files = [file or "IMAGE" for file in recorded.get(name) or [] if file != "(start image)"]
        if files and not given.get(name):
            named = " ".join(f"{flag} {file}" for file in files)
            raise FramePackError(f"The image was made with {name.replace('_', ' ')} ({named}): pass each with "
                                 f"{flag} PATH, in that order.")


def warn_differences(recorded: dict, current: dict) -> None:
    """One warning line per way this run's models or inputs differ from the recorded ones (`current`: this run's
    metadata, as Engine.metadata gives it)."""
    for name in SOURCE_OPTIONS:
        was, now = (recorded.get("model_sources") or {}).get(name), (current.get("model_sources") or {}).get(name)
        if was and now and was != now:
            _warn(f"the {name.replace('_', ' ')} differs from the recorded one: {_describe_source(was)} then, "
                  f"{_describe_source(now)} now; the video will differ.")
    was, now = _loras(recorded), _loras(current)
    if was != now:
        _warn(f"the LoRAs differ from the recorded ones: {_lora_text(was)} then, {_lora_text(now)} now; pass "
              "--lora PATH:STRENGTH for each recorded one to reproduce the video.")
    was, now = recorded.get("attention_backend"), current.get("attention_backend")
    if was and now and was != now:
        _warn(f"the attention backend differs: {was} then, {now} now (--attention {was} to use it); frames may differ "
              "slightly.")
    for name, record in (recorded.get("inputs") or {}).items():
        now = (current.get("inputs") or {}).get(name)
        if now and record.get("pixels_sha256") != now.get("pixels_sha256"):
            shown = f" ({record['name']})" if record.get("name") else ""
            _warn(f"the {INPUTS.get(name, name)} differs from the recorded one{shown}: its pixels do not match.")


def _warn(message: str) -> None:
    warnings.warn(FramePackWarning(message[0].upper() + message[1:]), stacklevel=3)


def _describe_source(identity: dict) -> str:
    if "repo" in identity:
        return f"{identity['repo']}@{(identity.get('revision') or 'unknown revision')[:12]}"
    if "preset" in identity:
        return f"preset {identity['preset']}"
    return f"{identity.get('name')} (fingerprint {str(identity.get('fingerprint'))[:12]})"


def _loras(metadata: dict) -> list[tuple[str, str, float]]:
    return sorted((lora.get("file", ""), lora.get("sha256", ""), float(lora.get("strength", 1)))
                  for lora in metadata.get("loras") or ())


def _lora_text(loras) -> str:
    if not loras:
        return "none"
    return ", ".join(f"{file}:{strength:g} (sha256 {sha[:12]})" for file, sha, strength in loras)
