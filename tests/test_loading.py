"""Resolving and loading every kind of model source: folders, single files (bf16 and scaled fp8), repo ids through a
Hugging Face cache, and the clear errors for sources we cannot or will not read.

The DiT checks compare against diffusers' port of the packed transformer built from the same config (keys, shapes,
values), so they hold whatever engine/dit.py does; one extra test loads through FramePackDiT when it exists.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from framepack_engine.runtime import sources
from framepack_engine.errors import ModelSourceError
from framepack_engine.models.checkpoints import (DEFAULT_DTYPES, infer_dit_config, load_clip_text_encoder, load_dit_checkpoint, load_dit_state_dict, load_llama_text_encoder, load_siglip_image_encoder)
from framepack_engine.runtime.sources import files_to_fetch, read_config, load_state_dict, resolve_component
from tests.fixtures import (  # noqa: F401 (pytest fixtures)
    TINY_DIT_CONFIG,
    flux_redux_folder,
    framepack_transformer_folder,
    hf_cache_dir,
    hunyuan_video_base_folder,
    is_quantized_layer,
    single_file_dit_bf16,
    single_file_dit_fp8_scaled,
    tiny_dit_model,
    write_single_file_dit,
)
from tests.utils import assert_relative_error, relative_error

# Largest relative rounding error of one fp8 value (half a unit in the last place): 3 and 2 mantissa bits.
FP8_ERROR = {torch.float8_e4m3fn: 2.0 ** -4, torch.float8_e5m2: 2.0 ** -3}


@pytest.fixture(scope="module")
def reference_state_dict():
    """The tiny DiT's weights as the fixtures wrote them (bf16), from diffusers' model built from the same config."""
    return tiny_dit_model(TINY_DIT_CONFIG, seed=0).to(torch.bfloat16).state_dict()


def assert_same_layout(state_dict, reference):
    assert sorted(state_dict) == sorted(reference)
    for key, tensor in reference.items():
        assert state_dict[key].shape == tensor.shape, key


# ----------------------------------------------------------------------------------------------------------------------
# Resolving


def test_resolve_local_folders_and_subfolders(hunyuan_video_base_folder, framepack_transformer_folder):
    assert resolve_component(str(hunyuan_video_base_folder), "vae") == hunyuan_video_base_folder / "vae"
    for component in ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        assert resolve_component(hunyuan_video_base_folder, component) == hunyuan_video_base_folder / component
    # lllyasviel/FramePackI2V_HY keeps the DiT at the root; hunyuanvideo-community/HunyuanVideo in transformer/.
    assert resolve_component(framepack_transformer_folder, "transformer") == framepack_transformer_folder


def test_transformer_in_a_subfolder(tmp_path, framepack_transformer_folder):
    shutil.copytree(framepack_transformer_folder, tmp_path / "transformer")
    assert resolve_component(tmp_path, "transformer") == tmp_path / "transformer"
    config, state_dict = load_dit_checkpoint(tmp_path)
    assert config == TINY_DIT_CONFIG and "x_embedder.proj.weight" in state_dict


def test_missing_sources_name_the_problem(tmp_path, hunyuan_video_base_folder, single_file_dit_bf16):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_component(tmp_path / "nowhere", "transformer")
    with pytest.raises(ModelSourceError, match="has no 'image_encoder' folder"):
        resolve_component(hunyuan_video_base_folder, "image_encoder")
    with pytest.raises(ModelSourceError, match="has no 'feature_extractor' folder"):
        resolve_component(hunyuan_video_base_folder, "feature_extractor")
    with pytest.raises(ModelSourceError, match="diffusers pipeline folder without a FramePack transformer.*--base"):
        resolve_component(hunyuan_video_base_folder, "transformer")
    with pytest.raises(ModelSourceError, match="single file"):
        resolve_component(single_file_dit_bf16, "text_encoder")
    with pytest.raises(ModelSourceError, match="single file"):
        resolve_component(single_file_dit_bf16, "vae")
    with pytest.raises(ValueError, match="unknown component"):
        resolve_component(hunyuan_video_base_folder, "unet")


def test_pickle_and_other_formats_are_refused(tmp_path):
    for name in ("model.bin", "model.pt", "model.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04not really a pickle")
        with pytest.raises(ModelSourceError, match="pickle checkpoint.*convert it to .safetensors"):
            resolve_component(tmp_path / name, "transformer")
        with pytest.raises(ModelSourceError, match="pickle"):
            load_state_dict(tmp_path / name)
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSourceError, match="GGUF"):
        resolve_component(tmp_path / "model.gguf", "transformer")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelSourceError, match="not a .safetensors file"):
        resolve_component(tmp_path / "notes.txt", "transformer")


def test_corrupt_and_incomplete_safetensors(tmp_path, single_file_dit_bf16, framepack_transformer_folder):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(single_file_dit_bf16.read_bytes()[:5000])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for bad in (truncated, garbage):
        with pytest.raises(ModelSourceError, match="not a readable safetensors file.*download it again"):
            load_dit_checkpoint(bad)
        with pytest.raises(ModelSourceError, match="not a readable safetensors file"):
            load_state_dict(bad)
    folder = tmp_path / "missing_shard"
    shutil.copytree(framepack_transformer_folder, folder)
    next(iter(sorted(folder.glob("*-00002-of-*.safetensors")))).unlink()
    with pytest.raises(ModelSourceError, match="Shard .* is missing"):
        load_dit_checkpoint(folder)


def test_repo_ids_resolve_through_the_hf_cache(hf_cache_dir):
    root = resolve_component("lllyasviel/FramePackI2V_HY", "transformer", allow_download=False,
                             cache_dir=hf_cache_dir)
    assert (root / "config.json").is_file() and root.parent.parent.name == "models--lllyasviel--FramePackI2V_HY"
    base = resolve_component("hunyuanvideo-community/HunyuanVideo", "text_encoder", allow_download=False,
                             cache_dir=hf_cache_dir)
    assert base.name == "text_encoder" and (base / "config.json").is_file()
    assert resolve_component("lllyasviel/flux_redux_bfl", "image_encoder", allow_download=False,
                             cache_dir=hf_cache_dir).name == "image_encoder"
    # HunyuanVideo's snapshot root holds model_index.json beside the component folders.
    assert (base.parent / "model_index.json").is_file()


def test_offline_unknown_repo_says_how_to_get_it(hf_cache_dir, monkeypatch):
    with pytest.raises(ModelSourceError, match=r"hf download someone/missing-model"):
        resolve_component("someone/missing-model", "transformer", allow_download=False, cache_dir=hf_cache_dir)
    # A cached repo without the folder asked for names that folder.
    with pytest.raises(ModelSourceError, match=r"--include 'transformer/\*'"):
        resolve_component("lllyasviel/flux_redux_bfl", "transformer", allow_download=False, cache_dir=hf_cache_dir)
    # HF_HUB_OFFLINE alone turns downloads off.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert sources.downloads_allowed(None) is False and sources.downloads_allowed(True) is True
    with pytest.raises(ModelSourceError, match="downloads are off"):
        resolve_component("someone/missing-model", "vae", cache_dir=hf_cache_dir)


def test_download_fetches_only_the_component(tmp_path, monkeypatch):
    """With downloads allowed and nothing cached, only the wanted folder's files are requested, never pickles."""
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    (snapshot / "vae").mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    requested = {}

    def fake_snapshot_download(repo_id, revision=None, cache_dir=None, local_files_only=False, allow_patterns=None):
        if local_files_only:
            from huggingface_hub.errors import LocalEntryNotFoundError

            raise LocalEntryNotFoundError("not cached")
        requested[repo_id] = allow_patterns
        return str(snapshot)

    def fake_repo_files(files):
        return lambda self, repo_id, revision=None: files

    monkeypatch.setattr(sources, "_check_hub_resolves", lambda repo_id: None)  # never the real network
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_repo_files([
        "model_index.json", "README.md", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
        "vae/config.json", "vae/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.bin"]))
    assert resolve_component("owner/repo", "vae", allow_download=True, cache_dir=tmp_path) == snapshot / "vae"
    assert requested["owner/repo"] == ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]
    # The DiT falls back to the repo root when the repo has no transformer/ folder.
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_repo_files([
        "config.json", "diffusion_pytorch_model.safetensors", "README.md", "extra/notes.json", "model.pt"]))
    assert resolve_component("owner/root-dit", "transformer", allow_download=True, cache_dir=tmp_path) == snapshot
    assert requested["owner/root-dit"] == ["config.json", "diffusion_pytorch_model.safetensors", "README.md"]
    # A repo without the component says so.
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake_repo_files(["README.md", "vae/config.json"]))
    with pytest.raises(ModelSourceError, match="has no image_encoder/"):
        resolve_component("owner/other", "image_encoder", allow_download=True, cache_dir=tmp_path)

    def unreachable(self, repo_id, revision=None):
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", unreachable)
    with pytest.raises(ModelSourceError, match=r"could not be reached.*hf download owner/other"):
        resolve_component("owner/other", "vae", allow_download=True, cache_dir=tmp_path)


def _no_snapshot(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def not_cached(*args, **kwargs):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_cached)


def test_a_host_that_does_not_resolve_fails_at_once_without_retries(tmp_path, monkeypatch):
    """No DNS: one line naming the repo, the cause and the fix, before any HTTP request (so no client retries)."""
    import socket

    import huggingface_hub

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    calls = []
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda *args, **kwargs: calls.append(args))
    _no_snapshot(monkeypatch)
    with pytest.raises(ModelSourceError, match=r"'owner/model'.*does not resolve.*hf download owner/model.*--offline"
                       ) as error:
        resolve_component("owner/model", "vae", allow_download=True, cache_dir=tmp_path)
    assert calls == [] and "\n" not in str(error.value)


@pytest.mark.parametrize("failure, cause", [
    ("refused", "connection was refused"), ("timeout", "timed out"), ("proxy", "OSError"), ("http503", "HTTP 503")])
def test_network_failures_are_classified_by_what_they_are(tmp_path, monkeypatch, failure, cause):
    """Whatever HTTP client huggingface_hub uses: an error class from a module we never heard of is recognised by
    the OSError / TimeoutError in its cause chain, or by huggingface_hub's own HTTP error with its status."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    ClientError = type("ConnectError", (Exception,), {"__module__": "httpx9._transports"})  # no OSError in its bases

    def fail(self, repo_id, revision=None):
        if failure == "http503":
            response = type("Response", (), {"status_code": 503, "headers": {}, "request": None})()
            raise HfHubHTTPError("503 Service Unavailable", response=response)
        inner = {"refused": ConnectionRefusedError(111, "Connection refused"), "timeout": TimeoutError("timed out"),
                 "proxy": OSError("Tunnel connection failed: 407 Proxy Authentication Required")}[failure]
        try:
            raise inner
        except OSError as error:
            raise ClientError("client error") from error

    monkeypatch.setattr(sources, "_check_hub_resolves", lambda repo_id: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fail)
    _no_snapshot(monkeypatch)
    with pytest.raises(ModelSourceError, match=cause + r".*hf download owner/model"):
        resolve_component("owner/model", "vae", allow_download=True, cache_dir=tmp_path)


def test_an_error_that_is_not_the_network_is_not_hidden(tmp_path, monkeypatch):
    import huggingface_hub

    def bug(self, repo_id, revision=None):
        raise ValueError("a bug of ours or of the library")

    monkeypatch.setattr(sources, "_check_hub_resolves", lambda repo_id: None)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", bug)
    _no_snapshot(monkeypatch)
    with pytest.raises(ValueError, match="a bug"):
        resolve_component("owner/model", "vae", allow_download=True, cache_dir=tmp_path)


def test_the_command_without_network_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    """`framepack generate` and `framepack quantize` with a repo id and no DNS: one line on stderr, exit 2, fast."""
    import socket
    import time

    from framepack_engine.commands.main import main

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    import huggingface_hub.constants

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the suite runs offline: this test allows downloads
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    _no_snapshot(monkeypatch)
    start = time.perf_counter()
    for argv in (["generate", "a cat", "--transformer", "owner/model", "--out", str(tmp_path / "a.mp4")],
                 ["quantize", "owner/model", str(tmp_path / "q"), "--format", "int8"]):
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.count("\n") == 0 and "does not resolve" in error and "hf download owner/model" in error
    assert time.perf_counter() - start < 30


def test_files_to_fetch():
    files = ["config.json", "model.safetensors", "pytorch_model.bin", "text_encoder/config.json",
             "text_encoder/model-00001-of-00002.safetensors", "text_encoder/model.safetensors.index.json",
             "text_encoder/pytorch_model.bin", "text_encoder_2/config.json", "tokenizer/tokenizer.json"]
    assert files_to_fetch(files, "text_encoder") == [
        "text_encoder/config.json", "text_encoder/model-00001-of-00002.safetensors",
        "text_encoder/model.safetensors.index.json"]
    assert files_to_fetch(files, "") == ["config.json", "model.safetensors"]
    assert files_to_fetch(files, "tokenizer") == ["tokenizer/tokenizer.json"]


# ----------------------------------------------------------------------------------------------------------------------
# The DiT


def test_dit_from_folder_has_the_checkpoint_keys(framepack_transformer_folder, reference_state_dict):
    config, state_dict = load_dit_checkpoint(framepack_transformer_folder)
    assert config == TINY_DIT_CONFIG
    assert_same_layout(state_dict, reference_state_dict)
    for key, tensor in reference_state_dict.items():
        assert state_dict[key].dtype == torch.bfloat16
        assert torch.equal(state_dict[key], tensor), key
    # The shards really are several files joined through the index.
    assert len(sources.safetensors_files(framepack_transformer_folder)) > 1
    # Other dtypes on request.
    _, float32 = load_dit_checkpoint(framepack_transformer_folder, dtype=torch.float32)
    assert all(t.dtype == torch.float32 for t in float32.values())


def test_dit_from_single_file_infers_the_config(single_file_dit_bf16, reference_state_dict):
    config, state_dict = load_dit_checkpoint(single_file_dit_bf16)
    expected = {k: v for k, v in TINY_DIT_CONFIG.items() if k != "_diffusers_version"}
    assert config == expected
    assert_same_layout(state_dict, reference_state_dict)
    assert all(torch.equal(state_dict[key], tensor) for key, tensor in reference_state_dict.items())
    # An explicit config wins, and so does one stored in the file's metadata.
    explicit = dict(expected, rope_axes_dim=[8, 12, 12])
    assert load_dit_checkpoint(single_file_dit_bf16, config=explicit)[0] == explicit


def test_single_file_config_from_metadata(tmp_path, reference_state_dict):
    stored = dict(TINY_DIT_CONFIG, rope_axes_dim=[8, 12, 12])
    path = write_single_file_dit(tmp_path / "with_config.safetensors", reference_state_dict,
                                 metadata={"config": json.dumps(stored)})
    assert load_dit_checkpoint(path)[0] == stored


@pytest.mark.parametrize("layers, heads, head_dim, single, refiner, image_proj, clean", [
    (1, 3, 32, 3, 2, False, False),
    (3, 1, 64, 1, 1, True, True),
])
def test_infer_config_from_other_shapes(layers, heads, head_dim, single, refiner, image_proj, clean):
    config = dict(TINY_DIT_CONFIG, num_layers=layers, num_attention_heads=heads, attention_head_dim=head_dim,
                  num_single_layers=single, num_refiner_layers=refiner, has_image_proj=image_proj,
                  has_clean_x_embedder=clean, in_channels=8, out_channels=8, text_embed_dim=24, mlp_ratio=2.0,
                  pooled_projection_dim=16, rope_axes_dim=[head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16])
    state_dict = tiny_dit_model(config).state_dict()
    inferred = infer_dit_config(state_dict)
    for key, value in config.items():
        if key.startswith("_") or (key == "image_proj_dim" and not image_proj):
            continue
        assert inferred[key] == value, key


def test_official_sizes_infer_the_official_config():
    """The real checkpoint's tensor shapes (on the meta device: no memory) give the official config.json back."""
    official = dict(TINY_DIT_CONFIG, attention_head_dim=128, num_attention_heads=24, num_layers=20,
                    num_single_layers=40, num_refiner_layers=2, in_channels=16, out_channels=16, text_embed_dim=4096,
                    pooled_projection_dim=768, image_proj_dim=1152, rope_axes_dim=[16, 56, 56])
    del official["_diffusers_version"]
    with torch.device("meta"):
        state_dict = tiny_dit_model(official).state_dict()
    assert infer_dit_config(state_dict) == official


@pytest.mark.parametrize("fp8, prefix, scale_style", [
    (torch.float8_e4m3fn, "model.diffusion_model.", "scale_weight"),
    (torch.float8_e5m2, "diffusion_model.", "weight_scale"),
    (torch.float8_e4m3fn, "", "weight_scale"),
])
def test_scaled_fp8_single_file_is_close_to_bf16(tmp_path, reference_state_dict, fp8, prefix, scale_style):
    path = write_single_file_dit(tmp_path / "dit_fp8.safetensors", reference_state_dict, fp8=fp8, prefix=prefix,
                                 scale_style=scale_style)
    config, state_dict = load_dit_checkpoint(path)
    assert config["num_layers"] == TINY_DIT_CONFIG["num_layers"]
    assert_same_layout(state_dict, reference_state_dict)
    quantized = [key for key, tensor in reference_state_dict.items() if is_quantized_layer(key, tensor)]
    assert len(quantized) > 20
    for key, tensor in reference_state_dict.items():
        assert state_dict[key].dtype == torch.bfloat16
        if key in quantized:
            # fp8 rounding of the scaled value plus bf16 rounding of the product.
            assert_relative_error(state_dict[key], tensor, FP8_ERROR[fp8] + 2.0 ** -8, key)
        else:
            assert torch.equal(state_dict[key], tensor), key
    # The scales matter: the stored fp8 values without them are far off.
    raw = load_state_dict(path)
    stored = raw[prefix + quantized[0]]
    assert stored.dtype == fp8
    assert relative_error(stored.to(torch.bfloat16), reference_state_dict[quantized[0]]) > 10


def test_unscaled_fp8_single_file(tmp_path, reference_state_dict):
    path = write_single_file_dit(tmp_path / "plain_fp8.safetensors", reference_state_dict, fp8=torch.float8_e4m3fn,
                                 scaled=False)
    _, state_dict = load_dit_checkpoint(path, dtype=torch.float32)
    key = "single_transformer_blocks.0.proj_mlp.weight"
    assert state_dict[key].dtype == torch.float32
    # Without a scale, small weights fall into fp8's subnormal range: the absolute error stays below its spacing.
    assert (state_dict[key] - reference_state_dict[key].float()).abs().max() <= max(
        reference_state_dict[key].float().abs().max() * FP8_ERROR[torch.float8_e4m3fn], 2.0 ** -10)


def test_fixture_fp8_file(single_file_dit_fp8_scaled, reference_state_dict):
    _, state_dict = load_dit_checkpoint(single_file_dit_fp8_scaled)
    assert_same_layout(state_dict, reference_state_dict)
    key = "single_transformer_blocks.1.attn.to_q.weight"
    assert_relative_error(state_dict[key], reference_state_dict[key], FP8_ERROR[torch.float8_e4m3fn] + 2.0 ** -8)


def test_single_file_bundling_other_models_keeps_only_the_dit(tmp_path, reference_state_dict):
    bundled = {"model.diffusion_model." + k: v for k, v in reference_state_dict.items()}
    bundled["vae.decoder.conv_in.weight"] = torch.randn(4, 4)
    bundled["text_encoders.clip_l.weight"] = torch.randn(4)
    path = tmp_path / "bundle.safetensors"
    save_file(bundled, str(path))
    assert_same_layout(load_dit_state_dict(path), reference_state_dict)


def test_files_that_are_not_a_framepack_dit(tmp_path, hunyuan_video_base_folder):
    original = tmp_path / "hunyuan_video_t2v.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.randn(4, 4), "img_in.proj.weight": torch.randn(4, 4)},
              str(original))
    with pytest.raises(ModelSourceError, match="original HunyuanVideo key names"):
        load_dit_checkpoint(original)
    with pytest.raises(ModelSourceError, match="does not hold a FramePack DiT"):
        load_dit_checkpoint(hunyuan_video_base_folder / "text_encoder" / "model.safetensors")


def test_dit_by_repo_id(hf_cache_dir, reference_state_dict):
    config, state_dict = load_dit_checkpoint("lllyasviel/FramePackI2V_HY", allow_download=False,
                                             cache_dir=hf_cache_dir)
    assert config == TINY_DIT_CONFIG
    assert all(torch.equal(state_dict[key], tensor) for key, tensor in reference_state_dict.items())


def test_load_state_dict_keeps_its_meaning(framepack_transformer_folder, single_file_dit_fp8_scaled,
                                           reference_state_dict):
    # A folder: all shards joined, stored dtypes kept when no dtype is asked for.
    state_dict = load_state_dict(framepack_transformer_folder)
    assert_same_layout(state_dict, reference_state_dict)
    assert all(torch.equal(state_dict[key], tensor) for key, tensor in reference_state_dict.items())
    # A scaled fp8 file: as stored without a dtype (scales included), scales folded in with one.
    raw = load_state_dict(single_file_dit_fp8_scaled)
    assert "model.diffusion_model.scaled_fp8" in raw
    assert any(key.endswith(".scale_weight") for key in raw)
    folded = load_state_dict(single_file_dit_fp8_scaled, dtype=torch.bfloat16)
    assert not any(key.endswith((".scale_weight", ".scale_input", "scaled_fp8")) for key in folded)
    key = "transformer_blocks.0.attn.to_k.weight"
    assert_relative_error(folded["model.diffusion_model." + key], reference_state_dict[key],
                          FP8_ERROR[torch.float8_e4m3fn] + 2.0 ** -8)


def test_dit_loads_into_framepack_dit(framepack_transformer_folder, single_file_dit_fp8_scaled):
    dit = pytest.importorskip("framepack_engine.models.dit")
    model = dit.FramePackDiT.from_pretrained(framepack_transformer_folder, dtype=torch.bfloat16)
    _, state_dict = load_dit_checkpoint(framepack_transformer_folder)
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in state_dict.items())
    config, fp8_state_dict = load_dit_checkpoint(single_file_dit_fp8_scaled)
    from_single_file = dit.FramePackDiT.from_config(config)
    from_single_file.load_state_dict(fp8_state_dict, strict=True)


# ----------------------------------------------------------------------------------------------------------------------
# VAE and the transformers models


def test_vae_checkpoint(hunyuan_video_base_folder):
    from diffusers import AutoencoderKLHunyuanVideo

    folder = resolve_component(hunyuan_video_base_folder, "vae")
    config, state_dict = read_config(folder), load_state_dict(folder, DEFAULT_DTYPES["vae"])
    assert config["latent_channels"] == 4 and config["scaling_factor"] == pytest.approx(0.476986)
    expected = AutoencoderKLHunyuanVideo.from_config(config).state_dict()
    assert_same_layout(state_dict, expected)
    assert all(t.dtype == DEFAULT_DTYPES["vae"] for t in state_dict.values() if t.is_floating_point())


def test_text_encoders_load_with_official_dtypes(hunyuan_video_base_folder):
    from tokenizers import Tokenizer

    llama, llama_tokenizer = load_llama_text_encoder(hunyuan_video_base_folder)
    assert llama.dtype == torch.float16 and not llama.training
    assert not any(p.requires_grad for p in llama.parameters())
    # The tokenizer encodes exactly as its tokenizer.json (the official app's tokenization).
    raw = Tokenizer.from_file(str(hunyuan_video_base_folder / "tokenizer" / "tokenizer.json"))
    text = "<|start_header_id|>user<|end_header_id|>\n\nA cat walks  on the grass, camera pans<|eot_id|>"
    assert llama_tokenizer(text)["input_ids"] == raw.encode(text).ids
    assert llama_tokenizer.padding_side == "right" and llama_tokenizer.pad_token == "<pad>"

    clip, clip_tokenizer = load_clip_text_encoder(hunyuan_video_base_folder, dtype=torch.float32)
    assert clip.dtype == torch.float32
    ids = clip_tokenizer("A cat walks", padding="max_length", max_length=77)["input_ids"]
    vocab = json.loads((hunyuan_video_base_folder / "tokenizer_2" / "vocab.json").read_text())
    # <|startoftext|> text <|endoftext|>, padded with <|endoftext|> (the largest id, which CLIP-L pools at).
    end = vocab["<|endoftext|>"]
    assert len(ids) == 77 and ids[0] == vocab["<|startoftext|>"] and end == max(vocab.values())
    first_end = ids.index(end)
    assert set(ids[first_end:]) == {end} and first_end > 3
    assert clip_tokenizer.decode(ids, skip_special_tokens=True) == "a cat walks"


def test_image_encoder_by_repo_id(hf_cache_dir):
    processor, model = load_siglip_image_encoder("lllyasviel/flux_redux_bfl", allow_download=False,
                                                 cache_dir=hf_cache_dir)
    assert model.dtype == torch.float16
    assert processor.size == {"height": 32, "width": 32}


def test_transformers_folders_with_bad_weights(tmp_path, hunyuan_video_base_folder):
    pickled = tmp_path / "pickled"
    shutil.copytree(hunyuan_video_base_folder, pickled)
    (pickled / "text_encoder" / "model.safetensors").unlink()
    (pickled / "text_encoder" / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ModelSourceError, match="pickle checkpoint"):
        load_llama_text_encoder(pickled)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(hunyuan_video_base_folder, corrupt)
    weights = corrupt / "text_encoder_2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ModelSourceError, match="not a readable safetensors file"):
        load_clip_text_encoder(corrupt)

    no_tokenizer = tmp_path / "no_tokenizer"
    shutil.copytree(hunyuan_video_base_folder, no_tokenizer)
    shutil.rmtree(no_tokenizer / "tokenizer")
    with pytest.raises(ModelSourceError, match="has no 'tokenizer' folder"):
        load_llama_text_encoder(no_tokenizer)
