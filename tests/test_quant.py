"""Quantized weights (engine/quant.py): accuracy per format, bytes, checkpoints written and loaded quantized, community
fp8 files, and the options that turn it on."""

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from framepack_engine.models.dit import FramePackDiT
from framepack_engine.errors import FramePackError
from framepack_engine.runtime.quant import (METADATA_KEY, QuantizedLinear, QuantScheme, quantize_dit, quantize_llama, quantize_weight, quantized_layers, quantized_weight_bytes)
from framepack_engine.commands.quantize import write_quantized_checkpoint
from tests.utils import TINY_CONFIG, randomize_weights_, section_inputs
from tests.utils import assert_relative_error, measure_dit_load, relative_error

SCHEMES = {"fp8": QuantScheme("fp8"), "int8": QuantScheme("int8"), "int4": QuantScheme("int4")}
# The real head size and block structure at a reduced width and depth (the "small" preset's blocks, 2 heads).
SMALL_CONFIG = {**TINY_CONFIG, "num_attention_heads": 2, "attention_head_dim": 128, "rope_axes_dim": [16, 56, 56],
                "num_layers": 2, "num_single_layers": 2, "mlp_ratio": 4.0, "text_embed_dim": 64}
INPUT_SIZE = dict(height=6, width=8, window=2)
CONFIGS = {"tiny": TINY_CONFIG, "small": SMALL_CONFIG}
# Relative error of the DiT's output against the unquantized model on random inputs (float32), measured over seeds
# 0-2 (tiny / small): fp8 7.2e-3 / 1.2e-2, int8 2.4e-3 / 2.4e-3, int4 group 64 3.6e-2 / 5.2e-2 (group 128:
# 3.8e-2 / 4.1e-2). The bounds leave about 2x; a scale on the wrong channels, a flipped zero point or sign gives
# errors of order 0.1 to 1 (test_the_bounds_catch_a_broken_quantization).
DIT_ERROR_BOUND = {"fp8": 2.5e-2, "int8": 5e-3, "int4": 0.1}
# The Llama encoder's hidden states (every layer; default init): measured at most fp8 5.7e-2, int8 1.6e-2, int4 0.19.
LLAMA_ERROR_BOUND = {"fp8": 0.1, "int8": 3e-2, "int4": 0.35}

def random_dit(config, seed=0):
    return randomize_weights_(FramePackDiT.from_config(config), seed=seed, scale=0.5).eval()


def dit_output(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


@pytest.fixture(scope="module")
def dits():
    return {name: random_dit(config) for name, config in CONFIGS.items()}


# --------------------------------------------------------------------------------------------------------------------
# One weight


@pytest.mark.parametrize("scheme", [QuantScheme("fp8"), QuantScheme("int8"), QuantScheme("int4", 64),
                                    QuantScheme("int4", 128), QuantScheme("int4", 32)], ids=str)
def test_each_value_lands_within_half_a_step(scheme):
    weight = torch.randn(40, 200) * 0.05 + 0.01
    weight[3] *= 50  # one loud output channel: its scale must not leak into the others
    stored = quantize_weight(weight, scheme)
    layer = QuantizedLinear(200, 40, False, scheme)
    for name, tensor in stored.items():
        setattr(layer, name, nn.Parameter(tensor, requires_grad=False))
    error = (layer.dequantize() - weight).abs()
    if scheme.format == "fp8":
        # e4m3 keeps 3 mantissa bits: half a unit in the last place is 2^-4 of the value (2^-9 * scale near zero).
        step_bound = torch.maximum(weight.abs() * 2.0 ** -4, stored["weight_scale"][:, None] * 2.0 ** -9)
    elif scheme.format == "int8":
        step_bound = stored["weight_scale"][:, None] / 2
    else:
        scale = stored["weight_scale"].float().repeat_interleave(scheme.group_size, dim=1)[:, :200]
        step_bound = scale * 0.51  # half a step, plus the float16 zero point's rounding
    assert (error <= step_bound * 1.0001 + 1e-12).all()


@pytest.mark.parametrize("scheme", list(SCHEMES), ids=str)
@pytest.mark.parametrize("size", ["tiny", "small"])
def test_dit_output_error_per_format_is_bounded(dits, size, scheme):
    model = dits[size]
    quantized = quantize_dit(copy.deepcopy(model), SCHEMES[scheme])
    layers = quantized_layers(quantized)
    assert len(layers) == len(model.block_linears()) and all(layer.format == scheme for layer in layers)
    for seed in range(2):
        inputs = section_inputs(CONFIGS[size], seed=seed, **INPUT_SIZE)
        error = relative_error(dit_output(quantized, inputs), dit_output(model, inputs))
        assert 1e-5 < error <= DIT_ERROR_BOUND[scheme], f"{size} {scheme} seed {seed}: {error:.2e}"


@pytest.mark.parametrize("breakage", ["scale on the wrong channels", "zero point sign", "value sign"])
def test_the_bounds_catch_a_broken_quantization(dits, breakage):
    """The bounds above are tight enough to fail a plausible bug."""
    model = dits["tiny"]
    scheme = "int4" if breakage == "zero point sign" else "int8"
    quantized = quantize_dit(copy.deepcopy(model), SCHEMES[scheme])
    with torch.no_grad():
        for layer in quantized_layers(quantized):
            if breakage == "scale on the wrong channels":
                layer.weight_scale.copy_(layer.weight_scale.flip(0))
            elif breakage == "zero point sign":
                layer.weight_zero.copy_(-layer.weight_zero)
            else:
                layer.weight.copy_(-layer.weight)
    inputs = section_inputs(TINY_CONFIG, **INPUT_SIZE)
    assert relative_error(dit_output(quantized, inputs), dit_output(model, inputs)) > 5 * DIT_ERROR_BOUND[scheme]


def test_modulation_quantized_is_measured_harmless(dits):
    """Quantizing the adaptive-modulation projections too (the default) adds little to the error of the rest."""
    model = dits["small"]
    inputs = section_inputs(SMALL_CONFIG, seed=3, **INPUT_SIZE)
    expected = dit_output(model, inputs)
    for scheme in SCHEMES.values():
        without = QuantScheme(scheme.format, scheme.group_size, modulation=False)
        error_without = relative_error(dit_output(quantize_dit(copy.deepcopy(model), without), inputs), expected)
        error_with = relative_error(dit_output(quantize_dit(copy.deepcopy(model), scheme), inputs), expected)
        assert error_with <= 1.5 * error_without, (scheme.format, error_with, error_without)


@pytest.mark.parametrize("scheme", list(SCHEMES), ids=str)
def test_llama_hidden_states_error_is_bounded(scheme):
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = LlamaModel(config).eval()
    quantized = quantize_llama(copy.deepcopy(model), SCHEMES[scheme])
    assert len(quantized_layers(quantized)) == 3 * 7  # q, k, v, o, gate, up, down per layer
    assert isinstance(quantized.embed_tokens, nn.Embedding)
    tokens = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(tokens, output_hidden_states=True).hidden_states
        actual = quantized(tokens, output_hidden_states=True).hidden_states
    errors = [relative_error(a, e) for a, e in zip(actual[1:], expected[1:])]
    assert 1e-5 < max(errors) <= LLAMA_ERROR_BOUND[scheme], errors


# --------------------------------------------------------------------------------------------------------------------
# Bytes


@pytest.mark.parametrize("scheme", [QuantScheme("fp8"), QuantScheme("int8"), QuantScheme("int4", 64),
                                    QuantScheme("int4", 128)], ids=str)
def test_weight_bytes_equal_the_formula(dits, scheme):
    model = dits["small"]
    layers = model.block_linears()
    float_bytes = sum(layer.weight.numel() * 2 for _, layer in layers)  # as bf16
    quantized = quantize_dit(copy.deepcopy(model), scheme)
    stored = sum(t.numel() * t.element_size() for layer in quantized_layers(quantized) for t in layer.stored_tensors())
    expected = sum(quantized_weight_bytes(layer.out_features, layer.in_features, scheme) for _, layer in layers)
    assert stored == expected
    # Plain arithmetic: out*in bytes + 4*out (fp8, int8); out*in/2 + 4*out*in/group (int4, widths divide here).
    by_hand = sum(layer.out_features * layer.in_features * (1 if scheme.format != "int4" else 0.5)
                  + 4 * layer.out_features * (1 if scheme.format != "int4" else layer.in_features / scheme.group_size)
                  for _, layer in layers)
    assert stored == by_hand
    assert stored / float_bytes == pytest.approx({"fp8": 0.5, "int8": 0.5, "int4": 0.25}[scheme.format], rel=0.15)


def test_dtype_conversion_keeps_the_stored_format(dits):
    quantized = quantize_dit(copy.deepcopy(dits["tiny"]), SCHEMES["fp8"]).to(torch.bfloat16)
    layer = quantized_layers(quantized)[0]
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    assert not any(p.requires_grad for p in layer.parameters())


def test_kernel_path_matches_the_plain_path(dits):
    """QuantizedLinear.use_kernel runs the Triton matmul (here under the interpreter): the same DiT output."""
    from framepack_engine.runtime.quant import set_quantized_kernels

    quantized = quantize_dit(copy.deepcopy(dits["tiny"]), SCHEMES["int4"])
    inputs = section_inputs(TINY_CONFIG, height=4, width=4, window=1)
    plain = dit_output(quantized, inputs)
    kernel = dit_output(set_quantized_kernels(quantized, True), inputs)
    assert_relative_error(kernel, plain, 1e-5)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


from tests.fixtures import (framepack_transformer_folder, single_file_dit_fp8_scaled,  # noqa: E402,F401
                            tiny_dit_model, write_framepack_transformer, write_single_file_dit)


@pytest.mark.parametrize("scheme", [QuantScheme("fp8"), QuantScheme("int8"), QuantScheme("int4", 128)], ids=str)
def test_quantized_checkpoint_round_trip_is_identical(tmp_path, framepack_transformer_folder, scheme):
    out = write_quantized_checkpoint(framepack_transformer_folder, tmp_path / "quantized", scheme)
    source_shards = sorted(p.name for p in framepack_transformer_folder.glob("*.safetensors"))
    assert sorted(p.name for p in out.glob("*.safetensors")) == source_shards and len(source_shards) > 1
    index = json.loads(next(out.glob("*.index.json")).read_text())
    assert set(index["weight_map"].values()) == set(source_shards)
    from framepack_engine.runtime.sources import read_safetensors_metadata

    stored = json.loads(read_safetensors_metadata(out)[METADATA_KEY])
    assert (stored["format"], stored["group_size"]) == (scheme.format, scheme.group_size)

    loaded = FramePackDiT.from_pretrained(out, dtype=torch.float32)
    in_memory = quantize_dit(FramePackDiT.from_pretrained(framepack_transformer_folder, dtype=torch.float32), scheme)
    assert len(quantized_layers(loaded)) == len(quantized_layers(in_memory)) > 0
    for layer in quantized_layers(loaded):
        assert layer.scheme == scheme
    from tests.fixtures import TINY_DIT_CONFIG

    inputs = section_inputs(TINY_DIT_CONFIG)
    assert torch.equal(dit_output(loaded, inputs), dit_output(in_memory, inputs))


def test_single_file_output_carries_its_config(tmp_path, framepack_transformer_folder):
    out = write_quantized_checkpoint(framepack_transformer_folder, tmp_path / "dit_int8.safetensors",
                                     QuantScheme("int8"))
    loaded = FramePackDiT.from_pretrained(out, dtype=torch.float32)
    from tests.fixtures import TINY_DIT_CONFIG

    assert loaded.config.num_layers == TINY_DIT_CONFIG["num_layers"] and quantized_layers(loaded)
    with pytest.raises(FramePackError, match="already exists"):
        write_quantized_checkpoint(framepack_transformer_folder, out, QuantScheme("int8"))
    with pytest.raises(FramePackError, match="already quantized"):
        write_quantized_checkpoint(out, tmp_path / "again", QuantScheme("int4"))


def test_loading_float_weights_of_a_quantized_checkpoint_dequantizes(tmp_path, framepack_transformer_folder):
    from framepack_engine.models.checkpoints import load_dit_checkpoint

    out = write_quantized_checkpoint(framepack_transformer_folder, tmp_path / "q", QuantScheme("int4", 32))
    loaded = FramePackDiT.from_pretrained(out, dtype=torch.float32)
    _, state_dict = load_dit_checkpoint(out, dtype=torch.float32)
    for layer_name, layer in loaded.block_linears():
        assert torch.equal(state_dict[layer_name + ".weight"], layer.dequantize())


def write_bf16_folder(folder, config):
    """A model folder (config.json + two bf16 shards) of random weights, written without diffusers: it is only
    read back here."""
    from safetensors.torch import save_file

    state_dict = {k: v.to(torch.bfloat16).contiguous() for k, v in random_dit(config).state_dict().items()}
    keys = sorted(state_dict)
    folder.mkdir(parents=True)
    for index, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: state_dict[k] for k in part}, str(folder / f"model-0000{index + 1}-of-00002.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pre_quantized_load_makes_no_float_copy(tmp_path):
    """The loader assigns the memory-mapped quantized bytes: loading raises the process's peak memory (file pages
    included) by far less than the model's bf16 size, which a float copy would add, and its private memory not at
    all (the quantized weights stay file-backed)."""
    config = {**SMALL_CONFIG, "num_attention_heads": 4, "num_layers": 3, "num_single_layers": 4}
    source = write_bf16_folder(tmp_path / "source", config)
    bf16_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    assert bf16_bytes > 40 * 2**20
    out = write_quantized_checkpoint(source, tmp_path / "int4", QuantScheme("int4", 128))
    measured = measure_dit_load(out)
    assert measured["quantized"] == 3 * 14 + 4 * 6  # every block linear (modulation included)
    assert measured["peak_increase"] < 0.5 * bf16_bytes, (measured, bf16_bytes)
    assert measured["anonymous_increase"] < 0.05 * bf16_bytes, (measured, bf16_bytes)


QUANTIZE_RSS_SCRIPT = textwrap.dedent("""
    import ctypes, json, sys
    # glibc serves blocks below its mmap threshold from its heap, where freed memory stays in the process; the
    # threshold rises on its own as a process frees large blocks (loading, random fills), which makes the split
    # depend on history. Fixed here above the layers' size, so the heap case is the one measured, every run.
    ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 2**20)  # M_MMAP_THRESHOLD
    import torch, torch.nn as nn
    import framepack_engine.runtime.quant
    from framepack_engine.runtime import host_memory as memory
    from framepack_engine.runtime.quant import QuantScheme, quantize_modules
    if sys.argv[1] == "keep":  # what the process holds when nothing hands the freed memory back
        framepack_engine.runtime.quant.release_freed_host_memory = lambda: None
    start = memory.rss_anon_bytes()
    model = nn.Sequential(*[nn.Linear(1024, 4096, bias=False) for _ in range(24)])  # 384 MiB of float32
    quantize_modules(model, [str(i) for i in range(24)], QuantScheme("int8"))
    print(json.dumps({"after": memory.rss_anon_bytes() - start}))
""")
FLOAT_BYTES = 24 * 1024 * 4096 * 4


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sets glibc's malloc options")
def test_quantizing_hands_the_float_weights_memory_back():
    """Layer-by-layer quantization frees the float weights in pieces that the C allocator would keep in the
    process; after quantize_modules the anonymous memory is near the int8 size (a quarter), not the float size."""
    def anonymous_after_quantizing(mode):
        result = subprocess.run([sys.executable, "-c", QUANTIZE_RSS_SCRIPT, mode], capture_output=True, text=True,
                                check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
        return json.loads(result.stdout.strip().splitlines()[-1])["after"]

    assert anonymous_after_quantizing("release") < 0.5 * FLOAT_BYTES
    assert anonymous_after_quantizing("keep") > 0.9 * FLOAT_BYTES  # without the release the float memory stays


@pytest.mark.parametrize("layout", ["scaled e4m3 (scale_weight)", "scaled e4m3 (weight_scale)", "plain e4m3"])
def test_community_fp8_files_load_as_fp8_and_match_their_dequantized_weights(tmp_path, layout):
    from framepack_engine.models.checkpoints import load_dit_checkpoint
    from tests.fixtures import TINY_DIT_CONFIG

    state_dict = tiny_dit_model().to(torch.bfloat16).state_dict()
    path = write_single_file_dit(tmp_path / "dit_fp8.safetensors", state_dict, fp8=torch.float8_e4m3fn,
                                 scaled=layout != "plain e4m3", prefix="model.diffusion_model.",
                                 scale_style="weight_scale" if "weight_scale" in layout else "scale_weight")
    model = FramePackDiT.from_pretrained(path, dtype=torch.float32)
    layers = quantized_layers(model)
    assert len(layers) > 20 and all(layer.weight.dtype == torch.float8_e4m3fn for layer in layers)
    # The oracle: a float model from the same file with the scales folded into float32 weights.
    config, float_state_dict = load_dit_checkpoint(path, dtype=torch.float32)
    oracle = FramePackDiT.from_config(config)
    oracle.load_state_dict(float_state_dict)
    inputs = section_inputs(TINY_DIT_CONFIG)
    assert_relative_error(dit_output(model, inputs), dit_output(oracle.eval(), inputs), 1e-5)


def write_kijai_style_fp8_file(path):
    """A single file as kijai's fp8 exports are made: every 2-D weight in unscaled fp8 except those whose names hold
    "norm" (so the modulation linears, norm1.linear, stay bf16); proj_out is fp8."""
    from safetensors.torch import save_file

    state_dict = tiny_dit_model().to(torch.bfloat16).state_dict()
    fp8 = {key: tensor.to(torch.float8_e4m3fn) if key.endswith(".weight") and tensor.ndim == 2 and "norm" not in key
           else tensor.contiguous() for key, tensor in state_dict.items()}
    assert fp8["proj_out.weight"].dtype == torch.float8_e4m3fn
    save_file({"model.diffusion_model." + key: tensor for key, tensor in fp8.items()}, str(path))
    return path


def test_community_fp8_layers_outside_the_blocks_load_as_float(tmp_path):
    """A kijai-style file (proj_out, embedders and token refiner in fp8 too): only the blocks' linears stay fp8; the
    rest load as float layers holding the dequantized weight, so the head still runs in float32."""
    from framepack_engine.models.checkpoints import load_dit_checkpoint
    from tests.fixtures import TINY_DIT_CONFIG

    path = write_kijai_style_fp8_file(tmp_path / "dit.safetensors")
    model = FramePackDiT.from_pretrained(path, dtype=torch.bfloat16).set_output_precision(True)
    stored_fp8 = [layer for _, layer in model.block_linears(modulation=False)]
    assert {id(layer) for layer in quantized_layers(model)} == {id(layer) for layer in stored_fp8}
    assert model.fp32_output and model.proj_out.weight.dtype == torch.float32
    # The oracle: every fp8 weight folded into bf16 (what the blocks' quantized layers compute with), head in float32.
    config, float_state_dict = load_dit_checkpoint(path, dtype=torch.bfloat16)
    oracle = FramePackDiT.from_config(config, dtype=torch.bfloat16)
    oracle.load_state_dict(float_state_dict)
    oracle.eval().set_output_precision(True)
    inputs = section_inputs(TINY_DIT_CONFIG, dtype=torch.bfloat16)
    output = dit_output(model, inputs)
    assert output.dtype == torch.float32
    assert_relative_error(output, dit_output(oracle, inputs), 1e-5)


def test_quantize_on_load_keeps_the_layers_stored_in_that_format(tmp_path, framepack_transformer_folder):
    """A --keep-modulation int8 checkpoint loaded with quantize='int8': its memory-mapped int8 layers are kept as
    stored (not quantized again into RAM), and only its float modulation linears are quantized. Another format
    re-quantizes every layer."""
    from framepack_engine.loading import transform_dit
    from framepack_engine.settings import ModelSettings

    keep_modulation = QuantScheme("int8", modulation=False)
    out = write_quantized_checkpoint(framepack_transformer_folder, tmp_path / "q", keep_modulation)
    dit = FramePackDiT.from_pretrained(out, dtype=torch.float32)
    stored = {name: layer.weight for name, layer in dit.block_linears(modulation=False)}
    assert len(quantized_layers(dit)) == len(stored) < len(dit.block_linears())
    transform_dit(dit, ModelSettings.from_options(quantize="int8"))
    layers = dict(dit.block_linears())
    assert all(isinstance(layer, QuantizedLinear) and layer.format == "int8" for layer in layers.values())
    assert all(layers[name].weight is weight for name, weight in stored.items())
    transform_dit(dit, ModelSettings.from_options(quantize="int4"))
    assert {layer.format for layer in quantized_layers(dit)} == {"int4"}
    assert len(quantized_layers(dit)) == len(layers)


def test_quantize_on_load_completes_a_community_fp8_file(tmp_path):
    """A kijai-style fp8 file keeps its modulation linears in bf16: quantize='fp8' quantizes those and keeps the
    layers the file stores in fp8 as they are."""
    from framepack_engine.loading import transform_dit
    from framepack_engine.settings import ModelSettings

    dit = FramePackDiT.from_pretrained(write_kijai_style_fp8_file(tmp_path / "dit.safetensors"), dtype=torch.bfloat16)
    stored = {name: layer.weight for name, layer in dit.block_linears() if isinstance(layer, QuantizedLinear)}
    assert 0 < len(stored) < len(dit.block_linears())
    transform_dit(dit, ModelSettings.from_options(quantize="fp8"))
    layers = dict(dit.block_linears())
    assert all(isinstance(layer, QuantizedLinear) and layer.format == "fp8" for layer in layers.values())
    assert all(layers[name].weight is weight for name, weight in stored.items())


# --------------------------------------------------------------------------------------------------------------------
# Options


from tests.fixtures import flux_redux_folder, hunyuan_video_base_folder  # noqa: E402,F401


def test_engine_from_pretrained_quantize(framepack_transformer_folder, hunyuan_video_base_folder, flux_redux_folder):
    from framepack_engine import Engine

    engine = Engine.from_pretrained(transformer=framepack_transformer_folder, base=hunyuan_video_base_folder,
                                    image_encoder=flux_redux_folder, device="cpu", dtype=torch.float32,
                                    attention="sdpa", quantize="int8")
    assert {layer.format for layer in quantized_layers(engine.transformer)} == {"int8"}
    assert len(quantized_layers(engine.transformer)) == len(engine.transformer.block_linears())
    assert quantized_layers(engine.text_encoder.llama_model)
    video = engine.generate("a cat walks", seconds=1, resolution=64, steps=1, latent_window_size=2, fps=8)
    assert len(video.frames) == 4 * 3 - 3


def test_quantize_options_are_checked_up_front():
    from framepack_engine.settings import ModelSettings

    with pytest.raises(FramePackError, match="fp8, int8, int4"):
        ModelSettings.from_options(quantize="int3")
    with pytest.raises(FramePackError, match="quantize='fp8'"):
        ModelSettings.from_options(quantize="int8", fp8_compute=True)
    assert ModelSettings.from_options(quantize="int4").quantize == "int4"
    with pytest.raises(FramePackError, match="group size"):
        QuantScheme("int4", 100)


def test_fp8_compute_needs_fp8_tensor_cores():
    from framepack_engine.runtime.quant import check_fp8_compute_device, set_fp8_compute

    with pytest.raises(FramePackError, match="fp8 tensor cores"):
        check_fp8_compute_device(torch.device("cpu"))
    with pytest.raises(FramePackError, match="fp8 e4m3 weights"):
        set_fp8_compute(quantize_dit(random_dit(TINY_CONFIG), SCHEMES["int8"]), True)


def test_quantize_command(tmp_path, framepack_transformer_folder, capsys):
    from framepack_engine.commands.main import main

    out = tmp_path / "q"
    assert main(["quantize", str(framepack_transformer_folder), str(out), "--format", "int4", "--group-size",
                 "128"]) == 0
    assert "group size 128" in capsys.readouterr().out
    assert {layer.scheme.group_size for layer in quantized_layers(FramePackDiT.from_pretrained(out))} == {128}
    assert main(["quantize", str(framepack_transformer_folder), str(out), "--format", "int8"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(framepack_transformer_folder), str(tmp_path / "r"), "--format", "int8",
                 "--group-size", "64"]) == 2
    assert "int4 only" in capsys.readouterr().err


def test_an_interrupted_or_failed_quantize_leaves_nothing_and_can_run_again(tmp_path, framepack_transformer_folder,
                                                                            monkeypatch, capsys):
    """A shard write failing (disk full) or Ctrl-C after the first of several shards: what the run wrote is
    removed, the command says so in one line (exit 2 / 130), and the same command then succeeds."""
    import errno

    import safetensors.torch

    from framepack_engine.commands.main import main

    save_file = safetensors.torch.save_file
    out = tmp_path / "q"
    command = ["quantize", str(framepack_transformer_folder), str(out), "--format", "int8"]
    for failure, code in ((OSError(errno.ENOSPC, "No space left on device"), 2), (KeyboardInterrupt(), 130)):
        calls = []

        def second_shard_fails(tensors, filename, metadata=None):
            calls.append(filename)
            if len(calls) == 2:
                Path(filename).write_bytes(b"part of a shard")
                raise failure
            save_file(tensors, filename, metadata=metadata)

        monkeypatch.setattr(safetensors.torch, "save_file", second_shard_fails)
        assert main(command) == code
        err = capsys.readouterr().err
        message = "\n".join(line for line in err.splitlines() if line and not line.startswith("[quantize]"))
        assert len(calls) == 2 and len(message.splitlines()) == 1 and "Traceback" not in err
        assert ("No space left on device" in message) if code == 2 else message.startswith("Interrupted")
        assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    assert main(command) == 0
    assert quantized_layers(FramePackDiT.from_pretrained(out))


def test_quantize_refuses_an_existing_file_as_its_output_folder(tmp_path, framepack_transformer_folder, capsys):
    from framepack_engine.commands.main import main

    (tmp_path / "q").write_text("not a folder")
    assert main(["quantize", str(framepack_transformer_folder), str(tmp_path / "q"), "--format", "int8"]) == 2
    assert "already exists" in capsys.readouterr().err
