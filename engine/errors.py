"""The exception a user mistake raises: one sentence that names the problem and the fix.

The command line prints `error.for_command_line()` and exits non-zero instead of showing a traceback; the Python
API and the server show `str(error)`. A message that names an option carries it as an `Option`, so the same
message names it the way each reader gives it: `variant='f1'` in Python, `--variant f1` on the command line.
"""

from __future__ import annotations

import shlex


def flag_name(name: str) -> str:
    """The command-line flag of an option: `end_image` -> `--end-image` (a name given as a flag stays as it is)."""
    return name if name.startswith("-") else "--" + name.replace("_", "-")


class Option:
    """An option named in a message, with the value the fix asks for: none (the option itself), `...` (some value
    the user picks), or a value. `flag` names the command line's option where a method's keyword differs (a
    LoRA's `mode` is `--lora-mode`)."""

    def __init__(self, name: str, value=None, *, flag: str | None = None):
        self.name, self.value = name, value
        self.flag_option = flag or name  # the command line's option, where a method names it otherwise

    def keyword(self) -> str:
        """Python's spelling: `variant`, `image=...`, `variant='f1'`."""
        if self.value is None:
            return self.name
        return f"{self.name}={'...' if self.value is Ellipsis else repr(self.value)}"

    def flag(self) -> str:
        """The command line's spelling: `--variant`, `--end-image END_IMAGE` (the placeholder argparse's help shows),
        `--variant f1`; a switch alone (`--offline`)."""
        flag = flag_name(self.flag_option)
        if self.value is None or self.value is True:
            return flag
        if self.value is Ellipsis:
            return f"{flag} {flag.lstrip('-').replace('-', '_').upper()}"
        return f"{flag} {shlex.quote(str(self.value))}"


def _spelled(parts: tuple, spelling) -> str:
    return "".join(spelling(part) if isinstance(part, Option) else str(part) for part in parts)


class _NamesOptions:
    """A message given in parts, texts and the `Option`s it names, joined as each reader spells them:
    FramePackError("Video extension needs the F1 model: load it with ", Option("variant", "f1"), ".")."""

    def __init__(self, *parts: str | Option):
        self.parts = parts
        super().__init__(_spelled(parts, Option.keyword))

    def for_command_line(self) -> str:
        """The message with every option it names spelled as its flag."""
        return _spelled(self.parts, Option.flag)


class FramePackError(_NamesOptions, Exception):
    """A problem the user can fix (bad input, missing file, missing optional package)."""


class BackendUnavailableError(FramePackError):
    """An optional backend (attention library, quantization package, CUDA op) is not installed or not usable here."""


class ModelSourceError(FramePackError):
    """A model source (repo id, folder, file) is missing, incomplete or in a format we refuse."""


class FramePackWarning(_NamesOptions, UserWarning):
    """Something the user should know that does not stop the work (e.g. a prompt cut to the encoder's limit)."""
