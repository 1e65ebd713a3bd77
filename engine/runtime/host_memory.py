"""Host memory: what the system has available, what the process holds, and giving freed memory back."""

from __future__ import annotations

import sys
import threading


def proc_bytes(path: str, key: str) -> int | None:
    """A `Key:   123 kB` line of a /proc file (/proc/meminfo, /proc/self/status), in bytes; None where /proc is
    absent (not Linux) or the key is missing."""
    try:
        with open(path) as file:
            for line in file:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available_bytes() -> int | None:
    """The host's MemAvailable (Linux), or None where /proc is absent."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def release_freed_host_memory() -> None:
    """Hands the host memory that freed tensors left in the C allocator's heap back to the system (glibc's
    malloc_trim; nothing elsewhere). Quantizing a model layer by layer frees its float weights in pieces that glibc
    keeps: measured on the small preset, anonymous RSS stays at the float model's 5.6 GB after int4 quantization
    and drops to 1.1 GB after this."""
    import ctypes
    import ctypes.util

    if sys.platform != "linux":
        return
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def rss_anon_bytes() -> int | None:
    """The process's anonymous resident memory (RssAnon: not the page cache of mapped files)."""
    return proc_bytes("/proc/self/status", "RssAnon")


class AnonymousMemoryPeak:
    """Samples RssAnon on a thread while the block runs: `peak_bytes` (and `start_bytes`) afterwards."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.start_bytes = self.peak_bytes = rss_anon_bytes() or 0
        self._stop = threading.Event()
        self._thread = None

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak_bytes = max(self.peak_bytes, rss_anon_bytes() or 0)

    def __enter__(self):
        self.start_bytes = self.peak_bytes = rss_anon_bytes() or 0
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_anon_bytes() or 0)
