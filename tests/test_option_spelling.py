"""Messages that name an option name it as the reader gives it: a flag on the command line (`--variant f1`), a
keyword in the Python API (`variant='f1'`). One message, carrying its options (framepack_engine.errors.Option)."""

import re
import warnings

import numpy as np
import pytest
from PIL import Image

from framepack_engine.commands.main import _show_warning, main
from framepack_engine.errors import FramePackError, FramePackWarning, Option
from framepack_engine.resolve import check_inputs_for_variant
from framepack_engine.settings import GenerationSettings, ModelSettings

FAST = ["--preset", "tiny", "--steps", "2", "--latent-window-size", "2", "--fps", "8", "--seconds", "1", "--quiet"]
KEYWORD_SPELLING = re.compile(r"\b[a-z_]+=(\.\.\.|'|\"|True\b|False\b|\d)")


def test_an_option_is_a_keyword_in_python_and_a_flag_on_the_command_line():
    error = FramePackError("load it with ", Option("variant", "f1"), ", pass ", Option("end_image", ...), ", turn on ",
                           Option("fused_kernels", True), ", set ", Option("cache_threshold"), ", or ",
                           Option("mode", "live", flag="lora_mode"), " {braces stay}")
    assert str(error) == ("load it with variant='f1', pass end_image=..., turn on fused_kernels=True, set "
                          "cache_threshold, or mode='live' {braces stay}")
    assert error.for_command_line() == ("load it with --variant f1, pass --end-image END_IMAGE, turn on "
                                        "--fused-kernels, set --cache-threshold, or --lora-mode live {braces stay}")
    assert FramePackError("a prompt with 'quotes' and {x}").for_command_line() == "a prompt with 'quotes' and {x}"
    assert Option("prompt", "two words").flag() == "--prompt 'two words'"  # as a shell takes it


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 80, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.mark.parametrize("extra,flags", [
    (["--end-image", "{image}"], ["--image IMAGE", "--end-image END_IMAGE"]),
    (["--input-video", "{image}"], ["--variant f1"]),
    (["--variant", "f1", "--image", "{image}", "--end-image", "{image}"], ["--end-image", "--variant bidirectional"]),
    (["--cache-threshold", "0.1"], ["--cache-threshold is set but --cache is not", "--cache teacache",
                                    "--cache magcache"]),
    (["--cache", "teacache", "--magcache-k", "2"], ["--magcache-k is a MagCache option", "--cache magcache"]),
    (["--cache", "magcache", "--magcache-calibration", "missing.json"], ["(--magcache-calibration)"]),
    (["--quantize", "int8", "--fp8-compute"], ["--fp8-compute multiplies", "--quantize fp8"]),
    (["--attention", "flash"], ["--attention sdpa"]),
    (["--seconds", "0"], ["--seconds must be a finite number in (0, 3600]"]),
    (["--steps", "0"], ["--steps must be an integer from 1 to 1000"]),
])
def test_command_line_errors_name_flags(tmp_path, capsys, image, extra, flags):
    extra = [argument.replace("{image}", image) for argument in extra]
    out = tmp_path / "v.mp4"
    assert main(["generate", "x", "--out", str(out), *FAST, *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: "), error
    assert not KEYWORD_SPELLING.search(error[0]), error[0]
    for flag in flags:
        assert flag in error[0], error[0]
    assert not out.exists()


@pytest.mark.parametrize("make,keywords", [
    (lambda: check_inputs_for_variant("bidirectional", None, "end.png", None), ["image=...", "end_image=..."]),
    (lambda: check_inputs_for_variant("bidirectional", "start.png", None, "walk.mp4"), ["variant='f1'"]),
    (lambda: GenerationSettings.from_options(cache_threshold=0.1), ["cache='teacache'", "cache='magcache'"]),
    (lambda: ModelSettings.from_options(quantize="int8", fp8_compute=True), ["quantize='fp8'"]),
    (lambda: GenerationSettings.from_options(seconds=0), ["seconds must be"]),
])
def test_the_python_api_keeps_keywords(make, keywords):
    with pytest.raises(FramePackError) as raised:
        make()
    assert "--" not in str(raised.value)
    for keyword in keywords:
        assert keyword in str(raised.value)


def test_warnings_on_the_command_line_name_flags(capsys):
    warning = FramePackWarning("the LoRAs run live (", Option("lora_mode", "live"), ")")
    _show_warning(warning, FramePackWarning, "x.py", 1)
    assert capsys.readouterr().err == "warning: the LoRAs run live (--lora-mode live)\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.warn(warning)
    assert str(caught[0].message) == "the LoRAs run live (lora_mode='live')"
