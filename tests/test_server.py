"""`framepack serve` over real HTTP on a loopback port, the tiny preset behind it.

One server (with an API key, a 1 MiB body limit and at most 20 queued jobs) runs for the module; the restart test
starts and kills its own. Every request goes to 127.0.0.1.
"""

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from PIL import Image

from framepack_engine.models.buckets import find_nearest_bucket
from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.serve.server import NOT_PER_REQUEST, SERVER_FIELDS, SERVER_HELP
from framepack_engine.settings import GenerationSettings

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key-0123456789abcdef"
ONE_SECTION = {"steps": 1, "latent_window_size": 1, "fps": 8, "seconds": 0.5}  # 1 section, 5 frames
MAX_QUEUED = 20
BUCKET = find_nearest_bucket(64, 80, resolution=64)  # what the tiny preset makes of the 64 x 80 test image


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(height=64, width=80) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([(x * 3) % 256, (y * 4) % 256, np.full_like(x, 90)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """A `framepack serve --preset tiny` process on a free loopback port."""

    def __init__(self, state_dir: Path, *extra: str):
        self.state_dir, self.extra = state_dir, extra
        self.port = free_port()
        self.process = None
        self.log = state_dir.parent / f"{state_dir.name}.log"

    def start(self, timeout: float = 240.0) -> "Server":
        # One thread: the tiny preset's tensors are too small to share, and a second thread only contends with this
        # test process on a small machine (5x slower per job on the 2-core development machine).
        environment = {**os.environ, "OMP_NUM_THREADS": "1",
                       "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "framepack_engine.commands.main", "serve", "--preset", "tiny", "--host", "127.0.0.1",
                 "--port", str(self.port), "--state-dir", str(self.state_dir), "--api-key", API_KEY, *self.extra],
                stdout=log, stderr=subprocess.STDOUT, env=environment, start_new_session=True)
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                assert self.process.poll() is None, f"the server exited:\n{self.log.read_text()}"
                try:
                    if client.get("/v1/health", timeout=2).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout} s:\n{self.log.read_text()}")

    def client(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers=headers, timeout=60)

    def kill(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve") / "state", "--max-queued", str(MAX_QUEUED),
                    "--max-body-mb", "1")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with server.client() as client:
        yield client


def submit(client, **settings) -> dict:
    response = client.post("/v1/jobs", json=settings)
    assert response.status_code == 202, response.text
    return response.json()


def wait_for(client, job_id: str, states=("done", "failed", "cancelled"), timeout: float = 240.0,
              condition=lambda job: True) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states and condition(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states}: {job}")


def read_events(response):
    event, data = None, []
    for line in response.iter_lines():
        if line.startswith("event:"):
            event = line[len("event:"):].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:"):].strip())
        elif line == "" and event:
            yield event, json.loads("\n".join(data))
            event, data = None, []


def decode_video(content: bytes) -> tuple[np.ndarray, dict]:
    with av.open(io.BytesIO(content)) as container:
        frames = np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])
        return frames, json.loads(container.metadata.get("comment", "{}"))


def expected_frames(sections: int, window: int) -> int:
    return 4 * (sections * window + 1) - 3


# --------------------------------------------------------------------------------------------------------------------


def test_submit_poll_to_done_and_download(client):
    job = submit(client, prompt="a cat walks", image=base64.b64encode(png_bytes()).decode(), seed=3, **ONE_SECTION)
    assert job["state"] == "queued" and job["position"] >= 0 and job["inputs"] == ["image"]
    assert job["progress"]["sections"] == 1 and job["links"]["video"] is None
    done = wait_for(client, job["id"])
    assert done["state"] == "done", done["error"]
    assert done["progress"]["sections_done"] == 1 and done["progress"]["eta_seconds"] == 0
    assert len(done["stats"]["sections"]) == 1 and done["stats"]["seconds"] > 0
    response = client.get(done["links"]["video"])
    assert response.status_code == 200 and response.headers["content-type"] == "video/mp4"
    frames, metadata = decode_video(response.content)
    assert frames.shape == (expected_frames(1, 1), *BUCKET, 3) and done["progress"]["frames"] == len(frames)
    assert metadata["prompt"] == "a cat walks" and metadata["seed"] == 3 and metadata["mode"] == "i2v"


def test_multipart_upload_and_events_with_previews(client):
    settings = {"prompt": "waves", "steps": 2, "latent_window_size": 1, "fps": 8, "seconds": 1, "format": "webm"}
    response = client.post("/v1/jobs", data={"settings": json.dumps(settings)},
                           files={"image": ("start.png", png_bytes(), "image/png")})
    assert response.status_code == 202, response.text
    job = response.json()
    events = []
    with client.stream("GET", job["links"]["events"], params={"previews": "true"}) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = list(read_events(stream))
    names = [name for name, _ in events]
    assert names[-1] == "done" and events[-1][1]["state"] == "done"
    assert "running" in [data["state"] for name, data in events if name == "state"]
    progress = [data for name, data in events if name == "progress"]
    assert {(p["section"], p["step"]) for p in progress if p["step"]} == {(1, 1), (1, 2), (2, 1), (2, 2)}
    assert all(p["sections"] == 2 and p["steps"] == 2 and p["seconds"] >= 0 for p in progress)
    assert [p["eta_seconds"] for p in progress if p["step"]][-1] == 0
    assert [data["sections_done"] for name, data in events if name == "section"] == [1, 2]
    previews = [data for name, data in events if name == "preview"]
    assert previews
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1]["jpeg"])))
    # Latent size (an eighth of the video's), the section's frames side by side.
    assert preview.format == "JPEG" and preview.height == BUCKET[0] // 8 and preview.width % (BUCKET[1] // 8) == 0
    video = client.get(job["links"]["self"] + "/video")
    assert video.headers["content-type"] == "video/webm"
    assert len(decode_video(video.content)[0]) == expected_frames(2, 1)


def test_cancel_a_running_job_keeps_its_finished_sections(client, server):
    job = submit(client, prompt="long", steps=2, latent_window_size=1, fps=8, seconds=6)  # 12 sections
    running = wait_for(client, job["id"], ("running",), condition=lambda job: job["progress"]["sections_done"] >= 1)
    response = client.delete(f"/v1/jobs/{job['id']}")
    assert response.status_code == 202 and response.json()["cancel_requested"]
    cancelled = wait_for(client, job["id"])
    assert cancelled["state"] == "cancelled"
    done = cancelled["progress"]["sections_done"]
    assert running["progress"]["sections_done"] <= done < 12
    frames, _ = decode_video(client.get(f"/v1/jobs/{job['id']}/video").content)
    assert len(frames) == cancelled["progress"]["frames"] > 0
    assert not (server.state_dir / "jobs" / job["id"] / "resume").exists()
    again = client.delete(f"/v1/jobs/{job['id']}")
    assert again.status_code == 409 and "cancelled already" in again.json()["detail"]


def test_input_images_come_back_and_finished_jobs_can_be_removed(client, server):
    response = client.post("/v1/jobs", data={"settings": json.dumps({"prompt": "kept", **ONE_SECTION})},
                           files={"image": ("start.png", png_bytes(), "image/png")})
    job = response.json()
    assert job["links"]["inputs"] == {"image": f"/v1/jobs/{job['id']}/inputs/image"}
    image = client.get(job["links"]["inputs"]["image"])
    assert image.status_code == 200 and image.headers["content-type"] == "image/png" and image.content == png_bytes()
    for name in ("end_image", "settings.json", "..%2Fsettings.json"):
        assert client.get(f"/v1/jobs/{job['id']}/inputs/{name}").status_code == 404, name
    # Only a finished job can be removed: a running one is refused until cancelled.
    long = submit(client, prompt="long", steps=2, latent_window_size=1, fps=8, seconds=20)
    response = client.delete(long["links"]["self"], params={"remove": "true"})
    assert response.status_code == 409 and "only finished jobs can be removed" in response.json()["detail"]
    client.delete(long["links"]["self"])
    for finished in (wait_for(client, job["id"]), wait_for(client, long["id"])):
        response = client.delete(finished["links"]["self"], params={"remove": "true"})
        assert response.status_code == 200 and response.json() == {"id": finished["id"], "removed": True}
        assert client.get(finished["links"]["self"]).status_code == 404
        assert not (server.state_dir / "jobs" / finished["id"]).exists()
    assert client.delete(job["links"]["self"], params={"remove": "true"}).status_code == 404
    listed = [item["id"] for item in client.get("/v1/jobs").json()["jobs"]]
    assert job["id"] not in listed and long["id"] not in listed


def test_previews_are_rate_limited_to_the_latest_one_per_interval():
    import asyncio
    import threading
    from types import SimpleNamespace

    from framepack_engine.serve.jobs import Job, LiveJob
    from framepack_engine.serve.server import _event_stream

    job = Job("0123456789abcdef", 1, "running", {"steps": 100}, {"format": "mp4", "crf": 16}, {}, 1, 0, 0, {}, None,
              "cpu", 1, False, 0.0, 0.0, None)
    live = LiveJob(preview=np.zeros((2, 8, 8, 3), np.uint8))
    store = SimpleNamespace(changes=0, get=lambda job_id: job)
    queue = SimpleNamespace(store=store, live={job.id: live}, stopping=threading.Event())

    class Request:
        async def is_disconnected(self):
            return False

    async def run():
        async def sample():  # a new preview every 10 ms for 1.2 s, then the job ends
            for step in range(120):
                live.progress = {"section": 1, "step": step + 1}
                live.preview_version += 1
                await asyncio.sleep(0.01)
            job.state = "done"
            store.changes += 1

        sampler = asyncio.create_task(sample())
        chunks = [chunk async for chunk in _event_stream(Request(), queue, job.id, True, preview_interval=0.5)]
        await sampler
        return b"".join(chunks).decode()

    text = asyncio.run(run())
    previews = text.count("event: preview\n")
    assert 2 <= previews <= 3, previews  # at 0, 0.5 and maybe 1 s of the 1.2 s, not one per step
    assert text.rstrip().split("\n\n")[-1].startswith("event: done")


def test_the_web_page_is_served_without_the_key_under_a_strict_policy(server, client):
    from html.parser import HTMLParser

    from framepack_engine.serve.server import PAGE_FILES, PAGE_FOLDER

    with server.client(key=None) as anonymous:
        page = anonymous.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src 'self'" in policy and "unsafe" not in policy
        assert "frame-ancestors 'none'" in policy and page.headers["x-content-type-options"] == "nosniff"
        assert 'data-api-key="required"' in page.text  # the page asks for the key before its first request
        for path, (name, media_type) in PAGE_FILES.items():
            response = anonymous.get(path)
            assert response.status_code == 200 and response.headers["content-type"] == media_type, path
            assert response.headers["content-security-policy"] == policy
        # Only the page's own files are public: the API, other paths and other methods need the key.
        for method, path in (("GET", "/page/other.js"), ("GET", "/openapi.json"), ("POST", "/"),
                             ("GET", "/page/../v1/jobs")):
            assert anonymous.request(method, path).status_code == 401, (method, path)
    assert client.get("/page/other.js").status_code == 404
    assert client.get("/v1/info").json()["loras"] == []  # the page names the server's LoRAs
    assert sorted(path.name for path in PAGE_FOLDER.iterdir()) == sorted(name for name, _ in PAGE_FILES.values())

    class Inline(HTMLParser):  # everything a CSP without 'unsafe-inline' would block
        def __init__(self):
            super().__init__()
            self.found, self.script = [], False

        def handle_starttag(self, tag, attributes):
            self.script = tag == "script"
            if tag == "style" or (tag == "script" and not dict(attributes).get("src")):
                self.found.append(f"<{tag}> without src")
            self.found += [f"{tag} {name}=" for name, value in attributes
                           if name.startswith("on") or name == "style" or "javascript:" in (value or "")]

        def handle_data(self, data):
            if self.script and data.strip():
                self.found.append("inline script")

        def handle_endtag(self, tag):
            self.script = False

    inline = Inline()
    inline.feed((PAGE_FOLDER / "index.html").read_text())
    assert inline.found == []


def test_twenty_concurrent_jobs_run_in_submission_order(client):
    def one(index):
        return submit(client, prompt=f"job number {index}", seed=index, **ONE_SECTION)["id"]

    with ThreadPoolExecutor(20) as pool:
        ids = set(pool.map(one, range(20)))
    assert len(ids) == 20
    wait_for(client, sorted(ids)[0])
    listed = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        listed = [job for job in client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"] if job["id"] in ids]
        if all(job["state"] == "done" for job in listed):
            break
        time.sleep(0.2)
    assert len(listed) == 20 and all(job["state"] == "done" for job in listed)
    # One worker: each job starts after the one submitted before it has finished.
    for earlier, later in zip(listed, listed[1:]):
        assert earlier["submitted_at"] <= later["submitted_at"]
        assert earlier["finished_at"] <= later["started_at"]
    for job in listed:
        frames, metadata = decode_video(client.get(f"/v1/jobs/{job['id']}/video").content)
        assert len(frames) == expected_frames(1, 1)
        assert metadata["prompt"] == job["settings"]["prompt"] and metadata["seed"] == job["settings"]["seed"]


def command_message(**settings) -> str:
    with pytest.raises(FramePackError) as error:
        GenerationSettings.from_options(**settings)
    return str(error.value)


@pytest.mark.parametrize("request_kwargs,status,message", [
    (dict(content=b'{"prompt": "a cat",}', headers={"content-type": "application/json"}), 400, "not valid JSON"),
    (dict(json=["a cat"]), 422, "must be a JSON object"),
    (dict(content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}), 400,
     "nests too deeply"),
    (dict(json={"seconds": 0}), 422, command_message(seconds=0)),
    (dict(json={"sampler": "unipx"}), 422, command_message(sampler="unipx")),
    (dict(json={"steps": "many"}), 422, command_message(steps="many")),
    (dict(json={"sed": 5}), 422, "Unknown setting 'sed' (did you mean 'seed'?)"),
    (dict(json={"transformer": "/etc/passwd"}), 422, "'transformer' cannot be chosen per request"),
    (dict(json={"out": "../../x.mp4"}), 422, "'out' cannot be chosen per request"),
    (dict(json={"lora": ["/home/x/style.safetensors:0.8"]}), 422, "'lora' cannot be chosen per request"),
    (dict(json={"image": "/etc/passwd"}), 422, "image is not valid base64"),
    (dict(json={"image": base64.b64encode(b"not an image").decode()}), 422, "image is not a readable image"),
    (dict(json={"end_image": base64.b64encode(png_bytes()).decode()}), 422, "An end image needs a start image"),
    (dict(json={"format": "avi"}), 422, "Unknown format 'avi'"),
    (dict(json={"crf": 99}), 422, "crf must be an integer from 0 to 63"),
    (dict(content=b"prompt=a cat", headers={"content-type": "text/plain"}), 415, "application/json"),
    (dict(files={"image": ("big.png", os.urandom(3 * 2**20), "image/png")}), 413, "limit of 1 MiB"),
    (dict(content=(b"x" * 2**16 for _ in range(40)), headers={"content-type": "application/json"}), 413,
     "limit of 1 MiB"),
    (dict(data={"settings": "{}"}, files={"video": ("v.mp4", b"x", "video/mp4")}), 422, "Unknown form field 'video'"),
])
def test_bad_submissions_are_refused_with_a_message_naming_the_problem(client, request_kwargs, status, message):
    response = client.post("/v1/jobs", **request_kwargs)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_keys_ids_and_limits(server, client):
    with server.client(key=None) as anonymous:
        response = anonymous.get("/v1/health")
        assert response.status_code == 401 and "needs an API key" in response.json()["detail"]
    with server.client(key="wrong-key-0123456789") as wrong:
        response = wrong.post("/v1/jobs", json={"prompt": "x"})
        assert response.status_code == 401 and "API key is wrong" in response.json()["detail"]
    response = client.get("/v1/jobs", headers={"Authorization": "", "X-API-Key": API_KEY})
    assert response.status_code == 200

    for path in ("/v1/jobs/0123456789abcdef", "/v1/jobs/nope/video", "/v1/jobs/..%2F..%2Fetc/events"):
        response = client.get(path)
        assert response.status_code == 404, path
    assert "No job has the id '0123456789abcdef'" in client.get("/v1/jobs/0123456789abcdef").json()["detail"]
    assert client.delete("/v1/jobs/0123456789abcdef").status_code == 404
    response = client.get("/v1/jobs", params={"state": "finished"})
    assert response.status_code == 422 and "Unknown state 'finished'" in response.json()["detail"]

    # A full queue refuses more (429) while a long job runs; cancelling queued jobs takes effect at once.
    blocker = submit(client, prompt="blocker", steps=2, latent_window_size=1, fps=8, seconds=20)
    wait_for(client, blocker["id"], ("running",))
    queued = [submit(client, prompt=f"waiting {index}", **ONE_SECTION) for index in range(MAX_QUEUED)]
    assert [job["position"] for job in queued] == list(range(MAX_QUEUED))
    early = client.get(f"/v1/jobs/{queued[0]['id']}/video")
    assert early.status_code == 409 and "no video yet" in early.json()["detail"]
    response = client.post("/v1/jobs", json={"prompt": "one too many", **ONE_SECTION})
    assert response.status_code == 429 and "queue is full (20 jobs waiting" in response.json()["detail"]
    for job in queued:
        response = client.delete(f"/v1/jobs/{job['id']}")
        assert response.status_code == 200 and response.json()["state"] == "cancelled"
    assert client.delete(f"/v1/jobs/{blocker['id']}").status_code == 202
    assert wait_for(client, blocker["id"])["state"] == "cancelled"


def test_info_health_and_the_generated_api_page(client):
    info = client.get("/v1/info").json()
    assert info["model"] == "preset:tiny" and info["devices"] == ["cpu"] and "sdpa" in info["backends"]
    assert info["limits"]["max_queued"] == MAX_QUEUED and info["api_key_required"] is True
    assert set(info["queue"]) == {"queued", "running", "done", "failed", "cancelled"}
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["workers"][0]["alive"]
    # The submission schema is GenerationSettings' fields with their defaults and help, plus the server's own.
    schema = client.get("/openapi.json").json()
    body = schema["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    options = {item.name: item for item in GenerationSettings.options() if item.name not in NOT_PER_REQUEST}
    assert set(body["properties"]) == set(options) | set(SERVER_FIELDS)
    for name, item in options.items():
        assert body["properties"][name].get("default") == item.default  # FastAPI leaves out null defaults
        assert body["properties"][name]["description"] == SERVER_HELP.get(name, item.metadata["help"])
    assert "/v1/jobs/{job_id}/events" in schema["paths"]
    assert client.get("/docs").status_code == 200


def test_a_stopped_or_killed_server_goes_on_with_its_job_after_a_restart(tmp_path):
    server = Server(tmp_path / "state").start()
    sections = 16
    try:
        with server.client() as client:
            job = submit(client, prompt="survives", steps=3, latent_window_size=1, fps=8, seconds=sections / 2)
            first = wait_for(client, job["id"], ("running",), condition=lambda job: job["progress"]["sections_done"])
        server.stop()  # SIGTERM, as Ctrl-C: the job stops at its next step and goes back to the queue
        # ...exiting 143, with one line saying what the job's video holds (the finishing protocol)
        assert server.process.returncode == 143, server.log.read_text()
        said = [line for line in server.log.read_text().splitlines() if line.startswith(f"job {job['id']}: stopped")]
        assert len(said) == 1 and "back in the queue" in said[0], server.log.read_text()
        held = re.search(r"video\.mp4 holds (\d+) frames \((\d+) of 16 sections\)\.$", said[0])
        video = server.state_dir / "jobs" / job["id"] / "video.mp4"
        assert held and len(decode_video(video.read_bytes())[0]) == int(held.group(1)), said[0]
        server.start()
        with server.client() as client:
            stopped = client.get(f"/v1/jobs/{job['id']}").json()
            assert stopped["progress"]["sections_done"] >= first["progress"]["sections_done"]
            resumed = wait_for(client, job["id"], ("running",), condition=lambda job: job["progress"]["sections_done"]
                               > stopped["progress"]["sections_done"])
        server.kill()  # SIGKILL mid-section: no chance to tidy up
        server.start()
        with server.client() as client:
            done = wait_for(client, job["id"])
            frames, _ = decode_video(client.get(f"/v1/jobs/{job['id']}/video").content)
    finally:
        server.stop()
    assert done["state"] == "done", done["error"]
    # Three runs; the shutdown's does not count as an attempt, the kill's does.
    assert done["attempts"] == 2
    assert resumed["progress"]["sections_done"] <= done["stats"]["resumed_from"] < sections
    # Every section was sampled once: those finished before each stop were not run again.
    assert sorted(section["section"] for section in done["stats"]["sections"]) == list(range(sections))
    assert len(frames) == done["progress"]["frames"] == expected_frames(sections, 1)
    assert not (server.state_dir / "jobs" / job["id"] / "resume").exists()


@pytest.mark.parametrize("arguments,message", [
    (["--host", "0.0.0.0"], "set an API key with --api-key"),
    (["--api-key", "short"], "at least 16"),
    (["--devices", "tpu"], "Unknown device 'tpu'"),
    (["--max-queued", "0"], "--max-queued must be an integer from 1"),
])
def test_serve_refuses_unsafe_or_wrong_options_before_loading(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.delenv("FRAMEPACK_API_KEY", raising=False)
    assert main(["serve", "--preset", "tiny", "--state-dir", str(tmp_path), *arguments]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_state_directory_another_server_uses(tmp_path, capsys):
    from framepack_engine.serve.jobs import JobStore

    store = JobStore(tmp_path)  # the other server
    with socket.socket() as taken:  # were the state directory not refused, the port would be: no server starts
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            code = main(["serve", "--preset", "tiny", "--state-dir", str(tmp_path), "--port", str(port)])
        finally:
            store.close()
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "Another framepack serve is using this state directory" in error[0]
    assert str(tmp_path) not in error[0]


def test_missing_server_packages_are_named_with_the_install(monkeypatch):
    import importlib.util

    from framepack_engine.serve.server import require_server_packages

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else find_spec(name, *a))
    with pytest.raises(FramePackError, match=r"framepack-engine\[serve\]"):
        require_server_packages()
