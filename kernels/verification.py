"""How far each Triton kernel has been verified, per GPU architecture. Plain data: no Triton import.

Two levels, kept apart because only the first has happened so far:
- compiled: tests/test_kernel_resources.py compiles every config the kernel's launcher or autotuner keeps at the
  model's shapes for the architecture (bench/kernel_resources.py, no GPU needed) and asserts that it fits the
  architecture's shared memory, spills no register and (half-precision matmuls) uses tensor cores;
- run: the kernels ran on a GPU of that architecture, matched their references (the tests marked `gpu`) and were
  timed (bench/RESULTS.md). Add an architecture here only with its RESULTS.md entry.
"""

from __future__ import annotations

KERNELS = ("packed_attention", "rotate", "layer_norm_modulate", "gated_residual", "gated_residual_layer_norm_modulate",
           "rms_norm_rotary", "patch_embed", "pooled_rope")

COMPILED_ARCHITECTURES = ("sm_80", "sm_90")
RUN_ARCHITECTURES: tuple[str, ...] = ()

# Architectures where a recorded GPU run shows packed_attention at least as fast as SDPA at the model's shapes:
# only there may attention="auto" choose the Triton kernel (framepack_engine.runtime.attention.resolve_backend).
ATTENTION_MATCHES_SDPA: tuple[str, ...] = ()


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
