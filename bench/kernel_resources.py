"""What each Triton kernel of kernels/ costs a real GPU, found without one: registers, spills, shared memory.

    python -m bench.kernel_resources                         # sm_80 and sm_90, the configs each launcher keeps
    python -m bench.kernel_resources --arch 80,86,89,90 --all --json report.json

Every kernel is launched through its public wrapper on meta tensors (shapes without memory) at the real model's
sizes (bfloat16, hidden 3072, 24 heads of 128, a 640p section's 18400 image + 846 condition tokens, its four latent
groups) and at the tiny preset's (float32, 2 heads of 16). The launch is captured instead of run, specialized as
Triton's JIT specializes it (dtypes, 16-divisible ints and pointers), and compiled ahead of time with
`triton.compile` for each target (`GPUTarget("cuda", capability, 32)`); the `ptxas -v` bundled with Triton gives
registers and spill bytes, Triton's metadata the shared memory the kernel allocates, and the PTX whether the
matmuls run on tensor cores (`wgmma` on Hopper, `mma` on Ampere and Ada). An autotuned kernel is compiled in every
config its pruning keeps on that architecture (`kept`), or in every candidate with `--all`.

A config is fine on an architecture when it compiles, its shared memory fits the architecture's per-block limit,
it spills nothing and (half-precision matmul kernels) it uses tensor cores; `problems(row)` says what is wrong
otherwise. tests/test_kernel_resources.py runs this report for the kept configs and asserts exactly that.

Compiled kernels are cached in TRITON_CACHE_DIR (default: ~/.cache/framepack/kernel-resources), so a second run
takes seconds. The report relies on Triton's compiler internals (the JIT's argument binder and `_pack_args`), as
of Triton 3.9; it needs no CUDA driver.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

KERNEL_MODULES = ("framepack_kernels.attention", "framepack_kernels.norm", "framepack_kernels.patchify")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "framepack" / "kernel-resources"


class Architecture(NamedTuple):
    capability: int      # 80, 90, ...: what GPUTarget takes
    major: int
    minor: int
    max_shared_bytes: int  # the opt-in shared memory limit per thread block
    gpus: str


ARCHITECTURES = {
    80: Architecture(80, 8, 0, 166912, "A100, A800, A30"),
    86: Architecture(86, 8, 6, 101376, "RTX 30xx, A40, A10"),
    89: Architecture(89, 8, 9, 101376, "RTX 40xx, L4, L40"),
    90: Architecture(90, 9, 0, 232448, "H100, H200, H800"),
}


@dataclass(frozen=True)
class Shapes:
    name: str
    dtype: str
    heads: int
    head_dim: int
    latent_channels: int
    latent_height: int
    latent_width: int
    frames: tuple[int, int, int, int]  # noisy, clean 1x, clean 2x, clean 4x latent frames
    condition_tokens: int             # SigLIP image tokens + valid prompt tokens

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


# One 640p section (640x640 -> latents 80x80, window 9): 14400 + 3200 + 400 + 400 image tokens.
REAL = Shapes("real", "bfloat16", heads=24, head_dim=128, latent_channels=16, latent_height=80, latent_width=80,
              frames=(9, 2, 2, 16), condition_tokens=729 + 117)
# The tiny preset (engine/presets.py) at 64x64: what the CPU tests and `--preset tiny` run.
TINY = Shapes("tiny", "float32", heads=2, head_dim=16, latent_channels=16, latent_height=8, latent_width=8,
              frames=(9, 2, 2, 16), condition_tokens=23)
# Other head sizes and float32 at the real sequence length: what the attention kernel's pruning assumes elsewhere.
SHAPES = {"real": REAL, "tiny": TINY,
          "real-float32": replace(REAL, name="real-float32", dtype="float32"),
          "heads-64": replace(REAL, name="heads-64", heads=48, head_dim=64),
          "heads-256": replace(REAL, name="heads-256", heads=12, head_dim=256)}


@dataclass
class Row:
    kernel: str
    shapes: str
    variant: str         # the launch's specializing arguments that are not tile sizes
    arch: str
    config: str
    registers: int | None
    spill_bytes: int | None  # ptxas "bytes spill stores"
    shared_bytes: int | None
    tensor_core: str | None  # "wgmma", "mma" or "none"
    kept: bool
    max_shared_bytes: int
    needs_tensor_cores: bool
    error: str | None = None


def problems(row: Row | dict) -> list[str]:
    """Why a compiled config does not fit its architecture; empty when it does."""
    row = row if isinstance(row, dict) else asdict(row)
    if row["error"]:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["shared_bytes"] > row["max_shared_bytes"]:
        found.append(f"needs {row['shared_bytes']} B of shared memory, the architecture has {row['max_shared_bytes']}")
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B of registers")
    if row["needs_tensor_cores"] and row["tensor_core"] == "none":
        found.append("its matmuls do not use tensor cores")
    return found


# --- capturing the launches -------------------------------------------------------------------------------------

@dataclass
class Launch:
    kernel: str
    shapes: str
    function: object       # the triton JITFunction
    args: tuple
    kwargs: dict           # constexprs and launch options given by the wrapper
    candidates: list       # triton.Config: the autotuner's, or the one the wrapper launches with
    keep: object | None    # the autotuned kernel's pure pruning rule, None when the wrapper fixes the config

    @property
    def variant(self) -> str:
        tiles = {name for config in self.candidates for name in config.kwargs}
        constexprs = [p.name for p in self.function.params if p.is_constexpr]
        fixed = [f"{name}={self.kwargs[name]}" for name in constexprs
                 if name in self.kwargs and name not in tiles and not name.startswith("BLOCK")
                 and name != "EMULATE_BF16"]
        dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in self.args if hasattr(a, "dtype")})
        return " ".join(fixed + ["/".join(dtypes)])


def _keep_rules():
    from framepack_kernels import attention, patchify

    return {"_packed_attention_kernel": attention.kept_configs, "_patch_embed_kernel": patchify.kept_gemm_configs}


class _Recorder:
    """Stands in for a kernel object: `kernel[grid](...)` records the launch instead of running it."""

    def __init__(self, name, kernel, shapes, launches):
        self.name, self.kernel, self.shapes, self.launches = name, kernel, shapes, launches

    def __getitem__(self, grid):
        return self.record

    def record(self, *args, **kwargs):
        import triton

        from triton.runtime.autotuner import Autotuner

        if isinstance(self.kernel, Autotuner):
            function, candidates, keep = self.kernel.fn, list(self.kernel.configs), _keep_rules()[self.name]
        else:
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            tiles = {k: v for k, v in kwargs.items() if k.startswith("BLOCK")}
            function, keep = self.kernel, None
            candidates = [triton.Config(tiles, num_warps=options.get("num_warps", 4),
                                        num_stages=options.get("num_stages", 3))]
            kwargs = {k: v for k, v in kwargs.items() if k not in tiles}
        kernel = self.name.strip("_").removesuffix("_kernel")
        self.launches.append(Launch(kernel, self.shapes, function, args, kwargs, candidates, keep))


@contextlib.contextmanager
def _recording(shapes_name, launches):
    import importlib
    from unittest import mock

    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    with contextlib.ExitStack() as stack:
        for module_name in KERNEL_MODULES:
            module = importlib.import_module(module_name)
            # Meta tensors stand for device tensors: nothing is ever launched.
            stack.enter_context(mock.patch.object(module, "require_kernel_device", lambda *args: None))
            for name, value in vars(module).items():
                if name.endswith("_kernel") and isinstance(value, (JITFunction, Autotuner)):
                    stack.enter_context(mock.patch.object(module, name, _Recorder(name, value, shapes_name, launches)))
        yield


def capture_launches(shapes: Shapes) -> list[Launch]:
    """Every kernel launch the model's fused path makes at these shapes (plus the RoPE variant of the QK norm)."""
    import math

    import torch

    from framepack_kernels.attention import packed_attention
    from framepack_kernels.norm import gated_residual, gated_residual_layer_norm_modulate, layer_norm_modulate, rms_norm_rotary
    from framepack_kernels.patchify import PatchGroup, packed_patchify
    from framepack_kernels.reference import rope_pool

    dtype = getattr(torch, shapes.dtype)

    def empty(*size, dtype=dtype):
        return torch.empty(size, dtype=dtype, device="meta")

    height, width = shapes.latent_height // 2, shapes.latent_width // 2
    kernels = ((1, 2, 2), (1, 2, 2), (2, 4, 4), (4, 8, 8))
    groups = []
    image_tokens = 0
    for frames, kernel in zip(shapes.frames, kernels):
        latents = empty(1, shapes.latent_channels, frames, shapes.latent_height, shapes.latent_width)
        weight = empty(shapes.hidden, shapes.latent_channels, *kernel)
        cos = empty(1, frames, height, width, shapes.head_dim, dtype=torch.float32)
        groups.append(PatchGroup(latents, weight, empty(shapes.hidden), cos, cos))
        pool = rope_pool(kernel)
        image_tokens += math.prod(-(-size // p) for size, p in zip((frames, height, width), pool))
    tokens = image_tokens + shapes.condition_tokens

    launches: list[Launch] = []
    with _recording(shapes.name, launches):
        packed_patchify(*groups)
        x = empty(1, tokens, shapes.hidden)
        modulation = empty(1, 6 * shapes.hidden).chunk(6, dim=1)
        layer_norm_modulate(x, modulation[0], modulation[1])
        gated_residual(x, modulation[2], x)
        gated_residual_layer_norm_modulate(x, modulation[2], x, modulation[3], modulation[4])
        # q/k straight out of their projection: (batch, tokens, heads, head_dim) views of (batch, tokens, hidden).
        heads = empty(1, tokens, shapes.hidden).unflatten(2, (shapes.heads, shapes.head_dim))
        weight = empty(shapes.head_dim)
        rope = empty(1, image_tokens, shapes.head_dim, dtype=torch.float32)
        rms_norm_rotary(heads, weight, round_before_weight=dtype != torch.float32)
        rms_norm_rotary(heads, weight, rope_cos=rope, rope_sin=rope, rotary_length=image_tokens,
                        round_before_weight=dtype != torch.float32)
        q = empty(1, tokens, shapes.heads, shapes.head_dim)
        packed_attention(q, q, q, rope, rope, image_tokens)
        # Two samples with prompts of different lengths (CFG, batches): padded keys masked.
        q2 = empty(2, tokens, shapes.heads, shapes.head_dim)
        packed_attention(q2, q2, q2, rope, rope, image_tokens, torch.tensor([tokens, tokens - 7], device="meta"))
    return _distinct(launches)


def _distinct(launches):
    seen, distinct = set(), []
    for launch in launches:
        key = (launch.kernel, launch.shapes, _specialization_key(launch))
        if key not in seen:
            seen.add(key)
            distinct.append(launch)
    return distinct


def _specialization_key(launch):
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(launch.function.signature, launch.function.params, BaseBackend)
    config_kwargs = launch.candidates[0].kwargs
    _, specialization, _ = binder(*launch.args, **launch.kwargs, **config_kwargs)
    return repr([s for s, p in zip(specialization, launch.function.params) if p.name not in config_kwargs])


# --- compiling ------------------------------------------------------------------------------------------------

_PTXAS_PATTERNS = {
    "registers": r"Used (\d+) registers",
    "spill_stores": r"(\d+) bytes spill stores",
    "spill_loads": r"(\d+) bytes spill loads",
}


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers and spill bytes of the one entry function in a `ptxas -v` log."""
    found = {}
    for name, pattern in _PTXAS_PATTERNS.items():
        match = re.search(pattern, log)
        if match is None:
            raise ValueError(f"ptxas -v printed no {name!r} line:\n{log}")
        found[name] = int(match[1])
    return found


def _ptxas_summary(kernel, capability, compile_log):
    """ptxas -v figures of a compiled kernel: from Triton's own ptxas run, from our cache, or by running ptxas."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    store = Path(os.environ["TRITON_CACHE_DIR"]) / "framepack-ptxas" / f"{kernel.hash}.json"
    if "Used" in compile_log:
        summary = parse_ptxas_log(compile_log)
    elif store.exists():
        return json.loads(store.read_text())
    else:  # Triton's cache held the kernel, ours did not: run ptxas -v as Triton does.
        with tempfile.TemporaryDirectory() as folder:
            ptx = Path(folder) / "kernel.ptx"
            ptx.write_text(kernel.asm["ptx"])
            result = subprocess.run(
                [get_ptxas(capability).path, "-lineinfo", "-v", "--regAllocOptLevel=2",
                 f"--gpu-name={sm_arch_from_capability(capability)}", str(ptx), "-o", str(ptx.with_suffix(".cubin"))],
                capture_output=True, text=True, check=True)
        summary = parse_ptxas_log(result.stderr)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(summary))
    return summary


def compile_launch(launch: Launch, config, architecture: Architecture):
    """Compile one launch in one config for one architecture, as Triton's JIT would on that GPU."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    function = launch.function
    target = GPUTarget("cuda", architecture.capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(function.signature, function.params, backend)
    kwargs = {**launch.kwargs, **config.all_kwargs()}
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = function._pack_args(backend, kwargs, bound_args, specialization, options)
    captured = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True  # Triton prints its own ptxas -v log: no second ptxas run
    with contextlib.redirect_stdout(captured):
        kernel = triton.compile(ASTSource(function, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
    ptx = kernel.asm["ptx"]
    tensor_core = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "none"
    return kernel, _ptxas_summary(kernel, architecture.capability, captured.getvalue()), tensor_core


def config_name(config) -> str:
    tiles = " ".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} warps={config.num_warps} stages={config.num_stages}".strip()


def _needs_tensor_cores(launch: Launch) -> bool:
    # The matmul-shaped kernels (tl.dot): half precision as is, float32 as three TF32 products (launch.dot_precision).
    return launch.kernel in ("packed_attention", "patch_embed")


def _named_args(launch: Launch) -> dict:
    names = [p.name for p in launch.function.params]
    return {**dict(zip(names, launch.args)), **launch.kwargs}


def _row(task) -> Row:
    launch, config, architecture, kept = task
    common = dict(kernel=launch.kernel, shapes=launch.shapes, variant=launch.variant,
                  arch=f"sm_{architecture.capability}", config=config_name(config), kept=kept,
                  max_shared_bytes=architecture.max_shared_bytes, needs_tensor_cores=_needs_tensor_cores(launch))
    try:
        kernel, summary, tensor_core = compile_launch(launch, config, architecture)
    except Exception as error:  # a config that does not compile is a finding of the report, not its failure
        message = str(error).strip().splitlines()
        return Row(**common, registers=None, spill_bytes=None, shared_bytes=None, tensor_core=None,
                   error=f"{type(error).__name__}: {message[-1] if message else ''}"[:300])
    return Row(**common, registers=summary["registers"], spill_bytes=summary["spill_stores"],
               shared_bytes=kernel.metadata.shared, tensor_core=tensor_core)


_TASKS: list = []


def _run_task(index):
    return _row(_TASKS[index])


def tasks_for(launches: list[Launch], architectures, sweep_all: bool):
    """(launch, config, architecture, kept) for every config to compile."""
    tasks = []
    for architecture in architectures:
        for launch in launches:
            if launch.keep is None:
                kept_configs = launch.candidates
            else:
                kept_configs = launch.keep(launch.candidates, _named_args(launch), architecture.major,
                                           architecture.minor, architecture.max_shared_bytes)
            for config in launch.candidates:
                kept = any(config is k for k in kept_configs)
                if kept or sweep_all:
                    tasks.append((launch, config, architecture, kept))
    return tasks


def build_report(architectures, shapes=(REAL, TINY), sweep_all=False, jobs=1, kernels=None) -> list[Row]:
    """Compile every (kernel launch, config, architecture) and return one row each; `kernels` names a subset."""
    _prepare_environment()
    launches = [launch for s in shapes for launch in capture_launches(s)
                if kernels is None or launch.kernel in kernels]
    tasks = tasks_for(launches, architectures, sweep_all)
    _TASKS[:] = tasks
    # Attention kernels take longest: start them first so the workers finish together.
    order = sorted(range(len(tasks)), key=lambda i: tasks[i][0].kernel != "packed_attention")
    if jobs > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            rows = dict(zip(order, pool.map(_run_task, order, chunksize=1)))
    else:
        rows = {i: _run_task(i) for i in order}
    return [rows[i] for i in range(len(tasks))]


def _prepare_environment():
    """Compile for real GPUs (never the interpreter), into a cache of our own."""
    os.environ.setdefault("TRITON_CACHE_DIR", str(DEFAULT_CACHE_DIR))
    # Triton 3.9's default, stated so it does not warn; the engine's kernels run with the same setting.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    if os.environ.get("TRITON_INTERPRET") == "1" and any(m in sys.modules for m in KERNEL_MODULES):
        raise RuntimeError("The kernels were imported under TRITON_INTERPRET=1: run the report in a fresh process "
                           "without it (python -m bench.kernel_resources).")
    os.environ["TRITON_INTERPRET"] = "0"


# --- output ---------------------------------------------------------------------------------------------------

COLUMNS = ("kernel", "shapes", "variant", "arch", "config", "registers", "spill_bytes", "shared_bytes",
           "tensor_core", "kept")


def table(rows: list[Row]) -> str:
    """Every row, as a Markdown table."""
    lines = ["| " + " | ".join(COLUMNS) + " | problems |", "|" + "---|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [str(getattr(row, c)) if getattr(row, c) is not None else "-" for c in COLUMNS]
        lines.append("| " + " | ".join(cells) + " | " + ("; ".join(problems(row)) or "ok") + " |")
    return "\n".join(lines)


def summary_table(rows: list[Row]) -> str:
    """Per kernel and architecture, over the kept configs: how many fit, and the worst registers/spills/shared."""
    groups: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        if row.kept:
            groups.setdefault((row.kernel, row.arch), []).append(row)
    lines = ["| kernel | arch | kept configs | fine | max registers | max spill B | max shared KB (limit) "
             "| tensor cores |", "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), group in sorted(groups.items()):
        compiled = [r for r in group if r.error is None]
        fine = sum(not problems(r) for r in group)
        registers = max((r.registers for r in compiled), default=None)
        spills = max((r.spill_bytes for r in compiled), default=None)
        shared = max((r.shared_bytes for r in compiled), default=0)
        cores = "/".join(sorted({r.tensor_core for r in compiled if r.needs_tensor_cores})) or "n/a (no matmul)"
        lines.append(f"| {kernel} | {arch} | {len(group)} | {fine} | {registers} | {spills} | "
                     f"{shared / 1024:.0f} ({group[0].max_shared_bytes / 1024:.0f}) | {cores} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_resources", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="80,90",
                        help=f"compute capabilities, comma-separated, among {sorted(ARCHITECTURES)} (default 80,90)")
    parser.add_argument("--shapes", default="real,tiny",
                        help=f"comma-separated among {', '.join(SHAPES)} (default real,tiny)")
    parser.add_argument("--kernels", help="only these kernels, comma-separated (e.g. packed_attention,patch_embed)")
    parser.add_argument("--all", action="store_true", help="every candidate config, not only the kept ones")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compile processes (default: cores)")
    parser.add_argument("--json", type=Path, help="write the rows and the summary here")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    args = parser.parse_args(argv)
    try:
        architectures = [ARCHITECTURES[int(a)] for a in args.arch.split(",")]
        shapes = [SHAPES[s] for s in args.shapes.split(",")]
    except (KeyError, ValueError):
        parser.error(f"--arch takes capabilities among {sorted(ARCHITECTURES)}; --shapes among {', '.join(SHAPES)}")
    start = time.perf_counter()
    kernels = args.kernels.split(",") if args.kernels else None
    rows = build_report(architectures, shapes, sweep_all=args.all, jobs=max(1, args.jobs), kernels=kernels)
    seconds = time.perf_counter() - start
    if not args.quiet:
        print(table(rows))
        print()
    print(summary_table(rows))
    bad = [r for r in rows if r.kept and problems(r)]
    print(f"\n{len(rows)} compiles in {seconds:.0f} s; {len(bad)} kept configs with problems")
    if args.json:
        import triton

        args.json.write_text(json.dumps({
            "schema": "framepack-kernel-resources/1", "triton": triton.__version__,
            "architectures": [a._asdict() for a in architectures], "shapes": [asdict(s) for s in shapes],
            "seconds": seconds, "rows": [asdict(r) for r in rows], "summary": summary_table(rows)}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
