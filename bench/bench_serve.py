"""`framepack serve` under a burst: N jobs queued at once on the tiny preset, none lost, memory flat, the overhead
per job against the same jobs through the Python API in one process.

    python -m bench.bench_serve                 # 100 jobs
    python -m bench.bench_serve --jobs 20 --json serve.json

The server runs as a subprocess on a free loopback port (127.0.0.1 only) with a temporary state directory. Both
sides run torch on one thread (OMP_NUM_THREADS=1): the tiny preset's tensors are too small to share between threads.
The server's resident memory is read from /proc (Linux) when 10 jobs and when all jobs are done.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"  # before torch is imported, here and in the server it starts

REPO = Path(__file__).resolve().parents[1]
JOB = {"steps": 1, "latent_window_size": 1, "fps": 8, "seconds": 0.5}  # one section, 5 frames of 64 x 64


def memory_mib(pid: int) -> dict[str, float]:
    """Resident and peak resident memory of a process, MiB (from /proc/PID/status)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            fields[name] = int(value.split()[0]) / 1024
    return {"rss_mib": fields["VmRSS"], "peak_rss_mib": fields["VmHWM"]}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (from /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_server_side(jobs: int, state_dir: Path) -> dict:
    import av
    import httpx

    port = free_port()
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = open(state_dir.parent / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "framepack_engine.commands.main", "serve", "--preset", "tiny", "--port", str(port),
                               "--state-dir", str(state_dir), "--max-queued", str(jobs)],
                              stdout=log, stderr=subprocess.STDOUT, env=environment)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start:\n{(state_dir.parent / 'server.log').read_text()}")
            try:
                if client.get("/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        memory = {"idle": memory_mib(server.pid)}

        start, cpu_start = time.perf_counter(), cpu_seconds(server.pid)
        with ThreadPoolExecutor(16) as pool:
            submitted = list(pool.map(lambda index: client.post(
                "/v1/jobs", json={"prompt": f"job {index}", "seed": index, **JOB}), range(jobs)))
        submit_seconds = time.perf_counter() - start
        refused = [response.text for response in submitted if response.status_code != 202]
        if refused:
            raise SystemExit(f"{len(refused)} submissions were refused: {refused[0]}")
        ids = [response.json()["id"] for response in submitted]

        while True:
            counts = client.get("/v1/jobs", params={"limit": 1}).json()["counts"]
            finished = counts["done"] + counts["failed"] + counts["cancelled"]
            for mark in range(10, finished + 1, 10):  # the server's memory after every 10 jobs
                memory.setdefault(f"{mark}_done", memory_mib(server.pid))
            if finished >= jobs:
                break
            time.sleep(0.2)  # a light watcher: the client shares this machine with the server
        seconds, cpu = time.perf_counter() - start, cpu_seconds(server.pid) - cpu_start
        memory[f"{jobs}_done"] = memory_mib(server.pid)

        # None lost: every job done, each with its own decodable video of the right length and its own settings.
        listed = {job["id"]: job for job in client.get("/v1/jobs", params={"limit": 1000}).json()["jobs"]}
        lost = [job_id for job_id in ids if listed.get(job_id, {}).get("state") != "done"]
        wrong = []
        for index, job_id in enumerate(ids):
            content = client.get(f"/v1/jobs/{job_id}/video").content
            with av.open(__import__("io").BytesIO(content)) as container:
                frames = sum(1 for _ in container.decode(video=0))
                prompt = json.loads(container.metadata["comment"])["prompt"]
            if frames != 5 or prompt != f"job {index}":
                wrong.append(job_id)
        # Submission order is the order the server received the concurrent submissions in.
        received = sorted(ids, key=lambda job_id: listed[job_id]["submitted_at"])
        order = [listed[job_id]["started_at"] for job_id in received]
        runs = [listed[job_id]["finished_at"] - listed[job_id]["started_at"] for job_id in received]
        gaps = [listed[later]["started_at"] - listed[earlier]["finished_at"]
                for earlier, later in zip(received, received[1:])]
    finally:
        client.close()
        server.terminate()
        server.wait(60)
        log.close()
    return {"jobs": jobs, "seconds": seconds, "seconds_per_job": seconds / jobs, "submit_seconds": submit_seconds,
            "cpu_seconds_per_job": cpu / jobs, "mean_run_seconds": sum(runs) / len(runs),
            "mean_gap_seconds": sum(gaps) / max(len(gaps), 1),
            "lost": len(lost), "wrong_videos": len(wrong), "started_in_submission_order": order == sorted(order),
            "memory": memory}


def run_api_side(jobs: int, folder: Path) -> dict:
    import resource

    from framepack_engine import Engine
    from framepack_engine.media.output import SectionOutputFile

    engine = Engine.from_preset("tiny")
    engine.notice = None
    start, cpu_start = time.perf_counter(), time.process_time()
    for index in range(jobs):
        settings = {"seed": index, **JOB}
        output = SectionOutputFile(folder / f"{index}.mp4", settings["fps"])
        for result in engine.stream(f"job {index}", **settings):
            output.add(result)
        output.close()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"jobs": jobs, "seconds": seconds, "seconds_per_job": seconds / jobs, "cpu_seconds_per_job": cpu / jobs,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        served = run_server_side(args.jobs, Path(folder) / "state")
        direct = run_api_side(args.jobs, Path(folder))
    overhead = served["seconds_per_job"] - direct["seconds_per_job"]
    cpu_overhead = served["cpu_seconds_per_job"] - direct["cpu_seconds_per_job"]
    results = {"server": served, "python_api": direct, "overhead_seconds_per_job": overhead,
               "overhead_cpu_seconds_per_job": cpu_overhead, "load_average": os.getloadavg()}
    print(json.dumps(results, indent=2))
    memory = served["memory"]
    print(f"\n| jobs | lost | server s/job (CPU s) | Python API s/job (CPU s) | overhead s/job (CPU s) | "
          f"server RSS idle / 10 done / {args.jobs} done (peak), MiB |\n|---|---|---|---|---|---|\n"
          f"| {args.jobs} | {served['lost']} | {served['seconds_per_job']:.3f} ({served['cpu_seconds_per_job']:.3f}) | "
          f"{direct['seconds_per_job']:.3f} ({direct['cpu_seconds_per_job']:.3f}) | "
          f"{overhead:+.3f} ({cpu_overhead:+.3f}) | {memory['idle']['rss_mib']:.0f} / "
          f"{memory['10_done']['rss_mib']:.0f} "
          f"({memory['10_done']['peak_rss_mib']:.0f}) / {memory[f'{args.jobs}_done']['rss_mib']:.0f} "
          f"({memory[f'{args.jobs}_done']['peak_rss_mib']:.0f}) |")
    print("server RSS after each 10 jobs, MiB: " + ", ".join(
        f"{name.split('_')[0]}: {value['rss_mib']:.0f}" for name, value in memory.items() if name != "idle"))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if served["lost"] == 0 and served["wrong_videos"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
