"""The job queue without HTTP or a model: order, limits, cancellation, recovery after a stop, resume files, and a
worker running jobs of a fake engine into real video files."""

import threading
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from framepack_engine.errors import FramePackError
from framepack_engine.serve.jobs import MAX_ATTEMPTS, JobFinished, JobNotFound, JobQueue, JobStore, LiveJob, QueueFull, ResumeFiles
from framepack_engine.pipeline import SectionCheckpoint, SectionResult

SETTINGS = {"prompt": "x", "seconds": 1.0}
OUTPUT = {"format": "mp4", "crf": 16}


def submit(store, max_queued=10, images=None):
    return store.submit(SETTINGS, OUTPUT, images or {}, sections=2, max_queued=max_queued)


def test_jobs_run_in_submission_order_and_survive_reopening(tmp_path):
    store = JobStore(tmp_path)
    jobs = [submit(store) for _ in range(4)]
    assert [job.position for job in jobs] == [0, 1, 2, 3]
    assert store.claim("cpu").id == jobs[0].id
    assert [job.position for job in store.list()] == [None, 0, 1, 2]
    store.close()
    reopened = JobStore(tmp_path)  # a restart: the same jobs, in the same order
    assert [job.id for job in reopened.list()] == [job.id for job in jobs]
    assert [reopened.claim("cpu").id for _ in range(3)] == [job.id for job in jobs[1:]]
    assert reopened.claim("cpu") is None


def test_queue_limit_inputs_and_unknown_ids(tmp_path):
    store = JobStore(tmp_path)
    first = submit(store, max_queued=2, images={"image": (".png", b"png bytes")})
    submit(store, max_queued=2)
    with pytest.raises(QueueFull, match="full \\(2 jobs waiting"):
        submit(store, max_queued=2)
    assert len(list((tmp_path / "jobs").iterdir())) == 2  # the refused job left no folder
    assert first.inputs == {"image": "image.png"}
    assert (store.folder(first.id) / "image.png").read_bytes() == b"png bytes"
    for job_id in ("0123456789abcdef", "../../etc/passwd", ""):
        with pytest.raises(JobNotFound):
            store.get(job_id)


def test_cancel(tmp_path):
    store = JobStore(tmp_path)
    running, queued = submit(store), submit(store)
    store.claim("cpu")
    marked = store.request_cancel(running.id)
    assert marked.state == "running" and marked.cancel_requested  # its worker stops it at the next step
    cancelled = store.request_cancel(queued.id)
    assert cancelled.state == "cancelled" and cancelled.finished_at is not None
    store.finish(running.id, "cancelled")
    with pytest.raises(JobFinished, match="cancelled already"):
        store.request_cancel(running.id)


def test_a_cancel_while_a_worker_claims_the_job_leaves_it_cancelled_or_marked_running(tmp_path):
    store = JobStore(tmp_path)
    job = submit(store)
    claims, get = [], store.get

    def get_while_a_worker_claims(job_id):  # the worker's claim comes while the cancel is under way
        seen = get(job_id)
        if not claims:
            claims.append(store.claim("cuda:0"))
        return seen

    store.get = get_while_a_worker_claims
    store.request_cancel(job.id)
    after = get(job.id)
    if claims[0] is None:  # the cancel came first: no worker ever runs it
        assert after.state == "cancelled" and after.device is None
    else:  # the claim came first: the worker runs it and stops at its next step
        assert after.state == "running" and after.cancel_requested and after.finished_at is None


def test_recovery_after_a_stop_requeues_cancels_or_fails_with_the_reason(tmp_path):
    store = JobStore(tmp_path)
    interrupted, cancelling, shut_down = submit(store), submit(store), submit(store)
    for _ in range(3):
        store.claim("cpu")
    store.request_cancel(cancelling.id)
    store.requeue(shut_down.id, frames=0)  # a clean shutdown put it back: not an attempt
    store.close()

    store = JobStore(tmp_path)  # the server starts again after a crash
    happened = dict(store.recover())
    assert store.get(interrupted.id).state == "queued" and "queued again" in happened[interrupted.id]
    assert store.get(cancelling.id).state == "cancelled" and "cancelled" in happened[cancelling.id]
    assert store.get(shut_down.id).state == "queued" and store.get(shut_down.id).attempts == 0
    assert shut_down.id not in happened

    # A job the server never comes back from is run MAX_ATTEMPTS times (the first was above), then failed.
    for attempt in range(2, MAX_ATTEMPTS + 1):
        while store.claim("cpu").id != interrupted.id:
            pass
        store.close()
        store = JobStore(tmp_path)
        store.recover()
        assert store.get(interrupted.id).state == ("queued" if attempt < MAX_ATTEMPTS else "failed")
    failed = store.get(interrupted.id)
    assert f"stopped {MAX_ATTEMPTS} times" in failed.error and failed.finished_at is not None


def test_a_second_store_on_one_state_directory_is_refused_until_the_first_closes(tmp_path):
    first = JobStore(tmp_path)
    with pytest.raises(FramePackError, match="Another framepack serve is using this state directory") as refused:
        JobStore(tmp_path)
    assert "--state-dir" in str(refused.value) and str(tmp_path) not in str(refused.value)
    first.close()
    JobStore(tmp_path).close()


def test_without_locks_a_job_taken_by_another_server_is_not_claimed_again(tmp_path, monkeypatch):
    """Where no lock keeps a second server away (Windows), a job it claimed between this store's look and its
    claim stays the other's."""
    import framepack_engine.serve.jobs

    monkeypatch.setattr(framepack_engine.serve.jobs, "fcntl", None)
    this, other = JobStore(tmp_path), JobStore(tmp_path)
    job = submit(this)

    class OtherClaimsFirst:
        """This store's connection: just before its first UPDATE the other server claims the job."""

        def __init__(self, connection):
            self.connection, self.raced = connection, False

        def execute(self, statement, *arguments):
            if statement.startswith("UPDATE") and not self.raced:
                self.raced = True
                assert other.claim("cuda:1").id == job.id
            return self.connection.execute(statement, *arguments)

    this._db = OtherClaimsFirst(this._db)
    assert this.claim("cuda:0") is None
    claimed = other.get(job.id)
    assert (claimed.state, claimed.device, claimed.attempts) == ("running", "cuda:1", 1)


def test_resume_folders_go_with_jobs_that_will_not_run_again(tmp_path):
    store = JobStore(tmp_path)
    requeued, cancelling, interrupted = submit(store), submit(store), submit(store)
    resume = {}
    for job in (requeued, cancelling, interrupted):
        store.claim("cpu")
        resume[job.id] = store.folder(job.id) / "resume"
        resume[job.id].mkdir()
        np.save(resume[job.id] / "frames_00000.npy", np.random.randint(0, 256, (5, 16, 16, 3), np.uint8))
    store.requeue(requeued.id, frames=5)  # a shutdown put it back; then it is cancelled while queued
    assert store.request_cancel(requeued.id).state == "cancelled" and not resume[requeued.id].exists()
    store.request_cancel(cancelling.id)
    store.close()

    store = JobStore(tmp_path)  # after a crash: one job was being cancelled, the other goes on
    store.recover()
    assert not resume[cancelling.id].exists() and resume[interrupted.id].exists()
    for _ in range(MAX_ATTEMPTS - 1):  # it stops the server every time, until it is failed
        assert store.claim("cpu").id == interrupted.id
        store.close()
        store = JobStore(tmp_path)
        store.recover()
    assert store.get(interrupted.id).state == "failed" and not resume[interrupted.id].exists()


def section_result(index, count, frames, direction, model="preset:tiny", loras=()):
    checkpoint = SectionCheckpoint(index + 1, torch.randn(1, 16, 5, 2, 2), torch.Generator().manual_seed(index)
                                   .get_state(), torch.randn(1, 3, 5, 16, 16))
    metadata = {"model": model, "variant": "v", **({"loras": list(loras)} if loras else {})}  # as Engine.metadata
    return SectionResult(index, count, count - 1 - index if direction == "backward" else index, frames,
                         frames[:1].copy(), direction, torch.zeros(1), {}, metadata, checkpoint)


class FakeLoras:
    def __init__(self, described):
        self.described = list(described)

    def describe(self):
        return self.described


class FakeEngine:
    name, variant, default_resolution = "preset:tiny", "v", 64

    def __init__(self, loras=()):
        self.loras = FakeLoras(loras)


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_resume_files_give_back_the_checkpoint_and_the_frames_in_video_order(tmp_path, direction):
    files = ResumeFiles(tmp_path / "resume")
    assert files.load(FakeEngine(), 4) == (None, [])
    chunks = [np.full((2, 16, 16, 3), value, np.uint8) for value in (10, 20, 30)]
    results = [section_result(index, 4, chunk, direction) for index, chunk in enumerate(chunks)]
    for result in results:
        files.save(result)
    checkpoint, replays = files.load(FakeEngine(), 4)
    assert checkpoint.sections_done == 3
    torch.testing.assert_close(checkpoint.history, results[-1].checkpoint.history, rtol=0, atol=0)
    torch.testing.assert_close(checkpoint.pending_pixels, results[-1].checkpoint.pending_pixels, rtol=0, atol=0)
    assert torch.equal(checkpoint.generator_state, results[-1].checkpoint.generator_state)
    # one replay per finished section, in generation order (each section's frames a segment, as first written)
    assert [replay.index for replay in replays] == [0, 1, 2]
    for replay, chunk in zip(replays, chunks):
        np.testing.assert_array_equal(replay.frames, chunk)
        assert (replay.direction, replay.metadata["model"]) == (direction, "preset:tiny")
    assert [len(replay.pending_frames) for replay in replays[:-1]] == [0, 0]
    np.testing.assert_array_equal(replays[-1].pending_frames, results[-1].pending_frames)
    assert replays[-1].checkpoint is checkpoint

    other = FakeEngine()
    other.name = "lllyasviel/FramePackI2V_HY"
    with pytest.raises(FramePackError, match="cannot be continued"):
        files.load(other, 4)
    with pytest.raises(FramePackError, match="does not match its settings"):
        files.load(FakeEngine(), 5)
    files.remove()
    assert not (tmp_path / "resume").exists()


def test_a_checkpoint_made_with_other_loras_is_refused(tmp_path):
    files = ResumeFiles(tmp_path / "resume")
    style = {"name": "style", "file": "style.safetensors", "strength": 0.8, "mode": "fused", "layout": "kohya",
             "layers": 4}
    other = {**style, "name": "other", "file": "other.safetensors"}
    files.save(section_result(0, 3, np.random.randint(0, 256, (2, 16, 16, 3), np.uint8), "forward", loras=[style]))
    for running, named in [([], "no LoRA"), ([{**style, "strength": 0.5}], "the LoRAs style.safetensors:0.5"),
                           ([style, other], "the LoRAs other.safetensors:0.8, style.safetensors:0.8")]:
        with pytest.raises(FramePackError, match=f"made with the LoRAs style.safetensors:0.8 and this server runs "
                                                 f"{named}: they cannot be continued"):
            files.load(FakeEngine(running), 3)
    checkpoint, _ = files.load(FakeEngine([{**style, "mode": "live"}]), 3)  # the same model, the LoRA beside it
    assert checkpoint.sections_done == 1

    files.remove()
    files.save(section_result(0, 3, np.random.randint(0, 256, (2, 16, 16, 3), np.uint8), "forward"))
    with pytest.raises(FramePackError, match="made with no LoRA and this server runs the LoRAs style.safetensors:0.8"):
        files.load(FakeEngine([style]), 3)


def test_a_failed_resume_write_keeps_the_last_checkpoint_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import safetensors.torch

    files = ResumeFiles(tmp_path / "resume")
    frames = np.full((2, 16, 16, 3), 10, np.uint8)
    files.save(section_result(0, 3, frames, "forward"))

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(OSError):
        files.save(section_result(1, 3, frames, "forward"))
    assert sorted(path.name for path in files.folder.iterdir()) == [
        "checkpoint.safetensors", "frames_00000.npy", "frames_00001.npy"]
    monkeypatch.undo()
    checkpoint, replays = files.load(FakeEngine(), 3)
    assert checkpoint.sections_done == 1 and [len(replay.frames) for replay in replays] == [2]


# ---- a worker running jobs ------------------------------------------------------------------------------------------

FRAMES_PER_SECTION = 9


class StreamingEngine(FakeEngine):
    """Streams `count` random sections of FRAMES_PER_SECTION frames; before each after the first it calls `between`."""

    def __init__(self, count, between=lambda: None):
        super().__init__()
        self.count, self.between = count, between

    def stream(self, prompt="", **options):
        count = self.count
        for index in range(count):
            if index:
                self.between()
            frames = np.random.randint(0, 256, (FRAMES_PER_SECTION, 48, 64, 3), np.uint8)
            result = section_result(index, count, frames, "forward")
            result.pending_frames, result.stats = frames[:0], {"seconds": 0.1}
            yield result


def run_one_job(tmp_path, engine, before_running=lambda folder: None):
    """Submits a job of the engine's sections and runs it on a worker of `engine`, here; returns (store, job).
    before_running(the job's folder) comes between the claim and the run."""
    store = JobStore(tmp_path)
    queue = JobQueue(store, [("cpu", engine)], max_queued=10)
    store.submit({"prompt": "x", "fps": 8.0}, OUTPUT, {}, sections=engine.count, max_queued=10)
    job = store.claim("cpu")
    before_running(store.folder(job.id))
    queue.live[job.id] = LiveJob()
    queue.workers[0].run_job(job)
    return store, store.get(job.id)


def frames_in(path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


def test_a_job_done_holds_every_frame(tmp_path):
    store, job = run_one_job(tmp_path, StreamingEngine(2))
    assert job.state == "done" and job.error is None
    assert job.frames == 2 * FRAMES_PER_SECTION == frames_in(store.folder(job.id) / job.video_name)


def test_a_job_starts_by_removing_what_a_killed_writer_left(tmp_path):
    """A server killed while writing leaves the writer's parts folder and a temporary file of the video's atomic
    publish, both named after the video (".video.mp4.<random>..."): the job's next run removes them."""
    import tempfile

    from framepack_engine.media.video import atomic_path

    def leftovers(folder):
        parts = tempfile.mkdtemp(prefix=".video.mp4.", suffix=".parts", dir=folder)  # as the writer names them
        (Path(parts) / "segment_00000.mp4").write_bytes(b"encoded frames")
        with pytest.raises(InterruptedError), atomic_path(folder / "video.mp4") as temporary:
            published = temporary  # the publish's temporary, named as a kill would leave it
            raise InterruptedError
        published.write_bytes(b"half a video")

    store, job = run_one_job(tmp_path, StreamingEngine(1), before_running=leftovers)
    assert job.state == "done"
    assert sorted(path.name for path in store.folder(job.id).iterdir()) == ["settings.json", "video.mp4"]


def test_a_video_that_cannot_be_finished_fails_its_job_with_the_frames_the_file_holds(tmp_path, monkeypatch, capsys):
    from framepack_engine.media import video

    first_published = threading.Event()
    publish = video._VideoSink.publish

    def publish_once(sink):  # the disk fills up after the first section is in the file
        if first_published.is_set():
            raise OSError(28, "No space left on device")
        publish(sink)
        first_published.set()

    monkeypatch.setattr(video._VideoSink, "publish", publish_once)
    engine = StreamingEngine(2, between=lambda: first_published.wait(timeout=60))
    store, job = run_one_job(tmp_path, engine)
    assert job.state == "failed" and "No space left on device" in job.error and "\n" not in job.error
    assert job.frames == FRAMES_PER_SECTION == frames_in(store.folder(job.id) / job.video_name)
    assert "Traceback" not in capsys.readouterr().err


def test_an_unexpected_error_while_finishing_the_video_fails_the_job(tmp_path, monkeypatch, capsys):
    from framepack_engine.media.output import SectionOutputFile

    def broken_close(output, stop=None):
        raise RuntimeError("a bug in the writer")

    monkeypatch.setattr(SectionOutputFile, "close", broken_close)
    _, job = run_one_job(tmp_path, StreamingEngine(1))
    assert job.state == "failed"
    assert job.error.startswith("Finishing the video failed (RuntimeError: a bug in the writer)")
    assert "Traceback" not in capsys.readouterr().err


def test_serve_builds_the_preset_engine_generate_builds_quantized_and_with_loras(tmp_path):
    """`framepack serve --preset tiny --quantize int8 --lora ...` runs the model `framepack generate` would."""
    from safetensors.torch import save_file

    from framepack_engine.serve.jobs import load_worker_engine
    from framepack_engine.models.presets import tiny_dit
    from framepack_engine.runtime.quant import quantized_layers
    from framepack_engine.settings import ModelSettings

    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for name, layer in tiny_dit(generator).linear_layers().items():  # a kohya-layout LoRA over every linear
        key = f"lora_unet_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = torch.randn(2, layer.in_features, generator=generator)
        tensors[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, 2, generator=generator)
        tensors[f"{key}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "style.safetensors")
    settings = ModelSettings.from_options(quantize="int8", lora=[f"{tmp_path / 'style.safetensors'}:0.5"])
    engine = load_worker_engine(settings, "tiny", "cpu")
    assert quantized_layers(engine.transformer) and quantized_layers(engine.text_encoder.llama_model)
    assert [(lora["file"], lora["strength"]) for lora in engine.loras.describe()] == [("style.safetensors", 0.5)]
