"""The Triton kernels fit real GPUs: every config kept on sm_80 and sm_90 at the model's shapes, compiled ahead of
time here (bench/kernel_resources.py, no GPU), fits shared memory, spills nothing and runs its matmuls on tensor cores.

The report compiles in a fresh process: these tests run the kernels under TRITON_INTERPRET=1, and the report needs
the compiled kernels. Its Triton cache is a temporary folder, so nothing carries over between runs.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import kernel_resources
from framepack_kernels import verification

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = {"sm_80": 80, "sm_90": 90}
# A config the attention pruning drops on sm_80 because it spills (bench/RESULTS.md, the --all sweep).
SPILLING_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3}

CHECK_SPILLING_CONFIG = f"""
import json, sys, triton
from bench import kernel_resources as report
report._prepare_environment()
launch = next(l for l in report.capture_launches(report.REAL)
              if l.kernel == "packed_attention" and "HAS_VALID_LENGTHS=False" in l.variant)
config = triton.Config({{"BLOCK_M": {SPILLING_CONFIG['BLOCK_M']}, "BLOCK_N": {SPILLING_CONFIG['BLOCK_N']}}},
                       num_warps={SPILLING_CONFIG['num_warps']}, num_stages={SPILLING_CONFIG['num_stages']})
row = report._row((launch, config, report.ARCHITECTURES[80], False))
print(json.dumps(report.asdict(row)))
"""


def _compile_env(cache):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(cache), PYTHONPATH=str(ROOT))
    return env


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report's JSON for the kept configs at the real shapes on sm_80 and sm_90, compiled from scratch."""
    folder = tmp_path_factory.mktemp("kernel-resources")
    out = folder / "report.json"
    result = subprocess.run(
        [sys.executable, "-m", "bench.kernel_resources", "--arch", "80,90", "--shapes", "real", "--quiet",
         "--jobs", str(min(2, os.cpu_count() or 1)), "--json", str(out)],
        cwd=ROOT, env=_compile_env(folder / "triton-cache"), capture_output=True, text=True, timeout=1200)
    assert out.exists(), result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text()), result


def test_every_kept_config_fits(report):
    data, result = report
    rows = [row for row in data["rows"] if row["kept"]]
    failures = [f"{r['kernel']} {r['arch']} [{r['variant']}] {r['config']}: {'; '.join(kernel_resources.problems(r))}"
                for r in rows if kernel_resources.problems(r)]
    assert not failures, "\n".join(failures)
    assert result.returncode == 0, result.stdout[-3000:]


def test_report_covers_every_kernel_on_each_checked_architecture(report):
    data, _ = report
    covered = {(row["kernel"], row["arch"]) for row in data["rows"] if row["kept"]}
    assert set(verification.COMPILED_ARCHITECTURES) == set(ARCHITECTURES)
    assert covered == {(k, a) for k in verification.KERNELS for a in verification.COMPILED_ARCHITECTURES}


def test_matmul_kernels_use_each_architectures_tensor_cores(report):
    data, _ = report
    for row in data["rows"]:
        if row["kernel"] in ("packed_attention", "patch_embed"):
            assert row["tensor_core"] == {"sm_80": "mma", "sm_90": "wgmma"}[row["arch"]], row


def test_attention_shared_memory_estimate_bounds_the_compiled_kernel(report):
    # Other architectures (sm_86/89: 99 KB) are pruned by the estimate alone: it must never undercount.
    import triton

    from framepack_kernels import attention

    data, _ = report
    rows = [r for r in data["rows"] if r["kernel"] == "packed_attention"]
    assert rows
    for row in rows:
        fields = dict(item.split("=") for item in row["config"].split())
        config = triton.Config({"BLOCK_M": int(fields["BLOCK_M"]), "BLOCK_N": int(fields["BLOCK_N"])},
                               num_warps=int(fields["warps"]), num_stages=int(fields["stages"]))
        assert row["shared_bytes"] <= attention._shared_memory_estimate(config, 128, 2), row


def test_the_report_sees_a_spilling_config(tmp_path):
    # The assertions above can fail: a config the pruning drops for spilling is reported as spilling.
    result = subprocess.run([sys.executable, "-c", CHECK_SPILLING_CONFIG], cwd=ROOT,
                            env=_compile_env(tmp_path / "triton-cache"), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["spill_bytes"] > 0 and row["registers"] == 255
    assert any("spills" in problem for problem in kernel_resources.problems(row))


PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_packed_attention_kernel' for 'sm_90a'
ptxas info    : Function properties for _packed_attention_kernel
    24 bytes stack frame, 24 bytes spill stores, 20 bytes spill loads
ptxas info    : Used 254 registers, used 1 barriers, 24 bytes cumulative stack size
"""


def test_ptxas_log_parsing():
    assert kernel_resources.parse_ptxas_log(PTXAS_LOG) == {"registers": 254, "spill_stores": 24, "spill_loads": 20}
    with pytest.raises(ValueError, match="registers"):
        kernel_resources.parse_ptxas_log("ptxas info    : 0 bytes gmem")


def test_problems_name_each_misfit():
    row = dict(kernel="k", shapes="real", variant="", arch="sm_80", config="", registers=100, spill_bytes=0,
               shared_bytes=1000, tensor_core="mma", kept=True, max_shared_bytes=2000, needs_tensor_cores=True,
               error=None)
    assert kernel_resources.problems(row) == []
    assert "spills 8 B" in kernel_resources.problems({**row, "spill_bytes": 8})[0]
    assert "shared memory" in kernel_resources.problems({**row, "shared_bytes": 3000})[0]
    assert "tensor cores" in kernel_resources.problems({**row, "tensor_core": "none"})[0]
    assert kernel_resources.problems({**row, "tensor_core": "none", "needs_tensor_cores": False}) == []
    assert "does not compile" in kernel_resources.problems({**row, "error": "boom"})[0]
