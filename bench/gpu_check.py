"""One command that measures everything a GPU can tell us, sized to finish in under 8 minutes on an H100.

    python -m bench.gpu_check --out gpu_check/                   # on a machine with one CUDA device
    python -m bench.gpu_check --dry-run                          # the plan and its time estimate (any machine)
    python -m bench.gpu_check --dry-run --assume rtx4090         # ... for another card
    python -m bench.gpu_check --device cpu --tiny --out rehearsal/   # every step's code path at tiny sizes

Steps, in this order, each in its own process with its own time limit (a step that fails or hangs is recorded and
the next one runs):
  machine   GPU, memory, driver, CUDA, torch, triton, the optional backends, the engine's commit; a CPU-only torch
            on a GPU machine is refused in one line (install the CUDA build first)
  gpu_tests the tests marked `gpu`, pass/fail per test (junit XML)
  kernels   each Triton kernel against its reference and SDPA/flash at the model's shapes (bench.bench_kernels);
            writes the attention record that attention="auto" reads (framepack_kernels.verification)
  e2e       `framepack bench` on the full-size random-weight DiT at 640, 2 steps: bf16 resident, fp8 and int8
            weights, the 6 GB plan (every block streamed), TeaCache, regional compile; the plan's predicted device
            peak beside the measured one. Variants are chosen by the free memory (80 GB, 24 GB, 6 GB cards).
Writes DIR/gpu_check.json and DIR/gpu_check.md (rows ready for bench/RESULTS.md, ratios and MFU first).

The estimates (`--dry-run`) come from the analytic FLOPs of a 640p step (framepack_engine.models.flops) at an
assumed share of the card's dense bf16 peak, the bytes a streamed step copies over PCIe, and fixed costs measured
or bounded per step (start-up, Triton compiles, building and quantizing 13B random weights, torch.compile); they are
written out per step so a reader can check each one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_SECONDS = 480  # and the steps' limits add up to it: a run that hits every limit still ends in 8 minutes
GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Card:
    """What the estimates assume of a GPU."""

    name: str
    memory_gb: float
    bf16_tflops: float  # dense bf16 tensor-core peak
    pcie_gb_per_s: float  # host-to-device copy rate of pinned memory
    mfu: float = 0.4  # share of the peak a DiT step reaches (attention at 18.5k tokens, bf16)


CARDS = {
    "h100": Card("NVIDIA H100 80GB HBM3", 80, 989, 50),
    "h200": Card("NVIDIA H200", 141, 989, 50),
    "a100": Card("NVIDIA A100-SXM4-80GB", 80, 312, 25),
    "rtx4090": Card("NVIDIA GeForce RTX 4090", 24, 165, 25),
    "rtx3060": Card("NVIDIA GeForce RTX 3060 (6 GB laptop)", 6, 51, 12, mfu=0.35),
}

# Fixed costs in seconds, bounded from the CPU rehearsal and the tools' own work: interpreter and torch start-up per
# step process, Triton compiles (each kernel's kept configs, autotuned once), torch.compile of the two block kinds
# at full size, filling 13B random weights on the device, quantizing them, and pinning the streamed blocks.
STARTUP = 8
GPU_TESTS = 100
KERNEL_COMPILES = 70
KERNEL_TIMING = 20
BUILD_WEIGHTS = 6
QUANTIZE = 12
PIN_STREAMED = 15
COMPILE_BLOCKS = 75
E2E_STEPS, E2E_WARMUP = 2, 1


@dataclasses.dataclass
class Step:
    name: str
    limit: int  # seconds before the step's process is ended
    estimate: float  # seconds expected on the assumed card
    detail: str


def e2e_variants(free_gb: float) -> list[dict]:
    """The end-to-end variants that fit a card with `free_gb` of free memory (bf16 13B weights: 25.6 GB)."""
    variants = []
    if free_gb >= 40:
        variants.append({"label": "bf16 resident"})
    if free_gb >= 22:
        variants += [{"label": "fp8 weights", "quantize": "fp8"}, {"label": "int8 weights", "quantize": "int8"}]
    if free_gb >= 7:
        variants.append({"label": "6 GB plan (blocks streamed)", "vram_budget_gb": 6.0})
    if free_gb >= 40:
        variants += [{"label": "TeaCache 0.15", "cache": "teacache"}, {"label": "compiled blocks", "compile": "on"}]
    return variants or [{"label": "6 GB plan (blocks streamed)", "vram_budget_gb": min(6.0, max(free_gb - 1, 1))}]


def step_seconds(card: Card) -> tuple[float, float]:
    """(compute seconds of one full-size 640p step, seconds to copy the 6 GB plan's streamed blocks once)."""
    from framepack_engine.models.flops import section_packed_sequence, step_flops
    from framepack_engine.models.presets import FULL_DIT_CONFIG
    from framepack_engine.official import PROMPT_TOKEN_LIMIT, SIGLIP_IMAGE_TOKENS

    sequence = section_packed_sequence(FULL_DIT_CONFIG, 9, 80, 76, PROMPT_TOKEN_LIMIT, SIGLIP_IMAGE_TOKENS)
    compute = step_flops(FULL_DIT_CONFIG, sequence).total / (card.bf16_tflops * 1e12 * card.mfu)
    streamed_bytes = 21.8e9  # the planner's 6 GB plan: 58 of 60 blocks (README, "Small GPUs")
    return compute, streamed_bytes / (card.pcie_gb_per_s * 1e9)


def plan(card: Card) -> list[Step]:
    compute, stream = step_seconds(card)
    steps = [Step("machine", 20, STARTUP, "versions, GPU, driver, commit; the CUDA torch check"),
             Step("gpu_tests", 140, STARTUP + GPU_TESTS, "pytest -m gpu: kernels, CUDA ops, streaming on CUDA")]
    steps.append(Step("kernels", 110, STARTUP + KERNEL_COMPILES + KERNEL_TIMING,
                      "each kernel vs its reference and SDPA/flash at 640p (18.5k tokens, 24 heads of 128)"))
    e2e, details = STARTUP, []
    calls = E2E_STEPS + E2E_WARMUP
    for variant in e2e_variants(card.memory_gb - 1):
        seconds = BUILD_WEIGHTS + calls * compute
        if variant.get("quantize"):
            seconds += QUANTIZE
        if variant.get("vram_budget_gb"):
            seconds += PIN_STREAMED + calls * max(stream, compute)  # the copy overlaps the compute
        if variant.get("compile") == "on":
            seconds += COMPILE_BLOCKS
        e2e += seconds
        details.append(f"{variant['label']} {seconds:.0f} s")
    steps.append(Step("e2e", 210, e2e, f"{calls} calls of {compute:.2f} s each: " + ", ".join(details)))
    return steps


# --------------------------------------------------------------------------------------------------------------------
# The steps (each runs in its own process: `python -m bench.gpu_check --step NAME ...`)
# --------------------------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception:
        return None


def _gpu_present() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def step_machine(args) -> dict:
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        if _gpu_present() and torch.version.cuda is None:
            raise SystemExit(f"torch {torch.__version__} is a CPU-only build on a GPU machine: install the CUDA build "
                             "first (pip install torch==2.13.0 from PyTorch's CUDA index for your CUDA version), then the "
                             "project with -c constraints.txt.")
        raise SystemExit("No CUDA device is visible to torch: run on a GPU machine, or rehearse with --device cpu --tiny.")
    record = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
              "triton": _version("triton"), "transformers": _version("transformers"),
              "backends": {name: _version(name) for name in ("flash_attn", "xformers", "sageattention")}}
    if args.device.startswith("cuda"):
        properties = torch.cuda.get_device_properties(args.device)
        record.update(gpu=properties.name, memory_gb=round(properties.total_memory / GiB, 1),
                      architecture=f"sm_{properties.major}{properties.minor}",
                      free_gb=round(torch.cuda.mem_get_info(args.device)[0] / GiB, 1))
        query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True) if shutil.which("nvidia-smi") else None
        record["driver"] = query.stdout.strip() if query and query.returncode == 0 else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    record["commit"] = commit.stdout.strip() if commit.returncode == 0 else None
    return record


def step_gpu_tests(args) -> dict:
    junit = Path(args.out) / "gpu_tests.xml"
    selection = ["-m", "gpu", "tests"] if not args.tiny else ["tests/test_kernel_rotary.py"]
    process = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                              *selection], cwd=ROOT, capture_output=True, text=True)
    tests = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped":
                outcome = "skipped"
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0)})
    counts = {outcome: sum(test["outcome"] == outcome for test in tests) for outcome in ("passed", "failed", "skipped")}
    return {"exit_code": process.returncode, "counts": counts, "tests": tests}


def step_kernels(args) -> dict:
    import torch

    from bench import bench_kernels
    from framepack_kernels import verification

    shapes = bench_kernels.TINY if args.tiny else bench_kernels.FRAMEPACK_640P
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    report = bench_kernels.run(shapes, device=args.device, dtype=dtype, repeats=1 if args.tiny else 5)
    timings = {(record["op"], record["implementation"]): record.get("ms") for record in report["results"]
               if "skipped" not in record}
    sdpa, triton = timings.get(("attention", "sdpa")), timings.get(("attention", "triton"))
    ratio = sdpa / triton if sdpa and triton else None
    report["attention_triton_over_sdpa"] = ratio
    if args.device.startswith("cuda") and ratio is not None:
        properties = torch.cuda.get_device_properties(args.device)
        architecture = verification.architecture_name(properties.major, properties.minor)
        path = verification.attention_record_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        record = json.loads(path.read_text()) if path.is_file() else {}
        record.setdefault("attention", {})[architecture] = {"triton_over_sdpa": ratio, "gpu": properties.name,
                                                            "created": time.strftime("%Y-%m-%d")}
        path.write_text(json.dumps(record, indent=2))
        report["attention_record"] = {"architecture": architecture, "matched": ratio >= 1.0}
    return report


def smallest_budget_gb(settings) -> float:
    """The smallest device budget the memory planner accepts for `settings`' model and section."""
    from framepack_engine.commands.bench import bench_memory_plan
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.models.presets import DIT_PRESETS

    device = settings.resolved_device()
    meta = FramePackDiT.from_config(DIT_PRESETS[settings.preset], device="meta", dtype=settings.resolved_dtype(device))
    return bench_memory_plan(meta, settings, device).minimum_budget_bytes * 1.001 / GiB


def step_e2e(args) -> dict:
    import torch

    from framepack_engine.commands.bench import BenchSettings, run_benchmark

    if args.tiny:
        free_gb = 80.0  # the rehearsal runs every variant at the tiny size
    else:
        free_gb = torch.cuda.mem_get_info(args.device)[0] / GiB
    base = BenchSettings(preset="tiny" if args.tiny else "full", device=args.device, steps=E2E_STEPS,
                         warmup=E2E_WARMUP, resolution=64 if args.tiny else 640,
                         latent_window_size=2 if args.tiny else 9, matmul_size=64 if args.tiny else None)
    runs = []
    for variant in e2e_variants(free_gb):
        options = {key: value for key, value in variant.items() if key != "label"}
        if args.tiny and "vram_budget_gb" in options:  # the tiny model's smallest plan: every block streamed
            options["vram_budget_gb"] = smallest_budget_gb(dataclasses.replace(base, vram_budget_gb=1.0))
        settings = dataclasses.replace(base, **options).validate()
        start = time.perf_counter()
        try:
            result = run_benchmark(settings)
        except Exception as error:  # one variant failing (out of memory) leaves the others their turn
            runs.append({"label": variant["label"], "error": f"{type(error).__name__}: {error}"})
            continue
        run = result["runs"][0]
        plan = run.get("memory_plan") or {}
        runs.append({"label": variant["label"], "seconds": time.perf_counter() - start,
                     "seconds_per_step": run["seconds_per_step"]["median"], "mfu": run["mfu"],
                     "achieved_tflops": run["achieved_tflops"], "tokens": run["tokens"]["total_tokens"],
                     "device_peak_bytes": run["memory"]["device_peak_bytes"],
                     "planned_peak_bytes": plan.get("peak_bytes"),
                     "bytes_streamed_per_step": run["bytes_streamed_per_step"],
                     "cache_steps_skipped": run["cache_steps_skipped"], "output_finite": run["output_finite"]})
    first = next((run for run in runs if "seconds_per_step" in run), None)
    for run in runs:
        if first is not None and "seconds_per_step" in run:
            run["ratio_to_first"] = first["seconds_per_step"] / run["seconds_per_step"]
    return {"free_gb": round(free_gb, 1), "runs": runs}


STEPS = {"machine": step_machine, "gpu_tests": step_gpu_tests, "kernels": step_kernels, "e2e": step_e2e}


# --------------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------------


def run_step(name: str, limit: int, args) -> dict:
    """One step in its own process, ended at `limit` seconds; its JSON, or what went wrong."""
    command = [sys.executable, "-m", "bench.gpu_check", "--step", name, "--out", args.out, "--device", args.device]
    if args.tiny:
        command.append("--tiny")
    start = time.perf_counter()
    try:
        process = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return {"status": "timed out", "seconds": limit}
    seconds = time.perf_counter() - start
    result_file = Path(args.out) / f"step_{name}.json"
    if process.returncode != 0 or not result_file.is_file():
        lines = (process.stderr or process.stdout).strip().splitlines()
        return {"status": "failed", "seconds": seconds, "error": lines[-1] if lines else f"exit {process.returncode}"}
    return {"status": "ok", "seconds": seconds, "result": json.loads(result_file.read_text())}


def markdown(report: dict) -> str:
    machine = report["steps"].get("machine", {}).get("result", {})
    lines = [f"GPU check on {machine.get('gpu', report['device'])} ({machine.get('memory_gb', '?')} GB, driver "
             f"{machine.get('driver')}, CUDA {machine.get('cuda')}, torch {machine.get('torch')}, triton "
             f"{machine.get('triton')}), commit {machine.get('commit')}, {report['created']}", ""]
    e2e = report["steps"].get("e2e", {}).get("result")
    if e2e:
        lines += ["| variant (640p, 2 steps) | ratio to first | MFU | s/step | device peak GB (planned) |",
                  "|---|---|---|---|---|"]
        for run in e2e["runs"]:
            if "error" in run:
                lines.append(f"| {run['label']} | failed: {run['error']} | | | |")
                continue
            peak = run["device_peak_bytes"]
            planned = run["planned_peak_bytes"]
            lines.append(f"| {run['label']} | {run['ratio_to_first']:.2f}x | {run['mfu']:.1%} | "
                         f"{run['seconds_per_step']:.3f} | {peak / 1e9 if peak else float('nan'):.2f}"
                         f"{f' ({planned / 1e9:.2f})' if planned else ''} |")
    kernels = report["steps"].get("kernels", {}).get("result")
    if kernels:
        lines += ["", f"attention: triton over sdpa {kernels.get('attention_triton_over_sdpa')}", "",
                  "| op | implementation | ms |", "|---|---|---|"]
        lines += [f"| {record['op']} | {record['implementation']} | {record.get('ms', 'skipped')} |"
                  for record in kernels["results"]]
    tests = report["steps"].get("gpu_tests", {}).get("result")
    if tests:
        lines += ["", f"gpu tests: {tests['counts']}"]
        lines += [f"- FAILED {test['test']}" for test in tests["tests"] if test["outcome"] == "failed"]
    lines += ["", "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {step['status']} | {step['seconds']:.0f} |" for name, step in report["steps"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json / .md (default gpu_check)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:1, or cpu with --tiny (the rehearsal)")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes: every step's code path in seconds")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their estimates, run nothing")
    parser.add_argument("--assume", default="h100", choices=sorted(CARDS), help="the card --dry-run estimates for")
    parser.add_argument("--budget-s", type=float, default=BUDGET_SECONDS,
                        help=f"the dry run fails above this total (default {BUDGET_SECONDS})")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run only these steps")
    parser.add_argument("--step", choices=list(STEPS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.step:  # inside one step's process
        result = STEPS[args.step](args)
        Path(args.out, f"step_{args.step}.json").write_text(json.dumps(result, indent=2, default=str))
        return 0
    steps = plan(CARDS[args.assume])
    if args.dry_run:
        print(f"GPU check plan for {CARDS[args.assume].name} (estimates; each step ends at its limit):")
        for step in steps:
            print(f"  {step.name:10} ~{step.estimate:4.0f} s (limit {step.limit} s): {step.detail}")
        total = sum(step.estimate for step in steps)
        print(f"total: {total:.0f} s")
        if total > args.budget_s:
            print(f"error: the estimate {total:.0f} s exceeds the budget of {args.budget_s:.0f} s.", file=sys.stderr)
            return 1
        return 0
    if args.device == "cpu" and not args.tiny:
        print("error: on the CPU the check runs only as a rehearsal: add --tiny.", file=sys.stderr)
        return 2
    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": args.device, "tiny": args.tiny, "steps": {}}
    for step in steps:
        if args.only and step.name not in args.only:
            continue
        print(f"[gpu_check] {step.name} (limit {step.limit} s) ...", file=sys.stderr, flush=True)
        report["steps"][step.name] = outcome = run_step(step.name, step.limit, args)
        print(f"[gpu_check] {step.name}: {outcome['status']} in {outcome['seconds']:.0f} s"
              + (f": {outcome['error']}" if "error" in outcome else ""), file=sys.stderr, flush=True)
        if step.name == "machine" and outcome["status"] != "ok":
            break  # without a working install nothing else can run
    Path(args.out, "gpu_check.json").write_text(json.dumps(report, indent=2, default=str))
    Path(args.out, "gpu_check.md").write_text(markdown(report))
    print(markdown(report))
    failed = [name for name, step in report["steps"].items() if step["status"] != "ok"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
