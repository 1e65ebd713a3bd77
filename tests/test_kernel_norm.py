"""framepack_kernels.norm's fused glue ops against their eager references, under the Triton interpreter on CPU."""

import pytest
import torch

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
from framepack_kernels.reference import random_rope_tables
from tests.utils import TOLERANCE, assert_relative_error, relative_error

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, tokens, channels): one element of work, odd channel counts (masked columns), channels > 1024 (a second
# column block for gated_residual), batch 3.
HIDDEN_SHAPES = [(1, 1, 64), (2, 7, 97), (3, 5, 300), (2, 3, 1031)]
# (batch, tokens, heads, head_dim, rotary_length, rope_batch)
HEAD_SHAPES = [(1, 5, 2, 64, 5, 1), (2, 11, 3, 64, 7, 2), (2, 9, 2, 128, 0, 1), (3, 6, 1, 32, 4, 1)]


def hidden_inputs(batch, tokens, channels, dtype):
    # Non-zero mean and spread so the normalization matters; modulation vectors as chunks of one adaLN
    # projection (strided views), as the DiT slices them.
    x = (torch.randn(batch, tokens, channels) * 2 + 0.5).to(dtype)
    y = torch.randn(batch, tokens, channels).to(dtype)
    shift, scale, gate = (torch.randn(batch, 3 * channels) * 0.5).to(dtype).chunk(3, dim=1)
    return x, y, shift, scale, gate



@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_modulate(shape, dtype):
    x, _, shift, scale, _ = hidden_inputs(*shape, dtype)
    out = layer_norm_modulate(x, shift, scale, eps=1e-6)
    assert out.dtype == dtype
    assert_relative_error(out, layer_norm_modulate_reference(x, shift, scale, eps=1e-6), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual(shape, dtype):
    x, y, _, _, gate = hidden_inputs(*shape, dtype)
    y = torch.cat([y, y], dim=-1)[..., : shape[-1]]  # a strided y
    out = gated_residual(x, gate, y)
    assert_relative_error(out, gated_residual_reference(x, gate, y), TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HIDDEN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gated_residual_layer_norm_modulate(shape, dtype):
    x, y, shift, scale, gate = hidden_inputs(*shape, dtype)
    residual, normalized = gated_residual_layer_norm_modulate(x, gate, y, shift, scale)
    expected_residual, expected_normalized = gated_residual_layer_norm_modulate_reference(x, gate, y, shift, scale)
    assert_relative_error(residual, expected_residual, TOLERANCE[dtype], "residual")
    assert_relative_error(normalized, expected_normalized, TOLERANCE[dtype], "normalized")


@pytest.mark.parametrize("round_before_weight", [False, True], ids=["torch-rounding", "diffusers-rounding"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", HEAD_SHAPES, ids=lambda s: "x".join(map(str, s[:5])))
def test_rms_norm_rotary(shape, dtype, round_before_weight):
    batch, tokens, heads, head_dim, rotary_length, rope_batch = shape
    x = (torch.randn(batch, tokens, heads, head_dim) * 3).to(dtype)
    weight = (torch.rand(head_dim) + 0.5).to(dtype)
    cos, sin = random_rope_tables(rope_batch, rotary_length, head_dim) if rotary_length else (None, None)
    out = rms_norm_rotary(x, weight, 1e-6, cos, sin, rotary_length, round_before_weight)
    expected = rms_norm_rotary_reference(x, weight, 1e-6, cos, sin, rotary_length, round_before_weight)
    assert out.dtype == dtype
    assert_relative_error(out, expected, TOLERANCE[dtype])


def test_rms_norm_rotary_on_a_view_of_a_fused_projection():
    qkv = torch.randn(2, 9, 3, 2, 64)
    k = qkv[:, :, 1]
    weight = torch.rand(64) + 0.5
    cos, sin = random_rope_tables(1, 6, 64)
    expected = rms_norm_rotary_reference(k, weight, 1e-6, cos, sin, 6)
    assert_relative_error(rms_norm_rotary(k, weight, 1e-6, cos, sin, 6), expected, 1e-5)


def test_references_follow_torch_modules():
    # The references are what the DiT's eager modules compute (LayerNorm without affine; torch's RMSNorm).
    x, _, shift, scale, _ = hidden_inputs(2, 5, 48, torch.bfloat16)
    layer_norm = torch.nn.LayerNorm(48, elementwise_affine=False, eps=1e-6)
    assert torch.equal(layer_norm_modulate_reference(x, shift, scale),
                       layer_norm(x) * (1 + scale[:, None]) + shift[:, None])
    heads = torch.randn(2, 5, 3, 64).bfloat16() * 4
    rms_norm = torch.nn.RMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        rms_norm.weight.copy_(torch.rand(64) + 0.5)
        assert torch.equal(rms_norm_rotary_reference(heads, rms_norm.weight, 1e-6), rms_norm(heads))
    # round_before_weight follows diffusers' RMSNorm (the HunyuanVideo QK norm) with bfloat16 weights.
    diffusers_normalization = pytest.importorskip("diffusers.models.normalization")
    diffusers_norm = diffusers_normalization.RMSNorm(64, eps=1e-6).bfloat16()
    with torch.no_grad():
        diffusers_norm.weight.copy_(rms_norm.weight)
        expected = diffusers_norm(heads)
    assert torch.equal(rms_norm_rotary_reference(heads, rms_norm.weight, 1e-6, round_before_weight=True), expected)


def test_parity_checks_can_fail():
    x, y, shift, scale, gate = hidden_inputs(2, 7, 97, torch.float32)
    tolerance = TOLERANCE[torch.float32]
    expected = layer_norm_modulate_reference(x, shift, scale)
    nudged_shift = shift.clone()
    nudged_shift[1, 3] += 1.0
    assert relative_error(layer_norm_modulate(x, nudged_shift, scale), expected) > 100 * tolerance
    assert relative_error(layer_norm_modulate(x, shift, scale, eps=1.0), expected) > 100 * tolerance
    nudged_gate = gate.clone()
    nudged_gate[0, 5] += 1.0
    assert relative_error(gated_residual(x, nudged_gate, y), gated_residual_reference(x, gate, y)) > 100 * tolerance

    heads = torch.randn(2, 11, 3, 64)
    weight = torch.rand(64) + 0.5
    cos, sin = random_rope_tables(1, 7, 64)
    expected = rms_norm_rotary_reference(heads, weight, 1e-6, cos, sin, 7)
    assert relative_error(rms_norm_rotary(heads, weight, 1e-6, cos, -sin, 7), expected) > 100 * tolerance
    assert relative_error(rms_norm_rotary(heads, weight, 1e-6, cos[:, :6], sin[:, :6], 6), expected) > 100 * tolerance


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 16)
    with pytest.raises(ValueError, match="shift must be"):
        layer_norm_modulate(x, torch.randn(16), torch.randn(2, 16))
    with pytest.raises(ValueError, match="y must match"):
        gated_residual(x, torch.randn(2, 16), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_rotary(torch.randn(1, 3, 2, 64), torch.randn(32))
    with pytest.raises(ValueError, match="rope_cos must be"):
        rms_norm_rotary(torch.randn(1, 3, 2, 64), torch.randn(64), 1e-6, torch.ones(1, 2, 64), torch.ones(1, 2, 64), 3)


def test_benchmark_command_runs_at_tiny_shapes(tmp_path):
    # bench/ is outside the CI test path: run its command line on the glue ops and check the JSON it writes.
    import json

    from bench.bench_kernels import main

    ops = ["layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate", "rms_norm_rotary"]
    out = tmp_path / "results.json"
    main(["--tiny", "--device", "cpu", "--dtype", "float32", "--repeats", "1", "--json", str(out), "--only", *ops])
    report = json.loads(out.read_text())
    timed = [r for r in report["results"] if "skipped" not in r]
    assert {(r["op"], r["implementation"]) for r in timed} == {(op, impl) for op in ops for impl in ("eager", "triton")}
    for record in timed:
        assert record["ms"] > 0 and record["GB/s"] > 0
        assert record["relative_error_vs_eager"] <= TOLERANCE[torch.float32]
