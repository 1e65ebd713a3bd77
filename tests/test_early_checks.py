"""Every mistake in what a command is given is one line, before anything loads: argparse's own errors, the server's
options, a MagCache calibration's fields, calibrate-cache's images."""

import json

import numpy as np
import pytest
from PIL import Image

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.generation.calibration import MagCacheCalibration

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    from framepack_engine.pipeline import Engine

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the error")

    monkeypatch.setattr(Engine, "from_resolved", classmethod(load))
    monkeypatch.setattr(Engine, "from_preset", classmethod(load))


def one_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


@pytest.mark.parametrize("arguments,message,command", [
    (["generate", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'", "framepack generate"),
    (["generate", "x", "--sampler", "ddim"], "argument --sampler", "framepack generate"),
    (["serve", "--bogus"], "unrecognized arguments: --bogus", "framepack serve"),
    (["info", "--resolution"], "argument --resolution: expected one argument", "framepack info"),
    ([], "the following arguments are required: command", "framepack"),
])
def test_a_wrong_flag_is_the_error_and_a_help_hint_only(capsys, arguments, message, command):
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    assert exited.value.code == 2
    line = one_line(capsys)
    assert line.startswith("error: ") and message in line and line.endswith(f"(see {command} --help)")
    assert "usage:" not in line


def test_info_plan_names_a_bad_resolution_before_printing_anything(capsys):
    assert main(["info", "--plan", "--resolution", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip() == "error: --resolution must be an integer from 64 to 2048, got 0: the model was " \
                                   "trained at 640."


@pytest.mark.parametrize("arguments,message", [
    (["--port", "70000"], "--port must be an integer from 1 to 65535, got 70000"),
    (["--port", "0"], "--port must be an integer from 1 to 65535, got 0"),
    (["--max-body-mb", "nan"], "--max-body-mb must be a finite number in (0, 100000], got nan"),
    (["--max-body-mb", "inf"], "--max-body-mb must be a finite number in (0, 100000], got inf"),
    (["--max-body-mb", "0"], "--max-body-mb must be a finite number in (0, 100000], got 0"),
    (["--max-queued", "0"], "--max-queued must be an integer from 1, got 0"),
])
def test_serve_options_are_checked_before_loading(tmp_path, capsys, monkeypatch, no_loading, arguments, message):
    import framepack_engine.commands.serve as serve

    monkeypatch.delenv("FRAMEPACK_API_KEY", raising=False)
    monkeypatch.setattr(serve, "load_engines", lambda *a, **k: pytest.fail("the engines were loaded"))
    assert main(["serve", "--preset", "tiny", "--state-dir", str(tmp_path / "state"), *arguments]) == 2
    assert message in one_line(capsys)
    assert not (tmp_path / "state").exists()  # refused before the state directory is even made


# A MagCache calibration as calibrate-cache writes it; each case breaks one field.

def calibration_json(**changes) -> dict:
    data = {"format": "framepack-magcache-calibration", "version": 1, "steps": 2,
            "ratios": {"positive": [1.0, 0.98]}, "model": "preset:tiny", "variant": "bidirectional",
            "bucket": [64, 80], "latent_window_size": 2, "sampler": "unipc", "shift": None, "cfg": 1.0,
            "sections": 2, "random_weights": True, "note": "", "created": "2026-12-06"}
    data.update(changes)
    return data


@pytest.mark.parametrize("changes,message", [
    ({"bucket": [32]}, "has bucket [32], which must be null or [height, width]"),
    ({"bucket": 64}, "has bucket 64, which must be null or [height, width]"),
    ({"bucket": [64, "80"]}, "has bucket [64, \"80\"]"),
    ({"bucket": [64, 0]}, "has bucket [64, 0]"),
    ({"latent_window_size": "9"}, "has latent_window_size \"9\", which must be null or a positive integer"),
    ({"latent_window_size": 0}, "has latent_window_size 0"),
    ({"shift": -1}, "has shift -1, which must be null or a positive number"),
    ({"cfg": "1"}, "has cfg \"1\", which must be a number of at least 1"),
    ({"sections": -1}, "has sections -1"),
    ({"random_weights": "yes"}, "has random_weights \"yes\", which must be true or false"),
    ({"model": 3}, "has model 3, which must be a string"),
    ({"sampler": None}, "has sampler null, which must be a string"),
    ({"steps": True}, "does not hold one positive ratio per step"),
    ({"ratios": {"positive": [1.0, float("inf")]}}, "does not hold one positive ratio per step"),
    ({"ratios": {"positive": [1.0, float("nan")]}}, "does not hold one positive ratio per step"),
])
def test_a_calibration_with_a_bad_field_is_refused_as_it_is_read(tmp_path, changes, message):
    path = tmp_path / "magcache.json"
    path.write_text(json.dumps(calibration_json(**changes)))
    with pytest.raises(FramePackError) as raised:
        MagCacheCalibration.load(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert "calibrate-cache" in str(raised.value)


def test_a_good_calibration_loads_with_every_field(tmp_path):
    path = tmp_path / "magcache.json"
    path.write_text(json.dumps(calibration_json(shift=3.0)))
    calibration = MagCacheCalibration.load(path)
    assert calibration.bucket == [64, 80] and calibration.shift == 3.0 and calibration.random_weights


@pytest.mark.parametrize("bucket", [[32], 64])
def test_generate_refuses_a_bad_calibration_bucket_before_loading(tmp_path, capsys, no_loading, bucket):
    path = tmp_path / "magcache.json"
    path.write_text(json.dumps(calibration_json(bucket=bucket)))
    code = main(["generate", "x", "--seconds", "1", "--out", str(tmp_path / "v.mp4"), "--cache", "magcache",
                 "--magcache-calibration", str(path), *FAST])
    assert code == 2 and f"has bucket {json.dumps(bucket)}" in one_line(capsys)


@pytest.mark.parametrize("image", ["missing", "truncated", "folder"])
def test_calibrate_cache_checks_its_images_before_loading(tmp_path, capsys, no_loading, image):
    path = tmp_path / "start.png"
    if image != "missing":
        Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(path)
    if image == "truncated":
        path.write_bytes(path.read_bytes()[:60])
    if image == "folder":
        path = tmp_path / "images"
        path.mkdir()
    code = main(["calibrate-cache", "x", "--image", str(path), "--out", str(tmp_path / "magcache.json"), *FAST])
    line = one_line(capsys)
    assert code == 2 and line.startswith("error: ") and path.name in line
    assert not (tmp_path / "magcache.json").exists()


def test_calibrate_cache_reads_its_image_once_and_records_its_bucket(tmp_path, capsys):
    image = tmp_path / "start.png"
    Image.fromarray(np.full((64, 80, 3), 120, np.uint8)).save(image)
    out = tmp_path / "magcache.json"
    assert main(["calibrate-cache", "x", "--image", str(image), "--out", str(out), "--seconds", "1", *FAST]) == 0
    calibration = MagCacheCalibration.load(out)
    assert calibration.steps == 2 and len(calibration.bucket) == 2 and calibration.random_weights
