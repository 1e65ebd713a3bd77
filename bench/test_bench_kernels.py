"""CPU variant of the kernel benchmarks for pytest-benchmark, at tiny shapes (the kernels run in Triton's interpreter).

    python -m pytest bench/test_bench_kernels.py --benchmark-enable

Not part of the CI test path (tests/); tests/ smoke-runs the same cases. Numbers here measure the interpreter and
eager PyTorch on CPU, not GPU performance: use `python -m bench.bench_kernels` on a GPU for those.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

from bench.bench_kernels import CASES, TINY


@pytest.mark.parametrize("implementation", ["eager", "triton"])
@pytest.mark.parametrize("op", sorted(name for name in CASES if name != "attention_padded"))
def test_kernel_speed(benchmark, op, implementation):
    torch.manual_seed(0)
    case = CASES[op](TINY, torch.device("cpu"), torch.float32)
    fn = case.implementations.get(implementation)
    if fn is None:
        pytest.skip(case.skipped.get(implementation, f"{op} has no {implementation} implementation"))
    benchmark.group = op
    with torch.no_grad():
        benchmark(fn)
