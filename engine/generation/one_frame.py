"""One-frame inference: a single image from the start image and the prompt, as one section of one latent frame.

The community found (musubi-tuner's `--one_frame_inference`, kijai's `FramePackSingleFrameSampler`) that the
bidirectional model, asked for one latent frame whose rotary time index sits after its clean context, makes the
image that context turns into by then: a prompt-driven edit. The section is the bidirectional one next to the start
image (padding 0) with three changes:

* the noisy window is one frame, at time index `target_index` (default `latent_window_size`, the window's last);
* the 1x clean latents are the **control images** (default: the start image), each at its own time index
  (`control_index`), each multiplied by its **latent mask** (the image's alpha or a mask image, shrunk to the latent
  grid), followed by the "post" frame of zeros at `1 + latent_window_size` unless `no_post`;
* the 2x and 4x context are the zeros an empty history holds, at their usual indices, unless `no_2x` / `no_4x`
  leave them out of the model's input altogether.

kisekaeichi is a start image and a reference at `control_index 0;10` with masks and `target_index` between them;
1f-mc two adjacent references (`0;1`) and a later target. Everything else (runner, samplers, step caches, offload,
quantization, LoRA) is the video path's, on this one section.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from framepack_engine.errors import FramePackError, Option
from framepack_engine.generation.keyframes import input_name
from framepack_engine.generation.sections import Section, bidirectional_section
from framepack_engine.media.images import (load_image_with_alpha, load_mask, resize_and_center_crop,
                                           resize_and_center_crop_mask)
from framepack_engine.models.flops import packed_sequence
from framepack_engine.models.history import HistoryContext

ONE_FRAME_SWITCHES = ("no_2x", "no_4x", "no_post")  # musubi-tuner's names
MAX_INDEX = 1000  # time indices (and paddings) beyond this are far outside anything the model was trained on


@dataclass(frozen=True, eq=False)
class OneFrameSection(Section):
    """The single section of a one-frame run (see the module doc). `control_latents` (1, channels, n, h, w) are the
    masked control latents in the order of `clean_latent_indices` (the post index last when `post`)."""

    control_latents: torch.Tensor = None
    post: bool = True
    with_2x: bool = True
    with_4x: bool = True

    @property
    def is_last(self) -> bool:
        return True

    @property
    def video_position(self) -> int:
        return 0

    @property
    def total_latent_frames(self) -> int:
        return 1

    def clean_latents(self, history, start_latent, end_latent=None, end_strength: float = 1.0) -> torch.Tensor:
        controls = self.control_latents.to(history)
        if not self.post:
            return controls
        return torch.cat([controls, self._context(history)["clean"]], dim=2)  # the empty history's zero frame

    def history_context(self, history, start_latent, end_latent=None, end_strength: float = 1.0) -> HistoryContext:
        context = self._context(history)
        return HistoryContext.of(
            clean=(self.clean_latents(history, start_latent), self.clean_latent_indices),
            clean_2x=(context["clean_2x"], self.clean_latent_2x_indices) if self.with_2x else None,
            clean_4x=(context["clean_4x"], self.clean_latent_4x_indices) if self.with_4x else None)

    def add_to_history(self, history, generated, start_latent) -> torch.Tensor:
        if generated.shape[2] != 1:
            raise FramePackError(f"a one-frame section generated {generated.shape[2]} latent frames, expected 1.")
        return generated.to(history)  # the image is all there is

    def generated_latents(self, history) -> torch.Tensor:
        return history

    def latents_to_decode(self, history) -> torch.Tensor:
        return history

    def decode_overlap(self, history) -> int:
        return 0

    def latent_tokens(self, latent_height: int, latent_width: int, patch_size=(1, 2, 2)) -> int:
        """Video tokens the DiT packs for this section (what `tokens_per_section` is for a video's sections)."""
        config = {"patch_size_t": patch_size[0], "patch_size": patch_size[1]}
        return packed_sequence(config, 1, self.clean_latent_indices.shape[1], 2 if self.with_2x else 0,
                               16 if self.with_4x else 0, latent_height, latent_width, 0, 0).latent_tokens


def one_frame_section(control_latents: torch.Tensor, control_indices: list[int], latent_window_size: int,
                      target_index: int | None = None, switches=()) -> OneFrameSection:
    """The one-frame section: the bidirectional padding-0 layout of `latent_window_size` with the noisy frame at
    `target_index` (default: the window's last index) and the control latents at `control_indices`."""
    if control_latents.shape[2] != len(control_indices):
        raise FramePackError(f"{control_latents.shape[2]} control latents but {len(control_indices)} control "
                             "indices: give one index per control image.")
    layout = bidirectional_section(0, 1, 0, latent_window_size)
    post = "no_post" not in switches
    indices = list(control_indices) + ([1 + latent_window_size] if post else [])
    return OneFrameSection(
        variant="bidirectional", index=0, count=1, padding=0, latent_window_size=1,
        latent_indices=torch.tensor([[latent_window_size if target_index is None else target_index]]),
        clean_latent_indices=torch.tensor([indices], dtype=torch.long),
        clean_latent_2x_indices=layout.clean_latent_2x_indices,
        clean_latent_4x_indices=layout.clean_latent_4x_indices,
        control_latents=control_latents, post=post, with_2x="no_2x" not in switches,
        with_4x="no_4x" not in switches)


def latent_mask(mask: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """A pixel mask (H, W) in [0, 1], already fitted to the bucket like its image, shrunk to the latent grid by
    averaging each block of pixels one latent covers (so a mask drawn on that grid stays exactly 0 and 1);
    shaped (1, 1, 1, h, w) to multiply a latent frame."""
    height, width = mask.shape
    if height % latent_height or width % latent_width:
        raise FramePackError(f"a {width}x{height} mask does not tile the {latent_width}x{latent_height} latent grid: "
                             "fit it to the bucket first.")
    blocks = mask.float().reshape(latent_height, height // latent_height, latent_width, width // latent_width)
    return blocks.mean(dim=(1, 3))[None, None, None]


def control_indices_for(control_index: list[int] | None, controls: int) -> list[int]:
    """The control images' time indices: as given (one per control image), or 0 for a single control image."""
    if control_index is None:
        if controls == 1:
            return [0]
        raise FramePackError(f"{controls} control images need their time indices: give one per image, e.g. ",
                             Option("control_index", "0;10"), ".")
    if len(control_index) != controls:
        indices = "1 index" if len(control_index) == 1 else f"{len(control_index)} indices"
        raise FramePackError(Option("control_index"), f" has {indices} for {_count(controls, 'control image')}: give "
                             "one per control image, in their order, e.g. ", Option("control_index", "0;10"), ".")
    return list(control_index)


@dataclass
class OneFrameInputs:
    """A one-frame run's control images as read (before fitting to the bucket), their masks and time indices."""

    images: list[np.ndarray]  # uint8 (H, W, 3)
    masks: list[np.ndarray | None]  # float32 (H, W) in [0, 1] (a mask image's luminance or the image's alpha)
    indices: list[int]
    names: dict = field(default_factory=dict)  # what the output's metadata records of them

    def latents(self, encode, size: tuple[int, int]) -> torch.Tensor:
        """The masked control latents (1, channels, n, h, w): each image fitted to the bucket `size` (height,
        width) and encoded once by `encode` (uint8 image -> latent (1, channels, 1, h, w)), times its mask."""
        height, width = size
        latents = []
        for image, mask in zip(self.images, self.masks):
            latent = encode(resize_and_center_crop(image, width, height))
            if mask is not None:
                fitted = torch.from_numpy(resize_and_center_crop_mask(mask, width, height))
                latent = latent * latent_mask(fitted, *latent.shape[-2:]).to(latent)
            latents.append(latent)
        return torch.cat(latents, dim=2)


def read_one_frame_inputs(settings, variant: str, start_image: np.ndarray | None, control_images=None,
                          control_masks=None, *, end_image=None, input_video=None) -> OneFrameInputs | None:
    """The control images and masks of a one-frame run, read once and checked before any model loads (None when the
    settings ask for a video). Without control images the start image is the one control image, at index 0."""
    control_images, control_masks = _as_list(control_images), _as_list(control_masks)
    if not settings.one_frame:
        if control_images or control_masks:
            given = "control_images" if control_images else "control_masks"
            raise FramePackError(Option(given), " are one-frame inputs: pass ", Option("one_frame"), " too.")
        return None
    if variant != "bidirectional":
        raise FramePackError("One-frame inference needs the bidirectional model (FramePackI2V_HY): its control "
                             "images sit in the clean context around the generated frame, which F1 does not have; "
                             "load that model (", Option("variant", "bidirectional"), ").")
    if start_image is None:
        raise FramePackError("One-frame inference makes one image from a start image: pass ", Option("image", ...),
                             " (its SigLIP tokens condition the image).")
    for name, value in (("end_image", end_image), ("input_video", input_video)):
        if value is not None:
            raise FramePackError(Option(name), " is for videos; ", Option("one_frame"), " takes control images "
                                 "instead (", Option("control_images", ...), ").")
    if len(control_masks) > max(len(control_images), 1):
        raise FramePackError(f"{_count(len(control_masks), 'control mask')} for "
                             f"{_count(len(control_images), 'control image')}: give at most one mask per control image,"
                             " in their order (", Option("control_masks", ...), ").")
    if control_masks and not control_images:
        raise FramePackError("A control mask needs its control image: pass ", Option("control_images", ...),
                             " (the start image too, if it is the one to mask).")
    images, masks = [], []
    for number, value in enumerate(control_images, 1):
        image, alpha = load_image_with_alpha(value, f"control image {number}")
        images.append(image)
        masks.append(alpha)
    for number, value in enumerate(control_masks, 1):
        if value is None:
            continue
        mask = load_mask(value, f"control mask {number}")
        if mask.shape != images[number - 1].shape[:2]:
            raise FramePackError(
                f"Control mask {number} is {mask.shape[1]}x{mask.shape[0]} pixels but control image {number} is "
                f"{images[number - 1].shape[1]}x{images[number - 1].shape[0]}: give a mask of its image's size.")
        masks[number - 1] = mask
    if not images:
        images, masks = [start_image], [None]
    indices = control_indices_for(settings.control_index, len(images))
    names = {"control_images": [input_name(value) for value in control_images] or ["(start image)"],
             "control_masks": [input_name(value) for value in control_masks]}
    return OneFrameInputs(images, masks, indices, {name: value for name, value in names.items() if value})


def _as_list(value) -> list:
    """None, one input, or a list of them (a single path or array is one input, not a sequence of them)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}{'s' if number != 1 else ''}"
