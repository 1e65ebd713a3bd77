"""The history context of a section: clean latents at three compressions, and the one table that sizes them.

FramePack conditions each section on the frames next to it, packed more coarsely the further they are: one frame at
1x (patch kernel (1, 2, 2), like the noisy latents), two at 2x ((2, 4, 4)) and sixteen at 4x ((4, 8, 8)). The 1x
group also carries the start latent in front of its history frame. `HISTORY_SCALES` (framepack_engine.official) is
the only place these kernels and frame counts are written: the DiT builds its embedders from it, the section plans
cut the history with it and the FLOP counter counts tokens with it.

A `HistoryContext` is what the DiT takes for one section: per scale, the clean latents and their frame indices (for
the 3D RoPE), in packing order (4x, 2x, 1x); the noisy latents follow them in the packed sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from framepack_engine.official import HISTORY_SCALES, START_LATENT_FRAMES, HistoryScale  # noqa: F401 (re-exported)


SCALES_BY_NAME = {scale.name: scale for scale in HISTORY_SCALES}
# The official forward's keyword arguments of each scale: (latents, frame indices).
OFFICIAL_KEYWORDS = {"clean": ("clean_latents", "clean_latent_indices"),
                     "clean_2x": ("clean_latents_2x", "clean_latent_2x_indices"),
                     "clean_4x": ("clean_latents_4x", "clean_latent_4x_indices")}
HISTORY_CONTEXT_FRAMES = sum(scale.history_frames for scale in HISTORY_SCALES)  # 19


@dataclass(frozen=True)
class ScaleContext:
    """One scale of the context: latents (batch, channels, frames, height, width) and frame indices
    (frames,), (1, frames) or (batch, frames)."""

    scale: HistoryScale
    latents: torch.Tensor
    indices: torch.Tensor | None

    @property
    def frames(self) -> int:
        return self.latents.shape[2]


@dataclass(frozen=True)
class HistoryContext:
    """The clean context of one section, scales in packing order (4x, 2x, 1x); absent scales are left out."""

    scales: tuple[ScaleContext, ...] = ()

    @classmethod
    def of(cls, **groups: tuple[torch.Tensor, torch.Tensor | None] | None) -> "HistoryContext":
        """HistoryContext.of(clean=(latents, indices), clean_2x=..., clean_4x=...); None or missing = absent."""
        unknown = set(groups) - set(SCALES_BY_NAME)
        if unknown:
            raise TypeError(f"unknown history scales {sorted(unknown)}; use {sorted(SCALES_BY_NAME)}")
        return cls(tuple(ScaleContext(scale, *groups[scale.name]) for scale in HISTORY_SCALES
                         if groups.get(scale.name) is not None and groups[scale.name][0] is not None))

    @classmethod
    def from_official_kwargs(cls, **kwargs) -> "HistoryContext":
        """From the official forward's clean_latents / clean_latent_indices / ... keyword arguments."""
        return cls.of(**{name: (kwargs.get(latents), kwargs.get(indices))
                         for name, (latents, indices) in OFFICIAL_KEYWORDS.items()})

    def official_kwargs(self) -> dict[str, torch.Tensor]:
        """The official forward's keyword arguments for this context (absent scales left out)."""
        kwargs = {}
        for item in self.scales:
            latents, indices = OFFICIAL_KEYWORDS[item.scale.name]
            kwargs[latents], kwargs[indices] = item.latents, item.indices
        return kwargs

    def to(self, device=None, dtype=None) -> "HistoryContext":
        """Latents to `dtype` and both to `device`; indices keep their integer dtype."""
        return HistoryContext(tuple(
            ScaleContext(item.scale, item.latents.to(device=device, dtype=dtype),
                         None if item.indices is None else torch.as_tensor(item.indices).to(device))
            for item in self.scales))

    def frames(self, name: str) -> int:
        """Latent frames at a scale (0 when absent)."""
        return next((item.frames for item in self.scales if item.scale.name == name), 0)
