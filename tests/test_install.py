"""What an install gives: our two import names only, PyPI's `kernels` untouched, the libraries importable together,
a wheel that installs and runs, and every bench tool's --help from the repository root.

The source folders engine/ and kernels/ install as `framepack_engine` and `framepack_kernels`; a folder named
`kernels` must never be importable as `kernels`, which transformers 5.x needs to be PyPI's (hub kernels).
Each check runs in a subprocess, so what this test process already imported cannot hide a failure.
"""

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OUR_TOP_LEVEL = {"framepack_engine", "framepack_kernels"}
# The tiny preset at its smallest: one section of two steps.
FAST = ["--preset", "tiny", "--seconds", "1", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--quiet"]

IMPORT_EVERYTHING = """
import sys
from pathlib import Path
repo = Path(sys.argv[1]).resolve()

import kernels
from kernels import CUDAProperties
assert not Path(kernels.__file__).resolve().is_relative_to(repo), f"`kernels` is the repository's: {kernels.__file__}"
import transformers.integrations.hub_kernels
from diffusers import HunyuanVideoFramepackTransformer3DModel
from framepack_engine import Engine, FramePackDiT, HunyuanVideoVAE, FramePackError
from framepack_engine.sampling import flux_sigmas, sample_unipc, sample_euler
import framepack_kernels.reference
print("imports ok")
"""


def run(command, cwd, timeout=300, env=None):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert result.returncode == 0, (f"{command} exited {result.returncode} in {cwd}\n"
                                    f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}")
    return result


@pytest.mark.parametrize("where", ["repository root", "another folder"])
def test_pypi_kernels_transformers_diffusers_and_ours_import_together(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    result = run([sys.executable, "-c", IMPORT_EVERYTHING, str(REPO)], cwd=cwd)
    assert "imports ok" in result.stdout


def copy_of_the_checkout(destination):
    """The source tree as a clean clone has it (no build/, egg-info or caches, whose stale files could reach a wheel)."""
    ignore = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
                                    ".benchmarks", "out", "outputs", "*.mp4", "*.webm", "*.so")
    shutil.copytree(REPO, destination, ignore=ignore)
    return destination


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """A wheel of the checkout, built without build isolation (so without a download: setuptools is installed)."""
    root = tmp_path_factory.mktemp("wheel")
    source = copy_of_the_checkout(root / "source")
    env = {key: value for key, value in os.environ.items() if key != "FRAMEPACK_BUILD_CUDA"}
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
         str(root / "dist"), str(source)], cwd=root, env=env)
    wheels = list((root / "dist").glob("framepack_engine-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


def test_wheel_holds_our_two_import_names_and_every_module(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names}
    dist_info = {name for name in top_level if name.endswith(".dist-info")}
    assert dist_info and all(re.fullmatch(r"framepack_engine-[^/]+\.dist-info", name) for name in dist_info), dist_info
    assert top_level - dist_info == OUR_TOP_LEVEL, top_level
    # Every source module is packaged (pyproject.toml lists the packages one by one).
    for folder, package in (("engine", "framepack_engine"), ("kernels", "framepack_kernels")):
        for path in sorted((REPO / folder).rglob("*.py")):
            packaged = f"{package}/{path.relative_to(REPO / folder).as_posix()}"
            assert packaged in names, f"{path.relative_to(REPO)} is not in the wheel (as {packaged})"
    with zipfile.ZipFile(wheel) as archive:
        entry_points = archive.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert re.search(r"^framepack = framepack_engine\.", entry_points, re.M), entry_points


VENV_CHECK = """
import sys
from pathlib import Path
venv = Path(sys.argv[1]).resolve()

from kernels import CUDAProperties
import kernels
assert "site-packages" in Path(kernels.__file__).parts, kernels.__file__
import transformers.integrations.hub_kernels
import framepack_engine, framepack_engine.pipeline, framepack_engine.commands.main, framepack_engine.sampling
import framepack_kernels.reference
ours = {name: module.__file__ for name, module in sys.modules.items()
        if name.split(".")[0] in ("framepack_engine", "framepack_kernels") and getattr(module, "__file__", None)}
outside = {name: file for name, file in ours.items() if not Path(file).resolve().is_relative_to(venv)}
assert not outside, f"not from the venv's wheel: {outside}"
import torch
print("venv ok", len(ours))
print("torch", torch.__file__)
"""


def see_this_environment(venv):
    """Where these tests run in a venv (tools/update_constraints.sh does), a venv made from it gets the base
    interpreter's site-packages, not this venv's: add this one's behind the new venv's own (a .pth file)."""
    if sys.prefix == sys.base_prefix:
        return
    import site

    (own,) = venv.glob("lib/python*/site-packages")
    lines = [f"import site; site.addsitedir({directory!r})" for directory in site.getsitepackages()]
    (own / "_outer_environment.pth").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_wheel_installs_into_a_venv_and_generates(wheel, tmp_path):
    # --system-site-packages: torch, transformers, kernels... come from this environment without a download. The
    # editable install of the repository is visible there too: the venv's own copy must win.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    see_this_environment(venv)
    run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--ignore-installed", str(wheel)], cwd=tmp_path)

    result = run([str(python), "-c", VENV_CHECK, str(venv)], cwd=tmp_path)
    assert "venv ok" in result.stdout
    import torch   # the venv runs this environment's libraries (a venv made from a venv sees the base's otherwise)
    assert f"torch {torch.__file__}" in result.stdout, result.stdout

    out = tmp_path / "a.mp4"
    run([str(venv / "bin" / "framepack"), "generate", "a cat", *FAST, "--out", str(out)], cwd=tmp_path)
    assert out.is_file() and out.stat().st_size > 0


def bench_tools():
    """bench/*.py files with a `__main__` entry."""
    main_guard = re.compile(r"""^if __name__ == ['"]__main__['"]\s*:""", re.M)
    return sorted(path.stem for path in (REPO / "bench").glob("*.py") if main_guard.search(path.read_text()))


def test_bench_tools_are_found():
    assert "bench_kernels" in bench_tools()


@pytest.mark.parametrize("tool", bench_tools())
def test_bench_tool_help_from_the_repository_root(tool):
    result = run([sys.executable, "-m", f"bench.{tool}", "--help"], cwd=REPO)
    assert "usage" in result.stdout.lower()
