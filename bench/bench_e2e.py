"""The end-to-end DiT benchmark as a script: the same runner and options as `framepack bench`.

    python -m bench.bench_e2e --preset tiny --resolution 64 --steps 2            # seconds, any machine
    python -m bench.bench_e2e --json results.json                                # the full 13B model on a GPU

See bench/README.md for what is measured and how results are recorded.
"""

from __future__ import annotations

import argparse
import sys

from framepack_engine.commands.bench import add_bench_arguments, command_bench
from framepack_engine.errors import FramePackError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bench_e2e", description="Time FramePack's DiT with random weights.")
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return command_bench(args)
    except FramePackError as error:
        print(f"error: {error.for_command_line()}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
