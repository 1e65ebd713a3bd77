"""Resuming a generation from a finished section's checkpoint gives exactly what the uninterrupted run gives."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from framepack_engine import Engine, FramePackError
from framepack_engine.pipeline import FrameCollector, SectionCheckpoint, SectionResult

FAST = dict(steps=2, latent_window_size=1, fps=8, seconds=1.5, seed=7)  # three sections


@pytest.fixture(scope="module")
def engines():
    # One thread: the tiny preset's tensors are too small to share, and on a busy 2-core machine a second thread
    # makes each step several times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {variant: Engine.from_preset("tiny", variant=variant) for variant in ("bidirectional", "f1")}
    torch.set_num_threads(threads)


def gradient_image(height=64, width=80):
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([(x * 3) % 256, (y * 5) % 256, np.full_like(x, 60)], -1).astype(np.uint8)


def replay(results: list[SectionResult]) -> SectionResult:
    """One result standing for the sections before a restart: their final frames in video order, the last pending."""
    last = results[-1]
    chunks = [result.frames for result in results]
    frames = np.concatenate(chunks if last.direction == "forward" else chunks[::-1])
    return SectionResult(last.index, last.count, last.video_position, frames, last.pending_frames, last.direction,
                         last.latents, {}, last.metadata, last.checkpoint)


@pytest.mark.parametrize("variant,image,done", [("bidirectional", "image", 1), ("f1", None, 2)])
def test_resumed_run_equals_the_uninterrupted_one(engines, tmp_path, variant, image, done):
    engine = engines[variant]
    image = gradient_image() if image else None
    whole = list(engine.stream("a cat walks", image=image, **FAST))
    assert len(whole) == 3

    # A checkpoint survives a file: the resume reads it back as a restarted server would.
    save_file(whole[done - 1].checkpoint.tensors(), str(tmp_path / "checkpoint.safetensors"))
    checkpoint = SectionCheckpoint.from_tensors(load_file(str(tmp_path / "checkpoint.safetensors")))
    assert checkpoint.sections_done == done

    rest = list(engine.stream("a cat walks", image=image, resume=checkpoint, **FAST))
    assert [result.index for result in rest] == list(range(done, 3))
    for resumed, original in zip(rest, whole[done:]):
        torch.testing.assert_close(resumed.latents, original.latents, rtol=0, atol=0)
        np.testing.assert_array_equal(resumed.frames, original.frames)
        np.testing.assert_array_equal(resumed.pending_frames, original.pending_frames)

    uninterrupted, resumed = FrameCollector(), FrameCollector()
    for result in whole:
        uninterrupted.add(result)
    for result in [replay(whole[:done]), *rest]:
        resumed.add(result)
    np.testing.assert_array_equal(resumed.frames(), uninterrupted.frames())


def test_a_checkpoint_that_does_not_fit_is_refused(engines):
    engine = engines["f1"]
    small = dict(steps=1, latent_window_size=1, fps=8, seconds=1)  # two sections of 8 x 8 latents (64 x 64 pixels)
    history = torch.randn(1, 16, 20, 8, 8)
    state = torch.Generator().get_state()
    with pytest.raises(FramePackError, match="after 2 sections does not fit this generation of 2 sections"):
        list(engine.stream("x", resume=SectionCheckpoint(2, history, state, None), **small))
    with pytest.raises(FramePackError, match="after 0 sections does not fit"):
        list(engine.stream("x", resume=SectionCheckpoint(0, history, state, None), **small))
    with pytest.raises(FramePackError, match=r"latents \(1, 16, 20, 8, 8\) do not fit"):
        list(engine.stream("x", resume=SectionCheckpoint(1, history, state, None), **small, resolution=128))


class Killed(BaseException):
    """What a kill -9 does to a worker: it stops where it is, nothing closes (a BaseException passes every
    `except Exception`)."""


def decoded(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def run_job(state_dir, engine, settings, kill_after=None):
    """Runs the job in `state_dir` (submitted if there is none) on a worker of `engine`, as a server would at
    start-up (recovering what a killed one left); with kill_after, the worker is killed once that many sections are
    finished. Returns the store's job and its video's path."""
    from framepack_engine.serve.jobs import JobQueue, JobStore, LiveJob

    store = JobStore(state_dir)
    store.recover()
    if not store.list():
        store.submit(settings, {"format": "mp4", "crf": 16}, {}, sections=5, max_queued=1)
    queue = JobQueue(store, [("cpu", engine)], max_queued=1)
    job = store.claim("cpu")
    queue.live[job.id] = LiveJob()
    stream, outputs = engine.stream, []
    if kill_after is not None:
        def killed(*args, **kwargs):
            for count, result in enumerate(stream(*args, **kwargs), 1):
                yield result
                if count == kill_after:
                    raise Killed

        engine.stream = killed
    try:
        queue.workers[0].run_job(job)
    except Killed:
        pass  # the process is gone: its writer with it, the file holds what it had published
    finally:
        engine.stream = stream
        store.close()
    store = JobStore(state_dir)
    try:
        return store.get(job.id), store.folder(job.id) / "video.mp4"
    finally:
        store.close()


@pytest.mark.parametrize("variant", ["bidirectional", "f1"])
def test_a_job_killed_and_resumed_is_the_video_an_uninterrupted_job_makes(engines, tmp_path, monkeypatch, variant):
    """Killed after 3 of 5 sections and run again: the finished sections are not sampled again, and the video is
    the uninterrupted run's frame for frame (crf 16: a lossy encode, so its segments must be the same too)."""
    from framepack_engine.media import output as output_module

    engine = engines[variant]
    settings = {"prompt": "a cat walks", "steps": 2, "latent_window_size": 1, "fps": 8, "seconds": 2.5, "seed": 11}
    whole, whole_video = run_job(tmp_path / "whole", engine, settings)
    assert whole.state == "done" and whole.sections == 5

    opened = []  # the killed worker's output files: stopped as the kill stops their thread
    monkeypatch.setattr(output_module.SectionOutputFile, "__init__", lambda self, *a, __init__=output_module.
                        SectionOutputFile.__init__, **k: (opened.append(self), __init__(self, *a, **k))[1])
    killed, _ = run_job(tmp_path / "killed", engine, settings, kill_after=3)
    for output in opened:
        output.abort()
    monkeypatch.undo()
    assert killed.state == "running" and killed.sections_done == 3
    resumed, resumed_video = run_job(tmp_path / "killed", engine, settings)
    assert resumed.state == "done" and resumed.stats["resumed_from"] == 3 and resumed.attempts == 2
    expected = decoded(whole_video)
    frames = decoded(resumed_video)
    assert frames.shape == expected.shape and len(frames) == resumed.frames == whole.frames
    np.testing.assert_array_equal(frames, expected)
