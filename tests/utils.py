"""Shared numerics helpers for the tests: one definition of relative error and a report naming the worst element."""

import torch

# Tolerances of the project: float32 parity at 1e-5 relative, half precision at 1e-2.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference divided by the largest magnitude of the expected tensor."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual - expected).abs().max() / scale).item()


def assert_relative_error(actual, expected, tolerance, name="output"):
    error = relative_error(actual, expected)
    if not error <= tolerance:
        difference = (actual.detach().double() - expected.detach().double()).abs()
        worst = torch.unravel_index(difference.argmax(), difference.shape)
        worst = tuple(int(i) for i in worst)
        raise AssertionError(
            f"{name}: relative error {error:.3e} > {tolerance:.1e}; worst at index {worst}: "
            f"actual {actual[worst].item():.6g} vs expected {expected[worst].item():.6g}"
        )
    return error
