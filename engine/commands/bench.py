"""`framepack bench`: time the DiT's section loop with random weights at real shapes, on any device.

Random weights at the real shapes time exactly like the real model, so a benchmark needs no download. The model is
built on the meta device and allocated straight on the target device (never 13B on the host), then filled with
scaled random values there. Each section runs as the engine runs it: the section plan's clean-latent context,
flux-shifted sigmas, UniPC through make_denoiser with the distilled guidance. Only the DiT is timed: the VAE and the
text and image encoders are outside the loop (their outputs are random tensors of the real shapes).

What is reported, per run (one setting variant x one plan length):
- tokens per section, counted from the inputs each section actually builds (equal for every section: O(1) work);
- analytic FLOPs per step (framepack_engine.models.flops), linear and attention apart;
- seconds per step, per section and per output frame, after warm-up steps that are not recorded;
- achieved TFLOP/s and MFU against a matmul peak measured on the same device in the same run;
- peak device memory, host peak RSS and peak anonymous RSS, the memory plan and the bytes streamed per step when the
  DiT streams (`--vram-budget-gb`; 0: weights stay resident);
- with `--cache teacache|magcache`, the model calls that ran the blocks and those the step cache skipped (MagCache
  is first calibrated, untimed, on the same random weights and inputs: mechanics, not a real model's ratios);
- the weights' bytes as stored (`--quantize fp8|int8|int4` quantizes the blocks' linears, framepack_engine.runtime.quant), and with
  --compare each variant's output error against the first variant's on the same inputs.
On CUDA every interval is measured with CUDA events and read after a synchronize; on the CPU with perf_counter.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from framepack_engine.runtime.devices import default_device
from framepack_engine.official import (DISTILLED_GUIDANCE, PROMPT_TOKEN_LIMIT, SIGLIP_IMAGE_TOKENS, VAE_SPATIAL_COMPRESSION,
                                       VAE_TEMPORAL_COMPRESSION)
from framepack_engine.models import flops as flop_counter
from framepack_engine.runtime.attention import BACKEND_NAMES
from framepack_engine.models.buckets import find_nearest_bucket
from framepack_engine.models.conditioning import PromptEmbedding
from framepack_engine.models.dit import FramePackDiT
from framepack_engine.errors import FramePackError
from framepack_engine.runtime.host_memory import proc_bytes
from framepack_engine.models.presets import DIT_PRESETS, randomize_weights_
from framepack_engine.runtime.quant import FORMATS as QUANTIZE_FORMATS
from framepack_engine.runtime.quant import QuantScheme, parameter_count, quantize_dit
from framepack_engine.generation.runner import RunnerHooks, SamplingOptions, SectionInputs, run_sections
from framepack_engine.generation.sections import (VARIANTS, initial_history,
                             plan_sections)
from framepack_engine.settings import DTYPE_NAMES, STEP_CACHES, check_device
from framepack_engine.generation.step_cache import DEFAULT_THRESHOLDS, StepCaches
from framepack_kernels.reference import relative_error

SCHEMA = "framepack-bench/1"


# --------------------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchSettings:
    """One benchmark configuration; `--compare key=a,b` varies one of these fields."""

    preset: str = "full"
    device: str = "auto"  # "auto": cuda when available, else cpu
    dtype: str = "auto"  # "auto": bfloat16 on cuda, float32 on cpu
    resolution: int = 640
    latent_window_size: int = 9
    steps: int = 25
    sections: tuple[int, ...] = (1,)  # plan lengths to run, each a whole plan
    warmup: int = 2
    attention: str = "auto"
    seed: int = 0
    variant: str = "bidirectional"
    prompt_tokens: int = 77  # a typical prompt's tokens: the DiT receives the valid ones only (no padding)
    matmul_size: int | None = None  # side of the square peak matmul; None: 8192 on cuda, 1024 on cpu
    threads: int | None = None  # CPU intra-op threads; None: torch's default
    cache: str = "none"  # step cache: none, teacache or magcache
    cache_threshold: float | None = None  # None: the cache's default (teacache 0.15, magcache 0.1)
    quantize: str = "none"  # "none" or an framepack_engine.runtime.quant format: the blocks' linears quantized after the random fill
    vram_budget_gb: float | None = None  # None: every weight on the device; else the memory planner's plan
    compile: str = "off"  # "on": regional torch.compile of the blocks (compiled during the warm-up)

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device(default_device())
        return check_device(self.device)

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, DTYPE_NAMES[self.dtype])

    def validate(self) -> "BenchSettings":
        if self.preset not in DIT_PRESETS:
            raise FramePackError(f"Unknown preset {self.preset!r}: choose one of {', '.join(DIT_PRESETS)}.")
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise FramePackError(f"Unknown dtype {self.dtype!r}: choose bfloat16, float16 or float32.")
        if self.attention not in BACKEND_NAMES:
            raise FramePackError(f"Unknown attention backend {self.attention!r}: choose one of "
                                 f"{', '.join(BACKEND_NAMES)}.")
        if self.variant not in VARIANTS:
            raise FramePackError(f"Unknown variant {self.variant!r}: choose bidirectional or f1.")
        for name, minimum in (("steps", 1), ("warmup", 0), ("latent_window_size", 1), ("prompt_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise FramePackError(f"{name} must be an integer of at least {minimum}, got {value!r}.")
        if self.prompt_tokens > PROMPT_TOKEN_LIMIT:
            raise FramePackError(f"prompt_tokens must be at most {PROMPT_TOKEN_LIMIT}, got {self.prompt_tokens}.")
        if not self.sections or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in self.sections):
            raise FramePackError(f"sections must be positive integers, got {self.sections!r}; e.g. --sections 1,4,16.")
        if self.matmul_size is not None and self.matmul_size < 16:
            raise FramePackError(f"matmul_size must be at least 16, got {self.matmul_size}.")
        if self.quantize != "none" and self.quantize not in QUANTIZE_FORMATS:
            raise FramePackError(f"Unknown quantize {self.quantize!r}: choose none, {', '.join(QUANTIZE_FORMATS)}.")
        if self.threads is not None and self.threads < 1:
            raise FramePackError(f"threads must be at least 1, got {self.threads}.")
        if self.cache not in ("none", *STEP_CACHES):
            raise FramePackError(f"Unknown cache {self.cache!r}: choose none, {', '.join(STEP_CACHES)}.")
        if self.cache_threshold is not None and not 0 <= self.cache_threshold < math.inf:
            raise FramePackError(f"cache_threshold must be a finite number of at least 0, got {self.cache_threshold!r}.")
        if self.compile not in ("off", "on"):
            raise FramePackError(f"compile is off or on, got {self.compile!r}.")
        if self.vram_budget_gb is not None and not self.vram_budget_gb > 0:
            raise FramePackError(f"vram_budget_gb must be a positive number of GB, got {self.vram_budget_gb}.")
        find_nearest_bucket(self.resolution, self.resolution, self.resolution)  # raises for a bad resolution
        return self


def optional_number(text: str) -> float | None:
    """A number, or "none" (every weight resident)."""
    return None if text.strip().lower() == "none" else float(text)


# The fields --compare may vary, with how each value is read from the command line.
COMPARABLE = {"preset": str, "device": str, "dtype": str, "resolution": int, "latent_window_size": int, "steps": int,
              "warmup": int, "attention": str, "seed": int, "variant": str, "prompt_tokens": int,
              "threads": int, "cache": str, "cache_threshold": float, "quantize": str,
              "vram_budget_gb": optional_number, "compile": str}


def parse_compare(text: str | None) -> tuple[str, list] | None:
    """"attention=sdpa,triton" -> ("attention", ["sdpa", "triton"]); keys may use dashes."""
    if not text:
        return None
    key, separator, values = text.partition("=")
    key = key.strip().replace("-", "_")
    if not separator or key not in COMPARABLE:
        raise FramePackError(f"--compare takes KEY=V1,V2 with KEY one of {', '.join(COMPARABLE)}; got {text!r}.")
    items = [value.strip() for value in values.split(",") if value.strip()]
    if not items:
        raise FramePackError(f"--compare {text!r} lists no values: write e.g. attention=sdpa,triton.")
    try:
        return key, [COMPARABLE[key](value) for value in items]
    except ValueError:
        raise FramePackError(f"--compare {key} takes {COMPARABLE[key].__name__} values, got {values!r}.") from None


def parse_sections(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in str(text).split(",") if part.strip())
    except ValueError:
        raise FramePackError(f"--sections takes plan lengths like 1 or 1,4,16, got {text!r}.") from None


# --------------------------------------------------------------------------------------------------------------------
# Model and inputs
# --------------------------------------------------------------------------------------------------------------------


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory a new allocation can use on `device`: free CUDA memory, or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        return proc_bytes("/proc/meminfo", "MemAvailable")
    return None


def preset_weight_bytes(preset: str, dtype: torch.dtype) -> int:
    """The weight bytes of a preset's DiT in `dtype`, counted on the meta device (nothing allocated)."""
    return weight_bytes(FramePackDiT.from_config(DIT_PRESETS[preset], device="meta", dtype=dtype))


def check_fits(preset: str, needed_bytes: int, available_bytes: int | None, device: torch.device, dtype) -> None:
    """Refuse before allocating: a 13B model that cannot fit would swap or die half-built. The refusal names the
    flags that do fit here (a smaller preset, bfloat16), with their sizes."""
    if available_bytes is None or needed_bytes <= available_bytes:
        return
    fixes = []
    if preset in DIT_PRESETS and dtype == torch.float32:
        half = preset_weight_bytes(preset, torch.bfloat16)
        if half <= available_bytes:
            fixes.append(f"--dtype bfloat16 ({half / 2**30:.1f} GiB)")
    smaller = sorted(((preset_weight_bytes(name, dtype), name) for name in DIT_PRESETS), reverse=True)
    fixes += [f"--preset {name} ({size / 2**30:.1f} GiB)" for size, name in smaller
              if size < needed_bytes and size <= available_bytes][:2]
    default = " (the default)" if preset == BenchSettings.preset else ""
    raise FramePackError(
        f"Preset {preset!r}{default} needs {needed_bytes / 2**30:.1f} GiB for its {_dtype_name(dtype)} weights but "
        f"{device} has {available_bytes / 2**30:.1f} GiB free: run with {' or '.join(fixes) or 'a smaller --preset'}, "
        "or on a device with more memory.")


def random_dit(config: dict, device: torch.device, dtype: torch.dtype, seed: int = 0,
               check_memory: bool = True, preset: str = "custom", quantize: str = "none") -> FramePackDiT:
    """A FramePackDiT of random weights allocated directly on `device` in `dtype`.

    Built on the meta device (no memory, no init), then allocated empty on the device and filled in place there.
    Filled by framepack_engine.models.presets.randomize_weights_ (float32 draws from one seeded generator, cast on the device), so the
    same seed gives the same weights (up to rounding) in every dtype. With `quantize` (an framepack_engine.runtime.quant format) the
    blocks' linears are then quantized, one layer at a time: every format starts from the same float weights.
    """
    model = FramePackDiT.from_config(config, device="meta", dtype=dtype)
    if check_memory:
        check_fits(preset, weight_bytes(model), free_memory_bytes(device), device, dtype)
    model = model.to_empty(device=device)
    randomize_weights_(model, torch.Generator(device=device).manual_seed(seed), scale=0.5)
    if quantize != "none":
        quantize_dit(model, QuantScheme(quantize))
    return model.eval()


@dataclass
class BenchInputs:
    """What the encoders would hand the section loop, as random tensors of the real shapes."""

    height: int
    width: int
    section_inputs: SectionInputs  # the prompt (its valid tokens only, as the engine hands it over), SigLIP, start

    @property
    def text_tokens(self) -> int:
        return self.section_inputs.prompts[0].tokens

    @property
    def image_tokens(self) -> int:
        embeddings = self.section_inputs.image_embeddings
        return 0 if embeddings is None else embeddings.shape[1]

    @property
    def latent_height(self) -> int:
        return self.height // VAE_SPATIAL_COMPRESSION

    @property
    def latent_width(self) -> int:
        return self.width // VAE_SPATIAL_COMPRESSION

    def for_plan(self, plan_length: int) -> SectionInputs:
        """The same prompt for every section of a plan."""
        return dataclasses.replace(self.section_inputs, prompts=self.section_inputs.prompts[:1] * plan_length)


def random_inputs(model: FramePackDiT, settings: BenchSettings, device: torch.device, dtype: torch.dtype
                  ) -> BenchInputs:
    """Inputs drawn on the CPU from the seed, then moved: the same on every device and for every variant."""
    config = model.config
    generator = torch.Generator().manual_seed(settings.seed + 1)
    height, width = find_nearest_bucket(settings.resolution, settings.resolution, settings.resolution)
    latent_height, latent_width = height // VAE_SPATIAL_COMPRESSION, width // VAE_SPATIAL_COMPRESSION
    start_latent = torch.randn(1, config.in_channels, 1, latent_height, latent_width, generator=generator)
    text = torch.randn(1, settings.prompt_tokens, config.text_embed_dim, generator=generator)
    pooled = torch.randn(1, config.pooled_projection_dim, generator=generator)
    image_embeddings = None
    if config.has_image_proj:
        image_embeddings = torch.randn(1, SIGLIP_IMAGE_TOKENS, config.image_proj_dim, generator=generator).to(device, dtype)
    prompt = PromptEmbedding(text.to(device, dtype), pooled.to(device, dtype))
    return BenchInputs(height, width, SectionInputs([prompt], None, image_embeddings, start_latent.to(device)))


# --------------------------------------------------------------------------------------------------------------------
# Clocks and measurements
# --------------------------------------------------------------------------------------------------------------------


class Clock:
    """Timestamps on the device's timeline: CUDA events on a GPU (no sync while running), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return event
        return time.perf_counter()

    def seconds(self, start, end) -> float:
        """Call after synchronize() for CUDA marks."""
        return start.elapsed_time(end) / 1000.0 if self.cuda else end - start


def summary(values: list[float]) -> dict:
    """mean, std (sample; 0 for one value), min, median, max and count."""
    if not values:
        return {"mean": None, "std": None, "min": None, "median": None, "max": None, "count": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "median": statistics.median(values), "max": max(values), "count": len(values)}


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None) -> dict:
    """The best TFLOP/s of a square matmul: in `dtype` (half types) or float32 on a GPU, float32 on the CPU.

    The denominator of MFU, measured on this device in this run rather than read off a datasheet.
    """
    matmul_dtype = dtype if device.type == "cuda" else torch.float32
    size = size or (8192 if device.type == "cuda" else 1024)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, generator=generator, device=device, dtype=torch.float32).to(matmul_dtype)
    b = torch.randn(size, size, generator=generator, device=device, dtype=torch.float32).to(matmul_dtype)
    clock = Clock(device)
    repeats = 10 if device.type == "cuda" else 3
    for _ in range(3 if device.type == "cuda" else 1):
        torch.matmul(a, b)
    best = math.inf
    for _ in range(3):
        clock.synchronize()
        start = clock.mark()
        for _ in range(repeats):
            torch.matmul(a, b)
        end = clock.mark()
        clock.synchronize()
        best = min(best, clock.seconds(start, end) / repeats)
    del a, b
    flop = 2 * size ** 3
    return {"dtype": _dtype_name(matmul_dtype), "size": size, "seconds": best, "tflops": flop / best / 1e12}


def host_memory() -> dict:
    """The process's peak RSS (VmHWM, since it started) and current anonymous RSS (RssAnon), in bytes."""
    return {"host_peak_rss_bytes": proc_bytes("/proc/self/status", "VmHWM"),
            "host_rss_anon_bytes": proc_bytes("/proc/self/status", "RssAnon")}


# --------------------------------------------------------------------------------------------------------------------
# The timed loop
# --------------------------------------------------------------------------------------------------------------------


def _sampling(settings: BenchSettings, steps: int) -> SamplingOptions:
    return SamplingOptions(steps=steps, sampler="unipc", latent_window_size=settings.latent_window_size,
                           distilled_guidance=DISTILLED_GUIDANCE)


def warm_up(model, settings: BenchSettings, inputs: BenchInputs, device, dtype) -> None:
    """`settings.warmup` untimed steps on a first section's inputs (kernel selection, autotuning, allocator)."""
    if settings.warmup == 0:
        return
    plan = plan_sections(settings.variant, 1, settings.latent_window_size)
    history = initial_history(settings.variant, inputs.section_inputs.start_latent)
    for _ in run_sections(model, plan, inputs.for_plan(1), _sampling(settings, settings.warmup),
                          torch.Generator().manual_seed(settings.seed + 2), history, device=device, dtype=dtype):
        pass
    Clock(device).synchronize()


class SectionClock(RunnerHooks):
    """The benchmark's timing as hooks on the engine's own section loop: a mark at each section's start and end
    and before each sampler step, and the token count of the inputs each section actually builds."""

    def __init__(self, clock: Clock, config, inputs: BenchInputs, noise_shape):
        self.clock, self.config, self.inputs, self.noise_shape = clock, config, inputs, noise_shape
        self.records = []

    def section_started(self, section, context):
        self.clock.synchronize()
        self.step_marks, self.section_start = [], self.clock.mark()
        self.sequence = flop_counter.packed_sequence_of_inputs(self.config, self.noise_shape, context,
                                                               self.inputs.text_tokens, self.inputs.image_tokens)

    def step_started(self, section, step):
        # A step runs from one model call to the next: the call plus the sampler's update after it.
        self.step_marks.append(self.clock.mark())

    def section_finished(self, section, generated):
        section_end = self.clock.mark()
        self.clock.synchronize()
        boundaries = self.step_marks + [section_end]
        self.records.append({
            "index": section.index, "padding": section.padding, "video_position": section.video_position,
            "tokens": self.sequence.total_tokens, "latent_tokens": self.sequence.latent_tokens,
            "condition_tokens": self.sequence.condition_tokens,
            "seconds": self.clock.seconds(self.section_start, section_end),
            "step_seconds": [self.clock.seconds(a, b) for a, b in zip(boundaries, boundaries[1:])],
        })


def run_plan(model, settings: BenchSettings, inputs: BenchInputs, plan_length: int, device, dtype,
             step_caches: StepCaches | None = None) -> tuple[list[dict], torch.Tensor]:
    """Every section of a plan of `plan_length` sections through framepack_engine.generation.runner.run_sections, timed by its hooks.
    Returns one record per section (with the step cache's counts) and the last section's generated latents."""
    plan = plan_sections(settings.variant, plan_length, settings.latent_window_size)
    noise_shape = (1, model.latent_channels, settings.latent_window_size, inputs.latent_height, inputs.latent_width)
    clock = SectionClock(Clock(device), model.config, inputs, noise_shape)
    history = initial_history(settings.variant, inputs.section_inputs.start_latent)
    generator = torch.Generator().manual_seed(settings.seed)  # every plan draws the same noise
    generated = None
    for output in run_sections(model, plan, inputs.for_plan(plan_length), _sampling(settings, settings.steps),
                               generator, history, device=device, dtype=dtype, hooks=clock,
                               make_step_cache=step_caches):
        generated = output.generated
        counts = (step_caches.finish_section(output.section.index) if step_caches is not None
                  else {"cache_steps_computed": output.steps, "cache_steps_skipped": 0})
        clock.records[-1].update(counts)
    return clock.records, generated


def bench_step_caches(model, settings: BenchSettings, inputs: BenchInputs, device, dtype) -> StepCaches | None:
    """The step caches a variant asks for. MagCache is first calibrated here, untimed, on one section of these
    random weights and inputs (the mechanics and their cost, not a real model's ratios)."""
    if settings.cache == "none":
        return None
    threshold = DEFAULT_THRESHOLDS[settings.cache] if settings.cache_threshold is None else settings.cache_threshold
    if settings.cache == "teacache":
        return StepCaches.teacache(settings.steps, threshold)
    from framepack_engine.generation.calibration import CalibrationRecorder

    recorder = CalibrationRecorder(settings.steps)
    plan = plan_sections(settings.variant, 1, settings.latent_window_size)
    history = initial_history(settings.variant, inputs.section_inputs.start_latent)
    for output in run_sections(model, plan, inputs.for_plan(1), _sampling(settings, settings.steps),
                               torch.Generator().manual_seed(settings.seed), history, device=device, dtype=dtype,
                               make_step_cache=recorder):
        recorder.finish_section(output.section.index)
    calibration = recorder.calibration(model=f"preset:{settings.preset}", random_weights=True,
                                       note="recorded by framepack bench on its random weights")
    return StepCaches.magcache(settings.steps, calibration, threshold)


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float | None:
    if actual is None or expected is None or actual.shape != expected.shape:
        return None
    return relative_error(actual.cpu(), expected.cpu())


def bench_memory_plan(model, settings: BenchSettings, device: torch.device):
    """The memory planner's plan for the DiT alone under `settings.vram_budget_gb` (None: every block resident) at
    the benchmark's section size; `model` may be on the meta device."""
    from framepack_engine.models.footprints import engine_footprint
    from framepack_engine.runtime.host_memory import host_available_bytes
    from framepack_engine.runtime.planner import plan_memory

    budget = 2**62 if settings.vram_budget_gb is None else int(settings.vram_budget_gb * 2**30)
    return plan_memory(engine_footprint(model), budget, device=device.type,
                       host_ram_bytes=host_available_bytes(), resolution=settings.resolution,
                       latent_window_size=settings.latent_window_size, text_tokens=settings.prompt_tokens)


def place_for_bench(model, settings: BenchSettings, device: torch.device):
    """The DiT placed as `bench_memory_plan` says: an framepack_engine.runtime.planner.DiTPlacement (close it to put the weights back
    on the host)."""
    from framepack_engine.runtime.placement import DiTPlacement

    return DiTPlacement(model, bench_memory_plan(model, settings, device), device)


def run_variant(model, settings: BenchSettings, device, dtype, peak: dict, placement=None
                ) -> tuple[list[dict], torch.Tensor]:
    """Warm-up, then each plan length of `settings.sections`; one run record per plan length. placement: the
    framepack_engine.runtime.planner.DiTPlacement the model runs under (its streamer's bytes are recorded), or None (all resident)."""
    from framepack_engine.runtime.host_memory import AnonymousMemoryPeak

    streamer = placement.streamer if placement is not None else None
    model.set_attention_backend(settings.attention)
    model.set_compiled_blocks(settings.compile == "on")  # compiled by the warm-up's first block calls
    inputs = random_inputs(model, settings, device, dtype)
    sequence = flop_counter.section_packed_sequence(model.config, settings.latent_window_size, inputs.latent_height,
                                                    inputs.latent_width, inputs.text_tokens, inputs.image_tokens)
    step = flop_counter.step_flops(model.config, sequence)
    frames_per_section = VAE_TEMPORAL_COMPRESSION * settings.latent_window_size
    parameters = parameter_count(model)

    runs, first_output = [], None
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        warm_up(model, settings, inputs, device, dtype)
        step_caches = bench_step_caches(model, settings, inputs, device, dtype)
        for plan_length in settings.sections:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            if streamer is not None:
                streamer.reset_stats()
            with AnonymousMemoryPeak() as host_peak:
                records, output = run_plan(model, settings, inputs, plan_length, device, dtype, step_caches)
            first_output = output if first_output is None else first_output
            step_seconds = [seconds for record in records for seconds in record["step_seconds"]]
            streamed = streamer.stats.bytes_streamed if streamer is not None else 0
            section_seconds = [record["seconds"] for record in records]
            step_summary, section_summary = summary(step_seconds), summary(section_seconds)
            computed = sum(record["cache_steps_computed"] for record in records)
            skipped = sum(record["cache_steps_skipped"] for record in records)
            # Only the steps that ran the blocks did the step's FLOPs (a skipped step runs embed and head only).
            achieved = step.total * computed / (computed + skipped) / step_summary["mean"] / 1e12
            runs.append({
                "settings": {**dataclasses.asdict(settings), "sections": list(settings.sections),
                             "device": str(device), "dtype": _dtype_name(dtype),
                             "attention": model.attention_backend},
                "plan_sections": plan_length,
                "height": inputs.height, "width": inputs.width,
                "latent_height": inputs.latent_height, "latent_width": inputs.latent_width,
                "torch_threads": torch.get_num_threads(),
                "model": {"preset": settings.preset, "parameters": parameters, "weight_bytes": weight_bytes(model)},
                "tokens": sequence.as_dict(),
                "tokens_per_section": [record["tokens"] for record in records],
                "flops_per_step": step.as_dict(),
                "flops_per_section": step.total * settings.steps,
                "flops_per_output_frame": step.total * settings.steps / frames_per_section,
                "pixel_frames_per_section": frames_per_section,
                "warmup_steps": settings.warmup,
                "seconds_per_step": step_summary,
                "seconds_per_section": section_summary,
                "seconds_per_output_frame": {key: (value / frames_per_section if key != "count" and value is not None
                                                   else value) for key, value in section_summary.items()},
                "achieved_tflops": achieved,
                "mfu": achieved / peak["tflops"],
                "matmul_peak_tflops": peak["tflops"],
                "memory": {
                    "device_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                    "device_reserved_peak_bytes": (torch.cuda.max_memory_reserved(device)
                                                   if device.type == "cuda" else None),
                    **host_memory(),
                    "host_rss_anon_peak_bytes": host_peak.peak_bytes,
                },
                # Weight bytes copied onto the device per step, as the streamer counted them (0: all resident).
                "bytes_streamed_per_step": streamed // max(len(step_seconds), 1),
                "memory_plan": placement.plan.as_dict() if placement is not None else None,
                "stream_stats": dataclasses.asdict(streamer.stats) if streamer is not None else None,
                "cache_steps_computed": computed,  # model calls that ran the blocks, over the plan
                "cache_steps_skipped": skipped,  # model calls the step cache answered without running a block
                "output_finite": bool(torch.isfinite(output).all()),
                "sections": records,
            })
    return runs, first_output


# --------------------------------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------------------------------


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _package_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> tuple[dict, dict]:
    """(device description, versions)."""
    from framepack_engine import __version__

    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        described = {"type": "cuda", "name": properties.name, "index": device.index or torch.cuda.current_device(),
                     "total_memory_bytes": properties.total_memory, "compute_capability": f"{properties.major}.{properties.minor}",
                     "multiprocessors": properties.multi_processor_count}
    else:
        described = {"type": device.type, "name": _cpu_name(), "logical_cores": os.cpu_count(),
                     "torch_threads": torch.get_num_threads()}
    versions = {"engine": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
                "triton": _package_version("triton"), "platform": platform.platform()}
    return described, versions


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def variants_of(settings: BenchSettings, compare: tuple[str, list] | None) -> list[tuple[str, BenchSettings]]:
    if compare is None:
        return [("base", settings)]
    key, values = compare
    return [(f"{key}={value}", dataclasses.replace(settings, **{key: value}).validate()) for value in values]


def run_benchmark(settings: BenchSettings, compare: tuple[str, list] | None = None, log=None) -> dict:
    """Every variant (one per --compare value) at every plan length; returns the JSON-ready results."""
    settings.validate()
    variants = variants_of(settings, compare)
    log = log or (lambda message: None)
    results = {"schema": SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": None,
               "compare": None if compare is None else {"key": compare[0], "values": list(compare[1])},
               "settings": {**dataclasses.asdict(settings), "sections": list(settings.sections)},
               "devices": {}, "versions": None, "matmul_peak": {}, "runs": []}
    outputs = []
    for _, variant in variants:  # an impossible memory budget is refused before anything runs (bf16 sizes)
        if variant.vram_budget_gb is not None and variant.quantize == "none":
            device = variant.resolved_device()
            meta = FramePackDiT.from_config(DIT_PRESETS[variant.preset], device="meta",
                                            dtype=variant.resolved_dtype(device))
            bench_memory_plan(meta, variant, device)
    # A model that cannot fit is refused before anything runs (the matmul peak takes seconds); the weights are built
    # on the host when a memory budget is in play (_run_variants), else on the device.
    on_host = any(variant.vram_budget_gb is not None for _, variant in variants)
    for _, variant in variants:
        device = variant.resolved_device()
        build_device = torch.device("cpu") if on_host else device
        dtype = variant.resolved_dtype(device)
        check_fits(variant.preset, preset_weight_bytes(variant.preset, dtype), free_memory_bytes(build_device),
                   build_device, dtype)
    default_threads = torch.get_num_threads()
    try:
        _run_variants(variants, results, outputs, log)
    finally:
        torch.set_num_threads(default_threads)
    results["device"] = next(iter(results["devices"].values()))
    results["comparisons"] = _comparisons(results["runs"], outputs, variants)
    results["constant_work"] = _constant_work(results["runs"])
    return results


def _run_variants(variants, results: dict, outputs: list, log) -> None:
    model, model_key = None, None
    default_threads = torch.get_num_threads()
    # With a memory budget in play the weights start on the host (where streaming reads them) for every variant,
    # so resident and streamed runs share the same weights.
    on_host = any(variant.vram_budget_gb is not None for _, variant in variants)
    for label, variant in variants:
        device = variant.resolved_device()
        dtype = variant.resolved_dtype(device)
        # On a shared or small CPU, fewer threads than cores avoids spinning workers; recorded per run.
        torch.set_num_threads(variant.threads or default_threads)
        if str(device) not in results["devices"]:
            results["devices"][str(device)], results["versions"] = environment(device)
        peak_key = f"{device}/{_dtype_name(dtype)}"
        if device.type == "cpu":
            peak_key += f"/{torch.get_num_threads()}threads"
        with _on_device(device):
            if peak_key not in results["matmul_peak"]:
                log(f"measuring the matmul peak on {device} ({_dtype_name(dtype)})")
                results["matmul_peak"][peak_key] = measure_matmul_peak(device, dtype, variant.matmul_size)
            build_device = torch.device("cpu") if on_host else device
            key = (variant.preset, str(device), str(build_device), dtype, variant.seed, variant.quantize)
            if key != model_key:
                model = None  # free the previous model before building the next (two 13B models rarely fit)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log(f"building preset {variant.preset!r} with random weights on {build_device} ({_dtype_name(dtype)})")
                model = random_dit(DIT_PRESETS[variant.preset], build_device, dtype, variant.seed,
                                   preset=variant.preset, quantize=variant.quantize)
                model_key = key
            limited = on_host and variant.vram_budget_gb is not None and device.type == "cuda"
            if limited:  # the budget is enforced: the allocator may not hold more
                torch.cuda.empty_cache()
                total = torch.cuda.get_device_properties(device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, variant.vram_budget_gb * 2**30 / total), device)
            try:
                placement = place_for_bench(model, variant, device) if on_host else None
                log(f"running {label}: plans of {', '.join(map(str, variant.sections))} sections x {variant.steps} "
                    "steps" + (f", {len(placement.plan.streamed_blocks)} blocks streamed" if placement else ""))
                try:
                    runs, output = run_variant(model, variant, device, dtype, results["matmul_peak"][peak_key],
                                               placement)
                finally:
                    if placement is not None:
                        placement.close()
            finally:
                if limited:
                    torch.cuda.set_per_process_memory_fraction(1.0, device)
                    torch.cuda.empty_cache()
        for run in runs:
            run["label"] = label
            run["matmul_peak_key"] = peak_key
        outputs.append(output)
        results["runs"].extend(runs)


def _on_device(device: torch.device):
    """Makes `device` the current CUDA device (events and streams follow it); a no-op elsewhere."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _comparisons(runs: list[dict], outputs: list, variants) -> list[dict]:
    """Each variant's first-plan run against the first variant's: time and memory ratios, output difference."""
    if len(variants) < 2:
        return []
    labels = [label for label, _ in variants]
    first_runs = [next(run for run in runs if run["label"] == label) for label in labels]
    reference = first_runs[0]
    comparisons = []
    for run, output in zip(first_runs, outputs):
        step, reference_step = run["seconds_per_step"]["mean"], reference["seconds_per_step"]["mean"]
        memory, reference_memory = run["memory"]["device_peak_bytes"], reference["memory"]["device_peak_bytes"]
        comparisons.append({
            "label": run["label"], "reference": reference["label"],
            "seconds_per_step_ratio": step / reference_step,
            "speedup": reference_step / step,
            "achieved_tflops_ratio": run["achieved_tflops"] / reference["achieved_tflops"],
            "device_peak_bytes_ratio": memory / reference_memory if memory and reference_memory else None,
            "weight_bytes_ratio": run["model"]["weight_bytes"] / reference["model"]["weight_bytes"],
            # Same seed, same inputs: how far this variant's last section is from the reference's.
            "output_relative_error_vs_reference": _relative_error(output, outputs[0]),
        })
    return comparisons


def _constant_work(runs: list[dict]) -> list[dict]:
    """Per variant: tokens per section across every plan length (equal when the work is O(1)) and the mean
    section time of each plan (flat when it is). Reported, not asserted: timings are the reader's call."""
    by_label = {}
    for run in runs:
        by_label.setdefault(run["label"], []).append(run)
    report = []
    for label, label_runs in by_label.items():
        tokens = sorted({count for run in label_runs for count in run["tokens_per_section"]})
        means = {str(run["plan_sections"]): run["seconds_per_section"]["mean"] for run in label_runs}
        report.append({
            "label": label, "plan_sections": [run["plan_sections"] for run in label_runs],
            "tokens_per_section": tokens, "tokens_equal": len(tokens) == 1,
            "seconds_per_section_by_plan": means,
            "seconds_per_section_max_over_min": max(means.values()) / min(means.values()),
        })
    return report


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def _si(value: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {prefix}{unit}"
    return f"{value:.3g} {unit}"


def _gib(value) -> str:
    if value is None:
        return "-"
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"


def _seconds(value: float) -> str:
    return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.3f} s"


def _cache_note(run: dict) -> str:
    if run["settings"]["cache"] == "none":
        return ""
    calls = run["cache_steps_computed"] + run["cache_steps_skipped"]
    return f"  {run['settings']['cache']}: {run['cache_steps_skipped']}/{calls} calls skipped"


def format_results(results: dict) -> str:
    """A readable summary of run_benchmark's results for the terminal."""
    first = results["runs"][0]
    device, versions = results["device"], results["versions"]
    tokens = first["tokens"]
    lines = [
        f"framepack bench, random weights: preset {first['model']['preset']}, "
        f"{first['model']['parameters'] / 1e6:,.1f} M parameters, {_gib(first['model']['weight_bytes'])} of weights",
        f"device {device['name']} ({device['type']}); torch {versions['torch']}, cuda {versions['cuda']}, "
        f"triton {versions['triton']}, engine {versions['engine']}",
        f"{first['settings']['resolution']} -> {first['height']}x{first['width']} px (latents "
        f"{first['latent_height']}x{first['latent_width']}), window {first['settings']['latent_window_size']}, "
        f"{first['settings']['steps']} steps after {first['warmup_steps']} warm-up, "
        f"{first['settings']['variant']}, seed {first['settings']['seed']}",
        f"tokens per section {tokens['total_tokens']} = {tokens['latent_tokens']} latent (noisy {tokens['noisy_tokens']},"
        f" clean 1x {tokens['clean_1x_tokens']}, 2x {tokens['clean_2x_tokens']}, 4x {tokens['clean_4x_tokens']}) + "
        f"{tokens['condition_tokens']} condition (image {tokens['image_tokens']}, text {tokens['text_tokens']})",
        f"FLOPs per step {_si(first['flops_per_step']['total'], 'FLOP')} (linear "
        f"{_si(first['flops_per_step']['linear'], 'FLOP')}, attention {_si(first['flops_per_step']['attention'], 'FLOP')})",
        "matmul peak: " + ", ".join(f"{key} {_si(peak['tflops'] * 1e12, 'FLOP/s')} ({peak['size']}^3)"
                                    for key, peak in results["matmul_peak"].items()),
        "",
    ]
    header = (f"{'run':<24}{'plan':>5}{'s/step mean':>13}{'± std':>11}{'s/section':>12}{'s/frame':>11}"
              f"{'TFLOP/s':>10}{'MFU':>8}{'dev peak':>12}{'host peak':>12}")
    lines += [header, "-" * len(header)]
    for run in results["runs"]:
        step = run["seconds_per_step"]
        lines.append(
            f"{run['label'][:23]:<24}{run['plan_sections']:>5}{_seconds(step['mean']):>13}{_seconds(step['std']):>11}"
            f"{_seconds(run['seconds_per_section']['mean']):>12}{_seconds(run['seconds_per_output_frame']['mean']):>11}"
            f"{run['achieved_tflops']:>10.3g}{run['mfu'] * 100:>7.1f}%{_gib(run['memory']['device_peak_bytes']):>12}"
            f"{_gib(run['memory']['host_peak_rss_bytes']):>12}" + _cache_note(run))
    if results["comparisons"]:
        lines += ["", f"ratios to {results['comparisons'][0]['reference']} (first plan length):"]
        for item in results["comparisons"]:
            error = item["output_relative_error_vs_reference"]
            memory = item["device_peak_bytes_ratio"]
            lines.append(f"  {item['label']:<24} time x{item['seconds_per_step_ratio']:.3f}  speedup "
                         f"x{item['speedup']:.3f}  memory {'-' if memory is None else f'x{memory:.3f}'}  weights "
                         f"x{item['weight_bytes_ratio']:.3f}  output "
                         f"rel. error {'-' if error is None else f'{error:.2e}'}")
    multi_plan = [item for item in results["constant_work"] if len(item["plan_sections"]) > 1]
    if multi_plan:
        lines += ["", "O(1) per section (tokens per section must be equal, time per section should be flat):"]
        for item in multi_plan:
            times = ", ".join(f"{plan}: {_seconds(seconds)}" for plan, seconds in item["seconds_per_section_by_plan"].items())
            lines.append(f"  {item['label']:<24} tokens {item['tokens_per_section']} "
                         f"({'equal' if item['tokens_equal'] else 'NOT equal'}); s/section by plan {times}; "
                         f"max/min {item['seconds_per_section_max_over_min']:.3f}")
    streaming = [run for run in results["runs"] if run["memory_plan"] and run["memory_plan"]["streamed_blocks"]]
    if streaming:
        lines += ["", "streaming (framepack_engine.runtime.planner plan):"]
        for run in streaming:
            plan = run["memory_plan"]
            lines.append(f"  {run['label']:<24} {len(plan['streamed_blocks'])} of "
                         f"{len(plan['streamed_blocks']) + len(plan['resident_blocks'])} blocks streamed, prefetch "
                         f"{plan['prefetch']}, {plan['source']}: {_gib(run['bytes_streamed_per_step'])} per step; "
                         f"host anonymous peak {_gib(run['memory']['host_rss_anon_peak_bytes'])}")
    non_finite = [run["label"] for run in results["runs"] if not run["output_finite"]]
    if non_finite:
        lines.append(f"note: non-finite outputs in {', '.join(sorted(set(non_finite)))} (random weights; timing is valid)")
    return "\n".join(lines)


def write_json(results: dict, path: Path) -> None:
    """Written whole or not at all: to a temporary file, then renamed over the target."""
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(temporary, path)


# --------------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="full", choices=list(DIT_PRESETS),
                        help="model size: full (the real 13B config, default), small (real blocks, 8 heads), tiny")
    parser.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPE_NAMES],
                        help="default: bfloat16 on cuda, float32 on cpu")
    parser.add_argument("--resolution", type=int, default=640, help="bucket resolution of a square image (default 640)")
    parser.add_argument("--latent-window-size", type=int, default=9, help="latent frames per section (default 9)")
    parser.add_argument("--steps", type=int, default=25, help="sampling steps per section (default 25)")
    parser.add_argument("--sections", default="1", help="plan lengths to run, e.g. 1,4,16 for the O(1) check")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before each variant (default 2)")
    parser.add_argument("--attention", default="auto", choices=list(BACKEND_NAMES))
    parser.add_argument("--variant", default="bidirectional", choices=list(VARIANTS), help="section plan")
    parser.add_argument("--seed", type=int, default=0, help="weights and inputs")
    parser.add_argument("--prompt-tokens", type=int, default=77, help="valid prompt tokens (default 77)")
    parser.add_argument("--matmul-size", type=int, help="side of the peak matmul (default 8192 on cuda, 1024 on cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is steadiest on a shared CPU)")
    parser.add_argument("--cache", default="none", choices=["none", *STEP_CACHES],
                        help="step cache (MagCache is first calibrated, untimed, on the random weights)")
    parser.add_argument("--cache-threshold", type=float, help="the step cache's threshold (default: teacache 0.15, "
                                                              "magcache 0.1)")
    parser.add_argument("--quantize", default="none", choices=["none", *QUANTIZE_FORMATS],
                        help="quantize the blocks' linears (framepack_engine.runtime.quant) after the random fill (default none)")
    parser.add_argument("--vram-budget-gb", type=float,
                        help="place the DiT by the memory planner under this budget (streaming what does not fit); "
                             "default: every weight resident")
    parser.add_argument("--gpu-check", metavar="DIR", help="run the whole GPU check (python -m bench.gpu_check, from a "
                        "checkout of the repository) and write DIR/gpu_check.json and .md; other flags are ignored")
    parser.add_argument("--compile", default="off", choices=["off", "on"],
                        help="regional torch.compile of the DiT's blocks (compiled during the warm-up)")
    parser.add_argument("--compare", metavar="KEY=V1,V2",
                        help=f"run each value on the same inputs and print ratios to the first; KEY: "
                             f"{', '.join(COMPARABLE)}")
    parser.add_argument("--json", metavar="PATH", help="write every result to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.add_argument("--nproc", type=int, help="split every step over N ranks (Ulysses sequence parallel; gloo "
                        "with --device cpu): time per rank and step, bytes sent per step against the formula, and "
                        "the speedup over one process on this machine (framepack_engine.commands.bench_parallel)")
    parser.add_argument("--parallel-timeout", type=float, default=600.0, metavar="SECONDS",
                        help="how long a rank waits for the others before every rank stops (default 600)")


def add_bench_command(subparsers) -> argparse.ArgumentParser:
    """Adds `bench` to the `framepack` sub-commands."""
    parser = subparsers.add_parser(
        "bench", help="time the DiT with random weights at real shapes (no download)",
        description="Time FramePack's DiT section loop with random weights at the real shapes: FLOPs, MFU, memory.")
    add_bench_arguments(parser)
    parser.set_defaults(run=command_bench)
    return parser


def settings_from_args(args) -> BenchSettings:
    return BenchSettings(
        preset=args.preset, device=args.device, dtype=args.dtype, resolution=args.resolution,
        latent_window_size=args.latent_window_size, steps=args.steps, sections=parse_sections(args.sections),
        warmup=args.warmup, attention=args.attention, seed=args.seed, variant=args.variant,
        prompt_tokens=args.prompt_tokens, matmul_size=args.matmul_size, threads=args.threads, cache=args.cache,
        cache_threshold=args.cache_threshold, quantize=args.quantize, vram_budget_gb=args.vram_budget_gb,
        compile=args.compile).validate()


def command_bench(args) -> int:
    if args.gpu_check:
        import importlib.util

        if importlib.util.find_spec("bench.gpu_check") is None:
            raise FramePackError("The GPU check runs from a checkout of the repository (its bench/ folder): cd into "
                                 "it and run python -m bench.gpu_check --out DIR.")
        from bench.gpu_check import main as gpu_check

        device = "cuda" if args.device == "auto" else args.device
        return gpu_check(["--out", args.gpu_check, "--device", device] + (["--tiny"] if device == "cpu" else []))
    settings = settings_from_args(args)
    compare = parse_compare(args.compare)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        raise FramePackError(f"The folder of --json {json_path.name!r} does not exist: create it or pick another path.")
    log = (lambda message: None) if args.quiet else (lambda message: print(f"[bench] {message}", file=sys.stderr))
    results = run_benchmark(settings, compare, log=log)
    results["command"] = command_line(settings, args.compare, args.json)
    print(format_results(results))
    if json_path is not None:
        write_json(results, json_path)
        print(f"Wrote {json_path.name}")
    return 0


def command_line(settings: BenchSettings, compare: str | None = None, json_path: str | None = None) -> str:
    """The `framepack bench` command that reproduces these settings, every option spelled out."""
    words = ["framepack", "bench"]
    for item in dataclasses.fields(settings):
        value = getattr(settings, item.name)
        if value is None:
            continue
        value = ",".join(map(str, value)) if isinstance(value, tuple) else value
        words += [f"--{item.name.replace('_', '-')}", str(value)]
    if compare:
        words += ["--compare", compare]
    if json_path:
        words += ["--json", Path(json_path).name]
    return " ".join(words)
