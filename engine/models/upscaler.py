"""Image upscalers (ESRGAN, Real-ESRGAN, SwinIR, ... ) through spandrel, which recognises the architecture from the
weights: the optional extra `pip install "framepack-engine[upscale]"`, imported only when an upscaler is loaded.

Weights are read by us, never unpickled freely: `.safetensors`, or a `.pth` read with `torch.load(weights_only=True)`.
The tiling that keeps an upscale inside a memory bound is framepack_engine.media.upscaling's.
"""

from __future__ import annotations

from pathlib import Path

import torch

from framepack_engine.errors import FramePackError

SUFFIXES = (".safetensors", ".pth")
INSTALL = 'pip install "framepack-engine[upscale]" (spandrel)'


def check_upscaler_path(path) -> Path:
    """An existing .safetensors or .pth file (checked before any model loads)."""
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise FramePackError(f"The upscaler {path.name!r} is not a .safetensors or .pth file: give the model's weights "
                             "file (e.g. RealESRGAN_x2plus.pth).")
    if not path.is_file():
        raise FramePackError(f"The upscaler {path.name!r} does not exist: give the path of its weights file "
                             "(e.g. RealESRGAN_x2plus.pth from Real-ESRGAN's releases).")
    return path


def import_spandrel():
    """spandrel, or one line saying how to install it (or why it cannot be imported)."""
    try:
        import spandrel
    except ModuleNotFoundError as error:
        if error.name != "spandrel":  # spandrel is there, a package it imports is not
            raise FramePackError(f"spandrel cannot be imported: it needs {error.name!r}, which is missing: "
                                 f"{INSTALL}.") from None
        raise FramePackError(f"Upscaling needs spandrel, which is not installed: {INSTALL}.") from None
    except Exception as error:  # e.g. a torchvision build that does not match torch (pytorch/vision#9085)
        raise FramePackError(f"spandrel cannot be imported ({type(error).__name__}: {error}): install the torchvision "
                             "build that matches your torch (the same index as torch).") from None
    return spandrel


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a .pth pickle read with weights_only=True (tensors and plain
    containers only: no code runs)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FramePackError(f"Cannot read the upscaler {path.name!r} ({type(error).__name__}): give an upscaler's "
                             ".safetensors or .pth file.") from None


class Upscaler:
    """A spandrel image model: `__call__` takes (B, 3, h, w) in [0, 1] and gives (B, 3, h·scale, w·scale)."""

    def __init__(self, descriptor, name: str):
        self.descriptor, self.name = descriptor, name
        self.scale: int = descriptor.scale
        self.multiple_of: int = descriptor.size_requirements.multiple_of
        self.architecture: str = descriptor.architecture.name

    @property
    def device(self) -> torch.device:
        return self.descriptor.device

    @property
    def dtype(self) -> torch.dtype:
        return self.descriptor.dtype

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.descriptor(images.to(self.device, self.dtype)).float()

    def bytes_per_pixel(self) -> int:
        """A generous estimate of the activation bytes per input pixel (to size tiles): ESRGAN-like models keep a
        few hundred channels at the input size and scale² times 64 at the output size."""
        size = torch.empty((), dtype=self.dtype).element_size()
        return size * (4 * 256 + 2 * 64 * self.scale ** 2)

    def describe(self) -> dict:
        return {"name": self.name, "architecture": self.architecture, "scale": self.scale}


def load_upscaler(path, device="cpu", dtype: torch.dtype | None = None) -> Upscaler:
    """An upscaler from its weights (spandrel detects the architecture), on `device` in `dtype` (default: float16
    on CUDA where the model supports it, float32 elsewhere)."""
    path = check_upscaler_path(path)
    spandrel = import_spandrel()
    state = read_weights(path)
    for name, tensor in state.items() if isinstance(state, dict) else ():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise FramePackError(f"The upscaler {path.name!r} holds NaN or infinite values in {name}: download it "
                                 "again.")
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(spandrel.canonicalize_state_dict(state))
    except spandrel.UnsupportedModelError:
        raise FramePackError(f"spandrel does not recognise the model in {path.name!r}: use an upscaler it supports "
                             "(ESRGAN, Real-ESRGAN, SwinIR, ...; see spandrel's list).") from None
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.input_channels != 3 \
            or descriptor.output_channels != 3:
        raise FramePackError(f"{path.name!r} is a {descriptor.architecture.name} model, not an RGB image upscaler: "
                             "give an upscaler (ESRGAN, Real-ESRGAN, SwinIR, ...).")
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" and descriptor.supports_half else torch.float32
    return Upscaler(descriptor.to(device).to(dtype).eval(), path.name)
