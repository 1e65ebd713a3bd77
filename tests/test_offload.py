"""Block streaming (engine/offload.py): streamed output is bit-identical to resident output, the bytes moved are the
streamed blocks' bytes, and no slot is refilled while the block using it computes."""

import dataclasses
import time
import types

import pytest
import torch
import torch.nn as nn

from framepack_engine.commands.bench import BenchSettings, random_dit, random_inputs
from framepack_engine.runtime.placement import DiTPlacement
from framepack_engine.models.footprints import engine_footprint
from framepack_engine.runtime.planner import plan_memory
from framepack_engine.runtime.offload import BlockStreamer, ModuleHome, owned_tensors, tensor_bytes
from framepack_engine.models.presets import DIT_PRESETS, tiny_text_encoder
from framepack_engine.generation.runner import SamplingOptions, run_sections
from framepack_engine.generation.sections import initial_history, plan_sections
from framepack_engine.generation.step_cache import StepCaches


def sample(dit, variant, inputs, *, sections=2, steps=4, window=2, cache=False):
    """Every section's generated latents through the engine's section loop, and the step caches used (TeaCache with
    a threshold that skips every step it may: the first and last of a section run the blocks)."""
    plan = plan_sections(variant, sections, window)
    caches = StepCaches.teacache(steps, threshold=1e9) if cache else None
    outputs = run_sections(dit, plan, inputs.for_plan(sections), SamplingOptions(steps=steps, latent_window_size=window),
                           torch.Generator().manual_seed(5), initial_history(variant, inputs.section_inputs.start_latent),
                           device=torch.device("cpu"), dtype=dit.compute_dtype, make_step_cache=caches)
    generated = [output.generated for output in outputs]
    counts = [caches.counts(index) for index in range(sections)] if cache else []
    return generated, sum(count["cache_steps_skipped"] for count in counts), sum(
        count["cache_steps_computed"] for count in counts)


def streaming_plan(dit, prefetch=1, resident=()):
    footprint = engine_footprint(dit)
    plan = plan_memory(footprint, 2**40, device="cpu", resolution=64)
    streamed = tuple(i for i in range(len(dit.blocks)) if i not in resident)
    return dataclasses.replace(plan, resident_blocks=tuple(resident), streamed_blocks=streamed, prefetch=prefetch,
                               slots=min(prefetch + 1, len(streamed)), slot_bytes=footprint.dit.slot_for(streamed),
                               source="mmap")


def streamed_bytes(dit, indices):
    """What streaming those blocks moves: their tensors but the parts kept on the device (TeaCache's modulation)."""
    kept = dit.modules_used_outside_blocks()
    return sum(tensor.nbytes for index in indices for tensor in owned_tensors(dit.blocks[index], kept))


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
@pytest.mark.parametrize("cache", [False, True])
def test_streamed_sections_are_bit_identical_to_resident(variant, cache):
    dit = random_dit({**DIT_PRESETS["tiny"], "num_layers": 2, "num_single_layers": 3}, torch.device("cpu"),
                     torch.float32, seed=1)
    inputs = random_inputs(dit, BenchSettings(preset="tiny", resolution=64, latent_window_size=2, prompt_tokens=7),
                           torch.device("cpu"), torch.float32)
    inputs.section_inputs.image_embeddings = inputs.section_inputs.image_embeddings[:, :24]  # fewer tokens: faster
    resident, resident_skipped, _ = sample(dit, variant, inputs, cache=cache)
    plan = streaming_plan(dit, prefetch=1, resident=(1,))
    placement = DiTPlacement(dit, plan, "cpu")
    try:
        streamed, skipped, computed = sample(dit, variant, inputs, cache=cache)
        stats = placement.streamer.stats
    finally:
        placement.close()
    for expected, actual in zip(resident, streamed):
        assert torch.equal(expected, actual)
    model_calls = 2 * 4
    assert (skipped > 0) == cache and skipped == resident_skipped and (computed + skipped == model_calls or not cache)
    # Only the passes that ran the blocks moved weights: a skipped step moves none.
    assert stats.passes == model_calls - skipped
    assert stats.bytes_streamed == (model_calls - skipped) * streamed_bytes(dit, plan.streamed_blocks)
    assert stats.peak_slots_in_use <= plan.slots == 2
    # close() put every tensor back where loading put it: the model runs as before.
    again, _, _ = sample(dit, variant, inputs, cache=cache)
    assert all(torch.equal(a, b) for a, b in zip(resident, again))


@pytest.mark.parametrize("mode", ["fused", "live"])
def test_a_lora_loaded_while_blocks_stream_reaches_them(tmp_path, mode):
    from framepack_engine.runtime.lora import LoraSet
    from tests.utils import TINY_CONFIG, section_inputs
    from tests.test_lora import write_kohya

    dit = random_dit(TINY_CONFIG, torch.device("cpu"), torch.float32, seed=2)
    inputs = section_inputs(TINY_CONFIG)
    generator = torch.Generator().manual_seed(3)
    layers = dit.linear_layers()
    adapters = {}
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.ff.net.2", "single_transformer_blocks.0.proj_out",
                 "single_transformer_blocks.1.proj_mlp"):
        out_features, in_features = layers[name].out_features, layers[name].in_features
        adapters[name] = (torch.randn(2, in_features, generator=generator) / in_features ** 0.5,
                          torch.randn(out_features, 2, generator=generator) * 0.5, 2.0)
    path = write_kohya(tmp_path / "lora.safetensors", adapters)

    def run():
        with torch.no_grad():
            return dit(**inputs, return_dict=False)[0]

    plain = run()
    loras = LoraSet(dit)
    name = loras.load(path, 0.8, mode=mode)
    expected = run()
    loras.unload(name)
    assert not torch.equal(plain, expected)
    placement = DiTPlacement(dit, streaming_plan(dit, prefetch=1, resident=(1,)), "cpu")  # block 1 resident
    try:
        assert torch.equal(run(), plain)
        name = loras.load(path, 0.8, mode=mode)  # after placing: streamed blocks pick it up at their next copy
        assert torch.equal(run(), expected)
        loras.unload(name)
        assert torch.equal(run(), plain)
        loras.load(path, 0.8, mode=mode)
    finally:
        placement.close()
    assert torch.equal(run(), expected)  # back on the host, the LoRA stays


def test_a_lora_fused_into_pinned_blocks_unloads_and_reloads_exactly(tmp_path, monkeypatch):
    """Pinned source (the CUDA path; plain host buffers stand in for the pinned ones here): the copy made before each
    pass of a block whose weight a LoRA changed must not overwrite the original the LoRA keeps to restore."""
    import framepack_engine.runtime.offload as offload
    from framepack_engine.runtime.lora import LoraSet
    from tests.utils import TINY_CONFIG
    from tests.test_lora import write_kohya

    monkeypatch.setattr(offload, "pinned_buffer", lambda nbytes: torch.empty(nbytes, dtype=torch.uint8))
    dit = random_dit(TINY_CONFIG, torch.device("cpu"), torch.float32, seed=2)
    target = "transformer_blocks.1.ff.net.2"
    layer = dit.linear_layers()[target]
    generator = torch.Generator().manual_seed(0)
    path = write_kohya(tmp_path / "lora.safetensors", {target: (torch.randn(2, layer.in_features, generator=generator),
                                                                torch.randn(layer.out_features, 2, generator=generator),
                                                                2.0)})
    streamer = BlockStreamer(dit.blocks, "cpu", prefetch=1, keep=dit.modules_used_outside_blocks(), allocate=False)
    streamer._pin_sources()  # what __init__ does with pinned=True on CUDA
    position = streamer.position[id(dit.blocks[1])]
    original = layer.weight.detach().clone()
    loras = LoraSet(dit)
    name = loras.load(path, 1.0, mode="fused")
    fused = layer.weight.detach().clone()
    streamer._refresh_source(position)  # before the block's next copy to the device
    loras.unload(name)
    streamer._refresh_source(position)
    assert torch.equal(layer.weight, original)
    loras.load(path, 1.0, mode="fused")
    streamer._refresh_source(position)
    assert not torch.equal(fused, original) and torch.equal(layer.weight, fused)
    streamer.close()


def test_close_points_pinned_blocks_back_at_their_loaded_tensors(monkeypatch):
    """After close() no weight lives in the streamer's pinned buffers (so a re-plan does not pin a second copy while
    the first can never be freed); a weight changed since pinning keeps its new values. Plain host buffers stand in
    for the pinned ones."""
    import framepack_engine.runtime.offload as offload

    pinned = []

    def host_buffer(nbytes):
        pinned.append(torch.empty(nbytes, dtype=torch.uint8))
        return pinned[-1]

    monkeypatch.setattr(offload, "pinned_buffer", host_buffer)
    blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(3)])
    loaded = [block.weight.data_ptr() for block in blocks]
    streamer = BlockStreamer(blocks, "cpu", prefetch=1, allocate=False)
    streamer._pin_sources()  # what __init__ does with pinned=True on CUDA
    assert all(block.weight.data_ptr() != pointer for block, pointer in zip(blocks, loaded))
    changed = torch.randn(64, 64)
    blocks[1].weight.data = changed.clone()  # as a fused LoRA does
    streamer._refresh_source(1)
    streamer.close()

    def in_pinned(tensor):
        return any(buffer.data_ptr() <= tensor.data_ptr() < buffer.data_ptr() + buffer.numel() for buffer in pinned)

    assert not any(in_pinned(tensor) for tensor in blocks.parameters())
    assert blocks[0].weight.data_ptr() == loaded[0] and blocks[2].weight.data_ptr() == loaded[2]
    assert torch.equal(blocks[1].weight, changed)


def test_a_lora_fused_into_a_block_on_the_device_stays_when_it_goes_back_to_the_host(tmp_path):
    """A resident block (ModuleHome) on the device when a LoRA is fused: moving it back to the host (a re-plan) keeps
    the fused weight, and unloading then restores the original. The device copy is a float64 one here, a distinct
    tensor as on CUDA."""
    from framepack_engine.runtime.lora import LoraSet
    from tests.utils import TINY_CONFIG
    from tests.test_lora import write_kohya

    target = "transformer_blocks.1.ff.net.2"
    dit, reference = (random_dit(TINY_CONFIG, torch.device("cpu"), torch.float32, seed=2) for _ in range(2))
    layer = dit.linear_layers()[target]
    generator = torch.Generator().manual_seed(0)
    path = write_kohya(tmp_path / "lora.safetensors", {target: (torch.randn(2, layer.in_features, generator=generator),
                                                                torch.randn(layer.out_features, 2, generator=generator),
                                                                2.0)})
    LoraSet(reference).load(path, 1.0, mode="fused")
    fused, original = reference.linear_layers()[target].weight.detach(), layer.weight.detach().clone()
    home = ModuleHome(dit.blocks[1], "cpu", torch.float64)
    home.to_device()
    loras = LoraSet(dit)
    name = loras.load(path, 1.0, mode="fused")
    home.to_host()
    assert layer.weight.dtype == torch.float32 and torch.equal(layer.weight, fused)
    assert not torch.equal(fused, original)
    home.to_device()
    assert torch.equal(layer.weight, fused.double())  # the next placement carries it
    home.to_host()
    loras.unload(name)
    assert torch.equal(layer.weight, original)


@pytest.mark.gpu
def test_a_lora_fused_on_a_cuda_resident_layer_survives_to_host():
    from framepack_engine.runtime.lora import _put

    layer = nn.Linear(16, 16)
    home = ModuleHome(layer, "cuda")
    home.to_device()
    fused = torch.randn(16, 16)
    _put(layer.weight, fused.cuda())
    home.to_host()
    assert layer.weight.device.type == "cpu" and torch.equal(layer.weight, fused)


@pytest.mark.slow
def test_small_preset_streams_bit_identically_in_bfloat16():
    dit = random_dit(DIT_PRESETS["small"], torch.device("cpu"), torch.bfloat16, seed=0)
    inputs = random_inputs(dit, BenchSettings(preset="small", resolution=16, latent_window_size=1, prompt_tokens=4),
                           torch.device("cpu"), torch.bfloat16)
    prompt = inputs.section_inputs.prompts[0]
    latents = torch.randn(1, 16, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    image_embeddings = inputs.section_inputs.image_embeddings[:, :8]

    def call():
        with torch.inference_mode():
            return dit.velocity(latents, torch.tensor([700.0]), prompt.llama, None, prompt.clip_pooled,
                                torch.tensor([10000.0]), None, None, image_embeddings)

    resident = call()
    plan = streaming_plan(dit, prefetch=2)
    placement = DiTPlacement(dit, plan, "cpu")
    try:
        streamed = call()
        assert placement.streamer.stats.bytes_streamed == streamed_bytes(dit, range(60))
        assert placement.streamer.slot_memory_bytes == 3 * plan.slot_bytes
    finally:
        placement.close()
    assert torch.equal(resident, streamed)


class QuantizedLinear(nn.Module):
    """A linear whose weight is stored as int8 (a buffer) with a float32 per-row scale (a parameter), beside a
    float8 parameter and a bool buffer: the shapes of storage the quantization issue's modules hold."""

    def __init__(self, features, generator):
        super().__init__()
        weight = torch.randn(features, features, generator=generator)
        scale = weight.abs().amax(dim=1, keepdim=True) / 127
        self.register_buffer("weight_int8", (weight / scale).round().to(torch.int8))
        self.scale = nn.Parameter(scale, requires_grad=False)
        self.bias_fp8 = nn.Parameter(torch.randn(features, generator=generator).to(torch.float8_e4m3fn),
                                     requires_grad=False)
        self.register_buffer("use_bias", torch.tensor(True))

    def forward(self, x):
        y = x @ (self.weight_int8.float() * self.scale).T
        return torch.tanh(y + self.bias_fp8.float() if self.use_bias else y)


def run_blocks(blocks, stream, x):
    for block in stream(list(blocks)):
        x = block(x)
    return x


def test_blocks_of_any_dtype_stream_as_their_own_bytes():
    generator = torch.Generator().manual_seed(0)
    blocks = nn.ModuleList([QuantizedLinear(24, generator) for _ in range(5)])
    x = torch.randn(3, 24, generator=generator)
    expected = run_blocks(blocks, iter, x)
    streamer = BlockStreamer(blocks, "cpu", streamed=[0, 1, 3, 4], prefetch=2)
    try:
        first, second = run_blocks(blocks, streamer, x), run_blocks(blocks, streamer, x)
    finally:
        streamer.close()
    assert torch.equal(first, expected) and torch.equal(second, expected)
    per_pass = sum(t.nbytes for i in (0, 1, 3, 4) for t in [*blocks[i].parameters(), *blocks[i].buffers()])
    assert streamer.streamed_bytes == per_pass == tensor_bytes(blocks) - tensor_bytes(blocks[2])
    assert streamer.stats.bytes_streamed == 2 * per_pass
    assert blocks[0].weight_int8.dtype == torch.int8 and blocks[0].bias_fp8.dtype == torch.float8_e4m3fn


class SlowBlock(nn.Module):
    """A block that computes slowly and checks its own weights did not change while it ran."""

    def __init__(self, features, generator, seconds):
        super().__init__()
        self.linear = nn.Linear(features, features)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(features, features, generator=generator))
        self.expected = self.linear.weight.detach().clone()
        self.seconds = seconds
        self.intact = []

    def forward(self, x):
        before = torch.equal(self.linear.weight, self.expected)
        time.sleep(self.seconds)
        self.intact.append(before and torch.equal(self.linear.weight, self.expected))
        return torch.tanh(self.linear(x))


def record_timeline(monkeypatch, blocks, streamer):
    """(slot index, start, end) of every fill and of every block's compute, seen from outside the streamer."""
    import framepack_engine.runtime.offload as offload

    slot_of = {}
    fills, computes = [], []
    fill = offload._Layout.fill

    def timed_fill(layout, buffer):
        start = time.perf_counter()
        fill(layout, buffer)
        fills.append((buffer.data_ptr(), start, time.perf_counter()))

    monkeypatch.setattr(offload._Layout, "fill", timed_fill)

    for block in blocks:
        def pre(module, args):
            slot_of[module] = module.linear.weight.untyped_storage().data_ptr()
            module.started = time.perf_counter()

        def post(module, args, output):
            computes.append((slot_of[module], module.started, time.perf_counter()))

        block.register_forward_pre_hook(pre)
        block.register_forward_hook(post)
    return fills, computes


def within(seconds, function):
    """function() on a thread; a streamer that deadlocks fails the test instead of hanging it."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(1)
    try:
        return pool.submit(function).result(timeout=seconds)
    finally:
        pool.shutdown(wait=False)


def overlapping(fills, computes):
    return [(fill, compute) for fill in fills for compute in computes
            if fill[0] == compute[0] and fill[1] < compute[2] and compute[1] < fill[2]]


@pytest.mark.parametrize("prefetch", [1, 2])
def test_slow_compute_makes_the_prefetch_wait_and_no_slot_is_refilled_in_use(monkeypatch, prefetch):
    generator = torch.Generator().manual_seed(0)
    blocks = nn.ModuleList([SlowBlock(32, generator, seconds=0.03) for _ in range(6)])
    x = torch.randn(2, 32, generator=generator)
    expected = run_blocks(blocks, iter, x)
    streamer = BlockStreamer(blocks, "cpu", prefetch=prefetch)
    fills, computes = record_timeline(monkeypatch, blocks, streamer)
    try:
        outputs = within(30, lambda: [run_blocks(blocks, streamer, x) for _ in range(2)])
    finally:
        within(30, streamer.close)
    assert all(torch.equal(output, expected) for output in outputs)
    assert all(all(block.intact) for block in blocks)
    assert len(fills) == 12 and len(computes) == 12
    assert not overlapping(fills, computes)
    assert streamer.stats.prefetch_waits >= 6 - (prefetch + 1)  # the worker ran ahead and waited for slots
    assert streamer.stats.peak_slots_in_use == prefetch + 1


def test_slow_copies_make_the_compute_wait(monkeypatch):
    import framepack_engine.runtime.offload as offload

    generator = torch.Generator().manual_seed(1)
    blocks = nn.ModuleList([SlowBlock(16, generator, seconds=0.0) for _ in range(4)])
    x = torch.randn(2, 16, generator=generator)
    expected = run_blocks(blocks, iter, x)
    fill = offload._Layout.fill
    monkeypatch.setattr(offload._Layout, "fill", lambda layout, buffer: (time.sleep(0.02), fill(layout, buffer)))
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    try:
        assert torch.equal(run_blocks(blocks, streamer, x), expected)
    finally:
        streamer.close()
    assert streamer.stats.compute_waits >= 3 and streamer.stats.compute_wait_seconds > 0.03


def test_a_failing_block_leaves_the_streamer_usable():
    generator = torch.Generator().manual_seed(2)
    blocks = nn.ModuleList([SlowBlock(16, generator, seconds=0.0) for _ in range(5)])
    x = torch.randn(2, 16, generator=generator)
    expected = run_blocks(blocks, iter, x)
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    try:
        with pytest.raises(RuntimeError, match="shape"):
            run_blocks(blocks, streamer, torch.randn(2, 7))  # the first block fails on a wrong width
        assert torch.equal(run_blocks(blocks, streamer, x), expected)
        assert all(slot.state == "free" for slot in streamer._slots)
    finally:
        streamer.close()


def test_an_abandoned_pass_reads_no_more_blocks_and_its_copy_error_is_not_raised_later(monkeypatch):
    import threading

    import framepack_engine.runtime.offload as offload

    generator = torch.Generator().manual_seed(3)
    blocks = nn.ModuleList([SlowBlock(16, generator, seconds=0.0) for _ in range(5)])
    x = torch.randn(2, 16, generator=generator)
    expected = run_blocks(blocks, iter, x)
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    second_block_tried = threading.Event()
    fills = []
    fill = offload._Layout.fill

    def failing_once_fill(layout, buffer):
        if layout is streamer.layouts[1] and not second_block_tried.is_set():
            second_block_tried.set()
            raise OSError("injected read error")
        time.sleep(0.02)  # every later acquire waits for its copy, so it would see a left-over error
        fills.append(layout)
        fill(layout, buffer)

    monkeypatch.setattr(offload._Layout, "fill", failing_once_fill)

    def wait_for_the_failed_copy(module, args):
        second_block_tried.wait(10)

    blocks[0].register_forward_pre_hook(wait_for_the_failed_copy)
    try:
        with pytest.raises(RuntimeError, match="shape"):
            within(30, lambda: run_blocks(blocks, streamer, torch.randn(2, 7)))  # the first block fails
        assert within(30, lambda: run_blocks(blocks, streamer, x)).equal(expected)
    finally:
        within(30, streamer.close)

    # A job of a pass that has ended returns before reading its block (the CUDA path reads into staging first).
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    streamer.cuda = True
    streamer._staging = [torch.empty(streamer.slot_bytes, dtype=torch.uint8) for _ in range(2)]
    streamer._staging_done = [types.SimpleNamespace(synchronize=lambda: None) for _ in range(2)]  # no copies pending
    fills.clear()
    streamer._fill(streamer._pass - 1, 2)
    streamer.cuda = False
    streamer.close()
    assert not fills and all(slot.state == "free" for slot in streamer._slots)


def test_a_bare_cuda_device_gets_the_current_index(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert BlockStreamer([], "cuda").device == torch.device("cuda", 3)


def test_a_worker_that_cannot_start_makes_acquire_raise_instead_of_waiting_forever():
    """The worker's first CUDA call failing (here: set_device of an index-less device, what __init__ used to keep)
    reaches the caller as an error; free() and close() still return. The CUDA flags are set on a CPU streamer: the
    failure happens before any other CUDA call."""
    blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    streamer.cuda, streamer.device = True, torch.device("cuda")
    for _ in range(2):  # the next pass starts a new worker, which fails the same way
        with pytest.raises(RuntimeError, match="copying a block's weights failed"):
            within(10, lambda: streamer.acquire(blocks[0]))
    streamer.cuda = False
    within(10, streamer.close)
    assert not streamer._pending and streamer._jobs.empty()


def test_a_streamer_dropped_without_close_lets_the_model_go_and_its_worker_ends():
    import gc
    import weakref

    blocks = nn.ModuleList([nn.Linear(32, 32) for _ in range(4)])
    streamer = BlockStreamer(blocks, "cpu", prefetch=1)
    run_blocks(blocks, streamer, torch.randn(2, 32))
    worker, block, dropped = streamer._worker, weakref.ref(blocks[0]), weakref.ref(streamer)
    del blocks, streamer
    gc.collect()
    assert dropped() is None and block() is None
    worker.join(10)
    assert not worker.is_alive()


def test_hooks_stream_the_layers_of_a_model_that_loops_itself():
    """The Llama text encoder's layers stream around their own forward calls, converted to the compute dtype."""
    encoder = tiny_text_encoder(torch.Generator().manual_seed(0))
    llama = encoder.llama_model.to(torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        expected = llama.float()(input_ids=ids, output_hidden_states=True).hidden_states
    llama.to(torch.bfloat16)
    home = ModuleHome(llama, "cpu", torch.float32, skip=[llama.layers])
    streamer = BlockStreamer(llama.layers, "cpu", prefetch=1, dtype=torch.float32)
    handles = streamer.attach_hooks()
    try:
        with torch.no_grad(), home.in_use():
            actual = llama(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        for handle in handles:
            handle.remove()
        streamer.close()
    assert all(torch.equal(a, b) for a, b in zip(actual, expected))
    assert streamer.stats.bytes_streamed == tensor_bytes(llama.layers, torch.float32)
    assert all(p.dtype == torch.bfloat16 for p in llama.parameters())  # back on the host as stored


def test_module_home_moves_without_copying_back():
    module = nn.Linear(8, 8).to(torch.bfloat16)
    host = module.weight.data
    home = ModuleHome(module, "cpu", torch.float32)
    with home.in_use():
        assert module.weight.dtype == torch.float32
    assert module.weight.data_ptr() == host.data_ptr() and not home.on_device
    with home.in_use(stay=True):
        pass
    assert home.on_device and module.weight.dtype == torch.float32
    home.to_host()
    assert module.weight.data_ptr() == host.data_ptr() and module.weight.dtype == torch.bfloat16


def test_module_home_failing_half_way_to_the_device_stays_on_the_host():
    """Out of memory on the third tensor: the two already copied are let go, the module is as before."""

    class OutOfMemoryOnMove(torch.Tensor):
        def to(self, *args, **kwargs):
            raise torch.OutOfMemoryError("out of memory (injected)")

    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    loaded = [parameter.data_ptr() for parameter in module.parameters()]
    home = ModuleHome(module, "cpu", torch.float64)  # float64 "device" copies: distinct tensors, as on CUDA
    home.host[2] = home.host[2].as_subclass(OutOfMemoryOnMove)
    with pytest.raises(torch.OutOfMemoryError):
        with home.in_use():
            pass
    assert not home.on_device
    assert [parameter.data_ptr() for parameter in module.parameters()] == loaded
    assert all(parameter.dtype == torch.float32 for parameter in module.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_streaming_is_bit_identical_and_stays_in_its_slots(pinned):
    """On a GPU: copies on the side stream, ordered by events, give the resident output bit for bit, and the device
    holds the non-block part, the slots and the activations, not the streamed blocks."""
    config = {**DIT_PRESETS["small"], "num_layers": 4, "num_single_layers": 6}
    dit = random_dit(config, torch.device("cpu"), torch.bfloat16, seed=3)
    settings = BenchSettings(preset="small", resolution=128, latent_window_size=3, prompt_tokens=20)
    device = torch.device("cuda")
    inputs = random_inputs(dit, settings, device, torch.bfloat16)
    plan = streaming_plan(dit, prefetch=1)

    def call():
        prompt = inputs.section_inputs.prompts[0]
        latents = torch.randn(1, 16, 3, 16, 16, generator=torch.Generator().manual_seed(0)).to(device)
        with torch.inference_mode():
            return dit.velocity(latents, torch.tensor([600.0], device=device), prompt.llama, None, prompt.clip_pooled,
                                torch.tensor([10000.0], device=device), None, None,
                                inputs.section_inputs.image_embeddings)

    resident = DiTPlacement(dit, dataclasses.replace(plan, streamed_blocks=(), resident_blocks=tuple(range(10))),
                            device)
    expected = call()
    resident.close()
    placement = DiTPlacement(dit, dataclasses.replace(plan, source="pinned" if pinned else "mmap"), device)
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        outputs = [call() for _ in range(3)]
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        assert placement.streamer.stats.bytes_streamed == 3 * streamed_bytes(dit, range(10))
    finally:
        placement.close()
    assert all(torch.equal(output, expected) for output in outputs)
    assert peak < streamed_bytes(dit, range(10)) / 2  # activations only: the blocks never all sit on the device


def test_quantized_storage_keeps_its_dtypes_when_the_rest_is_converted():
    """A quantized Llama streamed with dtype=float16: its float tensors convert, its int8 values and float32 scales
    stay as stored, exactly as `.to(torch.float16)` treats the resident model."""
    import copy

    from framepack_engine.runtime.quant import QuantScheme, quantize_llama

    llama = tiny_text_encoder(torch.Generator().manual_seed(4)).llama_model
    quantize_llama(llama, QuantScheme("int8"))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.no_grad():
        expected = copy.deepcopy(llama).to(torch.float16)(input_ids=ids).last_hidden_state
    home = ModuleHome(llama, "cpu", torch.float16, skip=[llama.layers])
    streamer = BlockStreamer(llama.layers, "cpu", prefetch=1, dtype=torch.float16)
    handles = streamer.attach_hooks()
    try:
        with torch.no_grad(), home.in_use():
            actual = llama(input_ids=ids).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
        streamer.close()
    assert torch.equal(actual, expected)
