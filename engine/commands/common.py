"""What every subcommand shares: the signal side of the finishing protocol, quiet library logs.

The finishing protocol (README, Outputs: "Nothing is lost"), for `framepack generate`, `framepack serve`'s jobs and
the output writer (framepack_engine.media.output.SectionOutputFile):

1. The first Ctrl-C (SIGINT) or SIGTERM stops the work where it is: KeyboardInterrupt (Terminated for SIGTERM) is
   raised in the main thread, unless it comes while something is being finished (`Signals.deferred()`: a section
   handed to the writer, the file being finished), which it never interrupts: it is noted, and the work stops after.
2. From then on no signal raises: the file is finished (everything handed over is encoded and joined). A second
   signal sets `Signals.abort`, which lets the finish drop only what is not yet durable (the segments not yet
   encoded); what is encoded is joined into the file all the same.
3. The command then says in one line exactly what the file holds, and exits 130 (SIGINT first) or 143 (SIGTERM).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop at the next step and keep every finished section."""


def raise_terminated(signum, frame):
    raise Terminated()


def interruption_status(interruption: BaseException | None = None, signum: int | None = None) -> int:
    """The exit status of an interruption: 143 for SIGTERM, 130 for Ctrl-C (128 + the signal's number)."""
    terminated = isinstance(interruption, Terminated) or signum == signal.SIGTERM
    return 128 + (signal.SIGTERM if terminated else signal.SIGINT)


class Signals:
    """Ctrl-C and SIGTERM for one run of a command, as the finishing protocol (module doc) takes them. Installed
    for the whole command (from before its imports), put back by `restore`."""

    def __init__(self):
        self.received: list[int] = []  # signal numbers, in order
        self.abort = threading.Event()  # set by the second signal: finishing may drop what is not yet durable
        self._deferred = 0
        self._previous: dict[int, object] = {}

    def install(self) -> "Signals":
        if threading.current_thread() is threading.main_thread():  # signals are only for the main thread
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self, ignore: bool = False) -> None:
        """Puts the handlers back (ignore=True: ignores both, for a process that is only exiting now)."""
        for number, previous in self._previous.items():
            signal.signal(number, signal.SIG_IGN if ignore else previous)
        self._previous = {}

    def _handle(self, signum, frame):
        self.received.append(signum)
        if len(self.received) > 1:
            self.abort.set()
        if self._deferred or len(self.received) > 1:
            return  # noted: whatever is being finished finishes (or, after a second signal, aborts)
        self._deferred += 1  # from here on the work is finishing: later signals never raise
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()

    def note(self, signum: int) -> None:
        """A signal another handler took (uvicorn's, while it serves): counted as this one counts, never raised."""
        self.received.append(signum)
        self._deferred += 1  # the work is finishing from here on
        if len(self.received) > 1:
            self.abort.set()

    @contextlib.contextmanager
    def deferred(self):
        """A block no signal interrupts: one that comes is noted (`received`) and acted on after it."""
        self._deferred += 1
        try:
            yield self
        finally:
            self._deferred -= 1

    @property
    def interrupted(self) -> bool:
        return bool(self.received)

    @property
    def status(self) -> int:
        """130 or 143, by the first signal."""
        return interruption_status(signum=self.received[0] if self.received else None)


def quiet_libraries() -> None:
    """No loading bars or logs from the libraries: transformers, huggingface_hub, the video encoders."""
    from framepack_engine.media.codecs import quiet_encoder_logs

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    quiet_encoder_logs()
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
