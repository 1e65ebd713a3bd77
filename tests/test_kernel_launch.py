"""Launch settings and device checks shared by the kernels."""

import pytest
import torch

from framepack_kernels.launch import interpreting, require_kernel_device, row_launch_settings


@pytest.mark.parametrize("columns,block,warps", [(1, 1, 4), (100, 128, 4), (3072, 4096, 8), (12288, 16384, 16),
                                                 (40000, 65536, 32)])
def test_row_launch_settings_cover_the_row_with_a_power_of_two(columns, block, warps):
    assert row_launch_settings(columns) == (block, warps)


def test_rows_too_long_for_one_program_are_refused():
    with pytest.raises(ValueError, match="too long"):
        row_launch_settings(70000)


def test_device_checks(monkeypatch):
    assert interpreting()  # the test suite runs the kernels in the interpreter
    require_kernel_device("op", torch.ones(2), None)
    with pytest.raises(ValueError, match="one device"):
        require_kernel_device("op", torch.ones(2), torch.ones(2, device="meta"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        require_kernel_device("op", torch.ones(2))


def test_rope_launch_tables_broadcast_one_row_and_stand_in_when_unused():
    from framepack_kernels.launch import rope_launch_tables

    cos, sin = torch.randn(1, 5, 8, dtype=torch.float64), torch.randn(1, 5, 8, dtype=torch.float64)
    out_cos, out_sin, batch_stride, token_stride = rope_launch_tables(cos, sin, True, torch.ones(1))
    assert out_cos.dtype == torch.float32 and (batch_stride, token_stride) == (0, 8)
    torch.testing.assert_close(out_sin, sin.float())
    per_sample = torch.randn(3, 5, 8)
    assert rope_launch_tables(per_sample, per_sample, True, torch.ones(1))[2] == 40
    placeholder = torch.ones(1)
    assert rope_launch_tables(None, None, False, placeholder) == (placeholder, placeholder, 0, 0)
