"""`framepack generate --batch FILE`: every job of a JSON Lines file, with the models loaded once.

Each line is one job: a JSON object with any generation option under its API name (prompt, seconds, seed,
section_prompts, ...), the inputs image, end_image and input_video (paths, relative to the current folder) and
keyframes ({SPEC: path}), and the output's out, codec, crf, pixel_format and overwrite. The flags of the command
apply to every job a line does not override. Model options may appear in a line only with the value the batch loads
(the models load once).

Every line is parsed and checked before any model loads (unknown keys, bad values, missing inputs, an output another
job also writes, an encoder that does not open): all errors are listed, each with its line number, and the command
exits 2. Then the jobs run in order on one Engine; each output is written and reported as it finishes, and a job that
fails is reported and the next one runs. The exit status is 0 when every job was written, else 100 + the number of
failed jobs (at most 125); 130 / 143 when interrupted (the finishing protocol: the running job's file is finished,
the jobs after it are not started).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from framepack_engine.commands.common import Signals
from framepack_engine.commands.run import OutputOptions, Progress, Written, options_from_flags, write_video
from framepack_engine.errors import FramePackError
from framepack_engine.media.codecs import DEFAULT_CRF

INPUT_KEYS = ("image", "end_image", "input_video", "keyframes")
OUTPUT_KEYS = ("out", "codec", "crf", "pixel_format", "overwrite")
FAILED_BASE, FAILED_MOST = 100, 125  # exit status: 100 + failed jobs, capped below the shell's 126+


@dataclass
class Job:
    """One checked line. Its inputs are read again when it runs (holding every job's images from the check on
    would make a long batch's memory grow with its length)."""

    line: int
    settings: object  # framepack_engine.settings.GenerationSettings
    inputs: dict  # image, end_image, input_video, keyframes: as the line (or the command) gives them
    out: Path
    output: OutputOptions

    def request(self, models):
        return _resolve(self.settings, self.inputs, models)


def _resolve(settings, inputs: dict, models):
    """The job's Request (framepack_engine.resolve): its inputs read and checked for the batch's models."""
    from framepack_engine.resolve import resolve_request

    return resolve_request(settings, models.variant, default_resolution=models.default_resolution, **inputs)


def run_batch(args, signals: Signals) -> int:
    from framepack_engine.pipeline import Engine
    from framepack_engine.reproduce import warn_differences
    from framepack_engine.resolve import resolve_models
    from framepack_engine.settings import ModelSettings

    if args.out:
        raise FramePackError("--out names one output, but a batch writes one per job: give each line its \"out\" "
                             f"(or none, for outputs/{Path(args.batch).stem}_lineN.mp4).")
    from framepack_engine.runtime.distributed import launched_ranks

    if (getattr(args, "nproc", None) or 1) > 1 or launched_ranks() > 1:
        raise FramePackError("--batch runs its jobs in one process: leave out --nproc (and torchrun), or run each job "
                             "on several processes with its own framepack generate.")
    generation, model_options, preset, recorded = options_from_flags(args)  # every job starts from these
    output = {"codec": args.codec, "crf": args.crf, "pixel_format": args.pixel_format, "overwrite": args.overwrite}
    output = {name: value for name, value in output.items() if value is not None}
    if recorded is not None:
        output = {**{k: v for k, v in (recorded.get("output") or {}).items() if v is not None}, **output}
    from framepack_engine.generation.keyframes import parse_keyframe_flag

    inputs = {name: getattr(args, name) for name in INPUT_KEYS[:3] if getattr(args, name) is not None}
    if args.keyframe:
        inputs["keyframes"] = parse_keyframe_flag(args.keyframe)
    models = resolve_models(ModelSettings.from_options(**model_options), preset, given=model_options)

    jobs, errors = read_jobs(Path(args.batch), generation, inputs, output, models, recorded)
    if errors:
        for error in errors:
            print(f"error: {error}", file=sys.stderr)
        return 2

    try:
        engine = Engine.from_resolved(models, jobs[0].request(models))
    except KeyboardInterrupt:
        print("\nInterrupted while loading the model: nothing was written.", file=sys.stderr)
        return signals.status
    total, done, failed = len(jobs), [], []
    for index, job in enumerate(jobs, 1):
        print(f"job {index}/{total} (line {job.line}): {job.out}", flush=True)
        try:
            request = job.request(models)
        except FramePackError as error:  # an input changed since the check: this job fails, the next one runs
            written = Written(None, "nothing was written", error)
        else:
            if recorded is not None:
                warn_differences(recorded, engine.metadata(request.settings, request.mode, request))
            written = write_video(engine, request, job.out, job.output, signals, Progress(enabled=not args.quiet))
        with signals.deferred():
            if signals.interrupted:
                not_run = ", ".join(str(later.line) for later in jobs[index:]) or "none"
                print(f"\nInterrupted: {written.on_disk}. Batch stopped at job {index}/{total}: {len(done)} done, "
                      f"{len(failed)} failed, not run: line(s) {not_run}.", file=sys.stderr)
                return signals.status
            if written.failure is None and written.saved is not None:
                done.append(job)
                print(f"Saved {written.saved} (job {index}/{total}, line {job.line}; {len(done)} of {total} done)",
                      flush=True)
            else:
                reason = _reason(written.failure)
                failed.append(f"line {job.line} ({reason})")
                print(f"error: job {index}/{total} (line {job.line}) failed: {reason}; {written.on_disk}.",
                      file=sys.stderr, flush=True)
    if not failed:
        print(f"Batch: all {total} jobs done.")
        return 0
    print(f"Batch: {len(done)} of {total} jobs done, {len(failed)} failed: {'; '.join(failed)}.", file=sys.stderr)
    return min(FAILED_BASE + len(failed), FAILED_MOST)


def _reason(failure: BaseException | None) -> str:
    if failure is None:
        return "no section finished"
    if isinstance(failure, FramePackError):
        return failure.for_command_line() if hasattr(failure, "for_command_line") else str(failure)
    text = str(failure).strip().splitlines()
    return f"{type(failure).__name__}: {text[0]}" if text else type(failure).__name__


def read_jobs(path: Path, generation: dict, inputs: dict, output: dict, models, recorded: dict | None
              ) -> tuple[list[Job], list[str]]:
    """Every line of the batch file checked and resolved (its inputs read), before any model loads: (jobs, errors),
    each error naming its line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FramePackError(f"The batch file {path.name!r} does not exist: give --batch a JSON Lines file, one "
                             "job (a JSON object) per line.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FramePackError(f"The batch file {path.name!r} cannot be read ({type(error).__name__}): give --batch "
                             "a UTF-8 JSON Lines file.") from None
    jobs, errors, outs = [], [], {}
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            job = _job(number, text, path, generation, inputs, output, models, recorded)
            key = os.path.abspath(_written_path(job.out))
            if key in outs:
                raise FramePackError(f"out {str(job.out)!r} is also line {outs[key]}'s: give each job its own out.")
            outs[key] = number
            jobs.append(job)
        except FramePackError as error:
            errors.append(f"{path.name} line {number}: {error}")
    if not jobs and not errors:
        errors.append(f"{path.name} holds no job: write one JSON object per line, e.g. "
                      '{"prompt": "a cat walks", "seed": 1, "out": "cat.mp4"}.')
    return jobs, errors


def _written_path(out: Path) -> Path:
    from framepack_engine.media.video import output_kind, png_folder

    return png_folder(out) if output_kind(out) == "png" else out


def _job(number: int, text: str, path: Path, generation: dict, inputs: dict, output: dict, models,
         recorded: dict | None) -> Job:
    """One line: parsed, its options checked with the command's under them, its inputs read, its output checked."""
    from framepack_engine.media.video import check_output
    from framepack_engine.reproduce import check_recorded_inputs
    from framepack_engine.settings import GenerationSettings, ModelSettings

    try:
        line = json.loads(text)
    except json.JSONDecodeError as error:
        raise FramePackError(f"not JSON ({error.msg} at column {error.colno}): write one JSON object per line.") \
            from None
    if not isinstance(line, dict):
        raise FramePackError("a job is a JSON object of options, e.g. {\"prompt\": \"a cat walks\", \"seed\": 1}.")
    generation_names = {item.name for item in GenerationSettings.options()}
    model_names = {item.name for item in ModelSettings.options()}
    known = generation_names | model_names | set(INPUT_KEYS) | set(OUTPUT_KEYS)
    for key in line:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FramePackError(f"unknown key {key!r}{hint}: a job takes the options by their API names "
                                 "(framepack generate --help shows them as flags).")
    _check_same_models(line, models, model_names)
    settings = GenerationSettings.from_options(
        **{**generation, **{key: value for key, value in line.items() if key in generation_names}})
    job_inputs = {**inputs, **{key: line[key] for key in INPUT_KEYS if key in line}}
    for key, value in job_inputs.items():
        if key == "keyframes":
            if not isinstance(value, dict) or not all(isinstance(image, str) for image in value.values()):
                raise FramePackError(f"keyframes must be an object of SPEC: image path, e.g. {{\"3\": \"pose.png\"}}, "
                                     f"got {value!r}.")
        elif value is not None and not isinstance(value, str):
            raise FramePackError(f"{key} must be a file's path (a string), got {value!r}.")
    if recorded is not None:
        check_recorded_inputs(recorded, job_inputs)
    request = _resolve(settings, job_inputs, models)
    if request.one_frame is not None:
        raise FramePackError("one-frame jobs (one_frame) are not run in a batch: run each with framepack generate.")
    options = {**output, **{key: line[key] for key in OUTPUT_KEYS if key in line}}
    _check_output_types(options)
    out = Path(options["out"]) if options.get("out") else Path("outputs") / f"{path.stem}_line{number}.mp4"
    crf = DEFAULT_CRF if options.get("crf") is None else options["crf"]
    encoding = OutputOptions(options.get("codec"), crf, options.get("pixel_format"))
    height, width = request.size
    check_output(out, encoding.codec, encoding.crf, encoding.pixel_format, overwrite=options.get("overwrite", False),
                 width=width, height=height)
    return Job(number, settings, job_inputs, out, encoding)


def _check_output_types(options: dict) -> None:
    """out, codec and pixel_format are texts, crf an integer, overwrite true or false (their values are checked by
    opening the encoder)."""
    for key in ("out", "codec", "pixel_format"):
        if options.get(key) is not None and not isinstance(options[key], str):
            raise FramePackError(f"{key} must be a string, got {options[key]!r}.")
    crf = options.get("crf")
    if crf is not None and (isinstance(crf, bool) or not isinstance(crf, int)):
        raise FramePackError(f"crf must be an integer, got {crf!r}.")
    if not isinstance(options.get("overwrite", False), bool):
        raise FramePackError(f"overwrite must be true or false, got {options['overwrite']!r}.")


def _check_same_models(line: dict, models, model_names: set) -> None:
    """A line may name a model option only with the value the batch loads: the models load once."""
    from framepack_engine.settings import ModelSettings

    given = {key: value for key, value in line.items() if key in model_names}
    if not given:
        return
    settings = models.settings
    asked = ModelSettings.from_options(**{**{item.name: getattr(settings, item.name)
                                             for item in ModelSettings.options()}, **given})
    for key in given:
        if key == "variant" and asked.variant in ("auto", models.variant):
            continue  # the variant the batch resolved to
        if getattr(asked, key) != getattr(settings, key):
            raise FramePackError(f"{key} is {line[key]!r} here but {getattr(settings, key)!r} for the batch: the "
                                 "models load once, so model options are the same for every job (give them on the "
                                 "command line, or run this job in another batch).")
