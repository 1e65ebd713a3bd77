"""FramePackDiT against diffusers' HunyuanVideoFramepackTransformer3DModel on random tiny configs and inputs."""

import random

import pytest
import torch
from diffusers import HunyuanVideoFramepackTransformer3DModel
from safetensors.torch import save_file

from framepack_engine.models.dit import DiTConfig, FramePackDiT
from framepack_engine.errors import BackendUnavailableError, FramePackError, ModelSourceError
from tests.utils import (TINY_CONFIG, TOLERANCE, assert_relative_error, diffusers_config, diffusers_kwargs,
                         randomize_weights_, relative_error, section_inputs)


def make_pair(config=TINY_CONFIG, seed=0, dtype=torch.float32, scale=1.0):
    reference = HunyuanVideoFramepackTransformer3DModel(**diffusers_config(config)).eval()
    randomize_weights_(reference, seed=seed, scale=scale)
    ours = FramePackDiT.from_config(config).eval()
    ours.load_state_dict(reference.state_dict())
    return ours.to(dtype), reference.to(dtype)


@pytest.fixture(scope="module")
def pair():
    return make_pair()


def run_ours(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def run_reference(model, inputs):
    with torch.no_grad():
        return model(**diffusers_kwargs(inputs))[0]


def test_state_dict_keys_and_shapes_are_the_checkpoints(pair):
    ours, reference = pair
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    reference_shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours_shapes == reference_shapes


def test_config_ignores_unknown_keys_and_derives_sizes():
    config = DiTConfig.from_dict({**TINY_CONFIG, "_diffusers_version": "0.33.0", "image_condition_type": None})
    assert config.hidden_size == 32 and config.mlp_hidden_size == 64
    assert DiTConfig().hidden_size == 3072  # the official 13B model's defaults


@pytest.mark.parametrize("layout", ["bidirectional", "f1"])
@pytest.mark.parametrize("height,width,padding", [(10, 14, 1), (16, 16, 0), (6, 18, 2)])
def test_float32_parity(pair, layout, height, width, padding):
    ours, reference = pair
    inputs = section_inputs(TINY_CONFIG, layout, height=height, width=width, padding=padding, seed=height + padding)
    assert_relative_error(run_ours(ours, inputs), run_reference(reference, inputs), TOLERANCE[torch.float32])


@pytest.mark.parametrize("layout", ["bidirectional", "f1"])
def test_bfloat16_parity(layout):
    # Weights a little smaller than in the float32 tests: at full scale bfloat16 rounding alone (in diffusers too)
    # moves this 6-block model by ~1.4e-2 from its float32 output, which would leave no room to compare.
    ours, reference = make_pair(dtype=torch.bfloat16, scale=0.7)
    truth, _ = make_pair(scale=0.7)
    inputs = section_inputs(TINY_CONFIG, layout, dtype=torch.bfloat16, seed=3)
    ours_out, reference_out = run_ours(ours, inputs), run_reference(reference, inputs)
    assert_relative_error(ours_out, reference_out, TOLERANCE[torch.bfloat16])
    # And no less accurate than the oracle's own bfloat16 run, measured against float32.
    expected = run_ours(truth, section_inputs(TINY_CONFIG, layout, seed=3))
    assert relative_error(ours_out, expected) <= 1.25 * relative_error(reference_out, expected)


def test_bfloat16_with_float32_output_tracks_the_float32_model(pair):
    ours32, _ = pair
    ours16, _ = make_pair(dtype=torch.bfloat16)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=4)
    inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("timestep", "guidance") else v
                for k, v in inputs.items()}
    expected = run_ours(ours32, inputs)
    plain = run_ours(ours16, inputs16)
    ours16.high_quality_fp32_output_for_inference = True
    high_quality = run_ours(ours16, inputs16)
    assert plain.dtype == torch.bfloat16 and high_quality.dtype == torch.float32
    assert relative_error(high_quality, expected) < 3e-2
    assert relative_error(plain, expected) < 3e-2


@pytest.mark.parametrize("layout", ["bidirectional", "f1"])
def test_batch_with_different_text_lengths_gives_each_sample_alone(pair, layout):
    ours, reference = pair
    inputs = section_inputs(TINY_CONFIG, layout, batch=3, text_lengths=(9, 4, 6), seed=5)
    batched = run_ours(ours, inputs)
    for i in range(3):
        alone = {k: v[i:i + 1] if k not in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices",
                                             "clean_latent_4x_indices") else v for k, v in inputs.items()}
        assert_relative_error(batched[i:i + 1], run_ours(ours, alone), TOLERANCE[torch.float32], f"sample {i}")
    assert_relative_error(batched, run_reference(reference, inputs), TOLERANCE[torch.float32])


def test_per_sample_frame_indices_give_each_sample_alone(pair):
    ours, _ = pair
    first = section_inputs(TINY_CONFIG, "bidirectional", padding=1, seed=6)
    second = section_inputs(TINY_CONFIG, "bidirectional", padding=2, seed=7)
    index_keys = ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices")
    batched = {k: torch.stack([first[k], second[k]]) if k in index_keys else torch.cat([first[k], second[k]])
               for k in first}
    out = run_ours(ours, batched)
    assert_relative_error(out[:1], run_ours(ours, first), TOLERANCE[torch.float32])
    assert_relative_error(out[1:], run_ours(ours, second), TOLERANCE[torch.float32])


PERTURBATIONS = {
    "clean_latents_4x": lambda x: x * 1.1,
    "clean_latents_2x": lambda x: x * 1.1,
    "clean_latents": lambda x: x * 1.1,
    "hidden_states": lambda x: x * 1.1,
    "clean_latent_4x_indices": lambda x: x + 1,
    "clean_latent_2x_indices": lambda x: x + 1,
    "clean_latent_indices": lambda x: x + 1,
    "latent_indices": lambda x: x + 1,
    "encoder_hidden_states": lambda x: x * 1.1,
    "encoder_attention_mask": lambda x: torch.cat([x[:, :-3], torch.ones_like(x[:, -3:])], dim=1),
    "pooled_projections": lambda x: x * 1.1,
    "image_embeddings": lambda x: x * 1.1,
    "timestep": lambda x: x * 0.9,
    "guidance": lambda x: x * 0.5,
}


@pytest.mark.parametrize("name", sorted(PERTURBATIONS))
def test_parity_check_fails_when_any_input_is_perturbed(pair, name):
    ours, reference = pair
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=8)
    expected = run_reference(reference, inputs)
    perturbed = dict(inputs, **{name: PERTURBATIONS[name](inputs[name])})
    error = relative_error(run_ours(ours, perturbed), expected)
    assert error > 100 * TOLERANCE[torch.float32], f"perturbing {name} moved the output only by {error:.2e}"


def test_parity_check_fails_when_one_weight_is_perturbed(pair):
    ours, reference = pair
    inputs = section_inputs(TINY_CONFIG, "f1", seed=9)
    expected = run_reference(reference, inputs)
    changed = FramePackDiT.from_config(TINY_CONFIG).eval()
    changed.load_state_dict(ours.state_dict())
    with torch.no_grad():
        changed.clean_x_embedder.proj_4x.weight.mul_(1.1)
    assert relative_error(run_ours(changed, inputs), expected) > 100 * TOLERANCE[torch.float32]


def random_config(seed):
    rng = random.Random(seed)
    head_dim = rng.choice([8, 16, 24])
    time_axis = rng.choice([2, 4])
    row_axis = (head_dim - time_axis) // 2 // 2 * 2
    return dict(TINY_CONFIG, num_attention_heads=rng.choice([1, 2, 3]), attention_head_dim=head_dim,
                rope_axes_dim=[head_dim - 2 * row_axis, row_axis, row_axis], num_layers=rng.choice([1, 2]),
                num_single_layers=rng.choice([1, 3]), num_refiner_layers=rng.choice([1, 2]),
                mlp_ratio=rng.choice([1.5, 4.0]), in_channels=rng.choice([3, 4, 16]), out_channels=None,
                text_embed_dim=rng.choice([8, 40]), pooled_projection_dim=rng.choice([6, 16]),
                image_proj_dim=rng.choice([4, 12]), rope_theta=rng.choice([256.0, 10000.0]))


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_random_configs_match(seed):
    config = random_config(seed)
    config["out_channels"] = config["in_channels"]
    ours, reference = make_pair(config, seed=seed)
    layout = "f1" if seed % 2 else "bidirectional"
    inputs = section_inputs(config, layout, batch=2, text_lengths=(5, 9), height=8 + 2 * (seed % 3), width=12, seed=seed)
    assert_relative_error(run_ours(ours, inputs), run_reference(reference, inputs), TOLERANCE[torch.float32])


def test_loads_a_sharded_folder_written_by_diffusers(pair, tmp_path):
    _, reference = pair
    reference.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    assert len(list((tmp_path / "transformer").glob("*.safetensors"))) > 1
    loaded = FramePackDiT.from_pretrained(tmp_path / "transformer", dtype=torch.float32).eval()
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=10)
    assert_relative_error(run_ours(loaded, inputs), run_reference(reference, inputs), TOLERANCE[torch.float32])


def test_loads_a_single_safetensors_file_with_its_config_read_off_the_tensors(pair, tmp_path):
    ours, reference = pair
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, tmp_path / "framepack.safetensors")
    loaded = FramePackDiT.from_pretrained(tmp_path / "framepack.safetensors", dtype=torch.float32).eval()
    assert loaded.config == ours.config
    inputs = section_inputs(TINY_CONFIG, "f1", seed=11)
    assert_relative_error(run_ours(loaded, inputs), run_reference(reference, inputs), TOLERANCE[torch.float32])


def test_loading_errors_are_clear(tmp_path):
    with pytest.raises(ModelSourceError, match="nowhere"):
        FramePackDiT.from_pretrained(tmp_path / "nowhere")
    save_file({"something.else": torch.ones(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelSourceError, match="does not hold a FramePack"):
        FramePackDiT.from_pretrained(tmp_path / "other.safetensors")


def test_attention_backend_selection(pair):
    ours, _ = pair
    assert ours.set_attention_backend("sdpa").attention_backend == "sdpa"
    assert ours.set_attention_backend("auto").attention_backend in ("sdpa", "triton", "flash", "sage", "xformers")
    with pytest.raises(FramePackError, match="Unknown attention backend"):
        ours.set_attention_backend("magic")
    for name, package in (("flash", "flash_attn"), ("sage", "sageattention"), ("xformers", "xformers")):
        if __import__("importlib").util.find_spec(package) is None:
            with pytest.raises(BackendUnavailableError, match="pip install"):
                ours.set_attention_backend(name)
    ours.set_attention_backend("sdpa")


def test_bad_inputs_give_clear_errors(pair):
    ours, _ = pair
    inputs = section_inputs(TINY_CONFIG, "bidirectional", seed=12)
    with pytest.raises(FramePackError, match="frame indices"):
        ours(**dict(inputs, latent_indices=inputs["latent_indices"][:-1]))
    with pytest.raises(FramePackError, match="image_embeddings"):
        ours(**dict(inputs, image_embeddings=None))
    with pytest.raises(FramePackError, match="multiple of the patch size"):
        ours(**dict(inputs, hidden_states=inputs["hidden_states"][..., :-1]))


def test_return_types(pair):
    ours, _ = pair
    inputs = section_inputs(TINY_CONFIG, "f1", seed=13)
    with torch.no_grad():
        output = ours(**inputs)
    assert output.sample.shape == inputs["hidden_states"].shape


def test_no_mask_equals_the_prompt_cropped_to_its_mask(pair):
    ours, _ = pair
    inputs = section_inputs(TINY_CONFIG, "bidirectional", text_lengths=(6,), seed=14)
    cropped = dict(inputs, encoder_hidden_states=inputs["encoder_hidden_states"][:, :6], encoder_attention_mask=None)
    assert_relative_error(run_ours(ours, cropped), run_ours(ours, inputs), TOLERANCE[torch.float32])
