"""One-frame inference (framepack_engine.generation.one_frame): what the DiT receives (control latents, their indices
and masks, the target index, the no_2x / no_4x / no_post switches), the image it makes (the bucket's size, repeatable
with a seed, its settings in the PNG), the command, and every bad input as one line before any model loads."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_engine import Engine, FramePackError
from framepack_engine.commands.main import main
from framepack_engine.generation.one_frame import latent_mask
from framepack_engine.media.still import read_still_metadata
from tests.utils import DitSpy
from tests.test_upscale import esrgan_file, esrgan_state  # noqa: F401 (pytest fixtures: a random-weight ESRGAN x2)

WINDOW = 3
FAST = dict(steps=1, latent_window_size=WINDOW)
FLAGS = ["--preset", "tiny", "--steps", "1", "--latent-window-size", str(WINDOW), "--quiet"]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


def picture(shift=0, height=48, width=64):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3 + shift) % 256, (y * 5 + shift) % 256, (x + 2 * y + shift) % 256], -1).astype(np.uint8)


def block_mask(height=48, width=64, block=8):
    """A mask drawn on the latent grid (8x8 pixel blocks): keeps the left half and one block on the right."""
    mask = np.zeros((height, width), dtype=np.float32)
    mask[:, : width // 2] = 1
    mask[:block, -block:] = 1
    return mask


def test_the_dit_gets_the_masked_control_latents_at_their_indices_and_the_target_index(engine, monkeypatch):
    start, reference = picture(), picture(shift=100)
    alpha = (block_mask()[::-1] * 255).astype(np.uint8)[:, :, None]  # the reference's own transparency
    reference_rgba = np.concatenate([reference, alpha], axis=2)
    mask = block_mask()
    spy = DitSpy(engine, monkeypatch)
    image = engine.generate_image("a dress", start, control_images=[start, reference_rgba],
                                  control_masks=[(mask * 255).astype(np.uint8)], control_index=[0, 10],
                                  target_index=5, **FAST)
    assert image.image.shape == (48, 64, 3) and len(spy.calls) == 1
    call = spy.calls[0]
    assert call["latents"].shape[2] == 1 and call["latent_indices"].tolist() == [[5]]
    clean, indices = call["history"]["clean"]
    assert indices.tolist() == [[0, 10, 1 + WINDOW]]  # the controls, then the zero "post" frame
    latent_height, latent_width = clean.shape[-2:]
    # A transparent image is read onto white (README, Input images), its alpha then masks its latent.
    on_white = np.where(alpha > 0, reference, 255).astype(np.uint8)
    for number, (control, pixels) in enumerate([(start, mask), (on_white, block_mask()[::-1])]):
        expected = engine.encode_latent(control) * latent_mask(torch.from_numpy(pixels.copy()), latent_height,
                                                               latent_width)
        torch.testing.assert_close(clean[:, :, number:number + 1], expected.to(clean), rtol=1e-6, atol=1e-6)
        dropped = latent_mask(torch.from_numpy(pixels.copy()), latent_height, latent_width)[0, 0, 0] == 0
        assert dropped.any() and (~dropped).any()
        assert bool((clean[0, :, number][:, dropped] == 0).all())  # masked positions are exactly zero
        assert bool((clean[0, :, number][:, ~dropped] != 0).any())
    assert bool((clean[:, :, 2] == 0).all())
    for name, first, frames in (("clean_2x", WINDOW + 2, 2), ("clean_4x", WINDOW + 4, 16)):
        latents, scale_indices = call["history"][name]
        assert scale_indices.tolist() == [list(range(first, first + frames))] and bool((latents == 0).all())
    assert image.metadata["control_index"] == [0, 10] and image.metadata["target_index"] == 5


@pytest.mark.parametrize("switches,scales,clean_indices", [
    ("no_2x", {"clean", "clean_4x"}, [0, 1 + WINDOW]),
    ("no_4x,no_2x", {"clean"}, [0, 1 + WINDOW]),
    ("no_post", {"clean", "clean_2x", "clean_4x"}, [0]),
    ("no_post,no_2x,no_4x", {"clean"}, [0]),
])
def test_the_switches_drop_those_inputs(engine, monkeypatch, switches, scales, clean_indices):
    spy = DitSpy(engine, monkeypatch)
    image = engine.generate_image("x", picture(), one_frame_options=switches, **FAST)
    history = spy.calls[0]["history"]
    assert set(history) == scales and history["clean"][1].tolist() == [clean_indices]
    from framepack_engine.models.flops import packed_sequence_of_inputs
    from framepack_engine.models.history import HistoryContext

    context = HistoryContext.of(**history)
    packed = packed_sequence_of_inputs(engine.transformer.config, spy.calls[0]["latents"].shape, context, 0, 0)
    assert image.stats["tokens"] == packed.latent_tokens  # the section's stats count what the DiT packed
    assert spy.calls[0]["latent_indices"].tolist() == [[WINDOW]]  # the default target: the window's last index
    # without control images the start image is the one control image, unmasked
    torch.testing.assert_close(history["clean"][0][:, :, :1], engine.encode_latent(picture()), rtol=1e-6, atol=1e-6)


def test_one_image_at_the_bucket_size_repeatable_with_a_seed(engine, tmp_path):
    start = picture(height=80, width=112)
    first = engine.generate_image("a cat", start, seed=7, **FAST)
    again = engine.generate_image("a cat", start, seed=7, **FAST)
    other = engine.generate_image("a cat", start, seed=8, **FAST)
    from framepack_engine.models.buckets import find_nearest_bucket

    assert first.image.shape[:2] == find_nearest_bucket(80, 112, resolution=64)
    np.testing.assert_array_equal(first.image, again.image)
    assert np.abs(first.image.astype(int) - other.image).mean() > 0.5
    saved = first.save(tmp_path / "cat.png")
    np.testing.assert_array_equal(np.asarray(Image.open(saved)), first.image)
    recorded = read_still_metadata(saved)
    assert recorded["seed"] == 7 and recorded["prompt"] == "a cat" and recorded["one_frame"] is True
    assert recorded["mode"] == "one_frame" and recorded["control_images"] == ["(start image)"]


def test_the_step_caches_apply_to_the_one_section(engine):
    image = engine.generate_image("x", picture(), steps=4, cache="teacache", cache_threshold=1e9,
                                  latent_window_size=WINDOW)
    assert image.stats["cache_steps_skipped"] > 0


# The command -------------------------------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    Image.fromarray(picture()).save(tmp_path / "start.png")
    rgba = np.concatenate([picture(shift=80), (block_mask() * 255).astype(np.uint8)[:, :, None]], axis=2)
    Image.fromarray(rgba).save(tmp_path / "reference.png")
    Image.fromarray((block_mask() * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "small_mask.png")
    return tmp_path


@pytest.mark.parametrize("name", ["edit.png", "edit.jpg"])
def test_the_command_writes_the_image_with_its_settings(files, name):
    out = files / name
    code = main(["generate", "a dress", "--image", str(files / "start.png"), "--one-frame", "--target-index", "5",
                 "--control-image", str(files / "start.png"), "--control-image", str(files / "reference.png"),
                 "--control-mask", str(files / "mask.png"), "--control-index", "0;10",
                 "--one-frame-options", "no_2x,no_4x", "--seed", "3", "--out", str(out), *FLAGS])
    assert code == 0
    with Image.open(out) as written:
        assert written.size == (64, 48) and written.format == ("PNG" if name.endswith("png") else "JPEG")
    recorded = read_still_metadata(out)
    assert (recorded["target_index"], recorded["control_index"], recorded["one_frame_options"]) == (
        5, [0, 10], ["no_2x", "no_4x"])
    assert recorded["control_images"] == ["start.png", "reference.png"] and recorded["control_masks"] == ["mask.png"]
    assert str(files) not in json.dumps(recorded) and recorded["seed"] == 3


@pytest.mark.parametrize("arguments,message", [
    (["--one-frame", "--control-image", "{start}", "--control-mask", "{small}"],
     "Control mask 1 is 40x40 pixels but control image 1 is 64x48: give a mask of its image's size"),
    (["--one-frame", "--control-image", "{start}", "--control-mask", "{mask}", "--control-mask", "{mask}"],
     "2 control masks for 1 control image: give at most one mask per control image"),
    (["--one-frame", "--control-image", "{start}", "--control-image", "{reference}"],
     "2 control images need their time indices: give one per image, e.g. --control-index '0;10'"),
    (["--one-frame", "--control-image", "{start}", "--control-index", "0;10"],
     "--control-index has 2 indices for 1 control image"),
    (["--one-frame", "--control-index", "0;x"], "--control-index must be integers separated by ';'"),
    (["--one-frame", "--target-index", "-1"], "--target-index must be an integer from 0 to 1000"),
    (["--one-frame", "--one-frame-options", "no_3x"], "Unknown --one-frame-options 'no_3x': choose from no_2x"),
    (["--one-frame", "--one-frame-options", "target_index=5"], "give it as --target-index 5 instead"),
    (["--one-frame", "--variant", "f1"], "One-frame inference needs the bidirectional model"),
    (["--one-frame", "--end-image", "{reference}"], "--end-image is for videos; --one-frame takes control images"),
    (["--one-frame", "--latent-paddings", "0"], "--latent-paddings is for the frames of a video, and --one-frame"),
    (["--one-frame", "--interpolate", "2"], "--interpolate is for the frames of a video, and --one-frame makes one image: leave one of them out (--upscale does"),
    (["--one-frame", "--fps-out", "60"], "--fps-out is for the frames of a video"),
    (["--one-frame", "--keyframe", "0:{reference}"], "Keyframes place images in the sections of a video"),
    (["--control-image", "{reference}"], "--control-images are one-frame inputs: pass --one-frame too"),
    (["--target-index", "3"], "--target-index is a one-frame option: pass --one-frame too"),
    (["--one-frame", "--out", "{folder}/edit.mp4"], "is not a name of an image format to write: end --out with"),
    (["--one-frame", "--nproc", "2"], "--one-frame runs in one process"),
])
def test_bad_one_frame_inputs_are_one_line_before_loading(files, capsys, monkeypatch, arguments, message):
    monkeypatch.setattr(Engine, "from_resolved", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    names = {"start": files / "start.png", "reference": files / "reference.png", "mask": files / "mask.png",
             "small": files / "small_mask.png", "folder": files}
    arguments = [item.format(**names) for item in arguments]
    out = [] if "--out" in arguments else ["--out", str(files / "edit.png")]
    code = main(["generate", "x", "--image", str(files / "start.png"), *arguments, *out, *FLAGS])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0], error
    assert not (files / "edit.png").exists() and not (files / "edit.mp4").exists()


def test_the_api_says_it_in_keywords():
    engine_free = Engine.__new__(Engine)  # the checks come before any model work
    engine_free.closed, engine_free.variant, engine_free.default_resolution = False, "bidirectional", 64
    with pytest.raises(FramePackError, match="target_index is a one-frame option: pass one_frame too"):
        next(engine_free.stream("x", image=picture(), target_index=3))
    with pytest.raises(FramePackError, match="One-frame inference makes one image from a start image: pass image="):
        engine_free.generate_image("x", None)


def test_grayscale_files_are_read(tmp_path):
    """Masks are usually 8-bit grayscale PNGs (PIL mode L), which have no channel axis."""
    from framepack_engine.media.images import load_image, load_mask

    values = (block_mask() * 255).astype(np.uint8)
    Image.fromarray(values).save(tmp_path / "mask.png")
    assert Image.open(tmp_path / "mask.png").mode == "L"
    np.testing.assert_array_equal(load_image(tmp_path / "mask.png"), np.repeat(values[:, :, None], 3, axis=2))
    np.testing.assert_allclose(load_mask(tmp_path / "mask.png"), block_mask(), atol=1e-6)


def test_the_upscaler_runs_on_the_image(files, esrgan_file):
    out = files / "big.png"
    assert main(["generate", "x", "--image", str(files / "start.png"), "--one-frame", "--upscale", str(esrgan_file),
                 "--out", str(out), *FLAGS]) == 0
    with Image.open(out) as written:
        assert written.size == (2 * 64, 2 * 48)
    assert read_still_metadata(out)["upscaler"]["scale"] == 2


def test_settings_from_the_image_reproduces_it(files, capsys):
    made, again = files / "made.png", files / "again.png"
    controls = ["--control-image", str(files / "start.png"), "--control-image", str(files / "reference.png"),
                "--control-index", "0;10"]
    assert main(["generate", "a dress", "--image", str(files / "start.png"), "--one-frame", "--target-index", "4",
                 "--seed", "9", *controls, "--out", str(made), *FLAGS]) == 0
    capsys.readouterr()
    code = main(["generate", "--settings-from", str(made), "--image", str(files / "start.png"), "--out", str(again),
                 "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "--control-image start.png --control-image reference.png" in error[0]
    assert main(["generate", "--settings-from", str(made), "--image", str(files / "start.png"),
                 *controls[:4], "--out", str(again), "--quiet"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(made)))
