"""The section loop: the one code path that `Engine.stream` and `framepack bench` both run.

Given what the encoders produced (prompt embeddings per section, the image embedding, the start and end latents) and
a section plan, `run_sections` samples each section with the DiT, puts it into the latent history and, when given a
decoder, decodes it and assembles the video's pixels. Everything a feature needs from one section happens here:
hooks see each section and step (progress, previews, cancellation, the benchmark's clocks) and a step cache can be
created per section and guidance branch. The DiT is only ever called through `FramePackDiT.velocity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from framepack_engine.errors import FramePackError
from framepack_engine.generation import sampling
from framepack_engine.models.conditioning import PromptEmbedding
from framepack_engine.models.history import HistoryContext
from framepack_engine.media.images import pixels_to_uint8
from framepack_engine.generation.sections import Section, crossfade, pixel_overlap


@dataclass
class SectionInputs:
    """What the encoders produced for one generation, computed before the first section."""

    prompts: list[PromptEmbedding]  # one per section, in generation order (repeats share one embedding)
    negative: PromptEmbedding | None  # None when cfg is 1 (no negative pass)
    image_embeddings: torch.Tensor | None  # SigLIP tokens (1, tokens, channels), None for text-only checkpoints
    start_latent: torch.Tensor  # (1, channels, 1, height, width), float32, scaled like the history
    end_latent: torch.Tensor | None = None  # first-last-frame video
    end_strength: float = 1.0
    # Keyframes (framepack_engine.generation.keyframes), by video position: a keyframed section starts from its
    # keyframe's latent (clean_latents_pre) and is conditioned on its SigLIP tokens.
    keyframe_latents: dict[int, torch.Tensor] = field(default_factory=dict)
    keyframe_embeddings: dict[int, torch.Tensor] = field(default_factory=dict)


@dataclass
class SamplingOptions:
    """The per-section sampling knobs the runner needs (a subset of framepack_engine.settings.GenerationSettings)."""

    steps: int = 25
    sampler: str = "unipc"
    latent_window_size: int = 9
    distilled_guidance: float = 10.0
    cfg: float = 1.0
    guidance_rescale: float = 0.0
    shift: float | None = None

    @classmethod
    def of(cls, settings) -> "SamplingOptions":
        return cls(**{name: getattr(settings, name) for name in cls.__dataclass_fields__})


class RunnerHooks:
    """Called by run_sections; override what you need. An exception raised here stops the run."""

    def section_started(self, section: Section, context: HistoryContext) -> None:
        """Before a section's sampling; context: its clean history, as the DiT will get it."""

    def step_started(self, section: Section, step: int) -> None:
        """Before the denoiser call of each sampler step (the call plus the sampler update after it is one step)."""

    def step_finished(self, section: Section, info: dict) -> None:
        """After each step: info has i, total_steps, x, denoised, sigma."""

    def section_finished(self, section: Section, generated: torch.Tensor) -> None:
        pass


@dataclass
class SectionOutput:
    """One finished section, in generation order."""

    section: Section
    generated: torch.Tensor  # the sampled window (1, channels, window, height, width)
    history: torch.Tensor  # the latent history with the window in
    latents: torch.Tensor  # the real latents of the video so far
    steps: int  # sampler steps run
    frames: np.ndarray | None = None  # uint8 (T, H, W, 3): pixel frames this section made final, in video order
    pending_frames: np.ndarray | None = None  # uint8: decoded frames the next section will still crossfade
    pending_pixels: torch.Tensor | None = None  # the same frames as float pixels: what a resumed run blends into
    stats: dict = field(default_factory=dict)


# Pixel assembly ------------------------------------------------------------------------------------------------------


def to_uint8_frames(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3)."""
    return pixels_to_uint8(pixels[0]).permute(1, 2, 3, 0).contiguous().numpy()


class PixelAssembler:
    """The decoded video, kept as float only where the next section will crossfade into it.

    Each section's decode overlaps what came before by up to `keep` pixel frames; those are blended, and everything
    the next section cannot touch any more is handed out once as uint8. So host memory for pixels stays at one
    section's decode, whatever the video's length. `direction` is "forward" when sections are appended (F1) and
    "backward" when they are prepended (the bidirectional loop generates the end of the video first).
    """

    def __init__(self, direction: str, keep: int, initial: torch.Tensor | None = None):
        self.direction = direction
        self.keep = keep
        self.pending = initial  # float (1, 3, T, H, W): the frames the next decode may still blend

    def add(self, section_pixels: torch.Tensor, overlap: int) -> np.ndarray:
        """Blends a section's decode in; returns the frames that became final, in video order."""
        if self.pending is None:
            video = section_pixels
        elif self.direction == "forward":
            video = crossfade(self.pending, section_pixels, overlap)
        else:
            video = crossfade(section_pixels, self.pending, overlap)
        keep = min(self.keep, video.shape[2])
        if self.direction == "forward":
            final, self.pending = video[:, :, :video.shape[2] - keep], video[:, :, video.shape[2] - keep:]
        else:
            final, self.pending = video[:, :, keep:], video[:, :, :keep]
        return to_uint8_frames(final)

    def pending_frames(self) -> np.ndarray:
        return to_uint8_frames(self.pending)

    def finish(self) -> np.ndarray:
        """The pending frames as final (after the last section)."""
        frames, self.pending = self.pending_frames(), self.pending[:, :, :0]
        return frames


# The loop ------------------------------------------------------------------------------------------------------------


def _model_function(dit):
    def velocity(hidden_states, timestep, prompt: PromptEmbedding, history, latent_indices, image_embeddings,
                 guidance=None, step_cache=None):
        return dit.velocity(hidden_states, timestep, prompt.llama, None, prompt.clip_pooled, guidance,
                            latent_indices, history, image_embeddings, step_cache)

    return velocity


def _cfg_parallel_function(velocity, pair, own_branch: str, branches: dict):
    """CFG parallel: the denoiser asks for the positive branch and then the negative one; the first call runs this
    rank's own branch (the half of the ranks it is in) and swaps the result with its twin in the other half, the
    second hands over the twin's. Both halves then hold both velocities, bit for bit the same."""
    waiting = {}

    def call(hidden_states, timestep, branch: str, **kwargs):
        if branch == "negative":
            return waiting.pop("negative")
        own = {key: value for key, value in branches[own_branch].items() if key != "branch"}
        mine = velocity(hidden_states, timestep, **{**kwargs, **own})
        positive, waiting["negative"] = pair.all_gather(mine[None], dim=0, kind="cfg").unbind(0)
        return positive

    return call


def check_finite_step(section: Section, info: dict) -> None:
    """Stops the run at the first step whose latents (the sampler's latent or the model's prediction of the clean
    one) hold NaN or an infinity: nothing after it could be right (the video would be black). Names the section and
    step. One float32 sum of the window's latents per step, and one host read."""
    latents = [info["x"]] + ([info["denoised"]] if info.get("denoised") is not None else [])
    total = sum(tensor.sum(dtype=torch.float32) for tensor in latents)
    if not bool(torch.isfinite(total)) and not all(bool(torch.isfinite(tensor).all()) for tensor in latents):
        raise FramePackError(
            f"The latents became NaN or infinite at section {section.index + 1} of {section.count} (generation "
            f"order), step {info['i'] + 1} of {info['total_steps']}: nothing after it can be right, so the run stops "
            "there; lower cfg, distilled_guidance or shift, or check the model's and LoRAs' weights.")


def run_sections(dit, plan: list[Section], inputs: SectionInputs, options: SamplingOptions,
                 generator: torch.Generator, history: torch.Tensor, *, device, dtype,
                 decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 initial_pixels: torch.Tensor | None = None, hooks: RunnerHooks | None = None,
                 make_step_cache: Callable[[Section, str], object] | None = None,
                 parallel=None) -> Iterator[SectionOutput]:
    """Samples the plan's sections in order, yielding each as soon as it is in the history (and decoded).

    history: framepack_engine.generation.sections.initial_history(...) (or an extension's history); generator: the one seeded generator
    every section draws its noise from; decode: latents (history scale) -> pixels (1, 3, T, H, W) in [-1, 1], or None
    to skip pixels (the benchmark); initial_pixels: the video so far for an extension (or a checkpoint's pending
    pixels when resuming); make_step_cache(section, branch) -> a step-cache policy for the "positive" or "negative"
    guidance branch, or None; parallel: the ParallelLayout (framepack_engine.runtime.distributed) when this is one
    of several ranks running the same loop: with `parallel.cfg == 2` the two guidance branches run on its two halves.
    """
    hooks = hooks or RunnerHooks()
    # The window the plan's sections sample: latent_window_size, or one frame for a one-frame run.
    window = plan[0].latent_window_size if plan else options.latent_window_size
    latent_height, latent_width = inputs.start_latent.shape[-2:]
    sigmas = sampling.flux_sigmas(
        options.steps, sampling.flux_sequence_length(window, latent_height, latent_width), options.shift).to(device)
    guidance = options.distilled_guidance if dit.takes_guidance else None
    image_embeddings = None if inputs.image_embeddings is None else inputs.image_embeddings.to(device, dtype)
    keyframe_embeddings = {position: embedding.to(device, dtype)
                           for position, embedding in inputs.keyframe_embeddings.items()}
    prompts = {id(prompt): prompt.to(device, dtype) for prompt in inputs.prompts}
    negative = None if options.cfg == 1 else inputs.negative.to(device, dtype)
    assembler = None
    if decode is not None and plan:
        direction = "forward" if plan[0].variant == "f1" else "backward"
        assembler = PixelAssembler(direction, pixel_overlap(window), initial_pixels)

    for section in plan:
        start_latent = inputs.keyframe_latents.get(section.video_position, inputs.start_latent)
        context = section.history_context(history, start_latent, inputs.end_latent, inputs.end_strength)
        hooks.section_started(section, context)
        noise = sampling.draw_noise(generator, 1, dit.latent_channels, window, latent_height, latent_width,
                                    device=device)
        common = {"history": context.to(device, dtype), "latent_indices": section.latent_indices.to(device),
                  "image_embeddings": keyframe_embeddings.get(section.video_position, image_embeddings)}
        branches = {"positive": {"prompt": prompts[id(inputs.prompts[section.index])]}}
        if negative is not None:
            branches["negative"] = {"prompt": negative}
        for branch, conditioning in branches.items():
            conditioning["step_cache"] = make_step_cache(section, branch) if make_step_cache else None
        model = _model_function(dit)
        if negative is not None and parallel is not None and parallel.cfg == 2:
            for branch, conditioning in branches.items():
                conditioning["branch"] = branch
            model = _cfg_parallel_function(model, parallel.cfg_pair, parallel.cfg_branch, branches)
        denoise = sampling.make_denoiser(
            model, branches["positive"], branches.get("negative"), common=common,
            cfg_scale=options.cfg, guidance_rescale=options.guidance_rescale, distilled_guidance=guidance, dtype=dtype)

        steps = [0]

        def timed_denoise(x, sigma, denoise=denoise, section=section, steps=steps):
            hooks.step_started(section, steps[0])
            steps[0] += 1
            return denoise(x, sigma)

        def step_finished(info, section=section):
            check_finite_step(section, info)
            hooks.step_finished(section, info)

        with torch.no_grad():
            generated = sampling.sample(options.sampler, timed_denoise, noise, sigmas, callback=step_finished)
        history = section.add_to_history(history, generated, inputs.start_latent)
        hooks.section_finished(section, generated)
        output = SectionOutput(section, generated, history, section.generated_latents(history), steps[0])
        if assembler is not None:
            output.frames = assembler.add(decode(section.latents_to_decode(history)), section.decode_overlap(history))
            output.pending_frames = assembler.pending_frames()
            if section is plan[-1]:  # nothing will blend into the pending frames any more
                pieces = [output.frames, assembler.finish()]
                output.frames = np.concatenate(pieces if assembler.direction == "forward" else pieces[::-1])
                output.pending_frames = output.frames[:0]
            output.pending_pixels = assembler.pending
        yield output


__all__ = ["PixelAssembler", "RunnerHooks", "SamplingOptions", "SectionInputs",
           "SectionOutput", "run_sections", "to_uint8_frames"]
