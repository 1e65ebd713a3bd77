"""The cost per frame of what runs after generation, at FramePack's 640 bucket (640x608): RIFE interpolation x2
(the full IFNet of RIFE 4.25/4.26, random weights) and upscaling (Real-ESRGAN's x4plus and x2plus layouts: spandrel's
RRDBNet, 64 filters, 23 blocks, random weights), beside the DiT's cost per frame.

    python -m bench.bench_postprocess                     # RIFE on 3 frames, ESRGAN x2 and x4 on a crop
    python -m bench.bench_postprocess --crop 1 --json postprocess.json

Times are wall seconds on this machine in float32; FLOPs are counted by torch's FlopCounterMode on the same calls.
ESRGAN is fully convolutional, so by default it runs on a centred crop of a 1/--crop side and its time is scaled by
the area (and by the tiles' overlap the engine's 1 GiB tile bound gives at full size: the cost that the crop does
not see); --crop 1 runs whole frames. The DiT's FLOPs per frame come from framepack_engine.models.flops (25 steps,
window 9: 36 new frames per section) and its time per frame is estimated at the rate the CPU reached on ESRGAN's
convolutions (the 13B DiT cannot run whole on this machine in a reasonable time).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

HEIGHT, WIDTH = 608, 640
STEPS, WINDOW = 25, 9


def timed(function, *args):
    """(result, wall seconds, CPU seconds of this process: every thread's, so at most threads x wall)."""
    started, cpu = time.perf_counter(), time.process_time()
    result = function(*args)
    return result, time.perf_counter() - started, time.process_time() - cpu


def flops(function, *args) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        function(*args)
    return counter.get_total_flops()


def frames(count: int, seed: int = 0) -> np.ndarray:
    """Smooth random frames that move a little (no scene cut), uint8 (T, H, W, 3)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.rand(1, 3, HEIGHT // 8, WIDTH // 8, generator=generator)
    made = [torch.nn.functional.interpolate(base.roll(index, dims=-1), size=(HEIGHT, WIDTH), mode="bilinear")
            for index in range(count)]
    return (torch.cat(made) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def bench_rife(count: int) -> dict:
    from framepack_engine.media.interpolation import interpolate_frames
    from framepack_engine.models.rife import IFNet, RIFE

    torch.manual_seed(0)
    rife = RIFE(IFNet())
    video = frames(count)
    interpolate_frames(rife, video[:2], 2)  # warm-up
    made, seconds, cpu = timed(interpolate_frames, rife, video, 2)
    first, second = (torch.from_numpy(video[i]).permute(2, 0, 1)[None].float() / 255 for i in (0, 1))
    per_pair = flops(rife.frames_between, first, second, torch.tensor([0.5]))
    inserted = len(made) - count
    return {"model": "RIFE IFNet 4.25/4.26 layout (random weights)", "frames_in": count, "frames_out": len(made),
            "seconds": seconds, "seconds_per_inserted_frame": seconds / inserted,
            "cpu_seconds_per_inserted_frame": cpu / inserted,
            "seconds_per_output_frame": seconds / len(made), "gflop_per_inserted_frame": per_pair / 1e9,
            "batch_pairs": max(1, (1 << 30) // rife.bytes_per_pair(HEIGHT, WIDTH))}


def bench_esrgan(scale: int, crop: int) -> dict:
    from tests.oracles import import_oracle

    import_oracle("spandrel")
    from spandrel.architectures.ESRGAN import ESRGAN

    from framepack_engine.media.upscaling import OVERLAP, _spans, tile_size, upscale_frames
    from framepack_engine.models.upscaler import Upscaler

    import spandrel

    torch.manual_seed(0)
    # Real-ESRGAN's x4plus layout, and its x2plus one: pixel-unshuffled by 2 first, the body at a quarter of the pixels
    net = (ESRGAN(in_nc=3, out_nc=3, num_filters=64, num_blocks=23, scale=4) if scale == 4 else
           ESRGAN(in_nc=12, out_nc=3, num_filters=64, num_blocks=23, scale=4, shuffle_factor=2))
    upscaler = Upscaler(spandrel.ModelLoader().load_from_state_dict(net.state_dict()).eval(), f"esrgan_x{scale}")
    height, width = HEIGHT // crop, WIDTH // crop
    top, left = (HEIGHT - height) // 2, (WIDTH - width) // 2
    frame = frames(1)[:, top:top + height, left:left + width]
    upscale_frames(upscaler, frame[:, :32, :32])  # warm-up
    made, seconds, cpu = timed(upscale_frames, upscaler, frame, max(height, width))  # the crop whole, no tiles
    image = torch.from_numpy(frame[0]).permute(2, 0, 1)[None].float() / 255
    counted = flops(upscaler, image)
    # the tiles the engine cuts a whole frame into under its default bound, and the pixels they compute
    tile = tile_size(upscaler)
    core = max(1, tile - 2 * OVERLAP)
    computed = sum((ty1 - ty0) * (tx1 - tx0) for _, _, ty0, ty1 in _spans(HEIGHT, core, OVERLAP)
                   for _, _, tx0, tx1 in _spans(WIDTH, core, OVERLAP)) if max(HEIGHT, WIDTH) > tile else HEIGHT * WIDTH
    area = HEIGHT * WIDTH / (height * width)
    overlap = computed / (HEIGHT * WIDTH)
    assert upscaler.scale == scale
    return {"model": f"Real-ESRGAN x{scale}plus layout (spandrel's RRDBNet, 64 filters, 23 blocks, random weights)",
            "measured_on": f"{width}x{height}", "output": f"{WIDTH * scale}x{HEIGHT * scale}",
            "seconds_measured": seconds, "tile": tile, "tile_overlap_factor": overlap,
            "seconds_per_frame": seconds * area * overlap, "cpu_seconds_per_frame": cpu * area * overlap,
            "gflop_per_frame": counted * area * overlap / 1e9,
            "gflop_per_second": counted / seconds / 1e9}


def dit_per_frame() -> dict:
    """The full DiT's FLOPs per output frame at 640x608 (latents 80x76): 25 steps of one section make 36 frames."""
    from framepack_engine.models.flops import section_packed_sequence, step_flops
    from framepack_engine.models.presets import FULL_DIT_CONFIG
    from framepack_engine.official import PROMPT_TOKEN_LIMIT, SIGLIP_IMAGE_TOKENS

    sequence = section_packed_sequence(FULL_DIT_CONFIG, WINDOW, HEIGHT // 8, WIDTH // 8, PROMPT_TOKEN_LIMIT,
                                       SIGLIP_IMAGE_TOKENS)
    per_step = step_flops(FULL_DIT_CONFIG, sequence).total
    return {"tflop_per_step": per_step / 1e12, "tflop_per_frame": per_step * STEPS / (4 * WINDOW) / 1e12}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=3, help="frames RIFE interpolates (default 3: 2 inserted)")
    parser.add_argument("--crop", type=int, default=2, help="ESRGAN runs on 1/CROP of each side (default 2)")
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args()
    results = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}", "size": f"{WIDTH}x{HEIGHT}", "rife_x2": bench_rife(args.frames)}
    for scale in (2, 4):
        results[f"esrgan_x{scale}"] = bench_esrgan(scale, args.crop)
    results["dit"] = dit_per_frame()
    rate = results["esrgan_x4"]["gflop_per_second"]
    results["dit"]["estimated_seconds_per_frame"] = results["dit"]["tflop_per_frame"] * 1e3 / rate
    results["load_average_after"] = os.getloadavg()  # other work on the machine inflates wall times, not CPU times
    print(json.dumps(results, indent=2))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)


if __name__ == "__main__":
    main()
