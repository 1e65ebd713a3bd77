"""One generation into its output file, under the finishing protocol (framepack_engine.commands.common), with its
progress bars: what `framepack generate` runs once and `framepack generate --batch` once per job."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from framepack_engine.commands.common import Signals
from framepack_engine.errors import FramePackError


@dataclass
class OutputOptions:
    """How the output is encoded (recorded in its metadata as "output", so --settings-from encodes alike)."""

    codec: str | None = None
    crf: int | None = None
    pixel_format: str | None = None

    def recorded(self) -> dict:
        return dataclasses.asdict(self)


def options_from_flags(args):
    """What the command's flags ask for, only the flags given: (generation options, model options, preset, the
    recorded metadata of --settings-from or None); with --settings-from the recorded options are under the flags."""
    from framepack_engine.reproduce import read_recorded, recorded_options
    from framepack_engine.settings import GenerationSettings, ModelSettings, given_flags

    generation = given_flags(args, GenerationSettings, skip=("prompt",))
    if args.prompt is not None or args.prompt_words:
        generation["prompt"] = args.prompt if args.prompt is not None else " ".join(args.prompt_words)
    model_options, preset = given_flags(args, ModelSettings), args.preset
    recorded = None
    if args.settings_from:
        recorded = read_recorded(args.settings_from)
        generation, model_options, preset = recorded_options(recorded, generation, model_options, preset)
    return generation, model_options, preset, recorded


@dataclass
class Written:
    """What a generation left: the saved file (None when nothing was), what the file holds in words, and the error
    that stopped it (None when it finished or was interrupted)."""

    saved: Path | None
    on_disk: str
    failure: BaseException | None = None


def write_video(engine, request, out: Path, output: OutputOptions, signals: Signals, progress: "Progress") -> Written:
    """Streams the resolved `request` through `engine` into `out`, each section handed to the writer whole.

    A signal stops the engine at once, never a section being handed to the writer nor the file being finished; a
    second one makes the finish keep only what is durable (signals.abort). A failure of the engine or the writer
    finishes the file with what it has and is returned, not raised."""
    from framepack_engine.media.output import SectionOutputFile

    # RIFE interpolation and upscaling (when asked) run on each section as it is handed over
    writer = SectionOutputFile(out, request.settings.output_fps, codec=output.codec, crf=output.crf,
                               pixel_format=output.pixel_format, postprocess=engine.postprocess(request.settings))
    sections = engine.stream(request=request, callback=progress.step)
    failure = None
    try:
        while not signals.interrupted:
            try:
                section = next(sections)  # a signal here raises KeyboardInterrupt: the engine stops where it is
            except StopIteration:
                break
            with signals.deferred():  # handed over whole, at once: an interruption loses nothing finished
                metadata = {**section.metadata, "output": output.recorded()}
                writer.add(dataclasses.replace(section, metadata=metadata))
                progress.section_done(section, writer.frame_count)
    except KeyboardInterrupt:
        pass  # signals.received says which
    except Exception as error:  # the engine or the writer failed: the file is finished with what it has, then said
        failure = error
    with signals.deferred():
        sections.close()
        progress.close()
        try:
            saved = writer.close(stop=signals.abort)
        except FramePackError as error:  # the writer failed; its message says what the file holds
            saved, failure = None, failure or error
        return Written(saved, writer.on_disk(), failure)


def section_summary(stats: dict, frames: int) -> str:
    """The sections bar's text after a section: the frames written and the section's compute time, said as such (a
    bare `seconds=12.3` read like the video's length)."""
    text = f"{frames} frames written, last section took {stats['seconds']:.1f} s"
    if "cache_steps_skipped" in stats:
        text += f", the cache skipped {stats['cache_steps_skipped']} model calls"
    return text


class Progress:
    """Progress bars: one over sections, one over the steps of the current section."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.sections = None
        self.steps = None

    def step(self, info: dict):
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.sections is None:
            self.sections = tqdm(total=info["sections"], desc="sections", unit="section", position=0)
        if self.steps is None or info["i"] == 0:
            if self.steps is not None:
                self.steps.close()
            self.steps = tqdm(total=info["total_steps"], desc=f"section {info['section'] + 1}", unit="step",
                              position=1, leave=False)
        if "cache_steps_skipped" in info:
            self.steps.set_postfix(skipped=info["cache_steps_skipped"], refresh=False)
        self.steps.update(1)

    def section_done(self, section, frames: int):
        if self.sections is not None:
            self.sections.update(1)
            self.sections.set_postfix_str(section_summary(section.stats, frames), refresh=False)
            self.sections.refresh()

    def close(self):
        for bar in (self.steps, self.sections):
            if bar is not None:
                bar.close()
        self.sections = self.steps = None  # a batch's next job starts its own bars
