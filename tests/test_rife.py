"""RIFE frame interpolation: our IFNet against ccvfi's RIFE 4.x on random weights (converted from the layouts users
hold by `framepack convert-rife`), scene cuts, the section writer's per-section interpolation against the whole
video's, and `--interpolate` end to end on the tiny preset."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.media.interpolation import SegmentInterpolator, interpolate_frames, scene_cuts
from framepack_engine.media.output import SectionOutputFile
from framepack_engine.media.postprocess import PostProcess
from framepack_engine.models.rife import PAD_MULTIPLE, IFNet, load_rife
from tests.oracles import import_oracle
from tests.utils import assert_relative_error

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]


def reference_ifnet(seed=0):
    """ccvfi's IFNet (RIFE 4.26's layout) with random weights: PyTorch's initialisation from a seed, then random
    per-channel betas and biases, so that every parameter matters."""
    torch.manual_seed(seed)
    reference = import_oracle("ccvfi").arch.IFNet().eval()
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if name.endswith("beta"):
                parameter.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.1)
    return reference


@pytest.fixture(scope="module")
def reference():
    return reference_ifnet()


@pytest.fixture(scope="module")
def converted(reference, tmp_path_factory):
    """The weights as Practical-RIFE's flownet.pkl holds them (`module.` keys, a pickle), converted by the command."""
    folder = tmp_path_factory.mktemp("rife")
    torch.save({f"module.{key}": value for key, value in reference.state_dict().items()}, folder / "flownet.pkl")
    assert main(["convert-rife", str(folder / "flownet.pkl"), str(folder / "rife.safetensors")]) == 0
    return folder / "rife.safetensors"


def test_convert_rife_refuses_what_it_cannot_convert_in_one_line(tmp_path, capsys):
    torch.save({"module.conv.weight": torch.rand(2, 2)}, tmp_path / "other.pkl")  # a pickle, but not RIFE's
    (tmp_path / "taken.safetensors").write_bytes(b"a file already there")
    for arguments, message in [
        (["other.pkl", "out.safetensors"], "not a RIFE 4.x IFNet of the layout we run (no encode.cnn0.weight)"),
        (["other.pkl", "taken.safetensors"], "'taken.safetensors' already exists: pass --overwrite"),
        (["missing.pkl", "out.safetensors"], "'missing.pkl' does not exist"),
    ]:
        assert main(["convert-rife", *(str(tmp_path / name) for name in arguments)]) == 2
        error = capsys.readouterr().err
        assert message in error and error.count("\n") == 1, error
    assert not (tmp_path / "out.safetensors").exists()


@pytest.fixture(scope="module")
def rife(tmp_path_factory):
    """A small IFNet of the same layout (three blocks, narrow) with random weights, loaded from its file as users'
    weights are: the mechanics below do not need the full network's cost."""
    torch.manual_seed(1)
    net = IFNet(widths=(24, 16, 8), features=4, depth=2)
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.endswith("bias"):
                parameter.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("small_rife") / "rife.safetensors"
    save_file(net.state_dict(), str(path))
    return load_rife(path)




def smooth_frames(count, height, width, seed=0):
    """Random frames that change a little from one to the next (motion, no scene cut): uint8 (T, H, W, 3)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, height // 4, width // 4, generator=generator)
    frames = [torch.nn.functional.interpolate(base + 0.04 * index * torch.rand(1, 3, 1, 1, generator=generator),
                                              size=(height, width), mode="bilinear") for index in range(count)]
    return (torch.cat(frames).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def test_ifnet_equals_ccvfi_rife_on_random_weights(reference, converted):
    # the converted file: the users' names with `module.` stripped, every tensor as it was
    with safe_open(str(converted), "pt") as file:
        assert set(file.keys()) == set(reference.state_dict())
        assert all(torch.equal(file.get_tensor(key), value) for key, value in reference.state_dict().items())
    rife = load_rife(converted)
    generator = torch.Generator().manual_seed(1)
    first, second = (torch.rand(2, 3, 64, 128, generator=generator) for _ in range(2))
    moments = torch.tensor([0.5, 0.25]).view(2, 1, 1, 1).expand(2, 1, 64, 128)  # one moment per pair
    with torch.no_grad():
        expected = reference(torch.cat([first, second], 1), moments, [16, 8, 4, 2, 1])
        ours = rife.net(first, second, moments)
    assert_relative_error(ours, expected, 1e-4, "IFNet")
    # random weights that matter: the flows move the result far from the two frames' mean
    assert (expected - (first + second) / 2).abs().mean() > 0.05
    # any frame size: padded to multiples of 64 with zeros as Practical-RIFE pads, then cropped
    first, second = (torch.rand(1, 3, 40, 72, generator=generator) for _ in range(2))
    padded = [torch.nn.functional.pad(image, (0, 2 * PAD_MULTIPLE - 72, 0, PAD_MULTIPLE - 40))
              for image in (first, second)]
    with torch.no_grad():
        expected = reference(torch.cat(padded, 1), 0.5, [16, 8, 4, 2, 1])[..., :40, :72].clamp(0, 1)
    assert_relative_error(rife.frames_between(first, second, torch.tensor([0.5])), expected, 1e-4, "padded")


def test_safetensors_in_the_users_layout_load_too(rife, tmp_path):
    # a safetensors conversion that kept `module.` loads as the converted file does
    save_file({f"module.{key}": value.contiguous() for key, value in rife.net.state_dict().items()},
              str(tmp_path / "kept_prefix.safetensors"))
    other = load_rife(tmp_path / "kept_prefix.safetensors")
    frames = smooth_frames(2, 48, 64)
    assert np.array_equal(interpolate_frames(other, frames, 2), interpolate_frames(rife, frames, 2))


def test_weights_that_do_not_fit_are_one_line(rife, tmp_path):
    state = {key: value.contiguous() for key, value in rife.net.state_dict().items()}
    del state["block2.lastconv.0.bias"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(FramePackError, match="do not fit IFNet 4.x.*block2.lastconv.0.bias.*convert-rife"):
        load_rife(tmp_path / "broken.safetensors")
    with pytest.raises(FramePackError, match="pickle.*framepack convert-rife flownet.pkl flownet.safetensors"):
        load_rife(tmp_path / "flownet.pkl")


def test_interpolated_frames_keep_the_originals_and_batches_do_not_matter(rife):
    frames = smooth_frames(4, 48, 64, seed=2)
    assert not scene_cuts(frames).any()
    one_by_one = interpolate_frames(rife, frames, 3, max_batch_bytes=1)
    batched = interpolate_frames(rife, frames, 3)
    assert one_by_one.shape == (3 * 3 + 1, 48, 64, 3)
    assert np.array_equal(one_by_one[::3], frames)
    assert np.abs(one_by_one.astype(int) - batched).max() <= 1  # float rounding of another batch size, at most
    between = one_by_one[1]  # made by the model: neither neighbour
    assert not np.array_equal(between, frames[0]) and not np.array_equal(between, frames[1])


def test_a_scene_cut_is_held_not_blended(rife):
    scene = smooth_frames(2, 48, 64, seed=3)
    other = smooth_frames(2, 48, 64, seed=4) // 3 + 170  # another scene, brighter
    frames = np.concatenate([scene, other])
    assert scene_cuts(frames).tolist() == [False, True, False]
    made = interpolate_frames(rife, frames, 4)
    assert np.array_equal(made[5:8], np.repeat(frames[1:2], 3, axis=0))  # the cut: the earlier frame held
    assert not np.array_equal(made[1], frames[0])  # within a scene: made by the model


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_per_section_interpolation_equals_the_whole_video(rife, direction):
    frames = smooth_frames(6, 48, 64, seed=5)
    whole = interpolate_frames(rife, frames, 2, max_batch_bytes=1)
    parts = [frames[:3], frames[3:4], frames[4:]]  # in video order; backward hands them over last first
    interpolator = SegmentInterpolator(rife, 2, direction, max_batch_bytes=1)
    if direction == "forward":
        joined = np.concatenate([interpolator.add(part) for part in parts])
    else:
        joined = np.concatenate([interpolator.add(part) for part in reversed(parts)][::-1])
    assert joined.shape == (2 * 6 - 1, 48, 64, 3) and np.array_equal(joined, whole)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_the_section_writer_interpolates_as_sections_finish(rife, tmp_path, direction):
    from framepack_engine.pipeline import SectionResult

    frames = smooth_frames(8, 48, 64, seed=6)
    # three sections of 2 final frames and the last one's 2 pending frames (what close() writes)
    pieces = [frames[0:2], frames[2:4], frames[4:6]]
    pending = frames[6:8]
    if direction == "backward":  # the end of the video first; the pending frames are its start
        pieces, pending = [frames[6:8], frames[4:6], frames[2:4]], frames[0:2]
    output = SectionOutputFile(tmp_path / "video.safetensors", 16,
                               postprocess=PostProcess(rife, 2, batch_bytes=1))
    for index, piece in enumerate(pieces):
        output.add(SectionResult(index, 3, index, piece, pending if index == 2 else piece[:0], direction,
                                 torch.zeros(1), {"seconds": 0.1}, {"fps": 8}))
    output.close()
    written = load_file(str(tmp_path / "video.safetensors"))["frames"].numpy()
    assert np.array_equal(written, interpolate_frames(rife, frames, 2, max_batch_bytes=1))
    with safe_open(str(tmp_path / "video.safetensors"), "pt") as file:
        recorded = json.loads(file.metadata()["interpolation"])
    assert recorded == {"model": "RIFE", "weights": "rife.safetensors", "frames_per_interval": 2}


def test_interpolate_2_gives_2n_minus_1_frames_at_twice_the_fps(rife, tmp_path):
    import av

    from framepack_engine.pipeline import Engine

    # the Python API: Engine.generate interpolates what it generated
    options = dict(seconds=2, fps=8, steps=2, latent_window_size=2)
    video = Engine.from_preset("tiny").generate("a cat walks", interpolate=2, rife_model=str(rife.path), **options)
    frames = video.frames[::2]  # the generated frames are kept, the made ones between them
    assert len(frames) == 4 * (2 * 2 + 1) - 3 and len(video.frames) == 2 * len(frames) - 1 and video.fps == 16
    assert np.array_equal(video.frames, interpolate_frames(rife, frames, 2))
    assert video.metadata["interpolation"]["frames_per_interval"] == 2
    # the command: the same video, written as sections finish, at twice the frame rate
    out = tmp_path / "doubled.mp4"
    assert main(["generate", "a cat walks", "--seconds", "2", "--out", str(out), "--interpolate", "2",
                 "--rife-model", str(rife.path), "--crf", "0", "--pixel-format", "yuv444p", *FAST]) == 0
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        decoded = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(stream)])
        assert float(stream.average_rate) == 16
        recorded = json.loads(container.metadata["comment"])
    assert len(decoded) == len(video.frames)
    assert np.abs(decoded.astype(float) - video.frames).mean() < 1  # the same frames, through RGB -> YUV
    assert recorded["interpolate"] == 2 and recorded["interpolation"]["weights"] == "rife.safetensors"


def test_video_interpolate(rife):
    from framepack_engine.media.video import Video

    frames = smooth_frames(3, 48, 64, seed=7)
    video = Video(frames, 30.0).interpolate(2, rife)
    assert video.fps == 60 and len(video.frames) == 5 and np.array_equal(video.frames[::2], frames)


@pytest.mark.parametrize("extra, message", [
    (["--interpolate", "2"], "--interpolate 2 needs RIFE weights: pass --rife-model RIFE_MODEL; get Practical-RIFE's "
                             "weights (train_log/flownet.pkl"),
    (["--interpolate", "2", "--rife-model", "flownet.pkl"], "are a pickle, which the engine does not load: convert "
                                                            "them once with framepack convert-rife flownet.pkl"),
    (["--interpolate", "2", "--rife-model", "missing.safetensors"], "'missing.safetensors' do not exist"),
    (["--rife-model", "x.safetensors"], "--rife-model is set but --interpolate is 1: pass --interpolate 2"),
    (["--interpolate", "0"], "interpolate must be an integer from 1 to 16"),
])
def test_bad_interpolation_options_are_one_line_before_loading(tmp_path, capsys, monkeypatch, extra, message):
    from framepack_engine.pipeline import Engine

    monkeypatch.setattr(Engine, "from_preset", classmethod(lambda *a, **k: pytest.fail("a model was loaded")))
    assert main(["generate", "x", "--out", str(tmp_path / "v.mp4"), *extra, *FAST]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1 and not (tmp_path / "v.mp4").exists()
