"""Bad model sources, network failures and devices: each a one-line error naming the problem and the fix.

The command exits 2 with `error: <one sentence>` and no traceback; the API raises a FramePackError. Settings,
images and outputs have their own tables (test_settings.py, test_images.py, test_encoders.py, test_video.py).
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack_engine import Engine
from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError, ModelSourceError
from framepack_engine.models.checkpoints import load_dit_checkpoint
from framepack_engine.runtime.sources import resolve_component
from tests.fixtures import (flux_redux_folder, framepack_transformer_folder,  # noqa: F401 (pytest fixtures)
                            hunyuan_video_base_folder, single_file_dit_bf16)


def broken_copy(source, destination, change):
    shutil.copytree(source, destination)
    change(destination)
    return destination


def first_shard(folder):
    return sorted(folder.glob("*.safetensors"))[0]


def resize_one_tensor(path):
    tensors = load_file(path)
    key = next(key for key in sorted(tensors) if key.endswith("proj_out.weight") or tensors[key].ndim == 2)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, *tensors[key].shape[1:], dtype=tensors[key].dtype)
    save_file(tensors, path)


TRANSFORMER_BREAKAGES = {
    "config is not JSON": (lambda f: (f / "config.json").write_text("{not json"), "not valid JSON"),
    "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not a JSON object"),
    "shard index is not JSON": (lambda f: next(f.glob("*.index.json")).write_text("garbage"), "not valid JSON"),
    "shard index has no weight map": (lambda f: next(f.glob("*.index.json")).write_text('{"metadata": {}}'),
                                      "no valid weight_map"),
    "a tensor of the wrong shape": (lambda f: resize_one_tensor(first_shard(f)), "of shape"),
    "config with more layers than weights": (
        lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                             "num_layers": 3})), "missing keys"),
    "config with another head size than weights": (
        lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                             "attention_head_dim": 16,
                                                             "rope_axes_dim": [4, 6, 6]})), "of shape"),
    "config with a size that is not a number": (
        lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                             "num_attention_heads": "two"})), "not a valid size"),
    "weights but no config": (lambda f: (f / "config.json").unlink(), "has weights but no config.json"),
    "pickle weights only": (lambda f: [p.unlink() for p in f.glob("*.safetensors*")] and
                            (f / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04"), "pickle checkpoint"),
}


@pytest.mark.parametrize("breakage", list(TRANSFORMER_BREAKAGES))
def test_broken_transformer_folders_are_named(tmp_path, framepack_transformer_folder, breakage):
    change, message = TRANSFORMER_BREAKAGES[breakage]
    folder = broken_copy(framepack_transformer_folder, tmp_path / "FramePackI2V_HY", change)
    with pytest.raises(FramePackError, match=message):
        from framepack_engine.models.dit import FramePackDiT

        FramePackDiT.from_pretrained(folder, dtype=torch.float32)


def test_the_base_repo_given_as_transformer_says_so(hunyuan_video_base_folder):
    with pytest.raises(ModelSourceError, match="pipeline folder.*--base"):
        load_dit_checkpoint(hunyuan_video_base_folder)


def test_a_vae_config_that_is_not_json(tmp_path, hunyuan_video_base_folder, framepack_transformer_folder,
                                       flux_redux_folder):
    base = broken_copy(hunyuan_video_base_folder, tmp_path / "HunyuanVideo",
                       lambda f: (f / "vae" / "config.json").write_text("\x00\x01 not json"))
    with pytest.raises(ModelSourceError, match="config 'config.json' in 'vae' is not valid JSON"):
        Engine.from_pretrained(transformer=framepack_transformer_folder, base=base, image_encoder=flux_redux_folder,
                               device="cpu", dtype=torch.float32)


def test_no_network_is_one_line_not_a_traceback(tmp_path, monkeypatch):
    """httpx's ConnectError is no OSError: it is recognised by the socket error it carries, as the client raises it."""
    import socket

    import httpx
    import huggingface_hub

    from framepack_engine.runtime import sources

    def unreachable(self, repo_id, revision=None):
        try:
            raise socket.gaierror(-3, "Temporary failure in name resolution")
        except OSError as error:
            raise httpx.ConnectError("[Errno -3] Temporary failure in name resolution") from error

    monkeypatch.setattr(sources, "_check_hub_resolves", lambda repo_id: None)  # never the real network
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelSourceError, match=r"could not be reached to download it \(the Hub's host name does not "
                                               r"resolve.*--offline"):
        resolve_component("someone/model", "transformer", allow_download=True, cache_dir=tmp_path)


def test_a_mistyped_local_path_does_not_go_to_the_network(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("a local path was sent to the network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(ModelSourceError, match="'models/FramePackI2V' does not exist"):
        resolve_component("models/FramePackI2V", "transformer", allow_download=True, cache_dir=tmp_path / "cache")


def test_an_hf_cache_that_is_a_file(tmp_path, monkeypatch):
    cache = tmp_path / "not-a-folder"
    cache.write_text("x")
    with pytest.raises(ModelSourceError, match="Hugging Face cache cannot be read.*HF_HOME"):
        resolve_component("someone/model", "transformer", allow_download=False, cache_dir=cache)


def test_the_command_honours_hf_hub_offline(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("HF_HUB_OFFLINE=1 was overridden: the command went to the network")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main(["generate", "x", "--transformer", "someone/NoSuchModel", "--device", "cpu",
                 "--out", str(tmp_path / "v.mp4"), "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "downloads are off" in error[0] and "check the network" not in error[0]


@pytest.mark.parametrize("device,message", [
    ("bogus", "Unknown device 'bogus'"),
    ("cuda:0", "sees no CUDA GPU") if not torch.cuda.is_available() else ("cuda:99", "pick one of them"),
    ("mps", "not supported"),
])
def test_devices_are_checked_before_loading(monkeypatch, capsys, tmp_path, device, message):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the device was checked")

    monkeypatch.setattr(Engine, "from_pretrained", no_loading)
    code = main(["generate", "x", "--device", device, "--out", str(tmp_path / "v.mp4"), "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0]
