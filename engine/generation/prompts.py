"""Section prompts: which prompt each section of a video is generated with. The one parser of `section_prompts`.

Two forms (README, "Section prompts"):

* **Suffixes**: a list of texts, or a text of lines without `[` (the command also splits on `|`). Each is added to
  the main prompt and they are stretched evenly over the video: with 4 sections and 2 suffixes, the first goes with
  sections 1-2 and the second with 3-4. Blank lines are left out. (A list's texts may hold brackets.)
* **Timestamped**: a text holding `[`, made only of entries (with blanks between them)

      entries := blank* entry (blank* entry)* blank*
      entry   := "[" blank* TIME blank* "s" blank* ":" PROMPT "]"
      TIME    := digits ["." digits]         seconds from the start of the video (0 or more)
      PROMPT  := any text without "[" or "]", not blank (it is stripped)

  Times must increase from one entry to the next. Each prompt replaces the main prompt for the sections that start
  at or after its time (and before the next entry's); sections that start before the first time take the main
  prompt. Section i (in video order) starts at i * latent_window_size * 4 / fps seconds; an entry that no section
  starts under would be dropped unseen, so it is an error naming the section starts.

Every other text is refused with one line naming the entry and the fix: a missing colon, text outside the brackets,
a negative time, two entries at one time or out of order, an empty prompt, an unclosed bracket.
"""

from __future__ import annotations

import re
from typing import Iterable

from framepack_engine.errors import FramePackError
from framepack_engine.generation.sections import VAE_TEMPORAL_COMPRESSION

NAME = "section_prompts"
EXAMPLE = "[0s: a man waves] [2s: a man jumps]"
_TIME = re.compile(r"\s*(-?)(\d+(?:\.\d+)?)\s*s\s*")  # a minus sign is read to name it in the error
_TIME_WITHOUT_COLON = re.compile(r"\s*(-?)(\d+(?:\.\d+)?)\s*s\b")
# Times closer than this are the same time (sections start at fractions such as 4 * 9 / 30 seconds).
TOLERANCE = 1e-6


def is_timestamped(text) -> bool:
    """A text holding '[' is timestamped (a list never is)."""
    return isinstance(text, str) and "[" in text


def _shown(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[:limit - 3] + "...")


def parse_timestamped(text: str) -> list[tuple[float, str]]:
    """(time in seconds, prompt) of each entry of a timestamped text, in order; a FramePackError names the first
    entry that breaks the grammar (module doc)."""
    entries: list[tuple[float, str, str]] = []  # (time, prompt, the entry as written)
    position = 0
    while True:
        opening = text.find("[", position)
        outside = text[position:] if opening < 0 else text[position:opening]
        if outside.strip():
            raise FramePackError(
                f"{NAME}: the text {_shown(outside)} is outside the brackets: every prompt goes inside one, with its "
                f"time, as {EXAMPLE!r}.")
        if opening < 0:
            break
        closing = text.find("]", opening + 1)
        nested = text.find("[", opening + 1)
        if closing < 0 or 0 <= nested < closing:
            end = len(text) if nested < 0 else nested
            raise FramePackError(f"{NAME}: the entry {_shown(text[opening:end])} has no closing ']': write each "
                                 f"prompt as [TIMEs: PROMPT], e.g. {EXAMPLE!r}.")
        written, body = text[opening:closing + 1], text[opening + 1:closing]
        entries.append((*_entry(written, body), written))
        position = closing + 1
    if not entries:
        raise FramePackError(f"{NAME}: no entry found: write each prompt as [TIMEs: PROMPT], e.g. {EXAMPLE!r}.")
    for (before, _, before_written), (time, _, written) in zip(entries, entries[1:]):
        if abs(time - before) <= TOLERANCE:
            raise FramePackError(f"{NAME}: {_shown(before_written)} and {_shown(written)} are both at {time:g}s: give "
                                 "each prompt its own time (one prompt per time).")
        if time < before:
            raise FramePackError(f"{NAME}: {_shown(written)} comes after {_shown(before_written)} but its time is "
                                 "earlier: write the entries in the order of their times.")
    return [(time, prompt) for time, prompt, _ in entries]


def _entry(written: str, body: str) -> tuple[float, str]:
    head, colon, prompt = body.partition(":")
    time = _TIME.fullmatch(head) if colon else None
    if time is None:
        leading = _TIME_WITHOUT_COLON.match(body)
        if leading and body[leading.end():].strip():
            fixed = f"[{body[:leading.end()].strip()}: {body[leading.end():].strip()}]"
            raise FramePackError(f"{NAME}: the entry {_shown(written)} has no ':' right after its time: write "
                                 f"{_shown(fixed)}.")
        if not leading:
            raise FramePackError(f"{NAME}: the entry {_shown(written)} does not start with a time in seconds and a "
                                 f"colon: write each prompt as [TIMEs: PROMPT], e.g. {EXAMPLE!r}.")
    sign, number = time.groups() if time else _TIME.match(body).groups()
    if sign == "-":
        raise FramePackError(f"{NAME}: the entry {_shown(written)} has the time -{number}s: times are seconds from "
                             "the start of the video, 0 or more.")
    if not prompt.strip():
        raise FramePackError(f"{NAME}: the entry {_shown(written)} has no prompt: write it after the colon, or leave "
                             "the entry out (sections before the first time take the main prompt).")
    return float(number), prompt.strip()


def seconds_per_section(latent_window_size: int, fps: float) -> float:
    """How long one section is: its latent frames, 4 pixel frames each, at `fps`."""
    return latent_window_size * VAE_TEMPORAL_COMPRESSION / fps


def check_section_prompts(section_prompts) -> None:
    """The grammar of a timestamped text (one line naming the entry); other forms need no check here."""
    if is_timestamped(section_prompts):
        parse_timestamped(section_prompts)


def section_prompt_texts(section_prompts, prompt: str, count: int, section_seconds: float,
                         video_positions: Iterable[int]) -> list[str]:
    """The prompt of each section, in the order of `video_positions` (each section's place in the video, 0 first;
    `Engine.stream` passes them in generation order). section_seconds: `seconds_per_section(window, fps)`; count:
    the video's sections."""
    video_positions = list(video_positions)
    if not section_prompts:
        return [prompt] * len(video_positions)
    if is_timestamped(section_prompts):
        return _timestamped(parse_timestamped(section_prompts), prompt, count, section_seconds, video_positions)
    if isinstance(section_prompts, str):
        section_prompts = section_prompts.splitlines()
    lines = [str(line).strip() for line in section_prompts if str(line).strip()]
    if not lines:
        return [prompt] * len(video_positions)
    return [f"{prompt} {lines[min(position * len(lines) // count, len(lines) - 1)]}".strip()
            for position in video_positions]


def _timestamped(changes: list[tuple[float, str]], prompt: str, count: int, section_seconds: float,
                 video_positions: list[int]) -> list[str]:
    starts = [index * section_seconds for index in range(count)]

    def chosen(start: float) -> int | None:  # the entry in force at a section's start, None before the first
        taken = None
        for index, (time, _) in enumerate(changes):
            if time <= start + TOLERANCE:
                taken = index
        return taken

    used = {chosen(start) for start in starts}
    for index, (time, text) in enumerate(changes):
        if index not in used:
            shown = ", ".join(f"{start:.3g}" for start in starts[:6]) + (", ..." if count > 6 else "")
            until = (f"from {time:g}s until the next entry's {changes[index + 1][0]:g}s" if index + 1 < len(changes)
                     else f"at or after {time:g}s")
            raise FramePackError(
                f"{NAME}: the entry at {time:g}s ({_shown(text, 40)}) is used by no section: none starts {until} "
                f"(sections start at {shown} s): move it to a section's start or leave it out.")
    return [prompt if chosen(starts[position]) is None else changes[chosen(starts[position])][1]
            for position in video_positions]


__all__ = ["check_section_prompts", "is_timestamped", "parse_timestamped", "section_prompt_texts",
           "seconds_per_section"]
