"""LoRA (engine/lora.py): every layout users have loads to the same weights; the DiT with a LoRA matches diffusers'
FramePack transformer with the same file through diffusers' own loader; fused equals live; unloading restores the
weights bit for bit; several LoRAs add up linearly; files for other models, pickles and odd adapters are refused.

Every fixture is written here, in tmp_path, from one set of random low-rank weights in HunyuanVideo's structure
(one lora_down per fused projection: img_attn_qkv, txt_attn_qkv, linear1, the refiner's self_attn_qkv), with ranks
and alphas that differ per module.
"""

import json

import pytest
import torch
from diffusers import HunyuanVideoFramepackPipeline, HunyuanVideoFramepackTransformer3DModel
from safetensors import safe_open
from safetensors.torch import save_file

from framepack_engine.models.dit import FramePackDiT
from framepack_engine.errors import FramePackError
from framepack_engine.runtime.lora import LoraLinear, LoraSet, read_lora
from tests.utils import (TINY_CONFIG, TOLERANCE, assert_relative_error, diffusers_config, diffusers_kwargs,
                         randomize_weights_, relative_error, section_inputs)

# HunyuanVideo's module names -> FramePack's (the checkpoint's), written out as the spec the loader must meet.
# Several names are one fused projection whose output rows are ours, in this order.
DOUBLE = {"img_mod.linear": ["norm1.linear"], "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
          "img_attn_proj": ["attn.to_out.0"], "img_mlp.fc1": ["ff.net.0.proj"], "img_mlp.fc2": ["ff.net.2"],
          "txt_mod.linear": ["norm1_context.linear"],
          "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
          "txt_attn_proj": ["attn.to_add_out"], "txt_mlp.fc1": ["ff_context.net.0.proj"],
          "txt_mlp.fc2": ["ff_context.net.2"]}
SINGLE = {"linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"], "linear2": ["proj_out"],
          "modulation.linear": ["norm.linear"]}
TOP = {"final_layer.linear": ["proj_out"], "final_layer.adaLN_modulation.1": ["norm_out.linear"],
       "time_in.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
       "txt_in.individual_token_refiner.blocks.0.self_attn_qkv": [
           f"context_embedder.token_refiner.refiner_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")]}
# diffusers' HunyuanVideo conversion splits linear1 at a hard-coded width of 3072, and treats the lora_A of the
# refiner's self_attn_qkv and of final_layer.adaLN_modulation.1 like a full weight (chunking or swapping its rows);
# these three are checked against the FramePack-named files instead of against diffusers.
NOT_READ_BY_DIFFUSERS = ("linear1", "self_attn_qkv", "final_layer.adaLN_modulation.1")


def hunyuan_modules(config=TINY_CONFIG):
    modules = {}
    for index in range(config["num_layers"]):
        modules.update({f"double_blocks.{index}.{key}": [f"transformer_blocks.{index}.{name}" for name in value]
                        for key, value in DOUBLE.items()})
    for index in range(config["num_single_layers"]):
        modules.update({f"single_blocks.{index}.{key}": [f"single_transformer_blocks.{index}.{name}" for name in value]
                        for key, value in SINGLE.items()})
    modules.update(TOP)
    return modules


def make_dit(seed=0, dtype=torch.float32):
    reference = HunyuanVideoFramepackTransformer3DModel(**diffusers_config(TINY_CONFIG)).eval()
    randomize_weights_(reference, seed=seed)
    ours = FramePackDiT.from_config(TINY_CONFIG).eval()
    ours.load_state_dict(reference.state_dict())
    return ours.to(dtype), reference


@pytest.fixture(scope="module")
def shapes():
    dit, _ = make_dit()
    return {name: (layer.out_features, layer.in_features) for name, layer in dit.linear_layers().items()}


def random_lora(shapes, modules, seed=0):
    """{original name: (down, up, alpha)}; alpha / rank from 0.5 to 2, ranks from 2 to 4."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for index, (original, targets) in enumerate(sorted(modules.items())):
        rank = 2 + index % 3
        in_features = shapes[targets[0]][1]
        out_features = sum(shapes[target][0] for target in targets)
        down = torch.randn(rank, in_features, generator=generator) / in_features ** 0.5
        up = torch.randn(out_features, rank, generator=generator) * 0.4
        lora[original] = (down, up, rank * (0.5 + 0.5 * (index % 4)))
    return lora


def framepack_view(lora, modules, shapes):
    """The same adapters under FramePack's names: fused projections split by rows, lora_down repeated."""
    view = {}
    for original, (down, up, alpha) in lora.items():
        targets = modules[original]
        if original == "final_layer.adaLN_modulation.1":
            up = torch.cat(up.chunk(2)[::-1])  # HunyuanVideo's (shift, scale) rows -> the checkpoint's (scale, shift)
        for target, part in zip(targets, up.split([shapes[target][0] for target in targets])):
            view[target] = (down, part.clone(), alpha)
    return view


def effective(view):
    return {name: up @ down * (alpha / down.shape[0]) for name, (down, up, alpha) in view.items()}


def flat(name):
    return name.replace(".", "_")


def write_kohya(path, adapters, down="lora_down", up="lora_up"):
    tensors = {}
    for name, (down_weight, up_weight, alpha) in adapters.items():
        tensors[f"lora_unet_{flat(name)}.{down}.weight"] = down_weight.clone()
        tensors[f"lora_unet_{flat(name)}.{up}.weight"] = up_weight.clone()
        tensors[f"lora_unet_{flat(name)}.alpha"] = torch.tensor(alpha)
    save_file(tensors, path)
    return path


def write_prefixed(path, adapters, prefix, *, alpha="keys", down="lora_A", up="lora_B", adapter_name=""):
    """alpha: "keys" (`<module>.alpha`, as ComfyUI reads), "metadata" (diffusers' lora_adapter_metadata) or "folded"
    (scale multiplied into lora_B, as converters to PEFT without an alpha do)."""
    tensors, ranks, alphas = {}, {}, {}
    infix = f".{adapter_name}" if adapter_name else ""
    for name, (down_weight, up_weight, module_alpha) in adapters.items():
        rank = down_weight.shape[0]
        if alpha == "folded":
            up_weight = up_weight * (module_alpha / rank)
        tensors[f"{prefix}{name}.{down}{infix}.weight"] = down_weight.clone()
        tensors[f"{prefix}{name}.{up}{infix}.weight"] = up_weight.clone()
        if alpha == "keys":
            tensors[f"{prefix}{name}.alpha"] = torch.tensor(module_alpha)
        ranks[name], alphas[name] = rank, module_alpha
    metadata = None
    if alpha == "metadata":
        # PEFT takes the first pattern matching the end of a module's name ("proj_out" matches
        # "single_transformer_blocks.0.proj_out" too): longest names first, as a careful writer orders them.
        order = sorted(adapters, key=len, reverse=True)
        config = {"r": 2, "lora_alpha": 7.0, "rank_pattern": {k: ranks[k] for k in order},
                  "alpha_pattern": {k: alphas[k] for k in order}, "target_modules": sorted(adapters)}
        metadata = {"lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in config.items()})}
    save_file(tensors, path, metadata=metadata)
    return path


def musubi_converted_name(name, fixes=True):
    """The module name musubi-tuner's `convert_lora.py --target other` writes for a module: its kohya name without
    lora_unet_, every "_" made "."; with `fixes` (its current version) some put back for HunyuanVideo names
    ("double.blocks." -> "double_blocks.", "single.blocks.", "img." -> "img_", "txt.", "attn.")."""
    converted = flat(name).replace("_", ".")
    if fixes:
        for dotted, underscored in (("double.blocks.", "double_blocks."), ("single.blocks.", "single_blocks."),
                                    ("img.", "img_"), ("txt.", "txt_"), ("attn.", "attn_")):
            converted = converted.replace(dotted, underscored)
    return converted


def write_musubi_converted(path, adapters, prefix="diffusion_model.", fixes=True, adapter_name=""):
    """As musubi-tuner's convert_lora --target other writes a kohya LoRA: lora_A/lora_B under the converted names,
    no alpha key (sqrt(alpha / rank) folded into both matrices)."""
    tensors = {}
    infix = f".{adapter_name}" if adapter_name else ""
    for name, (down, up, alpha) in adapters.items():
        module = prefix + musubi_converted_name(name, fixes)
        factor = (alpha / down.shape[0]) ** 0.5
        tensors[f"{module}.lora_A{infix}.weight"] = down * factor
        tensors[f"{module}.lora_B{infix}.weight"] = up * factor
    save_file(tensors, path)
    return path


# Each layout users have, written from the same adapters: (name, writer(path, lora, framepack view)).
LAYOUTS = {
    "kohya, HunyuanVideo names": lambda path, lora, view: write_kohya(path, lora),
    "kohya, FramePack names": lambda path, lora, view: write_kohya(path, view),
    "diffusers, FramePack names, alpha in metadata": lambda path, lora, view: write_prefixed(
        path, view, "transformer.", alpha="metadata"),
    "diffusers, HunyuanVideo names": lambda path, lora, view: write_prefixed(path, lora, "transformer.",
                                                                            alpha="folded"),
    "PEFT, adapter name in the keys": lambda path, lora, view: write_prefixed(
        path, view, "base_model.model.", alpha="folded", adapter_name="default"),
    "ComfyUI, FramePack names": lambda path, lora, view: write_prefixed(path, view, "diffusion_model."),
    "ComfyUI, HunyuanVideo names, lora_down/lora_up": lambda path, lora, view: write_prefixed(
        path, lora, "diffusion_model.", down="lora_down", up="lora_up"),
    "musubi convert_lora, FramePack names": lambda path, lora, view: write_musubi_converted(path, view),
    "musubi convert_lora without its fixes, FramePack names": lambda path, lora, view: write_musubi_converted(
        path, view, fixes=False),
    "musubi convert_lora, no prefix, adapter name": lambda path, lora, view: write_musubi_converted(
        path, view, prefix="", adapter_name="default"),
    "musubi convert_lora, HunyuanVideo names": lambda path, lora, view: write_musubi_converted(path, lora),
    "musubi convert_lora without its fixes, HunyuanVideo names": lambda path, lora, view: write_musubi_converted(
        path, lora, fixes=False),
}
MUSUBI_DOTS = " (dots for underscores, as musubi-tuner's convert_lora writes)"
DETECTED = {
    "kohya, HunyuanVideo names": "kohya/musubi-tuner, HunyuanVideo names",
    "kohya, FramePack names": "kohya/musubi-tuner, FramePack names",
    "diffusers, FramePack names, alpha in metadata": "diffusers/PEFT, FramePack names",
    "diffusers, HunyuanVideo names": "diffusers/PEFT, HunyuanVideo names",
    "PEFT, adapter name in the keys": "diffusers/PEFT, FramePack names",
    "ComfyUI, FramePack names": "ComfyUI, FramePack names",
    "ComfyUI, HunyuanVideo names, lora_down/lora_up": "ComfyUI, HunyuanVideo names",
    "musubi convert_lora, FramePack names": "ComfyUI, FramePack names" + MUSUBI_DOTS,
    "musubi convert_lora without its fixes, FramePack names": "ComfyUI, FramePack names" + MUSUBI_DOTS,
    "musubi convert_lora, no prefix, adapter name": "diffusers/PEFT, FramePack names" + MUSUBI_DOTS,
    "musubi convert_lora, HunyuanVideo names": "ComfyUI, HunyuanVideo names" + MUSUBI_DOTS,
    "musubi convert_lora without its fixes, HunyuanVideo names": "ComfyUI, HunyuanVideo names" + MUSUBI_DOTS,
}


def with_lora(dit, path, mode, strength=1.0):
    loras = LoraSet(dit)
    loras.load(path, strength, mode=mode)
    return loras


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def run_diffusers(model, inputs):
    with torch.no_grad():
        return model(**diffusers_kwargs(inputs))[0]


# ----------------------------------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_loads_to_the_same_effective_weights(tmp_path, shapes, layout):
    modules = hunyuan_modules()
    lora = random_lora(shapes, modules)
    view = framepack_view(lora, modules, shapes)
    path = LAYOUTS[layout](tmp_path / "lora.safetensors", lora, view)
    weights = read_lora(path, shapes)
    assert weights.layout == DETECTED[layout]
    expected = effective(view)
    assert sorted(weights.adapters) == sorted(expected)
    for name, delta in expected.items():
        assert_relative_error(weights.adapters[name].delta_weight(), delta, 1e-6, name)


@pytest.mark.parametrize("fixes", [True, False])
def test_a_musubi_converted_lora_matches_the_hand_merged_weights(tmp_path, fixes):
    """convert_lora --target other over every linear layer of the DiT (names like
    `diffusion_model.single.transformer.blocks.0.attn.to.k`): every layer gets W + strength * alpha / rank * up @ down,
    merged here by hand, and live gives the same output."""
    dit, _ = make_dit()
    generator = torch.Generator().manual_seed(17)
    adapters = {}
    for index, (name, layer) in enumerate(sorted(dit.linear_layers().items())):
        rank = 2 + index % 3
        adapters[name] = (torch.randn(rank, layer.in_features, generator=generator) / layer.in_features ** 0.5,
                          torch.randn(layer.out_features, rank, generator=generator) * 0.3, rank * (0.5 + index % 4))
    path = write_musubi_converted(tmp_path / "converted.safetensors", adapters, fixes=fixes)
    if not fixes:
        with safe_open(str(path), framework="pt") as handle:
            assert "diffusion_model.single.transformer.blocks.0.attn.to.k.lora_A.weight" in handle.keys()
    expected = {name: layer.weight.detach() + 0.8 * up @ down * (alpha / down.shape[0])
                for (name, layer), (down, up, alpha) in zip(sorted(dit.linear_layers().items()),
                                                            (adapters[name] for name in sorted(adapters)))}
    loras = with_lora(dit, path, "fused", 0.8)
    assert loras.describe()[0]["layers"] == len(adapters) and "convert_lora" in loras.describe()[0]["layout"]
    for name, layer in dit.linear_layers().items():
        assert_relative_error(layer.weight.detach(), expected[name], 1e-6, name)
    live, _ = make_dit()
    with_lora(live, path, "live", 0.8)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=18)
    assert_relative_error(run(live, inputs), run(dit, inputs), TOLERANCE[torch.float32])


def test_dots_and_underscores_alike_only_where_unambiguous(tmp_path):
    """Two layers whose names differ only in a dot and an underscore: each loads under its exact name, and a dotted
    name that could be either is refused, naming it."""
    shapes = {"blocks.0.to_q": (4, 4), "blocks.0.to.q": (4, 4), "blocks.0.to_out": (4, 4)}
    pair = {"lora_A.weight": torch.randn(2, 4), "lora_B.weight": torch.randn(4, 2)}
    save_file({f"diffusion_model.{module}.{key}": value.clone() for module in ("blocks.0.to_q", "blocks.0.to.q",
                                                                              "blocks.0.to.out")
               for key, value in pair.items()}, tmp_path / "exact.safetensors")
    assert sorted(read_lora(tmp_path / "exact.safetensors", shapes).adapters) == sorted(shapes)
    save_file({f"diffusion_model.blocks_0.to.q.{key}": value for key, value in pair.items()},
              tmp_path / "ambiguous.safetensors")
    with pytest.raises(FramePackError, match=r"'diffusion_model\.blocks_0\.to\.q' could name more than one layer"):
        read_lora(tmp_path / "ambiguous.safetensors", shapes)


def text_encoder_keys(generator):
    """Text-encoder adapters as kohya (lora_te_, lora_te1_, lora_te2_) and diffusers (text_encoder.) write them: 9."""
    keys = {}
    for prefix in ("lora_te_", "lora_te1_", "lora_te2_"):
        module = f"{prefix}text_model_encoder_layers_0_self_attn_q_proj"
        keys.update({f"{module}.lora_down.weight": torch.randn(2, 8, generator=generator),
                     f"{module}.lora_up.weight": torch.randn(8, 2, generator=generator),
                     f"{module}.alpha": torch.tensor(2.0)} if prefix != "lora_te2_" else
                    {f"{module}.lora_down.weight": torch.randn(2, 8, generator=generator)})
    module = "text_encoder.text_model.encoder.layers.0.self_attn.k_proj"
    keys.update({f"{module}.lora_A.weight": torch.randn(2, 8, generator=generator),
                 f"{module}.lora_B.weight": torch.randn(8, 2, generator=generator)})
    return keys


def test_text_encoder_keys_are_skipped_with_one_warning(tmp_path, shapes):
    from safetensors.torch import load_file

    from framepack_engine.errors import FramePackWarning

    modules = hunyuan_modules()
    plain = write_kohya(tmp_path / "plain.safetensors", random_lora(shapes, modules, seed=19))
    tensors = load_file(plain)
    tensors.update(text_encoder_keys(torch.Generator().manual_seed(19)))
    save_file(tensors, tmp_path / "with_te.safetensors")
    with pytest.warns(FramePackWarning) as caught:
        weights = read_lora(tmp_path / "with_te.safetensors", shapes)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "skipped its 9 text-encoder keys" in message and "\n" not in message
    expected = read_lora(plain, shapes)
    assert weights.layout == expected.layout and sorted(weights.adapters) == sorted(expected.adapters)
    for name, adapter in expected.adapters.items():
        assert torch.equal(weights.adapters[name].delta_weight(), adapter.delta_weight()), name
    # Through LoraSet too: the DiT gets the same weights as from the file without them.
    dit, _ = make_dit()
    reference, _ = make_dit()
    with pytest.warns(FramePackWarning, match="9 text-encoder keys"):
        with_lora(dit, tmp_path / "with_te.safetensors", "fused", 0.6)
    with_lora(reference, plain, "fused", 0.6)
    assert all(torch.equal(value, reference.state_dict()[key]) for key, value in dit.state_dict().items())


def test_a_file_with_only_text_encoder_keys_is_an_error(tmp_path, shapes):
    save_file(text_encoder_keys(torch.Generator().manual_seed(20)), tmp_path / "te_only.safetensors")
    with pytest.raises(FramePackError, match="holds nothing for the DiT: all its 9 keys are text-encoder adapters"):
        read_lora(tmp_path / "te_only.safetensors", shapes)


def test_musubi_split_projections_become_one_adapter_per_layer(tmp_path, shapes):
    """musubi-tuner's split_dims LoRA: img_attn_qkv as lora_down.0-2 / lora_up.0-2, one pair per q, k, v."""
    generator = torch.Generator().manual_seed(3)
    targets = [f"transformer_blocks.1.attn.{name}" for name in ("to_q", "to_k", "to_v")]
    downs = [torch.randn(2, 32, generator=generator) for _ in targets]
    ups = [torch.randn(32, 2, generator=generator) for _ in targets]
    tensors = {f"lora_unet_double_blocks_1_img_attn_qkv.lora_down.{i}.weight": down for i, down in enumerate(downs)}
    tensors.update({f"lora_unet_double_blocks_1_img_attn_qkv.lora_up.{i}.weight": up for i, up in enumerate(ups)})
    tensors["lora_unet_double_blocks_1_img_attn_qkv.alpha"] = torch.tensor(3.0)
    save_file(tensors, tmp_path / "split.safetensors")
    weights = read_lora(tmp_path / "split.safetensors", shapes)
    for target, down, up in zip(targets, downs, ups):
        assert_relative_error(weights.adapters[target].delta_weight(), up @ down * 1.5, 1e-6, target)


def test_framepack_only_layers_and_rank_stabilized_scale(tmp_path, shapes):
    """Layers HunyuanVideo lacks (the SigLIP image projection) load under FramePack's names; musubi-tuner's
    use_rslora_flag scales by alpha / sqrt(rank)."""
    generator = torch.Generator().manual_seed(4)
    down, up = torch.randn(4, 20, generator=generator), torch.randn(96, 4, generator=generator)
    save_file({"lora_unet_image_projection_up.lora_down.weight": down, "lora_unet_image_projection_up.lora_up.weight": up,
               "lora_unet_image_projection_up.alpha": torch.tensor(8.0), "use_rslora_flag": torch.tensor(True)},
              tmp_path / "rs.safetensors")
    adapter = read_lora(tmp_path / "rs.safetensors", shapes).adapters["image_projection.up"]
    assert adapter.scale == pytest.approx(8.0 / 2.0)
    assert_relative_error(adapter.delta_weight(), up @ down * 4.0, 1e-6)


def test_peft_folder_with_adapter_config(tmp_path, shapes):
    """PEFT's save_pretrained folder (diffusion-pipe writes one): alpha from adapter_config.json."""
    modules = {key: value for key, value in hunyuan_modules().items() if key.startswith("double_blocks.0.")}
    lora = random_lora(shapes, modules, seed=5)
    view = framepack_view(lora, modules, shapes)
    folder = tmp_path / "epoch10"
    folder.mkdir()
    write_prefixed(folder / "adapter_model.safetensors", view, "transformer.", alpha="none")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"r": 3, "lora_alpha": 6, "alpha_pattern": {"transformer_blocks.0.attn.to_q": 1.0}}))
    weights = read_lora(folder, shapes)
    for name, (down, up, _) in view.items():
        alpha = 1.0 if name == "transformer_blocks.0.attn.to_q" else 6.0
        assert_relative_error(weights.adapters[name].delta_weight(), up @ down * (alpha / down.shape[0]), 1e-6, name)


# ----------------------------------------------------------------------------------------------------------------------
# The DiT with a LoRA against diffusers' loader


# PEFT also puts a (zero, so inert) adapter on the refiner's timestep embedder, whose name ends like time_in's.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")
@pytest.mark.parametrize("layout,mode", [("diffusers, FramePack names, alpha in metadata", "fused"),
                                         ("diffusers, HunyuanVideo names", "fused"),
                                         ("ComfyUI, HunyuanVideo names (no alpha)", "fused"),
                                         ("diffusers, HunyuanVideo names", "live")])
def test_matches_diffusers_with_its_own_loader(tmp_path, shapes, layout, mode):
    modules = {key: value for key, value in hunyuan_modules().items()
               if not any(key.endswith(skipped) for skipped in NOT_READ_BY_DIFFUSERS)}
    lora = random_lora(shapes, modules, seed=1)
    path = tmp_path / "lora.safetensors"
    if layout.startswith("ComfyUI"):
        write_prefixed(path, lora, "diffusion_model.", alpha="folded")
    else:
        LAYOUTS[layout](path, lora, framepack_view(lora, modules, shapes))
    ours, reference = make_dit(seed=2)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=5)
    base_output = run(ours, inputs)

    pipeline = HunyuanVideoFramepackPipeline(transformer=reference, vae=None, text_encoder=None, tokenizer=None,
                                             text_encoder_2=None, tokenizer_2=None, image_encoder=None,
                                             feature_extractor=None, scheduler=None)
    pipeline.load_lora_weights(str(path), adapter_name="test")
    with_lora(ours, path, mode)
    expected = run_diffusers(reference, inputs)
    assert relative_error(expected, base_output) > 0.05  # the LoRA changes the output: the comparison means something
    assert_relative_error(run(ours, inputs), expected, TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------------------------------------------------
# Fused and live, unloading, strengths


@pytest.fixture
def two_loras(tmp_path, shapes):
    modules = hunyuan_modules()
    first = write_kohya(tmp_path / "first.safetensors", random_lora(shapes, modules, seed=6))
    second_view = framepack_view(random_lora(shapes, modules, seed=7), modules, shapes)
    second = write_prefixed(tmp_path / "second.safetensors", second_view, "diffusion_model.")
    return first, second


def test_fused_equals_live(two_loras):
    fused, _ = make_dit()
    live, _ = make_dit()
    inputs = section_inputs(TINY_CONFIG, "f1", seed=6)
    with_lora(fused, two_loras[0], "fused", 0.8)
    loras = with_lora(live, two_loras[0], "live", 0.8)
    assert isinstance(live.linear_layers()["single_transformer_blocks.0.proj_mlp"], LoraLinear)
    assert not any(isinstance(layer, LoraLinear) for layer in fused.linear_layers().values())
    assert_relative_error(run(live, inputs), run(fused, inputs), TOLERANCE[torch.float32])
    assert loras.describe()[0]["layers"] == len(read_lora(two_loras[0], {
        name: (layer.out_features, layer.in_features) for name, layer in fused.linear_layers().items()}).adapters)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fused", "live"])
def test_unload_restores_the_weights_exactly(two_loras, mode, dtype):
    dit, _ = make_dit(dtype=dtype)
    original = {key: value.clone() for key, value in dit.state_dict().items()}
    loras = LoraSet(dit)
    first = loras.load(two_loras[0], 0.7, mode=mode)
    second = loras.load(two_loras[1], -1.3, mode=mode)
    loras.set_strength(first, 2.0)
    # The state dict keeps the checkpoint's keys with live adapters attached (and the base weights under them).
    assert list(sorted(dit.state_dict())) == sorted(original)
    changed = any(not torch.equal(value, original[key]) for key, value in dit.state_dict().items())
    assert changed == (mode == "fused")
    loras.unload(first)
    loras.unload(second)
    assert not len(loras)
    assert not any(isinstance(layer, LoraLinear) for layer in dit.linear_layers().values())
    for key, value in dit.state_dict().items():
        assert torch.equal(value, original[key]), key


@pytest.mark.parametrize("mode", ["fused", "live"])
def test_two_loras_with_strengths_add_linearly(two_loras, shapes, mode):
    """W + 0.6 * delta1 - 1.1 * delta2, whatever the order of loading and of strength changes."""
    dit, _ = make_dit()
    expected_dit, _ = make_dit()
    deltas = [read_lora(path, shapes).adapters for path in two_loras]
    with torch.no_grad():
        for name, layer in expected_dit.linear_layers().items():
            for strength, adapters in zip((0.6, -1.1), deltas):
                if name in adapters:
                    layer.weight += strength * adapters[name].delta_weight()
    loras = LoraSet(dit)
    second = loras.load(two_loras[1], 0.3, mode=mode)
    loras.load(two_loras[0], 0.6, name="style", mode=mode)
    loras.set_strength(second, -1.1)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=8)
    assert_relative_error(run(dit, inputs), run(expected_dit, inputs), TOLERANCE[torch.float32])
    assert [(item["name"], item["strength"]) for item in loras.describe()] == [("second", -1.1), ("style", 0.6)]


def test_fused_and_live_loras_together(two_loras):
    mixed, _ = make_dit()
    live, _ = make_dit()
    loras = LoraSet(mixed)
    loras.load(two_loras[0], 0.5, mode="live")
    loras.load(two_loras[1], 1.5, mode="fused")
    both = LoraSet(live)
    both.load(two_loras[0], 0.5, mode="live")
    both.load(two_loras[1], 1.5, mode="live")
    inputs = section_inputs(TINY_CONFIG, "f1", seed=9)
    assert_relative_error(run(mixed, inputs), run(live, inputs), TOLERANCE[torch.float32])


def test_released_originals_make_fused_loras_permanent(two_loras):
    """Before quantizing, the loader drops the originals' host copies: the LoRAs fused so far stay for good, and
    later ones still come and go exactly on top of them."""
    dit, _ = make_dit()
    expected, _ = make_dit()
    loras = LoraSet(dit)
    loras.load(two_loras[0], 0.5)
    loras.release_originals()
    for change in (lambda: loras.unload("first"), lambda: loras.set_strength("first", 1.0)):
        with pytest.raises(FramePackError, match="for good"):
            change()
    merged = {key: value.clone() for key, value in dit.state_dict().items()}
    loras.load(two_loras[1], 0.3)
    inputs = section_inputs(TINY_CONFIG, "f1", seed=16)
    reference = LoraSet(expected)
    reference.load(two_loras[0], 0.5)
    reference.load(two_loras[1], 0.3)
    assert_relative_error(run(dit, inputs), run(expected, inputs), TOLERANCE[torch.float32])
    loras.unload("second")
    assert all(torch.equal(value, merged[key]) for key, value in dit.state_dict().items())
    assert [item["name"] for item in loras.describe()] == ["first"]


def test_live_strength_changes_without_touching_the_weights(two_loras):
    dit, _ = make_dit()
    reference, _ = make_dit()
    loras = with_lora(dit, two_loras[0], "live", 1.0)
    weights = {key: value.clone() for key, value in dit.state_dict().items()}
    loras.set_strength("first", 0.25)
    with_lora(reference, two_loras[0], "fused", 0.25)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=10)
    assert_relative_error(run(dit, inputs), run(reference, inputs), TOLERANCE[torch.float32])
    assert all(torch.equal(value, weights[key]) for key, value in dit.state_dict().items())
    # Other base weights load strictly under the live wrappers, which keep their adapters.
    other, _ = make_dit(seed=5)
    dit.load_state_dict(other.state_dict())
    with_lora(other, two_loras[0], "fused", 0.25)
    assert_relative_error(run(dit, inputs), run(other, inputs), TOLERANCE[torch.float32])


def test_lora_b_bias_fused_and_live_and_the_in_place_branch(tmp_path, shapes):
    """A lora_B bias (PEFT's lora_bias) adds strength * scale * bias in both modes; the live branch accumulated into
    the layer's output in place equals the plain out-of-place sum used when gradients are wanted."""
    generator = torch.Generator().manual_seed(15)
    name = "transformer_blocks.0.ff.net.2"
    out_features, in_features = shapes[name]
    down, up = torch.randn(3, in_features, generator=generator), torch.randn(out_features, 3, generator=generator)
    bias = torch.randn(out_features, generator=generator)
    save_file({f"diffusion_model.{name}.lora_A.weight": down, f"diffusion_model.{name}.lora_B.weight": up,
               f"diffusion_model.{name}.lora_B.bias": bias, f"diffusion_model.{name}.alpha": torch.tensor(6.0)},
              tmp_path / "bias.safetensors")
    fused, _ = make_dit()
    live, _ = make_dit()
    layer = fused.linear_layers()[name]
    expected_weight = layer.weight.detach() + 0.7 * 2.0 * up @ down
    expected_bias = layer.bias.detach() + 0.7 * 2.0 * bias
    with_lora(fused, tmp_path / "bias.safetensors", "fused", 0.7)
    with_lora(live, tmp_path / "bias.safetensors", "live", 0.7)
    assert_relative_error(layer.weight.detach(), expected_weight, 1e-6)
    assert_relative_error(layer.bias.detach(), expected_bias, 1e-6)
    x = torch.randn(2, 5, in_features, generator=generator)
    expected = torch.nn.functional.linear(x, expected_weight, expected_bias)
    with torch.no_grad():
        in_place = live.linear_layers()[name](x)
    plain = live.linear_layers()[name](x.requires_grad_())
    assert plain.requires_grad
    assert_relative_error(in_place, expected, TOLERANCE[torch.float32])
    assert_relative_error(plain.detach(), expected, TOLERANCE[torch.float32])


def test_live_branch_follows_the_float32_output_projection(tmp_path, shapes):
    """A live adapter on proj_out computes in float32 once set_output_precision(float32) converts the layer."""
    dit, _ = make_dit(dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(11)
    save_file({"diffusion_model.proj_out.lora_A.weight": torch.randn(2, 32, generator=generator),
               "diffusion_model.proj_out.lora_B.weight": torch.randn(16, 2, generator=generator)},
              tmp_path / "out.safetensors")
    with_lora(dit, tmp_path / "out.safetensors", "live")
    dit.set_output_precision(float32=True)
    assert dit.fp32_output
    branch = next(iter(dit.linear_layers()["proj_out"].branches.values()))
    assert branch.up.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# Bad input


def test_lora_for_another_model_is_refused_whole(tmp_path, shapes):
    dit, _ = make_dit()
    before = {key: value.clone() for key, value in dit.state_dict().items()}
    generator = torch.Generator().manual_seed(12)
    tensors = {"lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight": torch.randn(2, 32, generator=generator),
               "lora_unet_transformer_blocks_0_attn_to_q.lora_up.weight": torch.randn(32, 2, generator=generator)}
    for index in range(5):  # an SDXL UNet's names
        name = f"lora_unet_down_blocks_{index}_attentions_0_proj_in"
        tensors[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=generator)
    save_file(tensors, tmp_path / "sdxl.safetensors")
    with pytest.raises(FramePackError) as error:
        LoraSet(dit).load(tmp_path / "sdxl.safetensors")
    message = str(error.value)
    assert "5 of its 6 modules match no linear layer" in message
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in message and "kohya/musubi-tuner" in message
    assert all(torch.equal(value, before[key]) for key, value in dit.state_dict().items())


def test_shape_mismatch_names_the_layer(tmp_path, shapes):
    save_file({"transformer.single_transformer_blocks.1.proj_mlp.lora_A.weight": torch.randn(2, 48),
               "transformer.single_transformer_blocks.1.proj_mlp.lora_B.weight": torch.randn(64, 2)},
              tmp_path / "wide.safetensors")
    with pytest.raises(FramePackError, match=r"does not fit layer 'single_transformer_blocks\.1\.proj_mlp'"):
        read_lora(tmp_path / "wide.safetensors", shapes)
    save_file({"lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(2, 32),
               "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(3 * 3072 + 12288, 2)},
              tmp_path / "hunyuan_13b.safetensors")
    with pytest.raises(FramePackError, match="single_blocks.0.linear1.*another size"):
        read_lora(tmp_path / "hunyuan_13b.safetensors", shapes)


@pytest.mark.parametrize("keys,message", [
    ({"transformer.proj_out.lora_A.weight": (2, 32)}, "no lora_up weight for 'transformer.proj_out'"),
    ({"diffusion_model.proj_out.lora_A.weight": (2, 32), "diffusion_model.proj_out.lora_B.weight": (16, 2),
      "diffusion_model.proj_out.dora_scale": (16, 1)}, "DoRA"),
    ({"lora_unet_proj_out.hada_w1_a": (16, 2)}, "LoHa"),
    ({"lora_unet_proj_out.alpha": ()}, "holds no LoRA weights"),
    ({"lora_unet_proj_out.lora_down.weight": (2, 32), "lora_unet_proj_out.lora_up.weight": (16, 3)},
     "not a matching pair"),
])
def test_incomplete_and_unsupported_files(tmp_path, shapes, keys, message):
    save_file({key: torch.randn(shape) for key, shape in keys.items()}, tmp_path / "bad.safetensors")
    with pytest.raises(FramePackError, match=message):
        read_lora(tmp_path / "bad.safetensors", shapes)


def test_pickles_missing_and_unreadable_files_are_refused(tmp_path, shapes):
    (tmp_path / "lora.pt").write_bytes(b"not opened")
    with pytest.raises(FramePackError, match="pickle"):
        read_lora(tmp_path / "lora.pt", shapes)
    with pytest.raises(FramePackError, match="does not exist"):
        read_lora(tmp_path / "missing.safetensors", shapes)
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FramePackError, match="not a readable safetensors file"):
        read_lora(tmp_path / "broken.safetensors", shapes)


def test_names_strengths_and_modes_are_checked(two_loras):
    dit, _ = make_dit()
    loras = LoraSet(dit)
    loras.load(two_loras[0])
    with pytest.raises(FramePackError, match="already loaded"):
        loras.load(two_loras[0])
    with pytest.raises(FramePackError, match="No LoRA named 'other'"):
        loras.unload("other")
    with pytest.raises(FramePackError, match="finite number"):
        loras.set_strength("first", float("nan"))
    with pytest.raises(FramePackError, match="Unknown LoRA mode"):
        loras.load(two_loras[1], mode="merged")


def test_fusing_into_a_layer_without_float_weights_says_to_go_live(two_loras):
    """Over a quantized-like layer (int8 weight and a scale, no float weight) fused is refused before anything
    changes, and live runs beside it: the same as fusing into the dequantized weights."""

    class Int8Linear(torch.nn.Module):
        def __init__(self, linear):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            scale = linear.weight.detach().abs().amax(dim=1, keepdim=True) / 127
            self.register_buffer("scale", scale)
            self.register_buffer("weight", torch.round(linear.weight.detach() / scale).to(torch.int8))
            self.register_buffer("bias", linear.bias.detach().clone())

        def dequantized(self):
            return self.weight.float() * self.scale

        def forward(self, x):
            return torch.nn.functional.linear(x, self.dequantized(), self.bias)

    dit, _ = make_dit()
    expected, _ = make_dit()
    with torch.no_grad():
        for name, layer in dit.linear_layers().items():
            if name.startswith("single_transformer_blocks."):
                quantized = Int8Linear(layer)
                dit.replace_layer(name, quantized)
                expected.linear_layers()[name].weight.copy_(quantized.dequantized())
    with pytest.raises(FramePackError, match="mode='live'"):
        LoraSet(dit).load(two_loras[0], mode="fused")
    assert not any(isinstance(layer, LoraLinear) for layer in dit.linear_layers().values())
    with_lora(dit, two_loras[0], "live", 0.9)
    with_lora(expected, two_loras[0], "fused", 0.9)
    assert isinstance(dit.linear_layers()["single_transformer_blocks.0.proj_mlp"].base, Int8Linear)
    inputs = section_inputs(TINY_CONFIG, "f1", seed=13)
    assert_relative_error(run(dit, inputs), run(expected, inputs), TOLERANCE[torch.float32])


# ----------------------------------------------------------------------------------------------------------------------
# The engine, the command and the loader


FAST = dict(steps=2, latent_window_size=2, fps=8, seconds=1)


def random_framepack_lora(path, dit, seed, prefix="lora_unet_"):
    """A kohya-layout LoRA over every linear layer of `dit`, in FramePack's names."""
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, layer in dit.linear_layers().items():
        adapters[name] = (torch.randn(2, layer.in_features, generator=generator) / layer.in_features ** 0.5,
                          torch.randn(layer.out_features, 2, generator=generator) * 0.3, 4.0)
    return write_kohya(path, adapters)


@pytest.fixture(scope="module")
def tiny_engine():
    from framepack_engine import Engine

    return Engine.from_preset("tiny")


def test_engine_loads_several_loras_and_records_them(tmp_path, tiny_engine):
    engine = tiny_engine
    base = engine.generate("a cat walks", **FAST).frames
    weights = {key: value.clone() for key, value in engine.transformer.state_dict().items()}
    first = random_framepack_lora(tmp_path / "first.safetensors", engine.transformer, seed=20)
    second = random_framepack_lora(tmp_path / "second.safetensors", engine.transformer, seed=21)
    assert engine.load_lora(first, 0.8) == "first"
    assert engine.load_lora(second, 0.5, name="motion", mode="live") == "motion"
    video = engine.generate("a cat walks", **FAST)
    assert not (video.frames == base).all()
    assert [(item["name"], item["file"], item["strength"], item["mode"]) for item in video.metadata["loras"]] == [
        ("first", "first.safetensors", 0.8, "fused"), ("motion", "second.safetensors", 0.5, "live")]
    assert str(tmp_path) not in json.dumps(video.metadata)  # the file's name only, never the machine's folders
    engine.set_lora_strength("first", 0.0)
    engine.set_lora_strength("motion", 0.0)
    assert (engine.generate("a cat walks", **FAST).frames == base).all()
    engine.unload_lora("first")
    engine.unload_lora("motion")
    assert "loras" not in engine.metadata(engine.settings("a cat walks"), "t2v")
    assert all(torch.equal(value, weights[key]) for key, value in engine.transformer.state_dict().items())


def test_the_command_takes_repeated_loras(tmp_path, tiny_engine):
    from framepack_engine.commands.main import main

    first = random_framepack_lora(tmp_path / "first.safetensors", tiny_engine.transformer, seed=22)
    second = random_framepack_lora(tmp_path / "second.safetensors", tiny_engine.transformer, seed=23)
    out = tmp_path / "frames"
    command = ["generate", "x", "--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8",
               "--seconds", "1", "--quiet", "--out", str(out)]
    assert main([*command, "--lora", f"{first}:0.5", "--lora", str(second), "--lora-mode", "live"]) == 0
    recorded = json.loads((out / "settings.json").read_text())["loras"]
    assert [(item["name"], item["strength"], item["mode"]) for item in recorded] == [
        ("first", 0.5, "live"), ("second", 1.0, "live")]


@pytest.mark.parametrize("lora,message", [("missing.safetensors", "does not exist"), ("{tmp}/style.ckpt", "pickle"),
                                          ("{tmp}/style.safetensors:x2", "does not exist")])
def test_the_command_checks_loras_before_loading(tmp_path, capsys, lora, message):
    from framepack_engine.commands.main import main

    (tmp_path / "style.ckpt").write_bytes(b"never opened")
    (tmp_path / "style.safetensors").write_bytes(b"never opened")
    code = main(["generate", "x", "--preset", "tiny", "--quiet", "--out", str(tmp_path / "v.mp4"),
                 "--lora", lora.format(tmp=tmp_path)])
    assert code == 2 and message in capsys.readouterr().err


def test_settings_parse_lora_flags_and_pairs(tmp_path):
    import argparse

    from framepack_engine.settings import ModelSettings, add_flags, given_flags

    path = tmp_path / "style.safetensors"
    path.write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_flags(parser, ModelSettings)
    args = parser.parse_args(["--lora", f"{path}:0.7", "--lora", str(path), "--lora-mode", "live"])
    settings = ModelSettings.from_options(**given_flags(args, ModelSettings))
    assert settings.lora == [(str(path), 0.7), (str(path), 1.0)] and settings.lora_mode == "live"
    assert ModelSettings.from_options(lora=(path, -0.5)).lora == [(str(path), -0.5)]
    assert ModelSettings.from_options(lora=settings.lora).lora == settings.lora  # checks are idempotent
    with pytest.raises(FramePackError, match="lora strength must be a finite number"):
        ModelSettings.from_options(lora=f"{path}:inf")


@pytest.mark.parametrize("mode", ["fused", "live"])
def test_the_loader_attaches_the_settings_loras(tmp_path, two_loras, mode):
    from framepack_engine.loading import transform_dit
    from framepack_engine.settings import ModelSettings

    dit, _ = make_dit()
    expected, _ = make_dit()
    settings = ModelSettings.from_options(lora=[f"{two_loras[0]}:0.5", str(two_loras[1])], lora_mode=mode)
    loras = transform_dit(dit, settings)
    assert [(item["name"], item["strength"], item["mode"]) for item in loras.describe()] == [
        ("first", 0.5, mode), ("second", 1.0, mode)]
    reference = LoraSet(expected)
    reference.load(two_loras[0], 0.5, mode="fused")
    reference.load(two_loras[1], 1.0, mode="fused")
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=14)
    assert_relative_error(run(dit, inputs), run(expected, inputs), TOLERANCE[torch.float32])


def test_loras_with_the_step_cache(tmp_path, tiny_engine):
    """TeaCache decides on the first block's modulated input, which a LoRA on norm1 changes: live and fused LoRAs
    make the same decisions and the same video; skipped steps skip the adapters with the blocks."""
    engine = tiny_engine
    path = random_framepack_lora(tmp_path / "style.safetensors", engine.transformer, seed=24)
    options = dict(FAST, steps=6, cache="teacache", cache_threshold=0.5)  # skips some steps, not all
    runs = {}
    for mode in ("fused", "live"):
        engine.load_lora(path, 0.7, mode=mode)
        decisions = []
        runs[mode] = (engine.generate("a cat walks", callback=lambda info: decisions.append(
            info["cache_steps_skipped"]), **options), decisions)
        engine.unload_lora("style")
    (fused, fused_decisions), (live, live_decisions) = runs["fused"], runs["live"]
    assert live_decisions == fused_decisions and fused.stats["cache_steps_skipped"] > 0
    assert_relative_error(live.latents, fused.latents, TOLERANCE[torch.float32])
    plain = engine.generate("a cat walks", **options)
    assert relative_error(fused.latents, plain.latents) > 0.01


def test_fused_loras_over_a_quantized_checkpoint_run_live(tmp_path):
    """A community fp8 file has no float weights to merge into: fused LoRAs run live beside them, with a warning,
    and equal live LoRAs over the same checkpoint."""
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.errors import FramePackWarning
    from framepack_engine.loading import transform_dit
    from framepack_engine.runtime.quant import quantized_layers
    from framepack_engine.settings import ModelSettings
    from tests.fixtures import tiny_dit_model, write_single_file_dit

    path = write_single_file_dit(tmp_path / "FramePackI2V_HY_fp8_e4m3fn_scaled.safetensors",
                                 tiny_dit_model().to(torch.bfloat16).state_dict(), fp8=torch.float8_e4m3fn,
                                 scaled=True, prefix="model.diffusion_model.")
    outputs = {}
    for mode in ("fused", "live"):
        dit = FramePackDiT.from_pretrained(path, dtype=torch.float32).eval()
        assert quantized_layers(dit)
        lora = random_framepack_lora(tmp_path / "lora.safetensors", dit, seed=30)
        settings = ModelSettings.from_options(transformer=str(path), lora=[f"{lora}:0.7"], lora_mode=mode)
        if mode == "fused":
            with pytest.warns(FramePackWarning, match="run live"):
                loras = transform_dit(dit, settings)
        else:
            loras = transform_dit(dit, settings)
        assert [item["mode"] for item in loras.describe()] == ["live"]
        inputs = section_inputs(dict(dit.config.__dict__, rope_axes_dim=list(dit.config.rope_axes_dim)), "f1",
                                seed=31)
        with torch.no_grad():
            outputs[mode] = dit(**inputs, return_dict=False)[0]
    assert torch.equal(outputs["fused"], outputs["live"])
    base = FramePackDiT.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        without = base(**inputs, return_dict=False)[0]
    assert relative_error(outputs["live"], without) > 1e-3  # the LoRA does act


@pytest.mark.parametrize("quantized", ["at load", "in the checkpoint"])
def test_loras_loaded_later_over_quantized_weights_run_live(tmp_path, quantized):
    """Quantized without --lora (or from a quantized checkpoint): a later Engine.load_lora(path), mode not given,
    attaches live (fused would need float weights); a float model keeps merging by default."""
    from framepack_engine.models.dit import FramePackDiT
    from framepack_engine.loading import transform_dit
    from framepack_engine.settings import ModelSettings
    from tests.fixtures import tiny_dit_model, write_single_file_dit

    if quantized == "at load":
        dit, _ = make_dit()
        settings = ModelSettings.from_options(quantize="int8")
    else:
        path = write_single_file_dit(tmp_path / "dit_fp8.safetensors",
                                     tiny_dit_model().to(torch.bfloat16).state_dict(), fp8=torch.float8_e4m3fn,
                                     prefix="model.diffusion_model.")
        dit = FramePackDiT.from_pretrained(path, dtype=torch.float32).eval()
        settings = ModelSettings.from_options()
    lora = random_framepack_lora(tmp_path / "style.safetensors", dit, seed=40)
    loras = transform_dit(dit, settings)
    loras.load(lora, 0.7)
    assert [item["mode"] for item in loras.describe()] == ["live"]
    float_dit, _ = make_dit()
    float_loras = transform_dit(float_dit, ModelSettings.from_options())
    float_loras.load(random_framepack_lora(tmp_path / "float.safetensors", float_dit, seed=41), 0.7)
    assert [item["mode"] for item in float_loras.describe()] == ["fused"]
