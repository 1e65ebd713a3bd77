"""The scripts under bench/ as a new user meets them: bench_kernels off a GPU, offload_host_memory's exit status."""

import json

import pytest

from bench import bench_kernels, offload_host_memory


def test_bench_kernels_off_a_gpu_takes_tiny_shapes_and_says_so(capsys):
    """It ran FramePack's 640p shapes on a CPU by default, silently, for many minutes."""
    report = bench_kernels.main(["--device", "cpu", "--only", "layer_norm_modulate", "--repeats", "1"])
    assert report["shapes"]["name"] == "tiny"
    said = capsys.readouterr()
    assert "using tiny shapes" in said.err and "--full" in said.err
    assert "layer_norm_modulate" in said.out


def test_bench_kernels_full_shapes_off_a_gpu_warn_before_running(monkeypatch, capsys):
    def run(shapes, *args):  # the 640p cases themselves would take minutes here
        assert "many minutes" in capsys.readouterr().err  # said before anything runs
        return {"shapes": {"name": shapes.name}, "device": "cpu", "dtype": "float32", "results": []}

    monkeypatch.setattr(bench_kernels, "run", run)
    assert bench_kernels.main(["--device", "cpu", "--full"])["shapes"]["name"] == bench_kernels.FRAMEPACK_640P.name
    assert bench_kernels.choose_shapes("cpu", tiny=True) is bench_kernels.TINY
    assert bench_kernels.choose_shapes("cuda") is bench_kernels.FRAMEPACK_640P
    assert capsys.readouterr().err == ""  # nothing to warn about: asked for, or a GPU
    with pytest.raises(SystemExit):
        bench_kernels.main(["--tiny", "--full"])


def test_offload_host_memory_exits_non_zero_naming_the_failed_part(tmp_path, monkeypatch, capsys):
    """A part whose process fails (here: its checkpoint folder is empty) made the whole run exit 0."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    folders = {key: scratch / key for key in ("transformer", "base", "image_encoder")}
    for folder in folders.values():
        folder.mkdir()
    (scratch / "written.json").write_text(json.dumps({key: str(path) for key, path in folders.items()}))
    results = tmp_path / "results.json"
    assert offload_host_memory.main(["--scratch", str(scratch), "--parts", "dit", "--json", str(results)]) == 1
    err = capsys.readouterr().err
    assert "dit failed (exit status 1)" in err and "failed: dit (0 of 1 parts measured)" in err
    assert json.loads(results.read_text()) == []


def test_offload_host_memory_refuses_an_unknown_part_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr(offload_host_memory, "write_checkpoints", lambda *args: pytest.fail("wrote checkpoints"))
    with pytest.raises(SystemExit) as exited:
        offload_host_memory.main(["--scratch", str(tmp_path / "scratch"), "--parts", "dit,txt"])
    assert exited.value.code == 2
