"""What every subcommand shares: quiet library logs, SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import os


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: stop at the next step and keep every finished section."""


def raise_terminated(signum, frame):
    raise Terminated()


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
