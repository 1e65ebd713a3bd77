"""Block streaming: a model's blocks keep their weights on the host and visit the device one after the other.

The streamed blocks' weights stay where loading put them: memory-mapped safetensors (no second host copy) or, when the
memory planner finds host RAM for it, one pinned buffer per block. The device holds a small ring of slots, each as
large as the largest block. While block i computes, a worker copies block i+1 (up to `prefetch` blocks ahead) into
the next slot; a slot is refilled only after the block that used it has finished.

On CUDA the copies run on a side stream and the order is kept by events: a block's compute waits for its slot's
"ready" event, the slot's next copy waits for its "free" event; the host never synchronises the whole device. Bytes
from a memory-mapped file go through a pinned staging buffer laid out like a slot, so each block crosses the bus in
one copy. On the CPU the same code runs with host buffers as slots: the worker thread reads the next block's pages
from the mapped file while the current block computes.

A block's tensors are found generically (every parameter and buffer, whatever its dtype: a quantized linear's int8
or float8 storage and its scales stream as they are), and are swapped in by pointing each tensor's `.data` at its
place in the slot, so the model's own code runs unchanged.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
import torch.nn as nn

# Each tensor starts at a multiple of this many bytes inside a slot (what vectorised CUDA kernels want).
ALIGNMENT = 256
# Dtypes a `dtype=` conversion applies to; quantized storage (int8, float8, packed int4) is never converted.
CONVERTIBLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _align(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


def pinned_buffer(nbytes: int) -> torch.Tensor:
    """Page-locked host bytes (what a copy to a CUDA device reads at full speed and without blocking)."""
    with torch.inference_mode(False):
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


def owned_tensors(module: nn.Module, skip: Iterable[nn.Module] = ()) -> list[torch.Tensor]:
    """Every parameter and buffer of `module` and its submodules, once each, leaving out those of `skip` modules."""
    skipped = {id(sub) for root in skip for sub in root.modules()}
    seen, tensors = set(), []
    for sub in module.modules():
        if id(sub) in skipped:
            continue
        for tensor in (*sub._parameters.values(), *sub._buffers.values()):
            if tensor is not None and id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


def target_dtype(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None and tensor.dtype in CONVERTIBLE_DTYPES else tensor.dtype


def target_dtypes(module: nn.Module, tensors: list[torch.Tensor], dtype: torch.dtype | None) -> list[torch.dtype]:
    """The dtype each tensor takes on the device: `dtype` for floating-point ones, except the tensors a quantized
    layer lists as its storage (`stored_tensors()`: values, scales, zero points), whose dtypes are its format."""
    stored = set()
    if dtype is not None:
        for sub in module.modules():
            if callable(getattr(sub, "stored_tensors", None)):
                stored.update(id(tensor) for tensor in sub.stored_tensors())
    return [tensor.dtype if id(tensor) in stored else target_dtype(tensor, dtype) for tensor in tensors]


def tensor_bytes(module: nn.Module, dtype: torch.dtype | None = None, skip: Iterable[nn.Module] = ()) -> int:
    """Bytes of the module's tensors as they are (or as `dtype` would make its floating-point ones)."""
    return _Layout(module, dtype, skip).nbytes


def slot_bytes(block: nn.Module, dtype: torch.dtype | None = None, skip: Iterable[nn.Module] = ()) -> int:
    """Bytes of a slot that holds `block` (but its `skip` modules): its tensors, each at an ALIGNMENT boundary."""
    return _Layout(block, dtype, skip).size


class ModuleHome:
    """A module's tensors kept where loading put them (the host), copied to the device while it is in use.

    `to_host` points the module back at the host tensors and drops the device copies, so moving a model off the
    device costs no host memory and no copy when it was loaded from a memory-mapped file. A tensor given a new value
    while on the device (a LoRA fused at run time swaps in a new tensor) becomes the host tensor instead.
    """

    def __init__(self, module: nn.Module, device, dtype: torch.dtype | None = None, skip: Iterable[nn.Module] = ()):
        self.tensors = owned_tensors(module, skip)
        self.host = [tensor.data for tensor in self.tensors]
        self.dtypes = target_dtypes(module, self.tensors, dtype)
        self.device = torch.device(device)
        self.on_device = False
        self._placed: list[int] = []  # data pointers of the copies to_device made

    def to_device(self) -> None:
        if self.on_device:
            return
        before = [tensor.data for tensor in self.tensors]
        try:
            with torch.inference_mode(False):  # device copies usable outside inference mode too
                for tensor, host, place in zip(self.tensors, self.host, self.dtypes):
                    tensor.data = host.to(self.device, place)
        except BaseException:  # out of memory half-way: the copies made so far would stay with nothing to free them
            for tensor, data in zip(self.tensors, before):
                tensor.data = data
            raise
        self._placed = [tensor.data_ptr() for tensor in self.tensors]
        self.on_device = True

    def to_host(self) -> None:
        for index, tensor in enumerate(self.tensors):
            current = tensor.data
            if self.on_device and current.data_ptr() != self._placed[index]:
                self.host[index] = current.to("cpu", self.host[index].dtype)  # no copy when already that
            tensor.data = self.host[index]
        self.on_device = False

    @contextlib.contextmanager
    def in_use(self, stay: bool = False):
        """On the device inside the block; back on the host after it unless `stay` (or it was there before)."""
        was_there = self.on_device
        self.to_device()
        try:
            yield
        finally:
            if not (stay or was_there):
                self.to_host()


class _Layout:
    """Where each tensor of one block lives inside a slot (or a staging or pinned buffer laid out the same way).

    The host side is read from the tensors when a slot is filled, so a weight that was given a new host tensor
    between visits (a LoRA fused at run time) streams as it is now.
    """

    def __init__(self, block: nn.Module, dtype: torch.dtype | None, skip: Iterable[nn.Module] = ()):
        self.tensors = owned_tensors(block, skip)
        self.places = []  # (offset, nbytes, dtype, shape)
        offset = 0
        for tensor, place_dtype in zip(self.tensors, target_dtypes(block, self.tensors, dtype)):
            nbytes = tensor.numel() * place_dtype.itemsize
            self.places.append((offset, nbytes, place_dtype, tensor.shape))
            offset = _align(offset + nbytes)
        self.size = offset  # bytes of a buffer that holds this block
        self.nbytes = sum(place[1] for place in self.places)  # bytes the block's tensors take (moved per visit)

    def views(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [buffer[offset:offset + nbytes].view(place_dtype).view(shape)
                for offset, nbytes, place_dtype, shape in self.places]

    def fill(self, buffer: torch.Tensor) -> None:
        """Copies the block's host tensors into `buffer` (reading a memory-mapped file's pages as it goes)."""
        for view, tensor in zip(self.views(buffer), self.tensors):
            view.copy_(tensor.data)


def _copy_worker(streamer_ref: weakref.ref, jobs: queue.Queue) -> None:
    """The worker thread's body. It holds the streamer only while it runs a job, so a streamer dropped without
    close() (and the model its layouts reach) can be collected; its finalizer then ends the thread."""
    streamer = streamer_ref()
    if streamer is None or not streamer._prepare_worker():
        return
    del streamer
    while (job := jobs.get()) is not None:
        streamer = streamer_ref()
        if streamer is None:
            return
        streamer._run_job(job)
        del streamer


# Slot states.
FREE, FILLING, READY, IN_USE = "free", "filling", "ready", "in use"


class _Slot:
    def __init__(self, index: int, buffer: torch.Tensor, cuda: bool):
        self.index = index
        self.buffer = buffer
        self.state = FREE
        self.position = -1  # which streamed block (position in run order) it holds
        self.ready = torch.cuda.Event() if cuda else None
        self.free = torch.cuda.Event() if cuda else None


@dataclass
class StreamStats:
    """What the streamer did since it was made (or since `reset_stats`)."""

    bytes_streamed: int = 0  # bytes copied into slots: the streamed blocks' tensor bytes, once per visit
    blocks_streamed: int = 0
    passes: int = 0  # passes over the blocks that moved weights (a skipped step makes none)
    peak_slots_in_use: int = 0  # most slots holding a block (being filled, ready or computing) at once
    compute_waits: int = 0  # times a block's compute waited for its copy (the copies are the bottleneck)
    compute_wait_seconds: float = 0.0
    prefetch_waits: int = 0  # times the prefetch waited for a slot to be released by the block computing in it
    prefetch_wait_seconds: float = 0.0


class BlockStreamer:
    """Hands out blocks in run order with their weights on `device`; `dit.set_block_stream(streamer)` plugs it in.

    blocks: every block in run order. streamed: the indices that stream (default: all); the others are copied to
    the device once and stay. prefetch: how many blocks ahead the copies run (slots = prefetch + 1). pinned: keep
    each streamed block in its own pinned host buffer (fastest copies, costs host RAM; CUDA only) instead of reading
    the loaded (memory-mapped) tensors through pinned staging buffers. dtype: the dtype floating-point weights take
    on the device (None: as loaded; quantized storage is never converted). keep: parts of the blocks that run
    outside the block loop (TeaCache's modulation of the first block): they stay on the device.

    Use it as `stream(blocks)` (an iterator, the DiT's seam) or through `attach_hooks()` for a model that runs its own
    loop over the blocks (transformers' Llama). Call `close()` to put every tensor back on the host.
    """

    def __init__(self, blocks: Sequence[nn.Module], device, streamed: Iterable[int] | None = None, *,
                 prefetch: int = 1, pinned: bool = False, dtype: torch.dtype | None = None,
                 keep: Iterable[nn.Module] = (), allocate: bool = True):
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        blocks = list(blocks)
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        if self.cuda and self.device.index is None:
            # The worker thread must select the device by index (torch.cuda.set_device refuses a bare "cuda").
            self.device = torch.device("cuda", torch.cuda.current_device())
        streamed = set(range(len(blocks)) if streamed is None else streamed)
        self.order = [block for index, block in enumerate(blocks) if index in streamed]
        self.position = {id(block): position for position, block in enumerate(self.order)}
        keep = list(keep)
        self.layouts = [_Layout(block, dtype, keep) for block in self.order]
        self.residents = [ModuleHome(block, self.device, dtype, keep) for index, block in enumerate(blocks)
                          if index not in streamed] + [ModuleHome(module, self.device, dtype) for module in keep]
        for home in self.residents:
            home.to_device()
        self.prefetch = prefetch
        self.slot_count = min(prefetch + 1, len(self.order))
        self.slot_bytes = max((layout.size for layout in self.layouts), default=0)
        self.stats = StreamStats()
        self._condition = threading.Condition()
        self._slots: list[_Slot] = []
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._bound: dict[int, list[torch.Tensor]] = {}  # position -> the host tensors of a block in use
        self._pass = 0
        self._next = -1  # the position the current pass acquires next (-1: no pass under way)
        self._pending = 0  # jobs handed to the worker and not finished
        self._error: BaseException | None = None
        self._jobs: queue.Queue = queue.Queue()
        weakref.finalize(self, self._jobs.put, None)  # dropped without close(): the worker thread ends too
        self._worker: threading.Thread | None = None
        self._sources = None  # pinned per-block buffers, or None (read the loaded tensors)
        self._source_views: list[list[torch.Tensor]] = []
        # Per block: the host tensors its pinned copy was made from, pointed back at by close(). Kept while pinned:
        # the loaded ones are memory-mapped pages the system may drop, a LoRA-fused one is that layer's only copy
        # outside the pinned buffer.
        self._unpinned: list[list[torch.Tensor]] = []
        self._staging: list[torch.Tensor] = []
        self._staging_done: list[torch.cuda.Event] = []
        self._staging_next = 0
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda and self.order else None
        if pinned and self.cuda and self.order:
            self._pin_sources()
        if allocate:
            self.allocate()

    # ---- sizes -------------------------------------------------------------------------------------------------

    @property
    def streamed_bytes(self) -> int:
        """Bytes moved by one pass over the blocks: the streamed blocks' tensor bytes."""
        return sum(layout.nbytes for layout in self.layouts)

    @property
    def slot_memory_bytes(self) -> int:
        """Device bytes the ring of slots takes while allocated."""
        return sum(slot.buffer.numel() for slot in self._slots)

    @property
    def allocated(self) -> bool:
        return bool(self._slots) or not self.order

    def reset_stats(self) -> None:
        with self._condition:
            self.stats = StreamStats()

    # ---- device memory -----------------------------------------------------------------------------------------

    def allocate(self) -> None:
        """Allocates the ring of slots (and, from a memory-mapped source on CUDA, the pinned staging buffers)."""
        if self.allocated:
            return
        with torch.inference_mode(False):
            self._slots = [_Slot(index, torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device),
                                 self.cuda) for index in range(self.slot_count)]
            self._views = {(slot.index, position): layout.views(slot.buffer)
                           for slot in self._slots for position, layout in enumerate(self.layouts)
                           if position % self.slot_count == slot.index}
            if self.cuda and self._sources is None:
                # Two staging buffers: one fills from the file while the other crosses the bus.
                self._staging = [pinned_buffer(self.slot_bytes) for _ in range(2)]
                self._staging_done = [torch.cuda.Event() for _ in self._staging]

    def free(self) -> None:
        """Gives the slots' device memory back (after the work in flight); `allocate` makes them again."""
        self._abort_pass()
        if self.cuda and self._slots:
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()
        self._slots, self._views, self._staging, self._staging_done = [], {}, [], []

    def close(self) -> None:
        """Stops the worker and puts every block back on the host (resident ones included)."""
        self.free()
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        for home in self.residents:
            home.to_host()
        self._unpin_sources()

    # ---- the seams: an iterator for run_blocks, or hooks around each block's forward ----------------------------

    def __call__(self, blocks: Iterable[nn.Module]) -> Iterator[nn.Module]:
        return self._stream(blocks) if self.order else iter(blocks)

    def _stream(self, blocks):
        for block in blocks:
            if id(block) not in self.position:
                yield block
                continue
            self.acquire(block)
            try:
                yield block
            finally:
                self.release(block)

    def attach_hooks(self) -> list:
        """Streams the blocks around their own forward calls; returns the hook handles."""
        handles = []
        for block in self.order:
            handles.append(block.register_forward_pre_hook(lambda module, args: self.acquire(module)))
            handles.append(block.register_forward_hook(lambda module, args, output: self.release(module)))
        return handles

    def acquire(self, block: nn.Module) -> None:
        """Waits until `block`'s weights are in its slot and points its tensors there (prefetching the next)."""
        if not self.allocated:
            self.allocate()
        position = self.position[id(block)]
        if position != self._next:
            self._start_pass(position)
        slot = self._slots[position % self.slot_count]
        with self._condition:
            if not (slot.state == READY and slot.position == position):
                start = time.perf_counter()
                while not (slot.state == READY and slot.position == position):
                    self._raise_worker_error()
                    self._condition.wait(0.1)
                self.stats.compute_waits += 1
                self.stats.compute_wait_seconds += time.perf_counter() - start
            slot.state = IN_USE
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.ready)
        tensors = self.layouts[position].tensors
        self._bound[position] = [tensor.data for tensor in tensors]
        for tensor, view in zip(tensors, self._views[slot.index, position]):
            tensor.data = view
        self._next = position + 1

    def release(self, block: nn.Module) -> None:
        """The block's compute is issued: point its tensors back at the host and let its slot be refilled."""
        position = self.position[id(block)]
        slot = self._slots[position % self.slot_count]
        for tensor, host in zip(self.layouts[position].tensors, self._bound.pop(position)):
            tensor.data = host
        if self.cuda:
            slot.free.record(torch.cuda.current_stream(self.device))
        with self._condition:
            slot.state = FREE
            self._condition.notify_all()

    def _pin_sources(self) -> None:
        """Copies each streamed block into a pinned buffer of its own, which the copies to the device read; the
        loaded tensors stay for close() to point back at."""
        self._sources = [None] * len(self.layouts)
        self._source_views = [[] for _ in self.layouts]
        self._unpinned = [[None] * len(layout.tensors) for layout in self.layouts]
        for position in range(len(self.layouts)):
            self._refresh_source(position)

    def _unpin_sources(self) -> None:
        """Points the tensors back at the host tensors they were pinned from, so that the pinned buffers are freed
        (a later placement pins its own)."""
        for layout, views, unpinned in zip(self.layouts, self._source_views, self._unpinned):
            for tensor, view, host in zip(layout.tensors, views, unpinned):
                if tensor.data.data_ptr() == view.data_ptr():  # else given a new tensor since: it stays
                    tensor.data = host
        self._sources, self._source_views, self._unpinned = None, [], []

    def _refresh_source(self, position: int) -> None:
        """Makes a block's pinned copy hold its tensors as they are now, and points them at it. A block whose tensors
        changed since (a LoRA fused at run time gave one a new host tensor) gets a new buffer: the old one is never
        written, as its views may be held elsewhere (the LoRA keeps the weight it replaced to restore it)."""
        layout, views = self.layouts[position], self._source_views[position]
        if views and all(tensor.data.data_ptr() == view.data_ptr() for tensor, view in zip(layout.tensors, views)):
            return
        unpinned = self._unpinned[position]
        for index, tensor in enumerate(layout.tensors):
            if not views or tensor.data.data_ptr() != views[index].data_ptr():
                unpinned[index] = tensor.data  # a fused LoRA stays after close()
        source = pinned_buffer(layout.size)
        views = layout.views(source)
        for tensor, view in zip(layout.tensors, views):
            view.copy_(tensor.data)
            tensor.data = view
        self._sources[position], self._source_views[position] = source, views

    # ---- passes and the worker ---------------------------------------------------------------------------------

    def _start_pass(self, position: int) -> None:
        """Hands the worker every block of the pass from `position` on, in order; it fills each as soon as the
        slot the block goes to is free, so it runs ahead of the compute by at most `prefetch` blocks."""
        self._abort_pass()
        if self._worker is None:
            self._worker = threading.Thread(target=_copy_worker, args=(weakref.ref(self), self._jobs),
                                            name="block-streamer", daemon=True)
            self._worker.start()
        with self._condition:
            self._pass += 1
            self.stats.passes += 1
            self._pending += len(self.order) - position
        for later in range(position, len(self.order)):
            self._jobs.put((self._pass, later))

    def _abort_pass(self) -> None:
        """Ends the current pass: blocks left in use (an exception inside one) are released, queued copies of the
        pass are dropped, and every slot is free again."""
        for slot in self._slots:
            if slot.state == IN_USE:
                self.release(self.order[slot.position])
        with self._condition:
            self._pass += 1  # stale jobs see a new pass and stop
            self._condition.notify_all()
            while self._pending:
                if not self._worker.is_alive():  # its jobs will never run: drop them and start a new worker next pass
                    self._drop_queued_jobs()
                    self._worker = None
                    break
                self._condition.wait(0.1)
            for slot in self._slots:
                slot.state, slot.position = FREE, -1
            self._error = None  # a copy for the abandoned pass failed: no later pass needs it
        self._next = -1

    def _raise_worker_error(self) -> None:
        alive = self._worker.is_alive()  # read first: a worker that died has recorded its error before
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"copying a block's weights failed: {error}") from error
        if not alive:
            raise RuntimeError("the block streamer's copy worker stopped; no block can be copied to the device")

    def _drop_queued_jobs(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        self._pending = 0

    def _prepare_worker(self) -> bool:
        try:
            if self.cuda:
                torch.cuda.set_device(self.device)
        except BaseException as error:  # the thread ends; acquire() raises this instead of waiting for copies
            self._error = error
            return False
        return True

    def _run_job(self, job: tuple[int, int]) -> None:
        try:
            with torch.inference_mode(False):
                self._fill(*job)
        except BaseException as error:  # handed to the compute side, which raises it
            self._error = error
        finally:
            with self._condition:
                self._pending -= 1
                self._condition.notify_all()

    def _fill(self, pass_id: int, position: int) -> None:
        with self._condition:
            if pass_id != self._pass:  # abandoned: not even read into staging (_abort_pass waits for every job)
                return
        slot = self._slots[position % self.slot_count]
        layout = self.layouts[position]
        staging = None
        if self.cuda and self._sources is None:
            # Read the block from the file into pinned staging first: that needs no slot yet.
            staging = self._staging_next
            self._staging_next = 1 - staging
            self._staging_done[staging].synchronize()  # its previous copy to the device has finished
            layout.fill(self._staging[staging])
        with self._condition:
            if slot.state != FREE and pass_id == self._pass:
                start = time.perf_counter()
                while slot.state != FREE and pass_id == self._pass:
                    self._condition.wait(0.1)
                self.stats.prefetch_waits += 1
                self.stats.prefetch_wait_seconds += time.perf_counter() - start
            if pass_id != self._pass:
                return
            slot.state, slot.position = FILLING, position
            self.stats.peak_slots_in_use = max(self.stats.peak_slots_in_use,
                                               sum(s.state != FREE for s in self._slots))
        if self.cuda:
            if staging is None:
                self._refresh_source(position)
            source = self._sources[position] if staging is None else self._staging[staging]
            with torch.cuda.stream(self._copy_stream):
                self._copy_stream.wait_event(slot.free)  # the block that used the slot has finished computing
                slot.buffer[:layout.size].copy_(source[:layout.size], non_blocking=True)
                slot.ready.record(self._copy_stream)
                if staging is not None:
                    self._staging_done[staging].record(self._copy_stream)
        else:
            layout.fill(slot.buffer)
        with self._condition:
            slot.state = READY
            self.stats.bytes_streamed += layout.nbytes
            self.stats.blocks_streamed += 1
            self._condition.notify_all()
