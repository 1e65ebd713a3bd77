"""`framepack generate --one-frame`: one image instead of a video (framepack_engine.generation.one_frame).

The request is resolved and checked like any other before the model loads; the image is written once, atomically,
when its one section is done (framepack_engine.media.still), so an interruption leaves either nothing or the whole
image, and says which (exit 130 / 143, as the finishing protocol of framepack_engine.commands.common).
"""

from __future__ import annotations

import sys
from pathlib import Path

from framepack_engine.commands.common import Signals


def generate_still(models, request, out: Path, overwrite: bool, signals: Signals, quiet: bool = False,
                   nproc: int | None = None) -> int:
    from framepack_engine.errors import FramePackError
    from framepack_engine.media.still import StillOutputFile, check_still_output
    from framepack_engine.pipeline import Engine
    from framepack_engine.runtime.distributed import launched_ranks

    if (nproc or 1) > 1 or launched_ranks() > 1:  # several ranks would each write the same image
        raise FramePackError("--one-frame runs in one process (its one small section is not split over ranks): "
                             "leave --nproc and torchrun out.")
    check_still_output(out, overwrite)
    try:
        engine = Engine.from_resolved(models, request)
    except KeyboardInterrupt:
        print("\nInterrupted while loading the model: nothing was written.", file=sys.stderr)
        return signals.status
    output, bar = StillOutputFile(out), None
    if request.settings.upscale is not None:  # the upscaler runs on the image (framepack_engine.media.postprocess)
        output.set_postprocess(engine.postprocess(request.settings))

    def step(info: dict) -> None:
        nonlocal bar
        if quiet:
            return
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=info["total_steps"], desc="one frame", unit="step")
        bar.update(1)

    try:
        for result in engine.stream(request=request, callback=step):
            with signals.deferred():  # the image is written whole, or not at all
                output.add(result)
    except KeyboardInterrupt:
        pass  # signals.received says which
    finally:
        if bar is not None:
            bar.close()
    if signals.interrupted:
        print(f"\nInterrupted: {output.on_disk()}.", file=sys.stderr)
        return signals.status
    print(f"Saved {output.published}")
    return 0
