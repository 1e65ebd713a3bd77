"""Engine: the public API that turns a prompt and images into a video, section by section.

One generation, as the official app does it:
  prompt -> Llama hidden states + CLIP-L pooled output; start (and end) image -> SigLIP tokens and VAE latents;
  then for each section of the plan (engine.sections): draw noise from the one seeded generator, sample it with the
  DiT (engine.sampling), put the window into the latent history, decode the new frames and crossfade them in.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from engine import sampling, sections
from engine.buckets import find_nearest_bucket
from engine.conditioning import PromptEmbedding
from engine.errors import FramePackError
from engine.images import image_to_pixels, load_image, load_video_frames, resize_and_center_crop
from engine.preview import LATENT_RGB_FACTORS, latents_to_preview_rgb
from engine.video import Video



class GenerationCancelled(Exception):
    """Raised inside the step loop when the caller cancels; the engine keeps every finished section."""


@dataclass
class GenerationSettings:
    """Every knob of one generation; written into the output's metadata so a video can be reproduced."""

    prompt: str
    negative_prompt: str = ""
    seconds: float = 5.0
    fps: float = 30.0
    seed: int = 31337
    steps: int = 25
    distilled_guidance: float = 10.0
    cfg: float = 1.0
    guidance_rescale: float = 0.0
    latent_window_size: int = 9
    resolution: int = 640
    width: int | None = None
    height: int | None = None
    sampler: str = "unipc"
    shift: float | None = None
    cache: str | None = None
    cache_threshold: float | None = None
    section_prompts: list[str] | str | None = None
    init_strength: float = 1.0
    end_strength: float = 1.0
    vision_strength: float = 1.0
    variant: str = "bidirectional"
    mode: str = "t2v"

    def validate(self):
        if not isinstance(self.prompt, str):
            raise FramePackError("The prompt must be a string: pass prompt='a cat walks on grass'.")
        if not self.seconds > 0:
            raise FramePackError(f"seconds must be positive, got {self.seconds}: pass e.g. seconds=5.")
        if not self.fps > 0:
            raise FramePackError(f"fps must be positive, got {self.fps}: pass e.g. fps=30.")
        if not (isinstance(self.steps, int) and self.steps >= 1):
            raise FramePackError(f"steps must be a positive integer, got {self.steps}: the official default is 25.")
        if not (isinstance(self.latent_window_size, int) and self.latent_window_size >= 1):
            raise FramePackError(f"latent_window_size must be a positive integer, got {self.latent_window_size}: the official value is 9.")
        if self.sampler not in sampling.SAMPLERS:
            raise FramePackError(f"Unknown sampler {self.sampler!r}: choose one of {', '.join(sampling.SAMPLERS)}.")
        if self.cfg < 1:
            raise FramePackError(f"cfg must be at least 1 (1 turns real guidance off), got {self.cfg}.")
        if not 0 < self.init_strength <= 1:
            raise FramePackError(f"init_strength must be in (0, 1], got {self.init_strength}: 1 keeps the start image as it is.")
        if not 0 <= self.end_strength <= 1:
            raise FramePackError(f"end_strength must be in [0, 1], got {self.end_strength}.")
        if not self.vision_strength >= 0:
            raise FramePackError(f"vision_strength must be non-negative, got {self.vision_strength}.")
        if self.cache is not None:
            raise FramePackError(
                f"Step caching ({self.cache!r}) is not available in this version: leave cache unset.")
        if not (isinstance(self.resolution, int) and self.resolution >= 64):
            raise FramePackError(f"resolution must be an integer of at least 64, got {self.resolution}.")


@dataclass
class SectionResult:
    """A finished section, as `Engine.stream` yields it: the video so far and what the section took."""

    index: int
    count: int
    video_position: int
    frames: np.ndarray  # uint8 (T, H, W, 3): the whole video generated so far
    latents: torch.Tensor  # the real latents of the video so far (unscaled by nothing: the DiT's latent space)
    stats: dict = field(default_factory=dict)


def parse_section_prompts(section_prompts, prompt: str, count: int, seconds_per_section: float,
                          video_positions: list[int]) -> list[str]:
    """The prompt of each section in generation order.

    Two forms are accepted: a list (or newline-separated text) of suffixes added to the main prompt and stretched
    evenly over the video (4 sections, 2 lines: the first line for sections 1-2, the second for 3-4); or timestamped
    text "[0s: a man waves] [2.5s: a man jumps]", where each prompt replaces the main one from its time on.
    """
    if not section_prompts:
        return [prompt] * count
    if isinstance(section_prompts, str):
        timestamped = re.findall(r"\[\s*(\d+(?:\.\d+)?)\s*s\s*:\s*([^\]]*)\]", section_prompts)
        if timestamped:
            changes = sorted((float(t), text.strip()) for t, text in timestamped)
            result = []
            for position in video_positions:
                start = position * seconds_per_section
                current = prompt
                for time_point, text in changes:
                    if time_point <= start + 1e-6:
                        current = text
                result.append(current)
            return result
        section_prompts = [line for line in section_prompts.splitlines() if line.strip()]
    lines = [str(line).strip() for line in section_prompts]
    if not lines:
        return [prompt] * count
    return [f"{prompt} {lines[min(position * len(lines) // count, len(lines) - 1)]}".strip()
            for position in video_positions]


class Engine:
    """A loaded FramePack model: DiT, VAE, text and image encoders, on one device."""

    def __init__(self, transformer, vae, text_encoder, image_encoder=None, variant: str = "bidirectional",
                 device="cpu", dtype=torch.bfloat16, name: str = "framepack", notice: str | None = None,
                 default_resolution: int = 640):
        """transformer: FramePackDiT; vae: HunyuanVideoVAE; text_encoder: engine.conditioning.TextEncoder (or any
        object whose encode(prompt) gives a PromptEmbedding); image_encoder: engine.conditioning.ImageEncoder."""
        if variant not in sections.VARIANTS:
            raise FramePackError(f"Unknown variant {variant!r}: choose 'bidirectional' or 'f1'.")
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.image_encoder = image_encoder
        self.default_resolution = default_resolution
        self.variant = variant
        self.device = torch.device(device)
        self.dtype = dtype
        self.name = name
        # Said once per generation, e.g. that a preset's random weights make noise.
        self.notice = notice

    # ---- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, transformer="lllyasviel/FramePackI2V_HY", base="hunyuanvideo-community/HunyuanVideo",
                        image_encoder="lllyasviel/flux_redux_bfl", variant="auto", device=None, dtype=torch.bfloat16,
                        vram_budget_gb=None, quantize=None, attention="auto", allow_download=True,
                        cache_dir=None, fused_kernels=False) -> "Engine":
        """Each source is a Hugging Face repo id (local cache first, downloaded when allowed), a local folder in
        the repo's layout, or (transformer only) a single .safetensors file. variant="auto" reads the transformer's
        name: F1 checkpoints have "F1" in it. fused_kernels runs the DiT's glue as Triton kernels (CUDA only)."""
        from engine.model_loading import load_engine_components

        return load_engine_components(cls, transformer=transformer, base=base, image_encoder=image_encoder,
                                      variant=variant, device=device, dtype=dtype, vram_budget_gb=vram_budget_gb,
                                      quantize=quantize, attention=attention, allow_download=allow_download,
                                      cache_dir=cache_dir, fused_kernels=fused_kernels)

    @classmethod
    def from_preset(cls, name: str = "tiny", variant: str = "bidirectional", device="cpu", seed: int = 0) -> "Engine":
        from engine.presets import build_preset_engine

        return build_preset_engine(cls, name, variant=variant, device=device, seed=seed)

    # ---- conditioning ---------------------------------------------------------------------------------------------

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """The text encoder caches by text, so repeated section prompts are encoded once."""
        return self.text_encoder.encode(prompt)

    def _image_embedding(self, image: np.ndarray) -> torch.Tensor:
        if self.image_encoder is None:
            raise FramePackError("This engine has no image encoder: load one with image_encoder=... .")
        with torch.no_grad():
            return self.image_encoder.encode(image)

    def _encode_latent(self, image: np.ndarray) -> torch.Tensor:
        pixels = image_to_pixels(image).to(self.vae_device, self.vae_dtype)
        with torch.no_grad():
            latent = self.vae.encode(pixels)
        return latent.float() * self.vae.scaling_factor

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.vae.decode((latents / self.vae.scaling_factor).to(self.vae_device, self.vae_dtype)).float().cpu()

    @property
    def vae_device(self):
        return next(self.vae.parameters()).device

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype

    # ---- generation -----------------------------------------------------------------------------------------------

    def generate(self, prompt: str, image=None, end_image=None, **options) -> Video:
        """Generates the whole video; on cancellation returns the sections finished so far."""
        result, stats = None, {"sections": []}
        settings = None
        for result in self.stream(prompt, image=image, end_image=end_image, **options):
            stats["sections"].append(result.stats)
            settings = result.stats.get("settings", settings)
        if result is None:
            raise GenerationCancelled("Generation was cancelled before the first section finished.")
        stats["cancelled"] = len(stats["sections"]) < result.count
        stats["seconds"] = sum(s["seconds"] for s in stats["sections"])
        return Video(frames=result.frames, fps=float(options.get("fps", 30.0)), stats=stats,
                     metadata=self._metadata(settings), latents=result.latents)

    def _metadata(self, settings: GenerationSettings | None) -> dict:
        meta = {"engine": "framepack-engine", "model": self.name}
        if settings is not None:
            meta.update({k: v for k, v in asdict(settings).items() if v is not None})
        return meta

    def _resolve_size(self, settings: GenerationSettings, image: np.ndarray | None) -> tuple[int, int]:
        if image is not None:
            height, width = image.shape[:2]
        else:
            height, width = settings.height or settings.resolution, settings.width or settings.resolution
        return find_nearest_bucket(height, width, resolution=settings.resolution)

    def stream(self, prompt: str, image=None, end_image=None, *, negative_prompt: str = "", seconds: float = 5.0,
               fps: float = 30.0, seed: int = 31337, steps: int = 25, distilled_guidance: float = 10.0,
               cfg: float = 1.0, guidance_rescale: float = 0.0, latent_window_size: int = 9, resolution: int | None = None,
               width: int | None = None, height: int | None = None, sampler: str = "unipc", shift: float | None = None,
               cache: str | None = None, cache_threshold: float | None = None, section_prompts=None,
               init_strength: float = 1.0, end_strength: float = 1.0, vision_strength: float = 1.0,
               input_video=None, callback: Callable[[dict], None] | None = None,
               cancel: threading.Event | Callable[[], bool] | None = None) -> Iterator[SectionResult]:
        """Yields each finished section (with the whole video so far) as soon as it is decoded."""
        start_image = load_image(image, "start image") if image is not None else None
        end = load_image(end_image, "end image") if end_image is not None else None
        if end is not None and start_image is None:
            raise FramePackError("An end image needs a start image too: pass image=... with end_image=... .")
        if end is not None and self.variant != "bidirectional":
            raise FramePackError("End images need the bidirectional model (FramePackI2V_HY): drop end_image or load that model.")
        if input_video is not None and self.variant != "f1":
            raise FramePackError("Video extension needs the F1 model (FramePack_F1_I2V_HY): load it with variant='f1'.")
        resolution = resolution or self.default_resolution
        mode = "flf2v" if end is not None else ("i2v" if start_image is not None else "t2v")
        if input_video is not None:
            mode = "extend"
        settings = GenerationSettings(
            prompt=prompt, negative_prompt=negative_prompt, seconds=seconds, fps=fps, seed=seed, steps=steps,
            distilled_guidance=distilled_guidance, cfg=cfg, guidance_rescale=guidance_rescale,
            latent_window_size=latent_window_size, resolution=resolution, width=width, height=height, sampler=sampler,
            shift=shift, cache=cache, cache_threshold=cache_threshold, section_prompts=section_prompts,
            init_strength=init_strength, end_strength=end_strength, vision_strength=vision_strength,
            variant=self.variant, mode=mode)
        settings.validate()
        if self.notice:
            print(self.notice)

        video_frames = None
        if input_video is not None:
            video_frames, _ = load_video_frames(input_video)
            start_image = video_frames[0]
        bucket_height, bucket_width = self._resolve_size(settings, start_image)
        if start_image is None:
            # Text to video starts from a black frame, as the community apps do.
            start_image = np.zeros((bucket_height, bucket_width, 3), dtype=np.uint8)
        start_image = resize_and_center_crop(start_image, bucket_width, bucket_height)
        if end is not None:
            end = resize_and_center_crop(end, bucket_width, bucket_height)

        generator = torch.Generator("cpu").manual_seed(int(seed))
        start_latent = self._encode_latent(start_image)
        if init_strength < 1:
            noise = torch.randn(start_latent.shape, generator=generator).to(start_latent)
            start_latent = init_strength * start_latent + (1 - init_strength) * noise
        end_latent = self._encode_latent(end) if end is not None else None

        image_embedding = None
        if self.transformer.takes_image_embeddings:
            image_embedding = self._image_embedding(start_image).float()
            if end is not None:
                total = init_strength + end_strength
                end_embedding = self._image_embedding(end).float()
                image_embedding = (init_strength * image_embedding + end_strength * end_embedding) / max(total, 1e-6)
            image_embedding = (image_embedding * vision_strength).to(self.device, self.dtype)

        count = sections.section_count(seconds, fps, latent_window_size)
        plan = sections.plan_sections(self.variant, count, latent_window_size)
        history = sections.initial_history(self.variant, start_latent)
        pixels = None
        if video_frames is not None:
            history, pixels = self._extension_history(video_frames, bucket_width, bucket_height, history)

        seconds_per_section = latent_window_size * 4 / fps
        prompts = parse_section_prompts(section_prompts, prompt, count, seconds_per_section,
                                        [section.video_position for section in plan])
        # With cfg 1 the official's negative pass is skipped (its zeros are never used).
        negative = self.encode_prompt(negative_prompt) if cfg != 1 else None

        latent_height, latent_width = start_latent.shape[-2:]
        for section in plan:
            started = time.perf_counter()
            positive = self.encode_prompt(prompts[section.index])
            steps_run = [0]

            def step_callback(info, section=section):
                steps_run[0] += 1
                if _is_cancelled(cancel):
                    raise GenerationCancelled()
                if callback is not None:
                    extra = {"section": section.index, "sections": count}
                    denoised = info.get("denoised")
                    if denoised is not None and denoised.shape[1] == len(LATENT_RGB_FACTORS):
                        # The cheap linear latent -> RGB projection of the current x0 estimate.
                        extra["preview"] = latents_to_preview_rgb(denoised)
                    callback({**info, **extra})

            inputs = section.transformer_inputs(history, start_latent, end_latent, end_strength)
            try:
                generated = self._sample_section(settings, generator, positive, negative, image_embedding, inputs,
                                                 latent_height, latent_width, step_callback)
            except GenerationCancelled:
                return
            history = section.add_to_history(history, generated, start_latent)
            if video_frames is None:
                pixels = section.blend_pixels(pixels, self._decode(section.latents_to_decode(history)))
                latents_so_far = section.generated_latents(history)
            else:
                latents_so_far = history[:, :, sections.HISTORY_CONTEXT_FRAMES:]
                pixels = self._extend_pixels(pixels, latents_so_far, latent_window_size)
            seconds_taken = time.perf_counter() - started
            stats = {"section": section.index, "video_position": section.video_position, "steps": steps_run[0],
                     "seconds": seconds_taken, "tokens": self.section_tokens(latent_height, latent_width, latent_window_size),
                     "prompt": prompts[section.index], "settings": settings}
            yield SectionResult(section.index, count, section.video_position, _to_uint8(pixels), latents_so_far, stats)

    def _extension_history(self, frames, width, height, history):
        """For video extension: the input video's latents become the F1 history, its frames the video so far."""
        resized = np.stack([resize_and_center_crop(frame, width, height) for frame in frames])
        # The causal VAE takes 1 + 4k frames: drop the few at the end that do not fill a latent frame.
        usable = 1 + (len(resized) - 1) // 4 * 4
        resized = resized[:usable]
        pixels = (torch.from_numpy(resized).float() / 127.5 - 1).permute(3, 0, 1, 2)[None]
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae_device, self.vae_dtype)).float() * self.vae.scaling_factor
        history = torch.cat([history[:, :, :sections.HISTORY_CONTEXT_FRAMES], latents.to(history)], dim=2)
        return history, pixels.float().cpu()

    def _extend_pixels(self, pixels, latents, window):
        """Decode the new window with up to one window of what came before, and crossfade that overlap in."""
        decode_count = min(2 * window, latents.shape[2])
        section_pixels = self._decode(latents[:, :, -decode_count:])
        return sections.crossfade(pixels, section_pixels, 4 * (decode_count - window) - 3)

    def section_tokens(self, latent_height: int, latent_width: int, latent_window_size: int) -> int:
        return sections.tokens_per_section(latent_height, latent_width, latent_window_size)

    def _sample_section(self, settings: GenerationSettings, generator, positive: PromptEmbedding,
                        negative: PromptEmbedding | None, image_embedding, section_inputs, latent_height, latent_width,
                        step_callback):
        device, dtype = self.device, self.dtype
        window = settings.latent_window_size
        noise = sampling.draw_noise(generator, 1, self.transformer.config.in_channels, window, latent_height,
                                    latent_width, device=device)
        sigmas = sampling.flux_sigmas(settings.steps, sampling.flux_sequence_length(window, latent_height, latent_width),
                                      settings.shift).to(device)

        def conditioning(embedding: PromptEmbedding):
            # The prompt's tokens without the official 512-token padding: the DiT would crop it off anyway, and
            # with no mask it needs no device-to-host copy of the lengths at each step.
            return {"encoder_hidden_states": embedding.llama.to(device, dtype), "encoder_attention_mask": None,
                    "pooled_projections": embedding.clip_pooled.to(device, dtype)}

        common = {key: value.to(device, dtype) if value.is_floating_point() else value.to(device)
                  for key, value in section_inputs.items()}
        if image_embedding is not None:
            common["image_embeddings"] = image_embedding
        guidance = settings.distilled_guidance if self.transformer.config.guidance_embeds else None
        negative_conditioning = None
        if settings.cfg != 1:
            negative_conditioning = conditioning(negative)
        denoise = sampling.make_denoiser(
            self.transformer, conditioning(positive), negative_conditioning, common=common, cfg_scale=settings.cfg,
            guidance_rescale=settings.guidance_rescale, distilled_guidance=guidance, dtype=dtype)
        with torch.no_grad():
            return sampling.sample(settings.sampler, denoise, noise, sigmas, callback=step_callback)


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(1, 3, T, H, W) in [-1, 1] -> uint8 (T, H, W, 3), rounded (the official truncates; rounding is unbiased)."""
    frames = ((pixels[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).contiguous().numpy()
