"""The whole DiT with every kernel on (Triton attention, fused norms/modulation/residuals, QK RMSNorm, patchify)
against the plain PyTorch path, under the Triton interpreter on shapes with partial tiles and padded text."""

import pytest
import torch

from framepack_engine.models.dit import FramePackDiT
from framepack_engine.errors import BackendUnavailableError
from tests.utils import TINY_CONFIG, assert_relative_error, randomize_weights_, relative_error, section_inputs


def make_models(dtype):
    plain = randomize_weights_(FramePackDiT.from_config(TINY_CONFIG), seed=3, scale=0.7).eval().to(dtype)
    fused = FramePackDiT.from_config(TINY_CONFIG, dtype=dtype).eval()
    fused.load_state_dict(plain.state_dict())
    fused.set_attention_backend("triton").set_fused_kernels(True)
    return plain, fused


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def test_all_kernels_on_match_the_plain_path_in_float32():
    plain, fused = make_models(torch.float32)
    # Batch 2 with different prompt lengths; latent sizes that need padding for the 2x/4x kernels. (The interpreter
    # is slow: one layout here; the index layouts only change the frame indices, which the plain tests cover.)
    inputs = section_inputs(TINY_CONFIG, "f1", batch=2, text_lengths=(9, 4), height=10, width=6, seed=21)
    fused_out = run(fused, inputs)
    assert_relative_error(fused_out, run(plain, inputs), 1e-5)
    # The comparison can fail: a 10% change of the 4x history moves the output far past the tolerance.
    perturbed = dict(inputs, clean_latents_4x=inputs["clean_latents_4x"] * 1.1)
    assert relative_error(fused_out, run(plain, perturbed)) > 1e-4


def test_all_kernels_on_in_bfloat16_are_as_accurate_as_the_plain_path():
    truth, _ = make_models(torch.float32)
    plain, fused = make_models(torch.bfloat16)
    inputs = section_inputs(TINY_CONFIG, "bidirectional", batch=2, text_lengths=(9, 5), height=6, width=6, seed=22)
    inputs16 = {k: v.to(torch.bfloat16) if v.is_floating_point() and k not in ("timestep", "guidance") else v
                for k, v in inputs.items()}
    expected = run(truth, inputs)
    fused_out, plain_out = run(fused, inputs16), run(plain, inputs16)
    fused_error, plain_error = relative_error(fused_out, expected), relative_error(plain_out, expected)
    assert fused_error <= 1.25 * plain_error + 1e-3, (fused_error, plain_error)
    # Two bfloat16 paths each ~1e-2 from float32 can differ by up to twice that from each other.
    assert_relative_error(fused_out, plain_out, 2e-2)


def test_fused_kernels_refuse_a_cpu_model_outside_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    model = FramePackDiT.from_config(TINY_CONFIG)
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        model.set_fused_kernels(True)
    assert not model.fused_kernels
