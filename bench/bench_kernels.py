"""Each kernel against its PyTorch reference and the library it replaces, at FramePack's real shapes.

    python -m bench.bench_kernels --json out.json            # on a GPU: FramePack 640p section shapes
    python -m bench.bench_kernels --tiny --only attention    # a quick smoke run (CPU: set TRITON_INTERPRET=1)

Off a GPU it takes the tiny shapes unless given --full (FramePack's shapes there take many minutes), and says so.

One 640p section (640x640, latent_window_size 9): noisy 9 x 40 x 40 = 14400 tokens, clean 1x 2 x 40 x 40 = 3200,
clean 2x 1 x 20 x 20 = 400, clean 4x 4 x 10 x 10 = 400: 18400 image tokens, plus text (cropped prompt + SigLIP
image tokens) for ~18.7k in all; 24 heads of 128, hidden 3072. Every implementation of a case computes the same
output; its relative error to the case's oracle is reported beside its speed (TFLOP/s for attention and patchify,
GB/s of compulsory traffic for the memory-bound glue). GPU timings use triton.testing.do_bench (median).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from framepack_kernels import cuda_ops
from framepack_kernels.attention import packed_attention, packed_attention_reference
from framepack_kernels.launch import interpreting
from framepack_kernels.reference import random_rope_tables, relative_error
from framepack_kernels.norm import (
    gated_residual,
    gated_residual_layer_norm_modulate,
    gated_residual_layer_norm_modulate_reference,
    gated_residual_reference,
    layer_norm_modulate,
    layer_norm_modulate_reference,
    rms_norm_rotary,
    rms_norm_rotary_reference,
)
from framepack_kernels.patchify import PatchGroup, packed_patchify, packed_patchify_reference


@dataclass(frozen=True)
class Shapes:
    """The sizes every case is built from."""
    name: str
    batch: int
    latent_channels: int
    latent_height: int
    latent_width: int
    noisy_frames: int
    clean_frames: int
    clean_2x_frames: int
    clean_4x_frames: int
    text_tokens: int
    heads: int
    head_dim: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def image_tokens(self) -> int:
        height, width = self.latent_height // 2, self.latent_width // 2
        return (self.noisy_frames * height * width + self.clean_frames * height * width
                + math.ceil(self.clean_2x_frames / 2) * math.ceil(height / 2) * math.ceil(width / 2)
                + math.ceil(self.clean_4x_frames / 4) * math.ceil(height / 4) * math.ceil(width / 4))

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


FRAMEPACK_640P = Shapes("framepack-640p-section", batch=1, latent_channels=16, latent_height=80, latent_width=80,
                        noisy_frames=9, clean_frames=2, clean_2x_frames=2, clean_4x_frames=16, text_tokens=256,
                        heads=24, head_dim=128)
TINY = Shapes("tiny", batch=1, latent_channels=4, latent_height=6, latent_width=10, noisy_frames=2, clean_frames=1,
              clean_2x_frames=3, clean_4x_frames=5, text_tokens=7, heads=2, head_dim=64)

# The eager attention oracle materializes every score: only affordable below this many bytes of scores.
EAGER_ATTENTION_LIMIT_BYTES = 4 << 30


@dataclass
class Case:
    op: str
    oracle: str
    implementations: dict[str, Callable[[], object]]
    work: float                      # floating-point operations, or bytes of compulsory memory traffic
    unit: str                        # "TFLOP/s" or "GB/s"
    shape: dict
    skipped: dict[str, str] = field(default_factory=dict)  # implementation -> why it did not run


def _triton_runs(device) -> str | None:
    if device.type == "cuda" or interpreting():
        return None
    return "Triton needs CUDA (or TRITON_INTERPRET=1)"



def attention_case(shapes: Shapes, device, dtype, padded=False) -> Case:
    from framepack_engine.runtime.attention import sdpa_attention
    from framepack_engine.runtime.attention_backends import flash_attention, sage_attention

    batch = 2 if padded else shapes.batch
    tokens, heads, head_dim = shapes.tokens, shapes.heads, shapes.head_dim
    q, k, v = (torch.randn(batch, tokens, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    cos, sin = random_rope_tables(1, shapes.image_tokens, head_dim, device)
    valid = [tokens, tokens - shapes.text_tokens // 2] if padded else [tokens] * batch
    valid_lengths = torch.tensor(valid, device=device) if padded else None
    args = (q, k, v, cos, sin, shapes.image_tokens, valid_lengths)
    implementations = {"sdpa": lambda: sdpa_attention(*args)}
    skipped = {}
    if (reason := _triton_runs(device)) is None:
        implementations["triton"] = lambda: packed_attention(*args)
    else:
        skipped["triton"] = reason
    if batch * heads * tokens * tokens * 4 * 2 <= EAGER_ATTENTION_LIMIT_BYTES:
        implementations["eager"] = lambda: packed_attention_reference(*args)
    else:
        skipped["eager"] = "the score matrix would not fit in memory"
    libraries = (("flash-attn", flash_attention, "flash_attn"), ("sage", sage_attention, "sageattention"))
    for name, wrapper, module in libraries:
        if device.type == "cuda" and _importable(module):
            implementations[name] = lambda wrapper=wrapper: wrapper(*args)
        else:
            skipped[name] = f"{module} is not installed or no CUDA device"
    flops = 4.0 * heads * head_dim * sum(n * n for n in valid)
    shape = {"batch": batch, "tokens": tokens, "heads": heads, "head_dim": head_dim,
             "rotary_length": shapes.image_tokens, "valid_lengths": valid}
    return Case("attention_padded" if padded else "attention", "sdpa", implementations, flops, "TFLOP/s", shape,
                skipped)


def _importable(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _hidden_inputs(shapes, device, dtype):
    x = torch.randn(shapes.batch, shapes.tokens, shapes.hidden, device=device, dtype=dtype)
    y = torch.randn_like(x)
    shift, scale, gate = torch.randn(shapes.batch, 3 * shapes.hidden, device=device, dtype=dtype).chunk(3, dim=1)
    return x, y, shift, scale, gate


def _glue_case(op, shapes, device, dtype, triton_fn, eager_fn, cuda_fn, args, tensors_moved) -> Case:
    implementations = {"eager": lambda: eager_fn(*args)}
    skipped = {}
    if (reason := _triton_runs(device)) is None:
        implementations["triton"] = lambda: triton_fn(*args)
    else:
        skipped["triton"] = reason
    if cuda_fn is not None and device.type == "cuda" and cuda_ops.cuda_ops_available():
        implementations["cuda"] = lambda: cuda_fn(*args)
    elif cuda_fn is not None:
        skipped["cuda"] = f"{cuda_ops.EXTENSION_MODULE} not built ({cuda_ops.BUILD_HINT})"
    moved = float(sum(t.numel() * t.element_size() for t in tensors_moved))
    shape = {"batch": shapes.batch, "tokens": shapes.tokens, "channels": shapes.hidden}
    return Case(op, "eager", implementations, moved, "GB/s", shape, skipped)


def layer_norm_modulate_case(shapes, device, dtype) -> Case:
    x, _, shift, scale, _ = _hidden_inputs(shapes, device, dtype)
    return _glue_case("layer_norm_modulate", shapes, device, dtype, layer_norm_modulate, layer_norm_modulate_reference,
                      cuda_ops.layer_norm_modulate_cuda, (x, shift, scale), (x, x))  # read x, write out


def gated_residual_case(shapes, device, dtype) -> Case:
    x, y, _, _, gate = _hidden_inputs(shapes, device, dtype)
    return _glue_case("gated_residual", shapes, device, dtype, gated_residual, gated_residual_reference,
                      cuda_ops.gated_residual_cuda, (x, gate, y), (x, y, x))


def gated_residual_layer_norm_modulate_case(shapes, device, dtype) -> Case:
    x, y, shift, scale, gate = _hidden_inputs(shapes, device, dtype)
    return _glue_case("gated_residual_layer_norm_modulate", shapes, device, dtype, gated_residual_layer_norm_modulate,
                      gated_residual_layer_norm_modulate_reference, cuda_ops.gated_residual_layer_norm_modulate_cuda,
                      (x, gate, y, shift, scale), (x, y, x, x))


def rms_norm_rotary_case(shapes, device, dtype) -> Case:
    x = torch.randn(shapes.batch, shapes.tokens, shapes.heads, shapes.head_dim, device=device, dtype=dtype)
    weight = torch.rand(shapes.head_dim, device=device, dtype=dtype) + 0.5
    cos, sin = random_rope_tables(1, shapes.image_tokens, shapes.head_dim, device)
    case = _glue_case("rms_norm_rotary", shapes, device, dtype, rms_norm_rotary, rms_norm_rotary_reference, None,
                      (x, weight, 1e-6, cos, sin, shapes.image_tokens), (x, x, cos, sin))
    case.shape.update(heads=shapes.heads, head_dim=shapes.head_dim, rotary_length=shapes.image_tokens)
    return case


def patchify_case(shapes, device, dtype) -> Case:
    kernels = {"noisy": (1, 2, 2), "clean": (1, 2, 2), "clean_2x": (2, 4, 4), "clean_4x": (4, 8, 8)}
    frames = {"noisy": shapes.noisy_frames, "clean": shapes.clean_frames, "clean_2x": shapes.clean_2x_frames,
              "clean_4x": shapes.clean_4x_frames}
    channels, height, width = shapes.latent_channels, shapes.latent_height, shapes.latent_width
    groups, flops = {}, 0.0
    for name, kernel in kernels.items():
        latents = torch.randn(shapes.batch, channels, frames[name], height, width, device=device, dtype=dtype)
        fan_in = channels * math.prod(kernel)
        weight = torch.randn(shapes.hidden, channels, *kernel, device=device, dtype=dtype) / math.sqrt(fan_in)
        bias = torch.randn(shapes.hidden, device=device, dtype=dtype)
        table = (shapes.batch, frames[name], height // 2, width // 2, shapes.head_dim)
        cos, sin = (torch.rand(table, device=device) for _ in range(2))
        groups[name] = PatchGroup(latents, weight, bias, cos, sin)
        grid = [math.ceil(size / k) for size, k in zip((frames[name], height, width), kernel)]
        flops += 2.0 * shapes.batch * math.prod(grid) * fan_in * shapes.hidden
    implementations = {"eager": lambda: packed_patchify_reference(**groups).tokens}
    skipped = {}
    if (reason := _triton_runs(device)) is None:
        implementations["triton"] = lambda: packed_patchify(**groups).tokens
    else:
        skipped["triton"] = reason
    shape = {"batch": shapes.batch, "latent": [channels, height, width], "frames": frames, "inner": shapes.hidden}
    return Case("packed_patchify", "eager", implementations, flops, "TFLOP/s", shape, skipped)


def quant_matmul_case(shapes, device, dtype, scheme_name) -> Case:
    """The MLP's up projection (hidden -> 4 * hidden) over a section's tokens with a quantized weight: the Triton
    dequantizing matmul, the plain path (dequantize, then matmul) and the float weight it stands for (the cuBLAS
    matmul it replaces); fp8 also through torch._scaled_mm on fp8 tensor cores."""
    from framepack_engine.runtime.quant import QuantScheme, quantize_weight
    from framepack_kernels.quant_matmul import fp8_scaled_matmul, quantized_matmul, quantized_matmul_reference

    scheme = QuantScheme(*{"int4": ("int4", 64)}.get(scheme_name, (scheme_name,)))
    rows, in_features, out_features = shapes.tokens, shapes.hidden, 4 * shapes.hidden
    weight = torch.randn(out_features, in_features, device=device) / math.sqrt(in_features)
    stored = quantize_weight(weight, scheme)
    args = (stored["weight"], stored["weight_scale"], stored.get("weight_zero"))
    x = torch.randn(rows, in_features, device=device, dtype=dtype)
    float_weight = weight.to(dtype)
    implementations = {"eager": lambda: quantized_matmul_reference(x, *args),
                       "float-weight": lambda: torch.nn.functional.linear(x, float_weight)}
    skipped = {}
    if (reason := _triton_runs(device)) is None:
        implementations["triton"] = lambda: quantized_matmul(x, *args)
    else:
        skipped["triton"] = reason
    if scheme.format == "fp8":
        if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
            implementations["scaled_mm"] = lambda: fp8_scaled_matmul(x, stored["weight"], stored["weight_scale"])
        else:
            skipped["scaled_mm"] = "needs fp8 tensor cores (CUDA compute capability 8.9+)"
    shape = {"rows": rows, "in_features": in_features, "out_features": out_features, "format": scheme.format,
             "group_size": scheme.group_size}
    return Case(f"quant_matmul_{scheme_name}", "eager", implementations, 2.0 * rows * in_features * out_features,
                "TFLOP/s", shape, skipped)


CASES = {
    "attention": attention_case,
    "attention_padded": lambda shapes, device, dtype: attention_case(shapes, device, dtype, padded=True),
    "layer_norm_modulate": layer_norm_modulate_case,
    "gated_residual": gated_residual_case,
    "gated_residual_layer_norm_modulate": gated_residual_layer_norm_modulate_case,
    "rms_norm_rotary": rms_norm_rotary_case,
    "packed_patchify": patchify_case,
    "quant_matmul_fp8": lambda shapes, device, dtype: quant_matmul_case(shapes, device, dtype, "fp8"),
    "quant_matmul_int8": lambda shapes, device, dtype: quant_matmul_case(shapes, device, dtype, "int8"),
    "quant_matmul_int4": lambda shapes, device, dtype: quant_matmul_case(shapes, device, dtype, "int4"),
}


def time_ms(fn, device, repeats=5) -> float:
    """Median milliseconds per call: triton.testing.do_bench on a GPU, wall clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    fn()  # warm-up (compiles, caches)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _first_tensor(output):
    return output[-1] if isinstance(output, tuple) else output



def run_case(case: Case, device, repeats=5) -> list[dict]:
    """Time every implementation of a case and check each against the case's oracle."""
    expected = _first_tensor(case.implementations[case.oracle]())
    valid = case.shape.get("valid_lengths")
    records = []
    for name, fn in case.implementations.items():
        output = _first_tensor(fn())
        if valid is not None:  # padded query rows are unspecified
            output = torch.cat([output[b, :n] for b, n in enumerate(valid)])
            reference = torch.cat([expected[b, :n] for b, n in enumerate(valid)])
        else:
            reference = expected
        milliseconds = time_ms(fn, device, repeats)
        records.append({
            "op": case.op, "implementation": name, "ms": milliseconds,
            case.unit: case.work / (milliseconds * 1e-3) / 1e12 if case.unit == "TFLOP/s"
            else case.work / (milliseconds * 1e-3) / 1e9,
            "relative_error_vs_" + case.oracle: relative_error(output, reference),
            "shape": case.shape,
        })
    for name, reason in case.skipped.items():
        records.append({"op": case.op, "implementation": name, "skipped": reason, "shape": case.shape})
    return records


def run(shapes: Shapes = FRAMEPACK_640P, device="cuda", dtype=torch.bfloat16, only=None, repeats=5) -> dict:
    device = torch.device(device)
    torch.manual_seed(0)
    results = []
    for op, build in CASES.items():
        if only and op not in only:
            continue
        with torch.no_grad():
            results.extend(run_case(build(shapes, device, dtype), device, repeats))
    return {
        "shapes": asdict(shapes),
        "dtype": str(dtype).removeprefix("torch."),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "results": results,
    }


def format_table(report: dict) -> str:
    lines = [f"{report['shapes']['name']} on {report['device']} ({report['dtype']})",
             f"{'op':36} {'implementation':14} {'ms':>10} {'speed':>16} {'rel. error':>11}"]
    for record in report["results"]:
        if "skipped" in record:
            lines.append(f"{record['op']:36} {record['implementation']:14} skipped: {record['skipped']}")
            continue
        unit = "TFLOP/s" if "TFLOP/s" in record else "GB/s"
        error = next(v for k, v in record.items() if k.startswith("relative_error"))
        lines.append(f"{record['op']:36} {record['implementation']:14} {record['ms']:10.3f} "
                     f"{record[unit]:10.2f} {unit:>5} {error:11.2e}")
    return "\n".join(lines)


def choose_shapes(device: str, tiny: bool = False, full: bool = False) -> Shapes:
    """FramePack's shapes on a GPU; tiny ones elsewhere unless `full` (a CPU runs the 640p cases for many minutes,
    the Triton ones in the interpreter for far longer), saying so before anything runs."""
    on_gpu = torch.device(device).type == "cuda"
    if tiny or not (on_gpu or full):
        if not (tiny or on_gpu):
            print(f"{device} is not a GPU: using tiny shapes, which run in seconds (--full runs FramePack's 640p "
                  "shapes here, for many minutes; kernel timings mean something on a GPU only).", file=sys.stderr,
                  flush=True)
        return TINY
    if not on_gpu:
        print(f"FramePack's 640p shapes on {device}: this takes many minutes (each case runs eagerly, Triton's in "
              "its interpreter); --tiny runs in seconds.", file=sys.stderr, flush=True)
    return FRAMEPACK_640P


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    shapes = parser.add_mutually_exclusive_group()
    shapes.add_argument("--tiny", action="store_true", help="tiny shapes (smoke test) instead of FramePack's "
                        "(the default off a GPU)")
    shapes.add_argument("--full", action="store_true", help="FramePack's 640p shapes even off a GPU (minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these ops")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per implementation off-GPU")
    args = parser.parse_args(argv)
    shapes = choose_shapes(args.device, tiny=args.tiny, full=args.full)
    report = run(shapes, args.device, getattr(torch, args.dtype), args.only, args.repeats)
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
