"""framepack_kernels.quant_matmul's dequantizing matmuls against their eager references, under the Triton interpreter on CPU,
and the fp8 compute path (torch._scaled_mm) against its float32 reference."""

import pytest
import torch

from framepack_engine.runtime.quant import QuantScheme, quantize_weight
from framepack_kernels.quant_matmul import (fp8_scaled_matmul, fp8_scaled_matmul_reference, quantized_matmul,
                                  quantized_matmul_reference)
from tests.utils import TOLERANCE, assert_relative_error

SCHEMES = {"fp8": QuantScheme("fp8"), "int8": QuantScheme("int8"), "int4-64": QuantScheme("int4", 64),
           "int4-128": QuantScheme("int4", 128), "int4-32": QuantScheme("int4", 32)}
# (rows, out_features, in_features): single row, odd everything, inputs not a whole number of int4 groups or K
# tiles, more than one row tile.
ODD_SHAPES = [(1, 1, 16), (3, 5, 7), (17, 33, 130), (5, 70, 200), (40, 19, 129)]


def stored(out_features, in_features, scheme, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.1 + 0.02  # off-centre: zero points work
    return quantize_weight(weight, scheme)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("scheme", list(SCHEMES), ids=str)
def test_quantized_matmul_matches_reference(scheme, shape, dtype):
    rows, out_features, in_features = shape
    tensors = stored(out_features, in_features, SCHEMES[scheme])
    x = (torch.randn(rows, in_features) * 2).to(dtype)
    bias = torch.randn(out_features).to(dtype)
    out = quantized_matmul(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"), bias)
    expected = quantized_matmul_reference(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"),
                                          bias)
    assert out.dtype == dtype and out.shape == (rows, out_features)
    assert_relative_error(out, expected, TOLERANCE[dtype])


def test_batched_activations_and_no_bias():
    tensors = stored(24, 64, SCHEMES["int8"])
    x = torch.randn(2, 3, 64)
    out = quantized_matmul(x, tensors["weight"], tensors["weight_scale"])
    assert out.shape == (2, 3, 24)
    assert_relative_error(out, quantized_matmul_reference(x, tensors["weight"], tensors["weight_scale"]), 1e-5)


def test_fp8_e5m2_weights_decode():
    weight = torch.randn(20, 48) * 0.1
    scale = weight.abs().amax(1) / 57344.0
    values = (weight / scale[:, None]).to(torch.float8_e5m2)
    x = torch.randn(3, 48)
    assert_relative_error(quantized_matmul(x, values, scale), quantized_matmul_reference(x, values, scale), 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4-128"], ids=str)
def test_real_shape(scheme):
    """The MLP's up projection of the real model, 3072 -> 12288 (a few rows: the interpreter's time is in the
    weight, 38M values decoded per call)."""
    tensors = stored(12288, 3072, SCHEMES[scheme])
    x = torch.randn(2, 3072)
    out = quantized_matmul(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"))
    expected = quantized_matmul_reference(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"))
    assert_relative_error(out, expected, 1e-5)


def test_shape_mismatches_are_clear_errors():
    tensors = stored(8, 64, SCHEMES["int8"])
    with pytest.raises(ValueError, match="features"):
        quantized_matmul(torch.randn(2, 32), tensors["weight"], tensors["weight_scale"])
    with pytest.raises(ValueError, match="not a quantized weight dtype"):
        quantized_matmul(torch.randn(2, 64), torch.randn(8, 64), tensors["weight_scale"])


@pytest.mark.parametrize("rows", [1, 16, 37])
def test_fp8_scaled_matmul_matches_its_reference(rows):
    """torch._scaled_mm also runs on the CPU: the path's arithmetic (per-token scales, row-wise weight scales, row
    padding) is checked here; its speed only on a GPU."""
    tensors = stored(48, 64, SCHEMES["fp8"])
    x = torch.randn(rows, 64) * 3
    bias = torch.randn(48)
    out = fp8_scaled_matmul(x, tensors["weight"], tensors["weight_scale"], bias)
    assert_relative_error(out, fp8_scaled_matmul_reference(x, tensors["weight"], tensors["weight_scale"], bias), 1e-5)
    # The path quantizes activations: close to, but not the same as, the weight-only result.
    weight_only = quantized_matmul_reference(x, tensors["weight"], tensors["weight_scale"], None, bias)
    assert_relative_error(out, weight_only, 0.1)


@pytest.mark.gpu
def test_fp8_scaled_matmul_on_gpu():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 tensor cores need compute capability 8.9+")
    tensors = {k: v.cuda() for k, v in stored(3072, 3072, SCHEMES["fp8"]).items()}
    x = torch.randn(100, 3072, device="cuda").to(torch.bfloat16)
    out = fp8_scaled_matmul(x, tensors["weight"], tensors["weight_scale"])
    expected = fp8_scaled_matmul_reference(x, tensors["weight"], tensors["weight_scale"])
    assert out.dtype == torch.bfloat16
    assert_relative_error(out, expected, 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("scheme", ["fp8", "int8", "int4-64", "int4-128"], ids=str)
def test_quantized_matmul_on_gpu_real_shapes(scheme):
    for rows, out_features, in_features in ((18400, 12288, 3072), (7, 3072, 15360)):
        tensors = {k: v.cuda() for k, v in stored(out_features, in_features, SCHEMES[scheme]).items()}
        x = torch.randn(rows, in_features, device="cuda").to(torch.bfloat16)
        out = quantized_matmul(x, tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero"))
        expected = quantized_matmul_reference(x, tensors["weight"], tensors["weight_scale"],
                                              tensors.get("weight_zero"))
        assert_relative_error(out, expected, 1e-2)


def test_benchmark_case_runs_at_tiny_shapes():
    # bench/ is outside the CI test path: make sure a quantized-matmul case builds, runs and agrees with its oracle.
    from bench.bench_kernels import CASES, TINY, run_case

    records = run_case(CASES["quant_matmul_int4"](TINY, torch.device("cpu"), torch.float32), torch.device("cpu"), 1)
    assert {r["implementation"] for r in records} == {"eager", "triton", "float-weight"}
    for record in records:
        # The float weight it stands for is a different matmul: near, not equal.
        bound = 0.2 if record["implementation"] == "float-weight" else TOLERANCE[torch.float32]
        assert record["TFLOP/s"] > 0 and record["relative_error_vs_eager"] <= bound
