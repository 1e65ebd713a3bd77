"""Keyframe images per section (bidirectional model): which section starts from which image. The one parser.

A keyframe's latent is the start latent (`clean_latents_pre`, the 1x frame at time index 0) of the sections it
names, in place of the start image's; its SigLIP tokens replace the start image's for those sections too (as
musubi-tuner's section images do). The history keeps the motion continuous around it; the video's first frame stays
the start image. Sections are named in video order, as musubi-tuner's `--image_path "SPEC:path;;;..."` names them:

    SPEC := N        the section at position N of the video (0 = the first, next to the start image)
          | -N       the N-th section from the end (-1 = the last)
          | S-E      sections S to E, both included (S <= E)

The command takes `--keyframe SPEC:IMAGE` (repeatable) or musubi's one string `"SPEC:IMAGE;;;SPEC:IMAGE"`; the API
takes `keyframes={SPEC: image}` with SPEC an int or that text. A SPEC that names no section of the video, and two
SPECs naming one section, are refused with one line before any model loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from framepack_engine.errors import FramePackError, Option
from framepack_engine.media.images import load_image

NAME = "keyframes"
SEPARATOR = ";;;"  # musubi-tuner's separator of entries in one string
_SPEC = re.compile(r"^\s*(?:(?P<start>\d+)\s*-\s*(?P<end>\d+)|(?P<index>-?\d+))\s*$")


def parse_keyframe_flag(values: list[str] | None) -> dict[str, str]:
    """The command's `--keyframe` values ("SPEC:IMAGE", each maybe several joined by ';;;') as {SPEC: path}."""
    keyframes: dict[str, str] = {}
    for value in values or []:
        for entry in value.split(SEPARATOR):
            if not entry.strip():
                continue
            spec, colon, path = entry.partition(":")
            if not colon or not _SPEC.match(spec) or not path.strip():
                raise FramePackError(f"The keyframe {entry.strip()!r} is not SPEC:IMAGE: write e.g. --keyframe "
                                     "3:pose.png (SPEC is a section N, -N from the end, or a range S-E).")
            spec = spec.strip()
            if spec in keyframes:
                raise FramePackError(f"The keyframe SPEC {spec!r} is given twice: give each section one image.")
            keyframes[spec] = path.strip()
    return keyframes


def spec_sections(spec, count: int) -> list[int]:
    """The sections (video order, 0-based) a SPEC names in a video of `count` sections."""
    text = str(spec)
    match = _SPEC.match(text) if not isinstance(spec, bool) and isinstance(spec, (int, str)) else None
    if match is None:
        raise FramePackError(f"The keyframe SPEC {spec!r} is not a section: use N, -N (from the end) or S-E.")
    if match["index"] is not None:
        index = int(match["index"])
        sections = [index + count if index < 0 else index]
    else:
        start, end = int(match["start"]), int(match["end"])
        if start > end:
            raise FramePackError(f"The keyframe SPEC {text!r} runs backwards: write the range as {end}-{start}.")
        sections = list(range(start, end + 1))
    if not all(0 <= section < count for section in sections):
        raise FramePackError(f"The keyframe SPEC {text!r} names no section of this video: it has {count} section"
                             f"{'s' if count != 1 else ''} (0 to {count - 1}, or -1 to -{count}); lengthen it with ",
                             Option("seconds"), " or pick another section.")
    return sections


def keyframe_sections(keyframes: dict, count: int) -> dict[int, object]:
    """{section (video order): SPEC} for the keyframes' SPECs; two SPECs naming one section are refused."""
    named: dict[int, object] = {}
    for spec in keyframes:
        for section in spec_sections(spec, count):
            if section in named:
                raise FramePackError(f"The keyframes {str(named[section])!r} and {str(spec)!r} both name section "
                                     f"{section} (of {count}): give each section one image.")
            named[section] = spec
    return named


def input_name(value) -> str | None:
    """What the output's metadata records of an input image: its file's name (never its folders), else None."""
    return Path(value).name if isinstance(value, (str, os.PathLike)) else None


def read_keyframes(keyframes, count: int, variant: str, one_frame: bool = False
                   ) -> tuple[dict[int, np.ndarray], dict[str, str | None]]:
    """The keyframe images by section (video order), each read once, and {SPEC: file name} for the metadata; every
    check before any model loads."""
    if not keyframes:
        return {}, {}
    if not isinstance(keyframes, dict):
        raise FramePackError(f"{NAME} must be a dict {{SPEC: image}}, got {type(keyframes).__name__}: pass e.g. "
                             "keyframes={3: 'pose.png'} (--keyframe 3:pose.png).")
    if variant != "bidirectional":
        raise FramePackError("Keyframes need the bidirectional model (FramePackI2V_HY): F1 generates each section "
                             "from the frames before it, with no start slot to place a keyframe in; drop ",
                             Option("keyframes"), " or load that model (", Option("variant", "bidirectional"), ").")
    if one_frame:
        raise FramePackError("Keyframes place images in the sections of a video, and ", Option("one_frame"),
                             " makes one image: give it control images instead (--control-image).")
    named = keyframe_sections(keyframes, count)
    images = {spec: load_image(value, f"keyframe {spec}") for spec, value in keyframes.items()}
    return ({section: images[spec] for section, spec in sorted(named.items())},
            {str(spec): input_name(value) for spec, value in keyframes.items()})


def check_latent_paddings(paddings: list[int] | None, count: int, variant: str) -> None:
    """Chosen latent paddings fit the plan: the bidirectional model, one per section."""
    if paddings is None:
        return
    if variant != "bidirectional":
        raise FramePackError(Option("latent_paddings"), " places the sections of the bidirectional model "
                             "(FramePackI2V_HY); F1 has no paddings: drop it or load that model.")
    if len(paddings) != count:
        raise FramePackError(Option("latent_paddings"), f" has {len(paddings)} value{'s' if len(paddings) != 1 else ''}"
                             f" but the video has {count} section{'s' if count != 1 else ''}: give one per section, "
                             f"in generation order (last section first), e.g. {','.join(['0'] * count)}.")
