"""`framepack bench`: the analytic FLOP counter against the model's own count, the runner end to end on the tiny
preset (JSON fields, comparisons, the O(1) check), and its errors."""

import argparse
import dataclasses
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import framepack_engine.models.dit
from framepack_engine.commands import bench as benchmark
from framepack_engine.models import flops
from framepack_engine.errors import FramePackError
from framepack_engine.generation.sections import initial_history, plan_sections, tokens_per_section

pytestmark = pytest.mark.usefixtures("one_thread")

# Every matrix product of a small model, odd sizes on purpose: an MLP ratio that is not the refiner's fixed 4,
# unequal text/pooled/image widths, two layers of each kind, latents whose sides are not multiples of 4 or 8.
CONFIGS = {
    "guided_image": {
        "in_channels": 16, "out_channels": 16, "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
        "num_single_layers": 2, "num_refiner_layers": 2, "mlp_ratio": 3.0, "patch_size": 2, "patch_size_t": 1,
        "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 24, "pooled_projection_dim": 20,
        "rope_theta": 256.0, "rope_axes_dim": [4, 6, 6], "has_image_proj": True, "image_proj_dim": 12,
        "has_clean_x_embedder": True},
    "unguided_text_only": {
        "in_channels": 8, "out_channels": 4, "num_attention_heads": 3, "attention_head_dim": 8, "num_layers": 1,
        "num_single_layers": 3, "num_refiner_layers": 1, "mlp_ratio": 2.5, "patch_size": 2, "patch_size_t": 1,
        "qk_norm": "rms_norm", "guidance_embeds": False, "text_embed_dim": 10, "pooled_projection_dim": 6,
        "rope_theta": 256.0, "rope_axes_dim": [2, 2, 4], "has_image_proj": False, "image_proj_dim": 12,
        "has_clean_x_embedder": True},
}


FAST = ["--preset", "tiny", "--resolution", "64", "--steps", "2", "--latent-window-size", "2", "--warmup", "1",
        "--threads", "1", "--matmul-size", "256", "--quiet"]


def module_total(counts, prefix):
    """FLOPs under a module path. A module's entry includes its children's, and a container that is never called
    itself (a ModuleList, a holder of convolutions) has none: sum the outermost entries under the prefix."""
    names = [name for name in counts if name == prefix or name.startswith(prefix + ".")]
    outermost = [name for name in names if not any(name.startswith(other + ".") for other in names)]
    return sum(sum(counts[name].values()) for name in outermost)


def model_counts(model, config, variant, window, latent_height, latent_width, text_tokens, image_tokens):
    """Run the model once; count linear FLOPs with torch's FlopCounterMode (matmuls and convolutions as aten
    executes them) and attention FLOPs from the q/k/v shapes each attention call receives."""
    section = plan_sections(variant, 3, window)[1]
    start = torch.randn(1, config["in_channels"], 1, latent_height, latent_width)
    history = torch.randn_like(initial_history(variant, start))
    context = section.history_context(history, start)
    inputs = {"latent_indices": section.latent_indices, **context.official_kwargs()}
    padded = text_tokens + 5
    mask = torch.zeros(1, padded, dtype=torch.int64)
    mask[:, :text_tokens] = 1
    arguments = dict(
        hidden_states=torch.randn(1, config["in_channels"], window, latent_height, latent_width),
        timestep=torch.tensor([700.0]), encoder_hidden_states=torch.randn(1, padded, config["text_embed_dim"]),
        encoder_attention_mask=mask, pooled_projections=torch.randn(1, config["pooled_projection_dim"]),
        guidance=torch.tensor([10000.0]) if config["guidance_embeds"] else None,
        image_embeddings=torch.randn(1, image_tokens, config["image_proj_dim"]) if config["has_image_proj"] else None,
        **inputs)

    attention_flops = []

    def counting(function):
        def wrapped(q, k, v, *args, **kwargs):
            batch, query_tokens, heads, head_dim = q.shape
            assert kwargs.get("valid_lengths") is None and (len(args) < 4 or args[3] is None)
            attention_flops.append(4 * batch * heads * query_tokens * k.shape[1] * head_dim)
            return function(q, k, v, *args, **kwargs)
        return wrapped

    model._attention = counting(model._attention)  # the blocks' joint attention
    refiner_attention = framepack_engine.models.dit.sdpa_attention  # the text refiner calls SDPA directly
    framepack_engine.models.dit.sdpa_attention = counting(refiner_attention)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**arguments)
    finally:
        framepack_engine.models.dit.sdpa_attention = refiner_attention
    counts = counter.get_flop_counts()
    assert set(map(str, counts["Global"])) <= {"aten.addmm", "aten.mm", "aten.convolution"}, counts["Global"]
    linear = sum(counts["Global"].values())
    parts = {name: module_total(counts, f"FramePackDiT.{name}") for name in (
        "x_embedder", "clean_x_embedder", "image_projection", "time_text_embed", "context_embedder",
        "transformer_blocks", "single_transformer_blocks", "norm_out")}
    return linear, sum(attention_flops), parts, arguments, context


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_analytic_flops_equal_the_models_own_count(name, variant):
    config, window, latent_height, latent_width, text_tokens, image_tokens = CONFIGS[name], 3, 6, 10, 7, 5
    model = benchmark.random_dit(config, torch.device("cpu"), torch.float32, seed=1)
    linear, attention, parts, arguments, context = model_counts(
        model, config, variant, window, latent_height, latent_width, text_tokens, image_tokens)

    sequence = flops.packed_sequence_of_inputs(config, arguments["hidden_states"].shape, context, text_tokens,
                                               image_tokens)
    assert sequence == flops.packed_sequence(config, window, 2, 2, 16, latent_height, latent_width, text_tokens,
                                             image_tokens)
    counted = flops.step_flops(config, sequence)
    assert counted.linear == linear
    assert counted.attention == attention
    assert counted.total == linear + attention
    by_part = counted.by_part
    assert by_part["embeddings"]["linear"] == (parts["x_embedder"] + parts["clean_x_embedder"]
                                               + parts["image_projection"] + parts["time_text_embed"])
    assert by_part["text_refiner"]["linear"] == parts["context_embedder"]
    assert by_part["double_blocks"]["linear"] == parts["transformer_blocks"]
    assert by_part["single_blocks"]["linear"] == parts["single_transformer_blocks"]
    # norm_out runs as a module; the final projection is a bare F.linear at the model's top level.
    assert by_part["output"]["linear"] > parts["norm_out"] > 0

    # The comparison can fail: one text token more, or the refiner's MLP ratio taken from the config, is caught.
    off_by_a_token = flops.step_flops(config, dataclasses.replace(sequence, text_tokens=text_tokens + 1))
    assert off_by_a_token.linear != linear and off_by_a_token.attention != attention
    wrong_ratio = flops.step_flops({**config, "mlp_ratio": 4.0}, sequence)
    assert abs(wrong_ratio.linear - linear) / linear > 0.01


def test_packed_tokens_agree_with_the_section_module_at_real_sizes():
    config = benchmark.DIT_PRESETS["full"]
    for height, width in [(640, 608), (416, 960), (832, 480)]:
        sequence = flops.packed_sequence(config, 9, 2, 2, 16, height // 8, width // 8, 77, 729)
        assert sequence.latent_tokens == tokens_per_section(height // 8, width // 8, 9)
        assert sequence.condition_tokens == 729 + 77
    # 640 x 608: noisy 9*40*38, clean 1x 2*40*38, 2x 1*20*19, 4x 4*10*10 (76 / 8 rounds up).
    sequence = flops.packed_sequence(config, 9, 2, 2, 16, 80, 76, 77, 729)
    assert (sequence.noisy_tokens, sequence.clean_1x_tokens, sequence.clean_2x_tokens, sequence.clean_4x_tokens) == (
        13680, 3040, 380, 400)
    # Per token, each of the 60 blocks does 12 hidden^2 multiply-adds whichever stream it is in (the adaptive
    # modulations act on one vector): the block linears are 2 * 60 * 12 * 3072^2 FLOPs per token.
    counted = flops.step_flops(config, sequence)
    blocks = counted.by_part["double_blocks"]["linear"] + counted.by_part["single_blocks"]["linear"]
    per_token = 2 * 60 * 12 * 3072 ** 2
    assert abs(blocks - per_token * sequence.total_tokens) / blocks < 1e-3
    assert counted.by_part["single_blocks"]["attention"] == 40 * 4 * sequence.total_tokens ** 2 * 3072


def bench(tmp_path, *extra, out=None):
    parser = argparse.ArgumentParser(prog="framepack")
    benchmark.add_bench_command(parser.add_subparsers(dest="command", required=True))
    out = out or tmp_path / "bench.json"
    args = parser.parse_args(["bench", *FAST, *extra, "--json", str(out)])
    assert args.run is benchmark.command_bench
    assert args.run(args) == 0
    return json.loads(out.read_text())


RUN_FIELDS = {
    "label", "settings", "plan_sections", "height", "width", "latent_height", "latent_width", "torch_threads",
    "model", "tokens", "tokens_per_section", "flops_per_step", "flops_per_section", "flops_per_output_frame",
    "pixel_frames_per_section", "warmup_steps", "seconds_per_step", "seconds_per_section", "seconds_per_output_frame",
    "achieved_tflops", "mfu", "matmul_peak_tflops", "matmul_peak_key", "memory", "bytes_streamed_per_step",
    "memory_plan", "stream_stats", "cache_steps_computed", "cache_steps_skipped", "output_finite", "sections"}
TOP_FIELDS = {"schema", "created", "command", "compare", "settings", "device", "devices", "versions", "matmul_peak",
              "runs", "comparisons", "constant_work"}
STATISTICS = {"mean", "std", "min", "median", "max", "count"}


def test_tiny_preset_writes_every_field(tmp_path, capsys):
    results = bench(tmp_path, "--sections", "1,2")
    printed = capsys.readouterr().out
    assert "tokens per section" in printed and "O(1)" in printed and "MFU" in printed

    assert set(results) == TOP_FIELDS
    assert results["schema"] == "framepack-bench/1" and results["command"].startswith("framepack bench --preset tiny")
    assert {"engine", "python", "torch", "cuda", "triton"} <= set(results["versions"])
    assert results["device"]["type"] == "cpu" and results["device"]["torch_threads"] == 1
    (peak,) = results["matmul_peak"].values()
    assert peak["dtype"] == "float32" and peak["size"] == 256 and peak["tflops"] > 0
    assert [run["plan_sections"] for run in results["runs"]] == [1, 2]

    for run in results["runs"]:
        assert set(run) == RUN_FIELDS
        for key in ("seconds_per_step", "seconds_per_section", "seconds_per_output_frame"):
            assert set(run[key]) == STATISTICS
        assert run["settings"]["device"] == "cpu" and run["settings"]["dtype"] == "float32"
        assert run["settings"]["attention"] == "sdpa"  # "auto" resolves to the backend that ran
        assert (run["height"], run["width"]) == (64, 64) and (run["latent_height"], run["latent_width"]) == (8, 8)

        # Tokens: measured from each section's inputs, equal to the analytic count, the same for every section.
        config = benchmark.DIT_PRESETS["tiny"]
        expected = flops.packed_sequence(config, 2, 2, 2, 16, 8, 8, 77, 729)
        assert run["tokens"]["total_tokens"] == expected.total_tokens == expected.latent_tokens + 729 + 77
        assert run["tokens_per_section"] == [expected.total_tokens] * run["plan_sections"]
        step_flops = flops.step_flops(config, expected)
        assert run["flops_per_step"]["total"] == step_flops.total
        assert run["flops_per_step"]["linear"] == step_flops.linear
        assert run["flops_per_step"]["attention"] == step_flops.attention
        assert run["flops_per_section"] == 2 * step_flops.total
        assert run["pixel_frames_per_section"] == 8
        assert math.isclose(run["flops_per_output_frame"], 2 * step_flops.total / 8)

        # Timing: the warm-up step is excluded; each section's steps fit inside the section's time.
        assert run["seconds_per_step"]["count"] == 2 * run["plan_sections"]
        assert run["seconds_per_section"]["count"] == run["plan_sections"]
        for section in run["sections"]:
            assert len(section["step_seconds"]) == 2 and all(s > 0 for s in section["step_seconds"])
            assert sum(section["step_seconds"]) <= section["seconds"]
        assert math.isclose(run["seconds_per_output_frame"]["mean"], run["seconds_per_section"]["mean"] / 8)
        assert math.isclose(run["achieved_tflops"], step_flops.total / run["seconds_per_step"]["mean"] / 1e12)
        assert math.isclose(run["mfu"], run["achieved_tflops"] / peak["tflops"])

        assert run["memory"]["device_peak_bytes"] is None  # CPU
        assert run["memory"]["host_peak_rss_bytes"] > 0 and run["memory"]["host_rss_anon_bytes"] > 0
        assert run["bytes_streamed_per_step"] == 0 and run["cache_steps_skipped"] == 0
        assert run["memory_plan"] is None and run["stream_stats"] is None  # no --vram-budget-gb: all resident
        assert run["cache_steps_computed"] == 2 * run["plan_sections"]
        assert run["output_finite"]
        assert run["model"]["parameters"] > 0 and run["model"]["weight_bytes"] == 4 * run["model"]["parameters"]

    (constant,) = results["constant_work"]
    assert constant["tokens_equal"] and constant["plan_sections"] == [1, 2]
    assert set(constant["seconds_per_section_by_plan"]) == {"1", "2"}
    assert results["comparisons"] == []


def test_compare_runs_each_value_on_the_same_inputs(tmp_path, capsys):
    results = bench(tmp_path, "--compare", "attention=sdpa,sdpa")
    assert "ratios to attention=sdpa" in capsys.readouterr().out
    assert [run["label"] for run in results["runs"]] == ["attention=sdpa", "attention=sdpa"]
    reference, other = results["comparisons"]
    assert reference["seconds_per_step_ratio"] == reference["speedup"] == 1.0
    assert 0 < other["seconds_per_step_ratio"] < math.inf and math.isclose(
        other["speedup"] * other["seconds_per_step_ratio"], 1.0)
    # Same seed, same weights, same inputs, same backend: the outputs agree exactly.
    assert reference["output_relative_error_vs_reference"] == other["output_relative_error_vs_reference"] == 0.0
    assert results["compare"] == {"key": "attention", "values": ["sdpa", "sdpa"]}


def test_compare_dtype_reports_the_difference_and_f1_tokens_stay_constant(tmp_path):
    results = bench(tmp_path, "--compare", "dtype=float32,bfloat16", "--variant", "f1", "--sections", "1,3")
    assert [run["settings"]["dtype"] for run in results["runs"]] == ["float32"] * 2 + ["bfloat16"] * 2
    _, half = results["comparisons"]
    # The same weights (drawn in float32, then cast) and inputs: bfloat16 lands near float32 but not on it.
    assert 0 < half["output_relative_error_vs_reference"] < 0.1
    for item in results["constant_work"]:
        assert item["tokens_equal"] and item["plan_sections"] == [1, 3]
    assert all(run["settings"]["variant"] == "f1" for run in results["runs"])


def test_random_weights_are_seeded_and_scaled():
    config = CONFIGS["guided_image"]
    first = benchmark.random_dit(config, torch.device("cpu"), torch.float32, seed=3)
    again = benchmark.random_dit(config, torch.device("cpu"), torch.bfloat16, seed=3)
    other = benchmark.random_dit(config, torch.device("cpu"), torch.float32, seed=4)
    for (name, a), b, c in zip(first.named_parameters(), again.parameters(), other.parameters()):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, rtol=1e-2, atol=1e-3)
        assert not torch.equal(a, c), name
        assert a.abs().max() > 0  # no parameter left empty
    weight = first.transformer_blocks[0].ff.net[2].weight
    assert 0.3 < weight.std().item() * math.sqrt(weight.shape[1]) < 0.7


@pytest.mark.parametrize("text,message", [
    ("nothing=1,2", "KEY=V1,V2"), ("attention", "KEY=V1,V2"), ("steps=a,b", "int values"), ("dtype=", "no values")])
def test_bad_compare_says_how_to_write_it(text, message):
    with pytest.raises(FramePackError, match=message):
        benchmark.parse_compare(text)


def test_bad_settings_fail_before_any_work(tmp_path):
    with pytest.raises(FramePackError, match="does not exist"):
        bench(tmp_path, out=tmp_path / "missing" / "out.json")
    for change, message in [({"sections": (1, 0)}, "sections"), ({"steps": 0}, "steps"),
                            ({"resolution": 8}, "resolution"), ({"preset": "huge"}, "preset"),
                            ({"compare_typo": 1}, None)]:
        if message is None:
            with pytest.raises(TypeError):
                benchmark.BenchSettings(**change)
            continue
        with pytest.raises(FramePackError, match=message):
            benchmark.BenchSettings(**change).validate()
    with pytest.raises(FramePackError, match="--sections"):
        benchmark.parse_sections("1,x")
    with pytest.raises(FramePackError, match=r"needs 48\.0 GiB .* has 16\.0 GiB free"):
        benchmark.check_fits("full", 48 * 2**30, 16 * 2**30, torch.device("cpu"), torch.float32)
    benchmark.check_fits("full", 8 * 2**30, 16 * 2**30, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("free_gib, dtype, fixes, not_offered", [
    (8, "float32", ["--preset small (5.4 GiB)", "--preset tiny (0.0 GiB)"], ["--dtype"]),
    (30, "float32", ["--dtype bfloat16 (24.0 GiB)", "--preset small (5.4 GiB)"], []),
    (1, "bfloat16", ["--preset tiny (0.0 GiB)"], ["--preset small", "--dtype"]),
])
def test_bench_on_a_machine_too_small_for_the_full_model_names_the_presets_that_fit(monkeypatch, capsys, free_gib,
                                                                                     dtype, fixes, not_offered):
    """`framepack bench` with no preset: the refusal names `--preset small` (it said "a smaller --preset"), before
    anything runs (the matmul peak was measured first)."""
    from framepack_engine.commands.main import main

    monkeypatch.setattr(benchmark, "free_memory_bytes", lambda device: free_gib * 2**30)
    monkeypatch.setattr(benchmark, "measure_matmul_peak", lambda *args: pytest.fail("ran before the refusal"))
    assert main(["bench", "--device", "cpu", "--dtype", dtype]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: Preset 'full' (the default) needs "), error
    for fix in fixes:
        assert fix in error[0]
    for fix in not_offered:
        assert fix not in error[0]


@pytest.mark.gpu
def test_tiny_preset_on_cuda(tmp_path):
    results = bench(tmp_path, "--device", "cuda", "--dtype", "bfloat16", "--matmul-size", "2048",
                    "--compare", "attention=sdpa,triton")
    for run in results["runs"]:
        assert run["memory"]["device_peak_bytes"] >= run["model"]["weight_bytes"]
        assert run["settings"]["dtype"] == "bfloat16" and run["seconds_per_step"]["mean"] > 0
    assert results["matmul_peak"] and all(peak["dtype"] == "bfloat16" for peak in results["matmul_peak"].values())
    assert results["comparisons"][1]["output_relative_error_vs_reference"] < 2e-2


def test_compare_quantize_reports_bytes_and_error_on_the_same_weights(tmp_path):
    from framepack_engine.runtime.quant import QuantScheme, quantized_weight_bytes

    results = bench(tmp_path, "--compare", "quantize=none,int8,int4")
    none, int8, int4 = (run["model"] for run in results["runs"])
    assert none["parameters"] == int8["parameters"] == int4["parameters"]
    # The weight bytes drop by exactly the block linears' float32 bytes minus their quantized bytes.
    model = benchmark.random_dit(benchmark.DIT_PRESETS["tiny"], torch.device("cpu"), torch.float32)
    layers = [layer for _, layer in model.block_linears()]
    for run, scheme in ((int8, QuantScheme("int8")), (int4, QuantScheme("int4"))):
        saved = sum(4 * layer.weight.numel() - quantized_weight_bytes(layer.out_features, layer.in_features, scheme)
                    for layer in layers)
        assert run["weight_bytes"] == none["weight_bytes"] - saved
    _, int8_ratio, int4_ratio = results["comparisons"]
    assert int8_ratio["weight_bytes_ratio"] < 1 and int4_ratio["weight_bytes_ratio"] < int8_ratio["weight_bytes_ratio"]
    # Same float weights and inputs: the error is quantization's alone, int4's above int8's.
    assert 0 < int8_ratio["output_relative_error_vs_reference"] < int4_ratio["output_relative_error_vs_reference"] < 0.1
    assert all(run["bytes_streamed_per_step"] == 0 for run in results["runs"])
