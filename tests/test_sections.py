"""Section plans against the official loops, written out here as plain list bookkeeping.

The oracles below keep the history as a Python list of frames and follow the official demo_gradio.py (bidirectional)
and demo_gradio_f1.py (F1) step by step; the crossfade oracle is diffusers' own FramePack pipeline ``_soft_append``.
Tokens are counted by running real strided convolutions on the tensors a plan builds.
"""

import math

import numpy as np

import pytest
import torch
import torch.nn.functional as F
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_framepack import HunyuanVideoFramepackPipeline

from framepack_engine.errors import FramePackError
from framepack_engine.generation.runner import PixelAssembler, to_uint8_frames
from framepack_engine.generation.sections import (
    bidirectional_paddings,
    crossfade,
    initial_history,
    latent_frame_count,
    pixel_frame_count,
    pixel_overlap,
    plan_sections,
    section_count,
    tokens_per_section,
)
from tests.utils import TOLERANCE, assert_relative_error, relative_error

CHANNELS, HEIGHT, WIDTH = 2, 3, 4


def soft_append_oracle(history, current, overlap):
    return HunyuanVideoFramepackPipeline._soft_append(None, history, current, overlap)


# ------------------------------------------------------------------------------------------------ counts


@pytest.mark.parametrize("seconds,fps,window,expected", [
    (5, 30, 9, 4),      # 150 / 36 = 4.17
    (1, 30, 9, 1),      # 0.83 rounds to 1
    (0.1, 30, 9, 1),    # 0.08 rounds to 0: at least one section
    (10, 30, 9, 8),     # 8.33
    (60, 30, 9, 50),
    (5, 24, 9, 3),      # 3.33
    (5, 30, 5, 8),      # 7.5: Python rounds half to even -> 8
    (4.5, 32, 9, 4),    # 144 / 36 = 4 exactly
    (2.5, 30, 9, 2),    # 2.08
    (3, 60, 16, 3),     # 180 / 64 = 2.81
])
def test_section_count(seconds, fps, window, expected):
    assert section_count(seconds, fps, window) == expected


@pytest.mark.parametrize("sections,window,latents,pixels", [(1, 9, 10, 37), (4, 9, 37, 145), (8, 9, 73, 289),
                                                            (3, 5, 16, 61), (50, 9, 451, 1801)])
def test_frame_counts(sections, window, latents, pixels):
    assert latent_frame_count(sections, window) == latents
    assert pixel_frame_count(latents) == pixels


def test_count_bad_input():
    for bad in (dict(seconds=0), dict(seconds=-1), dict(seconds=5, fps=0), dict(seconds=5, latent_window_size=0),
                dict(seconds=5, latent_window_size=2.5)):
        with pytest.raises(FramePackError):
            section_count(**bad)
    with pytest.raises(FramePackError):
        plan_sections("f2", 3)
    with pytest.raises(FramePackError):
        plan_sections("f1", 0)


# ------------------------------------------------------------------------------------------------ index splits


EXPECTED_PADDINGS = {1: [0], 2: [1, 0], 3: [2, 1, 0], 4: [3, 2, 1, 0], 5: [3, 2, 2, 1, 0], 6: [3, 2, 2, 2, 1, 0]}


@pytest.mark.parametrize("sections", range(1, 7))
def test_bidirectional_paddings(sections):
    assert bidirectional_paddings(sections) == EXPECTED_PADDINGS[sections]
    assert [s.padding for s in plan_sections("bidirectional", sections, 9)] == EXPECTED_PADDINGS[sections]


def flat(tensor):
    assert tensor.dtype == torch.int64 and tensor.shape[0] == 1
    return tensor[0].tolist()


@pytest.mark.parametrize("window", [9, 5])
@pytest.mark.parametrize("sections", range(1, 7))
def test_bidirectional_indices(sections, window):
    plan = plan_sections("bidirectional", sections, window)
    assert len(plan) == sections
    for index, (section, padding) in enumerate(zip(plan, EXPECTED_PADDINGS[sections])):
        # The official line: [start 0 | blank | window | post | 2x | 4x], consecutive integers.
        line = list(range(1 + padding * window + window + 1 + 2 + 16))
        blank_end = 1 + padding * window
        assert flat(section.latent_indices) == line[blank_end:blank_end + window]
        assert flat(section.clean_latent_indices) == [0, line[blank_end + window]]
        assert flat(section.clean_latent_2x_indices) == line[blank_end + window + 1:blank_end + window + 3]
        assert flat(section.clean_latent_4x_indices) == line[blank_end + window + 3:]
        assert section.index == index and section.count == sections
        assert section.is_first == (index == 0)
        assert section.is_last == (padding == 0) == (index == sections - 1)
        assert section.video_position == sections - 1 - index


def test_bidirectional_indices_literal():
    # Two sections of 9: the first generated one sits a window away from the start image.
    first, last = plan_sections("bidirectional", 2, 9)
    assert flat(first.latent_indices) == list(range(10, 19))
    assert flat(first.clean_latent_indices) == [0, 19]
    assert flat(first.clean_latent_2x_indices) == [20, 21]
    assert flat(first.clean_latent_4x_indices) == list(range(22, 38))
    assert flat(last.latent_indices) == list(range(1, 10))
    assert flat(last.clean_latent_indices) == [0, 10]
    assert flat(last.clean_latent_2x_indices) == [11, 12]
    assert flat(last.clean_latent_4x_indices) == list(range(13, 29))


@pytest.mark.parametrize("window", [9, 4])
@pytest.mark.parametrize("sections", [1, 3, 6])
def test_f1_indices(sections, window):
    for index, section in enumerate(plan_sections("f1", sections, window)):
        assert flat(section.clean_latent_indices) == [0, 19]
        assert flat(section.clean_latent_4x_indices) == list(range(1, 17))
        assert flat(section.clean_latent_2x_indices) == [17, 18]
        assert flat(section.latent_indices) == list(range(20, 20 + window))
        assert (section.is_first, section.is_last) == (index == 0, index == sections - 1)
        assert section.padding == 0 and section.video_position == index


# ------------------------------------------------------------------------------------------------ history


def frames(tensor):
    return list(tensor.unbind(dim=2))


def official_inputs(section, history, start, end=None, end_strength=1.0):
    """The section's context as the official forward's keyword arguments."""
    context = section.history_context(history, start, end, end_strength)
    return {"latent_indices": section.latent_indices, **context.official_kwargs()}


def stack(frame_list):
    return torch.stack(frame_list, dim=2)


def generated_window(index, window):
    # Distinct, random-looking values per section so any mix-up of frames shows.
    return torch.randn(1, CHANNELS, window, HEIGHT, WIDTH) + 10.0 * (index + 1)


@pytest.mark.parametrize("window", [3, 9])
@pytest.mark.parametrize("sections", range(1, 7))
@pytest.mark.parametrize("flf2v", [False, True])
def test_bidirectional_history_follows_official_loop(sections, window, flf2v):
    start = torch.randn(1, CHANNELS, 1, HEIGHT, WIDTH)
    end = torch.randn(1, CHANNELS, 1, HEIGHT, WIDTH) if flf2v else None
    end_strength = 0.7
    zero = torch.zeros(1, CHANNELS, HEIGHT, WIDTH)
    oracle_history = [zero] * 19  # official: zeros of 1 + 2 + 16 frames
    oracle_total = 0
    history = initial_history("bidirectional", start)
    assert history.shape == (1, CHANNELS, 19, HEIGHT, WIDTH) and history.dtype == torch.float32
    for index, section in enumerate(plan_sections("bidirectional", sections, window)):
        post, clean_2x, clean_4x = oracle_history[0], oracle_history[1:3], oracle_history[3:19]
        if flf2v and index == 0:
            post = end[:, :, 0] * end_strength
        inputs = official_inputs(section, history, start, end, end_strength)
        assert torch.equal(inputs["clean_latents"], stack([start[:, :, 0], post]))
        assert torch.equal(inputs["clean_latents_2x"], stack(clean_2x))
        assert torch.equal(inputs["clean_latents_4x"], stack(clean_4x))
        for name in ("latent_indices", "clean_latent_indices", "clean_latent_2x_indices", "clean_latent_4x_indices"):
            assert inputs[name] is getattr(section, name)

        generated = generated_window(index, window)
        new_frames = frames(generated)
        if section.padding == 0:  # official: is_last_section prepends the start latent
            new_frames = [start[:, :, 0]] + new_frames
        oracle_total += len(new_frames)
        oracle_history = new_frames + oracle_history

        history = section.add_to_history(history, generated, start)
        assert torch.equal(history, stack(oracle_history))
        assert section.total_latent_frames == oracle_total
        assert torch.equal(section.generated_latents(history), stack(oracle_history[:oracle_total]))
    assert oracle_total == latent_frame_count(sections, window)


@pytest.mark.parametrize("window", [3, 9])
@pytest.mark.parametrize("sections", [1, 2, 5])
def test_f1_history_follows_official_loop(sections, window):
    start = torch.randn(1, CHANNELS, 1, HEIGHT, WIDTH)
    zero = torch.zeros(1, CHANNELS, HEIGHT, WIDTH)
    oracle_history = [zero] * 19 + [start[:, :, 0]]  # official: zeros of 16 + 2 + 1 frames, then the start latent
    oracle_total = 1
    history = initial_history("f1", start)
    assert torch.equal(history, stack(oracle_history))
    for index, section in enumerate(plan_sections("f1", sections, window)):
        clean_4x, clean_2x, clean_1x = oracle_history[-19:-3], oracle_history[-3:-1], oracle_history[-1]
        inputs = official_inputs(section, history, start)
        assert torch.equal(inputs["clean_latents"], stack([start[:, :, 0], clean_1x]))
        assert torch.equal(inputs["clean_latents_2x"], stack(clean_2x))
        assert torch.equal(inputs["clean_latents_4x"], stack(clean_4x))
        generated = generated_window(index, window)
        oracle_history = oracle_history + frames(generated)
        oracle_total += window
        history = section.add_to_history(history, generated, start)
        assert torch.equal(history, stack(oracle_history))
        assert section.total_latent_frames == oracle_total
        assert torch.equal(section.generated_latents(history), stack(oracle_history[-oracle_total:]))
    assert oracle_total == latent_frame_count(sections, window)


def test_history_errors():
    start = torch.randn(1, CHANNELS, 1, HEIGHT, WIDTH)
    section = plan_sections("f1", 2, 3)[0]
    with pytest.raises(FramePackError):
        section.clean_latents(initial_history("f1", start), start, end_latent=start)
    with pytest.raises(FramePackError):
        section.add_to_history(initial_history("f1", start), torch.randn(1, CHANNELS, 4, HEIGHT, WIDTH), start)
    with pytest.raises(FramePackError):
        initial_history("both", start)


# ------------------------------------------------------------------------------------------------ pixels


@pytest.mark.parametrize("overlap", [1, 5, 33])
def test_crossfade_matches_diffusers_soft_append(overlap):
    earlier = torch.randn(1, 3, overlap + 4, 2, 3)
    later = torch.randn(1, 3, overlap + 2, 2, 3)
    out = crossfade(earlier, later, overlap)
    assert out.shape[2] == earlier.shape[2] + later.shape[2] - overlap
    assert_relative_error(out, soft_append_oracle(earlier, later, overlap), TOLERANCE[torch.float32])
    # Negative control: swapping the clips is a different blend.
    assert relative_error(crossfade(later, earlier, overlap), soft_append_oracle(earlier, later, overlap)) > 1e-2


def test_crossfade_weights_are_linear():
    overlap = 33  # 4 * 9 - 3, the official overlap
    assert pixel_overlap(9) == overlap
    ones, zeros = torch.ones(1, 1, 40, 1, 1), torch.zeros(1, 1, 50, 1, 1)
    out = crossfade(ones, zeros, overlap)
    assert out.shape[2] == 40 + 50 - overlap
    weights = out[0, 0, 40 - overlap:40, 0, 0]
    expected = torch.tensor([1 - k / (overlap - 1) for k in range(overlap)])
    assert_relative_error(weights, expected, 1e-6)
    assert torch.equal(out[0, 0, :40 - overlap, 0, 0], torch.ones(40 - overlap))
    assert torch.equal(out[0, 0, 40:, 0, 0], torch.zeros(50 - overlap))
    assert torch.equal(crossfade(ones, zeros, 0), torch.cat([ones, zeros], dim=2))
    with pytest.raises(FramePackError):
        crossfade(ones[:, :, :10], zeros, 11)


def fake_decode(latents):
    """A causal-VAE-shaped decode: 4T - 3 frames, each a smooth function of the latent frames around it."""
    t = latents.shape[2]
    positions = torch.linspace(0, t - 1, 4 * t - 3)
    left = positions.floor().long().clamp(max=t - 1)
    right = (left + 1).clamp(max=t - 1)
    frac = (positions - left).view(1, 1, -1, 1, 1)
    return latents[:, :, left] * (1 - frac) + latents[:, :, right] * frac


def pixel_decode(latents):
    """fake_decode squashed into [-1, 1], so the uint8 frames keep the differences between sections."""
    return torch.tanh(fake_decode(latents) / 25)


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
@pytest.mark.parametrize("sections,window", [(1, 3), (2, 3), (4, 3), (6, 2), (3, 9)])
def test_decode_and_blend_follow_official_loop(variant, sections, window):
    start = torch.randn(1, CHANNELS, 1, HEIGHT, WIDTH)
    history = initial_history(variant, start)
    oracle_history = history.clone()
    oracle_video = None
    oracle_total = 0 if variant == "bidirectional" else 1
    overlap = 4 * window - 3
    forward = variant == "f1"
    assembler = PixelAssembler("forward" if forward else "backward", pixel_overlap(window))
    final_chunks = []
    for index, section in enumerate(plan_sections(variant, sections, window)):
        generated = generated_window(index, window)
        history = section.add_to_history(history, generated, start)
        final = assembler.add(pixel_decode(section.latents_to_decode(history)), section.decode_overlap(history))
        final_chunks = final_chunks + [final] if forward else [final] + final_chunks
        # What a consumer that stops here shows: the final frames and the pending ones, in video order.
        shown = final_chunks + [assembler.pending_frames()] if forward else [assembler.pending_frames()] + final_chunks
        video = np.concatenate(shown)
        # Only the frames the next section can still blend are pending (as float); the rest was handed out once.
        assert assembler.pending.shape[2] <= overlap

        # The official loop, its own bookkeeping, on whole float videos.
        if variant == "bidirectional":
            is_last = section.padding == 0
            if is_last:
                generated = torch.cat([start, generated], dim=2)
            oracle_history = torch.cat([generated, oracle_history], dim=2)
            oracle_total += generated.shape[2]
            real = oracle_history[:, :, :oracle_total]
            if oracle_video is None:
                oracle_video = pixel_decode(real)
            else:
                section_frames = window * 2 + 1 if is_last else window * 2
                oracle_video = soft_append_oracle(pixel_decode(real[:, :, :section_frames]), oracle_video, overlap)
        else:
            oracle_history = torch.cat([oracle_history, generated], dim=2)
            oracle_total += window
            real = oracle_history[:, :, -oracle_total:]
            if oracle_video is None:
                oracle_video = pixel_decode(real)
            else:
                oracle_video = soft_append_oracle(oracle_video, pixel_decode(real[:, :, -2 * window:]), overlap)
        expected = to_uint8_frames(oracle_video)
        assert video.shape == expected.shape, f"video after section {index}"
        # Independent float arithmetic may land a half level apart before rounding: at most one level.
        assert np.abs(video.astype(int) - expected.astype(int)).max() <= 1, f"video after section {index}"
    assert video.shape[0] == pixel_frame_count(latent_frame_count(sections, window))


# ------------------------------------------------------------------------------------------------ tokens


def conv_tokens(latents, kernel, pad):
    """Tokens a strided Conv3d embedder makes, counted by running one (replicate-padded where the DiT pads)."""
    if pad:
        t, h, w = latents.shape[2:]
        kt, kh, kw = kernel
        latents = F.pad(latents, (0, (kw - w % kw) % kw, 0, (kh - h % kh) % kh, 0, (kt - t % kt) % kt),
                        mode="replicate")
    weight = torch.ones(1, latents.shape[1], *kernel)
    out = F.conv3d(latents, weight, stride=kernel)
    return out.shape[2] * out.shape[3] * out.shape[4]


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
@pytest.mark.parametrize("latent_height,latent_width,window", [(10, 14, 9), (16, 24, 9), (6, 6, 5)])
def test_tokens_per_section_constant_in_video_length(variant, latent_height, latent_width, window):
    expected = tokens_per_section(latent_height, latent_width, window)
    start = torch.randn(1, CHANNELS, 1, latent_height, latent_width)
    for sections in (1, 4, 16):
        history = initial_history(variant, start)
        for index, section in enumerate(plan_sections(variant, sections, window)):
            inputs = official_inputs(section, history, start)
            noisy = torch.randn(1, CHANNELS, section.latent_indices.shape[1], latent_height, latent_width)
            counted = (conv_tokens(noisy, (1, 2, 2), pad=False)
                       + conv_tokens(inputs["clean_latents"], (1, 2, 2), pad=False)
                       + conv_tokens(inputs["clean_latents_2x"], (2, 4, 4), pad=True)
                       + conv_tokens(inputs["clean_latents_4x"], (4, 8, 8), pad=True))
            assert counted == expected, (sections, index)
            # Each index tensor covers exactly the frames its latents hold.
            assert inputs["clean_latent_indices"].shape[1] == inputs["clean_latents"].shape[2]
            assert inputs["clean_latent_2x_indices"].shape[1] == inputs["clean_latents_2x"].shape[2]
            assert inputs["clean_latent_4x_indices"].shape[1] == inputs["clean_latents_4x"].shape[2]
            generated = torch.randn(1, CHANNELS, window, latent_height, latent_width)
            history = section.add_to_history(history, generated, start)


def test_tokens_per_section_values():
    # 640x640: 80x80 latents; 9 * 1600 noisy + 2 * 1600 clean + 1 * 400 (2x) + 4 * 100 (4x).
    assert tokens_per_section(80, 80, 9) == 9 * 1600 + 2 * 1600 + 400 + 400
    # The 2x/4x kernels pad up: 10x14 latents give ceil(10/4) * ceil(14/4) = 12 and ceil(10/8) * ceil(14/8) = 4.
    assert tokens_per_section(10, 14, 9) == 9 * 35 + 2 * 35 + 12 + 4 * 4
    assert math.isclose(tokens_per_section(80, 80, 9) / tokens_per_section(40, 40, 9), 4.0, rel_tol=0.01)
