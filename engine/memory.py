"""The memory planner: from one device budget, where every model lives, what streams, and how the VAE tiles.

The budget is `vram_budget_gb`, or the device's free memory minus `memory_margin_gb` (as the official app's
preserved memory). A generation runs in phases, and the plan holds each phase's device bytes under the budget:

    text      Llama + CLIP-L encode every prompt            (before the first section)
    image     SigLIP encodes the start (and end) image
    vae       the VAE encodes the start image, and decodes each finished section (its tiling fills what is left)
    sampling  the DiT's steps: its activations for the section's token count

The DiT's resident part (embeddings, refiner, head, the blocks that fit) and its ring of slots stay on the device
throughout; the blocks that do not fit stream through the slots every step (engine.offload). Each other model is
`device` (stays), `offload` (visits the device for its phase, then its tensors point back at the host copy) or, for
the Llama, `stream` (its layers stream through their own slots while prompts are encoded). Priorities follow what a
byte buys: DiT blocks first (they are read every step), then the VAE and SigLIP, then the text encoders (once per
generation). Bytes are counted from the actual tensors (sum of nbytes), so quantized blocks plan as what they are.

A budget that cannot work is refused before anything moves, naming the smallest budget that can.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading
from dataclasses import asdict, dataclass, field, replace
from typing import Iterable

import torch

from engine.buckets import VAE_SPATIAL_COMPRESSION, find_nearest_bucket
from engine.dit import DiTConfig
from engine.errors import FramePackError
from engine.flops import PackedSequence, packed_sequence
from engine.offload import BlockStreamer, ModuleHome, slot_bytes, tensor_bytes
from engine.sections import CLEAN_1X_FRAMES, CLEAN_2X_FRAMES, CLEAN_4X_FRAMES

GiB = 2**30
MAX_PROMPT_TOKENS = 256  # engine.conditioning.MAX_PROMPT_TOKENS: the prompt's Llama tokens after the template
SIGLIP_TOKENS = 729  # SigLIP so400m at 384 px: a 27 x 27 grid
# The DiT's working set per packed token, fitted to the peak of live tensors measured (torch profiler, CPU) over
# several widths, MLP ratios and dtypes and rounded up (tests/test_memory.py keeps the fit honest): this many hidden
# vectors in the model's dtype besides one MLP vector, this many in float32 (norm and rotary temporaries), and this
# many float32 rotary tables per latent token.
ACTIVATION_HIDDEN_VECTORS = 6.5
ACTIVATION_FLOAT32_VECTORS = 6.0
ACTIVATION_ROTARY_TABLES = 2.5
# Anonymous host memory of the process itself (Python, torch, transformers; plus the CUDA context on a GPU).
HOST_BASELINE_BYTES = {"cpu": GiB // 2, "cuda": 3 * GiB // 2}
# Share of the host RAM that pinned copies of the streamed blocks may take.
PINNED_SHARE = 0.8
# What a memory-mapped file delivers when the page cache cannot hold it: a fast NVMe drive.
DISK_BYTES_PER_SECOND = 3e9


def pinned_allocation_bytes(nbytes: int) -> int:
    """Host RAM a pinned buffer of `nbytes` takes: torch's caching host allocator rounds every pinned allocation up to
    a power of two. Counted rather than avoided (pageable memory registered with cudaHostRegister would not round)
    because registering needs its own lifetime rules: a buffer must stay registered while a copy from it is in
    flight and while a view of it is held (a LoRA's kept original), which torch's allocator already tracks."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


PHASES = ("text", "image", "vae", "sampling")
PLACEMENT_CHOICES = {"text_encoder": ("device", "offload", "stream"), "image_encoder": ("device", "offload"),
                     "vae": ("device", "offload")}


class InsufficientMemoryError(FramePackError):
    """The budget cannot hold the smallest plan; `minimum_bytes` is the smallest budget that works."""

    def __init__(self, message: str, minimum_bytes: int):
        super().__init__(message)
        self.minimum_bytes = minimum_bytes


# --------------------------------------------------------------------------------------------------------------------
# What the models take
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One model as the planner sees it: the bytes that must be on the device while it runs besides its blocks,
    its streamable blocks in run order (none for a model that only moves whole), and its working set."""

    name: str
    other_bytes: int
    block_bytes: tuple[int, ...] = ()
    activation_bytes: int = 0
    block_slot_bytes: tuple[int, ...] = ()  # each block's bytes in a slot (its tensors aligned); (): block_bytes

    @property
    def weight_bytes(self) -> int:
        return self.other_bytes + sum(self.block_bytes)

    def slot_for(self, blocks: Iterable[int]) -> int:
        """Bytes of a slot that holds any of these blocks (the streamer sizes its slots by the streamed ones)."""
        sizes = self.block_slot_bytes or self.block_bytes
        return max((sizes[index] for index in blocks), default=0)

    @property
    def largest_slot(self) -> int:
        return self.slot_for(range(len(self.block_bytes)))


@dataclass(frozen=True)
class Footprint:
    """What the planner needs to know of an engine's models (any of the encoders and the VAE may be absent)."""

    dit: Component
    dit_config: DiTConfig
    dit_element_size: int  # bytes of the DiT's compute dtype
    text_encoder: Component | None = None  # Llama (blocks: its layers) with CLIP-L in other_bytes
    image_encoder: Component | None = None
    vae: Component | None = None
    vae_model: object | None = None  # engine.vae.HunyuanVideoVAE (on the meta device will do): its working sets


def transformer_activation_bytes(tokens: int, hidden: int, intermediate: int, heads: int, kept_states: int,
                                 element_size: int) -> int:
    """An encoder's working set: the hidden states it returns, float32 temporaries of a layer, attention scores."""
    return (tokens * hidden * element_size * kept_states + tokens * (4 * hidden + 3 * intermediate) * 4
            + heads * tokens * tokens * 4)


def tensor_bytes_of(modules, dtype: torch.dtype | None = None) -> int:
    return sum(tensor_bytes(module, dtype) for module in modules)


def dit_footprint(dit, dtype: torch.dtype | None = None) -> tuple[Component, DiTConfig, int]:
    """The DiT's bytes from its tensors: the resident part (everything outside the blocks) and each block."""
    blocks, kept = dit.blocks, dit.modules_used_outside_blocks()  # kept: resident parts of the blocks
    component = Component("transformer", tensor_bytes(dit, dtype, skip=blocks) + tensor_bytes_of(kept, dtype),
                          tuple(tensor_bytes(block, dtype, skip=kept) for block in blocks),
                          block_slot_bytes=tuple(slot_bytes(block, dtype, kept) for block in blocks))
    return component, dit.config, (dtype or dit.compute_dtype).itemsize


def text_encoder_footprint(llama, clip, dtype: torch.dtype | None, prompt_tokens: int) -> Component:
    """Llama (its layers stream) and CLIP-L (moves whole): the part that stays while encoding is Llama's embedding
    and norm plus all of CLIP."""
    config = llama.config
    element_size = (dtype or next(llama.parameters()).dtype).itemsize
    activation = transformer_activation_bytes(prompt_tokens, config.hidden_size, config.intermediate_size,
                                              config.num_attention_heads, config.num_hidden_layers + 1, element_size)
    clip_bytes = tensor_bytes(clip, dtype) if clip is not None else 0
    return Component("text_encoder", tensor_bytes(llama, dtype, skip=[llama.layers]) + clip_bytes,
                     tuple(tensor_bytes(layer, dtype) for layer in llama.layers), activation,
                     tuple(slot_bytes(layer, dtype) for layer in llama.layers))


def image_encoder_footprint(model, dtype: torch.dtype | None) -> Component:
    config = model.config
    element_size = (dtype or next(model.parameters()).dtype).itemsize
    tokens = (config.image_size // config.patch_size) ** 2
    return Component("image_encoder", tensor_bytes(model, dtype), (),
                     transformer_activation_bytes(tokens, config.hidden_size, config.intermediate_size,
                                                  config.num_attention_heads, 2, element_size))


def engine_footprint(dit, text_encoder=None, image_encoder=None, vae=None,
                     encoder_dtype: torch.dtype | None = None) -> Footprint:
    """The footprint of loaded models (engine.conditioning.TextEncoder / ImageEncoder, engine.vae's VAE)."""
    component, config, element_size = dit_footprint(dit)
    text = image = vae_component = None
    if text_encoder is not None and getattr(text_encoder, "llama_model", None) is not None:
        prompt_tokens = text_encoder.max_prompt_tokens + text_encoder.crop_start
        text = text_encoder_footprint(text_encoder.llama_model, text_encoder.clip_model, encoder_dtype, prompt_tokens)
    if image_encoder is not None and getattr(image_encoder, "model", None) is not None:
        image = image_encoder_footprint(image_encoder.model, encoder_dtype)
    if vae is not None:
        vae_component = Component("vae", tensor_bytes(vae))
    return Footprint(component, config, element_size, text, image, vae_component, vae)


# The official models' configurations (what `framepack info --plan` assumes when no model is loaded).
OFFICIAL_LLAMA = dict(vocab_size=128320, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8)
OFFICIAL_CLIP = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77)
OFFICIAL_SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                       image_size=384, patch_size=14)
OFFICIAL_TEMPLATE_TOKENS = 95  # engine.conditioning.OFFICIAL_CROP_START


@functools.lru_cache(maxsize=4)
def official_footprint(dtype: torch.dtype = torch.bfloat16, encoder_dtype: torch.dtype = torch.float16,
                       vae_dtype: torch.dtype = torch.float16) -> Footprint:
    """The official FramePack models (13B DiT, 8B Llama, CLIP-L, SigLIP so400m, HunyuanVideo VAE), sized from
    their configurations on the meta device: nothing is allocated."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel, SiglipVisionConfig, \
        SiglipVisionModel

    from engine.dit import FramePackDiT
    from engine.presets import FULL_DIT_CONFIG
    from engine.vae import HunyuanVideoVAE

    dit = FramePackDiT.from_config(FULL_DIT_CONFIG, device="meta", dtype=dtype)
    with torch.device("meta"):
        llama = LlamaModel(LlamaConfig(**OFFICIAL_LLAMA))
        clip = CLIPTextModel(CLIPTextConfig(**OFFICIAL_CLIP))
        siglip = SiglipVisionModel(SiglipVisionConfig(**OFFICIAL_SIGLIP))
    vae = HunyuanVideoVAE.from_config({}, device="meta", dtype=vae_dtype)
    component, config, element_size = dit_footprint(dit)
    text = text_encoder_footprint(llama, clip, encoder_dtype, MAX_PROMPT_TOKENS + OFFICIAL_TEMPLATE_TOKENS)
    return Footprint(component, config, element_size, text, image_encoder_footprint(siglip, encoder_dtype),
                     Component("vae", tensor_bytes(vae)), vae)


# --------------------------------------------------------------------------------------------------------------------
# Working sets
# --------------------------------------------------------------------------------------------------------------------


def section_sequence(config: DiTConfig, resolution: int = 640, latent_window_size: int = 9,
                     text_tokens: int = MAX_PROMPT_TOKENS, image_tokens: int = SIGLIP_TOKENS,
                     size: tuple[int, int] | None = None) -> PackedSequence:
    """The packed tokens of one section of `size` (height, width) pixels, by default the bucket of a square image
    at `resolution`, with the longest prompt."""
    height, width = size or find_nearest_bucket(resolution, resolution, resolution)
    return packed_sequence(config, latent_window_size, 1 + CLEAN_1X_FRAMES, CLEAN_2X_FRAMES, CLEAN_4X_FRAMES,
                           height // VAE_SPATIAL_COMPRESSION, width // VAE_SPATIAL_COMPRESSION, text_tokens,
                           image_tokens)


def dit_activation_bytes(config: DiTConfig, sequence: PackedSequence, element_size: int, batch: int = 1) -> int:
    """Peak bytes of the tensors one DiT call holds besides its weights (the plain glue path; fused kernels and
    flash attention hold less)."""
    per_token = (element_size * (ACTIVATION_HIDDEN_VECTORS * config.hidden_size + config.mlp_hidden_size)
                 + 4 * ACTIVATION_FLOAT32_VECTORS * config.hidden_size)
    rotary = 4 * ACTIVATION_ROTARY_TABLES * sequence.latent_tokens * config.attention_head_dim
    return int(batch * (sequence.total_tokens * per_token + rotary))


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def decode_shape(vae_model, resolution: int, latent_window_size: int,
                 size: tuple[int, int] | None = None) -> tuple[int, ...]:
    """The largest VAE decode of a section: twice the window plus the start frame (the official last section)."""
    height, width = size or find_nearest_bucket(resolution, resolution, resolution)
    channels = vae_model.config.latent_channels
    return (1, channels, 2 * latent_window_size + 1, height // VAE_SPATIAL_COMPRESSION,
            width // VAE_SPATIAL_COMPRESSION)


_VAE_FLOORS: dict = {}


def _smallest_vae_working_set(vae_model, shape: tuple[int, ...]) -> int:
    """The working set of the VAE's most tiled decode plan (its floor), remembered per config and shape."""
    key = (repr(vae_model.config), vae_model.dtype, shape)
    if key not in _VAE_FLOORS:
        with _quiet("engine.vae"):
            _VAE_FLOORS[key] = vae_model.plan_decode(shape, memory_budget_bytes=1).working_set_bytes
    return _VAE_FLOORS[key]


def vae_decode_plan(vae_model, plan: "MemoryPlan"):
    """The VAE's own plan (engine.vae.MemoryPlan: tiling, chunking, working set) for the plan's largest section
    decode under the plan's VAE budget."""
    with _quiet("engine.vae"):
        return vae_model.plan_decode(decode_shape(vae_model, plan.resolution, plan.latent_window_size, plan.size),
                                     memory_budget_bytes=max(int(plan.vae_budget_bytes), 1))


# --------------------------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Where everything lives, what streams, and what each phase holds on the device (bytes)."""

    device: str  # "cuda" or "cpu"
    budget_bytes: int
    resolution: int
    latent_window_size: int
    size: tuple[int, int] | None  # (height, width) pixels of the section, None: the bucket of the resolution
    tokens: int  # packed tokens of the section the plan was made for
    resident_blocks: tuple[int, ...]
    streamed_blocks: tuple[int, ...]
    prefetch: int  # blocks copied ahead of the one computing (0: nothing streams)
    slots: int
    slot_bytes: int
    source: str  # "none" (nothing streams), "pinned" (host copies in pinned RAM) or "mmap" (the loaded file)
    bytes_streamed_per_step: int  # weight bytes copied per DiT call
    dit_resident_bytes: int  # the DiT's bytes that stay: non-block modules and resident blocks
    dit_activation_bytes: int
    placements: dict = field(default_factory=dict)  # text_encoder / image_encoder / vae -> device|offload|stream
    text_encoder_slots: int = 0
    text_encoder_slot_bytes: int = 0
    vae_budget_bytes: int = 0  # what the VAE's own tiling plan may use
    phase_bytes: dict = field(default_factory=dict)  # text, image, vae, sampling -> device bytes
    host_bytes: int = 0  # expected anonymous host memory of the process
    host_ram_bytes: int | None = None  # the host RAM the plan assumed available
    weight_source: str = "device"  # where each step's streamed bytes come from: pinned RAM, page cache or disk
    disk_seconds_per_step: float | None = None
    minimum_budget_bytes: int = 0

    @property
    def peak_bytes(self) -> int:
        return max(self.phase_bytes.values())

    @property
    def streams(self) -> bool:
        return bool(self.streamed_blocks)

    def as_dict(self) -> dict:
        return {**asdict(self), "peak_bytes": self.peak_bytes}

    def lines(self) -> list[str]:
        """The plan for a person: what is where, bytes streamed per step, expected host RAM."""
        blocks = len(self.resident_blocks) + len(self.streamed_blocks)
        lines = [
            f"memory plan for {self.device}: budget {_gb(self.budget_bytes)}, peak {_gb(self.peak_bytes)} "
            f"(smallest workable budget {_round_up_gb(self.minimum_budget_bytes)} GB); section of {self.tokens} tokens "
            f"at {'resolution %d' % self.resolution if self.size is None else '%dx%d' % self.size}, "
            f"window {self.latent_window_size}",
            f"  transformer: {len(self.resident_blocks)} of {blocks} blocks resident "
            f"({_gb(self.dit_resident_bytes)} with the non-block modules), activations {_gb(self.dit_activation_bytes)}",
        ]
        if self.streams:
            lines.append(
                f"  streaming: {len(self.streamed_blocks)} blocks through {self.slots} slots of "
                f"{_gb(self.slot_bytes)} (prefetch {self.prefetch}), {_gb(self.bytes_streamed_per_step)} per step "
                f"from {self.weight_source}" + (f" (about {self.disk_seconds_per_step:.1f} s per step of reads: a "
                                                "quantized checkpoint halves it)" if self.disk_seconds_per_step else ""))
        for name, where in self.placements.items():
            extra = (f" ({self.text_encoder_slots} slots of {_gb(self.text_encoder_slot_bytes)})"
                     if where == "stream" else "")
            lines.append(f"  {name.replace('_', ' ')}: {where}{extra}")
        if self.vae_budget_bytes:
            lines.append(f"  VAE tiling budget: {_gb(self.vae_budget_bytes)}")
        lines.append("  device bytes by phase: " + ", ".join(f"{phase} {_gb(bytes_)}"
                                                             for phase, bytes_ in self.phase_bytes.items()))
        host = f"  expected host RAM (anonymous): {_gb(self.host_bytes)}"
        if self.host_ram_bytes is not None:
            host += f" of {_gb(self.host_ram_bytes)} available"
        lines.append(host)
        return lines


def _gb(value: int | float) -> str:
    return f"{value / GiB:.2f} GB" if abs(value) >= GiB // 10 else f"{value / GiB:.4f} GB"


def _round_up_gb(value: int) -> str:
    """A budget in GB rounded up to 0.1 GB (to 0.0001 GB below 1 GB): a value that works when given back."""
    step = 10 if value >= GiB else 10_000
    return f"{-(-value * step // GiB) / step:g}"


@dataclass
class _Choice:
    """One candidate arrangement the planner evaluates."""

    resident: tuple[int, ...]
    prefetch: int
    placements: dict


def plan_memory(footprint: Footprint, budget_bytes: int, *, device: str = "cuda", host_ram_bytes: int | None = None,
                resolution: int = 640, latent_window_size: int = 9, size: tuple[int, int] | None = None,
                text_tokens: int = MAX_PROMPT_TOKENS, image_tokens: int = SIGLIP_TOKENS,
                pinned: bool | None = None) -> MemoryPlan:
    """The plan for `footprint` under `budget_bytes` of device memory, for sections at `resolution` (or of `size`:
    height and width in pixels).

    host_ram_bytes: host RAM the process may use (None: unknown; weights are then read from the mapped file rather
    than pinned). pinned: force (True) or forbid (False) pinned host copies of the streamed blocks.
    Raises InsufficientMemoryError when even streaming every block does not fit.
    """
    device = torch.device(device).type
    dit = footprint.dit
    blocks = dit.block_bytes
    sequence = section_sequence(footprint.dit_config, resolution, latent_window_size, text_tokens, image_tokens, size)
    activations = dit_activation_bytes(footprint.dit_config, sequence, footprint.dit_element_size)
    vae_floor = 0
    if footprint.vae_model is not None:
        vae_floor = _smallest_vae_working_set(footprint.vae_model,
                                              decode_shape(footprint.vae_model, resolution, latent_window_size,
                                                           size))
    optional = {name: getattr(footprint, name) for name in PLACEMENT_CHOICES if getattr(footprint, name) is not None}

    def phases(choice: _Choice) -> dict:
        streamed = [index for index in range(len(blocks)) if index not in choice.resident]
        slots = min(choice.prefetch + 1, len(streamed)) if streamed else 0
        slot = dit.slot_for(streamed)
        # The DiT's slots are given back while the encoders run (engine.memory.Placement.use).
        always = dit.other_bytes + sum(blocks[i] for i in choice.resident)
        resident = sum(component.weight_bytes for name, component in optional.items()
                       if choice.placements[name] == "device")
        result = {"sampling": always + slots * slot + resident + activations}
        text = optional.get("text_encoder")
        if text is not None:
            where = choice.placements["text_encoder"]
            if where == "stream":
                visiting = text.other_bytes + min(2, len(text.block_bytes)) * text.largest_slot
            else:
                visiting = text.weight_bytes if where == "offload" else 0
            result["text"] = always + resident + visiting + text.activation_bytes
        image = optional.get("image_encoder")
        if image is not None:
            visiting = image.weight_bytes if choice.placements["image_encoder"] == "offload" else 0
            result["image"] = always + resident + visiting + image.activation_bytes
        if footprint.vae is not None:
            visiting = footprint.vae.weight_bytes if choice.placements["vae"] == "offload" else 0
            result["vae"] = always + slots * slot + resident + visiting + vae_floor
        return {phase: result[phase] for phase in PHASES if phase in result}

    def fits(choice: _Choice) -> bool:
        return max(phases(choice).values()) <= budget_bytes

    # The smallest arrangements: every block streamed, or (a model of few blocks, where the slots would take as much)
    # every block resident; the other models in turn.
    smallest = _Choice((), 1, {name: choices[-1] for name, choices in PLACEMENT_CHOICES.items() if name in optional})
    all_resident = replace(smallest, resident=tuple(range(len(blocks))))
    minimum = min(max(phases(smallest).values()), max(phases(all_resident).values()))
    if minimum > budget_bytes:
        in_turn = ", the encoders and the VAE loaded in turn" if optional else ""
        raise InsufficientMemoryError(
            f"A device budget of {_gb(budget_bytes)} is too small for these models at "
            f"{'resolution ' + str(resolution) if size is None else '%dx%d' % size} "
            f"({sequence.total_tokens} tokens per section): the smallest budget that works is "
            f"{_round_up_gb(minimum)} GB (every block streamed{in_turn}); give vram_budget_gb (--vram-budget-gb) "
            f"at least {_round_up_gb(minimum)}, or a lower resolution.", minimum)

    def arrange(extra_slot: bool) -> _Choice:
        """Every block resident if that fits; else as many resident as fit beside the slots, largest first (each
        resident byte is a byte not copied at every step)."""
        if fits(all_resident):
            return all_resident
        choice = smallest
        if extra_slot and fits(replace(choice, prefetch=2)):
            choice = replace(choice, prefetch=2)
        for index in sorted(range(len(blocks)), key=lambda i: (-blocks[i], i)):
            candidate = replace(choice, resident=tuple(sorted(choice.resident + (index,))))
            if len(candidate.resident) < len(blocks) and fits(candidate):
                choice = candidate
        return choice

    # Streamed blocks come from pinned host copies when the host RAM can hold them; else from the mapped file, where
    # reads vary (page cache or disk) and a second block in flight absorbs that.
    def pinned_source_bytes(streamed_blocks) -> int:  # a pinned buffer per streamed block
        return sum(pinned_allocation_bytes(dit.slot_for([index])) for index in streamed_blocks)

    source_pinned = False
    if device == "cuda" and pinned is not False:
        choice = arrange(extra_slot=False)
        pinned_bytes = pinned_source_bytes(i for i in range(len(blocks)) if i not in choice.resident)
        source_pinned = bool(pinned) or (host_ram_bytes is not None and HOST_BASELINE_BYTES[device] + pinned_bytes
                                         <= PINNED_SHARE * host_ram_bytes)
    if not source_pinned:
        choice = arrange(extra_slot=device == "cuda")
    # The other models: the VAE and SigLIP are used every generation and small; the text encoders last.
    for name in ("vae", "image_encoder", "text_encoder"):
        if name not in optional:
            continue
        for where in PLACEMENT_CHOICES[name][:-1]:
            candidate = replace(choice, placements={**choice.placements, name: where})
            if fits(candidate):
                choice = candidate
                break

    phase_bytes = phases(choice)
    streamed = tuple(i for i in range(len(blocks)) if i not in choice.resident)
    slots = min(choice.prefetch + 1, len(streamed)) if streamed else 0
    slot = dit.slot_for(streamed)
    streamed_bytes = sum(blocks[i] for i in streamed)
    vae_budget = 0
    if "vae" in phase_bytes:
        vae_budget = budget_bytes - phase_bytes["vae"] + vae_floor
    text = optional.get("text_encoder")
    text_streams = text is not None and choice.placements.get("text_encoder") == "stream"
    source = "none" if not streamed else ("pinned" if source_pinned else "mmap")

    host = HOST_BASELINE_BYTES.get(device, GiB)
    if device == "cuda":
        if source_pinned:
            host += pinned_source_bytes(streamed)
        elif streamed:  # two pinned staging buffers
            host += 2 * pinned_allocation_bytes(slot)
        host += 2 * pinned_allocation_bytes(text.largest_slot) if text_streams else 0  # the Llama's staging buffers
    else:
        host += max(phase_bytes.values())  # the device is the host
    weight_source, disk_seconds = "device", None
    if streamed:
        if source_pinned:
            weight_source = "pinned RAM"
        elif host_ram_bytes is None:
            weight_source = "the mapped file (page cache, or disk when the cache cannot hold it)"
        elif host + streamed_bytes > host_ram_bytes:
            weight_source, disk_seconds = "disk", streamed_bytes / DISK_BYTES_PER_SECOND
        else:
            weight_source = "page cache"
    return MemoryPlan(
        device=device, budget_bytes=int(budget_bytes), resolution=resolution, latent_window_size=latent_window_size,
        size=tuple(size) if size is not None else None, tokens=sequence.total_tokens, resident_blocks=choice.resident, streamed_blocks=streamed,
        prefetch=choice.prefetch if streamed else 0, slots=slots, slot_bytes=slot if streamed else 0,
        source=source, bytes_streamed_per_step=streamed_bytes,
        dit_resident_bytes=dit.other_bytes + sum(blocks[i] for i in choice.resident),
        dit_activation_bytes=activations, placements=dict(choice.placements),
        text_encoder_slots=min(2, len(text.block_bytes)) if text_streams else 0,
        text_encoder_slot_bytes=text.largest_slot if text_streams else 0,
        vae_budget_bytes=vae_budget, phase_bytes=phase_bytes, host_bytes=host, host_ram_bytes=host_ram_bytes,
        weight_source=weight_source, disk_seconds_per_step=disk_seconds, minimum_budget_bytes=minimum)


# --------------------------------------------------------------------------------------------------------------------
# Budgets
# --------------------------------------------------------------------------------------------------------------------


def proc_bytes(path: str, key: str) -> int | None:
    """A `Key:   123 kB` line of a /proc file (/proc/meminfo, /proc/self/status), in bytes; None where /proc is
    absent (not Linux) or the key is missing."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available_bytes() -> int | None:
    """The host's MemAvailable (Linux), or None where /proc is absent."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def device_budget_bytes(device, vram_budget_gb: float | None = None, memory_margin_gb: float = 1.0) -> int:
    """The budget: `vram_budget_gb`, else the device's free memory minus `memory_margin_gb`. For the CPU that is
    the host's total RAM: weights read from a mapped file live in the page cache, which the system lends and
    reclaims, so what is free at load time says little."""
    if vram_budget_gb is not None:
        return int(vram_budget_gb * GiB)
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FramePackError("There is no CUDA device to read the free memory of: give vram_budget_gb "
                                 "(--vram-budget-gb), or plan for the CPU.")
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = proc_bytes("/proc/meminfo", "MemTotal") or 16 * GiB
    budget = free - int(memory_margin_gb * GiB)
    if budget <= 0:
        raise FramePackError(
            f"{device} has {_gb(free)} free, no more than the memory margin of {memory_margin_gb:g} GB: lower "
            "memory_margin_gb (--memory-margin-gb) or free the device.")
    return budget


def official_plan(device=None, vram_budget_gb: float | None = None, memory_margin_gb: float = 1.0,
                  resolution: int = 640) -> tuple[MemoryPlan, str]:
    """The plan the official models would get on `device` (default: cuda when available), and what they are."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # As engine.loading does: half-precision encoders and VAE on a GPU, float32 on a CPU.
    encoder_dtype = torch.float16 if device.type == "cuda" else torch.float32
    footprint = official_footprint(torch.bfloat16, encoder_dtype, encoder_dtype)
    plan = plan_memory(footprint, device_budget_bytes(device, vram_budget_gb, memory_margin_gb), device=device.type,
                       host_ram_bytes=host_available_bytes(), resolution=resolution)
    encoders = str(encoder_dtype).removeprefix("torch.")
    return plan, (f"the official models: FramePack's 13B DiT in bfloat16; Llama 8B, CLIP-L, SigLIP and the VAE "
                  f"in {encoders}")


# --------------------------------------------------------------------------------------------------------------------
# Applying a plan
# --------------------------------------------------------------------------------------------------------------------


class DiTPlacement:
    """A plan applied to the DiT: its non-block modules and resident blocks on the device, the rest streaming."""

    def __init__(self, dit, plan: MemoryPlan, device):
        self.dit, self.plan = dit, plan
        self.home = ModuleHome(dit, device, skip=dit.blocks)
        self.home.to_device()
        self.streamer = BlockStreamer(dit.blocks, device, plan.streamed_blocks, prefetch=max(plan.prefetch, 1),
                                      pinned=plan.source == "pinned", keep=dit.modules_used_outside_blocks())
        dit.set_block_stream(self.streamer)

    def close(self) -> None:
        """Every DiT tensor back on the host (as loaded) and the plain block loop back in place."""
        self.dit.set_block_stream(None)
        self.streamer.close()
        self.home.to_host()


class Placement:
    """A memory plan applied to an engine's models; `use(name)` brings a model onto the device for its phase.

    footprint and host_ram_bytes (what the plan was made from) let `fit` plan again for a larger section.
    """

    def __init__(self, plan: MemoryPlan, device, dit, text_encoder=None, image_encoder=None, vae=None,
                 encoder_dtype: torch.dtype | None = None, footprint: Footprint | None = None,
                 host_ram_bytes: int | None = None):
        self.device = torch.device(device)
        self.encoder_dtype = encoder_dtype
        self.footprint, self.host_ram_bytes = footprint, host_ram_bytes
        self.models = {"transformer": dit, "text_encoder": text_encoder, "image_encoder": image_encoder, "vae": vae}
        self._place(plan)

    def _place(self, plan: MemoryPlan) -> None:
        self.plan = plan
        device, dtype, models = self.device, self.encoder_dtype, self.models
        self.dit = DiTPlacement(models["transformer"], plan, device) if models["transformer"] is not None else None
        self._homes: dict[str, list[ModuleHome]] = {}
        self._streamers: dict[str, BlockStreamer] = {}
        self._hooks = []
        self._in_use: set[str] = set()
        text_encoder = models["text_encoder"]
        if text_encoder is not None and getattr(text_encoder, "llama_model", None) is not None:
            llama, clip = text_encoder.llama_model, text_encoder.clip_model
            if plan.placements.get("text_encoder") == "stream":
                self._homes["text_encoder"] = [ModuleHome(llama, device, dtype, skip=[llama.layers]),
                                               ModuleHome(clip, device, dtype)]
                streamer = BlockStreamer(llama.layers, device, prefetch=1, dtype=dtype, allocate=False)
                self._hooks = streamer.attach_hooks()
                self._streamers["text_encoder"] = streamer
            else:
                self._homes["text_encoder"] = [ModuleHome(llama, device, dtype), ModuleHome(clip, device, dtype)]
        image_encoder = models["image_encoder"]
        if image_encoder is not None and getattr(image_encoder, "model", None) is not None:
            self._homes["image_encoder"] = [ModuleHome(image_encoder.model, device, dtype)]
        if models["vae"] is not None:
            self._homes["vae"] = [ModuleHome(models["vae"], device)]
            models["vae"].memory_budget_bytes = plan.vae_budget_bytes or None
        for name, homes in self._homes.items():
            if plan.placements.get(name) == "device":
                for home in homes:
                    home.to_device()

    def streamer(self, name: str = "transformer") -> BlockStreamer | None:
        """The block streamer of the DiT (or of the Llama, "text_encoder"), or None where nothing streams."""
        if name == "transformer":
            return None if self.dit is None else self.dit.streamer
        return self._streamers.get(name)

    def on_device(self, name: str) -> bool:
        """Whether `name`'s model (text_encoder, image_encoder, vae) is on the device now."""
        return any(home.on_device for home in self._homes.get(name, []))

    @contextlib.contextmanager
    def use(self, name: str):
        """`name`'s model on the device inside the block (its layers streaming, if planned so); afterwards it leaves
        the device unless the plan keeps it there. While an encoder runs the DiT's slots are given back (the DiT
        makes them again at its next step)."""
        homes = self._homes.get(name)
        if homes is None or name in self._in_use:  # not placed by the plan, or already in use further out
            yield
            return
        stay = self.plan.placements.get(name) == "device"
        streamer = self._streamers.get(name)
        if name in ("text_encoder", "image_encoder") and self.dit is not None:
            self.dit.streamer.free()
        with contextlib.ExitStack() as stack:
            self._in_use.add(name)
            stack.callback(self._in_use.discard, name)
            for home in homes:
                stack.enter_context(home.in_use(stay=stay))
            if streamer is not None:
                streamer.allocate()
                stack.callback(streamer.free)
            yield

    def drop(self, name: str) -> None:
        """Forget a model that was released: its tensors go back to the host and the placement lets go of them."""
        for home in self._homes.pop(name, []):
            home.to_host()
        streamer = self._streamers.pop(name, None)
        if streamer is not None:
            for handle in self._hooks:
                handle.remove()
            self._hooks = []
            streamer.close()
        if name in self.models and name != "transformer":
            self.models[name] = None

    def fit(self, size: tuple[int, int], latent_window_size: int) -> MemoryPlan:
        """Makes sure the plan holds a section of `size` (height, width pixels): a larger section than it was made
        for gets a new plan (fewer resident blocks for more activations), applied before sampling starts."""
        if self.footprint is None:
            return self.plan
        sequence = section_sequence(self.footprint.dit_config, latent_window_size=latent_window_size, size=size)
        if sequence.total_tokens <= self.plan.tokens and latent_window_size <= self.plan.latent_window_size:
            return self.plan
        plan = plan_memory(self.footprint, self.plan.budget_bytes, device=self.plan.device,
                           host_ram_bytes=self.host_ram_bytes, resolution=self.plan.resolution,
                           latent_window_size=latent_window_size, size=size)
        self.close()
        self._place(plan)
        return plan

    def close(self) -> None:
        """Every model back on the host, as loaded."""
        for name in list(self._homes):
            for home in self._homes.pop(name):
                home.to_host()
        for streamer in self._streamers.values():
            streamer.close()
        for handle in self._hooks:
            handle.remove()
        self._streamers, self._hooks = {}, []
        if self.dit is not None:
            self.dit.close()


# --------------------------------------------------------------------------------------------------------------------
# Measuring host memory
# --------------------------------------------------------------------------------------------------------------------


def release_freed_host_memory() -> None:
    """Hands the host memory that freed tensors left in the C allocator's heap back to the system (glibc's
    malloc_trim; nothing elsewhere). Quantizing a model layer by layer frees its float weights in pieces that glibc
    keeps: measured on the small preset, anonymous RSS stays at the float model's 5.6 GB after int4 quantization
    and drops to 1.1 GB after this."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def rss_anon_bytes() -> int | None:
    """The process's anonymous resident memory (RssAnon: not the page cache of mapped files)."""
    return proc_bytes("/proc/self/status", "RssAnon")


class AnonymousMemoryPeak:
    """Samples RssAnon on a thread while the block runs: `peak_bytes` (and `start_bytes`) afterwards."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_bytes = self.peak_bytes = rss_anon_bytes() or 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes() or 0)

    def __enter__(self):
        self.start_bytes = self.peak_bytes = rss_anon_bytes() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_anon_bytes() or 0)
