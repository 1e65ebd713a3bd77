"""Reproducing a video from its file: every output records the model options with the models' identities and the
inputs', and `framepack generate --settings-from FILE` reads them back (flags given winning, warnings where the
models or inputs differ, one line for a file without our metadata)."""

import json
import warnings

import av
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.media.metadata import read_metadata
from framepack_engine.reproduce import check_recorded_inputs, read_recorded, recorded_options
from framepack_engine.runtime.identity import fingerprint, source_identity, weights_sha256

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--seconds", "1", "--quiet"]


def video_frames(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def safetensors_frames(path):
    with safe_open(str(path), "pt") as opened:
        return opened.get_tensor("frames").numpy()


def write_image(path, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_tiny_lora(path, seed):
    """A LoRA (ComfyUI layout) over a few linear layers of the tiny preset's DiT."""
    from framepack_engine.models.presets import tiny_dit

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, layer in list(tiny_dit(torch.Generator().manual_seed(0)).linear_layers().items())[:6]:
        tensors[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, layer.in_features, generator=generator)
        tensors[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(layer.out_features, 2, generator=generator)
    save_file(tensors, str(path))
    return path


@pytest.fixture(autouse=True)
def every_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """One image-to-video generation with non-default options, written as mp4 and as safetensors."""
    folder = tmp_path_factory.mktemp("original")
    image = write_image(folder / "start.png", seed=1)
    options = ["a cat walks", "--image", str(image), "--seed", "7", "--crf", "20", "--cache", "teacache",
               "--distilled-guidance", "8", *FAST]
    assert main(["generate", *options, "--out", str(folder / "a.mp4")]) == 0
    assert main(["generate", *options, "--out", str(folder / "a.safetensors")]) == 0
    return folder


def test_outputs_record_model_options_sources_backend_and_inputs(original):
    recorded = read_recorded(original / "a.mp4")
    assert recorded["model_options"] == {"preset": "tiny", "variant": "bidirectional", "attention": "auto",
                                         "fused_kernels": False, "compile": False, "lora_mode": "fused"}
    assert recorded["model_sources"] == {"preset": "tiny"}
    assert recorded["attention_backend"] == "sdpa"
    image = recorded["inputs"]["image"]
    assert image["name"] == "start.png" and len(image["pixels_sha256"]) == 64
    assert recorded["output"] == {"codec": None, "crf": 20, "pixel_format": None}
    assert (recorded["seed"], recorded["cache"], recorded["distilled_guidance"]) == (7, "teacache", 8.0)
    assert str(original) not in json.dumps(recorded)  # names only, never the machine's folders
    assert read_recorded(original / "a.safetensors") == {**recorded, "output": recorded["output"]}


@pytest.mark.parametrize("name", ["a.mp4", "a.safetensors"])
def test_settings_from_reproduces_the_same_frames(original, tmp_path, name, capsys):
    out = tmp_path / name
    code = main(["generate", "--settings-from", str(original / name), "--image", str(original / "start.png"),
                 "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "warning" not in capsys.readouterr().err
    read = video_frames if name.endswith(".mp4") else safetensors_frames
    first, again = read(original / name), read(out)
    assert first.shape == again.shape and first.shape[0] == 4 * (1 * 2 + 1) - 3
    assert np.array_equal(first, again)


def test_a_flag_given_wins_over_the_recorded_value(original, tmp_path):
    out = tmp_path / "b.safetensors"
    assert main(["generate", "--settings-from", str(original / "a.safetensors"), "--image",
                 str(original / "start.png"), "--seed", "8", "--quiet", "--out", str(out)]) == 0
    recorded = read_recorded(out)
    assert recorded["seed"] == 8 and recorded["distilled_guidance"] == 8.0 and recorded["cache"] == "teacache"
    assert not np.array_equal(safetensors_frames(out), safetensors_frames(original / "a.safetensors"))


def test_another_image_and_another_lora_are_warned_about(original, tmp_path, capsys):
    other = write_image(tmp_path / "other.png", seed=2)
    lora = write_tiny_lora(tmp_path / "style.safetensors", seed=3)
    out = tmp_path / "again.mp4"
    capsys.readouterr()
    assert main(["generate", "--settings-from", str(original / "a.mp4"), "--image", str(other), "--lora",
                 f"{lora}:0.7", "--quiet", "--out", str(out)]) == 0
    warned = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 2, warned
    assert "LoRAs differ" in warned[0] and "none then" in warned[0] and "style.safetensors:0.7" in warned[0]
    assert "start image differs" in warned[1] and "start.png" in warned[1]
    recorded = read_recorded(out)
    assert [(item["file"], item["strength"], item["sha256"]) for item in recorded["loras"]] == [
        ("style.safetensors", 0.7, weights_sha256(lora))]
    assert recorded["model_options"]["lora"] == [["style.safetensors", 0.7]]
    assert recorded["inputs"]["image"]["name"] == "other.png"


def test_a_recorded_input_must_be_given_again(original, tmp_path, capsys):
    code = main(["generate", "--settings-from", str(original / "a.mp4"), "--quiet", "--out", str(tmp_path / "v.mp4")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "'start.png'" in error[0] and "--image PATH" in error[0]
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("make", ["plain_video", "json", "missing", "text"])
def test_a_file_without_our_metadata_is_one_line(tmp_path, capsys, make):
    path = {"plain_video": tmp_path / "plain.mp4", "json": tmp_path / "settings.json",
            "missing": tmp_path / "nowhere.mp4", "text": tmp_path / "notes.txt"}[make]
    if make == "plain_video":
        with av.open(str(path), "w") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width = stream.height = 32
            for _ in range(3):
                container.mux(stream.encode(av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8))))
            container.mux(stream.encode())
    elif make == "json":
        path.write_text('{"seed": 3}')
    elif make == "text":
        path.write_text("hello")
    code = main(["generate", "--settings-from", str(path), "--quiet", "--out", str(tmp_path / "v.mp4")])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and error[0].startswith("error: ") and path.name in error[0], error
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".mkv", ".mov"])
def test_every_container_gives_the_metadata_back(tmp_path, suffix):
    from framepack_engine.media.video import encode_video

    metadata = {"engine": "framepack-engine", "prompt": "a [0s: cat] ünïcode", "seed": 3,
                "loras": [{"strength": 0.5}]}
    frames = np.random.default_rng(0).integers(0, 256, (3, 32, 48, 3), dtype=np.uint8)
    path = encode_video(frames, tmp_path / f"v{suffix}", 8, metadata=metadata)
    assert read_recorded(path) == metadata


def test_png_frames_carry_the_metadata_in_a_text_chunk(tmp_path):
    out = tmp_path / "frames"
    assert main(["generate", "a dog", "--seed", "3", *FAST, "--out", str(out)]) == 0
    from_folder = read_metadata(out)
    assert from_folder["seed"] == 3 and from_folder == read_metadata(out / "settings.json")
    (out / "settings.json").unlink()
    assert read_metadata(out / "frame_00004.png") == from_folder


def test_local_model_identity_is_cheap_and_tells_weights_apart(tmp_path):
    generator = torch.Generator().manual_seed(0)
    weights = {f"layer{i}.weight": torch.randn(64, 256, generator=generator) for i in range(4)}
    save_file(weights, str(tmp_path / "a.safetensors"))
    weights["layer3.weight"] = weights["layer3.weight"] + 1e-3  # a fine-tune: same header, other weights
    save_file(weights, str(tmp_path / "b.safetensors"))
    assert fingerprint(tmp_path / "a.safetensors") != fingerprint(tmp_path / "b.safetensors")
    assert fingerprint(tmp_path / "a.safetensors") == fingerprint(tmp_path / "a.safetensors")
    identity = source_identity("transformer", str(tmp_path / "a.safetensors"))
    assert identity == {"name": "a.safetensors", "fingerprint": fingerprint(tmp_path / "a.safetensors")}


def test_repo_ids_are_named_by_their_cached_revision(tmp_path):
    from tests.fixtures import place_in_hf_cache

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"weight": torch.ones(2)}, str(folder / "model.safetensors"))
    snapshot = place_in_hf_cache(folder, "someone/some-model", tmp_path / "cache")
    identity = source_identity("transformer", "someone/some-model", cache_dir=tmp_path / "cache")
    assert identity == {"repo": "someone/some-model", "revision": snapshot.name} and len(snapshot.name) == 40


def test_a_local_model_must_be_given_again_and_flags_win():
    recorded = {"engine": "framepack-engine", "seed": 4, "unknown_option": 1,
                "model_options": {"transformer": "my_dit.safetensors", "dtype": "float16", "quantize": "int8",
                                  "device": "cuda:3", "lora": [["style.safetensors", 0.5]]},
                "model_sources": {"transformer": {"name": "my_dit.safetensors", "fingerprint": "0" * 64}}}
    with pytest.raises(FramePackError, match="local transformer 'my_dit.safetensors'.*--transformer PATH"):
        recorded_options(recorded, {}, {}, None)
    generation, models, preset = recorded_options(recorded, {"seed": 5}, {"transformer": "/x/dit.safetensors"}, None)
    assert generation == {"seed": 5} and preset is None
    # the machine's options (device) and the LoRAs (their folders are not recorded) are not taken back
    assert models == {"transformer": "/x/dit.safetensors", "dtype": "float16", "quantize": "int8"}
    _, models, preset = recorded_options(recorded, {}, {}, "tiny")
    assert preset == "tiny" and models == {"quantize": "int8"}


def test_recorded_keyframes_must_be_given_again():
    recorded = {"engine": "framepack-engine", "keyframes": {"-1": "pose.png", "0-1": "walk.png"}}
    with pytest.raises(FramePackError, match=r"keyframes \(--keyframe -1:pose.png --keyframe 0-1:walk.png\)"):
        check_recorded_inputs(recorded, {"keyframes": None})
    check_recorded_inputs(recorded, {"keyframes": ["-1:other.png"]})


def test_a_python_api_preset_video_is_reproduced_by_the_command(tmp_path):
    from framepack_engine import Engine

    video = Engine.from_preset("tiny").generate("a cow", seed=5, steps=2, latent_window_size=2, fps=8, seconds=1)
    video.save(tmp_path / "api.safetensors")
    assert read_recorded(tmp_path / "api.safetensors")["model_sources"] == {"preset": "tiny"}
    assert main(["generate", "--settings-from", str(tmp_path / "api.safetensors"), "--quiet",
                 "--out", str(tmp_path / "again.safetensors")]) == 0
    assert np.array_equal(safetensors_frames(tmp_path / "again.safetensors"), video.frames)
