"""Every option written once: its default, its check and its help text.

`GenerationSettings` holds the options of one generation and `ModelSettings` those of loading a model. The Python
API (`Engine.from_pretrained`, `Engine.generate/stream`), the command's flags (`framepack generate`) and the server's
JSON schema are all built from these two dataclasses, so they cannot drift apart. Each check turns what the user
gave into the value the engine uses, or raises a FramePackError naming the option, what was wrong and the fix.
Checks run before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from framepack_engine.runtime.attention import BACKEND_NAMES
from framepack_engine.errors import FramePackError, Option, flag_name
from framepack_engine.models.rife import WEIGHTS_HELP as RIFE_WEIGHTS_HELP, check_rife_path
from framepack_engine.models.upscaler import check_upscaler_path, import_spandrel
from framepack_engine.runtime.lora import LORA_MODES, check_lora_source
from framepack_engine.runtime.quant import FORMATS as QUANTIZE_FORMATS
from framepack_engine.generation.one_frame import ONE_FRAME_SWITCHES, MAX_INDEX
from framepack_engine.generation.prompts import check_section_prompts, is_timestamped
from framepack_engine.generation.sampling import SAMPLERS
from framepack_engine.generation.step_cache import DEFAULT_THRESHOLDS, MAGCACHE_K, MAGCACHE_RETENTION

STEP_CACHES = ("teacache", "magcache")
VARIANT_CHOICES = ("auto", "bidirectional", "f1")
DTYPE_NAMES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
               "float32": "float32", "fp32": "float32"}
MAX_SECONDS = 3600.0  # an hour: 3000+ sections; longer runs are better split into extensions
MAX_INTERPOLATE = 16  # frames per interval: 30 fps x 16 = 480 fps
MAX_SEED = 2**64 - 1  # torch generators take seeds up to this


# --------------------------------------------------------------------------------------------------------------------
# Checks: value -> value the engine uses, or a FramePackError
# --------------------------------------------------------------------------------------------------------------------


def _fail(name: str, value, expected: str, fix: str = "") -> FramePackError:
    shown = repr(value) if not isinstance(value, float) else f"{value:g}"
    return FramePackError(Option(name), f" must be {expected}, got {shown}" + (f": {fix}." if fix else "."))


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False,
           fix: str = "") -> Callable[[str, Any], float]:
    """A finite real number (not a bool or a string) in [low, high] (low excluded when low_open)."""

    def check(name, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise _fail(name, value, "a number", fix)
        value = float(value)
        expected = "a finite number"
        if low is not None or high is not None:
            left = "(" if low_open else "["
            expected = f"a finite number in {left}{'-inf' if low is None else f'{low:g}'}, " \
                       f"{'inf' if high is None else f'{high:g}'}]"
        if not math.isfinite(value) or (low is not None and (value < low or (low_open and value == low))) \
                or (high is not None and value > high):
            raise _fail(name, value, expected, fix)
        return value

    check.flag_type = float
    return check


def integer(low: int | None = None, high: int | None = None, *, fix: str = "") -> Callable[[str, Any], int]:
    """An integer (a float with an integral value is accepted, a bool is not) in [low, high]."""

    def check(name, value):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise _fail(name, value, "an integer", fix)
        value = int(value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low}" if high is None else f"from {low} to {high}"
            raise _fail(name, value, f"an integer {bounds}", fix)
        return value

    check.flag_type = int
    return check


def optional(check: Callable) -> Callable:
    """None, or what `check` accepts."""

    def checked(name, value):
        return None if value is None else check(name, value)

    checked.flag_type = getattr(check, "flag_type", str)
    return checked


def choice(*choices: str) -> Callable[[str, Any], str]:
    def check(name, value):
        if value not in choices:
            close = difflib.get_close_matches(str(value), choices, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FramePackError(f"Unknown {name} {value!r}{hint}: choose one of {', '.join(choices)}.")
        return value

    check.flag_type = str
    check.choices = choices
    return check


def text(name: str, value) -> str:
    """A string that can be encoded as UTF-8 (a lone surrogate cannot, and would break the tokenizer)."""
    if not isinstance(value, str):
        raise _fail(name, value, "a string", "pass the text itself")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise FramePackError(Option(name), " holds characters that are not valid Unicode text (a lone surrogate): "
                             "pass ordinary text.") from None
    return value


text.flag_type = str


def file_path(name: str, value) -> str:
    """A file's path, given as text or a path object; kept as text (it is recorded in the metadata)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    return text(name, value)


file_path.flag_type = str


def section_prompt_list(name: str, value):
    """None, timestamped text ("[0s: a man waves] [2s: ...]"), lines of text, or a list of strings."""
    if value is None:
        return None
    if isinstance(value, str):
        check_section_prompts(text(name, value))  # a timestamped text's grammar (generation.prompts, the parser)
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
        return [text(name, item) for item in value]
    raise _fail(name, value, "a list of strings or one text (lines, or '[0s: ...] [2s: ...]')")


def parse_section_prompts_flag(value: str):
    """The command's form: timestamped text (holding '[') as it is, else lines or '|'-separated parts."""
    if is_timestamped(value):
        return value
    return [part.strip() for part in value.replace("|", "\n").splitlines() if part.strip()]


section_prompt_list.flag_type = parse_section_prompts_flag


def integer_list(separators: str, low: int, high: int, example: str) -> Callable[[str, Any], list[int] | None]:
    """None, a list of integers in [low, high], or the command's text form of it (`example`, split on any of
    `separators`); one integer is a list of one."""
    split = re.compile(f"[{re.escape(separators)}]")

    def check(name, value):
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = [int(part) for part in split.split(value)]
            except ValueError:
                raise _fail(name, value, f"integers separated by {separators[0]!r}", f"e.g. {example}") from None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise _fail(name, value, f"a list of integers (or the text {example!r})")
        return [integer(low, high)(name, item) for item in value]

    check.flag_type = str
    check.json_schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "integer"}}]}
    return check


def one_frame_switches(name: str, value) -> list[str] | None:
    """None, or some of ONE_FRAME_SWITCHES as a list or the command's 'no_2x,no_4x' (musubi's names)."""
    if value is None:
        return None
    items = [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(item, str) for item in items):
        raise _fail(name, value, f"some of {', '.join(ONE_FRAME_SWITCHES)}", "e.g. 'no_2x,no_4x'")
    for item in items:
        key = item.partition("=")[0]
        if key in ("target_index", "control_index"):  # musubi writes these inside --one_frame_inference
            raise FramePackError(Option(name), f" holds {item!r}: give it as ", Option(key, item.partition("=")[2]),
                                 " instead.")
        if item not in ONE_FRAME_SWITCHES:
            raise FramePackError("Unknown ", Option(name), f" {item!r}: choose from {', '.join(ONE_FRAME_SWITCHES)}.")
    return sorted(set(items)) or None


one_frame_switches.flag_type = str
one_frame_switches.json_schema = {"anyOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "string", "enum": list(ONE_FRAME_SWITCHES)}}]}


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "True or False")
    return value


boolean.flag_type = bool


def check_device(name: str):
    """A device this machine has: "cpu", "cuda" or "cuda:N" (N below the GPU count)."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise FramePackError(f"Unknown device {name!r}: use cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FramePackError(f"Device {name!r} asked for, but this PyTorch sees no CUDA GPU: use ",
                                 Option("device", "cpu"), ", or install the CUDA build of PyTorch on a machine with "
                                 "an NVIDIA GPU.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FramePackError(f"Device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA "
                                 "GPU(s): pick one of them (cuda:0, ...).")
    elif device.type != "cpu":
        raise FramePackError(f"Device {name!r} is not supported: use cpu, cuda or cuda:N.")
    return device


def lora_list(name: str, value):
    """None, or LoRA files each with a strength: "PATH[:STRENGTH]" texts, (path, strength) pairs, or a list of them.
    Returns [(path, strength), ...]; a missing file or a pickle file is refused here, before any model loads."""
    if value is None:
        return None
    single = isinstance(value, (str, Path)) or (isinstance(value, (list, tuple)) and len(value) == 2
                                                 and isinstance(value[1], numbers.Real))
    loras = []
    for item in [value] if single else value:
        if isinstance(item, Path):
            item = str(item)
        if isinstance(item, str):
            path, _, tail = item.rpartition(":")
            try:
                item = (path, float(tail)) if path else (item, 1.0)
            except ValueError:  # no strength given: the colon belongs to the path (C:\...)
                item = (item, 1.0)
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], (str, Path))):
            raise _fail(name, item, "'PATH[:STRENGTH]' or a (path, strength) pair", "e.g. 'style.safetensors:0.8'")
        path = text(name, str(item[0]))
        check_lora_source(path)
        loras.append((path, number(-100, 100, fix="1 applies the LoRA as trained")(f"{name} strength", item[1])))
    return loras or None


lora_list.flag_type = str
lora_list.flag_action = "append"


def option(default, help: str, check: Callable, *, flag: bool = True, metavar: str | None = None):
    """A dataclass field carrying its check and help text (read by `options()` and the command line)."""
    return field(default=default, metadata={"check": check, "help": help, "flag": flag, "metavar": metavar})


# --------------------------------------------------------------------------------------------------------------------
# The settings
# --------------------------------------------------------------------------------------------------------------------


class _Settings:
    """Shared behaviour: construction from keyword options with every check run, and the option table."""

    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return [item for item in dataclasses.fields(cls) if "check" in item.metadata]

    @classmethod
    def from_options(cls, **given):
        """The settings for these keyword options: unknown names and bad values raise a FramePackError."""
        known = {item.name for item in cls.options()}
        unknown = [name for name in given if name not in known]
        if unknown:
            close = difflib.get_close_matches(unknown[0], sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise FramePackError(f"Unknown option {unknown[0]!r}{hint}: the options are {', '.join(sorted(known))}.")
        return cls(**given).validate()

    def validate(self):
        """Runs every option's check (normalising values, e.g. 5 -> 5.0 seconds), then the checks across options."""
        for item in self.options():
            object.__setattr__(self, item.name, item.metadata["check"](item.name, getattr(self, item.name)))
        self._check_together()
        return self

    def _check_together(self):
        pass

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def defaults(cls) -> dict:
        return {item.name: item.default for item in cls.options()}


@dataclass
class GenerationSettings(_Settings):
    """Every knob of one generation; written into the output's metadata so a video can be reproduced."""

    prompt: str = option("", "what happens in the video", text)
    negative_prompt: str = option("", "what to avoid; used only when cfg > 1", text)
    seconds: float = option(5.0, "video length in seconds", number(0, MAX_SECONDS, low_open=True, fix="e.g. 5"))
    fps: float = option(30.0, "frame rate of the video (sections are counted at it)",
                        number(1, 240, fix="e.g. 30"))
    seed: int = option(31337, "one seed reproduces the whole video", integer(0, MAX_SEED))
    steps: int = option(25, "sampler steps per section", integer(1, 1000, fix="the official default is 25"))
    distilled_guidance: float = option(10.0, "distilled guidance scale (the model sees it x 1000)",
                                       number(0, 100, fix="the official default is 10"))
    cfg: float = option(1.0, "real classifier-free guidance; 1 turns it off (one model call per step)",
                        number(1, 100, fix="1 turns real guidance off"))
    guidance_rescale: float = option(0.0, "pull the guided prediction's spread back toward the positive one",
                                     number(0, 1))
    latent_window_size: int = option(9, "latent frames per section (9 -> 33 pixel frames)",
                                     integer(1, 33, fix="the official value is 9"))
    resolution: int | None = option(None, "bucket resolution (default: the model's, 640)",
                                    optional(integer(64, 2048, fix="the model was trained at 640")))
    width: int | None = option(None, "text-to-video width before bucketing", optional(integer(16, 8192)))
    height: int | None = option(None, "text-to-video height before bucketing", optional(integer(16, 8192)))
    sampler: str = option("unipc", "unipc (bh1, the official), unipc_bh2 or euler", choice(*SAMPLERS))
    shift: float | None = option(None, "a fixed flux shift instead of the one from the token count",
                                 optional(number(0, 100, low_open=True)))
    cache: str | None = option(None, "step caching: teacache or magcache (skips the DiT's blocks on some steps)",
                               optional(choice(*STEP_CACHES)))
    cache_threshold: float | None = option(None, "the step cache's threshold; higher skips more (default: teacache "
                                           "0.15, magcache 0.1)", optional(number(0, fix="0 skips nothing")))
    magcache_k: int | None = option(None, "MagCache: most steps skipped in a row (default 3)",
                                    optional(integer(0, 1000)))
    magcache_retention: float | None = option(None, "MagCache: fraction of the first steps always computed "
                                              "(default 0.2)", optional(number(0, 1)))
    magcache_calibration: str | None = option(None, "MagCache: per-step ratios from framepack calibrate-cache (a "
                                              ".json; default: the MagCache authors' published ratios for the "
                                              "model)", optional(file_path), metavar="JSON")
    section_prompts: list[str] | str | None = option(
        None, "suffixes spread over the video (lines or 'a|b'), or timestamped '[0s: ...] [2s: ...]'",
        section_prompt_list)
    init_strength: float = option(1.0, "start image strength; < 1 mixes in noise", number(0, 1, low_open=True))
    end_strength: float = option(1.0, "end image strength (first-last-frame video)", number(0, 1))
    vision_strength: float = option(1.0, "scale of the SigLIP image conditioning", number(0, 10))
    vae_decode: str = option("exact", "exact: each section decoded whole when memory allows; official: temporal "
                             "tiles as the official app's VAE decodes", choice("exact", "official"))
    latent_paddings: list[int] | None = option(
        None, "bidirectional model: each section's latent padding in windows, in generation order (musubi's "
        "--latent_paddings; e.g. 0,0,0 makes every section start right at its keyframe)",
        integer_list(",", 0, MAX_INDEX, "0,0,0"), metavar="P,P,...")
    one_frame: bool = option(False, "one-frame inference: one image from the start image and the prompt (an image "
                             "output, e.g. --out edit.png)", boolean)
    target_index: int | None = option(None, "one-frame: the generated frame's time index (default: "
                                      "latent_window_size)", optional(integer(0, MAX_INDEX)))
    control_index: list[int] | None = option(
        None, "one-frame: the time index of each control image, e.g. '0;10' (default 0 for one control image)",
        integer_list(";,", 0, MAX_INDEX, "0;10"), metavar="I;I;...")
    one_frame_options: list[str] | None = option(
        None, "one-frame: no_2x, no_4x, no_post (leave out those inputs of zeros, as musubi-tuner names them)",
        one_frame_switches, metavar="no_2x,no_4x,no_post")
    interpolate: int = option(1, "RIFE frame interpolation: N-1 frames made between each pair (2 doubles the frame "
                              "rate); 1 = off", integer(1, MAX_INTERPOLATE, fix="2 doubles the frame rate"),
                              metavar="N")
    rife_model: str | None = option(None, "RIFE 4.x weights as .safetensors, for interpolate (framepack convert-rife "
                                    "makes them from Practical-RIFE's flownet.pkl)", optional(file_path),
                                    metavar="SAFETENSORS")
    fps_out: float | None = option(None, "the output's frame rate (default: fps x interpolate)",
                                   optional(number(1, 960, fix="e.g. 60")))
    upscale: str | None = option(None, "an upscaler's weights (.safetensors or .pth; ESRGAN, Real-ESRGAN, SwinIR... "
                                 "through spandrel), run after interpolation", optional(file_path), metavar="MODEL")

    @property
    def output_fps(self) -> float:
        """The frame rate of the written video: fps_out, else fps times the interpolation."""
        return self.fps_out if self.fps_out is not None else self.fps * self.interpolate

    def _check_together(self):
        self._check_one_frame()
        self._check_cache()
        self._check_postprocess()

    def _check_postprocess(self):
        """Interpolation needs its weights, and both models' files are checked before anything loads."""
        if self.interpolate > 1 and self.rife_model is None:
            raise FramePackError(Option("interpolate", self.interpolate), " needs RIFE weights: pass ",
                                 Option("rife_model", ...), f"; {RIFE_WEIGHTS_HELP}.")
        if self.rife_model is not None and self.interpolate == 1:
            raise FramePackError(Option("rife_model"), " is set but ", Option("interpolate"), " is 1: pass ",
                                 Option("interpolate", 2), " (or more), or leave ", Option("rife_model"), " out.")
        if self.rife_model is not None:
            check_rife_path(self.rife_model)
        if self.upscale is not None:
            check_upscaler_path(self.upscale)
            import_spandrel()  # installed and importable, or one line saying how

    def _check_one_frame(self):
        given = [name for name in ("target_index", "control_index", "one_frame_options") if getattr(self, name)
                 is not None]
        if given and not self.one_frame:
            raise FramePackError(Option(given[0]), " is a one-frame option: pass ", Option("one_frame"),
                                 " too, or leave it unset.")
        video_only = [name for name in ("latent_paddings", "fps_out") if getattr(self, name) is not None]
        video_only += ["interpolate"] if self.interpolate > 1 else []
        if self.one_frame and video_only:
            raise FramePackError(Option(video_only[0]), " is for the frames of a video, and ", Option("one_frame"),
                                 " makes one image: leave one of them out (", Option("upscale"),
                                 " does apply to the image).")

    def _check_cache(self):
        magcache_options = ("magcache_k", "magcache_retention", "magcache_calibration")
        given = [name for name in ("cache_threshold", *magcache_options) if getattr(self, name) is not None]
        if self.cache is None and given:
            raise FramePackError(Option(given[0]), " is set but ", Option("cache"), " is not: pass ",
                                 Option("cache", "teacache"), " or ", Option("cache", "magcache"), " too, or leave ",
                                 Option(given[0]), " unset.")
        if self.cache is None:
            return
        # The defaults are written in, so the output's metadata records the values that ran.
        if self.cache_threshold is None:
            self.cache_threshold = DEFAULT_THRESHOLDS[self.cache]
        if self.cache != "magcache":
            for name in (name for name in given if name in magcache_options):
                raise FramePackError(Option(name), " is a MagCache option, but ", Option("cache"),
                                     f" is {self.cache!r}: pass ", Option("cache", "magcache"), " or leave it unset.")
            return
        self.magcache_k = MAGCACHE_K if self.magcache_k is None else self.magcache_k
        self.magcache_retention = MAGCACHE_RETENTION if self.magcache_retention is None else self.magcache_retention
        if self.magcache_calibration is None:
            return  # the resolve step takes the authors' published ratios for the model's variant
        # The file itself is read once, by the resolve step (framepack_engine.resolve), before any model loads.
        if not Path(self.magcache_calibration).is_file():
            raise FramePackError(f"The MagCache calibration {Path(self.magcache_calibration).name!r} does not exist: "
                                 "give the JSON file framepack calibrate-cache wrote (",
                                 Option("magcache_calibration"), ").")


@dataclass
class ModelSettings(_Settings):
    """Where the model comes from and how it runs: `Engine.from_pretrained`'s options and the command's."""

    transformer: str = option("lllyasviel/FramePackI2V_HY", "repo id, folder or single .safetensors file", text)
    base: str = option("hunyuanvideo-community/HunyuanVideo", "text encoders, tokenizers and VAE (repo id or folder)",
                       text)
    image_encoder: str = option("lllyasviel/flux_redux_bfl", "SigLIP feature extractor and image encoder", text)
    variant: str = option("auto", "bidirectional or f1; auto reads 'F1' in the transformer's name",
                          choice(*VARIANT_CHOICES))
    device: str | None = option(None, "cuda, cuda:1, cpu (default: cuda when available)", optional(text))
    dtype: str = option("bfloat16", "the DiT's dtype", choice(*DTYPE_NAMES))
    attention: str = option("auto", "sdpa, triton, flash, xformers or sage", text)
    fused_kernels: bool = option(False, "run the DiT's norms, modulation and patchify as Triton kernels (CUDA)",
                                 boolean)
    compile: bool = option(False, "regional torch.compile of the DiT's blocks (each kind compiled once, reused by "
                           "every block, section and step)", boolean)
    vram_budget_gb: float | None = option(
        None, "device memory the models may use, in GB; the memory planner streams what does not fit "
        "(default: the free memory minus the margin)",
        optional(number(0, 10_000, low_open=True, fix="e.g. 6 for a 6 GB card")))
    memory_margin_gb: float = option(1.0, "device memory left free when no vram_budget_gb is given, in GB",
                                     number(0, 10_000))
    quantize: str | None = option(None, "quantize the DiT's block linears and the Llama text encoder's weights: "
                                  "fp8, int8 or int4 (a quantized checkpoint stays quantized without it)",
                                  optional(choice(*QUANTIZE_FORMATS)))
    fp8_compute: bool = option(False, "fp8 weights multiply fp8 activations on fp8 tensor cores (Ada/Hopper)",
                               boolean)
    lora: list[tuple[str, float]] | None = option(
        None, "a LoRA file as PATH[:STRENGTH] (kohya/musubi-tuner, diffusers/PEFT or ComfyUI layout); repeat for several",
        lora_list, metavar="PATH[:STRENGTH]")
    lora_mode: str = option("fused", "fused: merged into the weights (full speed); live: a branch beside them "
                            "(strengths change without reloading)", choice(*LORA_MODES))
    offline: bool = option(False, "never download: use the local Hugging Face cache only", boolean)

    def _check_together(self):
        choice(*BACKEND_NAMES)("attention", self.attention)
        if self.device is not None:
            check_device(self.device)
        if self.fp8_compute and self.quantize not in (None, "fp8"):
            raise FramePackError(Option("fp8_compute"), " multiplies fp8 weights, but ", Option("quantize"),
                                 f" is {self.quantize!r}: pass ", Option("quantize", "fp8"), " or leave ",
                                 Option("fp8_compute"), " off.")


def add_flags(parser, settings_class, skip: tuple[str, ...] = ()) -> None:
    """One `--name` flag per option of `settings_class`, defaulting to None so unset flags keep the settings'
    default; booleans are switches."""
    for item in settings_class.options():
        if item.name in skip or not item.metadata["flag"]:
            continue
        check = item.metadata["check"]
        flag = flag_name(item.name)
        default = "" if item.default is None else f" (default {item.default})"
        if check.flag_type is bool:
            parser.add_argument(flag, action="store_true", default=None, help=item.metadata["help"])
            continue
        # A list option's flag may repeat (flag_action "append"): each use adds one value.
        parser.add_argument(flag, type=check.flag_type, default=None, choices=getattr(check, "choices", None),
                            action=getattr(check, "flag_action", "store"), metavar=item.metadata["metavar"],
                            help=item.metadata["help"] + default)


def given_flags(args, settings_class, skip: tuple[str, ...] = ()) -> dict:
    """The options the user set on the command line (the rest keep their defaults)."""
    return {item.name: getattr(args, item.name) for item in settings_class.options()
            if item.name not in skip and getattr(args, item.name, None) is not None}
