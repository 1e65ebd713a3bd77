"""How far each Triton kernel has been verified, per GPU architecture. Plain data: no Triton import.

Two levels, kept apart because only the first has happened so far:
- compiled: tests/test_kernel_resources.py compiles every config the kernel's launcher or autotuner keeps at the
  model's shapes for the architecture (bench/kernel_resources.py, no GPU needed) and asserts that it fits the
  architecture's shared memory, spills no register and (half-precision matmuls) uses tensor cores;
- run: the kernels ran on a GPU of that architecture, matched their references (the tests marked `gpu`) and were
  timed (bench/RESULTS.md). Add an architecture here only with its RESULTS.md entry.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

KERNELS = ("packed_attention", "rotate", "layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate",
           "rms_norm_rotary", "patch_embed", "pooled_rope")

COMPILED_ARCHITECTURES = ("sm_80", "sm_90")
RUN_ARCHITECTURES: tuple[str, ...] = ()

# Architectures where a recorded GPU run shows packed_attention at least as fast as SDPA at the model's shapes:
# only there may attention="auto" choose the Triton kernel (framepack_engine.runtime.attention.resolve_backend).
ATTENTION_MATCHES_SDPA: tuple[str, ...] = ()


def attention_record_path() -> Path:
    """Where `python -m bench.gpu_check` records this machine's measured attention (FRAMEPACK_KERNEL_RECORD, else
    the user's cache folder): a GPU run here counts for attention="auto" before it is committed to this file."""
    if os.environ.get("FRAMEPACK_KERNEL_RECORD"):
        return Path(os.environ["FRAMEPACK_KERNEL_RECORD"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "framepack" / "kernel_record.json"


def attention_matches_sdpa() -> tuple[str, ...]:
    """The architectures where packed_attention is at least as fast as SDPA: the committed ones and those this
    machine's recorded GPU check measured (a record that cannot be read counts for nothing)."""
    try:
        record = json.loads(attention_record_path().read_text())
        measured = tuple(architecture for architecture, entry in record.get("attention", {}).items()
                         if entry.get("triton_over_sdpa", 0) >= 1.0)
    except (OSError, ValueError, AttributeError, TypeError):
        measured = ()
    return tuple(dict.fromkeys(ATTENTION_MATCHES_SDPA + measured))


def architecture_name(major: int, minor: int) -> str:
    return f"sm_{major}{minor}"


def verification_lines(architecture: str | None = None) -> list[str]:
    """What `framepack info` prints about the kernels; `architecture` ("sm_90") is this machine's GPU, if any."""
    run = ", ".join(RUN_ARCHITECTURES) or "none yet"
    lines = [f"Triton kernels ({', '.join(KERNELS)}): compile-checked for {', '.join(COMPILED_ARCHITECTURES)} "
             f"(fit shared memory, no spills); run and timed on a GPU: {run}"]
    if architecture is not None:
        status = ("run on this architecture" if architecture in RUN_ARCHITECTURES
                  else "compile-checked, not yet run on this architecture" if architecture in COMPILED_ARCHITECTURES
                  else "neither compile-checked nor run on this architecture")
        lines.append(f"  this GPU ({architecture}): {status}")
    return lines
