"""Several processes, one video (framepack_engine.runtime.distributed / ulysses): gloo ranks on the CPU.

Each group of ranks runs a list of cases (tests/parallel_worker.py) in one process group, and each case is compared
here with one process doing the same: a whole generation's latents to 1e-5 (bidirectional and F1, cfg 1 and CFG
parallel, TeaCache on, every block streamed, int8 weights), one model call of DiTs whose heads divide by the ranks or not, the shards' balance and the
bytes the all-to-alls and gathers sent against the formula; a rank killed mid-section ends the other with one
clear error. The ranks fork from a forkserver that imported the engine once (a rank's start costs no import).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from framepack_engine.commands.bench_parallel import format_parallel
from framepack_engine.commands.launch import free_port
from framepack_engine.pipeline import Engine
from framepack_engine.errors import FramePackError
from framepack_engine.runtime.distributed import rank_device
from framepack_engine.runtime.ulysses import ShardPlan, padded_heads, volume_per_call
from tests.parallel_worker import run_rank, tiny_engine

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 60.0  # the process group's: no case waits that long for a rank unless one is gone
GENERATION = {"seconds": 2.4, "fps": 30, "steps": 3, "seed": 5}  # two sections of the tiny preset


def run_ranks(world: int, cases: list, tmp_path, timeout: float = TIMEOUT) -> list[dict]:
    """Runs `cases` on `world` ranks; returns each rank's results. Every rank process is joined (none outlives
    the call, none is left a zombie)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.parallel_worker"])

    port = free_port()
    ranks = [context.Process(target=run_rank, args=(rank, world, port, str(tmp_path), cases, timeout))
             for rank in range(world)]
    for process in ranks:
        process.start()
    deadline = time.monotonic() + 240
    for process in ranks:
        process.join(max(deadline - time.monotonic(), 1))
    alive = [process for process in ranks if process.is_alive()]
    for process in alive:
        process.kill()
        process.join()
    assert not alive, "a rank hung"
    assert not multiprocessing.active_children()
    results = []
    for rank, process in enumerate(ranks):
        path = tmp_path / f"rank{rank}.pt"
        results.append({**(torch.load(path, weights_only=False) if path.exists() else {}),
                        "exitcode": process.exitcode})
        assert "crash" not in results[-1], results[-1]["crash"]
    return results


def one_process(variant="bidirectional", **options):
    return Engine.from_preset("tiny", variant=variant).generate("a cat walks", **options)


def assert_close(actual, expected, tolerance=1e-5):
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert error <= tolerance, error


def check_dit_case(result, world: int, heads: int):
    assert_close(result["split"], result["whole"])
    # Equal shards; the padding (< one token per rank) sits at the end, so real counts fall off only there.
    plan = ShardPlan(result["tokens"], world)
    assert plan.padding < world and result["real"] == sorted(result["real"], reverse=True)
    assert sum(result["real"]) == result["tokens"] and max(result["real"]) - min(result["real"]) <= plan.padding
    expected = volume_per_call(result["tokens"], heads, 16, result["blocks"], world, element_size=4, batch=2)
    assert result["sent"] == expected


def test_mapped_tiles_decode_as_the_plain_loop():
    """The VAE's temporal tiles handed to map_tiles (as several ranks share them) blend to the plain decode."""
    from framepack_engine.models.presets import tiny_vae

    vae = tiny_vae(torch.Generator().manual_seed(0))
    latents = torch.randn(1, 16, 10, 8, 8, generator=torch.Generator().manual_seed(1))
    seen = []

    def map_tiles(run, tiles):
        seen.append(len(tiles))
        return [run(tile) for tile in reversed(tiles)][::-1]  # any order of work, the same outputs

    with torch.no_grad():
        plain = vae.decode(latents, tiling="official")
        mapped = vae.decode(latents, tiling="official", map_tiles=map_tiles)
    assert seen and seen[0] > 1 and torch.equal(plain, mapped)


def test_shard_plan_is_balanced():
    for tokens in (1, 7, 84, 85, 18_531):
        for ranks in (1, 2, 3, 4, 8, 24):
            plan = ShardPlan(tokens, ranks)
            counts = [plan.real_tokens(rank) for rank in range(ranks)]
            assert sum(counts) == tokens and plan.padded == plan.shard * ranks
            assert plan.padding < ranks and all(plan.shard - count <= plan.padding for count in counts)
    assert padded_heads(24, 5) == 25 and padded_heads(24, 8) == 24 and padded_heads(2, 4) == 4


def test_each_rank_takes_its_own_gpu(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert rank_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert rank_device("cuda") == torch.device("cuda", 3)
    with pytest.raises(FramePackError, match="would put every rank on one GPU"):
        rank_device("cuda:1")


def test_volume_formula_at_the_real_size():
    # The real model (24 heads of 128, 60 blocks) in bf16 on 8 ranks, 18 531 tokens (a shard of 2317, 5 padding).
    volume = volume_per_call(18_531, 24, 128, 60, 8, element_size=2)
    shard = 2317  # ceil(18531 / 8)
    assert volume["all_to_all"] == 60 * 4 * shard * 24 * 128 * 2 * 7 // 8
    assert volume["all_gather"] == 7 * shard * 3072 * 2


def test_two_ranks_equal_one_process(tmp_path):
    cases = [
        ("bidirectional", "generation", dict(GENERATION)),
        ("f1_cfg_parallel", "generation", dict(GENERATION, variant="f1", cfg=3.0)),
        ("teacache", "generation", dict(GENERATION, steps=5, cache="teacache", cache_threshold=0.3)),
        ("streamed", "generation", dict(GENERATION, stream_every_block=True)),
        ("int8", "generation", dict(GENERATION, quantize="int8")),
        ("official_decode", "generation", dict(GENERATION, vae_decode="official")),
        ("dit_heads_4", "dit", {"heads": 4}),
        ("dit_heads_3", "dit", {"heads": 3}),
        ("bench", "bench", {"preset": "tiny", "device": "cpu", "resolution": 128, "steps": 2, "warmup": 1}),
        ("killed", "generation", dict(GENERATION, kill_rank=1)),
    ]
    ranks = run_ranks(2, cases, tmp_path)
    expected = {"bidirectional": one_process(**GENERATION),
                "f1_cfg_parallel": one_process("f1", **dict(GENERATION, cfg=3.0)),
                "teacache": one_process(**dict(GENERATION, steps=5, cache="teacache", cache_threshold=0.3))}
    expected["streamed"] = expected["bidirectional"]  # every block streamed per rank: the resident result
    expected["int8"] = tiny_engine(quantize="int8").generate("a cat walks", **GENERATION)  # quantized per rank
    expected["official_decode"] = one_process(**dict(GENERATION, vae_decode="official"))
    rank0, rank1 = ranks
    for name, video in expected.items():
        for rank in ranks:
            assert_close(rank[name]["latents"], video.latents)
        assert torch.equal(rank0[name]["pixels"], torch.from_numpy(video.frames))
        if name != "official_decode":  # rank 0 alone decodes an exact decode
            assert rank1[name]["frames"] == 0
    # The official decode's temporal tiles are shared: each rank decoded some, both blended the same frames.
    assert torch.equal(rank1["official_decode"]["pixels"], rank0["official_decode"]["pixels"])
    assert rank0["official_decode"]["sent"]["vae_tiles"] > 0 and rank1["official_decode"]["sent"]["vae_tiles"] > 0
    assert rank0["official_decode"]["parallel"]["vae_tiles"] == "shared"
    assert rank0["bidirectional"]["parallel"] == {"world_size": 2, "ulysses": 2, "ring": 1, "cfg": 1,
                                                  "backend": "gloo"}
    steps = 2 * GENERATION["steps"]
    assert rank0["streamed"]["streamed_passes"] == rank1["streamed"]["streamed_passes"] == steps
    assert rank0["f1_cfg_parallel"]["parallel"]["cfg"] == 2 and rank0["f1_cfg_parallel"]["parallel"]["ulysses"] == 1
    # CFG parallel: each step swaps one velocity (1, 16, 9, 8, 8) float32 with the twin, nothing else.
    assert rank0["f1_cfg_parallel"]["sent"] == {"cfg": steps * 16 * 9 * 8 * 8 * 4}
    # TeaCache skipped steps, the same ones on both ranks, as one process skips them.
    skipped = expected["teacache"].stats["cache_steps_skipped"]
    assert skipped > 0 and rank0["teacache"]["stats"]["cache_steps_skipped"] == skipped
    assert rank1["teacache"]["stats"]["cache_steps_skipped"] == skipped
    # Every computed step's all-to-alls and gather match the formula at the section's token count.
    computed = rank0["bidirectional"]["sent"]
    tokens = computed_tokens()
    per_call = volume_per_call(tokens, 2, 16, 2, 2, element_size=4)
    assert computed == {kind: steps * volume for kind, volume in per_call.items()}
    check_dit_case(rank0["dit_heads_4"], 2, 4)
    check_dit_case(rank0["dit_heads_3"], 2, 3)
    # framepack bench --nproc: every rank's time per step, and the bytes it counted equal to the formula.
    bench = rank0["bench"]
    assert len(bench["rank_seconds_per_step"]) == 2 and all(seconds > 0 for seconds in bench["rank_seconds_per_step"])
    assert bench["bytes_match_formula"] == {"all_to_all": True, "all_gather": True}
    assert bench["bytes_per_step"]["all_to_all"] == bench["formula_bytes_per_step"]["all_to_all"] > 0
    assert bench["speedup"] > 0 and "speedup" in format_parallel(bench)
    # The killed rank: the other stops at its next collective with one line naming what failed, long before the
    # timeout (gloo sees the closed connection at once).
    assert "killed" not in rank1 and rank1["exitcode"] == -signal.SIGKILL and rank0["exitcode"] == 0
    assert rank0["killed"]["error"].startswith("rank 0: an ") and "another rank died" in rank0["killed"]["error"]
    assert "\n" not in rank0["killed"]["error"] and rank0["killed"]["seconds"] < TIMEOUT


def test_a_hung_rank_ends_every_rank_within_the_timeout(tmp_path):
    timeout = 4.0
    rank0, rank1 = run_ranks(2, [("hung", "generation", dict(GENERATION, steps=2, hang_rank=1))], tmp_path, timeout)
    # Rank 0 waits for the hung rank no longer than the timeout; the hung one, once it wakes, finds the group gone.
    waited = rank0["hung"]["failed_at"] - rank1["hung"]["hung_at"]
    assert timeout - 1 <= waited < timeout + 5, waited
    assert f"did not answer within {timeout:g} s" in rank0["hung"]["error"] and "\n" not in rank0["hung"]["error"]
    assert rank1["hung"]["error"].startswith("rank 1: an ") and rank0["exitcode"] == rank1["exitcode"] == 0


def computed_tokens() -> int:
    """The tiny preset's packed tokens per section at its default size: latent and condition tokens."""
    engine = Engine.from_preset("tiny")
    seen = {}
    original = engine.transformer.run_blocks

    def record(tokens):
        seen["tokens"] = tokens.image.shape[1] + tokens.text.shape[1]
        return original(tokens)

    engine.transformer.run_blocks = record
    engine.generate("a cat walks", **dict(GENERATION, seconds=1.2, steps=1))
    return seen["tokens"]


def test_four_ranks_equal_one_process(tmp_path):
    """Four ranks: the tiny preset's 2 heads padded to 4 (cfg 1), and Ulysses 2 x CFG 2 (cfg > 1)."""
    cases = [("bidirectional", "generation", dict(GENERATION)),
             ("cfg_parallel", "generation", dict(GENERATION, cfg=2.0)),
             ("dit_heads_4", "dit", {"heads": 4})]
    ranks = run_ranks(4, cases, tmp_path)
    expected = {"bidirectional": one_process(**GENERATION), "cfg_parallel": one_process(**dict(GENERATION, cfg=2.0))}
    for name, video in expected.items():
        for rank in ranks:
            assert_close(rank[name]["latents"], video.latents)
    assert ranks[0]["bidirectional"]["parallel"]["ulysses"] == 4
    assert ranks[0]["cfg_parallel"]["parallel"] == {"world_size": 4, "ulysses": 2, "ring": 1, "cfg": 2,
                                                   "backend": "gloo"}
    check_dit_case(ranks[0]["dit_heads_4"], 4, 4)


def test_command_under_torchrun_and_nproc(tmp_path):
    """The issue's done-when: torchrun's two ranks, --nproc 2 and one process write the same latents."""
    from safetensors.torch import load_file

    from framepack_engine.commands.main import main

    command = ["generate", "a cat", "--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--seconds", "1",
               "--steps", "2", "--quiet"]
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                               "--no-python", "framepack", *command, "--out", str(tmp_path / "torchrun.safetensors")],
                              env=environment, capture_output=True, text=True, timeout=240)
    assert torchrun.returncode == 0, torchrun.stderr[-2000:]
    nproc = subprocess.run([sys.executable, "-m", "framepack_engine.commands.main", *command, "--nproc", "2",
                            "--out", str(tmp_path / "nproc.safetensors")],
                           env=environment, capture_output=True, text=True, timeout=240)
    assert nproc.returncode == 0, nproc.stderr[-2000:]
    assert nproc.stdout.count("Saved") == 1 and nproc.stdout.count("random weights") == 1  # rank 0 speaks alone
    assert main([*command, "--out", str(tmp_path / "one.safetensors")]) == 0
    one = load_file(tmp_path / "one.safetensors")
    for name in ("torchrun", "nproc"):
        several = load_file(tmp_path / f"{name}.safetensors")
        assert_close(several["latents"], one["latents"])
        assert torch.equal(several["frames"], one["frames"])


def children(pid: int) -> list[int]:
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_nproc_ends_every_rank_when_one_is_killed(tmp_path):
    """--nproc's launcher: a rank killed before the group forms leaves rank 0 waiting no longer than the timeout;
    the command exits with rank 0's status, one line says which rank was killed, and no rank process remains."""
    launcher = subprocess.Popen(
        [sys.executable, "-m", "framepack_engine.commands.main", "generate", "a cat", "--preset", "tiny", "--device",
         "cpu", "--quiet", "--nproc", "2", "--parallel-timeout", "5", "--out", str(tmp_path / "a.safetensors")],
        env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while len(ranks := children(launcher.pid)) < 2 and launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    _, stderr = launcher.communicate(timeout=120)
    assert launcher.returncode == 1, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert "error: rank 1 was killed by SIGKILL; the other ranks stopped." in lines
    assert any(line.startswith("error: rank 0: could not join the process group") for line in lines), stderr
    assert not any(Path(f"/proc/{rank}").exists() for rank in ranks) and not (tmp_path / "a.safetensors").exists()


def test_nproc_is_checked_before_anything_starts(capsys):
    from framepack_engine.commands.main import main

    assert main(["generate", "a cat", "--preset", "tiny", "--nproc", "0", "--out", "x.mp4"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --nproc must be a number of processes from 1 to 1024, got 0: "
                                               "e.g. --nproc 2 for two GPUs.")
    assert main(["generate", "a cat", "--preset", "tiny", "--parallel-timeout", "-1", "--out", "x.mp4"]) == 2
    assert "--parallel-timeout must be a positive number of seconds" in capsys.readouterr().err
    assert main(["generate", "--batch", "jobs.jsonl", "--preset", "tiny", "--nproc", "2"]) == 2
    assert capsys.readouterr().err.startswith("error: --batch runs its jobs in one process")
