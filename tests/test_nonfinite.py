"""NaN and infinities: weights that hold them are refused as they are read, naming the tensor; a generation whose
latents become non-finite stops at that step, naming the section and step (never an all-black video at exit 0)."""

import av
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError, ModelSourceError
from framepack_engine.models.checkpoints import load_dit_state_dict
from framepack_engine.runtime.sources import load_state_dict
from tests.fixtures import (  # noqa: F401 (pytest fixtures)
    framepack_transformer_folder,
    hunyuan_video_base_folder,
    single_file_dit_bf16,
)

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn,
                                   torch.float8_e5m2])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_names_the_tensor_and_counts_its_bad_values(dtype, bad):
    from framepack_engine.runtime.sources import check_finite

    if dtype == torch.float8_e4m3fn and bad == bad:
        pytest.skip("float8_e4m3fn has no infinities (a cast saturates them)")
    tensor = torch.randn(8, 16).to(dtype)
    assert check_finite(tensor, "w", "'f.safetensors'") is tensor
    broken = tensor.clone()
    broken[3, 5] = bad
    broken[7, 0] = bad
    with pytest.raises(ModelSourceError) as raised:
        check_finite(broken, "blocks.0.attn.to_q.weight", "'f.safetensors'")
    assert str(raised.value).startswith("'f.safetensors': the tensor 'blocks.0.attn.to_q.weight' holds 2 NaN or "
                                        "infinite values (of 128)")


def test_large_finite_values_whose_sum_overflows_are_kept():
    from framepack_engine.runtime.sources import check_finite

    tensor = torch.full((4, 4), 3e38)  # finite, but the float32 sum is inf
    assert check_finite(tensor, "w", "x") is tensor
    assert check_finite(torch.zeros(0), "w", "x").numel() == 0 and check_finite(torch.arange(3), "w", "x") is not None


def test_a_checkpoint_with_a_nan_matrix_is_refused_naming_it(tmp_path, single_file_dit_bf16):
    from safetensors.torch import load_file

    tensors = load_file(str(single_file_dit_bf16))
    key = "transformer_blocks.0.attn.to_k.weight"
    tensors[key] = tensors[key].clone()
    tensors[key][0, :3] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelSourceError, match=rf"'nan.safetensors': the tensor '{key}' holds 3 NaN"):
        load_dit_state_dict(tmp_path / "nan.safetensors")
    with pytest.raises(ModelSourceError, match=rf"the tensor '{key}'"):
        load_state_dict(tmp_path / "nan.safetensors")


def test_an_infinite_vae_weight_is_refused_naming_it(tmp_path, hunyuan_video_base_folder):
    import shutil

    from safetensors.torch import load_file

    vae = tmp_path / "vae"
    shutil.copytree(hunyuan_video_base_folder / "vae", vae)
    file = next(vae.glob("*.safetensors"))
    tensors = load_file(str(file))
    key = next(key for key, tensor in tensors.items() if tensor.is_floating_point() and tensor.numel() > 1)
    tensors[key][(0,) * tensors[key].ndim] = float("inf")
    save_file(tensors, str(file))
    with pytest.raises(ModelSourceError, match=rf"the tensor '{key}' holds 1 NaN or infinite value \(of"):
        load_state_dict(vae)


def preset_lora(path, poison=None):
    """A kohya-layout LoRA over every linear of the tiny preset's DiT; poison: (up matrix to fill, value)."""
    from framepack_engine.models.presets import tiny_dit

    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, layer in tiny_dit(generator).linear_layers().items():
        key = f"lora_unet_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator) * 0.01
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    if poison:
        name, value = poison
        tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, path)
    return sorted(tensors)


def test_a_lora_whose_up_matrix_is_nan_is_refused_before_anything_runs(tmp_path, capsys):
    names = preset_lora(tmp_path / "ok.safetensors")
    up = next(name for name in names if name.endswith("lora_up.weight"))
    preset_lora(tmp_path / "nan.safetensors", (up, float("nan")))
    out = tmp_path / "v.mp4"
    code = main(["generate", "x", "--seconds", "1", "--out", str(out), "--lora", str(tmp_path / "nan.safetensors"),
                 *FAST])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1, error
    assert error[0].startswith(f"error: LoRA 'nan.safetensors': the tensor '{up}' holds") and "NaN" in error[0]
    assert not out.exists()
    assert main(["generate", "x", "--seconds", "1", "--out", str(out), "--lora", str(tmp_path / "ok.safetensors"),
                 *FAST]) == 0  # the same LoRA without the NaN runs


def nan_at(engine, call: int):
    """The engine's DiT gives NaN from its `call`-th model call on (one call per step with cfg 1)."""
    velocity, calls = engine.transformer.velocity, [0]

    def poisoned(*args, **kwargs):
        calls[0] += 1
        result = velocity(*args, **kwargs)
        return result * float("nan") if calls[0] >= call else result

    engine.transformer.velocity = poisoned
    return engine


def test_latents_that_become_nan_stop_the_run_at_that_step():
    from framepack_engine import Engine

    engine = nan_at(Engine.from_preset("tiny", variant="f1"), 4)  # section 2's second step (2 steps a section)
    finished = []
    with pytest.raises(FramePackError) as raised:
        for section in engine.stream("x", seconds=1.5, steps=2, latent_window_size=1, fps=8):
            finished.append(section.index)
    assert finished == [0]
    assert str(raised.value).startswith("The latents became NaN or infinite at section 2 of 3 (generation order), "
                                        "step 2 of 2:")


def test_the_command_stops_with_one_line_and_keeps_the_finished_sections(tmp_path, monkeypatch, capsys):
    from framepack_engine import Engine

    preset = Engine.from_preset
    monkeypatch.setattr(Engine, "from_preset", classmethod(lambda cls, *a, **k: nan_at(preset(*a, **k), 3)))
    out = tmp_path / "v.mp4"
    code = main(["generate", "x", "--seconds", "2", "--out", str(out), "--variant", "f1", *FAST])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "at section 2 of 2 (generation order), step 1 of 2" in error[0]
    with av.open(str(out)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
    assert len(frames) >= 1 and frames.any()  # the first section, not black
