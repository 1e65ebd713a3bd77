"""Attention backends for the packed DiT, chosen by name.

Every backend computes the same thing: joint attention over each sample's packed sequence
`[image tokens | text tokens]`, with the rotary embedding applied to the first `rotary_length` tokens of q and k,
and, when `valid_lengths` is given, keys beyond each sample's valid length masked out (its padded text).
Outputs at padded query positions are unspecified: the model never reads them.

Backends receive q and k *unrotated* so a fused kernel can rotate as it loads its tiles.
Shapes: q, k, v (batch, tokens, heads, head_dim); rope_cos/rope_sin (batch or 1, rotary_length, head_dim), float32.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from framepack_engine.errors import BackendUnavailableError, FramePackError, Option
from framepack_kernels import verification
from framepack_kernels.rotary import rotate_leading_tokens


def key_padding_mask(valid_lengths: torch.Tensor | None, total_length: int, device) -> torch.Tensor | None:
    """(batch, 1, 1, tokens) boolean mask: True where the key is a valid token of that sample."""
    if valid_lengths is None:
        return None
    positions = torch.arange(total_length, device=device)
    return (positions[None, :] < valid_lengths.to(device)[:, None])[:, None, None, :]


def sdpa_attention(q, k, v, rope_cos=None, rope_sin=None, rotary_length=0, valid_lengths=None):
    q = rotate_leading_tokens(q, rope_cos, rope_sin, rotary_length)
    k = rotate_leading_tokens(k, rope_cos, rope_sin, rotary_length)
    mask = key_padding_mask(valid_lengths, k.shape[1], q.device)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    function: Callable
    is_available: Callable[[], bool]
    install_hint: str
    # Higher wins when "auto" chooses among the backends available for the device.
    auto_priority: int = 0
    needs_cuda: bool = False
    # The GPU architectures ("sm_90") where "auto" may choose it; None: wherever it is available. Libraries
    # validated by their makers on every GPU they support take None; our kernel only where it has been measured
    # (a function: the committed architectures and this machine's recorded GPU check, read when "auto" resolves).
    auto_architectures: tuple[str, ...] | Callable[[], tuple[str, ...]] | None = None

    def allowed_on(self, architecture: str | None) -> bool:
        allowed = self.auto_architectures() if callable(self.auto_architectures) else self.auto_architectures
        return allowed is None or architecture in allowed


_BACKENDS: dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> None:
    _BACKENDS[backend.name] = backend


def _module_present(name: str) -> Callable[[], bool]:
    return lambda: importlib.util.find_spec(name) is not None


register_backend(AttentionBackend("sdpa", sdpa_attention, lambda: True, "", auto_priority=0))


def _lazy(module: str, attribute: str) -> Callable:
    def call(*args, **kwargs):
        return getattr(importlib.import_module(module), attribute)(*args, **kwargs)

    return call


# The fast backends live in their own modules and are imported only when used.
register_backend(AttentionBackend(
    "triton", _lazy("framepack_engine.runtime.attention_backends", "triton_attention"), _module_present("triton"),
    "pip install triton", auto_priority=10, needs_cuda=True,
    auto_architectures=verification.attention_matches_sdpa))
register_backend(AttentionBackend(
    "flash", _lazy("framepack_engine.runtime.attention_backends", "flash_attention"), _module_present("flash_attn"),
    "pip install flash-attn --no-build-isolation (or: pip install 'framepack-engine[flash]')",
    auto_priority=30, needs_cuda=True))
register_backend(AttentionBackend(
    "sage", _lazy("framepack_engine.runtime.attention_backends", "sage_attention"), _module_present("sageattention"),
    "pip install sageattention (or: pip install 'framepack-engine[sage]')", auto_priority=20, needs_cuda=True))
register_backend(AttentionBackend(
    "xformers", _lazy("framepack_engine.runtime.attention_backends", "xformers_attention"), _module_present("xformers"),
    "pip install xformers (or: pip install 'framepack-engine[xformers]')", auto_priority=5, needs_cuda=True))

BACKEND_NAMES = ("sdpa", "triton", "flash", "xformers", "sage", "auto")


def available_backends(device: torch.device | str | None = None) -> list[str]:
    on_cuda = torch.device(device).type == "cuda" if device is not None else torch.cuda.is_available()
    return [b.name for b in _BACKENDS.values() if b.is_available() and (on_cuda or not b.needs_cuda)]


def gpu_architecture(device: torch.device | str | None = None) -> str | None:
    """"sm_90" and the like for a CUDA device (the current one when None); None without CUDA."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        return None
    return verification.architecture_name(*torch.cuda.get_device_capability(device))


def resolve_backend(name: str, device: torch.device | str | None = None) -> AttentionBackend:
    """The backend for `name`; "auto" picks the highest-priority one usable on `device`.

    "auto" never picks a backend on an architecture it has not been measured on: our Triton kernel only where a
    recorded GPU run (bench/RESULTS.md) shows it at least matching SDPA (framepack_kernels.verification), so a first GPU run
    uses flash-attn, SageAttention, xFormers or SDPA. attention="triton" always chooses it.
    """
    if name == "auto":
        architecture = gpu_architecture(device)
        usable = [_BACKENDS[n] for n in available_backends(device)]
        usable = [b for b in usable if b.allowed_on(architecture)]
        return max(usable, key=lambda b: b.auto_priority)
    if name not in _BACKENDS:
        raise FramePackError(f"Unknown attention backend {name!r}: choose one of {', '.join(BACKEND_NAMES)}.")
    backend = _BACKENDS[name]
    if not backend.is_available():
        raise BackendUnavailableError(
            f"Attention backend {name!r} is not installed: {backend.install_hint}, or use ", Option("attention", "sdpa"),
            ".")
    return backend


def kernel_verification_lines(device: torch.device | str | None = None) -> list[str]:
    """For `framepack info`: which kernels are verified on which architectures, and what "auto" picks here."""
    architecture = gpu_architecture(device)
    lines = verification.verification_lines(architecture)
    measured = ", ".join(verification.attention_matches_sdpa()) or "none yet"
    lines.append(f"  auto attention uses the Triton kernel only where a recorded run matches SDPA: {measured}")
    return lines
