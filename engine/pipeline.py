"""Engine: the public API that turns a prompt and images into a video, section by section.

One generation, as the official app does it:
  1. the settings are checked (framepack_engine.settings), the images read and fitted to a resolution bucket;
  2. every prompt work is done up front: each section's prompt (and the negative) through Llama + CLIP-L, the start
     (and end) image through SigLIP and the VAE; then the encoders can be released;
  3. framepack_engine.generation.runner.run_sections samples each section of the plan (framepack_engine.generation.sections) with the DiT, puts it into the
     latent history, decodes it and crossfades it into the video.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from framepack_engine.errors import FramePackError, Option
from framepack_engine.generation import sections
from framepack_engine.generation.preview import LATENT_RGB_FACTORS, latents_to_preview_rgb
from framepack_engine.generation.prompts import section_prompt_texts as parse_section_prompts  # noqa: F401 (its old home)
from framepack_engine.generation.one_frame import one_frame_section
from framepack_engine.generation.runner import RunnerHooks, SamplingOptions, SectionInputs, run_sections
from framepack_engine.generation.step_cache import StepCaches
from framepack_engine.loading import load_engine, place_models, transform_dit, transform_text_encoder
from framepack_engine.media.images import image_to_pixels, resize_and_center_crop
from framepack_engine.media.still import Still
from framepack_engine.media.video import Video
from framepack_engine.models.conditioning import PromptEmbedding
from framepack_engine.models.presets import build_preset_engine
from framepack_engine.models.vae import decode_tiling
from framepack_engine.reproduce import ENGINE_NAME, record_models, record_request
from framepack_engine.postprocess import POSTPROCESS_OPTIONS, load_postprocess, post_fps
from framepack_engine.resolve import Request, ResolvedModels, resolve_models, resolve_request
from framepack_engine.resolve import section_prompts as resolve_section_prompts
from framepack_engine.runtime.host_memory import release_freed_host_memory
from framepack_engine.runtime.lora import LoraSet
from framepack_engine.settings import GenerationSettings, ModelSettings


class GenerationCancelled(Exception):
    """Raised inside the step loop when the caller cancels; the engine keeps every finished section."""


@dataclass
class SectionResult:
    """A finished section, as `Engine.stream` yields it.

    `frames` are the pixel frames this section made final, in video order: appended after the earlier ones when
    `direction` is "forward" (F1), put before them when "backward" (the bidirectional loop makes the end first).
    `pending_frames` are decoded frames the next section will still crossfade into: a consumer that stops after this
    section shows them as they are (they are empty after the last section). `FrameCollector` joins them.
    """

    index: int
    count: int
    video_position: int
    frames: np.ndarray  # uint8 (T, H, W, 3)
    pending_frames: np.ndarray  # uint8 (T, H, W, 3)
    direction: str
    latents: torch.Tensor  # the real latents of the video so far (the DiT's latent space)
    stats: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)  # settings, mode, model: what the output file records
    checkpoint: "SectionCheckpoint | None" = None  # what `stream(resume=...)` needs to go on after this section


@dataclass
class SectionCheckpoint:
    """What a generation needs to go on after its first `sections_done` sections, e.g. after a restart.

    `Engine.stream(..., resume=checkpoint)` with the settings, inputs and model it was made with yields exactly the
    sections an uninterrupted run yields after it (same latents, same frames). The frames finished so far are not in
    it: whoever keeps the output keeps those. `tensors()` / `from_tensors()` turn it into a flat dict of tensors
    (a safetensors file) and back.
    """

    sections_done: int
    history: torch.Tensor  # the latent history after those sections
    generator_state: torch.Tensor  # the seeded CPU generator's state: the next section's noise is drawn from it
    pending_pixels: torch.Tensor | None  # float pixels the next section crossfades into (None without a decoder)

    def tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"sections_done": torch.tensor(self.sections_done), "history": self.history.detach().cpu(),
                   "generator_state": self.generator_state}
        if self.pending_pixels is not None:
            tensors["pending_pixels"] = self.pending_pixels.detach().cpu()
        return {name: tensor.contiguous() for name, tensor in tensors.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> "SectionCheckpoint":
        return cls(int(tensors["sections_done"]), tensors["history"], tensors["generator_state"],
                   tensors.get("pending_pixels"))


class FrameCollector:
    """Joins the frames that `Engine.stream` hands out into the whole video so far, in video order."""

    def __init__(self):
        self.chunks: list[np.ndarray] = []
        self.last: SectionResult | None = None

    def add(self, result: SectionResult) -> None:
        if result.direction == "forward":
            self.chunks.append(result.frames)
        else:
            self.chunks.insert(0, result.frames)
        self.last = result

    def frames(self) -> np.ndarray:
        if self.last is None:
            raise FramePackError("No section has finished yet, so there are no frames.")
        pending = self.last.pending_frames
        return np.concatenate(self.chunks + [pending] if self.last.direction == "forward" else [pending] + self.chunks)


NOTICES_SAID: set[str] = set()  # notices already printed by this process


def say_once(notice: str | None) -> None:
    """Print a notice about the model (the tiny preset's random weights) once per process, not at every call or
    Engine: repeated, it would drown what a script prints itself."""
    if notice and notice not in NOTICES_SAID:
        NOTICES_SAID.add(notice)
        print(notice)


class Engine:
    """A loaded FramePack model: DiT, VAE, text and image encoders, on one device."""

    # What outputs record of the models (framepack_engine.reproduce.record_models): set by from_resolved.
    recorded_models: dict | None = None

    def __init__(self, transformer, vae, text_encoder, image_encoder=None, variant: str = "bidirectional",
                 device="cpu", dtype=torch.bfloat16, name: str = "framepack", notice: str | None = None,
                 default_resolution: int = 640, release_encoders: bool = False, loras=None, placement=None):
        """transformer: FramePackDiT; vae: HunyuanVideoVAE; text_encoder: framepack_engine.models.conditioning.TextEncoder (or any
        object whose encode(prompt) gives a PromptEmbedding); image_encoder: framepack_engine.models.conditioning.ImageEncoder.
        release_encoders: drop the text and image encoders once a generation's prompts and images are encoded
        (frees their memory for the DiT; later generations can then only reuse prompts already encoded).
        loras: the framepack_engine.runtime.lora.LoraSet already attached to the transformer (the loader's), else an empty one.
        placement: an framepack_engine.runtime.planner.Placement (the memory plan applied to these models), or None when every model
        simply stays where it is."""
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
        self.release_encoders_after_use = release_encoders
        self.placement = placement
        # Said once per generation, e.g. that a preset's random weights make noise.
        self.notice = notice
        self.loras = loras if loras is not None else LoraSet(transformer)
        self.closed = False
        self.parallel = None  # a framepack_engine.runtime.distributed.ParallelLayout: several ranks, one video

    def set_parallel(self, layout) -> "Engine":
        """Generate as one rank of several (a framepack_engine.runtime.distributed.ParallelLayout, the same on
        every rank): every rank runs the same section loop on its share of each model call, rank 0 alone decodes,
        and its results carry the frames (the others' are empty). None: one process again."""
        self.parallel = layout
        if layout is None:
            self.transformer.set_sequence_parallel(None)
        return self

    def close(self) -> None:
        """Gives back what the engine holds outside its models: the memory plan's device slots, pinned host buffers
        and the block streamer's thread, with every model put back on the host as loaded; then the freed host and
        device memory. The engine generates no more after this (a notebook's way to free the GPU without ending
        the process). Safe to call twice; `with Engine.from_pretrained(...) as engine:` calls it on leaving."""
        if self.closed:
            return
        self.closed = True
        if self.placement is not None:
            self.placement.close()
            self.placement = None
        release_freed_host_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- construction ---------------------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, *, allow_download: bool | None = None, cache_dir=None, release_encoders: bool = False,
                        **options) -> "Engine":
        """Options (framepack_engine.settings.ModelSettings): transformer, base, image_encoder (each a Hugging Face repo id,
        looked up in the local cache first and downloaded when allowed, or a local folder in the repo's layout, or
        for the transformer a single .safetensors file), variant ("auto" reads "F1" in the transformer's name),
        device, dtype (a torch dtype or its name), attention, fused_kernels, vram_budget_gb (the memory planner's
        budget: what does not fit streams), memory_margin_gb, quantize (fp8, int8, int4), fp8_compute, offline."""
        if isinstance(options.get("dtype"), torch.dtype):
            options["dtype"] = str(options["dtype"]).removeprefix("torch.")
        if options.get("device") is not None:
            options["device"] = str(options["device"])
        for key in ("transformer", "base", "image_encoder"):
            if options.get(key) is not None:
                options[key] = str(options[key])
        return cls.from_resolved(resolve_models(ModelSettings.from_options(**options)), allow_download=allow_download,
                                 cache_dir=cache_dir, release_encoders=release_encoders)

    @classmethod
    def from_preset(cls, name: str = "tiny", variant: str = "bidirectional", device="cpu", seed: int = 0) -> "Engine":
        engine = build_preset_engine(cls, name, variant=variant, device=device, seed=seed)
        # Its outputs name the preset (and weights other than the command's, seed 0), so --settings-from builds it.
        engine.recorded_models = {"model_options": {"preset": name, "variant": variant},
                                  "model_sources": {"preset": name, **({"weights_seed": seed} if seed else {})}}
        return engine

    @classmethod
    def from_settings(cls, settings, preset: str | None = None, request: Request | None = None,
                      given=()) -> "Engine":
        """The engine the commands (`framepack generate`, `framepack serve`) build from their model options
        (framepack_engine.settings.ModelSettings; `given`: the names the user set) through the resolve step."""
        return cls.from_resolved(resolve_models(settings, preset, given), request)

    @classmethod
    def from_resolved(cls, models: ResolvedModels, request: Request | None = None, *,
                      allow_download: bool | None = None, cache_dir=None, release_encoders: bool = False) -> "Engine":
        """The engine of resolved model options: `models.preset` built in memory (its random float weights
        quantized, its LoRAs attached and, with vram_budget_gb, its models placed by a memory plan, as a
        checkpoint's would be), or else the pretrained model. The memory plan is made for `request`'s section (its
        bucket and window) when one is given, else for the model's default resolution."""
        if not models.preset:
            engine = load_engine(cls, models, request, allow_download=allow_download, cache_dir=cache_dir,
                                 release_encoders=release_encoders)
            engine.recorded_models = record_models(models, cache_dir)
            return engine
        settings = models.settings
        engine = cls.from_preset(models.preset, variant=models.variant, device=models.device)
        engine.release_encoders_after_use = release_encoders
        if settings.quantize or settings.lora:  # otherwise the preset is used as it is built
            engine.loras = transform_dit(engine.transformer, settings)
            transform_text_encoder(engine.text_encoder, settings)
        if settings.vram_budget_gb is not None:  # the preset's models placed by a plan, as a checkpoint's would be
            engine.placement = place_models(settings, models.device, engine.transformer, engine.text_encoder,
                                            engine.image_encoder, engine.vae, request=request,
                                            default_resolution=engine.default_resolution)
        if settings.attention != "auto" or settings.fused_kernels:  # otherwise the preset keeps what it is built with
            engine.transformer.set_attention_backend(settings.attention)
            engine.transformer.set_fused_kernels(settings.fused_kernels)
        if settings.compile:
            engine.transformer.set_compiled_blocks(True)
        engine.recorded_models = record_models(models)
        return engine

    # ---- LoRAs ------------------------------------------------------------------------------------------------------

    def load_lora(self, path, strength: float = 1.0, name: str | None = None, mode: str | None = None) -> str:
        """Attaches a LoRA (.safetensors in the kohya/musubi-tuner, diffusers/PEFT or ComfyUI layout, for FramePack
        or HunyuanVideo); several add up, each with its strength. mode: "fused" (merged into the weights, full
        speed) or "live" (a branch beside them); default: the model's lora_mode ("live" over quantized weights,
        which have no float weights to merge into). Returns its name (default: the file's stem), which unload_lora
        and set_lora_strength take."""
        return self.loras.load(path, strength, name, mode)

    def unload_lora(self, name: str) -> None:
        """Detaches a LoRA; with none left on a layer, its weights are the original ones bit for bit."""
        self.loras.unload(name)

    def set_lora_strength(self, name: str, strength: float) -> None:
        self.loras.set_strength(name, strength)

    # ---- encoders and the VAE -------------------------------------------------------------------------------------

    @property
    def memory_plan(self):
        """The MemoryPlan (framepack_engine.runtime.planner) the models were placed by (None for an engine built
        without one)."""
        return None if self.placement is None else self.placement.plan

    def _on_device(self, name: str):
        """`name`'s model on the device for the block, as the memory plan places it in turn."""
        return self.placement.use(name) if self.placement is not None else contextlib.nullcontext()

    def encode_prompt(self, prompt: str) -> PromptEmbedding:
        """The text encoder caches by text, so repeated section prompts are encoded once."""
        with self._on_device("text_encoder"):
            return self.text_encoder.encode(prompt)

    def encode_image_embedding(self, image: np.ndarray) -> torch.Tensor:
        """SigLIP's tokens of a uint8 (H, W, 3) image."""
        if self.image_encoder is None:
            raise FramePackError("This engine has no image encoder: load one with ", Option("image_encoder", ...), ".")
        with torch.no_grad(), self._on_device("image_encoder"):
            return self.image_encoder.encode(image)

    def encode_latent(self, image: np.ndarray) -> torch.Tensor:
        """The VAE latent of a uint8 (H, W, 3) image, scaled by the VAE's scaling factor, float32."""
        with torch.no_grad(), self._on_device("vae"):
            latent = self.vae.encode(image_to_pixels(image).to(self.vae_device, self.vae_dtype))
        return latent.float() * self.vae.scaling_factor

    def decode_latents(self, latents: torch.Tensor, vae_decode: str = "exact", map_tiles=None) -> torch.Tensor:
        """Scaled latents -> float32 pixels (1, 3, T, H, W) in about [-1, 1], on the host. vae_decode: "exact" (whole
        when memory allows) or "official" (the temporal tiles of the official app's VAE); map_tiles: who decodes
        those tiles (several ranks: framepack_engine.runtime.distributed.spread_tiles)."""
        with torch.no_grad(), self._on_device("vae"):
            return self.vae.decode((latents / self.vae.scaling_factor).to(self.vae_device, self.vae_dtype),
                                   tiling=decode_tiling(vae_decode), map_tiles=map_tiles).float().cpu()

    def release_encoders(self) -> None:
        """Drop the text and image encoders' models (cached prompt embeddings stay usable)."""
        if self.placement is not None:
            self.placement.drop("text_encoder")
            self.placement.drop("image_encoder")
        for encoder in (self.text_encoder, self.image_encoder):
            if encoder is not None and hasattr(encoder, "release"):
                encoder.release()
        release_freed_host_memory()  # host copies of their weights (converted dtypes) would stay in the C heap

    @property
    def vae_device(self):
        return next(self.vae.parameters()).device

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype

    # ---- generation -----------------------------------------------------------------------------------------------

    def settings(self, prompt: str = "", **options) -> GenerationSettings:
        """The checked settings of a generation (what `generate` runs), without running it."""
        return GenerationSettings.from_options(prompt=prompt, **options)

    def generate(self, prompt: str, image=None, end_image=None, **options) -> Video:
        """Generates the whole video; on cancellation returns the sections finished so far. Options: those of
        framepack_engine.settings.GenerationSettings, plus input_video, keyframes, callback and cancel as for
        `stream`."""
        collector, stats = FrameCollector(), {"sections": []}
        fps = None
        for result in self.stream(prompt, image=image, end_image=end_image, **options):
            collector.add(result)
            stats["sections"].append(result.stats)
            fps = result.metadata["fps"]
        if collector.last is None:
            raise GenerationCancelled("Generation was cancelled before the first section finished.")
        stats["cancelled"] = len(stats["sections"]) < collector.last.count
        stats["seconds"] = sum(s["seconds"] for s in stats["sections"])
        for key in ("cache_steps_computed", "cache_steps_skipped"):
            if key in stats["sections"][0]:
                stats[key] = sum(s[key] for s in stats["sections"])
        metadata = collector.last.metadata
        video = Video(frames=collector.frames(), fps=fps, stats=stats, metadata=metadata,
                      latents=collector.last.latents)
        post = self.postprocess(GenerationSettings.from_options(
            **{name: metadata[name] for name in POSTPROCESS_OPTIONS if name in metadata}))
        if post is None:
            return video
        return Video(post.apply(video.frames), post_fps(metadata), stats, {**metadata, **post.describe()},
                     video.latents)

    def postprocess(self, settings: GenerationSettings):
        """The interpolation and upscaling `settings` ask for (a framepack_engine.media.postprocess.PostProcess), or
        None; each model file is loaded once per engine, on its device, and kept for the next generation."""
        cache = self.__dict__.setdefault("_postprocess_models", {})
        key = (settings.rife_model if settings.interpolate > 1 else None, settings.upscale)
        if key not in cache:
            cache.clear()  # one set at a time: a batch of jobs with one interpolation loads it once
            cache[key] = load_postprocess(settings, self.device)
        post = cache[key]
        if post is None:
            return None
        return dataclasses.replace(post, interpolate=settings.interpolate, batch_bytes=self._postprocess_bytes(),
                                   tile_bytes=self._postprocess_bytes())

    def _postprocess_bytes(self) -> int:
        """The activations interpolation and upscaling may use: on a GPU what the memory plan leaves spare beside
        a section's peak (at least 256 MiB), elsewhere 1 GiB."""
        plan = self.memory_plan
        if plan is None or self.device.type != "cuda":
            return 1 << 30
        return max(1 << 28, plan.budget_bytes - plan.peak_bytes)

    def generate_image(self, prompt: str, image, control_images=None, control_masks=None, **options) -> Still:
        """One-frame inference (framepack_engine.generation.one_frame): one image from the start `image` and the
        prompt, made as one section of one latent frame at time index `target_index` (default latent_window_size).
        control_images (default: the start image) sit in its clean context, each at its `control_index` (e.g.
        [0, 10]; 0 for a single one) and masked by its control_masks entry or its own alpha; one_frame_options:
        some of no_2x, no_4x, no_post. Other options as for `generate`. Returns a Still (`.image`, `.save(path)`:
        any image format, the settings in a PNG's text chunk)."""
        results = list(self.stream(prompt, image=image, control_images=control_images, control_masks=control_masks,
                                   **{**options, "one_frame": True}))
        if not results:
            raise GenerationCancelled("Generation was cancelled before the image was finished.")
        result = results[0]
        frames = result.frames if len(result.frames) else result.pending_frames
        return Still(frames[-1], result.metadata, result.latents, result.stats)

    def metadata(self, settings: GenerationSettings, mode: str, request: Request | None = None) -> dict:
        """What an output file records: the engine, the model, the mode and every setting that is set, the model
        options with each model's identity, the attention backend, the LoRAs with their hashes and the inputs'
        (framepack_engine.reproduce): what `framepack generate --settings-from` reads back."""
        meta = {"engine": ENGINE_NAME, "model": self.name, "variant": self.variant, "mode": mode}
        meta.update({key: value for key, value in settings.as_dict().items() if value is not None})
        if len(self.loras):
            meta["loras"] = self.loras.describe()
        meta.update(self.recorded_models or {})
        meta["attention_backend"] = getattr(self.transformer, "attention_backend", None)
        if request is not None:
            meta.update(record_request(request))
        return meta

    def stream(self, prompt: str = "", image=None, end_image=None, *, input_video=None,
               callback: Callable[[dict], None] | None = None,
               cancel: threading.Event | Callable[[], bool] | None = None, step_caches: StepCaches | None = None,
               resume: SectionCheckpoint | None = None, request: Request | None = None, keyframes: dict | None = None,
               control_images=None, control_masks=None, **options) -> Iterator[SectionResult]:
        """Yields each finished section as soon as it is decoded (see SectionResult).

        callback(info) runs after every sampler step (info: section, sections, i, total_steps, x, denoised, sigma and
        a uint8 latent preview, and with a step cache the section's cache_steps_computed/skipped so far); cancel (an
        Event or a function) is checked at each step and stops at the next one. step_caches: a StepCaches
        (framepack_engine.generation.step_cache) used instead of the one the `cache` option asks for (calibration
        records so). resume: a finished section's `checkpoint`: the generation goes on after it (prompts and images
        are encoded again, which is cheap next to a section; the sections before it are not sampled again).
        request: a framepack_engine.resolve.Request already resolved (the commands and the server resolve before
        loading the model); then prompt, inputs and options are its own and must not be given again.
        keyframes: {SPEC: image} (bidirectional model): the sections a SPEC names (N, -N from the end, S-E, video
        order) start from that image (framepack_engine.generation.keyframes). control_images / control_masks: the
        one-frame run's control images and their masks (with one_frame=True; see generate_image).
        """
        if self.closed:
            raise FramePackError("This engine is closed: load the model again (Engine.from_pretrained) to generate.")
        if request is None:
            request = resolve_request(self.settings(prompt, **options), self.variant, image=image,
                                      end_image=end_image, input_video=input_video, keyframes=keyframes,
                                      control_images=control_images, control_masks=control_masks,
                                      default_resolution=self.default_resolution)
        elif (prompt or options or image is not None or end_image is not None or input_video is not None
              or keyframes or control_images or control_masks):
            raise FramePackError("Engine.stream takes either a resolved request or a prompt with options, not both: "
                                 "pass request=... alone.")
        settings = request.settings
        step_caches = step_caches or request.step_caches(model=self.name)
        mode = request.mode
        start_image, end, video_frames = request.start_image, request.end_image, request.input_video
        say_once(self.notice)

        bucket_height, bucket_width = request.size
        if start_image is None:
            # Text to video starts from a black frame, as the community apps do.
            start_image = np.zeros((bucket_height, bucket_width, 3), dtype=np.uint8)
        start_image = resize_and_center_crop(start_image, bucket_width, bucket_height)
        if end is not None:
            end = resize_and_center_crop(end, bucket_width, bucket_height)

        window = settings.latent_window_size
        if self.placement is not None:  # a larger section than planned for gets a new plan before any work
            self.placement.fit((bucket_height, bucket_width), window)
        count = request.section_count
        plan = sections.plan_sections(self.variant, count, window, settings.latent_paddings)
        generator = torch.Generator("cpu").manual_seed(settings.seed)
        inputs, prompts = self._encode_inputs(settings, plan, start_image, end, generator, request.prompts or None,
                                              _fit_keyframes(request.keyframes, bucket_width, bucket_height))
        if request.one_frame is not None:  # one section of one latent frame (framepack_engine.generation.one_frame)
            plan = [one_frame_section(request.one_frame.latents(self.encode_latent, request.size),
                                      request.one_frame.indices, window, settings.target_index,
                                      settings.one_frame_options or ())]
        history = sections.initial_history(self.variant, inputs.start_latent)
        initial_pixels = None
        if video_frames is not None:
            history, initial_pixels = self._extension_history(video_frames, bucket_width, bucket_height, history)
        if resume is not None:
            _check_resume(resume, count, history)
            plan, history, initial_pixels = plan[resume.sections_done:], resume.history, resume.pending_pixels
            generator.set_state(resume.generator_state)

        metadata = self.metadata(settings, mode, request)
        metadata.update(request.controls_metadata)
        latent_height, latent_width = inputs.start_latent.shape[-2:]
        hooks = _EngineHooks(count, callback, cancel, step_caches)
        decode = lambda latents: self.decode_latents(latents, settings.vae_decode)  # noqa: E731
        if self.parallel is not None:
            decode = self._arrange_ranks(settings, metadata, decode)
        runs = run_sections(self.transformer, plan, inputs, SamplingOptions.of(settings), generator, history,
                            device=self.device, dtype=self.dtype, decode=decode,
                            initial_pixels=initial_pixels, hooks=hooks, make_step_cache=step_caches,
                            parallel=self.parallel)
        while True:
            try:
                output = next(runs)
            except (StopIteration, GenerationCancelled):
                return
            section = output.section
            stats = {"section": section.index, "video_position": section.video_position, "steps": output.steps,
                     "seconds": time.perf_counter() - hooks.section_start,
                     "tokens": (section.latent_tokens(latent_height, latent_width) if request.one_frame is not None
                                else sections.tokens_per_section(latent_height, latent_width, window)),
                     "prompt": prompts[section.index]}
            if step_caches is not None:  # model calls that ran the blocks / were skipped, both branches counted
                stats.update(step_caches.finish_section(section.index, self.parallel))
            if output.frames is None:  # a rank that does not decode (parallel): no frames of its own
                output.frames = output.pending_frames = np.zeros((0, *request.size, 3), dtype=np.uint8)
            checkpoint = SectionCheckpoint(section.index + 1, output.history, generator.get_state(),
                                           output.pending_pixels)
            yield SectionResult(section.index, count, section.video_position, output.frames, output.pending_frames,
                                "forward" if self.variant == "f1" else "backward", output.latents, stats, metadata,
                                checkpoint)

    def _arrange_ranks(self, settings: GenerationSettings, metadata: dict, decode):
        """Several ranks: CFG parallel when the guidance and the rank count allow it, the sequence split over this
        rank's group, the layout in the metadata; returns the decoder: the official decode's temporal tiles shared
        by every rank (each decodes 1/N of them), else rank 0's alone (an exact decode is one piece; tiles would
        change it), None on the others."""
        from framepack_engine.runtime.distributed import spread_tiles
        from framepack_engine.runtime.ulysses import SequenceParallel

        layout = self.parallel.arrange(settings.cfg)
        self.transformer.set_sequence_parallel(SequenceParallel(layout.ulysses))
        metadata["parallel"] = layout.describe()
        if settings.vae_decode == "official":
            metadata["parallel"]["vae_tiles"] = "shared"
            return lambda latents: self.decode_latents(latents, "official", spread_tiles(layout.world))
        return decode if layout.is_writer else None

    def _encode_inputs(self, settings: GenerationSettings, plan, start_image, end_image, generator,
                       section_prompts: list[str] | None = None, keyframes: dict | None = None
                       ) -> tuple[SectionInputs, list[str]]:
        """Every prompt and image through its encoder, before the first section (then the encoders may go).
        section_prompts: each section's prompt in video order (the request's; else from the settings); keyframes:
        {video position: image fitted to the bucket}, each image encoded once. Returns the encoders' outputs and each
        section's prompt text in generation order."""
        if section_prompts is None:
            section_prompts = resolve_section_prompts(settings, len(plan))
        prompts = [section_prompts[section.video_position] for section in plan]
        with self._on_device("text_encoder"):  # placed once for every prompt, then off the device again
            embeddings = [self.encode_prompt(text) for text in prompts]
            # With cfg 1 the official's negative pass is skipped (its zeros are never used).
            negative = self.encode_prompt(settings.negative_prompt) if settings.cfg != 1 else None

        start_latent = self.encode_latent(start_image)
        if settings.init_strength < 1:
            noise = torch.randn(start_latent.shape, generator=generator).to(start_latent)
            start_latent = settings.init_strength * start_latent + (1 - settings.init_strength) * noise
        end_latent = self.encode_latent(end_image) if end_image is not None else None

        image_embedding = None
        if self.transformer.takes_image_embeddings:
            image_embedding = self.encode_image_embedding(start_image).float()
            if end_image is not None:
                total = settings.init_strength + settings.end_strength
                end_embedding = self.encode_image_embedding(end_image).float()
                image_embedding = ((settings.init_strength * image_embedding + settings.end_strength * end_embedding)
                                   / max(total, 1e-6))
            image_embedding = image_embedding * settings.vision_strength
        keyframe_latents, keyframe_embeddings, encoded = {}, {}, {}
        for position, image in (keyframes or {}).items():
            if id(image) not in encoded:  # a SPEC naming several sections shares one image, encoded once
                embedding = (self.encode_image_embedding(image).float() * settings.vision_strength
                             if self.transformer.takes_image_embeddings else None)
                encoded[id(image)] = self.encode_latent(image), embedding
            keyframe_latents[position], embedding = encoded[id(image)]
            if embedding is not None:
                keyframe_embeddings[position] = embedding
        if self.release_encoders_after_use:
            self.release_encoders()
        return SectionInputs(embeddings, negative, image_embedding, start_latent, end_latent, settings.end_strength,
                             keyframe_latents, keyframe_embeddings), prompts

    def _extension_history(self, frames, width, height, history):
        """For video extension: the input video's latents become the F1 history, its frames the video so far."""
        resized = np.stack([resize_and_center_crop(frame, width, height) for frame in frames])
        # The causal VAE takes 1 + 4k frames: drop the few at the end that do not fill a latent frame.
        usable = 1 + (len(resized) - 1) // 4 * 4
        resized = resized[:usable]
        pixels = (torch.from_numpy(resized).float() / 127.5 - 1).permute(3, 0, 1, 2)[None]
        with torch.no_grad(), self._on_device("vae"):
            latents = self.vae.encode(pixels.to(self.vae_device, self.vae_dtype)).float() * self.vae.scaling_factor
        history = torch.cat([history[:, :, :sections.HISTORY_CONTEXT_FRAMES], latents.to(history)], dim=2)
        return history, pixels.float().cpu()


def _fit_keyframes(keyframes: dict[int, np.ndarray], width: int, height: int) -> dict[int, np.ndarray]:
    """The keyframes fitted to the bucket; sections that share an image share its fitted copy."""
    fitted = {}
    for image in keyframes.values():
        if id(image) not in fitted:
            fitted[id(image)] = resize_and_center_crop(image, width, height)
    return {position: fitted[id(image)] for position, image in keyframes.items()}


def _check_resume(resume: SectionCheckpoint, count: int, history: torch.Tensor) -> None:
    """A checkpoint fits a generation when it stops inside its plan and its history has the plan's latent size."""
    if not 0 < resume.sections_done < count:
        raise FramePackError(f"The checkpoint after {resume.sections_done} sections does not fit this generation of "
                             f"{count} sections: resume with the settings the checkpoint was made with.")
    if resume.history.shape[:2] != history.shape[:2] or resume.history.shape[-2:] != history.shape[-2:]:
        raise FramePackError(f"The checkpoint's latents {tuple(resume.history.shape)} do not fit this generation's "
                             f"{tuple(history.shape)}: resume with the inputs and settings it was made with.")


class _EngineHooks(RunnerHooks):
    """Progress callback with a latent preview, cancellation at each step, and the section clock."""

    def __init__(self, count: int, callback, cancel, step_caches: StepCaches | None = None):
        self.count, self.callback, self.cancel, self.step_caches = count, callback, cancel, step_caches
        self.section_start = time.perf_counter()

    def section_started(self, section, context):
        self.section_start = time.perf_counter()

    def step_finished(self, section, info):
        if _is_cancelled(self.cancel):
            raise GenerationCancelled()
        if self.callback is not None:
            extra = {"section": section.index, "sections": self.count}
            if self.step_caches is not None:
                extra.update(self.step_caches.counts(section.index))
            denoised = info.get("denoised")
            if denoised is not None and denoised.shape[1] == len(LATENT_RGB_FACTORS):
                # The cheap linear latent -> RGB projection of the current x0 estimate.
                extra["preview"] = latents_to_preview_rgb(denoised)
            self.callback({**info, **extra})


def _is_cancelled(cancel) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())
