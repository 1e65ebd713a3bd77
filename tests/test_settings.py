"""Options are written once (framepack_engine.settings): the API, the command's flags and the checks all come from the fields."""

import argparse
import math

import pytest

from framepack_engine import Engine, FramePackError
from framepack_engine.commands.main import build_parser, main
from framepack_engine.settings import GenerationSettings, ModelSettings, add_flags, given_flags


def test_every_option_is_a_flag_with_its_help_and_default():
    parser = build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    flags = {option: action for action in generate._actions for option in action.option_strings}
    for settings_class in (GenerationSettings, ModelSettings):
        for item in settings_class.options():
            action = flags["--" + item.name.replace("_", "-")]
            assert action.help.startswith(item.metadata["help"]), item.name
            assert action.default is None  # unset flags keep the settings' own default


def test_flags_and_keyword_options_give_the_same_settings():
    parser = argparse.ArgumentParser()
    add_flags(parser, GenerationSettings)
    args = parser.parse_args(["--seconds", "7.5", "--seed", "3", "--sampler", "euler", "--width", "320",
                              "--section-prompts", "walks|runs", "--cfg", "2"])
    from_flags = GenerationSettings.from_options(**given_flags(args, GenerationSettings))
    from_api = GenerationSettings.from_options(seconds=7.5, seed=3, sampler="euler", width=320,
                                               section_prompts=["walks", "runs"], cfg=2)
    assert from_flags == from_api
    assert from_api.steps == 25 and from_api.cfg == 2.0 and isinstance(from_api.cfg, float)


@pytest.mark.parametrize("options,named", [
    (dict(seconds=math.nan), "seconds"), (dict(seconds=math.inf), "seconds"), (dict(seconds=-1), "seconds"),
    (dict(seconds="5"), "seconds"), (dict(seconds=1e9), "seconds"), (dict(fps=1e-9), "fps"),
    (dict(cfg=math.nan), "cfg"), (dict(distilled_guidance=math.nan), "distilled_guidance"),
    (dict(guidance_rescale=math.nan), "guidance_rescale"), (dict(vision_strength=math.inf), "vision_strength"),
    (dict(init_strength=0), "init_strength"), (dict(end_strength=1.5), "end_strength"),
    (dict(seed=2**70), "seed"), (dict(seed=None), "seed"), (dict(seed=True), "seed"), (dict(seed=1.5), "seed"),
    (dict(steps=0), "steps"), (dict(steps=2.5), "steps"), (dict(latent_window_size=0), "latent_window_size"),
    (dict(resolution=100000), "resolution"), (dict(width=-5), "width"), (dict(width=0), "width"),
    (dict(sampler="ddim"), "sampler"), (dict(section_prompts=5), "section_prompts"),
    (dict(prompt="\ud800"), "prompt"), (dict(prompt=3), "prompt"), (dict(shift=0), "shift"),
    (dict(sections=4), "sections"),
])
def test_bad_generation_options_name_the_option(options, named):
    with pytest.raises(FramePackError, match=named):
        GenerationSettings.from_options(**options)


def test_unknown_option_suggests_the_near_one():
    with pytest.raises(FramePackError, match="did you mean 'seconds'"):
        GenerationSettings.from_options(secnods=4)
    with pytest.raises(FramePackError, match="did you mean 'unipc'"):
        GenerationSettings.from_options(sampler="unipcc")
    with pytest.raises(FramePackError, match="attention"):
        ModelSettings.from_options(attention="flsh")


@pytest.mark.parametrize("flags,named", [
    (["--seconds", "nan"], "--seconds"), (["--cfg", "inf"], "--cfg"), (["--seed", str(2**70)], "--seed"),
    (["--resolution", "100000"], "--resolution"), (["--width", "0"], "--width"),
    (["--distilled-guidance", "nan"], "--distilled-guidance"), (["--vision-strength", "inf"], "--vision-strength"),
])  # named as the flag given (it said distilled_guidance)
def test_the_command_checks_settings_before_loading_a_model(monkeypatch, capsys, tmp_path, flags, named):
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(Engine, "from_pretrained", no_loading)
    monkeypatch.setattr(Engine, "from_preset", no_loading)
    code = main(["generate", "x", "--out", str(tmp_path / "v.mp4"), "--quiet", *flags])
    error = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(error) == 1 and named in error[0]
