"""What a run prints besides the video: the tiny preset's notice said once per process, the progress bars' text."""

import re
from types import SimpleNamespace

from framepack_engine import Engine
from framepack_engine.commands.run import Progress, section_summary

FAST = dict(steps=1, seconds=1, fps=8, latent_window_size=2)
NOTICE = "Preset 'tiny' uses random weights"


def test_the_random_weights_notice_is_said_once_per_process(capsys):
    """It was printed at every generate call (a script's loop printed it once per video)."""
    first = Engine.from_preset("tiny")
    first.generate("a cat", **FAST)
    first.generate("a dog", **FAST)
    Engine.from_preset("tiny").generate("a cat", **FAST)
    printed = capsys.readouterr().out
    assert printed.count(NOTICE) == 1, printed


def test_the_sections_bar_says_the_last_section_took_its_time(capsys):
    """It showed `seconds=12.3`, which reads like the video's length; the frames and the compute time are said."""
    progress = Progress(enabled=True)
    progress.step({"sections": 2, "i": 0, "total_steps": 2, "section": 0})
    progress.section_done(SimpleNamespace(stats={"seconds": 12.34, "cache_steps_skipped": 3}), frames=33)
    shown = progress.sections.postfix
    progress.close()
    drawn = capsys.readouterr().err
    assert shown == "33 frames written, last section took 12.3 s, the cache skipped 3 model calls"
    assert "last section took 12.3 s" in drawn and not re.search(r"\bseconds=", drawn)
    assert section_summary({"seconds": 0.04}, 5) == "5 frames written, last section took 0.0 s"
