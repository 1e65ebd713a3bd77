"""FramePack inference engine: the packed HunyuanVideo DiT, its VAE, conditioning, samplers and section loops.

The public surfaces live here: `Engine`, `FramePackDiT`, `HunyuanVideoVAE`, `FramePackError` and the samplers
(`framepack_engine.sampling`). The package is grouped in wings, each importing only the ones below it:
commands > serve > (this root: Engine, settings, resolve, errors, official facts) > generation > models > media >
runtime > framepack_kernels.
"""

import importlib

from framepack_engine.errors import BackendUnavailableError, FramePackError, ModelSourceError

__all__ = ["Engine", "FramePackDiT", "HunyuanVideoVAE", "FramePackError", "BackendUnavailableError",
           "ModelSourceError"]
__version__ = "0.1.0"

# Loaded on first use, so `import framepack_engine.models.dit` does not pull in the Engine and everything under it.
_LAZY = {
    "Engine": ("framepack_engine.pipeline", "Engine"),
    "FramePackDiT": ("framepack_engine.models.dit", "FramePackDiT"),
    "HunyuanVideoVAE": ("framepack_engine.models.vae", "HunyuanVideoVAE"),
    "load_rife": ("framepack_engine.models.rife", "load_rife"),
    "load_upscaler": ("framepack_engine.models.upscaler", "load_upscaler"),
}


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'framepack_engine' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    return getattr(importlib.import_module(module_name), attribute)
