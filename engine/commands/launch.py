"""`--nproc N`: the command run as N ranks on this machine, as `torchrun --nproc-per-node N --no-python framepack
...` would start it (the same environment: RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), without torchrun's banners and tracebacks.

The ranks run in a session of their own, so a terminal's Ctrl-C reaches this launcher alone, and it hands every
signal it gets to every rank once (rank 0 then finishes its file as the finishing protocol says). A rank that fails
makes the others' next collective fail (at once when it died, after the process group's timeout when it hangs);
whatever still runs a grace period after that is terminated, then killed, so no rank outlives the command.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

# After the first rank fails, how long the others get to end by themselves beyond the process group's timeout.
GRACE_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rank_environment(rank: int, nproc: int, port: int) -> dict[str, str]:
    environment = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc),
                       LOCAL_WORLD_SIZE=str(nproc), GROUP_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if "OMP_NUM_THREADS" not in os.environ:  # the cores shared out, as torchrun would leave them oversubscribed
        environment["OMP_NUM_THREADS"] = str(max((os.cpu_count() or 1) // nproc, 1))
    return environment


def _describe(rank: int, status: int) -> str:
    if status < 0:
        return f"rank {rank} was killed by {signal.Signals(-status).name}"
    return f"rank {rank} exited with status {status}"


def spawn_ranks(argv: list[str], nproc: int, timeout: float, signals) -> int:
    """Runs `framepack ARGV` as `nproc` ranks and waits for all of them; returns rank 0's status, or the first
    failing rank's when rank 0 succeeded. `signals`: the command's Signals (framepack_engine.commands.common)."""
    port = free_port()
    command = [sys.executable, "-m", "framepack_engine.commands.main", *argv]
    ranks = [subprocess.Popen(command, env=rank_environment(rank, nproc, port), start_new_session=True)
             for rank in range(nproc)]
    forwarded, failed_at, first_failure = 0, None, None
    terminated = killed = False
    while True:
        try:
            with signals.deferred():  # signals are noted, and forwarded below
                time.sleep(0.1)
        except KeyboardInterrupt:
            pass
        while forwarded < len(signals.received):
            for process in ranks:
                if process.poll() is None:
                    process.send_signal(signals.received[forwarded])
            forwarded += 1
        statuses = [process.poll() for process in ranks]
        if all(status is not None for status in statuses):
            break
        for rank, status in enumerate(statuses):
            if status not in (None, 0) and first_failure is None:
                first_failure, failed_at = rank, time.monotonic()
        if failed_at is not None:
            waited = time.monotonic() - failed_at
            if waited > timeout + GRACE_SECONDS and not terminated:
                terminated = True
                for process in ranks:
                    if process.poll() is None:
                        process.terminate()
            if waited > timeout + 2 * GRACE_SECONDS and not killed:
                killed = True
                for process in ranks:
                    if process.poll() is None:
                        process.kill()
    statuses = [process.returncode for process in ranks]
    if first_failure is not None and statuses[first_failure] < 0:  # a killed rank prints nothing itself
        print(f"error: {_describe(first_failure, statuses[first_failure])}; the other ranks stopped.",
              file=sys.stderr)
    if statuses[0] != 0:
        return statuses[0] if statuses[0] > 0 else 128 - statuses[0]
    failing = next((status for status in statuses if status != 0), 0)
    return failing if failing >= 0 else 128 - failing


__all__ = ["free_port", "rank_environment", "spawn_ranks"]
