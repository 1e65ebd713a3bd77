"""attention="auto" never picks a kernel that has not been measured on the GPU at hand; `framepack info` says so."""

import dataclasses

import pytest
import torch

from framepack_engine.runtime import attention
from framepack_kernels import verification


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA GPU of a chosen compute capability is present (no kernel runs in these tests)."""
    capability = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability["value"])

    def use(major, minor):
        capability["value"] = (major, minor)

    return use


def test_auto_skips_our_kernel_until_a_recorded_run_matches_sdpa(gpu):
    assert verification.ATTENTION_MATCHES_SDPA == ()  # no GPU run recorded in bench/RESULTS.md yet
    for capability in ((8, 0), (8, 9), (9, 0)):
        gpu(*capability)
        assert "triton" in attention.available_backends("cuda")
        assert attention.resolve_backend("auto", "cuda").name != "triton"
    # Asked for by name, it is still there.
    assert attention.resolve_backend("triton", "cuda").name == "triton"


def test_auto_picks_our_kernel_only_on_measured_architectures(gpu, monkeypatch):
    measured = dataclasses.replace(attention._BACKENDS["triton"], auto_architectures=("sm_90",))
    monkeypatch.setitem(attention._BACKENDS, "triton", measured)
    gpu(9, 0)
    assert attention.resolve_backend("auto", "cuda").name == "triton"
    gpu(8, 0)
    assert attention.resolve_backend("auto", "cuda").name != "triton"
    # Libraries validated by their makers stay eligible everywhere.
    library = dataclasses.replace(attention._BACKENDS["sdpa"], name="library", auto_priority=50, needs_cuda=True)
    monkeypatch.setitem(attention._BACKENDS, "library", library)
    assert attention.resolve_backend("auto", "cuda").name == "library"


def test_auto_on_cpu_is_sdpa():
    assert attention.resolve_backend("auto", "cpu").name == "sdpa"


def test_gpu_architecture_names(gpu):
    gpu(8, 6)
    assert attention.gpu_architecture("cuda") == "sm_86"
    assert attention.gpu_architecture("cpu") is None


@pytest.mark.parametrize("capability,status", [((9, 0), "compile-checked, not yet run"),
                                               ((8, 0), "compile-checked, not yet run"),
                                               ((8, 9), "neither compile-checked nor run")])
def test_info_says_where_kernels_are_verified(gpu, capability, status):
    gpu(*capability)
    text = "\n".join(attention.kernel_verification_lines("cuda"))
    assert "compile-checked for sm_80, sm_90" in text and "run and timed on a GPU: none yet" in text
    assert f"this GPU (sm_{capability[0]}{capability[1]}): {status}" in text
    assert "matches SDPA: none yet" in text
    assert all(kernel in text for kernel in verification.KERNELS)


def test_info_without_a_gpu():
    lines = attention.kernel_verification_lines("cpu")
    assert not any("this GPU" in line for line in lines)


def test_a_recorded_gpu_check_counts_for_auto_attention(tmp_path, monkeypatch):
    """bench/gpu_check records the measured attention ratio per architecture; only a ratio of at least 1 (the
    Triton kernel as fast as SDPA) lets attention="auto" choose it there; an unreadable record counts for nothing."""
    import json

    from framepack_kernels import verification

    record = tmp_path / "kernel_record.json"
    monkeypatch.setenv("FRAMEPACK_KERNEL_RECORD", str(record))
    assert verification.attention_matches_sdpa() == verification.ATTENTION_MATCHES_SDPA
    record.write_text(json.dumps({"attention": {"sm_90": {"triton_over_sdpa": 1.07},
                                                "sm_80": {"triton_over_sdpa": 0.85}}}))
    assert verification.attention_matches_sdpa() == (*verification.ATTENTION_MATCHES_SDPA, "sm_90")
    record.write_text("{not json")
    assert verification.attention_matches_sdpa() == verification.ATTENTION_MATCHES_SDPA
