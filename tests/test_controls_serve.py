"""Keyframes and one-frame jobs on `framepack serve`: the job fields (JSON base64 or multipart files), their checks
(422 with the command's message, before the job is queued), the worker running them on the tiny preset, the image
output with its settings, and the inputs kept by name."""

import base64
import io
import json

import av
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from starlette.testclient import TestClient  # noqa: E402

from framepack_engine import Engine  # noqa: E402
from framepack_engine.media.still import read_still_metadata  # noqa: E402
from framepack_engine.serve.jobs import JobQueue, JobStore, LiveJob  # noqa: E402
from framepack_engine.serve.server import create_app  # noqa: E402

FAST = {"steps": 1, "latent_window_size": 2, "fps": 8}


def png(shift=0, height=48, width=64, alpha=None) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 3 + shift) % 256, (y * 5) % 256, np.full_like(x, 90)], -1).astype(np.uint8)
    if alpha is not None:
        pixels = np.concatenate([pixels, alpha[:, :, None]], axis=2)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app over a queue whose worker is run here, job by job (run_next), on the tiny preset."""
    store = JobStore(tmp_path_factory.mktemp("state"))
    queue = JobQueue(store, [("cpu", Engine.from_preset("tiny"))], max_queued=10)

    def run_next():
        job = store.claim("cpu")
        queue.live[job.id] = LiveJob()
        queue.workers[0].run_job(job)
        return store.get(job.id)

    with TestClient(create_app(queue)) as client:
        yield client, store, run_next
    store.close()


def test_a_one_frame_job_from_json_makes_an_image_with_its_settings(served):
    client, store, run_next = served
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    response = client.post("/v1/jobs", json={
        "prompt": "a dress", "image": encoded(png()), "one_frame": True, "target_index": 5,
        "control_images": [encoded(png()), encoded(png(shift=90, alpha=mask))], "control_masks": [encoded(png())],
        "control_index": "0;10", "one_frame_options": ["no_2x", "no_4x"], "seed": 4, **FAST})
    assert response.status_code == 202, response.text
    submitted = response.json()
    assert submitted["output"]["format"] == "png" and submitted["progress"]["sections"] == 1
    assert sorted(submitted["inputs"]) == ["control_image_1", "control_image_2", "control_mask_1", "image"]
    job = run_next()
    assert job.state == "done", job.error
    download = client.get(f"/v1/jobs/{job.id}/video")
    assert download.status_code == 200 and download.headers["content-type"] == "image/png"
    path = store.folder(job.id) / "video.png"
    assert Image.open(io.BytesIO(download.content)).size == (64, 48)
    recorded = read_still_metadata(path)
    assert (recorded["mode"], recorded["target_index"], recorded["control_index"], recorded["seed"]) == (
        "one_frame", 5, [0, 10], 4)
    assert recorded["control_images"] == ["control_image_1.png", "control_image_2.png"]
    assert client.get(f"/v1/jobs/{job.id}/inputs/control_mask_1").content == png()


def test_a_keyframed_video_job_from_multipart_files(served):
    client, store, run_next = served
    files = {"image": ("a.png", png(), "image/png"), "keyframe_-1": ("k.png", png(shift=120), "image/png"),
             "keyframe_0-1": ("j.png", png(shift=60), "image/png")}
    settings = {"prompt": "a cat", "seconds": 3, "latent_paddings": "0,0,0", **FAST}
    response = client.post("/v1/jobs", data={"settings": json.dumps(settings)}, files=files)
    assert response.status_code == 202, response.text
    assert sorted(response.json()["inputs"]) == ["image", "keyframe_-1", "keyframe_0-1"]
    job = run_next()
    assert job.state == "done", job.error
    with Image.open(io.BytesIO(client.get(f"/v1/jobs/{job.id}/inputs/keyframe_-1").content)) as kept:
        assert kept.size == (64, 48)
    with av.open(str(store.folder(job.id) / "video.mp4")) as container:
        metadata = container.metadata
    assert '"keyframes": {"-1": "keyframe_-1.png", "0-1": "keyframe_0-1.png"}' in metadata["comment"]


@pytest.mark.parametrize("body,message", [
    ({"keyframes": {"7": encoded(png())}, "seconds": 3}, "The keyframe SPEC '7' names no section of this video"),
    ({"keyframes": {"../x": encoded(png())}}, "names no keyframe SPEC (N, -N or S-E)"),
    ({"keyframes": ["a"]}, "keyframes must be an object {SPEC: base64 image}"),
    ({"one_frame": True, "control_images": [encoded(png())], "control_masks": [encoded(png(height=40))]},
     "Control mask 1 is 64x40 pixels but control image 1 is 64x48"),
    ({"one_frame": True, "control_images": [encoded(png()), encoded(png())]},
     "2 control images need their time indices"),
    ({"control_images": [encoded(png())]}, "control_images are one-frame inputs: pass one_frame too"),
    ({"one_frame": True, "format": "mp4"}, "Format 'mp4' does not fit a one_frame job makes an image"),
    ({"format": "png"}, "Format 'png' does not fit a video job"),
    ({"latent_paddings": "0,0", "seconds": 3}, "latent_paddings has 2 values but the video has 3 sections"),
])
def test_bad_fields_are_refused_before_queueing(served, body, message):
    client, store, _ = served
    before = len(store.list())
    response = client.post("/v1/jobs", json={"prompt": "x", "image": encoded(png()), **FAST, **body})
    assert response.status_code == 422 and message in response.json()["detail"], response.text
    assert len(store.list()) == before


def test_the_schema_names_the_fields(served):
    client, _, _ = served
    properties = client.get("/openapi.json").json()["paths"]["/v1/jobs"]["post"]["requestBody"]["content"][
        "application/json"]["schema"]["properties"]
    assert {"keyframes", "control_images", "control_masks", "one_frame", "target_index", "control_index",
            "one_frame_options", "latent_paddings"} <= set(properties)
    assert "png" in properties["format"]["enum"]
