"""FramePack inference engine: the packed HunyuanVideo DiT, its VAE, conditioning, samplers and section loops."""

from engine.errors import BackendUnavailableError, FramePackError, ModelSourceError

__all__ = ["Engine", "FramePackError", "BackendUnavailableError", "ModelSourceError"]
__version__ = "0.1.0"


def __getattr__(name):
    # The Engine pulls in every module; import it only when asked for so `import engine.dit` stays light.
    if name == "Engine":
        from engine.pipeline import Engine

        return Engine
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
