"""Section prompts: the one parser (framepack_engine.generation.prompts) and its grammar, as the README writes it.
Every text it does not read as written is one line naming the entry, before any model loads."""

import pytest

from framepack_engine.commands.main import main
from framepack_engine.errors import FramePackError
from framepack_engine.generation.prompts import parse_timestamped, section_prompt_texts
from framepack_engine.pipeline import parse_section_prompts
from framepack_engine.resolve import resolve_request
from framepack_engine.settings import GenerationSettings, parse_section_prompts_flag

BAD = [
    # the probe's examples
    ("[0s a cat sits] [1s: a cat jumps]", "the entry '[0s a cat sits]' has no ':' right after its time: write "
                                          "'[0s: a cat sits]'"),
    ("[0s: a cat] sits down [1s: a cat jumps]", "the text 'sits down' is outside the brackets"),
    ("the cat [0s: a cat sits]", "the text 'the cat' is outside the brackets"),
    ("[0s: a cat sits] and then", "the text 'and then' is outside the brackets"),
    ("[-1s: x]", "the entry '[-1s: x]' has the time -1s: times are seconds from the start of the video, 0 or more"),
    ("[0s: zebra runs] [0s: apple falls]", "'[0s: zebra runs]' and '[0s: apple falls]' are both at 0s"),
    ("[0s: apple falls] [0s: zebra runs]", "'[0s: apple falls]' and '[0s: zebra runs]' are both at 0s"),
    ("[0s: ]", "the entry '[0s: ]' has no prompt"),
    # the grammar's other edges
    ("[2s: b] [1s: a]", "'[1s: a]' comes after '[2s: b]' but its time is earlier"),
    ("[0s: a cat", "the entry '[0s: a cat' has no closing ']'"),
    ("[0s: a cat [1s: jumps]", "the entry '[0s: a cat' has no closing ']'"),
    ("[0: a cat]", "the entry '[0: a cat]' does not start with a time in seconds and a colon"),
    ("[soon: a cat]", "does not start with a time in seconds and a colon"),
    ("[]", "the entry '[]' does not start with a time"),
]


@pytest.mark.parametrize("text,message", BAD)
def test_each_bad_form_is_one_line_naming_it(text, message):
    with pytest.raises(FramePackError) as raised:
        parse_timestamped(text)
    assert message in str(raised.value) and str(raised.value).startswith("section_prompts: ")
    assert "\n" not in str(raised.value)
    with pytest.raises(FramePackError, match="section_prompts: "):  # the settings' check is the same parser
        GenerationSettings.from_options(section_prompts=text)


@pytest.mark.parametrize("text,message", BAD[:6])
def test_the_command_refuses_them_before_loading(tmp_path, capsys, monkeypatch, text, message):
    from framepack_engine.pipeline import Engine

    monkeypatch.setattr(Engine, "from_preset", classmethod(lambda *a, **k: pytest.fail("loaded")))
    code = main(["generate", "x", "--section-prompts", text, "--out", str(tmp_path / "v.mp4"), "--preset", "tiny",
                 "--quiet"])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and message in error[0]


def test_the_grammar_as_written():
    assert parse_timestamped("[0s: a man waves] [2.5s: a man jumps]") == [(0.0, "a man waves"), (2.5, "a man jumps")]
    # blanks around the time, the unit and the colon; a colon inside the prompt; newlines between entries
    assert parse_timestamped("  [ 1 s :a man says: hello ]\n[3s:bye]  ") == [(1.0, "a man says: hello"), (3.0, "bye")]


def test_each_prompt_holds_from_its_time_and_the_main_one_before_the_first():
    # sections of 1 s starting at 0, 1, 2, 3 (video order)
    assert section_prompt_texts("[1s: b] [3s: d]", "main", 4, 1.0, range(4)) == ["main", "b", "b", "d"]
    # generation order (the bidirectional model makes the end first): the same prompt per video position
    assert section_prompt_texts("[1s: b] [3s: d]", "main", 4, 1.0, [3, 2, 1, 0]) == ["d", "b", "b", "main"]
    # a time between two section starts holds from the next start
    assert section_prompt_texts("[0s: a] [0.5s: b]", "main", 3, 1.0, range(3)) == ["a", "b", "b"]
    assert parse_section_prompts("[0s: a man waves] [2s: a man jumps]", "base", 4, 1.0, [0, 1, 2, 3]) == [
        "a man waves", "a man waves", "a man jumps", "a man jumps"]


@pytest.mark.parametrize("text,message", [
    ("[0s: a] [0.3s: b] [0.6s: c]", "the entry at 0.3s ('b') is used by no section: none starts from 0.3s until "
                                    "the next entry's 0.6s (sections start at 0, 1, 2 s)"),
    ("[0s: a] [5s: b]", "the entry at 5s ('b') is used by no section: none starts at or after 5s"),
])
def test_an_entry_no_section_would_use_is_refused(text, message):
    with pytest.raises(FramePackError) as raised:
        section_prompt_texts(text, "main", 3, 1.0, range(3))
    assert message in str(raised.value)


def test_the_resolve_step_checks_the_entries_against_the_sections():
    # 2 s at 8 fps with windows of 2 latent frames: 2 sections of 1 s
    settings = GenerationSettings.from_options(prompt="x", seconds=2, fps=8, latent_window_size=2,
                                               section_prompts="[0s: a] [1s: b] [1.5s: c]")
    with pytest.raises(FramePackError, match=r"the entry at 1\.5s \('c'\) is used by no section"):
        resolve_request(settings, "bidirectional", default_resolution=64)
    settings = GenerationSettings.from_options(prompt="x", seconds=2, fps=8, latent_window_size=2,
                                               section_prompts="[0s: a] [1s: b]")
    assert resolve_request(settings, "bidirectional", default_resolution=64).prompts == ["a", "b"]


def test_suffixes_are_lists_or_texts_without_brackets():
    assert parse_section_prompts_flag("walks|sits") == ["walks", "sits"]
    assert section_prompt_texts("walks\n\nsits", "a cat", 2, 1.0, range(2)) == ["a cat walks", "a cat sits"]
    assert section_prompt_texts(["walking", "jumping"], "astronaut", 4, 1.0, range(4)) == [
        "astronaut walking", "astronaut walking", "astronaut jumping", "astronaut jumping"]
    # a list's texts are suffixes whatever they hold; a text holding '[' is timestamped, so a stray one is named
    assert section_prompt_texts(["wears a [red] hat"], "a cat", 1, 1.0, [0]) == ["a cat wears a [red] hat"]
    with pytest.raises(FramePackError, match="the text 'walks|wears a' is outside the brackets"):
        GenerationSettings.from_options(section_prompts=parse_section_prompts_flag("walks|wears a [red] hat"))


def test_the_server_refuses_them_when_submitted():
    from framepack_engine.serve.server import check_submission

    with pytest.raises(FramePackError, match="are both at 0s"):
        check_submission({"prompt": "x", "section_prompts": "[0s: zebra runs] [0s: apple falls]"}, {},
                         "bidirectional", 64)
    with pytest.raises(FramePackError, match="is used by no section"):
        check_submission({"prompt": "x", "seconds": 1, "section_prompts": "[0s: a] [30s: b]"}, {},
                         "bidirectional", 64)
