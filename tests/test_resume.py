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
