"""Launch settings and device checks shared by the kernels."""

import pytest
import torch

from kernels.launch import interpreting, require_kernel_device, row_launch_settings


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
