"""The output path: SectionVideoWriter against one encode of the final frames, and its memory over video length.

    python -m bench.bench_writer                                   # 10, 60 and 120 s at 640x608, 30 fps, libx264
    python -m bench.bench_writer --seconds 60 --direction forward --json writer.json
    python -m bench.bench_writer --engine                          # the tiny preset end to end at 256 px

Frames are synthetic (moving gradients with grain, so they compress like real video rather than like a flat
colour), handed over as the engine does: a first section of 4 * window + 1 frames, then 4 * window each, window 9.
Every measurement runs in a fresh process, so peak RSS (getrusage) belongs to that run alone.

  * writer: every section through `SectionVideoWriter` (each encoded once on the background thread, the file
    rejoined by remuxing); wall time from the first section handed over to `close()`. --pace section (default)
    waits for the writer after each section, as the engine's slower sampling does, so every section is joined
    into the file; --pace burst hands sections over as fast as the writer takes them.
  * one encode: the same frames through one encoder into one file, generated on the fly (the floor: no joins).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

WINDOW = 9


def section_lengths(seconds: float, fps: float) -> list[int]:
    sections = max(round(seconds * fps / (4 * WINDOW)), 1)
    return [4 * WINDOW + 1] + [4 * WINDOW] * (sections - 1)


class FrameSource:
    """Frame t of a moving gradient with fixed grain; cheap to make, so it barely shows in the timings."""

    def __init__(self, height: int, width: int):
        generator = np.random.default_rng(0)
        y, x = np.mgrid[0:height, 0:width]
        self.base = np.stack([x * 255 // width, y * 255 // height, (x + y) * 255 // (width + height)], -1)
        self.base = (self.base + generator.integers(0, 24, self.base.shape)).clip(0, 255).astype(np.uint8)

    def frames(self, start: int, count: int) -> np.ndarray:
        return np.stack([np.roll(self.base, (3 * t, 5 * t), axis=(0, 1)) for t in range(start, start + count)])


def run_writer(args) -> dict:
    import framepack_engine.media.video as video

    joining = [0.0]
    publish = video._VideoSink.publish

    def timed_publish(self):
        started = time.perf_counter()
        publish(self)
        joining[0] += time.perf_counter() - started

    video._VideoSink.publish = timed_publish
    source = FrameSource(args.height, args.width)
    lengths = section_lengths(args.seconds, args.fps)
    starts = np.cumsum([0] + lengths)[:-1]
    order = range(len(lengths)) if args.direction == "forward" else reversed(range(len(lengths)))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"out{args.suffix}"
        started = time.perf_counter()
        with video.SectionVideoWriter(path, args.fps, codec=args.codec, direction=args.direction) as writer:
            for index in order:
                writer.write_segment(source.frames(int(starts[index]), lengths[index]))
                if args.pace == "section":
                    writer.flush()  # as when sampling a section takes longer than encoding one: every section joined
        seconds = time.perf_counter() - started
        size = path.stat().st_size
    return {"frames": sum(lengths), "sections": len(lengths), "seconds": seconds, "joining_seconds": joining[0],
            "bytes": size}


def run_one_encode(args) -> dict:
    import av

    from framepack_engine.media.codecs import encoder_settings, open_video_stream

    source = FrameSource(args.height, args.width)
    lengths = section_lengths(args.seconds, args.fps)
    settings = encoder_settings(f"x{args.suffix}", args.codec)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"out{args.suffix}"
        started = time.perf_counter()
        with av.open(str(path), mode="w", format=settings.container) as container:
            stream = open_video_stream(container, settings, args.fps, args.width, args.height)
            start = 0
            for length in lengths:
                for frame in source.frames(start, length):
                    container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
                start += length
            container.mux(stream.encode())
        seconds = time.perf_counter() - started
        size = path.stat().st_size
    return {"frames": sum(lengths), "sections": len(lengths), "seconds": seconds, "bytes": size}


def run_engine(args) -> dict:
    """The tiny preset end to end: Engine.stream's sections through SectionOutputFile, as `framepack generate`
    writes them (wall time and peak RSS of the generation). Each handover is also saved to disk, and after the
    generation, outside its measured peak, replayed through the writer alone (flushing after every section, so each
    is joined into the file) and compared with one encode of the final frames: while the engine samples, the writer's
    thread shares the cores with torch, so only the replay separates the encoding's own cost (wall and CPU)."""
    import framepack_engine.media.video as video
    from framepack_engine import Engine
    from framepack_engine.media.output import SectionOutputFile

    variant = "f1" if args.direction == "forward" else "bidirectional"
    engine = Engine.from_preset("tiny", variant=variant)
    engine.notice = None
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        path = folder / f"out{args.suffix}"
        handovers, direction = [], "forward"
        started = time.perf_counter()
        output = SectionOutputFile(path, args.fps, codec=args.codec)
        sections = 0
        for result in engine.stream("a cat walks", seconds=args.seconds, fps=args.fps, steps=1,
                                    resolution=args.resolution):
            output.add(result)
            direction = result.direction
            if len(result.frames):
                handovers.append(folder / f"handover_{len(handovers):05d}.npy")
                np.save(handovers[-1], video.as_uint8_frames(result.frames))
            sections += 1
        if len(output.last.pending_frames):
            handovers.append(folder / f"handover_{len(handovers):05d}.npy")
            np.save(handovers[-1], video.as_uint8_frames(output.last.pending_frames))
        output.close()
        seconds = time.perf_counter() - started
        peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        frames = _decode(path)

        replayed = folder / f"replay{args.suffix}"
        cpu, started = _cpu_seconds(), time.perf_counter()
        with video.SectionVideoWriter(replayed, args.fps, codec=args.codec, direction=direction) as writer:
            for handover in handovers:
                writer.write_segment(np.load(handover))
                writer.flush()
        writer_seconds, writer_cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        if not np.array_equal(_decode(replayed), frames):
            raise RuntimeError("the replayed handovers do not make the generated video")

        one_encode = folder / f"one{args.suffix}"
        cpu, started = _cpu_seconds(), time.perf_counter()
        video.encode_video(frames, one_encode, args.fps, codec=args.codec)
        one_encode_seconds, one_encode_cpu = time.perf_counter() - started, _cpu_seconds() - cpu
    return {"frames": len(frames), "sections": sections, "seconds": seconds, "peak_rss_mib_generation": peak_rss_mib,
            "writer_seconds": writer_seconds, "writer_cpu_seconds": writer_cpu,
            "one_encode_seconds": one_encode_seconds, "one_encode_cpu_seconds": one_encode_cpu,
            "height": int(frames.shape[1]), "width": int(frames.shape[2])}


def _cpu_seconds() -> float:
    """CPU time of the whole process, the encoder's own threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _decode(path) -> np.ndarray:
    import av

    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def child(args) -> int:
    import torch  # noqa: F401  (the engine's process always holds torch: both modes pay its memory)

    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_before = usage.ru_utime + usage.ru_stime
    result = {"writer": run_writer, "one-encode": run_one_encode, "engine": run_engine}[args.mode](args)
    result["cpu_before"] = cpu_before
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["peak_rss_mib"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime - result.pop("cpu_before")
    print(json.dumps(result))
    return 0


def measure(args, mode: str, seconds: float) -> dict:
    command = [sys.executable, "-m", "bench.bench_writer", "--child", mode, "--seconds", str(seconds),
               "--fps", str(args.fps), "--width", str(args.width), "--height", str(args.height),
               "--direction", args.direction, "--pace", args.pace, "--suffix", args.suffix,
               "--resolution", str(args.resolution)] + (["--codec", args.codec] if args.codec else [])
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_writer", description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", default="10,60,120", help="video lengths (comma-separated)")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=608)
    parser.add_argument("--suffix", default=".mp4")
    parser.add_argument("--codec", default=None, help="default: the container's")
    parser.add_argument("--direction", default="backward", choices=("forward", "backward"))
    parser.add_argument("--pace", default="section", choices=("section", "burst"))
    parser.add_argument("--compare-at", type=float, default=60.0,
                        help="length at which the writer is compared with one encode")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--engine", action="store_true",
                        help="the tiny preset end to end (Engine.stream -> SectionOutputFile) instead of synthetic "
                             "frames; compares the writer's encode time with one encode of the final frames")
    parser.add_argument("--resolution", type=int, default=256, help="with --engine: the bucket resolution (256: frames of a real video's kind at a tiny model's speed)")
    parser.add_argument("--child", choices=("writer", "one-encode", "engine"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.mode, args.seconds = args.child, float(args.seconds)
        return child(args)

    results = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "settings": vars(args),
               "runs": []}
    lengths = [float(s) for s in args.seconds.split(",")]
    if args.engine:
        for seconds in lengths:
            result = {"mode": "engine", "video_seconds": seconds, **measure(args, "engine", seconds)}
            results["runs"].append(result)
            print(f"engine {seconds:6.0f} s video: {result['frames']:5d} frames ({result['height']}x"
                  f"{result['width']}) in {result['sections']:3d} sections, generated in {result['seconds']:6.1f} s, "
                  f"peak RSS {result['peak_rss_mib_generation']:.0f} MiB; writer {result['writer_seconds']:.2f} s "
                  f"(CPU {result['writer_cpu_seconds']:.2f} s) vs one encode of the final frames "
                  f"{result['one_encode_seconds']:.2f} s (CPU {result['one_encode_cpu_seconds']:.2f} s): "
                  f"{result['writer_seconds'] / result['one_encode_seconds']:.2f}x wall, "
                  f"{result['writer_cpu_seconds'] / result['one_encode_cpu_seconds']:.2f}x CPU", flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    for seconds in lengths:
        modes = ["writer"] + (["one-encode"] if seconds == args.compare_at else [])
        for mode in modes:
            result = {"mode": mode, "video_seconds": seconds, **measure(args, mode, seconds)}
            results["runs"].append(result)
            print(f"{mode:10s} {seconds:6.0f} s video: {result['frames']:5d} frames in {result['sections']:3d} "
                  f"sections, {result['seconds']:7.1f} s ({result['frames'] / result['seconds']:5.1f} frames/s)"
                  + (f", joining {result['joining_seconds']:.1f} s" if "joining_seconds" in result else "")
                  + f", CPU {result['cpu_seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB, "
                  f"{result['bytes'] / 2**20:.1f} MiB file",
                  flush=True)
    pair = {r["mode"]: r for r in results["runs"] if r["video_seconds"] == args.compare_at}
    if len(pair) == 2:
        for measure_name in ("seconds", "cpu_seconds"):
            ratio = pair["writer"][measure_name] / pair["one-encode"][measure_name]
            results[f"writer_to_one_encode_{measure_name}"] = ratio
            print(f"writer / one encode at {args.compare_at:.0f} s, {measure_name.replace('_', ' ')}: {ratio:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
