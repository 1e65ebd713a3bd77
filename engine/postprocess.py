"""The models that run after generation, loaded from a generation's settings: RIFE for `interpolate` (with
`rife_model`) and the upscaler of `upscale` (framepack_engine.media.postprocess runs them on each section)."""

from __future__ import annotations

from framepack_engine.media.postprocess import PostProcess
from framepack_engine.models.rife import load_rife
from framepack_engine.models.upscaler import load_upscaler
from framepack_engine.settings import GenerationSettings


def load_postprocess(settings: GenerationSettings, device="cpu") -> PostProcess | None:
    """The loaded interpolation and upscaling models of `settings` on `device`, or None when it asks for neither
    (the files were checked with the settings, before any model loaded)."""
    rife = load_rife(settings.rife_model, device) if settings.interpolate > 1 else None
    upscaler = load_upscaler(settings.upscale, device) if settings.upscale is not None else None
    if rife is None and upscaler is None:
        return None
    return PostProcess(rife=rife, interpolate=settings.interpolate, upscaler=upscaler)


# The options of GenerationSettings that act after generation (what `Engine.generate` reads back from a result).
POSTPROCESS_OPTIONS = ("interpolate", "rife_model", "fps_out", "upscale")


def post_fps(recorded: dict) -> float:
    """The output's frame rate from recorded settings: fps_out, else fps times the interpolation."""
    if recorded.get("fps_out") is not None:
        return float(recorded["fps_out"])
    return float(recorded["fps"]) * int(recorded.get("interpolate", 1))
