"""Keyframe images per section and latent paddings (framepack_engine.generation.keyframes): the SPEC grammar, what the
DiT receives for a keyframed section, which sections a keyframe changes (bidirectional order: last to first), the
metadata, and every bad input as one line before any model loads."""

import numpy as np
import pytest
import torch
from PIL import Image

from framepack_engine import Engine, FramePackError
from framepack_engine.commands.main import main
from framepack_engine.generation.keyframes import keyframe_sections, parse_keyframe_flag, spec_sections
from framepack_engine.media.images import resize_and_center_crop
from tests.utils import DitSpy

WINDOW = 2
FAST = dict(steps=1, latent_window_size=WINDOW, fps=8, seconds=3)  # three sections of one second
FLAGS = ["--preset", "tiny", "--steps", "1", "--latent-window-size", "2", "--fps", "8", "--seconds", "3", "--quiet"]


@pytest.fixture(scope="module")
def engine():
    return Engine.from_preset("tiny")


def picture(shift=0, height=80, width=112):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 2 + shift) % 256, (y * 3 + shift) % 256, (x + y + 2 * shift) % 256], -1).astype(np.uint8)


def new_window(result):
    """The latents a SectionResult's section generated (the bidirectional loop prepends them; the last section also
    puts the start latent in front)."""
    first = 1 if result.index == result.count - 1 else 0
    return result.latents[:, :, first:first + WINDOW]


# The grammar -----------------------------------------------------------------------------------------------------


def test_specs_name_sections_in_video_order():
    assert spec_sections(0, 4) == [0] and spec_sections("3", 4) == [3]
    assert spec_sections(-1, 4) == [3] and spec_sections("-4", 4) == [0]
    assert spec_sections("1-2", 4) == [1, 2] and spec_sections(" 0 - 3 ", 4) == [0, 1, 2, 3]
    assert keyframe_sections({"0-1": "a", -1: "b"}, 3) == {0: "0-1", 1: "0-1", 2: -1}


def test_the_flag_takes_repeats_and_musubis_one_string():
    assert parse_keyframe_flag(["1:a.png", "-1:b.png"]) == {"1": "a.png", "-1": "b.png"}
    assert parse_keyframe_flag(["0:a.png;;;2-3:b.png;;;"]) == {"0": "a.png", "2-3": "b.png"}
    assert parse_keyframe_flag(["2:C:/pictures/pose.png"]) == {"2": "C:/pictures/pose.png"}  # a colon in the path


@pytest.mark.parametrize("keyframes,count,message", [
    ({"5": "a"}, 3, "The keyframe SPEC '5' names no section of this video: it has 3 sections (0 to 2, or -1 to -3)"),
    ({-4: "a"}, 3, "The keyframe SPEC '-4' names no section"),
    ({"0-3": "a"}, 3, "The keyframe SPEC '0-3' names no section"),
    ({"2-1": "a"}, 3, "runs backwards: write the range as 1-2"),
    ({"first": "a"}, 3, "is not a section: use N, -N (from the end) or S-E"),
    ({"1": "a", "-2": "b"}, 3, "The keyframes '1' and '-2' both name section 1 (of 3)"),
])
def test_bad_specs_are_one_line(keyframes, count, message):
    with pytest.raises(FramePackError) as raised:
        keyframe_sections(keyframes, count)
    assert message in str(raised.value) and "\n" not in str(raised.value)


# The engine ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(engine):
    """The video without keyframes, to compare with."""
    return list(engine.stream("a cat", image=picture(), **FAST))


def test_a_keyframe_at_section_0_that_is_the_start_image_changes_nothing(engine, plain):
    image = picture()
    keyed = list(engine.stream("a cat", image=image, keyframes={0: image}, **FAST))
    for before, after in zip(plain, keyed, strict=True):
        torch.testing.assert_close(after.latents, before.latents, rtol=0, atol=0)
        np.testing.assert_array_equal(after.frames, before.frames)


def test_a_keyframe_changes_its_section_and_those_generated_after_it(engine, plain, monkeypatch):
    image, keyframe = picture(), picture(shift=120)
    spy = DitSpy(engine, monkeypatch)
    keyed = list(engine.stream("a cat", image=image, keyframes={1: keyframe}, **FAST))
    # Generation order is last to first: video positions 2, 1, 0. Position 2 is generated before the keyframe's.
    assert [result.video_position for result in keyed] == [2, 1, 0]
    torch.testing.assert_close(new_window(keyed[0]), new_window(plain[0]), rtol=0, atol=0)
    assert (new_window(keyed[1]) - new_window(plain[1])).abs().max() > 1e-3  # the keyframe's own section
    # and the one generated after it, through the history it conditions on (the tiny model's random weights respond
    # to context only slightly, but nothing else differs between the runs)
    assert not torch.equal(new_window(keyed[2]), new_window(plain[2]))
    # What the DiT got: the keyframe's latent as clean_latents_pre (the first 1x frame, time index 0) of section 1
    # and its SigLIP tokens; the start image's for the others.
    size = keyed[0].frames.shape[1:3]
    fitted = {name: resize_and_center_crop(value, size[1], size[0]) for name, value in
              (("start", image), ("keyframe", keyframe))}
    latents = {name: engine.encode_latent(value) for name, value in fitted.items()}
    siglip = {name: engine.encode_image_embedding(value).float() for name, value in fitted.items()}
    for position, call in zip([2, 1, 0], spy.first_call_of_each_section(FAST["steps"])):
        expected = "keyframe" if position == 1 else "start"
        clean, indices = call["history"]["clean"]
        torch.testing.assert_close(clean[:, :, :1], latents[expected].to(clean), rtol=1e-6, atol=1e-6)
        assert int(indices[0, 0]) == 0
        torch.testing.assert_close(call["image_embeddings"], siglip[expected].to(call["image_embeddings"]))
    # The video still starts with the start image's latent.
    torch.testing.assert_close(keyed[-1].latents[:, :, :1], latents["start"].to(keyed[-1].latents))


def test_each_keyframe_is_encoded_once_and_recorded(engine, monkeypatch, tmp_path):
    path = tmp_path / "pose.png"
    Image.fromarray(picture(shift=60)).save(path)
    encoded = []
    encode = engine.encode_latent
    monkeypatch.setattr(engine, "encode_latent", lambda image: encoded.append(image.shape) or encode(image))
    results = list(engine.stream("a cat", image=picture(), keyframes={"0-2": str(path)},
                                 section_prompts="[0s: a cat sits] [1s: a cat jumps] [2s: a cat lands]", **FAST))
    assert len(encoded) == 2  # the start image and the keyframe, though the keyframe names three sections
    # section prompts and keyframes combine (generation order: the last section first)
    assert [result.stats["prompt"] for result in results] == ["a cat lands", "a cat jumps", "a cat sits"]
    assert results[0].metadata["keyframes"] == {"0-2": "pose.png"} and str(tmp_path) not in str(results[0].metadata)


def test_latent_paddings_place_every_section_right_after_its_start(engine, monkeypatch):
    spy = DitSpy(engine, monkeypatch)
    results = list(engine.stream("a cat", image=picture(), keyframes={"0-2": picture(shift=30)},
                                 latent_paddings=[0, 0, 0], **FAST))
    for call in spy.first_call_of_each_section(FAST["steps"]):
        assert call["latent_indices"].tolist() == [[1, 2]]  # padding 0: the window right after time index 0
    assert results[-1].latents.shape[2] == 3 * WINDOW + 1  # only the last section got the start latent
    assert results[0].metadata["latent_paddings"] == [0, 0, 0]
    with pytest.raises(FramePackError, match="latent_paddings has 2 values but the video has 3 sections"):
        next(engine.stream("x", latent_paddings="0,0", **FAST))


def test_f1_refuses_keyframes_and_paddings():
    f1 = Engine.from_preset("tiny", variant="f1")
    with pytest.raises(FramePackError, match="Keyframes need the bidirectional model"):
        next(f1.stream("x", image=picture(), keyframes={1: picture()}, **FAST))
    with pytest.raises(FramePackError, match="latent_paddings places the sections of the bidirectional model"):
        next(f1.stream("x", latent_paddings=[0, 0, 0], **FAST))


# The command -------------------------------------------------------------------------------------------------------


@pytest.fixture
def images(tmp_path):
    for name, shift in (("a.png", 0), ("b.png", 90)):
        Image.fromarray(picture(shift=shift)).save(tmp_path / name)
    return tmp_path


def test_the_command_writes_a_keyframed_video(images, capsys):
    out = images / "kf.mp4"
    code = main(["generate", "x", "--image", str(images / "a.png"), "--keyframe", f"1:{images / 'b.png'}",
                 "--latent-paddings", "0,0,0", "--out", str(out), *FLAGS])
    assert code == 0 and out.is_file()


@pytest.mark.parametrize("arguments,message", [
    (["--keyframe", "5:{b}"], "The keyframe SPEC '5' names no section of this video"),
    (["--keyframe", "{b}"], "is not SPEC:IMAGE: write e.g. --keyframe 3:pose.png"),
    (["--keyframe", "1:{b};;;-2:{b}"], "The keyframes '1' and '-2' both name section 1 (of 3)"),
    (["--keyframe", "1:{missing}"], "The keyframe 1 file 'missing.png' does not exist"),
    (["--keyframe", "1:{b}", "--variant", "f1"], "Keyframes need the bidirectional model"),
    (["--latent-paddings", "0,0"], "--latent-paddings has 2 values but the video has 3 sections"),
    (["--latent-paddings", "0,x,0"], "--latent-paddings must be integers separated by ','"),
    (["--latent-paddings", "0,-1,0"], "--latent-paddings must be an integer from 0 to 1000"),
])
def test_bad_keyframes_are_one_line_before_loading(images, capsys, monkeypatch, arguments, message):
    monkeypatch.setattr(Engine, "from_resolved", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    arguments = [item.format(b=images / "b.png", missing=images / "missing.png") for item in arguments]
    code = main(["generate", "x", "--image", str(images / "a.png"), *arguments, "--out", str(images / "v.mp4"),
                 *FLAGS])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0], error
    assert not (images / "v.mp4").exists()
