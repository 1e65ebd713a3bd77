"""The memory planner: from one device budget, where every model lives, what streams, and how the VAE tiles.

The budget is `vram_budget_gb`, or the device's free memory minus `memory_margin_gb` (as the official app's
preserved memory). A generation runs in phases, and the plan holds each phase's device bytes under the budget:

    text      Llama + CLIP-L encode every prompt            (before the first section)
    image     SigLIP encodes the start (and end) image
    vae       the VAE encodes the start image, and decodes each finished section (its tiling fills what is left)
    sampling  the DiT's steps: its activations for the section's token count

The DiT's resident part (embeddings, refiner, head, the blocks that fit) and its ring of slots stay on the device
throughout; the blocks that do not fit stream through the slots every step (framepack_engine.runtime.offload). Each other model is
`device` (stays), `offload` (visits the device for its phase, then its tensors point back at the host copy) or, for
the Llama, `stream` (its layers stream through their own slots while prompts are encoded). Priorities follow what a
byte buys: DiT blocks first (they are read every step), then the VAE and SigLIP, then the text encoders (once per
generation). Bytes are counted from the actual tensors (sum of nbytes), so quantized blocks plan as what they are.

A budget that cannot work is refused before anything moves, naming the smallest budget that can.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Iterable

import torch

from framepack_engine.errors import FramePackError
from framepack_engine.runtime.host_memory import proc_bytes

GiB = 2**30
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
class SectionWork:
    """What one section needs on the device besides the weights, as the models count it."""

    tokens: int  # packed tokens of one DiT call
    dit_activation_bytes: int
    vae_floor_bytes: int = 0  # the working set of the VAE decode's most tiled plan


@dataclass(frozen=True)
class Footprint:
    """What the planner needs to know of an engine's models (any of the encoders and the VAE may be absent), as
    plain numbers: framepack_engine.models.footprints builds it from the models.

    section_work(resolution=, latent_window_size=, size=, text_tokens=, image_tokens=) sizes one section of a
    request (None token counts: the longest the models take)."""

    dit: Component
    section_work: Callable[..., SectionWork]
    text_encoder: Component | None = None  # Llama (blocks: its layers) with CLIP-L in other_bytes
    image_encoder: Component | None = None
    vae: Component | None = None


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
                text_tokens: int | None = None, image_tokens: int | None = None,
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
    work = footprint.section_work(resolution=resolution, latent_window_size=latent_window_size, size=size,
                                  text_tokens=text_tokens, image_tokens=image_tokens)
    activations, vae_floor = work.dit_activation_bytes, work.vae_floor_bytes
    optional = {name: getattr(footprint, name) for name in PLACEMENT_CHOICES if getattr(footprint, name) is not None}

    def phases(choice: _Choice) -> dict:
        streamed = [index for index in range(len(blocks)) if index not in choice.resident]
        slots = min(choice.prefetch + 1, len(streamed)) if streamed else 0
        slot = dit.slot_for(streamed)
        # The DiT's slots are given back while the encoders run (framepack_engine.runtime.placement.Placement.use).
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
            f"({work.tokens} tokens per section): the smallest budget that works is "
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
        size=tuple(size) if size is not None else None, tokens=work.tokens, resident_blocks=choice.resident, streamed_blocks=streamed,
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


