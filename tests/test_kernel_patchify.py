"""framepack_kernels.patchify.packed_patchify against pad + conv3d + cat, and against diffusers' FramePack modules."""

import math

import pytest
import torch

from framepack_kernels.patchify import GROUP_NAMES, PatchGroup, packed_patchify, packed_patchify_reference
from tests.utils import TOLERANCE, assert_relative_error, relative_error

CHANNELS, INNER, HEAD_DIM = 4, 40, 16
KERNELS = {"noisy": (1, 2, 2), "clean": (1, 2, 2), "clean_2x": (2, 4, 4), "clean_4x": (4, 8, 8)}


def make_group(name, frames, height, width, dtype, latent_dtype=None, rope_batch=1, with_rope=True, bias=True,
               batch=2):
    kernel = KERNELS[name]
    fan_in = CHANNELS * math.prod(kernel)
    latents = torch.randn(batch, CHANNELS, frames, height, width).to(latent_dtype or dtype)
    weight = (torch.randn(INNER, CHANNELS, *kernel) / math.sqrt(fan_in)).to(dtype)
    bias = torch.randn(INNER).to(dtype) if bias else None
    cos = sin = None
    if with_rope:
        angles = torch.rand(rope_batch, frames, height // 2, width // 2, HEAD_DIM // 2) * 2 * math.pi
        cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    return PatchGroup(latents, weight, bias, cos, sin)


def all_groups(dtype, height=6, width=10, **kwargs):
    # Odd frame counts and a 6x10 latent: the 2x and 4x groups need replicate padding in T, H and W.
    return {
        "noisy": make_group("noisy", 3, height, width, dtype, rope_batch=2, **kwargs),
        "clean": make_group("clean", 2, height, width, dtype, bias=False, **kwargs),
        "clean_2x": make_group("clean_2x", 3, height, width, dtype, **kwargs),
        "clean_4x": make_group("clean_4x", 5, height, width, dtype, **kwargs),
    }


def assert_packed_match(actual, expected, tolerance):
    assert actual.group_lengths == expected.group_lengths
    assert_relative_error(actual.tokens, expected.tokens, tolerance, "tokens")
    if expected.rope_cos is None:
        assert actual.rope_cos is None and actual.rope_sin is None
    else:
        assert_relative_error(actual.rope_cos, expected.rope_cos, 1e-5, "rope_cos")
        assert_relative_error(actual.rope_sin, expected.rope_sin, 1e-5, "rope_sin")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_all_groups_match_reference(dtype):
    groups = all_groups(dtype)
    out = packed_patchify(**groups)
    expected = packed_patchify_reference(**groups)
    assert out.tokens.dtype == dtype and out.rope_cos.dtype == torch.float32
    # 4x: (2, 1, 2) grid, 2x: (2, 2, 3), clean: (2, 3, 5), noisy: (3, 3, 5).
    assert out.group_lengths == (4, 12, 30, 45)
    assert out.tokens.shape == (2, 91, INNER) and out.rope_cos.shape == (2, 91, HEAD_DIM)
    assert_packed_match(out, expected, TOLERANCE[dtype])


@pytest.mark.parametrize("present", [("noisy",), ("clean_4x", "noisy"), ("clean_2x",), ("clean", "clean_2x")],
                         ids="+".join)
def test_any_group_may_be_absent(present):
    groups = {name: g for name, g in all_groups(torch.float32, with_rope=False).items() if name in present}
    out = packed_patchify(**groups)
    assert_packed_match(out, packed_patchify_reference(**groups), TOLERANCE[torch.float32])
    assert [n > 0 for n in out.group_lengths] == [name in present for name in GROUP_NAMES]


def test_latents_cast_to_the_weights_dtype_as_loaded():
    groups = all_groups(torch.bfloat16, latent_dtype=torch.float32)
    assert_packed_match(packed_patchify(**groups), packed_patchify_reference(**groups), TOLERANCE[torch.bfloat16])


def test_strided_latents():
    # A time slice of a longer latent video, as the section loop cuts history out of it.
    groups = all_groups(torch.float32, with_rope=False)
    video = torch.randn(2, CHANNELS, 9, 6, 10)
    groups["clean_4x"] = groups["clean_4x"]._replace(latents=video[:, :, 2:7])
    assert not groups["clean_4x"].latents.is_contiguous()
    assert_packed_match(packed_patchify(**groups), packed_patchify_reference(**groups), TOLERANCE[torch.float32])


def test_matches_diffusers_framepack_modules():
    diffusers_framepack = pytest.importorskip("diffusers.models.transformers.transformer_hunyuan_video_framepack")
    from diffusers.models.transformers.transformer_hunyuan_video import HunyuanVideoPatchEmbed

    height, width = 6, 10
    x_embedder = HunyuanVideoPatchEmbed((1, 2, 2), CHANNELS, INNER)
    history_embedder = diffusers_framepack.HunyuanVideoHistoryPatchEmbed(CHANNELS, INNER)
    rope = diffusers_framepack.HunyuanVideoFramepackRotaryPosEmbed(2, 1, [4, 6, 6], theta=256.0)
    pad_rope = diffusers_framepack.HunyuanVideoFramepackTransformer3DModel._pad_rotary_emb
    frame_indices = {"noisy": torch.arange(5, 8), "clean": torch.tensor([0, 8]),
                     "clean_2x": torch.arange(9, 12), "clean_4x": torch.arange(12, 17)}
    modules = {"noisy": x_embedder.proj, "clean": history_embedder.proj,
               "clean_2x": history_embedder.proj_2x, "clean_4x": history_embedder.proj_4x}
    latents = {name: torch.randn(1, CHANNELS, len(frame_indices[name]), height, width) for name in modules}

    groups, expected_tokens, expected_cos, expected_sin = {}, [], [], []
    for name in GROUP_NAMES:
        cos, sin = rope(frame_indices[name], height, width, device="cpu")
        table_shape = (1, len(frame_indices[name]), height // 2, width // 2, HEAD_DIM)
        groups[name] = PatchGroup(latents[name], modules[name].weight.detach(), modules[name].bias.detach(),
                                  cos.reshape(table_shape), sin.reshape(table_shape))
        if name == "noisy":
            tokens = x_embedder(latents[name])
        else:
            tokens = history_embedder(**{{"clean": "latents_clean", "clean_2x": "latents_clean_2x",
                                           "clean_4x": "latents_clean_4x"}[name]: latents[name]})
            tokens = [t for t in tokens if t is not None][0]
        if name in ("clean_2x", "clean_4x"):
            pool = (2, 2, 2) if name == "clean_2x" else (4, 4, 4)
            cos, sin = pad_rope(None, (cos, sin), height // 2, width // 2, pool)
        expected_tokens.append(tokens)
        expected_cos.append(cos)
        expected_sin.append(sin)

    with torch.no_grad():
        out = packed_patchify(**groups)
        reference = packed_patchify_reference(**groups)
    expected = torch.cat(expected_tokens, dim=1).detach()
    assert_relative_error(reference.tokens, expected, 1e-5, "reference tokens")
    assert_relative_error(out.tokens, expected, 1e-5, "tokens")
    assert_relative_error(out.rope_cos[0], torch.cat(expected_cos), 1e-5, "rope_cos")
    assert_relative_error(out.rope_sin[0], torch.cat(expected_sin), 1e-5, "rope_sin")


def test_parity_check_can_fail():
    groups = all_groups(torch.float32)
    expected = packed_patchify_reference(**groups)
    tolerance = TOLERANCE[torch.float32]
    # The last frame of the 2x latents is read twice by the replicate padding; nudging it must show.
    nudged = groups["clean_2x"].latents.clone()
    nudged[:, :, -1, -1, -1] += 5.0
    out = packed_patchify(**{**groups, "clean_2x": groups["clean_2x"]._replace(latents=nudged)})
    assert relative_error(out.tokens, expected.tokens) > 100 * tolerance
    # Groups in the wrong slots.
    swapped = packed_patchify(**{**groups, "noisy": groups["clean"], "clean": groups["noisy"]})
    assert swapped.tokens.shape != expected.tokens.shape or relative_error(swapped.tokens, expected.tokens) > 0.1
    # A RoPE table entry in the corner cell pooled by the 4x group.
    cos = groups["clean_4x"].rope_cos.clone()
    cos[0, -1, -1, -1] += 3.0
    out = packed_patchify(**{**groups, "clean_4x": groups["clean_4x"]._replace(rope_cos=cos)})
    assert relative_error(out.rope_cos, expected.rope_cos) > 100 * tolerance


def test_bad_inputs_raise_clear_errors():
    groups = all_groups(torch.float32)
    with pytest.raises(ValueError, match="every latent group is None"):
        packed_patchify()
    with pytest.raises(ValueError, match="RoPE tables for every present group"):
        packed_patchify(noisy=groups["noisy"], clean=groups["clean"]._replace(rope_cos=None, rope_sin=None))
    wrong_channels = groups["clean"]._replace(latents=torch.randn(2, CHANNELS + 1, 2, 6, 10))
    with pytest.raises(ValueError, match="disagree"):
        packed_patchify(noisy=groups["noisy"], clean=wrong_channels)
    odd = make_group("noisy", 2, 5, 10, torch.float32)
    with pytest.raises(ValueError, match="rope_cos must be|RoPE grid"):
        table = torch.ones(1, 2, 3, 5, HEAD_DIM)
        packed_patchify(noisy=odd._replace(rope_cos=table, rope_sin=table))
    with pytest.raises(ValueError, match="share one dtype"):
        packed_patchify(noisy=groups["noisy"], clean=make_group("clean", 2, 6, 10, torch.bfloat16))


def test_benchmark_case_runs_at_tiny_shapes():
    # bench/ is outside the CI test path: make sure the patchify case builds, runs and agrees with the oracle.
    from bench.bench_kernels import CASES, TINY, run_case

    records = run_case(CASES["packed_patchify"](TINY, torch.device("cpu"), torch.float32), torch.device("cpu"), 1)
    assert {r["implementation"] for r in records} == {"eager", "triton"}
    for record in records:
        assert record["TFLOP/s"] > 0 and record["relative_error_vs_eager"] <= TOLERANCE[torch.float32]
