"""The Engine end to end on the tiny preset: modes, variants, frame counts, determinism, cancellation, errors."""

import threading

import numpy as np
import pytest
import torch

from framepack_engine import Engine, FramePackError
from framepack_engine.pipeline import FrameCollector, parse_section_prompts
from framepack_engine.generation.sections import section_count

FAST = dict(steps=2, latent_window_size=2, fps=8)  # one section per second at these settings


@pytest.fixture(scope="module")
def bidirectional():
    return Engine.from_preset("tiny", variant="bidirectional")


@pytest.fixture(scope="module")
def f1():
    return Engine.from_preset("tiny", variant="f1")


def gradient_image(height=80, width=112, shift=0):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 2 + shift) % 256, (y * 3) % 256, np.full_like(x, 90)], -1).astype(np.uint8)


def expected_frames(seconds, fps, window):
    return 4 * (section_count(seconds, fps, window) * window + 1) - 3


@pytest.mark.parametrize("mode", ["t2v", "i2v", "flf2v"])
def test_bidirectional_modes(bidirectional, mode):
    image = gradient_image() if mode != "t2v" else None
    end_image = gradient_image(shift=100) if mode == "flf2v" else None
    video = bidirectional.generate("a cat walks", image=image, end_image=end_image, seconds=2, **FAST)
    assert video.frames.dtype == np.uint8 and video.frames.shape[-1] == 3
    assert len(video.frames) == expected_frames(2, 8, 2) == 17
    assert len(video.stats["sections"]) == 2 and not video.stats["cancelled"]
    assert video.metadata["mode"] == mode and video.metadata["seed"] == 31337


@pytest.mark.parametrize("mode", ["t2v", "i2v"])
def test_f1_modes(f1, mode):
    image = gradient_image() if mode == "i2v" else None
    video = f1.generate("a cat walks", image=image, seconds=3, **FAST)
    assert len(video.frames) == expected_frames(3, 8, 2) == 25


def test_image_size_follows_the_nearest_bucket(bidirectional):
    from framepack_engine.models.buckets import find_nearest_bucket

    video = bidirectional.generate("x", image=gradient_image(80, 112), seconds=1, **FAST)
    assert video.frames.shape[1:3] == find_nearest_bucket(80, 112, resolution=64)


def test_same_seed_same_frames_other_seed_other_frames(f1):
    first = f1.generate("a dog runs", seconds=2, seed=5, **FAST).frames
    again = f1.generate("a dog runs", seconds=2, seed=5, **FAST).frames
    other = f1.generate("a dog runs", seconds=2, seed=6, **FAST).frames
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_tokens_per_section_do_not_grow_with_video_length(bidirectional, f1, variant):
    engine = bidirectional if variant == "bidirectional" else f1
    short = engine.generate("x", seconds=1, **FAST).stats["sections"]
    long = engine.generate("x", seconds=5, **FAST).stats["sections"]
    assert len(long) == 5
    assert {s["tokens"] for s in short + long} == {short[0]["tokens"]}


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_stream_hands_out_each_frame_once(bidirectional, f1, variant):
    engine = bidirectional if variant == "bidirectional" else f1
    results = list(engine.stream("x", seconds=3, **FAST))
    assert [r.index for r in results] == [0, 1, 2]
    if variant == "bidirectional":
        # First decode: one window (5 frames), all still to be crossfaded; later ones decode two windows (13) and
        # crossfade one window (5) in; the last adds the start frame (17) and leaves nothing pending.
        assert [len(r.frames) for r in results] == [0, 13 - 5, 17]
        assert [len(r.pending_frames) for r in results] == [5, 5, 0]
        assert [r.video_position for r in results] == [2, 1, 0] and results[0].direction == "backward"
    else:
        assert [len(r.frames) for r in results] == [4, 13 - 5, 13]
        assert [len(r.pending_frames) for r in results] == [5, 5, 0]
        assert [r.video_position for r in results] == [0, 1, 2] and results[0].direction == "forward"
    # Joined in video order, the frames handed out are the whole video that generate() returns.
    collector = FrameCollector()
    lengths = []
    for result in results:
        collector.add(result)
        lengths.append(len(collector.frames()))
    # F1's first section also decodes the start frame's latent (3 latent frames: 9 pixel frames).
    assert lengths == ([5, 13, 25] if variant == "bidirectional" else [9, 17, 25])
    np.testing.assert_array_equal(collector.frames(), engine.generate("x", seconds=3, **FAST).frames)


def test_cancel_stops_at_the_next_step_and_keeps_finished_sections(f1):
    cancel = threading.Event()
    seen = []

    def callback(info):
        seen.append((info["section"], info["i"]))
        if info["section"] == 1:
            cancel.set()

    video = f1.generate("x", seconds=4, callback=callback, cancel=cancel, **FAST)
    assert video.stats["cancelled"]
    assert len(video.stats["sections"]) == 1
    assert len(video.frames) == 4 * (2 + 1) - 3
    assert seen[-1] == (1, 0)  # stopped at the first step of section 2


def test_callback_sees_every_step_with_a_preview(f1):
    steps = []
    f1.generate("x", seconds=2, callback=steps.append, **FAST)
    assert [(s["section"], s["i"]) for s in steps] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    preview = steps[-1]["preview"]
    assert preview.dtype == torch.uint8 and tuple(preview.shape) == (2, 8, 8, 3)  # window frames at latent size


def test_section_prompts_are_encoded_once_each(f1):
    before = f1.text_encoder.cache_info()["misses"]
    f1.generate("a cat", seconds=4, section_prompts=["walks", "sits"], **FAST)
    f1.generate("a cat", seconds=4, section_prompts=["walks", "sits"], **FAST)
    assert f1.text_encoder.cache_info()["misses"] - before <= 2


def test_section_prompt_forms():
    positions = [3, 2, 1, 0]  # bidirectional generation order
    assert parse_section_prompts(["walking", "jumping"], "astronaut", 4, 1.0, positions) == [
        "astronaut jumping", "astronaut jumping", "astronaut walking", "astronaut walking"]
    assert parse_section_prompts("[0s: a man waves] [2s: a man jumps]", "base", 4, 1.0, [0, 1, 2, 3]) == [
        "a man waves", "a man waves", "a man jumps", "a man jumps"]
    assert parse_section_prompts(None, "p", 2, 1.0, [0, 1]) == ["p", "p"]


def test_init_strength_changes_the_video_and_one_keeps_it(bidirectional):
    image = gradient_image()
    full = bidirectional.generate("x", image=image, seconds=1, init_strength=1.0, **FAST).frames
    mixed = bidirectional.generate("x", image=image, seconds=1, init_strength=0.5, **FAST).frames
    assert np.abs(full.astype(int) - mixed.astype(int)).mean() > 0.5


def test_video_extension_continues_the_input(f1):
    source = f1.generate("x", seconds=1, seed=1, **FAST)
    extended = f1.generate("x", input_video=source.frames, seconds=2, seed=2, **FAST)
    assert len(extended.frames) == len(source.frames) + 2 * 4 * 2
    # The untouched beginning of the input is kept as it was (VAE round trip aside: the input is re-encoded
    # only for the history; its frames are kept as given).
    np.testing.assert_array_equal(extended.frames[:1], source.frames[:1])


@pytest.mark.parametrize("call,message", [
    (dict(image="does-not-exist.png"), "does not exist"),
    (dict(seconds=0), r"seconds must be a finite number in \(0, 3600\]"),
    (dict(seconds=-2), r"seconds must be a finite number in \(0, 3600\]"),
    (dict(steps=0), "steps must be an integer from 1 to 1000"),
    (dict(sampler="ddim"), "Unknown sampler"),
    (dict(cache="magcache", magcache_calibration="missing.json"), "'missing.json' does not exist"),
    (dict(end_image=gradient_image()), "needs a start image"),
])
def test_bad_inputs_give_clear_errors(bidirectional, call, message):
    with pytest.raises(FramePackError, match=message):
        bidirectional.generate("x", **{**FAST, "seconds": 1, **call})


def test_unreadable_image_is_a_clear_error(bidirectional, tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(b"not an image at all")
    with pytest.raises(FramePackError, match="not a readable image"):
        bidirectional.generate("x", image=path, seconds=1, **FAST)


def test_end_image_with_f1_is_a_clear_error(f1):
    with pytest.raises(FramePackError, match="bidirectional"):
        f1.generate("x", image=gradient_image(), end_image=gradient_image(), seconds=1, **FAST)


def test_video_extension_needs_f1(bidirectional):
    with pytest.raises(FramePackError, match="F1"):
        bidirectional.generate("x", input_video=np.zeros((5, 64, 64, 3), np.uint8), seconds=1, **FAST)


from tests.fixtures import (flux_redux_folder, framepack_transformer_folder, hf_cache_dir,  # noqa: E402,F401
                            hunyuan_video_base_folder, single_file_dit_fp8_scaled)


def test_from_pretrained_local_folders_generates(framepack_transformer_folder, hunyuan_video_base_folder,
                                                 flux_redux_folder):
    engine = Engine.from_pretrained(transformer=framepack_transformer_folder, base=hunyuan_video_base_folder,
                                    image_encoder=flux_redux_folder, device="cpu", dtype=torch.float32,
                                    attention="sdpa")
    assert engine.variant == "bidirectional" and engine.transformer.fp32_output
    video = engine.generate("a cat walks", image=gradient_image(), seconds=1, resolution=64, **FAST)
    assert len(video.frames) == 4 * 3 - 3


def test_from_pretrained_repo_ids_through_the_cache_and_a_single_fp8_file(hf_cache_dir, single_file_dit_fp8_scaled):
    engine = Engine.from_pretrained(transformer=single_file_dit_fp8_scaled, cache_dir=hf_cache_dir, device="cpu",
                                    dtype=torch.float32, allow_download=False)
    video = engine.generate("a dog runs", seconds=1, resolution=64, **FAST)
    assert len(video.frames) == 4 * 3 - 3


@pytest.mark.parametrize("name,variant", [("lllyasviel/FramePackI2V_HY", "bidirectional"),
                                          ("lllyasviel/FramePack_F1_I2V_HY_20250503", "f1"),
                                          ("FramePackI2V_HY_fp8_e4m3fn.safetensors", "bidirectional"),
                                          ("/models/framepack-f1-bf16.safetensors", "f1")])
def test_variant_is_read_off_the_transformer_name(name, variant):
    from framepack_engine.models.checkpoints import guess_variant

    assert guess_variant(name) == variant


def test_missing_repo_offline_is_a_clear_error(tmp_path):
    from framepack_engine.errors import ModelSourceError

    with pytest.raises(ModelSourceError, match="hf download"):
        Engine.from_pretrained(transformer="nobody/NoSuchModel", cache_dir=tmp_path, allow_download=False)
