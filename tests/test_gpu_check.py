"""The prepared GPU check (bench/gpu_check.py): its dry run plans every step within the 8-minute budget on an H100
and fails past a budget; its CPU rehearsal runs every step's code path at tiny sizes, so a GPU run exercises no
untested code but the device itself."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_the_dry_run_lists_every_step_within_the_budget():
    process = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--dry-run"], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert process.returncode == 0, process.stderr
    lines = process.stdout.strip().splitlines()
    for name in gpu_check.STEPS:
        assert any(line.split()[0] == name and "~" in line for line in lines[1:-1]), name
    assert lines[-1].startswith("total: ") and lines[-1].endswith(" s")
    assert 0 < float(lines[-1].split()[1]) <= 480
    steps = gpu_check.plan(gpu_check.CARDS["h100"])
    assert sum(step.limit for step in steps) <= gpu_check.BUDGET_SECONDS  # even a run hitting every limit ends in time
    assert all(step.estimate < step.limit for step in steps)


def test_a_budget_below_the_estimate_fails_the_dry_run(capsys):
    assert gpu_check.main(["--dry-run", "--budget-s", "10"]) == 1
    assert "exceeds the budget" in capsys.readouterr().err
    assert gpu_check.main(["--dry-run", "--assume", "rtx3060"]) == 0  # a 6 GB card runs the streamed plan only
    assert [variant["label"] for variant in gpu_check.e2e_variants(5)] == ["6 GB plan (blocks streamed)"]


def test_a_cpu_only_torch_on_a_gpu_machine_is_one_line(monkeypatch):
    import argparse

    monkeypatch.setattr(gpu_check, "_gpu_present", lambda: True)
    with pytest.raises(SystemExit, match="CPU-only build on a GPU machine: install the CUDA build"):
        gpu_check.step_machine(argparse.Namespace(device="cuda", out=".", tiny=False))


@pytest.mark.slow
def test_the_cpu_rehearsal_runs_every_step(tmp_path):
    process = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--tiny", "--out",
                              str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                             env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert process.returncode == 0, process.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert {name: step["status"] for name, step in report["steps"].items()} == dict.fromkeys(gpu_check.STEPS, "ok")
    runs = report["steps"]["e2e"]["result"]["runs"]
    assert [run["label"] for run in runs] == [variant["label"] for variant in gpu_check.e2e_variants(80)]
    assert not [run for run in runs if "error" in run] and all(run["output_finite"] for run in runs)
    planned = next(run for run in runs if "streamed" in run["label"])
    assert planned["planned_peak_bytes"] > 0  # it ran under the memory planner's smallest plan
    assert report["steps"]["kernels"]["result"]["attention_triton_over_sdpa"] is not None
    assert report["steps"]["gpu_tests"]["result"]["counts"]["failed"] == 0
    assert "| variant (640p, 2 steps) |" in (tmp_path / "gpu_check.md").read_text()
