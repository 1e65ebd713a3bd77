"""Interpolation and upscaling as `framepack serve` job fields: the server's weights are chosen when it starts
(--rife-model, --upscaler), jobs ask for `interpolate` and name an upscaler, never send a path; /v1/info names
what is offered; jobs and their videos record names, not the server's folders."""

import json

import pytest
import torch
from safetensors.torch import save_file

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.models.rife import IFNet
from framepack_engine.serve.jobs import PostprocessFiles
from framepack_engine.serve.server import check_submission, submission_schema
from tests.oracles import import_oracle
from tests.test_server import ONE_SECTION, Server, decode_video, expected_frames, submit, wait_for


def small_rife(path):
    torch.manual_seed(0)
    save_file(IFNet(widths=(16, 8), features=4, depth=1).state_dict(), str(path))
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_postprocess")
    server = Server(folder / "state", "--rife-model", str(small_rife(folder / "rife.safetensors")))
    server.start()
    yield server
    server.stop()


def test_a_job_interpolates_with_the_servers_rife_model(server):
    with server.client() as client:
        info = client.get("/v1/info").json()
        assert info["rife_model"] == "rife.safetensors" and info["upscalers"] == []
        job = submit(client, prompt="a cat", interpolate=2, **ONE_SECTION)
        assert "rife_model" not in job["settings"]
        done = wait_for(client, job["id"])
        assert done["state"] == "done", done["error"]
        frames, metadata = decode_video(client.get(f"/v1/jobs/{job['id']}/video").content)
    assert len(frames) == 2 * expected_frames(1, 1) - 1
    assert metadata["rife_model"] == "rife.safetensors" and metadata["interpolation"]["frames_per_interval"] == 2
    assert str(server.state_dir.parent) not in json.dumps(metadata)  # no server path in what clients get


@pytest.mark.parametrize("settings, message", [
    ({"rife_model": "/etc/passwd"}, "'rife_model' cannot be chosen per request"),
    ({"upscale": "RealESRGAN_x4plus.pth"}, "the server has none (framepack serve --upscaler MODEL offers one)"),
    ({"interpolate": 0}, "interpolate must be an integer from 1 to 16"),
])
def test_bad_job_fields_are_refused_with_one_line(server, settings, message):
    with server.client() as client:
        response = client.post("/v1/jobs", json={"prompt": "x", **ONE_SECTION, **settings})
    assert response.status_code == 422 and message in response.json()["detail"]


def test_the_schema_offers_interpolate_and_upscale_but_no_path():
    properties = submission_schema()["properties"]
    assert "rife_model" not in properties and {"interpolate", "fps_out", "upscale"} <= set(properties)
    assert "/v1/info upscalers" in properties["upscale"]["description"]


def test_upscalers_are_named_by_their_file_name(tmp_path):
    import_oracle("spandrel")
    from spandrel.architectures.ESRGAN import ESRGAN

    save_file(ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2).state_dict(),
              str(tmp_path / "esrgan_x2.safetensors"))
    files = PostprocessFiles(str(small_rife(tmp_path / "rife.safetensors")), (str(tmp_path / "esrgan_x2.safetensors"),))
    assert files.info() == {"rife_model": "rife.safetensors", "upscalers": ["esrgan_x2.safetensors"]}
    settings, *_ = check_submission({"prompt": "x", "interpolate": 2, "upscale": "esrgan_x2.safetensors",
                                     **ONE_SECTION}, {}, "bidirectional", 64, files)
    assert settings["upscale"] == "esrgan_x2.safetensors" and "rife_model" not in settings
    assert files.settings(settings)["upscale"] == str(tmp_path / "esrgan_x2.safetensors")  # the worker's view
    with pytest.raises(FramePackError, match="'other.pth' is none of them: the server has esrgan_x2.safetensors"):
        files.settings({"upscale": "other.pth"})
    with pytest.raises(FramePackError, match="this server has none: .*framepack serve --rife-model"):
        PostprocessFiles().settings({"interpolate": 2})


@pytest.mark.parametrize("arguments, message", [
    (["--rife-model", "flownet.pkl"], "convert them once with framepack convert-rife flownet.pkl"),
    (["--upscaler", "missing.pth"], "'missing.pth' does not exist"),
])
def test_serve_checks_its_weights_before_loading(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.delenv("FRAMEPACK_API_KEY", raising=False)
    assert main(["serve", "--preset", "tiny", "--state-dir", str(tmp_path), *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
