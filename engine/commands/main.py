"""The `framepack` command: generate a video, show what this machine offers, benchmark, quantize a checkpoint.

A user mistake prints one line naming the problem and the fix and exits with status 2, never a traceback.
Ctrl-C or SIGTERM stops the work and keeps every finished section: the finishing protocol of
framepack_engine.commands.common (exit 130 / 143, one line saying exactly what the file holds).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from framepack_engine.commands.common import Signals, quiet_libraries
from framepack_engine.errors import FramePackError, FramePackWarning


def add_generate_arguments(parser: argparse.ArgumentParser):
    """The flags of `framepack generate`: the inputs, every GenerationSettings and ModelSettings option (built from
    their fields, so the command and the Python API cannot drift apart), and the output."""
    from framepack_engine.settings import GenerationSettings, ModelSettings, add_flags

    parser.add_argument("prompt_words", nargs="*", metavar="PROMPT", help="the prompt (or use --prompt)")
    parser.add_argument("--image", help="start image (image-to-video); none = text-to-video from a black frame")
    parser.add_argument("--end-image", help="end image (first-last-frame video; bidirectional model only)")
    parser.add_argument("--input-video", help="a video to extend (F1 model only)")
    parser.add_argument("--keyframe", "--keyframes", dest="keyframe", action="append", metavar="SPEC:IMAGE",
                        help="a keyframe image the sections SPEC names start from (N, -N from the end, or S-E; "
                             "bidirectional model); repeat, or join with ';;;' as musubi-tuner's --image_path")
    parser.add_argument("--control-image", "--control-images", dest="control_image", action="append", metavar="IMAGE",
                        help="one-frame: a control image (repeat; its alpha masks it; default: the start image)")
    parser.add_argument("--control-mask", "--control-masks", dest="control_mask", action="append", metavar="IMAGE",
                        help="one-frame: the mask of a control image, in their order (white keeps, black drops)")
    runs = parser.add_argument_group("batches and reproducing")
    runs.add_argument("--batch", metavar="JSONL", help="run every job of a JSON Lines file (one job per line: any "
                      "option by its API name, and image, end_image, input_video, out, codec, crf, pixel_format); "
                      "the flags given here apply to every job a line does not override; the models load once")
    runs.add_argument("--settings-from", metavar="FILE", help="reproduce an output: its recorded options (a video, "
                      "PNG frame or folder, settings.json or .safetensors this command wrote), flags given here "
                      "winning")
    add_flags(parser.add_argument_group("generation"), GenerationSettings)
    models = parser.add_argument_group("model")
    models.add_argument("--preset", choices=["tiny"], help="a random-weight model built in memory (its video is noise)")
    add_flags(models, ModelSettings)
    output = parser.add_argument_group("output")
    output.add_argument("--out", help="output: .mp4/.webm/.mkv/.mov/.avi, .safetensors, or a folder for PNG frames")
    output.add_argument("--overwrite", action="store_true",
                        help="replace an existing --out (only once the first section is written)")
    output.add_argument("--codec", help="video encoder (default: the container's, libx264 or libvpx-vp9 for .webm; "
                                        "see framepack info)")
    output.add_argument("--crf", type=int, help="quality for x264/x265/vp9/av1 (default 16)")
    output.add_argument("--pixel-format", help="e.g. yuv420p (default), yuv444p")
    output.add_argument("--quiet", action="store_true", help="no progress bars or library logs")
    parallel = parser.add_argument_group("several processes (see the README, Several GPUs)")
    parallel.add_argument("--nproc", type=int, help="run as N ranks on this machine, one GPU each (gloo ranks with "
                          "--device cpu), as torchrun --nproc-per-node N --no-python framepack generate ... does")
    parallel.add_argument("--parallel-timeout", type=float, default=600.0, metavar="SECONDS",
                          help="how long a rank waits for the others before every rank stops with an error "
                               "(default 600; it must cover rank 0 decoding and writing a section)")


def _default_out(mode: str, seed: int) -> Path:
    suffix = ".png" if mode == "one_frame" else ".mp4"
    return Path("outputs") / f"framepack_{mode}_{seed}_{time.strftime('%Y%m%d-%H%M%S')}{suffix}"


def command_generate(args) -> int:
    signals = args.signals
    try:
        return _generate(args, signals)
    except KeyboardInterrupt:  # while reading the inputs, before the model loads (signals are deferred now)
        print("\nInterrupted before loading the model: nothing was written.", file=sys.stderr)
        return signals.status


def _generate(args, signals: Signals) -> int:
    from framepack_engine.commands.run import OutputOptions, Progress, options_from_flags, write_video
    from framepack_engine.media.codecs import DEFAULT_CRF
    from framepack_engine.commands.still import generate_still
    from framepack_engine.generation.keyframes import parse_keyframe_flag
    from framepack_engine.media.video import check_output
    from framepack_engine.pipeline import Engine
    from framepack_engine.reproduce import check_recorded_inputs, warn_differences
    from framepack_engine.resolve import resolve_models, resolve_request
    from framepack_engine.settings import GenerationSettings, ModelSettings

    if args.quiet:  # before anything opens an encoder: some read their log level once per process
        quiet_libraries()
    if args.batch:
        from framepack_engine.commands.batch import run_batch

        return run_batch(args, signals)  # it refuses several ranks (every rank would run every job)
    # Everything the user asked for is resolved and checked once, before any model loads.
    generation_options, model_options, preset, recorded = options_from_flags(args)
    output = OutputOptions(args.codec, args.crf, args.pixel_format)
    if recorded is not None:  # the recorded options, the flags given here winning
        check_recorded_inputs(recorded, {"image": args.image, "end_image": args.end_image,
                                         "input_video": args.input_video, "keyframes": args.keyframe,
                                         "control_images": args.control_image, "control_masks": args.control_mask})
        given_output = {name: value for name, value in vars(output).items() if value is not None}
        output = OutputOptions(**{**(recorded.get("output") or {}), **given_output})
    output.crf = DEFAULT_CRF if output.crf is None else output.crf
    settings = GenerationSettings.from_options(**generation_options)
    models = resolve_models(ModelSettings.from_options(**model_options), preset, given=model_options)
    request = resolve_request(settings, models.variant, image=args.image, end_image=args.end_image,
                              input_video=args.input_video, keyframes=parse_keyframe_flag(args.keyframe),
                              control_images=args.control_image, control_masks=args.control_mask,
                              default_resolution=models.default_resolution)
    out = Path(args.out) if args.out else _default_out(request.mode, settings.seed)
    if request.one_frame is not None:  # one image (framepack_engine.generation.one_frame)
        return generate_still(models, request, out, args.overwrite, signals, quiet=args.quiet, nproc=args.nproc)
    height, width = request.size
    check_output(out, output.codec, output.crf, output.pixel_format, overwrite=args.overwrite, width=width,
                 height=height)
    layout, models = _parallel_ranks(args, models)
    if layout == "spawn":  # this process only launches the ranks (each checks everything again, then loads)
        from framepack_engine.commands.launch import spawn_ranks

        return spawn_ranks(args.argv, args.nproc, args.parallel_timeout, signals)

    try:
        engine = Engine.from_resolved(models, request)
    except KeyboardInterrupt:
        print("\nInterrupted while loading the model: nothing was written.", file=sys.stderr)
        return signals.status
    if layout is not None:
        engine.set_parallel(layout)
        if not layout.is_writer:  # rank 0 alone writes; the others run their share of every section
            return _follow(engine, request, signals)
    if recorded is not None:  # one line for each way this run's models or inputs differ from the recorded ones
        warn_differences(recorded, engine.metadata(settings, request.mode, request))

    # The finishing protocol (framepack_engine.commands.common): a signal stops the engine at once, never a
    # section being handed to the writer nor the file being finished; a second one makes the finish keep only what
    # is durable; the last line says exactly what the file holds.
    written = write_video(engine, request, out, output, signals, Progress(enabled=not args.quiet))
    if layout is not None:  # rank 0's share is done: the process group is let go before the last line
        layout.close()
    with signals.deferred():
        if signals.interrupted:
            print(f"\nInterrupted: {written.on_disk}.", file=sys.stderr)
            return signals.status
        if written.failure is not None:
            raise written.failure
        if written.saved is None:
            raise FramePackError("No section finished, so nothing was written.")
        print(f"Saved {written.saved}")
        return 0


def _parallel_ranks(args, models):
    """Several ranks: "spawn" when --nproc asks for them and this process is not one yet; the ParallelLayout (and
    this rank's device) when it is one (started by torchrun or --nproc); else None."""
    import dataclasses

    from framepack_engine.runtime.distributed import init_parallel, launched_ranks, rank_device

    if args.nproc is not None and not 1 <= args.nproc <= 1024:
        raise FramePackError(f"--nproc must be a number of processes from 1 to 1024, got {args.nproc}: "
                             "e.g. --nproc 2 for two GPUs.")
    if not 0 < args.parallel_timeout < float("inf"):
        raise FramePackError(f"--parallel-timeout must be a positive number of seconds, got {args.parallel_timeout}: "
                             "e.g. --parallel-timeout 600.")
    ranks = launched_ranks()
    if ranks == 1:
        if (args.nproc or 1) == 1:
            return None, models
        rank_device(models.device)  # its one-line refusal before any rank starts
        return "spawn", models
    if args.nproc not in (None, ranks):
        raise FramePackError(f"--nproc {args.nproc} but the launcher started {ranks} ranks: give one of them, "
                             "e.g. leave --nproc out under torchrun.")
    models = dataclasses.replace(models, device=rank_device(models.device))
    return init_parallel(models.device, args.parallel_timeout), models


def _follow(engine, request, signals: Signals) -> int:
    """A rank other than 0: the same section loop, its share of every model call, nothing written or printed."""
    import contextlib

    sections = engine.stream(request=request)
    try:
        with contextlib.redirect_stdout(None):  # rank 0 says what there is to say
            for _ in sections:
                if signals.interrupted:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sections.close()
        engine.parallel.close()
    return signals.status if signals.interrupted else 0


def command_info(args) -> int:
    import platform

    import torch

    from framepack_engine import __version__
    from framepack_engine.runtime.attention import BACKEND_NAMES, available_backends, kernel_verification_lines, resolve_backend
    from framepack_engine.media.video import available_codecs
    from framepack_engine.settings import GenerationSettings, ModelSettings

    if args.plan:  # the plan's options through the settings' checks (they name the option), before anything prints
        budget = ModelSettings.from_options(vram_budget_gb=args.vram_budget_gb, memory_margin_gb=args.memory_margin_gb)
        resolution = GenerationSettings.from_options(resolution=args.resolution).resolution
    print(f"framepack-engine {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}")
    for package in ("triton", "transformers", "safetensors", "av", "flash_attn", "sageattention", "xformers"):
        try:
            module = __import__(package)
            print(f"  {package}: {getattr(module, '__version__', 'installed')}")
        except Exception:
            print(f"  {package}: not installed")
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            properties = torch.cuda.get_device_properties(index)
            print(f"device cuda:{index}: {properties.name}, {properties.total_memory / 2**30:.1f} GiB, "
                  f"compute {properties.major}.{properties.minor}, bf16 {torch.cuda.is_bf16_supported()}")
        device = "cuda"
    else:
        print("device: cpu (no CUDA device found)")
        device = "cpu"
    print(f"attention backends usable here: {', '.join(available_backends(device))} "
          f"(auto -> {resolve_backend('auto', device).name}; all: {', '.join(BACKEND_NAMES)})")
    print("\n".join(kernel_verification_lines(device)))
    print(f"video encoders that open here: {', '.join(available_codecs())}")
    if args.plan:
        from framepack_engine.models.footprints import official_plan

        plan, models = official_plan(args.device or device, budget.vram_budget_gb, budget.memory_margin_gb,
                                     resolution)
        print(f"models: {models}")  # plan.lines() starts with the plan's own heading
        print("\n".join(plan.lines()))
    return 0


class _Parser(argparse.ArgumentParser):
    """A wrong flag is one line, as every other mistake is: the error and where the options are listed (argparse
    would print the whole usage block first). Its sub-commands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="framepack", description="FramePack video generation engine")
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate a video")
    add_generate_arguments(generate)
    generate.set_defaults(run=command_generate)
    info = commands.add_parser("info", help="device, attention backends, versions; --plan: the memory plan")
    info.add_argument("--plan", "--verbose", action="store_true",
                      help="the memory plan for the official models: what is where, bytes streamed per step, host RAM")
    info.add_argument("--vram-budget-gb", type=float, help="device memory budget (default: free memory minus margin)")
    info.add_argument("--memory-margin-gb", type=float, default=1.0, help="left free without a budget (default 1)")
    info.add_argument("--resolution", type=int, default=640, help="section size the plan is for (default 640)")
    info.add_argument("--device", help="cuda, cuda:1 or cpu (default: cuda when available)")
    info.set_defaults(run=command_info)
    from framepack_engine.commands.bench import add_bench_command
    from framepack_engine.commands.calibrate_cache import add_calibrate_command
    from framepack_engine.commands.convert_rife import add_convert_rife_command
    from framepack_engine.commands.quantize import add_quantize_command
    from framepack_engine.commands.serve import add_serve_command

    from framepack_engine.commands.bench_parallel import command as bench_command

    add_bench_command(commands).set_defaults(run=bench_command)  # --nproc N: the ranks' benchmark
    add_calibrate_command(commands)
    add_convert_rife_command(commands)
    add_quantize_command(commands)
    add_serve_command(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """Our warnings as one line on stderr (no source line); other libraries' as Python shows them."""
    if issubclass(category, FramePackWarning):  # options named as flags, as in the errors
        text = message.for_command_line() if isinstance(message, FramePackWarning) else message
        print(f"warning: {text}", file=sys.stderr)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv=None) -> int:
    """The `framepack` command; returns its exit status: 0, 2 for a mistake (one line), 130 / 143 when interrupted
    by Ctrl-C / SIGTERM (one line). Signals are handled from the start (the imports included) as the finishing
    protocol says (framepack_engine.commands.common); run as the program (argv None), a signal that comes once the
    command is over is ignored (the process is only exiting), else the caller's handlers are put back."""
    signals = Signals().install()
    started = False
    try:
        warnings.showwarning = _show_warning
        parser = build_parser()  # imports torch and the rest: seconds, in which Ctrl-C is one line too
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # named with the sub-command whose flags were meant
            parser.exit(2, f"error: unrecognized arguments: {' '.join(unknown)} (see framepack {args.command} "
                           "--help)\n")
        args.signals, started = signals, True
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what --nproc starts each rank with
        return args.run(args)
    except FramePackError as error:
        with signals.deferred():
            print(f"error: {error.for_command_line()}", file=sys.stderr)
            # 2 for a mistake; a failure that is no mistake (a rank of several died) says its own status.
            return signals.status if signals.interrupted else getattr(error, "exit_status", 2)
    except KeyboardInterrupt:  # signals are deferred from here on
        print("\nInterrupted." if started else "\nInterrupted before the command started: nothing was done.",
              file=sys.stderr)
        return signals.status
    finally:
        signals.restore(ignore=argv is None)


if __name__ == "__main__":
    sys.exit(main())
