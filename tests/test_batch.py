"""`framepack generate --batch FILE`: every line checked before any model loads (all errors listed with their line
numbers), the models loaded once, each job written as it finishes, a failed job not stopping the others."""

import json

import av
import numpy as np
import pytest
from PIL import Image

from framepack_engine.commands.main import main
from framepack_engine.media.metadata import read_metadata
from framepack_engine.pipeline import Engine

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--seconds", "1", "--quiet"]


@pytest.fixture
def loads(monkeypatch):
    """Counts the engines built (every model load of the command goes through Engine.from_resolved)."""
    counted = []
    original = Engine.from_resolved.__func__

    def counting(cls, *args, **kwargs):
        counted.append(1)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(Engine, "from_resolved", classmethod(counting))
    return counted


def write_batch(path, *jobs):
    path.write_text("\n".join(job if isinstance(job, str) else json.dumps(job) for job in jobs) + "\n")
    return path


def frames(path):
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def test_bad_lines_are_all_listed_before_any_model_loads(tmp_path, capsys, loads):
    image = tmp_path / "start.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(image)
    batch = write_batch(
        tmp_path / "jobs.jsonl",
        {"prompt": "a cat", "seed": 1, "out": str(tmp_path / "one.mp4"), "image": str(image)},
        {"prompt": "a dog", "sed": 2, "out": str(tmp_path / "two.mp4")},
        "",
        {"prompt": "a cow", "seconds": -1, "out": str(tmp_path / "three.mp4")},
        {"prompt": "a hen", "image": str(tmp_path / "missing.png"), "out": str(tmp_path / "four.mp4")},
        {"prompt": "a fox", "out": str(tmp_path / "one.mp4")},
        {"prompt": "an owl", "quantize": "int8", "out": str(tmp_path / "six.mp4")},
        "[1, 2]",
        "{not json",
        {"prompt": "a pig", "crf": "high", "out": str(tmp_path / "ten.mp4")},
    )
    code = main(["generate", "--batch", str(batch), *FAST])
    errors = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and loads == []
    assert [error.split(":")[0] for error in errors] == ["error"] * 8, errors
    expected = {2: "unknown key 'sed' (did you mean 'seed'?)", 4: "seconds must be", 5: "'missing.png' does not exist",
                6: "is also line 1's", 7: "quantize is 'int8' here but None for the batch", 8: "a JSON object",
                9: "not JSON", 10: "crf must be an integer, got 'high'"}
    for error, (line, message) in zip(errors, expected.items()):
        assert error.startswith(f"error: jobs.jsonl line {line}: ") and message in error, error
    assert not list(tmp_path.glob("*.mp4"))


def test_the_models_load_once_and_a_failed_job_does_not_stop_the_others(tmp_path, capsys, loads, monkeypatch):
    """Job 2 fails in the engine, job 4's image is gone when its turn comes (inputs are read again then, not kept
    from the check): both are reported, jobs 1 and 3 written, the exit status counts the two."""
    image = tmp_path / "hen.png"
    Image.fromarray(np.full((48, 64, 3), 90, np.uint8)).save(image)
    streamed, built = Engine.stream, Engine.from_resolved.__func__

    def built_then_image_removed(cls, *args, **kwargs):
        image.unlink(missing_ok=True)
        return built(cls, *args, **kwargs)

    monkeypatch.setattr(Engine, "from_resolved", classmethod(built_then_image_removed))

    def failing_stream(self, *args, request=None, **kwargs):
        if request.settings.prompt == "boom":
            raise RuntimeError("the device fell over\nmore detail")
        yield from streamed(self, *args, request=request, **kwargs)

    monkeypatch.setattr(Engine, "stream", failing_stream)
    batch = write_batch(
        tmp_path / "jobs.jsonl",
        {"prompt": "a cat", "seed": 1, "variant": "bidirectional", "out": str(tmp_path / "first.mp4")},
        {"prompt": "boom", "seed": 2, "out": str(tmp_path / "second.mp4")},
        {"prompt": "a dog", "seed": 3, "steps": 1, "out": str(tmp_path / "third.safetensors")},
        {"prompt": "a hen", "image": str(image), "out": str(tmp_path / "fourth.mp4")},
    )
    code = main(["generate", "--batch", str(batch), "--seed", "9", "--crf", "20", *FAST])
    captured = capsys.readouterr()
    assert code == 102, captured.err  # 100 + two failed jobs
    assert len(loads) == 1
    assert (tmp_path / "first.mp4").is_file() and (tmp_path / "third.safetensors").is_file()
    assert not (tmp_path / "second.mp4").exists()
    out = captured.out.splitlines()
    assert [line for line in out if line.startswith("job ")] == [
        f"job 1/4 (line 1): {tmp_path / 'first.mp4'}", f"job 2/4 (line 2): {tmp_path / 'second.mp4'}",
        f"job 3/4 (line 3): {tmp_path / 'third.safetensors'}", f"job 4/4 (line 4): {tmp_path / 'fourth.mp4'}"]
    assert f"Saved {tmp_path / 'first.mp4'} (job 1/4, line 1; 1 of 4 done)" in out
    assert f"Saved {tmp_path / 'third.safetensors'} (job 3/4, line 3; 2 of 4 done)" in out
    errors = captured.err.strip().splitlines()
    assert "error: job 2/4 (line 2) failed: RuntimeError: the device fell over; nothing was written" in errors[0]
    assert errors[1].startswith("error: job 4/4 (line 4) failed: The start image file 'hen.png' does not exist")
    assert errors[-1] == ("Batch: 2 of 4 jobs done, 2 failed: line 2 (RuntimeError: the device fell over); line 4 "
                          f"({errors[1].split('failed: ')[1].split('; nothing')[0]}).")
    # each job's own options over the command's, which fill in the rest
    first, third = read_metadata(tmp_path / "first.mp4"), read_metadata(tmp_path / "third.safetensors")
    assert (first["prompt"], first["seed"], first["steps"], first["output"]["crf"]) == ("a cat", 1, 2, 20)
    assert (third["prompt"], third["seed"], third["steps"]) == ("a dog", 3, 1)
    assert len(frames(tmp_path / "first.mp4")) == 4 * (1 * 2 + 1) - 3
    # a job's video is the one the single command makes (a line may repeat a model option with the batch's value)
    assert main(["generate", "a cat", "--seed", "1", "--crf", "20", *FAST, "--out", str(tmp_path / "single.mp4")]) == 0
    assert np.array_equal(frames(tmp_path / "first.mp4"), frames(tmp_path / "single.mp4"))


def test_out_on_the_command_line_and_an_empty_batch_are_one_line(tmp_path, capsys, loads):
    batch = write_batch(tmp_path / "jobs.jsonl", {"prompt": "a cat"})
    assert main(["generate", "--batch", str(batch), "--out", str(tmp_path / "v.mp4"), *FAST]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--out names one output" in error[0]
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert main(["generate", "--batch", str(tmp_path / "empty.jsonl"), *FAST]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "holds no job" in error[0]
    assert main(["generate", "--batch", str(tmp_path / "nowhere.jsonl"), *FAST]) == 2
    assert "does not exist" in capsys.readouterr().err and loads == []


def test_ctrl_c_finishes_the_running_job_and_starts_no_other(tmp_path, capsys, monkeypatch):
    """The finishing protocol in a batch: SIGINT once job 2's first section is handed over. Job 2's file keeps that
    section, job 3 is not started, the exit status is 130 and the last lines say what is where."""
    import os
    import signal

    streamed = Engine.stream

    def interrupted_stream(self, *args, request=None, **kwargs):
        for section in streamed(self, *args, request=request, **kwargs):
            yield section
            if request.settings.prompt == "stop here":
                os.kill(os.getpid(), signal.SIGINT)  # the engine stops at the next step

    monkeypatch.setattr(Engine, "stream", interrupted_stream)
    batch = write_batch(tmp_path / "jobs.jsonl", {"prompt": "a cat", "out": str(tmp_path / "first.mp4")},
                        {"prompt": "stop here", "seconds": 2, "out": str(tmp_path / "second.mp4")},
                        {"prompt": "a dog", "out": str(tmp_path / "third.mp4")})
    assert main(["generate", "--batch", str(batch), *FAST]) == 130
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("Interrupted: second.mp4 holds 5 frames (1 of 2 sections). Batch stopped at job 2/3:")
    assert error[-1].endswith("1 done, 0 failed, not run: line(s) 3.")
    assert len(frames(tmp_path / "first.mp4")) == 9 and len(frames(tmp_path / "second.mp4")) == 5
    assert not (tmp_path / "third.mp4").exists()


def test_a_batch_runs_in_one_process(tmp_path, capsys, loads):
    batch = write_batch(tmp_path / "jobs.jsonl", {"prompt": "a cat", "out": str(tmp_path / "a.mp4")})
    assert main(["generate", "--batch", str(batch), "--nproc", "2", *FAST]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "--batch runs its jobs in one process" in error[0] and loads == []


def test_keyframes_in_a_line_and_one_frame_jobs_refused(tmp_path, capsys, loads):
    keyframe = tmp_path / "pose.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(keyframe)
    batch = write_batch(tmp_path / "jobs.jsonl",
                        {"prompt": "a cat", "keyframes": {"-1": str(keyframe)}, "out": str(tmp_path / "keyed.mp4")},
                        {"prompt": "a cat", "out": str(tmp_path / "plain.mp4")},
                        {"prompt": "a cat", "keyframes": ["pose.png"], "out": str(tmp_path / "bad.mp4")},
                        {"prompt": "a cat", "image": str(keyframe), "one_frame": True, "out": str(tmp_path / "x.png")})
    assert main(["generate", "--batch", str(batch), *FAST]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "line 3: keyframes must be an object of SPEC" in errors[0], errors
    assert "line 4: one-frame jobs (one_frame) are not run in a batch" in errors[1] and loads == []
    write_batch(batch, *[json.loads(line) for line in batch.read_text().splitlines()[:2]])
    assert main(["generate", "--batch", str(batch), *FAST]) == 0 and len(loads) == 1
    assert read_metadata(tmp_path / "keyed.mp4")["keyframes"] == {"-1": "pose.png"}
    assert not np.array_equal(frames(tmp_path / "keyed.mp4"), frames(tmp_path / "plain.mp4"))
