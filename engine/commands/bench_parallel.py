"""`framepack bench --nproc N`: the DiT's section loop split over N ranks (Ulysses), timed per rank, with the bytes
each rank sent per step counted by the collectives themselves and checked against the formula
(framepack_engine.runtime.ulysses.volume_per_call).

Every rank builds the same random DiT (same seed) and runs the same plan on its shard of each step's sequence;
rank 0 first times the same plan in one process (the others wait), so the speedup is measured on this machine.
Rank 0 prints (and writes --json); the others print nothing.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import torch

from framepack_engine.commands.bench import (BenchSettings, _dtype_name, command_bench, environment, random_dit,
                                             random_inputs, run_plan, settings_from_args, summary, warm_up,
                                             write_json)
from framepack_engine.errors import FramePackError
from framepack_engine.models import flops as flop_counter
from framepack_engine.models.presets import DIT_PRESETS
from framepack_engine.runtime.distributed import init_parallel, launched_ranks, rank_device
from framepack_engine.runtime.ulysses import SequenceParallel, ShardPlan, padded_heads, volume_per_call


def check_parallel_settings(settings: BenchSettings, nproc: int) -> None:
    """What a parallel benchmark cannot take, refused before any rank starts."""
    if not 2 <= nproc <= 1024:
        raise FramePackError(f"--nproc must be from 2 to 1024 for a parallel benchmark, got {nproc}: leave it out "
                             "for one process.")
    if settings.cache != "none" or settings.vram_budget_gb is not None:
        raise FramePackError("--nproc times the plain section loop: leave out --cache and --vram-budget-gb (each "
                             "works per rank in framepack generate).")


def command(args) -> int:
    """`framepack bench`: with --nproc the ranks' benchmark, else the one-process one (commands/bench.py)."""
    if args.nproc is None or args.gpu_check:
        return command_bench(args)
    if args.compare:
        raise FramePackError("--nproc compares with one process by itself: leave out --compare.")
    log = (lambda message: None) if args.quiet else (lambda message: print(f"[bench] {message}", file=sys.stderr))
    return command_bench_parallel(args, settings_from_args(args), log)


def command_bench_parallel(args, settings: BenchSettings, log) -> int:
    check_parallel_settings(settings, args.nproc)
    ranks = launched_ranks()
    if ranks == 1:
        from framepack_engine.commands.launch import spawn_ranks

        return spawn_ranks(args.argv, args.nproc, args.parallel_timeout, args.signals)
    if ranks != args.nproc:
        raise FramePackError(f"--nproc {args.nproc} but the launcher started {ranks} ranks: give one of them.")
    device = settings.resolved_device()
    layout = init_parallel(rank_device(device), args.parallel_timeout)
    try:
        results = bench_ranks(dataclasses.replace(settings, device=str(layout.device)), layout,
                              log if layout.is_writer else (lambda message: None))
    finally:
        layout.close()
    if layout.is_writer:
        print(format_parallel(results))
        if args.json:
            write_json(results, Path(args.json))
            print(f"Wrote {Path(args.json).name}")
    return 0


def _timed_plan(model, settings: BenchSettings, inputs, device, dtype) -> tuple[list[float], int]:
    with torch.inference_mode():
        warm_up(model, settings, inputs, device, dtype)
        records, _ = run_plan(model, settings, inputs, settings.sections[0], device, dtype)
    steps = [seconds for record in records for seconds in record["step_seconds"]]
    return steps, records[0]["tokens"]


def bench_ranks(settings: BenchSettings, layout, log) -> dict:
    """Rank 0's one-process baseline, then every rank's share of the same plan; rank 0 gets everyone's times."""
    device = layout.device
    dtype = settings.resolved_dtype(device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    log(f"building preset {settings.preset!r} with random weights on every rank ({_dtype_name(dtype)})")
    model = random_dit(DIT_PRESETS[settings.preset], device, dtype, settings.seed, preset=settings.preset)
    model.set_attention_backend(settings.attention)
    inputs = random_inputs(model, settings, device, dtype)
    baseline, baseline_threads = None, None
    if layout.is_writer:
        log("timing one process (the other ranks wait)")
        threads = torch.get_num_threads()
        if device.type == "cpu" and not settings.threads:  # one process alone would use every core
            torch.set_num_threads(max(os.cpu_count() or 1, threads))
        baseline_threads = torch.get_num_threads()
        try:
            baseline, _ = _timed_plan(model, settings, inputs, device, dtype)
        finally:
            torch.set_num_threads(threads)
    layout.world.barrier()
    log(f"timing {layout.world_size} ranks")
    model.set_sequence_parallel(SequenceParallel(layout.world))
    layout.counter.reset()
    steps, tokens = _timed_plan(model, settings, inputs, device, dtype)
    sent = dict(layout.counter.sent)
    # Every call ran the blocks (no step cache here): the warm-up's and the plan's.
    calls = settings.steps * settings.sections[0] + settings.warmup
    mean = torch.tensor([summary(steps)["mean"], sum(sent.values()) / calls], dtype=torch.float64)
    if device.type == "cuda":
        mean = mean.to(device)
    gathered = layout.world.all_gather(mean[None], dim=0, kind="report").cpu()
    config = model.config
    element_size = torch.empty((), dtype=dtype).element_size()
    expected = volume_per_call(tokens, config.num_attention_heads, config.attention_head_dim, len(model.blocks),
                               layout.world_size, element_size)
    plan = ShardPlan(tokens, layout.world_size)
    step_flops = flop_counter.step_flops(config, flop_counter.section_packed_sequence(
        config, settings.latent_window_size, inputs.latent_height, inputs.latent_width, inputs.text_tokens,
        inputs.image_tokens))
    described, versions = environment(device)
    return {
        "schema": "framepack-bench-parallel/1", "settings": {**dataclasses.asdict(settings),
                                                               "sections": list(settings.sections)},
        "device": described, "versions": versions, "world_size": layout.world_size,
        "backend": layout.describe()["backend"], "torch_threads": torch.get_num_threads(),
        "tokens": tokens, "shard_tokens": plan.shard, "padding_tokens": plan.padding,
        "heads": config.num_attention_heads, "padded_heads": padded_heads(config.num_attention_heads,
                                                                          layout.world_size),
        "flops_per_step": step_flops.total,
        "one_process_seconds_per_step": None if baseline is None else summary(baseline),
        "one_process_threads": baseline_threads,
        "rank_seconds_per_step": [float(row[0]) for row in gathered],
        "rank_bytes_per_step": [float(row[1]) for row in gathered],
        "bytes_per_step": {kind: value / calls for kind, value in sent.items()},
        "formula_bytes_per_step": expected,
        "bytes_match_formula": {kind: sent.get(kind, 0) == value * calls for kind, value in expected.items()},
        "speedup": (None if baseline is None
                    else summary(baseline)["mean"] / max(float(row[0]) for row in gathered)),
    }


def _bytes(value: float) -> str:
    return f"{value / 2**20:.2f} MiB" if value >= 2**20 else f"{value / 2**10:.1f} KiB"


def format_parallel(results: dict) -> str:
    settings = results["settings"]
    one = results["one_process_seconds_per_step"]["mean"]
    lines = [
        f"framepack bench --nproc {results['world_size']} ({results['backend']}), preset {settings['preset']}, "
        f"{results['device']['name']}, {settings['resolution']} px, {settings['steps']} steps, "
        f"{results['torch_threads']} threads per rank",
        f"tokens per step {results['tokens']} -> {results['shard_tokens']} per rank ({results['padding_tokens']} "
        f"padding); heads {results['heads']} (padded to {results['padded_heads']})",
        f"one process: {one * 1e3:.1f} ms/step ({results['one_process_threads']} threads)",
    ]
    for rank, (seconds, sent) in enumerate(zip(results["rank_seconds_per_step"], results["rank_bytes_per_step"])):
        lines.append(f"rank {rank}: {seconds * 1e3:.1f} ms/step, sent {_bytes(sent)}/step")
    formula = results["formula_bytes_per_step"]
    lines.append("per step and rank: " + ", ".join(
        f"{kind} {_bytes(results['bytes_per_step'].get(kind, 0))} (formula {_bytes(value)}, "
        f"{'equal' if results['bytes_match_formula'][kind] else 'DIFFERENT'})" for kind, value in formula.items()))
    lines.append(f"speedup over one process on this machine: x{results['speedup']:.2f}")
    return "\n".join(lines)


__all__ = ["bench_ranks", "check_parallel_settings", "command", "command_bench_parallel", "format_parallel"]
