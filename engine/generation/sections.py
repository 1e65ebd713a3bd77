"""Section plans: the order FramePack generates a video in, and the context each section is conditioned on.

A video is generated ``latent_window_size`` latent frames at a time. Each section's DiT input packs the noisy window
with clean context from the history: two 1x frames, two frames at 2x compression and sixteen at 4x. The frame
indices given to the DiT (for its 3D RoPE) say where each piece sits in time. Both loops follow the official app:

Bidirectional ("inverted anti-drifting", FramePackI2V_HY): sections are generated last-to-first. The index line of a
section is ``[start | blank (padding * window) | noisy window | post 1x | 2x (2) | 4x (16)]``: the start image sits
at index 0, the noisy window ``padding`` windows later, and the frames already generated (the later part of the
video) follow it. Paddings count down to 0 (``[3, 2, 2, ..., 2, 1, 0]`` above four sections). The history starts as
19 zero frames; each section is prepended to it, and the last one (padding 0) also gets the start latent prepended.
For first-last-frame video, the end image's latent takes the post slot of the first section generated.

F1 (forward-only, FramePack_F1_I2V_HY): sections are generated first-to-last. The index line is
``[start | 4x (16) | 2x (2) | 1x (1) | noisy window]``; the history is 19 zero frames then the start latent, each
section is appended, and the context is always its last 19 frames.

Every section decodes its window plus the neighbouring one and crossfades the overlap (``4 * window - 3`` pixel
frames, linear weights) into the video: prepended for bidirectional, appended for F1.

Latents are ``(batch, channels, frames, height, width)``; the time axis is dim 2 everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framepack_engine.official import VAE_TEMPORAL_COMPRESSION
from framepack_engine.errors import FramePackError, Option
from framepack_engine.models.flops import section_packed_sequence
from framepack_engine.models.history import (HISTORY_CONTEXT_FRAMES, HISTORY_SCALES, SCALES_BY_NAME,
                            HistoryContext)

VARIANTS = ("bidirectional", "f1")
OFFICIAL_FPS = 30  # the official app's frame rate; sections are counted at the requested fps
# History frames per compression level, from the one table in framepack_engine.models.history.
CLEAN_1X_FRAMES, CLEAN_2X_FRAMES, CLEAN_4X_FRAMES = (SCALES_BY_NAME[name].history_frames
                                                     for name in ("clean", "clean_2x", "clean_4x"))
BIDIRECTIONAL_MAX_PADDING = 3  # above four sections the official repeats padding 2 instead of counting higher


# ----------------------------------------------------------------------------------------------------------------
# Frame counts
# ----------------------------------------------------------------------------------------------------------------


def section_count(seconds: float, fps: float = OFFICIAL_FPS, latent_window_size: int = 9) -> int:
    """Sections for a clip: ``max(round(seconds * fps / (4 * latent_window_size)), 1)``."""
    if not seconds > 0 or not fps > 0:
        raise FramePackError(f"seconds and fps must be positive, got {seconds!r} and {fps!r}: pass e.g. ",
                             Option("seconds", 5), " ", Option("fps", 30), ".")
    _check_window(latent_window_size)
    return int(max(round(seconds * fps / (latent_window_size * VAE_TEMPORAL_COMPRESSION)), 1))


def latent_frame_count(sections: int, latent_window_size: int) -> int:
    """Latent frames of the finished video: every window plus the start frame."""
    return sections * latent_window_size + 1


def pixel_frame_count(latent_frames: int) -> int:
    """Pixel frames the causal VAE decodes from ``latent_frames`` latent frames."""
    return VAE_TEMPORAL_COMPRESSION * latent_frames - 3


def bidirectional_paddings(sections: int) -> list[int]:
    """Latent paddings (in windows) of the bidirectional sections in generation order, ending with 0."""
    if sections > BIDIRECTIONAL_MAX_PADDING + 1:
        # The official found repeating padding 2 looks better than letting the gap grow with the video.
        return [BIDIRECTIONAL_MAX_PADDING] + [2] * (sections - 3) + [1, 0]
    return list(reversed(range(sections)))


def _check_window(latent_window_size) -> None:
    if not isinstance(latent_window_size, int) or latent_window_size < 1:
        raise FramePackError(f"latent_window_size must be a positive integer, got {latent_window_size!r}; "
                             "the official value is 9.")


# ----------------------------------------------------------------------------------------------------------------
# Pixel crossfade
# ----------------------------------------------------------------------------------------------------------------


def pixel_overlap(latent_window_size: int) -> int:
    """Pixel frames shared by two consecutive section decodes: one window's worth, ``4 * window - 3``."""
    return VAE_TEMPORAL_COMPRESSION * latent_window_size - 3


def crossfade(earlier: torch.Tensor, later: torch.Tensor, overlap: int) -> torch.Tensor:
    """Join two clips along time (dim 2), blending the last ``overlap`` frames of ``earlier`` into the first
    ``overlap`` of ``later`` with weights falling linearly from 1 to 0. Output length: sum of both minus overlap;
    dtype and device are ``earlier``'s."""
    if overlap <= 0:
        return torch.cat([earlier, later.to(earlier)], dim=2)
    if earlier.shape[2] < overlap or later.shape[2] < overlap:
        raise FramePackError(f"cannot crossfade {overlap} frames between clips of {earlier.shape[2]} and "
                             f"{later.shape[2]} frames; decode at least one window per section.")
    weights = torch.linspace(1, 0, overlap, dtype=earlier.dtype, device=earlier.device).view(1, 1, -1, 1, 1)
    blended = weights * earlier[:, :, -overlap:] + (1 - weights) * later[:, :, :overlap]
    return torch.cat([earlier[:, :, :-overlap], blended, later[:, :, overlap:]], dim=2).to(earlier)


# ----------------------------------------------------------------------------------------------------------------
# Plans
# ----------------------------------------------------------------------------------------------------------------


def _index_tensor(start: int, length: int) -> torch.Tensor:
    return torch.arange(start, start + length).unsqueeze(0)  # (1, length): the official's batch-1 index rows


@dataclass(frozen=True, eq=False)
class Section:
    """One section of a plan: where it sits, its DiT frame indices, and how its context comes from the history.

    ``index`` counts in generation order; ``padding`` is the bidirectional latent padding in windows (0 for F1).
    Index tensors are int64 of shape ``(1, n)``. The history is the tensor ``initial_history`` returns, updated
    with ``add_to_history`` after each section.
    """

    variant: str
    index: int
    count: int
    padding: int
    latent_window_size: int
    latent_indices: torch.Tensor
    clean_latent_indices: torch.Tensor
    clean_latent_2x_indices: torch.Tensor
    clean_latent_4x_indices: torch.Tensor

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        # The last generated: next to the start image for bidirectional (the official tests its zero padding, which
        # only the last default padding is; chosen paddings may be 0 anywhere), the video's end for F1.
        return self.index == self.count - 1

    @property
    def video_position(self) -> int:
        """Where the section's window sits in the finished video, 0 = next to the start image."""
        return self.count - 1 - self.index if self.variant == "bidirectional" else self.index

    @property
    def total_latent_frames(self) -> int:
        """Latent frames generated so far once this section is in (the official ``total_generated_latent_frames``):
        F1 counts the start latent from the beginning, bidirectional adds it with the last section."""
        windows = (self.index + 1) * self.latent_window_size
        if self.variant == "f1":
            return 1 + windows
        return windows + (1 if self.is_last else 0)

    # -- context -------------------------------------------------------------------------------------------------

    def _context(self, history: torch.Tensor) -> dict[str, torch.Tensor]:
        """The history frames next to this section, by scale name."""
        if self.variant == "bidirectional":
            # The frames right after the window, nearest first: the start of what is generated (zeros before
            # anything is), so the 1x frame comes first and the 4x ones last.
            order = tuple(reversed(HISTORY_SCALES))
            context = history[:, :, :HISTORY_CONTEXT_FRAMES]
        else:
            # F1: the frames right before the window, oldest (4x) first.
            order = HISTORY_SCALES
            context = history[:, :, -HISTORY_CONTEXT_FRAMES:]
        pieces = context.split([scale.history_frames for scale in order], dim=2)
        return {scale.name: piece for scale, piece in zip(order, pieces)}

    def clean_latents(self, history: torch.Tensor, start_latent: torch.Tensor,
                      end_latent: torch.Tensor | None = None, end_strength: float = 1.0) -> torch.Tensor:
        """The two 1x clean frames: the start latent, then the history frame next to the window. With an
        ``end_latent`` (bidirectional only) the first section generated uses ``end_latent * end_strength`` there."""
        clean_1x = self._context(history)["clean"]
        if end_latent is not None:
            if self.variant != "bidirectional":
                raise FramePackError("an end image needs the bidirectional model (FramePackI2V_HY): drop ",
                                     Option("end_image"), " or use ", Option("variant", "bidirectional"), ".")
            if self.is_first:
                clean_1x = end_latent.to(history) * end_strength
        return torch.cat([start_latent.to(history), clean_1x], dim=2)

    def history_context(self, history: torch.Tensor, start_latent: torch.Tensor,
                        end_latent: torch.Tensor | None = None, end_strength: float = 1.0) -> HistoryContext:
        """The section's clean context for the DiT: each scale's latents with their frame indices."""
        context = self._context(history)
        return HistoryContext.of(
            clean=(self.clean_latents(history, start_latent, end_latent, end_strength), self.clean_latent_indices),
            clean_2x=(context["clean_2x"], self.clean_latent_2x_indices),
            clean_4x=(context["clean_4x"], self.clean_latent_4x_indices))

    # -- history ---------------------------------------------------------------------------------------------------

    def add_to_history(self, history: torch.Tensor, generated: torch.Tensor,
                       start_latent: torch.Tensor) -> torch.Tensor:
        """The history with this section's ``generated`` window in: prepended for bidirectional (with the start
        latent in front of the last section), appended for F1."""
        if generated.shape[2] != self.latent_window_size:
            raise FramePackError(f"section {self.index} generated {generated.shape[2]} latent frames, expected "
                                 f"latent_window_size={self.latent_window_size}; sample one window per section.")
        generated = generated.to(history)
        if self.variant == "f1":
            return torch.cat([history, generated], dim=2)
        if self.is_last:
            generated = torch.cat([start_latent.to(history), generated], dim=2)
        return torch.cat([generated, history], dim=2)

    def generated_latents(self, history: torch.Tensor) -> torch.Tensor:
        """The real latents of the video so far (without the zero padding), from a history this section is in. For
        F1 that is everything after the context padding (an extended video's latents included)."""
        if self.variant == "bidirectional":
            return history[:, :, :self.total_latent_frames]
        return history[:, :, HISTORY_CONTEXT_FRAMES:]

    def _decode_count(self, history: torch.Tensor) -> int:
        if self.variant == "bidirectional":
            return self.total_latent_frames if self.is_first else 2 * self.latent_window_size + int(self.is_last)
        # F1: the new window and up to one window before it (all of it when there is less).
        return min(2 * self.latent_window_size, history.shape[2] - HISTORY_CONTEXT_FRAMES)

    def latents_to_decode(self, history: torch.Tensor) -> torch.Tensor:
        """What to VAE-decode once this section is in: everything for the first bidirectional section, afterwards
        the new window plus its neighbour (the decode overlaps the previous one by a window)."""
        real, count = self.generated_latents(history), self._decode_count(history)
        return real[:, :, -count:] if self.variant == "f1" else real[:, :, :count]

    def decode_overlap(self, history: torch.Tensor) -> int:
        """Pixel frames this section's decode shares with the video decoded before it (they are crossfaded)."""
        if self.variant == "bidirectional":
            return pixel_overlap(self.latent_window_size)
        return VAE_TEMPORAL_COMPRESSION * (self._decode_count(history) - self.latent_window_size) - 3


def bidirectional_section(index: int, count: int, padding: int, window: int) -> Section:
    # Index line: start (1) | blank (padding * window) | noisy window | post 1x (1) | 2x (2) | 4x (16).
    start = _index_tensor(0, 1)
    latent_start = 1 + padding * window
    post_start = latent_start + window
    return Section(
        variant="bidirectional", index=index, count=count, padding=padding, latent_window_size=window,
        latent_indices=_index_tensor(latent_start, window),
        clean_latent_indices=torch.cat([start, _index_tensor(post_start, CLEAN_1X_FRAMES)], dim=1),
        clean_latent_2x_indices=_index_tensor(post_start + CLEAN_1X_FRAMES, CLEAN_2X_FRAMES),
        clean_latent_4x_indices=_index_tensor(post_start + CLEAN_1X_FRAMES + CLEAN_2X_FRAMES, CLEAN_4X_FRAMES),
    )


def _f1_section(index: int, count: int, window: int) -> Section:
    # Index line: start (1) | 4x (16) | 2x (2) | 1x (1) | noisy window.
    first_4x = 1
    first_2x = first_4x + CLEAN_4X_FRAMES
    first_1x = first_2x + CLEAN_2X_FRAMES
    return Section(
        variant="f1", index=index, count=count, padding=0, latent_window_size=window,
        latent_indices=_index_tensor(first_1x + CLEAN_1X_FRAMES, window),
        clean_latent_indices=torch.cat([_index_tensor(0, 1), _index_tensor(first_1x, CLEAN_1X_FRAMES)], dim=1),
        clean_latent_2x_indices=_index_tensor(first_2x, CLEAN_2X_FRAMES),
        clean_latent_4x_indices=_index_tensor(first_4x, CLEAN_4X_FRAMES),
    )


def plan_sections(variant: str, sections: int, latent_window_size: int = 9,
                  paddings: list[int] | None = None) -> list[Section]:
    """The sections of a video in generation order, for the "bidirectional" or "f1" model; `paddings` (bidirectional
    only, one per section in generation order) replace the official ones (musubi-tuner's latent_paddings)."""
    if variant not in VARIANTS:
        raise FramePackError(f"unknown variant {variant!r}; use 'bidirectional' or 'f1'.")
    if not isinstance(sections, int) or sections < 1:
        raise FramePackError(f"sections must be a positive integer, got {sections!r}; use section_count().")
    _check_window(latent_window_size)
    if variant == "f1":
        return [_f1_section(index, sections, latent_window_size) for index in range(sections)]
    if paddings is not None and len(paddings) != sections:
        raise FramePackError(f"{len(paddings)} latent paddings for {sections} sections: give one per section.")
    paddings = bidirectional_paddings(sections) if paddings is None else paddings
    return [bidirectional_section(index, sections, padding, latent_window_size)
            for index, padding in enumerate(paddings)]


def initial_history(variant: str, start_latent: torch.Tensor) -> torch.Tensor:
    """The float32 history before the first section: 19 zero frames shaped like ``start_latent`` (one latent frame,
    ``(batch, channels, 1, height, width)``), followed for F1 by the start latent itself."""
    if variant not in VARIANTS:
        raise FramePackError(f"unknown variant {variant!r}; use 'bidirectional' or 'f1'.")
    batch, channels, _, height, width = start_latent.shape
    zeros = torch.zeros(batch, channels, HISTORY_CONTEXT_FRAMES, height, width,
                        dtype=torch.float32, device=start_latent.device)
    if variant == "bidirectional":
        return zeros
    return torch.cat([zeros, start_latent.to(zeros)], dim=2)


# ----------------------------------------------------------------------------------------------------------------
# Packed sequence length
# ----------------------------------------------------------------------------------------------------------------


def tokens_per_section(latent_height: int, latent_width: int, latent_window_size: int = 9,
                       patch_size: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Video tokens the DiT packs for one section (noisy window + the history scales), before text and image tokens.
    The same for every section of either loop, whatever the video length."""
    config = {"patch_size_t": patch_size[0], "patch_size": patch_size[1]}
    return section_packed_sequence(config, latent_window_size, latent_height, latent_width, 0, 0).latent_tokens