"""The exception a user mistake raises: one sentence that names the problem and the fix.

The command line prints `str(error)` and exits non-zero instead of showing a traceback.
"""


class FramePackError(Exception):
    """A problem the user can fix (bad input, missing file, missing optional package)."""


class BackendUnavailableError(FramePackError):
    """An optional backend (attention library, quantization package, CUDA op) is not installed or not usable here."""


class ModelSourceError(FramePackError):
    """A model source (repo id, folder, file) is missing, incomplete or in a format we refuse."""


class FramePackWarning(UserWarning):
    """Something the user should know that does not stop the work (e.g. a prompt cut to the encoder's limit)."""
