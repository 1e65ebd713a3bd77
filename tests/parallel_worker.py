"""The ranks of tests/test_parallel.py: each runs a list of cases in one process group and saves what it saw.

Imported by a forkserver that preloads it (so the heavy imports happen once, not once per rank); each rank is a
fork of that server, joined to the others by the same environment torchrun gives (RANK, WORLD_SIZE, MASTER_*).
"""

from __future__ import annotations

import os
import signal
import time
import traceback

import torch

from framepack_engine.models.history import HistoryContext
from framepack_engine.models.presets import TINY_DIT_CONFIG, tiny_dit
from framepack_engine.pipeline import Engine
from framepack_engine.runtime.distributed import ParallelError, init_parallel
from framepack_engine.runtime.ulysses import SequenceParallel, ShardPlan

# The preset's encoders import transformers' model classes lazily: imported here, they are in the forkserver.
import transformers  # noqa: F401
from transformers import CLIPTextModel, LlamaModel, SiglipVisionModel  # noqa: F401


def dit_inputs(batch: int = 2, text_lengths=(8, 4), seed: int = 0) -> dict:
    """Random inputs of one model call (never zeros): 2 noisy frames at 8x8 latents with a 1x/2x/4x history, a
    batch whose prompts differ in length (so valid_lengths masks one sample's padding)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator)

    longest = max(text_lengths)
    mask = torch.stack([torch.arange(longest) < length for length in text_lengths]).long()
    history = HistoryContext.of(clean=(randn(batch, 16, 2, 8, 8), torch.tensor([0, 3])),
                                clean_2x=(randn(batch, 16, 2, 8, 8), torch.tensor([4, 5])),
                                clean_4x=(randn(batch, 16, 16, 8, 8), torch.arange(6, 22)))
    return {"latents": randn(batch, 16, 2, 8, 8), "timestep": torch.tensor([700.0, 300.0][:batch]),
            "text": randn(batch, longest, TINY_DIT_CONFIG["text_embed_dim"]), "text_mask": mask,
            "pooled_text": randn(batch, TINY_DIT_CONFIG["pooled_projection_dim"]),
            "guidance": torch.full((batch,), 10000.0), "latent_indices": torch.tensor([1, 2]), "history": history,
            "image_embeddings": randn(batch, 5, TINY_DIT_CONFIG["image_proj_dim"])}


def dit_case(layout, heads: int) -> dict:
    """One model call of a tiny DiT with `heads` heads, whole and sequence-parallel on this rank's group."""
    config = {**TINY_DIT_CONFIG, "num_attention_heads": heads, "num_layers": 2, "num_single_layers": 2}
    dit = tiny_dit(torch.Generator().manual_seed(heads), config)
    inputs = dit_inputs()
    with torch.no_grad():
        whole = dit.velocity(**inputs)
        tokens = dit.embed(**{k: v for k, v in inputs.items()})
        total = tokens.image.shape[1] + tokens.text.shape[1]
        dit.set_sequence_parallel(SequenceParallel(layout.world))
        layout.counter.reset()
        split = dit.velocity(**inputs)
    plan = ShardPlan(total, layout.world_size)
    return {"whole": whole, "split": split, "sent": dict(layout.counter.sent), "tokens": total,
            "shard": plan.shard, "real": [plan.real_tokens(rank) for rank in range(layout.world_size)],
            "blocks": len(dit.blocks)}


def tiny_engine(variant: str = "bidirectional", quantize: str | None = None) -> Engine:
    """The tiny preset, its DiT's block linears quantized when asked (as `--quantize` builds it)."""
    if quantize is None:
        return Engine.from_preset("tiny", variant=variant)
    from framepack_engine.resolve import resolve_models
    from framepack_engine.settings import ModelSettings

    options = {"quantize": quantize, "variant": variant, "device": "cpu"}
    return Engine.from_resolved(resolve_models(ModelSettings.from_options(**options), "tiny", given=options))


def stream_every_block(engine):
    """The DiT's blocks all streamed through two slots (framepack_engine.runtime.offload), as a small GPU's plan
    would have them: returns the placement (close it to put them back)."""
    import dataclasses

    from framepack_engine.models.footprints import engine_footprint
    from framepack_engine.runtime.placement import DiTPlacement
    from framepack_engine.runtime.planner import plan_memory

    dit = engine.transformer
    footprint = engine_footprint(dit)
    streamed = tuple(range(len(dit.blocks)))
    plan = dataclasses.replace(plan_memory(footprint, 2**40, device="cpu", resolution=64), resident_blocks=(),
                               streamed_blocks=streamed, prefetch=1, slots=2,
                               slot_bytes=footprint.dit.slot_for(streamed), source="mmap")
    return DiTPlacement(dit, plan, "cpu")


class HangAt:
    """A callback that stops answering (sleeps `seconds`) at a step of the first section."""

    def __init__(self, step: int, seconds: float):
        self.step, self.seconds, self.started = step, seconds, None

    def __call__(self, info):
        if info["section"] == 0 and info["i"] == self.step:
            self.started = time.time()  # the wall clock, which the other rank's process shares
            time.sleep(self.seconds)


class KillAt:
    """A callback that kills this process (SIGKILL: no goodbye to the others) at a step of the first section."""

    def __init__(self, step: int):
        self.step = step

    def __call__(self, info):
        if info["section"] == 0 and info["i"] == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def run_rank(rank: int, world: int, port: int, out_dir: str, cases: list, timeout: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results, path = {}, os.path.join(out_dir, f"rank{rank}.pt")
    try:
        layout = init_parallel("cpu", timeout=timeout)
        for name, kind, options in cases:
            torch.save(results, path)  # what a rank killed in the next case leaves
            if kind == "dit":
                results[name] = dit_case(layout, **options)
                continue
            if kind == "bench":
                from framepack_engine.commands.bench import BenchSettings
                from framepack_engine.commands.bench_parallel import bench_ranks

                results[name] = bench_ranks(BenchSettings(**options).validate(), layout, lambda message: None)
                continue
            engine = tiny_engine(options.pop("variant", "bidirectional"), options.pop("quantize", None))
            engine.set_parallel(layout)
            kill, hang = options.pop("kill_rank", None), options.pop("hang_rank", None)
            callback = KillAt(1) if kill == rank else HangAt(0, 2 * timeout) if hang == rank else None
            placement = stream_every_block(engine) if options.pop("stream_every_block", False) else None
            layout.counter.reset()
            started = time.monotonic()
            try:
                video = engine.generate("a cat walks", callback=callback, **options)
                results[name] = {"latents": video.latents, "frames": len(video.frames), "stats": video.stats,
                                 "pixels": torch.from_numpy(video.frames),
                                 "parallel": video.metadata.get("parallel"), "sent": dict(layout.counter.sent),
                                 "streamed_passes": placement.streamer.stats.passes if placement else 0}
                if placement is not None:
                    placement.close()
            except ParallelError as error:
                results[name] = {"error": str(error), "seconds": time.monotonic() - started, "failed_at": time.time(),
                                 "hung_at": getattr(callback, "started", None)}
                break  # the group is broken: nothing more can run in it
    except Exception:  # anything else is the test's failure, told in full
        results["crash"] = traceback.format_exc()
    torch.save(results, path)
