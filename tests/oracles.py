"""Importing the interpolation and upscaling oracles (ccvfi, spandrel), which are test dependencies only.

Both declare a dependency on torchvision but use it only elsewhere (ccvfi in its image-file helpers, spandrel for
its LaMa and RestoreFormer architectures), and they are installed with --no-deps (.ci/run, constraints.txt): PyPI's
torchvision wheels are CUDA builds that cannot import beside the CPU torch CI runs (pytorch/vision#9085), and an
installed but broken torchvision breaks transformers' image processors for every other test. Where no torchvision is
installed, the oracles get a placeholder module for the names they import, each raising when called; none of the
code under test (ccvfi's IFNet, spandrel's ESRGAN and its loader) calls them. A real torchvision is used when present.
"""

import importlib.machinery
import importlib.util
import sys
import types


def _placeholder(*args, **kwargs):
    raise RuntimeError("torchvision is not installed here (tests/oracles.py gave the oracles a placeholder)")


def _module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    return module


def _torchvision_placeholder() -> dict[str, types.ModuleType]:
    torchvision, transforms, functional = (_module(name) for name in (
        "torchvision", "torchvision.transforms", "torchvision.transforms.functional"))
    torchvision.transforms, transforms.functional = transforms, functional
    transforms.ToTensor = _placeholder
    functional.rotate = functional.normalize = _placeholder
    functional.InterpolationMode = type("InterpolationMode", (), {})
    return {module.__name__: module for module in (torchvision, transforms, functional)}


def import_oracle(name: str):
    """The oracle package `name` (ccvfi or spandrel), imported with the placeholder torchvision when none is
    installed; the placeholder is gone from sys.modules afterwards (only the oracle's modules keep it)."""
    if name in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module(name)
    placeholder = _torchvision_placeholder()
    sys.modules.update(placeholder)
    try:
        return importlib.import_module(name)
    finally:
        for module in placeholder:
            sys.modules.pop(module, None)
